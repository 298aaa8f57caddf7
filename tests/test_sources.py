"""Local folder or Hub id: a missing local input fails at once, before any data is read, with what to do; the
ambiguous `data/okvqa` (a relative path and a valid-looking Hub id) is read as a path when `data/` exists, and fails
naming both readings when the Hub cannot provide it either."""

import pytest
from e2e_scripts import ROOT, load_script

from trl_icd import sources
from trl_icd.sources import (
    SourceNotFoundError,
    check_pretrained_path,
    exit_on_missing_input,
    only_a_path,
    require_local,
    resolve_source,
)

PLAN5 = str(ROOT / "recipes" / "okvqa" / "plan5.yaml")


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "text, path_only",
    [
        ("/abs/okvqa", True), ("./data/okvqa", True), ("../okvqa", True), ("~/okvqa", True), ("data/okvqa/", True),
        ("a/b/c", True), ("okvqa", True), ("data\\okvqa", True),
        ("data/okvqa", False), ("ReplugLens/OK-VQA", False), ("lmms-lab/VQAv2", False),
    ],
)
def test_which_strings_can_only_be_paths(text, path_only):
    assert only_a_path(text) is path_only


def test_existing_paths_are_local_and_checked_for_their_kind(tmp_path):
    folder = tmp_path / "okvqa"
    folder.mkdir()
    assert resolve_source(folder, "data") == sources.ResolvedSource("local", str(folder))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(SourceNotFoundError, match="is a file; expected a folder"):
        resolve_source(tmp_path / "file.json", "data")
    assert require_local(tmp_path / "file.json", "RCE data", expect="file") == tmp_path / "file.json"
    with pytest.raises(SourceNotFoundError, match="is a folder; expected a file"):
        require_local(folder, "RCE data", expect="file")


@pytest.mark.parametrize("text", ["/no/such/dir", "./data/okvqa", "okvqa", "outputs/okvqa/plan5"])
def test_a_missing_path_fails_with_the_hint_and_never_probes_the_hub(text, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "hub_unavailable", lambda *a: pytest.fail("the Hub was consulted"))
    with pytest.raises(SourceNotFoundError, match="does not exist") as info:
        resolve_source(text, "OK-VQA data folder", hint="HOW TO GET IT")
    assert str(info.value).endswith("HOW TO GET IT")


def test_ambiguous_id_is_a_path_when_its_first_component_is_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(sources, "hub_unavailable", lambda *a: pytest.fail("the Hub was consulted"))
    with pytest.raises(SourceNotFoundError, match="data/ exists here, so 'data/okvqa' is read as a local path"):
        resolve_source("data/okvqa", "OK-VQA data folder")


def test_ambiguous_id_offline_without_a_cached_copy_names_both_readings(monkeypatch, tmp_path, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFoundError) as info:
        resolve_source("data/okvqa", "OK-VQA data folder", hint="HOW TO GET IT")
    message = str(info.value)
    assert "either reading" in message and f"{tmp_path}/data/okvqa does not exist" in message
    assert "as the Hub dataset 'data/okvqa': the Hub is offline (HF_HUB_OFFLINE=1)" in message
    assert "./data/okvqa" in message and message.endswith("HOW TO GET IT")


def test_hub_ids_the_hub_can_provide_stay_hub_ids(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # a known id is never probed
    monkeypatch.setattr(sources, "hub_unavailable", lambda *a: pytest.fail("the Hub was consulted"))
    assert resolve_source("ReplugLens/OK-VQA", "data", known_hub_ids={"ReplugLens/OK-VQA"}).kind == "hub"
    # an unknown one is, once
    calls = []
    monkeypatch.setattr(sources, "hub_unavailable", lambda repo_id, repo_type: calls.append((repo_id, repo_type)))
    resolved = resolve_source("someone/vqa-copy", "data")
    assert (resolved.kind, resolved.ambiguous) == ("hub", True) and calls == [("someone/vqa-copy", "dataset")]
    monkeypatch.setattr(sources, "hub_unavailable", lambda *a: "the Hub has no dataset of that name")
    with pytest.raises(SourceNotFoundError, match="the Hub has no dataset of that name"):
        resolve_source("someone/typo", "data")


def test_checkpoints_must_hold_a_config(tmp_path):
    with pytest.raises(SourceNotFoundError, match="without config.json"):
        check_pretrained_path(tmp_path, "selector checkpoint")
    (tmp_path / "config.json").write_text("{}")
    assert check_pretrained_path(tmp_path, "selector checkpoint").is_local


def test_scripts_exit_with_the_message_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as info, exit_on_missing_input():
        raise SourceNotFoundError("data folder 'x' does not exist")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: data folder 'x' does not exist\n"


def test_train_without_data_says_where_to_get_it_and_writes_nothing(monkeypatch, tmp_path):
    """The research recipe on a fresh clone: the missing `./data/okvqa` is reported before anything else, with the
    official download steps, and no (empty) output folder is left behind."""
    monkeypatch.chdir(tmp_path)
    train = load_script("train_okvqa")
    with pytest.raises(SourceNotFoundError) as info:
        train.main(["--config", PLAN5])
    message = str(info.value)
    assert message.startswith("OK-VQA data folder (dataset_path) './data/okvqa' does not exist")
    for url in ("https://okvqa.allenai.org/static/data/mscoco_val2014_annotations.json.zip",
                "https://okvqa.allenai.org/static/data/OpenEnded_mscoco_train2014_questions.json.zip",
                "http://images.cocodataset.org/zips/train2014.zip", "http://images.cocodataset.org/zips/val2014.zip"):
        assert url in message
    assert list(tmp_path.iterdir()) == []


def test_train_with_the_ambiguous_path_offline_names_both_readings(monkeypatch, tmp_path, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFoundError, match="could not be found under either reading"):
        load_script("train_okvqa").main(["--config", PLAN5, "--dataset_path", "data/okvqa"])
    assert list(tmp_path.iterdir()) == []


def test_evaluate_checks_selector_paths_before_reading_any_data(monkeypatch, tmp_path):
    evaluate = load_script("evaluate_okvqa")
    monkeypatch.setattr(evaluate, "load_data", lambda *a: pytest.fail("data were read before the selector check"))
    with pytest.raises(SourceNotFoundError, match=r"selector checkpoint \(--selectors\) '/no/such/dir' does not exist"):
        evaluate.main(["--selector", "/no/such/dir", "--results_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()

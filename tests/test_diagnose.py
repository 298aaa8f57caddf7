"""`trl_icd.diagnose`: the advantage-scale formulas against the estimators themselves, one synthetic log history per
situation a researcher has to tell apart (advantages computed by the real estimators, not written by hand), the
files it reads (finished, running, metrics.jsonl, missing), and the logs of a real demo run."""

import json
import math

import numpy as np
import pytest
import torch
from e2e_scripts import ROOT, load_script

from trl_icd.advantages import advantage_stats, compute_group_advantages
from trl_icd.diagnose import contrasted_row_m2, diagnose, format_diagnosis, load_run, main, run_averages

G = 8


@pytest.mark.parametrize("mode", ["zscore", "rank", "mean", "rloo"])
def test_row_m2_matches_the_estimators(mode):
    """Mean squared advantage of a contrasted row (distinct rewards), as the diagnosis predicts it, against the
    estimators on 4,000 groups; and the batch std over half-flat batches ≈ sqrt(c · m2)."""
    rng = np.random.default_rng(0)
    rewards = torch.tensor(rng.uniform(0, 2, size=(4000, G)))
    adv = compute_group_advantages(rewards.reshape(-1), G, mode=mode, min_std=0.0, clip=None)
    within = float(rewards.std(dim=1).mean())
    predicted = contrasted_row_m2(mode, G, within_std=within)
    assert float((adv**2).mean()) == pytest.approx(predicted, rel=0.05 if mode in ("mean", "rloo") else 1e-6)
    flat = rewards.clone()
    flat[::2] = 1.0  # every other group flat
    adv = compute_group_advantages(flat.reshape(-1), G, mode=mode, min_std=0.0, clip=None)
    assert float(adv.std()) == pytest.approx(math.sqrt(0.5 * predicted), rel=0.05)
    if mode == "rank":  # the README's 0.70 is the within-group std with n-1; over a batch it is 0.655
        assert math.sqrt(predicted) == pytest.approx(0.655, abs=1e-3)
        assert float(adv.reshape(-1, G)[1].std()) == pytest.approx(0.70, abs=5e-3)


def _entry(step, groups, mode="zscore", min_std=0.1, clip=5.0, **extra):
    rewards = torch.tensor(np.asarray(groups, dtype=float).reshape(-1))
    adv = compute_group_advantages(rewards, G, mode=mode, min_std=min_std, clip=clip)
    entry = {"step": step, "reward": float(rewards.mean()), **advantage_stats(adv, rewards, G), "epoch": step / 100}
    entry.update(extra)
    return entry


def _groups(rng, contrast, spread=1.0, n=64, base=None):
    """`n` groups: a share `contrast` with distinct rewards of scale `spread`, the rest flat."""
    out = []
    for k in range(n):
        level = base if base is not None else rng.choice([0.0, 2.0])
        if k < round(contrast * n):
            out.append(level + spread * rng.uniform(0, 1, G))
        else:
            out.append(np.full(G, level))
    return out


def _write_run(path, history, settings, finished=True, where="trainer_state.json"):
    path.mkdir(parents=True, exist_ok=True)
    if finished:
        history = history + [{"train_runtime": 10.0, "train_loss": 0.0, "step": history[-1]["step"]}]
    if where == "metrics.jsonl":
        (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
    else:
        target = path / where
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"log_history": history, "global_step": history[-1]["step"]}))
    (path / "run_config.json").write_text(json.dumps({"ICDGRPOConfig": settings}))
    return path


SETTINGS = {"advantage_mode": "zscore", "advantage_min_std": 0.1, "advantage_clip": 5.0, "num_generations": G,
            "beta": 0.0, "learning_rate": 1e-5, "reward_mode": "hard_plus_soft", "adaptive_kl_beta_max": 10.0}


def _history(rng, steps, make, **extra):
    return [make(rng, s) | extra for s in range(10, 10 * steps + 1, 10)]


def test_flat_groups_rank_mode_explain_a_tiny_advantage_std(tmp_path):
    """The research's question: rank advantages, std 0.006. Nearly every group flat -> signal, not LR."""
    rng = np.random.default_rng(1)
    settings = {**SETTINGS, "advantage_mode": "rank", "beta": 0.15}
    history = [_entry(s, _groups(rng, 1 / 64 if s % 30 == 0 else 0.0, n=64), mode="rank",
                      loss=0.012 + 1e-5, kl=0.08, entropy=2.0) for s in range(10, 310, 10)]
    result = diagnose(load_run(_write_run(tmp_path / "run", history, settings)))
    a = result.averages
    assert a["advantages/std"] < 0.1 and a["frac_reward_zero_std"] > 0.99
    assert result.cause_of_small_std == "flat groups" and result.bottleneck == "signal"
    assert result.recommendations[0].option == "reward_mode"
    assert any(r.option == "learning_rate" and "leave" in r.action for r in result.recommendations)
    text = format_diagnosis(result)
    assert "cannot create one" in text and "flat groups" in text
    # The KL term's share of the loss value, as the research computed it (0.15 x 0.08 = 0.012 vs ~1e-5).
    assert a["kl_share_of_loss"] == pytest.approx(0.012 / (0.012 + 1e-5), rel=1e-3)


def test_min_std_floor_explains_a_small_std_despite_contrast(tmp_path):
    rng = np.random.default_rng(2)
    history = _history(rng, 20, lambda r, s: _entry(s, _groups(r, 0.9, spread=6e-3), loss=1e-4, entropy=2.0))
    result = diagnose(load_run(_write_run(tmp_path / "run", history, SETTINGS)))
    assert result.cause_of_small_std == "the min_std floor" and result.bottleneck == "signal + update size"
    assert result.recommendations[0].option == "advantage_min_std"
    floor = next(f for f in result.findings if f.key == "advantage_std").text
    assert "the floor binds" in floor and "logged/predicted = 1.0" in floor  # the decomposition explains the value


def test_reward_scale_in_mean_mode(tmp_path):
    rng = np.random.default_rng(3)
    settings = {**SETTINGS, "advantage_mode": "mean"}
    history = _history(rng, 20, lambda r, s: _entry(s, _groups(r, 0.9, spread=0.01), mode="mean", entropy=2.0))
    result = diagnose(load_run(_write_run(tmp_path / "run", history, settings)))
    assert result.cause_of_small_std == "the reward scale"
    assert any(r.option == "advantage_mode" for r in result.recommendations)


def test_kl_term_dominates_when_beta_hits_its_cap(tmp_path):
    rng = np.random.default_rng(4)
    settings = {**SETTINGS, "beta": 0.1, "adaptive_kl": True}
    history = _history(rng, 20, lambda r, s: _entry(s, _groups(r, 0.9), kl=0.5, kl_beta=10.0, loss=5.0,
                                                   entropy=2.0))
    result = diagnose(load_run(_write_run(tmp_path / "run", history, settings)))
    assert result.bottleneck == "kl" and result.cause_of_small_std is None
    assert result.averages["kl_share_of_gradient_weight"] > 0.5
    assert result.recommendations[0].option == "beta / adaptive_kl"
    assert "cap" in next(f for f in result.findings if f.key == "kl").text


def test_update_size_when_the_signal_is_healthy_but_nothing_moves(tmp_path):
    rng = np.random.default_rng(5)
    settings = {**SETTINGS, "beta": 0.04, "learning_rate": 1e-9}
    history = _history(rng, 20, lambda r, s: _entry(s, _groups(r, 0.95, base=1.0), kl=1e-7, loss=4e-9,
                                                   entropy=2.0, learning_rate=1e-9))
    result = diagnose(load_run(_write_run(tmp_path / "run", history, settings)))
    assert result.bottleneck == "update size"
    assert result.recommendations[0].option == "learning_rate" and "×10" in result.recommendations[0].action


def test_a_learning_run_has_no_bottleneck(tmp_path):
    rng = np.random.default_rng(6)
    history = [_entry(s, _groups(rng, 0.9, base=s / 300), entropy=2.0 - s / 300) for s in range(10, 310, 10)]
    result = diagnose(load_run(_write_run(tmp_path / "run", history, SETTINGS)))
    assert result.bottleneck == "none"
    assert result.averages["reward/trend"]["low"] > 0
    assert "No KL term" in next(f for f in result.findings if f.key == "kl").text


def test_clipping_is_reported(tmp_path):
    rng = np.random.default_rng(7)
    settings = {**SETTINGS, "advantage_mode": "mean", "advantage_clip": 0.2}
    history = _history(rng, 10, lambda r, s: _entry(s, _groups(r, 0.9, spread=2.0), mode="mean", clip=0.2,
                                                   entropy=2.0))
    result = diagnose(load_run(_write_run(tmp_path / "run", history, settings)))
    assert "clipping is active" in next(f for f in result.findings if f.key == "advantage_std").text


def test_sources_running_metrics_jsonl_and_summary(tmp_path):
    rng = np.random.default_rng(8)
    history = _history(rng, 6, lambda r, s: _entry(s, _groups(r, 0.5), entropy=2.0,
                                                   **{"in_context_reward/backend_pairs": 50.0}))
    # A running training: only checkpoints, the newest one wins.
    run = tmp_path / "running"
    _write_run(run, history[:3], SETTINGS, finished=False, where="checkpoint-30/trainer_state.json")
    _write_run(run, history[:5], SETTINGS, finished=False, where="checkpoint-50/trainer_state.json")
    log = load_run(str(run))
    assert not log.finished and log.source.endswith("checkpoint-50/trainer_state.json") and len(log.history) == 5
    # metrics.jsonl reaching a later step wins over the checkpoint; a half-written last line is tolerated.
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history) + '{"step": 70, "rew')
    log = load_run(str(run))
    assert log.source.endswith("metrics.jsonl") and len(log.history) == 6
    # Reward calls: summed over steps from the per-step log, or taken from run_summary.json.
    assert run_averages(log)["reward_calls"] == pytest.approx(50.0 * 60)
    # ICDGRPOTrainer's running totals: the last logged value is the total so far
    totals = [dict(e, **{"reward_calls/sent": 100 * (i + 1), "zero_contrast/queries_skipped": i})
              for i, e in enumerate(history)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in totals))
    averages = run_averages(load_run(str(run)))
    assert averages["reward_calls"] == 600 and averages["zero_contrast/queries_skipped"] == 5
    # run_summary.json as examples/train_okvqa.py writes it
    (run / "run_summary.json").write_text(json.dumps(
        {"training_cost": {"reward_calls/sent": 1234, "zero_contrast/queries_skipped": 7}}))
    averages = run_averages(load_run(str(run)))
    assert averages["reward_calls"] == 1234 and averages["zero_contrast/queries_skipped"] == 7
    # Settings from a recipe passed on the command line override the recorded ones.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("advantage_mode: rank\nnum_generations: 8\n")
    assert load_run(str(run), str(recipe)).settings["advantage_mode"] == "rank"
    with pytest.raises(FileNotFoundError, match="no logged training metrics"):
        load_run(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "missing"))


def test_command_line(tmp_path, capsys):
    rng = np.random.default_rng(9)
    run = _write_run(tmp_path / "run", _history(rng, 5, lambda r, s: _entry(s, _groups(r, 0.5), entropy=2.0)),
                     SETTINGS)
    main([str(run)])
    assert "Reward contrast: 50.0% of groups" in capsys.readouterr().out
    main([str(run), "--json"])
    assert json.loads(capsys.readouterr().out)["bottleneck"] in ("none", "update size")


def test_real_demo_run(tmp_path):
    """A short run of the demo recipe leaves logs and settings diagnose reads; its advantage std is what the
    decomposition predicts from the logged contrast (an independent check on real logs)."""
    out = tmp_path / "demo"
    load_script("train_okvqa").main([
        "--config", str(ROOT / "recipes" / "demo" / "cpu.yaml"), "--output_dir", str(out), "--demo_num_test", "0",
        "--max_steps", "20", "--logging_steps", "5", "--evaluate", "false", "--disable_tqdm", "true",
    ])
    assert (out / "trainer_state.json").is_file() and (out / "run_config.json").is_file()
    result = diagnose(load_run(str(out)))
    assert result.settings["advantage_mode"] == "zscore" and result.settings["num_generations"] == 8
    a = result.averages
    assert a["logged_steps"] == 4 and a["reward_calls"] > 0
    contrast = 1 - a["frac_reward_zero_std"]
    predicted = math.sqrt(contrast * contrasted_row_m2("zscore", 8))
    assert a["advantages/std"] == pytest.approx(predicted, rel=0.1)
    assert "logged/predicted" in format_diagnosis(result)

"""VQA accuracy as a Hugging Face `evaluate` metric, loadable offline from this file's path.

    import evaluate, trl_icd.metrics_module
    metric = evaluate.load(trl_icd.metrics_module.VQA_ACCURACY_PATH)
    metric.compute(predictions=["two"], references=[["2", "two"] * 5])                         # {'vqa_accuracy': 1.0}
    metric.compute(predictions=["Yes"], references=[["yes"] * 10], protocol="vqa2016")  # {'vqa_accuracy': 1.0}

The scores are `trl_icd.metrics.vqa_accuracy` under a named protocol: "vqa" (today's official script, the default),
"vqa2016" or "lmms_eval" (see that module)."""

import datasets
import evaluate

from trl_icd.metrics import DEFAULT_VQA_PROTOCOL, vqa_accuracy_batch

_CITATION = """@inproceedings{antol2015vqa,
  title={{VQA}: Visual Question Answering},
  author={Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and
          Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={ICCV},
  year={2015}
}"""

_DESCRIPTION = (
    "VQA accuracy: min(1, matching annotators / 3), averaged over the 10 leave-one-out annotator subsets, after the "
    "answer normalisation of a named protocol (punctuation, periods, number words, articles, contractions): 'vqa' "
    "(today's official script), 'vqa2016' (its earlier version) or 'lmms_eval' (lmms-eval's OK-VQA scoring)."
)

_KWARGS_DESCRIPTION = (
    "Args:\n"
    "    predictions (list of str): one predicted answer per question.\n"
    "    references (list of list of str): the human answers of each question (usually 10).\n"
    "    protocol (str, default 'vqa'): the scoring protocol, a name in `trl_icd.metrics.VQA_PROTOCOLS`.\n"
    "    return_per_question (bool, default False): also return the score of every question.\n"
    "Returns:\n"
    "    vqa_accuracy (float in [0, 1]): the mean over questions; per_question (list of float) on request.\n"
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VQAAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://github.com/GT-Vision-Lab/VQA"],
        )

    def _compute(self, predictions, references, protocol=DEFAULT_VQA_PROTOCOL, return_per_question=False):
        if not predictions:
            raise ValueError("VQA accuracy needs at least one prediction.")
        scores = vqa_accuracy_batch(predictions, references, protocol=protocol)
        result = {"vqa_accuracy": sum(scores) / len(scores)}
        if return_per_question:
            result["per_question"] = scores
        return result

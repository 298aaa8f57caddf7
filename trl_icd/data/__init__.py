"""Corpora (OK-VQA / VQAv2 from the Hub or local files, in-memory, the demo world), features, candidate pools and
selector datasets."""

from .._lazy import lazy_module_getattr
from .corpus import Corpus, CorpusItem, ImageLoadError, most_common_answer  # noqa: F401

_NAMES = {
    "load_okvqa": ".okvqa",
    "load_vqav2": ".okvqa",
    "load_vqa_local": ".okvqa",
    "load_vqa_hub": ".okvqa",
    "HubColumns": ".okvqa",
    "HUB_PRESETS": ".okvqa",
    "corpus_from_hub_dataset": ".okvqa",
    "compute_clip_features": ".features",
    "fallback_features": ".features",
    "FeatureTable": ".features",
    "FeaturizerSpec": ".features",
    "ItemTable": ".features",
    "featurizer_for": ".features",
    "sample_candidate_pools": ".samplers",
    "SAMPLERS": ".samplers",
    "register_sampler": ".samplers",
    "build_selector_dataset": ".selector_dataset",
    "build_demo_world": ".demo",
    "DemoWorld": ".demo",
    "DemoWorldConfig": ".demo",
}
__all__ = sorted(["Corpus", "CorpusItem", "ImageLoadError", "most_common_answer", *_NAMES])
__getattr__ = lazy_module_getattr(__name__, _NAMES)

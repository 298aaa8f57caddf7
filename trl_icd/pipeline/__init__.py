"""Building blocks shared by the end-to-end scripts (`examples/train_okvqa.py`, `generate_rl_data.py`,
`evaluate_okvqa.py`, `compare_plans.py`), in three modules:

- `arguments`: the argument dataclasses and the parser;
- `builders`: corpus, features, per-query candidate pools, scoring backend and reward, selector, RCE warm-up;
- `selection`: every method's selections, their scores, the methods × shots evaluation, the demo's end-of-run
  evaluation.

Every script builds pools with the same `build_pools` call, so training, RL-data generation and evaluation see the
same per-query candidates (never the first K training rows for every query).
"""

from .arguments import (  # noqa: F401
    DATASETS,
    BACKENDS,
    DataArguments,
    RewardArguments,
    SelectorArguments,
    RCEArguments,
    parse_script_arguments,
)
from .builders import (  # noqa: F401
    DataBundle,
    build_demo_world,
    load_corpus,
    load_features,
    check_data_paths,
    load_data,
    training_query_ids,
    build_pools,
    build_backend,
    build_reward,
    load_or_build_selector,
    save_policy,
    build_selector_training_dataset,
    selector_completion,
    run_rce_warmup,
)
from .selection import (  # noqa: F401
    fixed_shots,
    selector_generate,
    select_with_selector,
    retrieval_selections,
    score_selections,
    BASELINES,
    evaluate_methods,
    pool_oracle,
    run_demo_evaluation,
)

__all__ = [
    "BACKENDS",
    "BASELINES",
    "DATASETS",
    "DataArguments",
    "DataBundle",
    "RCEArguments",
    "RewardArguments",
    "SelectorArguments",
    "build_backend",
    "build_demo_world",
    "build_pools",
    "build_reward",
    "build_selector_training_dataset",
    "check_data_paths",
    "evaluate_methods",
    "fixed_shots",
    "load_corpus",
    "load_data",
    "load_features",
    "load_or_build_selector",
    "parse_script_arguments",
    "pool_oracle",
    "retrieval_selections",
    "run_demo_evaluation",
    "run_rce_warmup",
    "save_policy",
    "score_selections",
    "select_with_selector",
    "selector_completion",
    "selector_generate",
    "training_query_ids",
]

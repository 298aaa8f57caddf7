import os

# Tests never reach the Hub (a Hub call would retry for ~50 s before failing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# The test models are tiny: their ops take microseconds, and a second thread only adds synchronisation (measured
# 10-15x slower on a busy 2-core machine). Multi-process tests start their own processes.
torch.set_num_threads(1)

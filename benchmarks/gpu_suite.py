"""One prepared command that measures the real-size path on a GPU machine, and smoke-tests itself on CPU (`--smoke`).

Nothing here needs the Hub: the scorer is a random-weight Qwen2.5-VL built from the real Qwen2.5-VL-3B config values
(`trl_icd.testing.qwen_vl`, size "3b", vocabulary 151,936), images and questions are synthetic (448 x 448 px, 256
image tokens each). Parts, each run in its own process under its own time limit (a failing part prints its
traceback and is recorded as failed; the others still run; partial figures of a part that fails or times out are
kept):

  environment     torch / CUDA / transformers / trl / deepspeed versions, GPU name, date.
  reward_scoring  scored (query, demonstrations) pairs per second and peak GPU memory, bf16 and fp32, on a GRPO-like
                  stream of 0-4-shot prompts: (a) one pair at a time (the research way), (b) batched, (c) the full
                  pipeline (`InContextReward` + reward cache + vision-feature cache + shared prefill); the
                  batched/one-at-a-time ratio (target >= 10x in bf16) and the check that batched and one-at-a-time
                  answers are identical in fp32 (uses `benchmarks/reward_throughput.py`'s stream and modes; each
                  mode is time-boxed and scores a prefix of the stream).
  selector_step   one GRPO step of the selector (`ICDGRPOTrainer`) at K = 64 and 256, G = 8, 64 queries, with a
                  443,757-row feature table (VQAv2-sized): step time, split into generation / reward / other scoring
                  / optimisation, and peak GPU memory. The reward is a cheap stand-in, so this is the selector's cost.
  trainer_run     a short `ICDGRPOTrainer` run of the selector with the real-size scorer as its reward
                  (`QwenVLBackend` in bf16 + `InContextReward`, the research generation settings: 5 tokens, 3 beams):
                  step time split into generation / reward / other scoring / optimisation.
  trainer_zero2   the same run under DeepSpeed ZeRO-2 in one process (skipped, with the reason, when deepspeed does
                  not import).

It prints one table (part, setting, result, peak GPU memory) and writes it, with every figure behind it, as JSON
(`--output`). The default sizes target one H100/H200-class GPU and finish within `--budget-s` (default 470 s, checked
before each part; a part that would start later is recorded as skipped). `--smoke` runs tiny sizes on CPU (about a
minute; `tests/test_gpu_suite.py` runs it and checks the JSON).

    python benchmarks/gpu_suite.py --smoke --output /tmp/gpu_suite_smoke.json       # CPU, about a minute
    python benchmarks/gpu_suite.py --output gpu_suite.json                           # one GPU, <= 8 minutes
    python benchmarks/gpu_suite.py --parts trainer_zero2 --output zero2.json        # rerun one part

On a lent GPU machine (the device tool's `run`; there: Python 3.12, torch 2.11 + CUDA, transformers 5.17,
accelerate 1.15, peft, tokenizers 0.23.2, huggingface_hub 1.33, safetensors 0.8, torchvision; no trl, datasets,
deepspeed, pydantic or hjson; no network):

1. Here, once, in the root of the checkout the device tool sends (about 22 MB of wheels into `.whl/`, which git
   ignores; the project itself travels as the working tree and is imported through PYTHONPATH, so it needs no wheel
   of its own):

       P="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \\
           transformers==5.24.0 regex==2026.5.9 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \\
           peft==0.21.2 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 \\
           typing-inspection==0.4.5
       python3 -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

   Why each: trl 1.16 needs transformers >= 4.56.2, accelerate >= 1.10.1 and datasets >= 4.7 (so 5.17 would do for
   trl), but trl-icd pins transformers >= 5.24 (the Qwen2.5-VL internals the backend was verified against), so
   transformers 5.24.0 is carried and shadows 5.17 (it checks at import: tokenizers >= 0.23.1, < 0.24; huggingface_hub
   >= 1.31; safetensors >= 0.8; accelerate >= 1.1: all there; regex >= 2025.10.22: carried, the machine's version is
   not known). datasets 5.2 needs dill < 0.4.2 and multiprocess < 0.70.20 (carried), pyarrow >= 24
   and fsspec <= 2026.9 (there; versions recorded by the environment part; if `import datasets` fails on an older
   pyarrow, carry datasets==4.7.0 with dill==0.4.0 and multiprocess==0.70.18 instead: pyarrow >= 21). peft is carried
   at the version tested here because trl imports the installed one. DeepSpeed is an sdist on PyPI: `pip wheel
   --no-build-isolation` builds a pure-Python wheel against the local CPU torch (no ops prebuilt; ZeRO-2 with the
   trainer's AdamW needs none); it needs pydantic (+ pydantic-core, annotated-types, typing-inspection) and hjson;
   einops, msgpack, ninja, py-cpuinfo, psutil are there.

2. The one command (`run` tool, carry [".whl"], timeout_s 560: the suite stops itself by 470 s, leaving about four
   minutes of a 15-minute lease to rerun a failed part with `--parts NAME`):

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
           .whl/*.whl || exit 1; set -o pipefail; PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \\
           python3 benchmarks/gpu_suite.py --output $OUT/gpu_suite.json 2>&1 | tee $OUT/gpu_suite.log

   The processor works with and without torchvision (with it, `Qwen2VLImageProcessor` is the torchvision backend;
   the reward part records which one ran).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
PART_NAMES = ("environment", "reward_scoring", "selector_step", "trainer_run", "trainer_zero2")


# ----------------------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SuiteSizes:
    """Every size and time box of one suite profile (`SIZES`)."""

    name: str = field(metadata={"help": "profile name"})
    device: str = field(metadata={"help": "torch device every part runs on"})
    budget_s: float = field(metadata={"help": "wall-clock budget of the whole suite; later parts are skipped"})
    threads: int | None = field(metadata={"help": "torch CPU threads per part (None: torch's default)"})
    part_limits_s: dict = field(metadata={"help": "part -> (estimate, hard limit) in seconds"})
    # reward scoring
    vl_size: str = field(metadata={"help": "trl_icd.testing.qwen_vl size of the scorer"})
    image_size: tuple = field(metadata={"help": "(width, height) of every synthetic image"})
    reward_dtypes: tuple = field(metadata={"help": "scorer dtypes measured, in order"})
    stream: dict = field(metadata={"help": "reward_throughput.build_stream arguments"})
    reward_batch_size: int = field(metadata={"help": "prompts per model call in the batched modes"})
    mode_seconds: dict = field(metadata={"help": "dtype -> time box of modes (a), (b), (c) (None: whole stream)"})
    # selector step
    selector_slots: tuple = field(metadata={"help": "K values (candidates per query)"})
    selector_items: int = field(metadata={"help": "feature-table rows"})
    selector_feature_dim: int = field(metadata={"help": "feature width (CLIP image + text: 1024)"})
    selector_queries: int = field(metadata={"help": "queries per GRPO step"})
    selector_config: dict = field(metadata={"help": "ICDSelectorConfig overrides"})
    group_size: int = field(metadata={"help": "G: completions per query"})
    warmup_steps: int = field(metadata={"help": "untimed first steps of every trainer run"})
    timed_steps: int = field(metadata={"help": "timed steps of every trainer run"})
    # trainer run
    trainer_queries: int = field(metadata={"help": "training queries (cycled: later steps revisit them)"})
    trainer_queries_per_step: int = field(metadata={"help": "queries per GRPO step"})
    trainer_pool_items: int = field(metadata={"help": "demonstration items the pools draw from"})
    trainer_slots: int = field(metadata={"help": "K of the trainer run"})
    trainer_reward: dict = field(metadata={"help": "QwenVLBackend generation settings"})


SIZES = {
    "gpu": SuiteSizes(
        name="gpu", device="cuda", budget_s=470.0, threads=None,
        part_limits_s={"environment": (10, 40), "reward_scoring": (180, 260), "selector_step": (50, 90),
                       "trainer_run": (60, 110), "trainer_zero2": (70, 110)},
        vl_size="3b", image_size=(448, 448), reward_dtypes=("bfloat16", "float32"),
        stream=dict(steps=4, queries_per_step=8, group_size=8, num_queries=16, train_items=96, pool_size=16,
                    min_shots=0, max_shots=4, sharpness=1.0, seed=0),
        reward_batch_size=16, mode_seconds={"bfloat16": (20, 15, 15), "float32": (20, 10, 10)},
        selector_slots=(64, 256), selector_items=443_757, selector_feature_dim=1024, selector_queries=64,
        selector_config={}, group_size=8, warmup_steps=1, timed_steps=3,
        trainer_queries=16, trainer_queries_per_step=8, trainer_pool_items=160, trainer_slots=64,
        trainer_reward=dict(max_new_tokens=5, num_beams=3, length_penalty=0.0, batch_size=16),
    ),
    "smoke": SuiteSizes(
        name="smoke", device="cpu", budget_s=600.0, threads=1,
        part_limits_s={"environment": (5, 60), "reward_scoring": (20, 150), "selector_step": (15, 120),
                       "trainer_run": (15, 150), "trainer_zero2": (20, 150)},
        vl_size="tiny", image_size=(112, 112), reward_dtypes=("bfloat16", "float32"),
        stream=dict(steps=2, queries_per_step=1, group_size=4, num_queries=2, train_items=12, pool_size=6,
                    min_shots=0, max_shots=4, sharpness=1.0, seed=0),
        reward_batch_size=4, mode_seconds={"bfloat16": (None, None, None), "float32": (None, None, None)},
        selector_slots=(8, 16), selector_items=5_000, selector_feature_dim=32, selector_queries=4,
        selector_config=dict(hidden_size=32, num_layers=1, num_decoder_layers=1), group_size=4, warmup_steps=1,
        timed_steps=1,
        trainer_queries=4, trainer_queries_per_step=2, trainer_pool_items=12, trainer_slots=6,
        trainer_reward=dict(max_new_tokens=3, num_beams=1, length_penalty=0.0, batch_size=4),
    ),
}


# ------------------------------------------------------------------------------------------------ child helpers
class Record(dict):
    """A part's result, written to its JSON file after every update, so a part that later fails or is killed still
    leaves what it measured."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self, handle, indent=1, default=str)
        os.replace(tmp, self.path)


def error_summary(text: str, max_lines: int = 25) -> str:
    """The last traceback in `text` (its last `max_lines` lines), else the last lines."""
    lines = text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    lines = lines[starts[-1]:] if starts else lines
    return "\n".join(lines[-max_lines:])


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_gpu_mb(device: str) -> float | None:
    """Peak allocated CUDA memory since the last `reset_peak` (None off the GPU)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def release() -> None:
    """Collect what the caller dropped and return cached GPU memory, so the next measurement starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sub_run(record: Record, run: dict, failures: list, label, measure, *args) -> None:
    """`measure(run, *args)` fills `run`, one sub-measurement of a part; a failure is recorded in `run` (status,
    traceback) and in `failures` and does not stop the part's other sub-runs. Everything `measure` held is freed
    before the next one starts (its locals die with it)."""
    try:
        measure(run, *args)
        run["status"] = "ok"
    except Exception:
        run.update(status="failed", error=error_summary(traceback.format_exc()))
        failures.append(label)
        traceback.print_exc()
    finally:
        record.save()
        release()


# -------------------------------------------------------------------------------------------- part: environment
VERSIONED = ("torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "peft", "tokenizers",
             "huggingface_hub", "safetensors", "torchvision", "numpy", "pyarrow", "fsspec", "regex", "pydantic",
             "pillow", "trl-icd")


def environment_part(sizes: SuiteSizes, record: Record) -> None:
    import torch

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record.update(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(), versions=versions,
        torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        cuda_available=torch.cuda.is_available(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        trl_icd_path=os.path.dirname(__import__("trl_icd").__file__),
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=props.total_memory / 2**30,
                      gpu_capability=f"{props.major}.{props.minor}", gpu_multiprocessors=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            record["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            record["driver"] = None
    else:
        record.update(gpu=None)
    record.save()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {versions['transformers']}, "
          f"trl {versions['trl']}, deepspeed {versions['deepspeed']}, GPU {record['gpu']}")


# ----------------------------------------------------------------------------------------- part: reward scoring
def reward_scoring_part(sizes: SuiteSizes, record: Record) -> None:
    sys.path.insert(0, BENCHMARKS)
    import reward_throughput as rt

    width, height = sizes.image_size
    stream_args = argparse.Namespace(size=sizes.vl_size, **sizes.stream)
    stream = rt.build_stream(stream_args, image_sizes=[sizes.image_size])
    record.update(stream=rt.stream_stats(stream), settings=dict(
        image_size=[width, height], batch_size=sizes.reward_batch_size, max_new_tokens=5, num_beams=1,
        mode_seconds=sizes.mode_seconds, **sizes.stream), runs={})
    record.save()
    print("stream: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in record["stream"].items()))
    failures = []
    for dtype_name in sizes.reward_dtypes:
        run = record["runs"][dtype_name] = {"status": "running", "modes": {}}
        sub_run(record, run, failures, dtype_name, score_in_dtype, record, sizes, stream, dtype_name)
    if failures:
        raise RuntimeError(f"reward scoring failed for {failures} (the others' figures are kept)")


def score_in_dtype(run: dict, record: Record, sizes: SuiteSizes, stream, dtype_name: str) -> None:
    """Modes (a), (b), (c) of `reward_throughput` on one random scorer in `dtype_name`, each time-boxed."""
    import reward_throughput as rt
    import torch

    from trl_icd.testing.qwen_vl import random_qwen2_5_vl

    width, height = sizes.image_size
    start = time.perf_counter()
    model, processor = random_qwen2_5_vl(sizes.vl_size, dtype=getattr(torch, dtype_name), device=sizes.device,
                                         max_pixels=width * height)
    run.update(build_s=time.perf_counter() - start, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               image_processor=type(processor.image_processor).__name__)
    print(f"{dtype_name}: random Qwen2.5-VL '{sizes.vl_size}' ({run['params_m']:.0f} M params) built in "
          f"{run['build_s']:.1f} s; image processor {run['image_processor']}")
    rt.warm_up(model, processor, stream)
    runs = {}
    for mode, limit in zip("abc", sizes.mode_seconds[dtype_name]):
        r = runs[mode] = rt.run_mode(mode, model, processor, stream, batch_size=sizes.reward_batch_size,
                                     time_limit=limit)
        run["modes"][mode] = dict(name=rt.MODE_NAMES[mode], rows=r.rows, wall_s=r.wall_s, cpu_s=r.cpu_s,
                                  pairs_per_s=r.pairs_per_s, peak_gpu_mb=r.peak_gpu_mb, time_box_s=limit, **r.notes)
        record.save()
        print(f"{dtype_name} {rt.MODE_NAMES[mode]}: {r.rows} rows in {r.wall_s:.1f} s = {r.pairs_per_s:.2f} pairs/s"
              + (f", peak {r.peak_gpu_mb / 1024:.1f} GB" if r.peak_gpu_mb is not None else ""))
    run["batched_vs_one_at_a_time"] = runs["b"].pairs_per_s / runs["a"].pairs_per_s
    run["pipeline_vs_one_at_a_time"] = runs["c"].pairs_per_s / runs["a"].pairs_per_s
    run["parity_batched"] = rt.compare(runs["a"], runs["b"])
    run["parity_pipeline"] = rt.compare(runs["a"], runs["c"])


# ------------------------------------------------------------------------------------------- selector + trainer
def build_selector(features, pools, num_slots: int, columns: dict | None = None, **config):
    """The suite's one place that builds a selector: (model, tokenizer, training dataset) for `pools`, a list of
    (query row, candidate rows) in feature-table rows; `columns` are extra dataset columns (the reward's
    `query_id` / `candidate_ids`). The feature matrix is held outside the model's weights (an in-memory
    `ItemTable`: nothing of it is a parameter or a buffer), as a memory-mapped `FeatureTable` would be."""
    from datasets import Dataset

    from trl_icd.selector import ICDSelectorForCausalLM, build_selector_tokenizer
    from trl_icd.testing.selector import selector_prompts

    model = ICDSelectorForCausalLM.from_features(features, num_slots=num_slots, **config)
    tokenizer = build_selector_tokenizer(model.config)
    dataset = Dataset.from_dict({"prompt": selector_prompts(pools, tokenizer), **(columns or {})})
    return model, tokenizer, dataset


PHASES = ("generation", "reward", "other_scoring", "optimisation")


def phase_timed_trainer_class():
    """`ICDGRPOTrainer` with synchronised timers around TRL's own methods: `_generate` (sampling), `_calculate_rewards`
    (the reward functions) and `_generate_and_score_completions` (both, plus old-policy log-probs and advantages).
    Built on demand so that importing this module does not import trl."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_icd import ICDGRPOTrainer

    class PhaseTimedTrainer(ICDGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.phase_log: list[dict] = []
            self._current: dict = {}
            self.remove_callback(PrinterCallback)  # the per-step line below replaces TRL's log dicts
            self.add_callback(StepTimer(self))

        def _timed(self, name, method, *args, **kwargs):
            cuda_sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            cuda_sync()
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start
            return out

        def _generate(self, prompts):
            return self._timed("generation", super()._generate, prompts)

        def _calculate_rewards(self, *args, **kwargs):
            return self._timed("reward", super()._calculate_rewards, *args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            return self._timed("generate_and_score", super()._generate_and_score_completions, inputs)

    class StepTimer(TrainerCallback):
        """Step = `on_step_begin` .. `on_step_end` (generation, reward, loss, backward, optimiser step)."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_begin(self, args, state, control, **kwargs):
            cuda_sync()
            self.trainer._current = {}
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            cuda_sync()
            step = time.perf_counter() - self._start
            phases = self.trainer._current
            scoring = phases.get("generate_and_score", 0.0)
            entry = {
                "step_s": step,
                "generation": phases.get("generation", 0.0),
                "reward": phases.get("reward", 0.0),
                "other_scoring": scoring - phases.get("generation", 0.0) - phases.get("reward", 0.0),
                "optimisation": step - scoring,
            }
            self.trainer.phase_log.append(entry)
            print(f"  step {state.global_step}: {step:.3f} s (" + ", ".join(
                f"{name} {entry[name]:.3f}" for name in PHASES) + ")", flush=True)

    return PhaseTimedTrainer


def train_timed(sizes: SuiteSizes, model, tokenizer, dataset, reward_funcs, batch_size: int, **config) -> dict:
    """Train `warmup_steps + timed_steps` steps; the timed steps' median step time and phases, and the peak GPU
    memory over the run."""
    from trl_icd import ICDGRPOConfig

    trainer_class = phase_timed_trainer_class()
    with tempfile.TemporaryDirectory() as output_dir:
        args = ICDGRPOConfig(
            output_dir=output_dir, use_cpu=sizes.device == "cpu", bf16=False, per_device_train_batch_size=batch_size,
            num_generations=sizes.group_size, max_completion_length=model.config.max_completion_length,
            max_steps=sizes.warmup_steps + sizes.timed_steps, learning_rate=1e-4, logging_steps=1000,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=0, **config,
        )
        trainer = trainer_class(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                processing_class=tokenizer)
        reset_peak(sizes.device)
        trainer.train()
        peak = peak_gpu_mb(sizes.device)
        wrapped = type(trainer.model_wrapped).__name__
    timed = trainer.phase_log[sizes.warmup_steps:]
    if not timed:
        raise RuntimeError(f"no timed step recorded ({len(trainer.phase_log)} steps in all)")
    median = {name: statistics.median(entry[name] for entry in timed) for name in ("step_s", *PHASES)}
    return {"steps": trainer.phase_log, "timed_steps": len(timed), "median": median, "peak_gpu_mb": peak,
            "completions_per_step": batch_size, "wrapped_model": wrapped}


# ------------------------------------------------------------------------------------------ part: selector step
def selector_step_part(sizes: SuiteSizes, record: Record) -> None:
    record.update(settings=dict(items=sizes.selector_items, feature_dim=sizes.selector_feature_dim,
                                queries=sizes.selector_queries, group_size=sizes.group_size, beta=0.0,
                                config=sizes.selector_config), runs={})
    failures = []
    for num_slots in sizes.selector_slots:
        run = record["runs"][str(num_slots)] = {"status": "running"}
        sub_run(record, run, failures, num_slots, selector_steps, sizes, num_slots)
    if failures:
        raise RuntimeError(f"selector step failed for K={failures} (the others' figures are kept)")


def selector_steps(run: dict, sizes: SuiteSizes, num_slots: int) -> None:
    """Timed GRPO steps of a selector with `num_slots` candidates per query over a large random feature table."""
    import torch

    from trl_icd.selector import parse_selection
    from trl_icd.testing.selector import random_pools

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(num_slots)
    features = torch.nn.functional.normalize(
        torch.randn(sizes.selector_items, sizes.selector_feature_dim, generator=generator), dim=-1)
    pools = random_pools(sizes.selector_queries, sizes.selector_items, num_slots, seed=num_slots, sizes=[num_slots])
    model, tokenizer, dataset = build_selector(
        features, pools, num_slots, columns={"candidate_ids": [c for _, c in pools]}, min_shots=1, max_shots=4,
        **sizes.selector_config)
    del features
    half = sizes.selector_items // 2

    def low_row_reward(completion_ids, candidate_ids, **kwargs):
        """Stand-in reward (no VLM): the share of chosen rows in the table's lower half."""
        chosen = [parse_selection(ids, pool, tokenizer) for ids, pool in zip(completion_ids, candidate_ids)]
        return [sum(row < half for row in rows) / len(rows) for rows in chosen]

    run.update(build_s=time.perf_counter() - start, vocab_size=model.config.vocab_size,
               prompt_tokens=model.vocabulary.prompt_length,
               table_mb=sizes.selector_items * sizes.selector_feature_dim * 4 / 2**20)
    print(f"K={num_slots}: selector over {sizes.selector_items} rows x {sizes.selector_feature_dim} "
          f"({run['table_mb']:.0f} MB table), prompts of {run['prompt_tokens']} tokens, "
          f"{sizes.selector_queries} queries x G={sizes.group_size}")
    run.update(train_timed(sizes, model, tokenizer, dataset, low_row_reward, sizes.selector_queries * sizes.group_size))


# -------------------------------------------------------------------------------------- parts: trainer runs
def trainer_run_part(sizes: SuiteSizes, record: Record, zero_stage: int | None = None) -> None:
    """A short `ICDGRPOTrainer` run of the selector with the real-size Qwen2.5-VL scorer (bf16) as its reward."""
    import numpy as np
    import torch

    from trl_icd.rewards import InContextReward, QwenVLBackend
    from trl_icd.testing.qwen_vl import random_qwen2_5_vl, synthetic_vqa_corpus

    config = {}
    if zero_stage is not None:
        try:
            import deepspeed
        except Exception as err:  # ImportError, or a broken install raising anything at import
            record.update(skipped=f"deepspeed does not import: {err!r}")
            record.save()
            print(f"skipped: {record['skipped']}")
            return
        if sizes.device == "cpu":
            # One CPU process needs no shared-memory all-reduce: skip that op's one-minute C++ build.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # A single-process "distributed" run: DeepSpeed reads its rank and rendezvous from these.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        config["deepspeed"] = {
            "zero_optimization": {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": False},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        }
        record["deepspeed"] = deepspeed.__version__

    width, height = sizes.image_size
    rng = np.random.default_rng(0)
    num_items = sizes.trainer_queries + sizes.trainer_pool_items
    corpus = synthetic_vqa_corpus(num_items, image_sizes=[sizes.image_size], seed=0)
    queries = list(range(sizes.trainer_queries))
    pool_ids = list(range(sizes.trainer_queries, num_items))
    pools = {q: rng.choice(pool_ids, size=sizes.trainer_slots, replace=False).tolist() for q in queries}
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(num_items, sizes.selector_feature_dim, generator=generator), dim=-1)
    model, tokenizer, dataset = build_selector(
        features, [(corpus.row_of(q), [corpus.row_of(c) for c in pools[q]]) for q in queries], sizes.trainer_slots,
        columns={"query_id": queries, "candidate_ids": [pools[q] for q in queries]}, min_shots=1, max_shots=4,
        **sizes.selector_config)

    start = time.perf_counter()
    vl_model, processor = random_qwen2_5_vl(sizes.vl_size, dtype=torch.bfloat16, device=sizes.device,
                                            max_pixels=width * height)
    build_s = time.perf_counter() - start
    backend = QwenVLBackend(vl_model, processor, **sizes.trainer_reward)
    with tempfile.TemporaryDirectory() as tmp:
        reward = InContextReward(corpus, backend, tokenizer=tokenizer, max_shots=4,
                                 cache_path=os.path.join(tmp, "rewards.sqlite"))
        record.update(settings=dict(queries=sizes.trainer_queries, queries_per_step=sizes.trainer_queries_per_step,
                                    group_size=sizes.group_size, slots=sizes.trainer_slots,
                                    pool_items=sizes.trainer_pool_items, image_size=[width, height],
                                    scorer=f"random Qwen2.5-VL '{sizes.vl_size}' bf16", reward=sizes.trainer_reward,
                                    zero_stage=zero_stage, beta=0.0),
                      scorer_build_s=build_s)
        record.save()
        print(f"selector K={sizes.trainer_slots} over {num_items} items; scorer built in {build_s:.1f} s; "
              f"{sizes.trainer_queries_per_step} queries x G={sizes.group_size} per step"
              + (f"; DeepSpeed ZeRO-{zero_stage}" if zero_stage else ""))
        try:
            result = train_timed(sizes, model, tokenizer, dataset, [reward],
                                 sizes.trainer_queries_per_step * sizes.group_size, **config)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # a live group can hang the interpreter's exit
    vision = backend.vision_cache
    record.update(result, reward_calls=dict(
        statuses=dict(reward.status_counts), cache_hits=reward.cache_hits, cache_misses=reward.cache_misses,
        vision_cache_hits=vision.hits, vision_cache_misses=vision.misses,
        prompts_prefilled=backend.stats["prompts_prefilled"]))
    record.save()


def trainer_zero2_part(sizes: SuiteSizes, record: Record) -> None:
    trainer_run_part(sizes, record, zero_stage=2)


PARTS = {
    "environment": environment_part,
    "reward_scoring": reward_scoring_part,
    "selector_step": selector_step_part,
    "trainer_run": trainer_run_part,
    "trainer_zero2": trainer_zero2_part,
}


def child_main(part: str, sizes_name: str, result_path: str) -> int:
    """Run one part in this process; its result goes to `result_path` (also when it fails)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    for name in ("trl", "deepspeed", "accelerate", "trl_icd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sizes = SIZES[sizes_name]
    if sizes.threads is not None:
        import torch

        torch.set_num_threads(sizes.threads)
    record = Record(result_path)
    try:
        PARTS[part](sizes, record)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        record.save()
    return 0


# ------------------------------------------------------------------------------------------------ the parent
@dataclass
class PartOutcome:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    estimate_s: float
    limit_s: float
    result: dict
    error: str | None = None


def run_isolated(command: list[str], timeout: float, prefix: str = "",
                 env: dict | None = None) -> tuple[str, str | None, float]:
    """Run `command` in its own process group, echoing its output live (with `prefix`); kill it after `timeout`
    seconds. Returns (status, error summary or None, seconds); status is ok / failed / timeout."""
    start = time.perf_counter()
    tail: collections.deque = collections.deque(maxlen=200)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True, env=env, errors="replace")

    def pump():
        for line in process.stdout:
            line = line.rstrip("\n").split("\r")[-1]  # progress bars: keep the last state of the line
            tail.append(line)
            print(prefix + line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timeout"
    reader.join(timeout=10)
    seconds = time.perf_counter() - start
    error = None
    if status == "failed":
        error = error_summary("\n".join(tail)) or f"exit code {process.returncode}"
    elif status == "timeout":
        error = f"killed after its {timeout:.0f} s limit"
    return status, error, seconds


def run_parts(sizes: SuiteSizes, parts: list[str], deadline: float) -> list[PartOutcome]:
    outcomes = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if sizes.threads is not None:  # also for libraries that reset torch's thread count from it (accelerate)
        env["OMP_NUM_THREADS"] = str(sizes.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(parts, 1):
            estimate, limit = sizes.part_limits_s[name]
            left = deadline - time.monotonic()
            limit = min(limit, left)
            if limit < min(estimate, 30):
                print(f"\n== [{index}/{len(parts)}] {name}: skipped, {left:.0f} s of the suite's budget left")
                outcomes.append(PartOutcome(name, "skipped", 0.0, estimate, max(limit, 0.0), {},
                                            f"suite budget exhausted ({left:.0f} s left)"))
                continue
            print(f"\n== [{index}/{len(parts)}] {name}: estimate ~{estimate:.0f} s, limit {limit:.0f} s", flush=True)
            path = os.path.join(tmp, f"{name}.json")
            command = [sys.executable, os.path.abspath(__file__), "--child", name, "--sizes", sizes.name,
                       "--result", path]
            status, error, seconds = run_isolated(command, limit, prefix=f"  [{name}] ", env=env)
            result = {}
            if os.path.exists(path):
                with open(path) as handle:
                    result = json.load(handle)
            if status == "ok" and "skipped" in result:
                status, error = "skipped", result["skipped"]
            outcomes.append(PartOutcome(name, status, seconds, estimate, limit, result, error))
            print(f"== {name}: {status} in {seconds:.1f} s (estimate ~{estimate:.0f} s)")
            if error and status != "skipped":
                print("   " + error.replace("\n", "\n   "))
    return outcomes


# ------------------------------------------------------------------------------------------------ the table
def _gb(mb) -> str:
    return "" if mb is None else f"{mb / 1024:.1f}"


def _phases(median: dict) -> str:
    return (f"{median['step_s']:.3f} s/step = generation {median['generation']:.3f} + reward {median['reward']:.3f}"
            f" + other scoring {median['other_scoring']:.3f} + optimisation {median['optimisation']:.3f}")


def _last_line(text: str | None) -> str:
    return text.strip().splitlines()[-1] if text and text.strip() else ""


def _reward_rows(part: str, dtype_name: str, run: dict) -> list[dict]:
    short = {"bfloat16": "bf16", "float32": "fp32"}.get(dtype_name, dtype_name)
    rows = []
    modes = run.get("modes", {})
    for figures in modes.values():
        ratio = figures["pairs_per_s"] / modes["a"]["pairs_per_s"] if "a" in modes else float("nan")
        rows.append({"part": part, "setting": f"{short} {figures['name']}",
                     "result": f"{figures['pairs_per_s']:.2f} pairs/s, x{ratio:.2f} vs (a) ({figures['rows']} rows "
                               f"in {figures['wall_s']:.1f} s)", "peak_gpu_gb": _gb(figures["peak_gpu_mb"])})
    if "parity_batched" in run:
        parity = run["parity_batched"]
        logprob = parity["max_abs_d_logprob"]
        result = (f"{parity['identical_answers']}/{parity['rows']} identical answers, {parity['distinct_answers']} "
                  f"distinct, max |d log-prob| " + (f"{logprob:.2e}" if logprob is not None else "-"))
        if dtype_name == "float32":
            result += " (check: " + ("PASS" if parity["identical_answers"] == parity["rows"] else "FAIL") + ")"
        ratio = run["batched_vs_one_at_a_time"]
        result += f"; batched x{ratio:.1f} one-at-a-time"
        if dtype_name == "bfloat16":
            result += f" (target >= 10: {'met' if ratio >= 10 else 'NOT met'})"
        rows.append({"part": part, "setting": f"{short} (b) vs (a)", "result": result, "peak_gpu_gb": ""})
    if run.get("status") == "failed":
        rows.append({"part": part, "setting": f"{short} failed", "result": _last_line(run.get("error")),
                     "peak_gpu_gb": ""})
    return rows


def table_rows(outcomes: list[PartOutcome]) -> list[dict]:
    """One row per figure: part, setting, result, peak GPU GB."""
    rows = []

    def add(part, setting, result, peak=None):
        rows.append({"part": part, "setting": setting, "result": result, "peak_gpu_gb": _gb(peak)})

    for outcome in outcomes:
        name, result = outcome.name, outcome.result
        if name == "environment" and result:
            versions = result.get("versions", {})
            add(name, "machine", f"{result.get('gpu') or 'no GPU'}"
                + (f" ({result['gpu_memory_gb']:.0f} GB, driver {result.get('driver')})" if result.get("gpu") else "")
                + f", {result.get('cpus')} CPUs, {result.get('date_utc')}")
            add(name, "software", ", ".join(f"{k} {versions.get(k)}" for k in (
                "torch", "transformers", "trl", "accelerate", "datasets", "deepspeed", "torchvision"))
                + f", CUDA {result.get('torch_cuda')}, Python {result.get('python')}")
        elif name == "reward_scoring":
            for dtype_name, run in result.get("runs", {}).items():
                rows.extend(_reward_rows(name, dtype_name, run))
        elif name == "selector_step":
            settings = result.get("settings", {})
            for slots, run in result.get("runs", {}).items():
                setting = (f"K={slots}, {settings.get('queries')} queries x G={settings.get('group_size')}, "
                           f"{settings.get('items')} rows")
                if "median" in run:
                    add(name, setting, _phases(run["median"]), run.get("peak_gpu_mb"))
                elif run.get("status") != "running":
                    add(name, f"{setting}: {run.get('status')}", _last_line(run.get("error")))
        elif name in ("trainer_run", "trainer_zero2") and "median" in result:
            settings = result["settings"]
            calls = result.get("reward_calls", {})
            add(name, f"K={settings['slots']}, {settings['queries_per_step']} queries x G={settings['group_size']}, "
                f"{settings['scorer']}" + (f", ZeRO-{settings['zero_stage']}" if settings.get("zero_stage") else ""),
                _phases(result["median"]) + f" ({calls.get('statuses', {}).get('ok', 0)}/"
                f"{sum(calls.get('statuses', {}).values())} completions scored, reward cache "
                f"{calls.get('cache_hits')} hits / {calls.get('cache_misses')} misses)", result.get("peak_gpu_mb"))
        if outcome.status != "ok":
            add(name, outcome.status, _last_line(outcome.error))
    return rows


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in ("part", "setting")}
    header = f"{'part':<{widths['part']}}  {'setting':<{widths['setting']}}  {'peak GB':>7}  result"
    print("\n" + header)
    print("-" * min(len(header) + 60, 200))
    for row in rows:
        print(f"{row['part']:<{widths['part']}}  {row['setting']:<{widths['setting']}}  {row['peak_gpu_gb']:>7}  "
              f"{row['result']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the CI check of this script)")
    parser.add_argument("--output", default="gpu_suite.json", help="where the JSON results go")
    parser.add_argument("--parts", default=",".join(PART_NAMES),
                        help=f"comma-separated subset of {', '.join(PART_NAMES)} (in this order)")
    parser.add_argument("--budget-s", type=float, default=None, help="override the profile's time budget")
    parser.add_argument("--child", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", choices=sorted(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.sizes, args.result)

    sizes = SIZES["smoke" if args.smoke else "gpu"]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PART_NAMES)}")
    parts = [p for p in PART_NAMES if p in parts]
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device visible: the default sizes need one GPU (use --smoke on CPU)")
    budget = args.budget_s if args.budget_s is not None else sizes.budget_s
    started = time.monotonic()
    print(f"gpu_suite: profile '{sizes.name}' on {sizes.device}, parts {', '.join(parts)}, budget {budget:.0f} s; "
          f"estimate ~{sum(sizes.part_limits_s[p][0] for p in parts):.0f} s")
    outcomes = run_parts(sizes, parts, started + budget)
    rows = table_rows(outcomes)
    total = time.monotonic() - started
    report = {
        "suite": {"profile": sizes.name, "sizes": asdict(sizes), "parts": parts, "budget_s": budget,
                  "total_s": total, "command": " ".join([os.path.basename(sys.executable), *sys.argv])},
        "parts": {o.name: {"status": o.status, "seconds": o.seconds, "estimate_s": o.estimate_s,
                           "limit_s": o.limit_s, "error": o.error, "result": o.result} for o in outcomes},
        "table": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    print_table(rows)
    statuses = collections.Counter(o.status for o in outcomes)
    print(f"\n{dict(statuses)} in {total:.0f} s; JSON: {args.output}")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

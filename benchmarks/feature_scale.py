"""What a VQAv2-sized feature table costs when it lives outside the selector (memory-mapped, shared) vs inside it
(a persistent buffer of the model, as the selector once stored it).

A synthetic table of 658,000 rows x (768 image + 768 text) float32 dims (VQAv2 train + val with CLIP ViT-L/14:
4.0 GB) is generated into a temporary folder (never kept), then, in one run:

1. checkpoint size of the same selector (K = 64, hidden 128, 2 + 2 layers) in both layouts;
2. start-up time (map/load the table, load the selector, check it against the table, wrap it in DDP) and peak
   resident memory per process, with 1 and 2 processes (torchrun, gloo, CPU);
3. bytes DDP moves: its initial sync of parameters and buffers, then per optimiser step the buffer broadcast (where
   a table held by the model goes, before every forward) and the gradient all-reduce (the same in both layouts),
   counted at the broadcast call DDP uses and with a counting communication hook;
4. one ICDGRPOTrainer step at K = 64 reading the mapped 658k table vs a 2,000-row table (TRL generation, reward,
   fused-head log-probs, backward, optimiser; medians after a warm-up step).

The table-in-the-model layout is rebuilt here for comparison only (`TableInModelSelector`); its start-up check
against the exported table compares in chunks (the selector's old check built the whole combined table and compared
it in one piece, so its real peak was higher). Old 2-process runs are skipped when memory is short.

    python benchmarks/feature_scale.py                   # 658,000 rows (needs ~8.5 GB of free disk in --tmp_dir)
    python benchmarks/feature_scale.py --rows 100000     # smaller, when disk or memory is short
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VQAV2_ROWS = 658_000  # VQAv2 train (443,757) + val (214,354) questions, rounded
IMAGE_DIM = TEXT_DIM = 768  # CLIP ViT-L/14 projection width
NUM_SLOTS, QUERIES, GROUP, MAX_SHOTS = 64, 8, 8, 4
SMALL_ROWS = 2_000
GB = 1e9


# ---------------------------------------------------------------------------------------------------------------------
# Data and checkpoints (parent process)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_table(path: str, rows: int, seed: int = 0):
    """A random unit-norm table written chunk by chunk into memory maps (never whole in memory)."""
    import numpy as np
    from tqdm.auto import tqdm

    from trl_icd.data.features import FeatureTable

    table = FeatureTable.allocate(path, range(rows), IMAGE_DIM, TEXT_DIM, {"featurizer": "synthetic"})
    rng = np.random.default_rng(seed)
    chunk = 16_384
    for start in tqdm(range(0, rows, chunk), desc=f"writing {rows:,}-row table", unit="chunk"):
        for array in (table.image, table.text):
            block = rng.standard_normal((min(chunk, rows - start), array.shape[1]), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            array[start : start + len(block)] = block
    table.save(path)
    return FeatureTable.load(path)


def selector_over(table):
    from trl_icd.selector import ICDSelectorForCausalLM

    import torch

    torch.manual_seed(0)
    return ICDSelectorForCausalLM.from_features(table, num_slots=NUM_SLOTS, min_shots=1, max_shots=MAX_SHOTS)


def write_table_in_model_checkpoint(model, table, path: str) -> None:
    """The checkpoint the selector wrote when its table was a persistent buffer: config + every weight + the combined
    table as one more tensor. Streamed into the safetensors layout, so this process never holds the table."""
    import numpy as np

    model.save_pretrained(path)
    tensors = {name: value.detach().cpu().contiguous().numpy() for name, value in model.state_dict().items()}
    shapes = {name: list(value.shape) for name, value in tensors.items()}
    shapes[TABLE_KEY] = [len(table), table.combined_dim]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, value in tensors.items():
            f.write(np.ascontiguousarray(value, dtype="<f4").tobytes())
        for start in range(0, len(table), 65_536):
            f.write(table.combined_rows(np.arange(start, min(len(table), start + 65_536))).astype("<f4").tobytes())


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return float("inf")


# ---------------------------------------------------------------------------------------------------------------------
# The table-in-the-model layout, rebuilt for comparison

TABLE_KEY = "model.items.table"


def table_in_model_class():
    import torch

    from trl_icd.data.features import FeaturizerSpec, ItemTable
    from trl_icd.selector import ICDSelectorForCausalLM

    class TableInModelSelector(ICDSelectorForCausalLM):
        """The selector as it was: the combined table is a persistent buffer of the item embedder (saved in every
        checkpoint, broadcast by DDP before every forward), and the model reads its rows from there."""

        def __init__(self, config):
            super().__init__(config)
            items = self.model.items
            items.register_buffer("table", torch.zeros(config.num_items, config.feature_dim))
            spec = FeaturizerSpec.from_dict(config.featurizer)
            items.attach(ItemTable(lambda rows: items.table.detach().numpy()[rows], config.num_items,
                                   config.feature_dim, "buffer", spec, "model buffer"))

    return TableInModelSelector


# ---------------------------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def rss() -> dict:
    """Peak resident memory (with the file pages this process touched: shared and reclaimable, e.g. a mapped table)
    and the private (anonymous) part now."""
    import resource

    with open("/proc/self/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith("Rss")}
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "anon_rss": status.get("RssAnon", 0), "file_rss": status.get("RssFile", 0)}


class PeakAnon:
    """Peak private (anonymous) memory while the block runs, polled every 5 ms: what a process costs that other
    processes cannot share (a DDP-synced buffer is written, so it ends up private in every process)."""

    def __enter__(self):
        import threading

        self.peak = rss()["anon_rss"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss()["anon_rss"])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def training_batch(num_rows: int, vocabulary, seed: int = 1):
    """B = QUERIES x GROUP selector sequences (prompt + a valid selection + stop) over random table rows."""
    import torch

    from trl_icd.selector import selector_prompt

    generator = torch.Generator().manual_seed(seed)
    tokenizer_words = {w: i for i, w in enumerate(vocabulary.words())}
    sequences = []
    for _ in range(QUERIES):
        rows = torch.randperm(num_rows, generator=generator)[: NUM_SLOTS + 1].tolist()
        prompt = [tokenizer_words[w] for w in selector_prompt(rows[0], rows[1:], vocabulary=vocabulary).split()]
        for _ in range(GROUP):
            picks = torch.randperm(NUM_SLOTS, generator=generator)[: 1 + int(torch.randint(MAX_SHOTS, (1,)))]
            sequences.append(prompt + [4 + int(p) for p in picks] + [1])
    length, prompt_length = max(len(s) for s in sequences), vocabulary.prompt_length
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for n, sequence in enumerate(sequences):
        ids[n, : len(sequence)] = torch.tensor(sequence)
        labels[n, prompt_length : len(sequence)] = ids[n, prompt_length : len(sequence)]
    mask = (torch.arange(length)[None] < torch.tensor([len(s) for s in sequences])[:, None]).long()
    return ids, mask, labels


def worker_ddp(args) -> dict:
    """Start up as a training process would, then take `--steps` optimiser steps through DDP, counting bytes."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from trl_icd.data.features import FeatureTable
    from trl_icd.selector import ICDSelectorForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    counts = {"broadcast": 0, "allreduce": 0}
    broadcast = dist._broadcast_coalesced  # what DDP calls for its initial sync and for buffers before a forward

    def counting_broadcast(process_group, tensors, buffer_size, src=0):
        counts["broadcast"] += sum(t.numel() * t.element_size() for t in tensors)
        return broadcast(process_group, tensors, buffer_size, src)

    dist._broadcast_coalesced = counting_broadcast
    dist.barrier()
    anon = PeakAnon().__enter__()
    start = time.perf_counter()
    table = FeatureTable.load(args.table)
    if args.worker == "new":
        model = ICDSelectorForCausalLM.from_pretrained(args.checkpoint, features=table)
    else:
        model = table_in_model_class().from_pretrained(args.checkpoint)
        buffer = model.model.items.table.numpy()  # the start-up check: the model's table vs the exported one
        for first in range(0, len(table), 16_384):
            rows = np.arange(first, min(len(table), first + 16_384))
            if not np.allclose(buffer[rows], table.combined_rows(rows), atol=1e-5):
                raise ValueError("the selector's table differs from the exported features")
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, lambda state, bucket: (
        counts.__setitem__("allreduce", counts["allreduce"] + bucket.buffer().numel() * 4), allreduce_hook(state, bucket)
    )[1])
    startup = time.perf_counter() - start
    after_start, peak_anon_start = rss(), anon.peak
    init_broadcast = counts["broadcast"]  # DDP's initial sync: parameters and buffers, from rank 0

    ids, mask, labels = training_batch(len(table), model.vocabulary, seed=1 + dist.get_rank())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_seconds = []
    before = dict(counts)
    for _ in range(args.steps):
        tick = time.perf_counter()
        loss = ddp(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - tick)
    anon.__exit__(None, None, None)
    result = {
        "peak_anon_startup": peak_anon_start, "peak_anon": anon.peak,
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "startup_s": startup, **after_start,
        "peak_rss_end": rss()["peak_rss"], "init_broadcast_bytes": init_broadcast,
        "broadcast_per_step": (counts["broadcast"] - before["broadcast"]) / args.steps,
        "allreduce_per_step": (counts["allreduce"] - before["allreduce"]) / args.steps,
        "synced_buffer_bytes": sum(b.numel() * b.element_size() for b in ddp.modules_buffers),
        "step_s": statistics.median(step_seconds),
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


def worker_grpo(args) -> dict:
    """Median ICDGRPOTrainer step time at K = 64 with the selector reading `--table` (mapped)."""
    import logging
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from trl_icd import ICDGRPOConfig, ICDGRPOTrainer
    from trl_icd.data.features import FeatureTable
    from trl_icd.selector import build_selector_tokenizer, parse_selection, selector_prompt

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    logging.getLogger("deepspeed").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    table = FeatureTable.load(args.table)
    model = selector_over(table)
    tokenizer = build_selector_tokenizer(model.config)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(QUERIES):
        picked = torch.randperm(len(table), generator=generator)[: NUM_SLOTS + 1].tolist()
        rows.append({"prompt": selector_prompt(picked[0], picked[1:], vocabulary=tokenizer), "candidate_ids": picked[1:]})

    def even_reward(completion_ids, candidate_ids, **kwargs):
        chosen = [parse_selection(ids, cands, tokenizer) for ids, cands in zip(completion_ids, candidate_ids)]
        return [sum(row % 2 == 0 for row in c) / len(c) for c in chosen]

    class StepTimer(TrainerCallback):
        wall: list = []
        cpu: list = []

        def on_step_begin(self, *a, **k):
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = ICDGRPOConfig(
            output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=QUERIES * GROUP,
            num_generations=GROUP, max_completion_length=model.config.max_completion_length,
            max_steps=args.warmup + args.steps, learning_rate=1e-3, logging_steps=1000, save_strategy="no",
            report_to="none", disable_tqdm=True,
        )
        ICDGRPOTrainer(model=model, reward_funcs=even_reward, args=config, train_dataset=Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=[timer]).train()
    return {"rows": len(table), "step_wall_s": statistics.median(timer.wall[args.warmup :]),
            "step_cpu_s": statistics.median(timer.cpu[args.warmup :])}


# ---------------------------------------------------------------------------------------------------------------------
# Driver


def run(command: list[str], what: str, timeout: int = 3600) -> str:
    log(what)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def ddp_case(layout: str, processes: int, table_dir: str, checkpoint: str, steps: int, out_dir: str) -> list[dict]:
    out = os.path.join(out_dir, f"{layout}-{processes}")
    os.makedirs(out, exist_ok=True)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__,
         "--worker", layout, "--table", table_dir, "--checkpoint", checkpoint, "--steps", str(steps), "--out", out],
        f"{layout} layout, {processes} process(es): start-up, memory, DDP steps")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(processes)]


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def ratio(old, new) -> str:
    if old is None or new is None:
        return "-"
    return "inf" if new == 0 and old > 0 else ("1.00x" if new == 0 else f"{old / new:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=VQAV2_ROWS, help="table rows (default: VQAv2 train + val)")
    parser.add_argument("--tmp_dir", default=None, help="where the table and checkpoints are written (deleted after)")
    parser.add_argument("--steps", type=int, default=2, help="DDP optimiser steps per case")
    parser.add_argument("--grpo_steps", type=int, default=3, help="timed GRPO steps per table")
    parser.add_argument("--warmup", type=int, default=1, help="untimed GRPO steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the GRPO runs")
    parser.add_argument("--worker", choices=["new", "old", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker in ("new", "old"):
        result = worker_ddp(args)
        with open(os.path.join(args.out, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
        return
    if args.worker == "grpo":
        print(json.dumps(worker_grpo(args)))
        return

    table_bytes = args.rows * (IMAGE_DIM + TEXT_DIM) * 4
    root = tempfile.mkdtemp(prefix="feature_scale_", dir=args.tmp_dir)
    free = shutil.disk_usage(root).free
    log(f"{args.rows:,} rows x {IMAGE_DIM + TEXT_DIM} dims float32 = {fmt_bytes(table_bytes)}; {root} has "
        f"{fmt_bytes(free)} free, {fmt_bytes(mem_available())} of memory available")
    if free < 2.1 * table_bytes + 1e9:
        shutil.rmtree(root)
        sys.exit(f"need ~{fmt_bytes(2.1 * table_bytes + 1e9)} of free disk (the table and a checkpoint holding it); "
                 f"use --tmp_dir elsewhere or fewer --rows")
    try:
        report(args, root, table_bytes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        log(f"removed {root}")


def report(args, root: str, table_bytes: int) -> None:
    from trl_icd.data.features import FeatureTable

    tick = time.perf_counter()
    table = write_table(os.path.join(root, "table"), args.rows)
    log(f"table written and hashed in {time.perf_counter() - tick:.1f} s ({table.content_hash[:12]})")
    small = FeatureTable(list(range(SMALL_ROWS)), table.image[:SMALL_ROWS].copy(), table.text[:SMALL_ROWS].copy(),
                         {"featurizer": "synthetic"})
    small.save(os.path.join(root, "small"))
    model = selector_over(table)
    new_dir, old_dir = os.path.join(root, "selector"), os.path.join(root, "selector_table_inside")
    model.save_pretrained(new_dir)
    log("writing the table-in-the-model checkpoint")
    write_table_in_model_checkpoint(model, table, old_dir)
    sizes = {"new": dir_bytes(new_dir), "old": dir_bytes(old_dir)}
    del model, table

    runs = {}
    for layout, checkpoint in (("new", new_dir), ("old", old_dir)):
        for processes in (1, 2):
            # private memory per process: the selector (~0.6 GB), plus twice the table for the old layout (DDP's
            # broadcasts write the buffer, so it becomes private in every process, and its initial sync copies it
            # into flat buckets; measured 8.5 GB for a 4 GB table)
            need = (0.7e9 if layout == "new" else 2.2 * table_bytes + 1e9) * processes
            if need > mem_available():
                log(f"skipped {layout} x{processes}: needs ~{fmt_bytes(need)}, {fmt_bytes(mem_available())} "
                    "available (try fewer --rows)")
                continue
            runs[layout, processes] = ddp_case(layout, processes, os.path.join(root, "table"), checkpoint,
                                               args.steps, root)
    grpo = {}
    for name in ("small", "table"):
        out = run([sys.executable, __file__, "--worker", "grpo", "--table", os.path.join(root, name),
                   "--steps", str(args.grpo_steps), "--warmup", str(args.warmup), "--threads", str(args.threads)],
                  f"GRPO steps at K={NUM_SLOTS} reading the {'mapped ' + format(args.rows, ',') if name == 'table' else format(SMALL_ROWS, ',')}-row table")
        grpo[name] = json.loads(out.strip().splitlines()[-1])

    def worst(layout, processes, key):
        ranks = runs.get((layout, processes))
        return max(r[key] for r in ranks) if ranks else None

    lines = [("selector checkpoint (folder)", sizes["old"], sizes["new"], fmt_bytes)]
    for processes in (1, 2):
        lines += [
            (f"start-up s, {processes} process(es) (slowest)", worst("old", processes, "startup_s"),
             worst("new", processes, "startup_s"), lambda v: f"{v:.2f} s"),
            (f"peak RSS (incl. mapped file pages), {processes} proc.", worst("old", processes, "peak_rss_end"),
             worst("new", processes, "peak_rss_end"), fmt_bytes),
            (f"peak private (anon) memory, {processes} process(es)", worst("old", processes, "peak_anon"),
             worst("new", processes, "peak_anon"), fmt_bytes),
        ]
    lines += [
        ("DDP initial sync broadcast, per process", worst("old", 2, "init_broadcast_bytes"),
         worst("new", 2, "init_broadcast_bytes"), fmt_bytes),
        ("DDP buffer broadcast per optimiser step", worst("old", 2, "broadcast_per_step"),
         worst("new", 2, "broadcast_per_step"), fmt_bytes),
        ("DDP buffers synced (bytes registered)", worst("old", 2, "synced_buffer_bytes"),
         worst("new", 2, "synced_buffer_bytes"), fmt_bytes),
        ("DDP gradient all-reduce per step", worst("old", 2, "allreduce_per_step"),
         worst("new", 2, "allreduce_per_step"), fmt_bytes),
        ("DDP step (fwd+bwd+opt), 2 processes", worst("old", 2, "step_s"), worst("new", 2, "step_s"),
         lambda v: f"{v:.2f} s"),
    ]
    print(f"\nFeature table: {args.rows:,} rows x {IMAGE_DIM}+{TEXT_DIM} float32 = {fmt_bytes(table_bytes)}; "
          f"selector K={NUM_SLOTS}, hidden 128, 2+2 layers; {QUERIES}x{GROUP} sequences per DDP step; "
          f"load {os.getloadavg()[0]:.1f}")
    header = f"{'':46} {'table in model':>16} {'table mapped':>14} {'old/new':>9}"
    print(header)
    print("-" * len(header))
    for label, old, new, show in lines:
        print(f"{label:46} {show(old) if old is not None else 'skipped':>16} "
              f"{show(new) if new is not None else 'skipped':>14} {ratio(old, new):>9}")
    small_step, big_step = grpo["small"], grpo["table"]
    print(f"\nGRPO step at K={NUM_SLOTS} ({QUERIES} queries x G={GROUP}, {args.threads} thread(s), median of "
          f"{args.grpo_steps}): {SMALL_ROWS:,}-row table {small_step['step_wall_s']:.3f} s wall / "
          f"{small_step['step_cpu_s']:.3f} s CPU; mapped {args.rows:,}-row table {big_step['step_wall_s']:.3f} s / "
          f"{big_step['step_cpu_s']:.3f} s CPU; ratio {big_step['step_wall_s'] / small_step['step_wall_s']:.2f}x wall, "
          f"{big_step['step_cpu_s'] / small_step['step_cpu_s']:.2f}x CPU")


if __name__ == "__main__":
    main()

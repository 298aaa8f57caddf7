"""Train an ICD selector with GRPO (optionally after an RCE warm-up) and, for the demo world, evaluate it.

    python examples/train_okvqa.py --config recipes/demo/cpu.yaml                 # offline demo, CPU, minutes
    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml \\
        examples/train_okvqa.py --config recipes/okvqa/plan5.yaml                   # OK-VQA, research plan 5

Every option lives in a dataclass: the script switches below, the data/pool options and the reward backend
(`trl_icd.pipeline`), the selector architecture, the RCE warm-up, `ICDGRPOConfig` (TRL's `GRPOConfig` plus the
advantage and adaptive-KL settings) and TRL's `ModelConfig` (`model_name_or_path` = the selector checkpoint to start
from; PEFT options). `--help` describes the project's options and lists TRL's/transformers' by name; `--help_all`
describes them all.

The KL reference policy is the policy this run starts from (after the warm-up, or the loaded checkpoint): it is
saved to `<output_dir>/start_policy` and GRPO loads its reference from there. A resumed run keeps that saved start
policy, so resuming never changes the reference.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from trl import ModelConfig

from trl_icd import ICDGRPOConfig
from trl_icd.cli import ICDArgumentParser
from trl_icd.console import ConsoleArguments, install_console, print_output_listing
from trl_icd.diagnose import write_run_log
from trl_icd.heldout import HeldoutArguments, add_heldout_callback
from trl_icd.pipeline import (
    DataArguments,
    RCEArguments,
    RewardArguments,
    SelectorArguments,
    build_pools,
    build_reward,
    build_selector_training_dataset,
    check_data_paths,
    load_data,
    load_or_build_selector,
    run_demo_evaluation,
    run_rce_warmup,
    save_policy,
    training_query_ids,
)
from trl_icd.sources import check_pretrained_path, exit_on_missing_input, require_local

logger = logging.getLogger("train_okvqa")

START_POLICY_DIR = "start_policy"


@dataclass
class TrainScriptArguments:
    """Switches of this script."""

    run_grpo: bool = field(default=True, metadata={"help": "Run GRPO (False: RCE warm-up only, research plan 10)."})
    evaluate: bool = field(
        default=False,
        metadata={
            "help": "After training, evaluate zero-shot, random, image_sim, text_sim, the trained selector and the "
            "oracle on the held-out demo queries; writes eval_results.json, eval_table.md and the plots."
        },
    )


def make_parser() -> ICDArgumentParser:
    return ICDArgumentParser(
        (TrainScriptArguments, DataArguments, RewardArguments, SelectorArguments, RCEArguments, ICDGRPOConfig, ModelConfig,
         ConsoleArguments, HeldoutArguments),
        description=__doc__,
    )


def _resume_target(training_args) -> str | bool | None:
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "last"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value


def main(argv: list[str] | None = None) -> dict:
    """Run the pipeline; returns where things went (`output_dir`, `start_policy`, `reference_policy`, ...) and, with
    `--evaluate`, the evaluation results."""
    started = time.perf_counter()
    (script_args, data_args, reward_args, selector_args, rce_args, training_args, model_args, console_args,
     heldout_args) = make_parser().parse_args_and_config(argv)
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    resume = _resume_target(training_args)
    # Inputs first, before anything is written: a missing file fails in seconds and leaves no empty output folder.
    check_data_paths(data_args)
    if model_args.model_name_or_path:
        check_pretrained_path(model_args.model_name_or_path, "selector checkpoint (model_name_or_path)")
    if rce_args.rce_data_path:
        require_local(rce_args.rce_data_path, "RCE data (rce_data_path)", expect="file",
                      hint="Score it first: python examples/generate_rl_data.py --config <recipe> --output_file "
                           f"{rce_args.rce_data_path}")

    data = load_data(data_args)
    query_ids = training_query_ids(data, data_args)
    pools = build_pools(data, data_args, query_ids)
    logger.info("%d training queries, pools of %d (%s)", len(query_ids), data_args.pool_size, data_args.pool_method)

    start_dir = os.path.join(training_args.output_dir, START_POLICY_DIR)
    if resume and os.path.isdir(start_dir):
        # The run already fixed its start policy (after any warm-up): keep it as the reference.
        model, tokenizer = load_or_build_selector(start_dir, data, data_args, selector_args)
    else:
        model, tokenizer = load_or_build_selector(model_args.model_name_or_path, data, data_args, selector_args)
        if rce_args.rce_data_path:
            model = run_rce_warmup(model, tokenizer, data, data_args, reward_args, rce_args, training_args)
        if training_args.process_index == 0:
            save_policy(model, tokenizer, start_dir)
        wait_for_main_process()
        model, tokenizer = load_or_build_selector(start_dir, data, data_args, selector_args)

    run = {"output_dir": training_args.output_dir, "start_policy": start_dir, "reference_policy": None}
    if script_args.run_grpo:
        from trl.trainer.utils import get_peft_config

        from trl_icd import ICDGRPOTrainer

        if training_args.max_completion_length < model.config.max_completion_length:
            raise ValueError(
                f"max_completion_length={training_args.max_completion_length} would cut selections of up to "
                f"{model.config.max_shots} demonstrations before their stop; set it to >= "
                f"{model.config.max_completion_length}"
            )
        reward = build_reward(data, reward_args, tokenizer=tokenizer, max_shots=model.config.max_shots)
        dataset = build_selector_training_dataset(data, pools, tokenizer)
        trainer = ICDGRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=training_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
        run["metrics_file"] = install_console(trainer, console_args)
        add_heldout_callback(trainer, heldout_args, data, data_args, reward_args, tokenizer, reward.backend)
        trainer.train(resume_from_checkpoint=resume)
        model = save_trained_selector(trainer, tokenizer, training_args)
        if training_args.process_index == 0:  # for `python -m trl_icd.diagnose OUTPUT_DIR`
            write_run_log(trainer, training_args.output_dir, training_args, data_args, reward_args, rce_args)
        log_history = trainer.state.log_history
        run["global_step"] = trainer.state.global_step
        run["training_cost"] = trainer.cost_summary()
        if trainer.ref_model is not None:
            run["reference_policy"] = trainer.ref_model.config._name_or_path
    else:
        if training_args.process_index == 0:
            save_policy(model, tokenizer, training_args.output_dir)
        log_history = []

    if script_args.evaluate and training_args.process_index == 0:
        run["eval_results"] = run_demo_evaluation(
            model, tokenizer, data, data_args, reward_args, training_args.output_dir, log_history
        )
        print(json.dumps(run["eval_results"], indent=2))
    if training_args.process_index == 0:
        write_run_summary(training_args.output_dir, run, time.perf_counter() - started)
        # Every file the run wrote, listed last so it is what a person sees.
        run["outputs"] = print_output_listing(training_args.output_dir)
    return run


def write_run_summary(output_dir: str, run: dict, wall_time: float) -> str:
    """`run_summary.json`: wall time, steps, what the reward calls cost (sent to the backend, answered from the
    cache, rejected, skipped before rollout; groups dropped or replaced) and, with `--evaluate`, the held-out
    accuracies. Written for every run, evaluated or not."""
    summary = {
        "wall_time_s": round(wall_time, 2),
        "global_step": run.get("global_step"),
        "training_cost": run.get("training_cost", {}),
        "eval_results": run.get("eval_results"),
        "output_dir": run["output_dir"],
        "start_policy": run["start_policy"],
        "reference_policy": run.get("reference_policy"),
    }
    path = os.path.join(output_dir, "run_summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return path


def save_trained_selector(trainer, tokenizer, training_args):
    """Save the trained selector to `output_dir` as a full model that `from_pretrained` loads (strictly), and return
    it. A LoRA run also keeps its adapter alone in `output_dir/adapter`; the selector saved is the merged model."""
    from peft import PeftModel

    if not isinstance(trainer.model, PeftModel):
        trainer.save_model(training_args.output_dir)
        if training_args.process_index == 0:
            tokenizer.save_pretrained(training_args.output_dir)
        return trainer.model
    if training_args.process_index == 0:
        trainer.model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
    merged = trainer.model.merge_and_unload()
    if training_args.process_index == 0:
        save_policy(merged, tokenizer, training_args.output_dir)
    wait_for_main_process()
    return merged


def wait_for_main_process() -> None:
    """Wait until the main process has written the start policy (no-op in a single process)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


if __name__ == "__main__":
    with exit_on_missing_input():
        main(sys.argv[1:])

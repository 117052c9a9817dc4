"""What a run leaves behind: its config, the final model, the training summary and the dev scores."""

import json
import shutil
import sys
from pathlib import Path

import torch

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_state_dict(accelerator, model, dtype=torch.float32):
    """The model's full state dict for export, its floating tensors in ``dtype``; every process calls it.

    Under FSDP / ZeRO-3 the shards are gathered.
    """
    state_dict = accelerator.get_state_dict(model)
    if state_dict is None:  # only the main process receives it
        return None
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}


def finish_run(accelerator, model, output_dir, summary, eval_file=None, eval_history=None, save_dtype="float32"):
    """Write output_dir/final (a sentence-transformers directory, weights in ``save_dtype``),
    train_summary.json (with pairs/s) and, when there was a dev set, eval_results.json; then end the trackers."""
    summary["pairs_per_s"] = summary["pairs"] / summary["seconds"] if summary["seconds"] else None
    state_dict = export_state_dict(accelerator, model, SAVE_DTYPES[save_dtype])
    if accelerator.is_main_process:
        final_dir = Path(output_dir) / "final"
        accelerator.unwrap_model(model).save_pretrained(final_dir, state_dict=state_dict)
        (Path(output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {final_dir}")
        if eval_history:
            _write_eval_results(output_dir, eval_file, eval_history)
    accelerator.end_training()


def write_run_config(output_dir, args, copy_files=()):
    """Record the command line, every argument and the data lists of a run in its output dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {"command": sys.argv, "args": {k: v for k, v in vars(args).items()}}
    (output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    for path in copy_files:
        if path:
            shutil.copy(path, output_dir / Path(path).name)


def _write_eval_results(output_dir, eval_file, history):
    """eval_results.json with the dev Spearman at each evaluated step, and a one-line summary."""
    (Path(output_dir) / "eval_results.json").write_text(json.dumps(
        {"eval_file": eval_file, "sts_spearman_by_step": history}, indent=2))
    first, last = min(history), max(history)
    print(f"dev Spearman: step {first} {history[first]:.2f} -> step {last} {history[last]:.2f}")

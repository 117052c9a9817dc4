#!/usr/bin/env python
"""Export a training checkpoint as a sentence-transformers model directory: what final/ would be at that step.

    python tools/export_checkpoint.py runs/ft/checkpoint-500 runs/ft/step500 [--overwrite] [--no_wise_ft]

Takes any checkpoint the training scripts write (train_finetune.py, train_llm_embed.py, train_pretrain.py; one
process, DDP, DeepSpeed ZeRO-1/2/3 or FSDP: see modules/export.py for the layouts). The model is rebuilt from the
run's run_config.json (in the checkpoint's parent) with the script's own builder, given the checkpoint's weights
(every key must match) and saved with the save_pretrained the run uses, in the run's --save_dtype: a LoRA run gives
the merged model and the adapter in OUT/adapter, as final/. A run with --wise_ft_alpha < 1 is averaged with its start
model as final/ is; --no_wise_ft exports the weights as trained. Prompts that a run reads from its files
(--query_prefix_file, --instruction_template with --task_instructions) are read again from where run_config.json
says. OUT is written as OUT.tmp, then renamed.
"""

import contextlib
import json
import shutil
import sys
from pathlib import Path

from modules.cli import ArgumentParser, UsageError, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint-<step> folder in a run's output dir")
    p.add_argument("out", help="model directory to write: new or empty, or anything with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it holds something")
    p.add_argument("--no_wise_ft", action="store_true",
                   help="export the weights as trained, also when the run averages final/ with its start model "
                        "(--wise_ft_alpha < 1)")
    return p.parse_args(argv)


def checked_step(checkpoint, out, overwrite):
    """The checkpoint's step; refuses a folder that is no complete checkpoint, and an OUT it must not replace."""
    from modules.checkpoints import TRAINER_STATE

    state_file = checkpoint / TRAINER_STATE
    if not state_file.is_file():
        raise UsageError(f"{checkpoint}: not a checkpoint (no {TRAINER_STATE}; a complete checkpoint-<step> has one)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty (--overwrite replaces it)")
    return json.loads(state_file.read_text())["global_step"]


def main(argv=None):
    args = parse_args(argv)
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    step = checked_step(checkpoint, out, args.overwrite)
    with contextlib.redirect_stdout(sys.stderr):  # what the libraries print; stdout is the one line below
        kind, script, run_args, wise_ft = export_checkpoint(checkpoint, out, args.no_wise_ft, step)
    averaged = f", WiSE-FT alpha {run_args.wise_ft_alpha}" if wise_ft else ""
    print(f"exported the {kind} checkpoint of {script} at step {step}{averaged} ({run_args.save_dtype}) to {out}")


def export_checkpoint(checkpoint, out, no_wise_ft, step):
    """Write OUT with a model card; returns (kind of checkpoint, training script, run args, whether WiSE-FT averaged)."""
    from modules.checkpoints import replace_directory
    from modules.export import matching_weights, read_checkpoint, read_run_config, rebuild_model
    from modules.model_card import write_model_card
    from modules.outputs import final_weights

    read_run_config(checkpoint.parent)  # a missing config is reported before the weights are read
    kind, weights = read_checkpoint(checkpoint)
    script, run_args, model = rebuild_model(checkpoint.parent)
    wise_ft = run_args.wise_ft_alpha < 1 and not no_wise_ft
    weights, _ = final_weights(matching_weights(weights, model, checkpoint), run_args, wise_ft)

    partial = out.with_name(out.name + ".tmp")
    if partial.exists():  # left by an interrupted export
        shutil.rmtree(partial)
    model.save_pretrained(partial, state_dict=weights)
    write_model_card(partial, run_args, {"steps": step})
    replace_directory(partial, out)
    return kind, script, run_args, wise_ft


if __name__ == "__main__":
    run_cli(main)

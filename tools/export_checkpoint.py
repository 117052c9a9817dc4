#!/usr/bin/env python
"""Export a training checkpoint as a sentence-transformers model directory: what final/ would be at that step.

    python tools/export_checkpoint.py runs/ft/checkpoint-500 runs/ft/step500 [--overwrite] [--no_wise_ft]

Takes any checkpoint the training scripts write (train_finetune.py, train_llm_embed.py, train_pretrain.py; one
process, DDP, DeepSpeed ZeRO-1/2/3 or FSDP: see modules/export.py for the layouts). The model is rebuilt from the
run's run_config.json (in the checkpoint's parent) with the script's own builder, given the checkpoint's weights
(every key must match) and saved with the save_pretrained the run uses, in the run's --save_dtype: a LoRA run gives
the merged model and the adapter in OUT/adapter, as final/. A run with --wise_ft_alpha < 1 is averaged with its start
model as final/ is; --no_wise_ft exports the weights as trained. A run with --ema_decay exports the checkpoint's
moving average of the weights, as final/ holds it; --no_ema the trained weights. Prompts that a run reads from its files
(--query_prefix_file, --instruction_template with --task_instructions) are read again from where run_config.json
says. OUT is written as OUT.tmp, then renamed; it may not be the checkpoint, hold it (its run dir: --overwrite would
delete the run) or lie inside it. The checkpoint's pickles are read weights-only (a DeepSpeed checkpoint with the
types DeepSpeed stores): a file holding anything else is refused unread, as is a damaged one, naming it.
"""

import contextlib
import sys
from pathlib import Path

from modules.cli import ArgumentParser, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint-<step> folder in a run's output dir")
    p.add_argument("out", help="model directory to write: new or empty, or anything with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it holds something")
    p.add_argument("--no_wise_ft", action="store_true",
                   help="export the weights as trained, also when the run averages final/ with its start model "
                        "(--wise_ft_alpha < 1)")
    p.add_argument("--no_ema", action="store_true",
                   help="export the trained weights, also when the run writes final/ from their moving average "
                        "(--ema_decay)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from modules.export import checked_step, export_checkpoint  # after parsing: --help answers at once

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    step = checked_step(checkpoint, out, args.overwrite)
    with contextlib.redirect_stdout(sys.stderr):  # what the libraries print; stdout is the one line below
        kind, script, run_args, wise_ft = export_checkpoint(checkpoint, out, args.no_wise_ft, step, args.no_ema)
    averaged = f", WiSE-FT alpha {run_args.wise_ft_alpha}" if wise_ft else ""
    print(f"exported the {kind} checkpoint of {script} at step {step}{averaged} ({run_args.save_dtype}) to {out}")


if __name__ == "__main__":
    run_cli(main)

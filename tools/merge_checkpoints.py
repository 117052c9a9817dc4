#!/usr/bin/env python
"""Merge trained models in weight space (model soup, or the merge step of Qwen3-Embedding).

    python tools/merge_checkpoints.py runs/a/final runs/b/final runs/c/checkpoint-800 --output runs/soup \
        [--weights 1,1,2] [--method mean|slerp]

MODEL: a model directory (a run's final/, the packaged or a downloaded sentence-transformers or transformers model,
weights in safetensors or pytorch_model.bin) or a checkpoint-<step> folder of a run (exported first as
tools/export_checkpoint.py does: what final/ would be at that step). ``mean`` (default) averages any number of
models, uniformly or by ``--weights``; ``slerp`` interpolates two along the arc between them, tensor by tensor, at
t = w2 / (w1 + w2). A fine-tune merges with its own start model (WiSE-FT, LM-Cocktail) whichever saved it: every
trained tensor must be in every model with the same shape, while buffers (position ids) and BERT's pooler, which no
embedding reads, need not be. The merged model keeps the first model's layout (files, format, tensor names, buffers,
pooler), config, tokenizer, pooling and prompts; its README.md names the merged models, their weights and what each
is (a run's final/ or checkpoint, a merge, a model), and their common base model. OUT is written as OUT.tmp, then
renamed; it may not be, hold or lie inside a MODEL. A run's output directory is no MODEL: the refusal names its final/
and checkpoints. See modules/merging.py for the formulas and the layout rules, modules/merge_card.py for the card.
"""

import shutil
import tempfile
from pathlib import Path

from modules.cli import ArgumentParser, UsageError, run_cli
from modules.flags import MERGE_METHODS
from modules.output_paths import refuse_output_over_inputs


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+", help="model directories or checkpoint-<step> folders (two or more)")
    p.add_argument("--output", required=True, help="model directory to write (new or empty)")
    p.add_argument("--weights", default=None, help="comma list, one per model, >= 0 (default: equal)")
    p.add_argument("--method", choices=MERGE_METHODS, default="mean")
    args = p.parse_args(argv)
    if len(args.models) < 2:
        p.error("give two or more models")
    if args.method == "slerp" and len(args.models) != 2:
        p.error("--method slerp merges exactly two models")
    try:
        args.weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(args.models)
    except ValueError:
        p.error(f"--weights {args.weights}: expected a comma list of numbers")
    if len(args.weights) != len(args.models) or min(args.weights) < 0 or not sum(args.weights) > 0:
        p.error(f"--weights: one number >= 0 per model ({len(args.models)}), not all 0")
    output = Path(args.output)
    refuse_output_over_inputs(output, args.models, name=f"--output {output}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        p.error(f"--output {output} exists and is not an empty directory")
    return args


def main(argv=None):
    args = parse_args(argv)
    from modules.checkpoints import TRAINER_STATE, written_whole  # after parsing: --help answers at once
    from modules.export import refuse_run_dir
    from modules.merge_card import merge_card
    from modules.merging import merge_model_dirs

    for model in map(Path, args.models):  # before any checkpoint is exported
        if not model.is_dir():
            raise UsageError(f"{model}: no such directory")
        refuse_run_dir(model)
    with tempfile.TemporaryDirectory() as exports:
        model_dirs = [exported(Path(model), Path(exports) / str(i)) if (Path(model) / TRAINER_STATE).is_file()
                      else Path(model) for i, model in enumerate(args.models)]
        with written_whole(Path(args.output)) as partial:
            shutil.copytree(model_dirs[0], partial)
            files = merge_model_dirs(model_dirs, args.weights, args.method, partial)
            # over the first model's card, which describes another model
            (partial / "README.md").write_text(merge_card(args.models, args.weights, args.method, args.output),
                                               encoding="utf-8")
    print(f"merged {len(args.models)} models ({args.method}, weights {args.weights}; {', '.join(files)}) into "
          f"{args.output}")


def exported(checkpoint, out):
    """A checkpoint exported as its run's final/ would be at that step."""
    from modules.export import checked_step, export_checkpoint

    step = checked_step(checkpoint, out, overwrite=False)
    export_checkpoint(checkpoint, out, no_wise_ft=False, step=step)
    return out


if __name__ == "__main__":
    run_cli(main)

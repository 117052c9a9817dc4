#!/usr/bin/env python
"""Evaluate a sentence-embedding model on C-MTEB (mteb's `MTEB(cmn, v1)`) or any mteb task, with mteb 2.x.

Examples:
    python eval/run_cmteb.py --model runs/piccolo2/final
    python eval/run_cmteb.py --model PATH --types STS,Retrieval --dims 64,128,256,512
    python eval/run_cmteb.py --model PATH --types STS --dims 128 --quantize int8,binary --calibration train.jsonl
    python eval/run_cmteb.py --model PATH --tasks T2Retrieval LCQMC \\
        --query-instruction "为这个句子生成表示以用于检索相关文章："
    python eval/run_cmteb.py --model PATH --data-dir /data/cmteb   # offline; layout in eval/README.md
    python eval/run_cmteb.py --model PATH --local-task data/my_sts --local-task data/CranfieldLocal
    python eval/run_cmteb.py --model runs/ft/checkpoint-500 --types STS   # a checkpoint, exported first

Writes mteb's own result files under OUTPUT_DIR/results/, and summary.json / summary.md (plus
matryoshka.png with --dims) in OUTPUT_DIR; --quantize also scores int8 / binary embeddings at every dimension.
Scores follow the C-MTEB leaderboard: each task's main score x 100, the mean of the tasks of each type, and the
mean over all tasks; averages over part of the benchmark are labelled "partial (k of 31 tasks)". Results are filed
under a revision of the model: a hash of its weight files. See eval/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from modules.cli import ArgumentParser, UsageError

# Light on purpose: --help and flag errors answer at once; the work (mteb, torch, sentence-transformers) is in
# eval/cmteb.py and its eval/cmteb_*.py parts, imported after the flags are parsed.

BENCHMARK = "MTEB(cmn, v1)"  # = cmteb_tasks.BENCHMARK
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # 'name' or 'org/name'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="run_cmteb.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="sentence-transformers model directory, a training checkpoint folder (checkpoint-<step> with "
        "trainer_state.json: exported first with tools/export_checkpoint.py), or a hub name when online; repeat it "
        "to score several models alike and print one table comparing them",
    )
    parser.add_argument(
        "--model-name", help="model name in mteb's result folders (default: PARENT/NAME of --model)"
    )
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--tasks",
        nargs="+",
        help="task names (comma or space separated): C-MTEB tasks run with the benchmark's splits, other "
        "names with their mteb defaults. Default: the whole benchmark (none with --local-task alone)",
    )
    selection.add_argument("--types", help="comma-separated task types of the benchmark, e.g. STS,Retrieval")
    parser.add_argument(
        "--local-task",
        action="append",
        type=Path,
        metavar="DIR",
        help="a task of one's own: a folder with task.json beside its data (repeatable; with or without "
        "--tasks / --types); never counted as a benchmark task",
    )
    parser.add_argument("--benchmark", default=BENCHMARK, help="mteb benchmark to draw tasks from")
    parser.add_argument(
        "--dims", help="comma-separated Matryoshka dimensions, e.g. 64,128,256; the full one is added"
    )
    parser.add_argument(
        "--quantize",
        help="comma-separated embedding quantizations also scored, at every dimension: int8 (needs --calibration), "
        "binary (Hamming). The embeddings', not the model's compute dtype (--precision)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="data file (JSONL of text / text_pair / text_pos / text_neg / sentence1 / sentence2, e.g. the training "
        "file) whose embeddings set int8's range of each dimension; never data the run scores",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size")
    parser.add_argument(
        "--output-dir", type=Path, help="folder for the summaries and mteb's results; none: runs/cmteb/<model name>"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="read each mteb task from DIR/<TaskName>/ instead of the hub"
    )
    parser.add_argument(
        "--query-instruction",
        help="prepended to the queries of Retrieval and Reranking tasks only (BGE / Piccolo convention)",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        help="JSON file of prompts keyed like mteb's (task name, task type, 'query', 'document', "
        "'<Task>-query', ...); overrides the prompts saved with the model",
    )
    parser.add_argument(
        "--instruction-template",
        help="for LLM embedders: prompt built from mteb's instruction of each task, e.g. "
        "'Instruct: {instruction}\\nQuery: ' (\\n is read as a newline); used for queries and symmetric "
        "tasks, not for documents",
    )
    parser.add_argument("--device", help="torch device; none: cuda when available, else cpu")
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="model weights dtype; auto = bf16 (fp16 without bf16 support) on GPU, fp32 on CPU",
    )
    parser.add_argument("--max-seq-length", type=int, help="override the model's maximum sequence length")
    parser.add_argument(
        "--no-wise-ft",
        action="store_true",
        help="with a checkpoint as --model: evaluate the weights as trained, also when the run averages "
        "final/ with its start model (--wise_ft_alpha < 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def check_model_path(model: str) -> None:
    """Refuse a --model that reads as a local path but names no directory, before anything heavy is imported
    (huggingface would answer "Repo id must be in the form ..." after seconds of imports).

    A path: anything that is not a hub id ('name', 'org/name'), that starts with '.', '~' or the path separator,
    or whose first part exists here (runs/model where runs/ exists).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--model {model}: not a directory")
        return
    first_part = Path(path.parts[0]) if path.parts else path
    if model.startswith((".", "~", os.sep)) or not HUB_ID.match(model) or (len(path.parts) > 1 and first_part.exists()):
        raise UsageError(f"--model {model}: no such directory")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as the command line asks and write the reports; returns the summary, or {model: summary} for
    several models (each in its own folder under --output-dir, then one table comparing them)."""
    args = parse_args(argv)
    models = list(dict.fromkeys(args.model))
    if len(models) > 1 and args.model_name:
        raise UsageError("--model-name names one model: give it with a single --model")
    for model in models:
        check_model_path(model)
    import cmteb  # heavy: after the flags are parsed
    from cmteb_model import default_model_name

    if len(models) == 1:
        return cmteb.evaluate(argparse.Namespace(**{**vars(args), "model": models[0]}))
    summaries = {}
    for model in models:
        output_dir = args.output_dir / default_model_name(model).replace("/", "__") if args.output_dir else None
        summaries[model] = cmteb.evaluate(argparse.Namespace(**{**vars(args), "model": model, "output_dir": output_dir}))
    print(comparison_table(summaries))
    return summaries


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A markdown table of several models' scores: the average over the tasks, then each task, a column per model."""
    models = list(summaries)
    tasks = list(dict.fromkeys(task for summary in summaries.values() for task in summary["tasks"]))
    rows = [("Average", [summaries[m]["average"] for m in models])]
    rows += [(task, [summaries[m]["tasks"].get(task) for m in models]) for task in tasks]
    lines = ["| Task | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    lines += [f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in values) + " |"
              for name, values in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # mteb also logs this; C-MTEB v1 deliberately runs the superseded v1 tasks
    warnings.filterwarnings("ignore", message="The task .* is superseded by", category=UserWarning)
    try:
        run(argv)
    except UsageError as error:  # cmteb_errors.SetupError, local_tasks.LocalDataError, modules.cli.DataError, ...
        print(f"run_cmteb.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

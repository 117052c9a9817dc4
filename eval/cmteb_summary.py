"""The summary of a C-MTEB run: C-MTEB leaderboard scores (each task's main score x 100, per-type means, the
averages) at every dimension and quantization, the scores that were not finite, and the run's settings."""

from __future__ import annotations

import argparse
import datetime
import math
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from mteb.abstasks import AbsTask
from mteb.results import TaskResult
from sentence_transformers import SentenceTransformer

from cmteb_encoder import SentenceEncoder
from cmteb_tasks import benchmark_coverage, benchmark_task_names, mteb_data_source, type_rank
from modules.quantization import FLOAT32


def leaderboard_scores(task_scores: dict[str, float], task_types: dict[str, str]) -> dict[str, Any]:
    """C-MTEB leaderboard numbers: task scores, per-type means, the mean over tasks and over types.

    A NaN or infinite task score becomes None and stays out of the means (a mean with a NaN is NaN, and JSON
    has no NaN); `score_row` lists it under `not_finite`."""
    scores = {name: finite_or_none(score) for name, score in task_scores.items()}
    types = {}
    for task_type in sorted(set(task_types[name] for name in scores), key=type_rank):
        types[task_type] = mean_or_none(score for name, score in scores.items() if task_types[name] == task_type)
    return {
        "tasks": scores,
        "types": types,
        "average": mean_or_none(scores.values()),
        "average_by_type": mean_or_none(types.values()),
    }


def finite_or_none(score: float) -> float | None:
    return score if math.isfinite(score) else None


def mean_or_none(scores: Any) -> float | None:
    """The mean of the scores that are not None; None when there are none."""
    present = [score for score in scores if score is not None]
    return float(np.mean(present)) if present else None


def main_scores(task_results: dict[str, TaskResult]) -> dict[str, float]:
    """Each task's main score x 100, averaged over its evaluated splits and subsets (mteb's get_score)."""
    return {name: 100 * float(result.get_score()) for name, result in task_results.items()}


def pair_ap_scores(task_results: dict[str, TaskResult], task_types: dict[str, str]) -> dict[str, float]:
    """max_ap x 100 of each PairClassification task (its main score is max_accuracy), averaged like it."""
    return {
        name: 100 * float(result.get_score(getter=lambda scores: scores["max_ap"]))
        for name, result in task_results.items()
        if task_types[name] == "PairClassification"
    }


def score_row(
    task_results: dict[str, TaskResult], task_types: dict[str, str], metrics: dict[str, str]
) -> dict[str, Any]:
    """One row of scores (see `leaderboard_scores`); `not_finite` lists the scores recorded as None, as
    'Task: metric = value', where `metrics` gives each task's main score."""
    main = main_scores(task_results)
    row = leaderboard_scores(main, task_types)
    pair_ap = pair_ap_scores(task_results, task_types)
    if pair_ap:
        row["pair_ap"] = {name: finite_or_none(score) for name, score in pair_ap.items()}
    not_finite = [f"{name}: {metrics[name]} = {score}" for name, score in main.items() if not math.isfinite(score)]
    not_finite += [f"{name}: max_ap = {score}" for name, score in pair_ap.items() if not math.isfinite(score)]
    if not_finite:
        row["not_finite"] = not_finite
    return row


def not_finite_scores(summary: dict[str, Any]) -> list[str]:
    """Every score of the summary's rows that was NaN or infinite (recorded as null), with its dimension (and
    quantization)."""
    rows = summary.get("dims") or [{"dim": summary["model"]["embedding_dim"], **summary}]
    rows = [*rows, *summary.get("quantized", [])]
    return [f"{entry} (dim {row['dim']}{', ' + row['quantization'] if 'quantization' in row else ''})"
            for row in rows for entry in row.get("not_finite", [])]


def build_summary(
    args: argparse.Namespace,
    model: SentenceTransformer,
    encoder: SentenceEncoder,
    tasks: list[AbsTask],
    dims: list[int],
    results: dict[tuple[int, str], dict[str, TaskResult]],
    sources: dict[str, dict[str, str]] | None = None,
    checkpoint: dict[str, Any] | None = None,
    results_dir: Path | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a run; `results` by (dim, quantization) as `evaluate_tasks` returns them."""
    task_types = {task.metadata.name: task.metadata.type for task in tasks}
    metrics = {task.metadata.name: task.metadata.main_score for task in tasks}
    full_dim = max(dims)
    full_row = score_row(results[(full_dim, FLOAT32)], task_types, metrics)
    quantizations = list(dict.fromkeys(quantization for _, quantization in results))
    summary = {
        "model": {
            "path": str(args.model),
            "name": encoder.full_meta.name,
            "revision": encoder.full_meta.revision,
            "checkpoint": checkpoint,
            "embedding_dim": full_dim,
            "max_seq_length": model.max_seq_length,
            "similarity_fn": model.similarity_fn_name,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(model.device),
            "model_prompts": dict(model.prompts),
        },
        "versions": {
            package: version(package)
            for package in ("mteb", "sentence-transformers", "transformers", "torch")
        },
        "settings": {
            "benchmark": args.benchmark,
            "data": mteb_data_source(args, tasks),
            "local_tasks": [str(folder) for folder in getattr(args, "local_task", None) or []],
            "batch_size": args.batch_size,
            "dims": dims if args.dims else None,
            "quantize": quantizations[1:] or None,
            "calibration": calibration,
            "query_instruction": args.query_instruction,
            "instruction_template": encoder.instruction_template,
            "prompts": encoder.prompts,
        },
        "results_dir": str(results_dir) if results_dir else None,
        "coverage": benchmark_coverage(
            args.benchmark,
            benchmark_task_names(args.benchmark),
            [task.metadata.name for task in tasks],
            [name for name, score in full_row["tasks"].items() if score is None],
        ),
        "splits": {task.metadata.name: list(task.eval_splits) for task in tasks},
        "task_types": task_types,
        "sources": sources or {},
        **full_row,
        "prompts_used": encoder.prompts_used,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.dims:
        summary["dims"] = [{"dim": dim, **score_row(results[(dim, FLOAT32)], task_types, metrics)} for dim in dims]
    if len(quantizations) > 1:
        summary["quantized"] = [
            {"dim": dim, "quantization": quantization, **score_row(results[(dim, quantization)], task_types, metrics)}
            for dim in dims for quantization in quantizations[1:]
        ]
    return summary

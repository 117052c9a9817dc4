"""The tasks of a C-MTEB run: benchmark and task selection (--tasks, --types, --local-task, --data-dir), where each
task's data come from, and how much of the benchmark a run covers."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mteb
from mteb.abstasks import AbsTask

from cmteb_errors import SetupError
from local_tasks import as_local_tasks, folder_task
from modules.quantization import comma_list  # the parsing of --tasks and --types

BENCHMARK = "MTEB(cmn, v1)"
# C-MTEB's task types, in the order the summary lists them; other types follow alphabetically.
TYPE_ORDER = ("Retrieval", "Reranking", "PairClassification", "Clustering", "STS", "Classification")


def select_tasks(benchmark_name: str, task_names: list[str], task_types: list[str]) -> list[AbsTask]:
    """Tasks by name (benchmark tasks keep the benchmark's splits), by type, or the whole benchmark."""
    try:
        benchmark = mteb.get_benchmark(benchmark_name)
    except (KeyError, ValueError) as error:
        raise SetupError(f"Unknown benchmark {benchmark_name!r}: {error}") from None
    benchmark_tasks = {task.metadata.name: task for task in benchmark.tasks}
    if task_names:
        tasks = [benchmark_tasks.get(name) or registry_task(name, benchmark_name) for name in task_names]
    elif task_types:
        tasks = tasks_of_types(list(benchmark_tasks.values()), task_types, benchmark_name)
    else:
        tasks = list(benchmark_tasks.values())
    return sorted(tasks, key=lambda task: type_rank(task.metadata.type))


def registry_task(name: str, benchmark_name: str) -> AbsTask:
    try:
        return mteb.get_task(name)
    except KeyError as error:
        raise SetupError(
            f"Unknown task {name!r}: not in {benchmark_name} nor in mteb's task registry ({error})."
        ) from None


def tasks_of_types(tasks: list[AbsTask], task_types: list[str], benchmark_name: str) -> list[AbsTask]:
    available = {task.metadata.type.lower(): task.metadata.type for task in tasks}
    unknown = [task_type for task_type in task_types if task_type.lower() not in available]
    if unknown:
        raise SetupError(
            f"Unknown task type(s) {unknown} for {benchmark_name}; available: {sorted(available.values())}."
        )
    wanted = {available[task_type.lower()] for task_type in task_types}
    return [task for task in tasks if task.metadata.type in wanted]


def type_rank(task_type: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(task_type), "") if task_type in TYPE_ORDER else (len(TYPE_ORDER), task_type)


def benchmark_task_names(benchmark_name: str) -> list[str]:
    return [task.metadata.name for task in mteb.get_benchmark(benchmark_name).tasks]


def gather_tasks(args: argparse.Namespace) -> tuple[list[AbsTask], dict[str, dict[str, str]]]:
    """The tasks the command line asks for, and where each one's data come from.

    mteb tasks come from --tasks / --types (the whole benchmark when neither is given and there is no
    --local-task), read from --data-dir when given; --local-task folders add tasks of their own. Every local
    file is checked here, before any model is loaded.
    """
    task_names, task_types = comma_list(args.tasks), comma_list(args.types)
    local_folders = [Path(folder) for folder in args.local_task or []]
    tasks: list[AbsTask] = []
    if task_names or task_types or not local_folders:
        tasks = select_tasks(args.benchmark, task_names, task_types)
    if args.data_dir:
        if not args.data_dir.is_dir():
            raise SetupError(f"--data-dir {args.data_dir} is not a directory.")
        tasks = as_local_tasks(tasks, args.data_dir)
    sources = {task.metadata.name: mteb_task_source(task, args.data_dir) for task in tasks}
    for folder in local_folders:
        task = folder_task(folder)
        name = task.metadata.name
        if name in sources:
            raise SetupError(f"{folder / 'task.json'}: task name {name!r} is already taken by another task "
                             "of this run; give the local task a name of its own.")
        if is_mteb_task(name):
            raise SetupError(f"{folder / 'task.json'}: {name!r} is the name of an mteb task; give the local "
                             f"task a name of its own (--data-dir runs mteb's {name} on local files).")
        tasks.append(task)
        sources[name] = {"source": f"local folder {folder.resolve()}", "data_hash": task.local_task.revision}
    return sorted(tasks, key=lambda task: type_rank(task.metadata.type)), sources


def is_mteb_task(name: str) -> bool:
    try:
        mteb.get_task(name)
    except KeyError:
        return False
    return True


def mteb_task_source(task: AbsTask, data_dir: Path | None) -> dict[str, str]:
    if data_dir:
        return {"source": f"local files {Path(data_dir).resolve() / task.metadata.name}"}
    dataset = task.metadata.dataset
    return {"source": "huggingface hub", "dataset": dataset["path"], "revision": dataset.get("revision")}


def benchmark_coverage(
    benchmark_name: str, benchmark_tasks: list[str], evaluated: list[str], not_finite: Sequence[str] = ()
) -> dict[str, Any]:
    """How much of the benchmark the averages cover: 'full (31 of 31 tasks)' only when they are exactly the
    benchmark's tasks; else 'partial (k of 31 tasks)', naming the tasks outside the benchmark (local ones
    included) that the averages also hold, and the tasks run but left out of them (`not_finite`: a NaN score)."""
    evaluated = [name for name in evaluated if name not in not_finite]
    in_benchmark = [name for name in evaluated if name in benchmark_tasks]
    others = [name for name in evaluated if name not in benchmark_tasks]
    total = len(benchmark_tasks)
    full = len(in_benchmark) == total and not others
    label = f"{'full' if full else 'partial'} ({len(in_benchmark)} of {total} tasks)"
    if others:
        label += f" + {len(others)} task{'s' if len(others) > 1 else ''} outside {benchmark_name}: {', '.join(others)}"
    if not_finite:
        label += f"; left out (score not finite): {', '.join(not_finite)}"
    return {
        "benchmark": benchmark_name,
        "benchmark_tasks": total,
        "evaluated_benchmark_tasks": len(in_benchmark),
        "other_tasks": others,
        "not_finite": list(not_finite),
        "full": full,
        "label": label,
    }


def mteb_data_source(args: argparse.Namespace, tasks: list[AbsTask]) -> str:
    """Where the mteb tasks' data come from (local --local-task folders are listed apart)."""
    if not any(not hasattr(task, "local_task") for task in tasks):
        return "local task folders only"
    return str(args.data_dir) if args.data_dir else "huggingface hub"

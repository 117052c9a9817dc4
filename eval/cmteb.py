"""The work behind eval/run_cmteb.py: `evaluate(args)` runs a whole evaluation, `evaluate_tasks` runs mteb over
every task and variant.

eval/run_cmteb.py parses the command line and imports this module afterwards (mteb, torch and
sentence-transformers take seconds to import), then calls `evaluate(args)`. The parts, each usable on its own:
cmteb_tasks.py (task selection), cmteb_prompts.py, cmteb_model.py (loading, revision, checkpoints),
cmteb_encoder.py (`SentenceEncoder`), cmteb_variants.py (dimensions, quantizations), cmteb_summary.py and
cmteb_reports.py; their errors are in cmteb_errors.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mteb
from mteb.abstasks import AbsTask
from mteb.results import TaskResult
from tqdm.auto import tqdm

from cmteb_encoder import SentenceEncoder
from cmteb_errors import NonFiniteScoreError
from cmteb_model import (
    build_model_meta,
    default_model_name,
    embedding_dimension,
    export_checkpoint_model,
    is_checkpoint,
    load_model,
    model_reading,
    model_revision,
)
from cmteb_prompts import merge_prompts, read_instruction_template, read_prompts
from cmteb_reports import strict_result_files, write_reports
from cmteb_summary import build_summary, not_finite_scores
from cmteb_tasks import gather_tasks
from cmteb_variants import calibration_embeddings, calibration_record, resolve_dims, resolve_quantizations
from modules.model_card import update_cmteb_section
from modules.progress import clock, no_library_bars


def evaluate_tasks(
    encoder: SentenceEncoder,
    tasks: list[AbsTask],
    variants: list[tuple[int, str]],
    output_dir: Path,
    batch_size: int,
    progress: bool,
) -> dict[tuple[int, str], dict[str, TaskResult]]:
    """Run every task at every (dimension, quantization) with mteb; returns {(dim, quantization): {task name: mteb
    TaskResult}}."""
    cache = mteb.ResultCache(output_dir)
    interactive = progress and sys.stderr.isatty()  # bars on a terminal; plain lines in a log (slurm, nohup)
    encoder.plain_progress = progress and not interactive
    encode_kwargs = {"batch_size": batch_size, "show_progress_bar": interactive}
    results: dict[tuple[int, str], dict[str, TaskResult]] = {variant: {} for variant in variants}
    task_bar = tqdm(tasks, desc="C-MTEB", unit="task", disable=not interactive)
    started = time.perf_counter()
    for done, task in enumerate(task_bar):
        task_bar.set_postfix_str(task.metadata.name)
        if encoder.plain_progress:
            elapsed = time.perf_counter() - started
            left = f", about {clock(elapsed / done * (len(tasks) - done))} left" if done else ""
            print(f"C-MTEB: task {done + 1}/{len(tasks)} {task.metadata.name} ({task.metadata.type}), "
                  f"{clock(elapsed)} elapsed{left}", file=sys.stderr, flush=True)
        task.load_data()
        for variant in variants:
            encoder.set_variant(*variant)
            model_result = mteb.evaluate(
                encoder,
                task,
                cache=cache,
                overwrite_strategy="always",
                encode_kwargs=dict(encode_kwargs),
                co2_tracker=False,
                show_progress_bar=False,
            )
            results[variant][task.metadata.name] = model_result.task_results[0]
        encoder.forget_embeddings()
        task.unload_data()
    return results


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the parsed command line asks and write the reports; returns the summary."""
    tasks, sources = gather_tasks(args)
    prompts = read_prompts(args.prompts)
    template = read_instruction_template(args.instruction_template)
    quantizations, calibration_texts = resolve_quantizations(args)

    if args.no_progress or not sys.stderr.isatty():  # bars on a terminal; plain lines in a log (slurm, nohup)
        no_library_bars()
    with contextlib.ExitStack() as stack:
        model_dir, checkpoint = str(args.model), None
        if is_checkpoint(args.model):
            export_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cmteb_checkpoint_")))
            checkpoint = export_checkpoint_model(Path(args.model), export_root / "model", args.no_wise_ft)
            model_dir = str(export_root / "model")
        model = load_model(model_dir, args.device, args.precision, args.max_seq_length)
        reading = model_reading(model, Path(model_dir))
        print(f"model {args.model}: {reading}", file=sys.stderr, flush=True)
        revision = model_revision(model_dir, model)
        dims = resolve_dims(args.dims, embedding_dimension(model))
        variants = [(dim, quantization) for dim in dims for quantization in quantizations]
        name = args.model_name or default_model_name(args.model)
        encoder = SentenceEncoder(
            model,
            build_model_meta(model, name, revision),
            merge_prompts(model.prompts, prompts, args.query_instruction),
            instruction_template=template,
            reuse_embeddings=len(variants) > 1,
            calibration=calibration_embeddings(model, calibration_texts, args.batch_size, not args.no_progress),
        )
        output_dir = args.output_dir or Path("runs/cmteb") / name.replace("/", "__")
        results = evaluate_tasks(
            encoder, tasks, variants, output_dir, args.batch_size, progress=not args.no_progress
        )
    meta = encoder.full_meta
    results_dir = output_dir / "results" / meta.model_name_as_path() / meta.revision
    strict_result_files(results_dir)
    calibration = calibration_record(args.calibration, calibration_texts)
    summary = build_summary(args, model, encoder, tasks, dims, results, sources, checkpoint, results_dir, calibration)
    summary["model"]["read_as"] = reading
    print(write_reports(summary, output_dir))
    print(f"Results in {output_dir}")
    not_finite = not_finite_scores(summary)
    if not_finite:  # reported, not averaged; the model card keeps its last complete scores
        raise NonFiniteScoreError(f"{output_dir / 'summary.json'}: score not finite, recorded as null and left "
                                  f"out of the averages: {'; '.join(not_finite)}")
    if update_cmteb_section(args.model, summary):  # the model directory's card is one a training run wrote
        print(f"C-MTEB section of {Path(args.model) / 'README.md'} updated")
    return summary

"""A fine-tuning run's data, assembled from its meta list: every dataset read and checked (``load_meta_list``), the
lines naming skipped bad records, and train_finetune.py's datasets, batch sizes, sampler and data order
(``finetune_data``)."""

from .cli import DataError
from .meta_list import read_meta_list
from .samplers import build_sampler, describe_data_order
from .task_datasets import TaskDataset, load_task_dataset


def load_meta_list(meta_file, root_dir=None, negatives_per_kind=None, skip_bad=False,
                   teacher_scores=False) -> list[TaskDataset]:
    negatives_per_kind = negatives_per_kind or {}
    return [load_task_dataset(entry, negatives_per_kind, skip_bad, teacher_scores)
            for entry in read_meta_list(meta_file, root_dir)]


def skipped_record_lines(datasets):
    """One start-up line for each dataset that had bad records skipped (--skip_bad_records)."""
    return [d.skipped.line(d.name) for d in datasets if d.skipped.count]


def finetune_data(args, accelerator, negatives, negative_parts):
    """train_finetune.py's data: (datasets, per-process batch sizes, batch sampler, data order). Every record is
    checked (skipped ones counted and printed under --skip_bad_records) to hold the ``negatives`` of its kind; under
    --cbb every process holds its own n of each retrieval record's negatives (``negative_parts`` = processes), so a
    record needs n x processes."""
    needed = {**negatives, "retri_contrast": negatives["retri_contrast"] * negative_parts}
    datasets = load_meta_list(args.meta_list, args.root_dir, needed, args.skip_bad_records,
                              teacher_scores=bool(args.distill_weight) and not args.teacher_model)
    if not args.teacher_model and any(d.kind == "parallel" for d in datasets):
        raise DataError(f"{next(d.source for d in datasets if d.kind == 'parallel')}: a parallel corpus is distilled "
                         "from a teacher's embeddings: give --teacher_model")
    for line in skipped_record_lines(datasets):
        accelerator.print(line)
    default_batch = {"retri_contrast": args.retri_batch_size, "cls_contrast": args.cls_batch_size,
                     "cosent": args.cosent_batch_size, "parallel": args.parallel_batch_size}
    batch_sizes = [d.batch_size or default_batch[d.kind] for d in datasets]
    sampler = build_sampler(datasets, batch_sizes, args.seed, accelerator.num_processes, accelerator.process_index,
                            args.cbb)
    data_order = describe_data_order(datasets, batch_sizes, processes=accelerator.num_processes, seed=args.seed,
                                     grad_accum=args.grad_accum, cbb=args.cbb)
    return datasets, batch_sizes, sampler, data_order

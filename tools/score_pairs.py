#!/usr/bin/env python
"""Score (query, positive) pairs with a teacher embedding model and drop those below a threshold.

    python tools/score_pairs.py dedup.jsonl.gz --output scored.jsonl.gz --model /models/teacher \\
        --threshold 0.4 --score_column teacher_score

Conan-Embedding keeps pretraining pairs whose teacher cosine similarity is at least 0.4. The
teacher is any sentence-transformers directory, loaded from local files only. Pairs stream
through in batches of --batch_size; a pair scoring below --threshold is dropped
(``below_threshold``), the others are written unchanged, with the score added when
--score_column is given (--threshold -1 keeps every pair: scoring only).
"""

from pathlib import Path

from modules.cli import ArgumentParser, run_cli
from modules.pair_tools import PairWriter, Report, add_io_arguments, iter_pairs


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_io_arguments(parser)
    parser.add_argument("--model", required=True, help="teacher: a local sentence-transformers directory")
    parser.add_argument("--threshold", type=float, default=0.4, help="least cosine similarity kept")
    parser.add_argument("--score_column", default=None, help="write the score to this column; default: don't")
    parser.add_argument("--batch_size", type=int, default=256, help="pairs per encoding batch")
    parser.add_argument("--max_length", type=int, default=None, help="tokens per text; default: the model's")
    parser.add_argument("--query_prefix", default="", help="instruction put before each query, e.g. a BGE prompt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; default: cuda when available")
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model} is not a directory (models are loaded from local files only)")
    return args


def cosine_scores(model, queries, positives, args):
    encode = dict(batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    query_embeddings = model.encode(queries, prompt=args.query_prefix or None, **encode)
    positive_embeddings = model.encode(positives, **encode)
    return (query_embeddings * positive_embeddings).sum(axis=1).tolist()


def write_scored(batch, model, args, writer, report):
    """Score one batch of (record, query, positive) and write the records at or above the threshold."""
    scores = cosine_scores(model, [query for _, query, _ in batch], [positive for _, _, positive in batch], args)
    for (record, _, _), score in zip(batch, scores):
        if score < args.threshold:
            report.drop("below_threshold")
            continue
        if args.score_column:
            record[args.score_column] = score
        writer.write(record)
        report.keep()


def main(argv=None):
    args = parse_args(argv)
    from sentence_transformers import SentenceTransformer  # after parsing: --help answers at once

    model = SentenceTransformer(args.model, device=args.device, local_files_only=True)
    if args.max_length:
        model.max_seq_length = args.max_length
    report = Report("score_pairs")
    with PairWriter(args.output, args.inputs) as writer:
        batch = []
        for pair in iter_pairs(args, report):
            batch.append(pair)
            if len(batch) == args.batch_size:
                write_scored(batch, model, args, writer, report)
                batch = []
        if batch:
            write_scored(batch, model, args, writer, report)
    return report.finish(args)


if __name__ == "__main__":
    run_cli(main)

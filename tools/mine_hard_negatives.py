#!/usr/bin/env python
"""Offline hard-negative mining with faiss: a ranked candidate list per query, negatives sampled from ranks 10-210.

    python tools/mine_hard_negatives.py train.jsonl --model runs/pt/final --output mined.jsonl \
        [--corpus corpus.jsonl] [--num_negatives 7] [--range_start 10 --range_end 210] [--index flat|ivf|hnsw]

Reads a retrieval dataset (``text``, ``text_pos`` str or list), embeds the corpus (``--corpus``, a
file with a ``--corpus_column`` text column; default: every positive of the dataset) with any model
EmbeddingModel loads, searches it with every query, and writes a normal ``retri_contrast`` dataset:
``text``, ``text_pos``, ``text_neg`` (the sampled negatives), plus the ranked list ``candidates``
with ``candidate_scores`` (cosine) and the sampled ``neg_ranks`` / ``neg_scores``, which
train_finetune.py --dhnm re-mines from. Ranks count from 0 after removing the query's own
positives and the query text; ``--max_score`` / ``--max_positive_ratio`` drop candidates scoring
above an absolute cosine / above ratio x the positive's score (likely unlabelled positives).
Queries with too few candidates in the range are dropped and counted.
"""

import argparse
import time

import numpy as np
import torch

from modules.cli import run_cli
from modules.data import iter_raw_records, parse_record
from modules.evaluation import embed_texts
from modules.mining import build_index, ranked_candidates, sample_negative_ranks
from modules.model import EmbeddingModel
from modules.pair_tools import PairWriter, Report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="retrieval dataset (.jsonl, .jsonl.gz, .parquet): text, text_pos")
    p.add_argument("--model", required=True, help="sentence-transformers or transformers directory")
    p.add_argument("--output", required=True, help="mined dataset (.jsonl or .jsonl.gz)")
    p.add_argument("--corpus", default=None, help="file of passages to mine from (default: the dataset's positives)")
    p.add_argument("--corpus_column", default="text")
    p.add_argument("--num_negatives", type=int, default=7, help="negatives sampled per query")
    p.add_argument("--range_start", type=int, default=10, help="first rank negatives are sampled from")
    p.add_argument("--range_end", type=int, default=210, help="rank after the last one sampled from")
    p.add_argument("--keep_candidates", type=int, default=210, help="length of the ranked list kept for DHNM")
    p.add_argument("--max_score", type=float, default=None, help="drop candidates with cosine above this")
    p.add_argument("--max_positive_ratio", type=float, default=None,
                   help="drop candidates scoring above this x the query's positive score (e.g. 0.95)")
    p.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="auto: flat below 1M passages")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 x sqrt(corpus))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched")
    p.add_argument("--query_prefix", default="", help="instruction prepended to queries")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if not 0 <= args.range_start < args.range_end <= args.keep_candidates:
        p.error("need 0 <= --range_start < --range_end <= --keep_candidates")
    args.inputs = [args.input]  # for the shared report
    return args


def main(argv=None):
    args = parse_args(argv)
    report = Report("mine_hard_negatives")
    records = [parse_record(raw, "retri_contrast", where)
               for where, raw in iter_raw_records(args.input)]
    if args.corpus:
        corpus = [parse_record({"text": raw.get(args.corpus_column), "text_pos": "-"}, "retri_contrast", where)["text"]
                  for where, raw in iter_raw_records(args.corpus)]
    else:
        corpus = [text for record in records for text in record["text_pos"]]
    corpus = list(dict.fromkeys(corpus))  # distinct, in first-seen order

    start = time.perf_counter()
    model = EmbeddingModel.from_pretrained(args.model).to(args.device)
    embed = lambda texts, length: embed_texts(model, model.tokenizer, texts, length, args.batch_size).numpy()
    corpus_embeddings = embed(corpus, args.passage_max_len)
    kind = args.index if args.index != "auto" else ("flat" if len(corpus) < 1_000_000 else "ivf")
    index = build_index(corpus_embeddings, kind, args.nlist, args.nprobe)
    queries = embed([args.query_prefix + r["text"] for r in records], args.query_max_len)
    positive_scores = (queries * embed([r["text_pos"][0] for r in records], args.passage_max_len)).sum(1)
    most_positives = max(len(r["text_pos"]) for r in records)
    scores, ids = index.search(queries, min(len(corpus), args.keep_candidates + most_positives + 1))
    print(f"embedded {len(corpus)} passages and {len(records)} queries, searched a {kind} index "
          f"in {time.perf_counter() - start:.1f} s")

    rng = np.random.default_rng(args.seed)
    with PairWriter(args.output, [args.input]) as writer:
        for record, row_scores, row_ids, positive_score in zip(records, scores, ids, positive_scores):
            limit = min(args.max_score if args.max_score is not None else np.inf,
                        args.max_positive_ratio * positive_score if args.max_positive_ratio else np.inf)
            keep = row_scores <= limit
            candidates, candidate_scores = ranked_candidates(row_scores[keep], row_ids[keep], corpus,
                                                             set(record["text_pos"]) | {record["text"]},
                                                             args.keep_candidates)
            ranks = sample_negative_ranks(len(candidates), args.num_negatives, args.range_start, args.range_end, rng)
            if ranks is None:
                report.drop("too_few_candidates_in_range")
                continue
            writer.write({**record, "text_neg": [candidates[r] for r in ranks], "candidates": candidates,
                          "candidate_scores": candidate_scores, "neg_ranks": ranks,
                          "neg_scores": [candidate_scores[r] for r in ranks]})
            report.keep()
    return report.finish(args)


if __name__ == "__main__":
    run_cli(main)

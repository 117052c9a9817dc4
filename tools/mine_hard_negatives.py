#!/usr/bin/env python
"""Offline hard-negative mining with faiss: a ranked candidate list per query, negatives sampled from ranks 10-210.

    python tools/mine_hard_negatives.py train.jsonl --model runs/pt/final --output mined.jsonl \
        [--corpus corpus.jsonl] [--num_negatives 7] [--range_start 10 --range_end 210] [--index flat|ivf|hnsw]
    python tools/mine_hard_negatives.py beir/fiqa --split train --model runs/pt/final --output mined.jsonl

Input: a retrieval dataset (``text``, ``text_pos`` str or list) mined against ``--corpus`` (records with
a ``--corpus_column`` text, optional ``_id`` / ``id`` and ``title``; default: the dataset's distinct
positives, written to ``<output stem>.corpus.jsonl``); or a BEIR folder (corpus.jsonl, queries.jsonl,
qrels/<split>.tsv or qrels.tsv; read by modules/beir.py, not strictly), each query with a document judged > 0
taking every such document as a positive (best first), mined against the folder's corpus (title and text joined as
modules.corpus.passage_text joins them).

Output: a normal ``retri_contrast`` dataset (it trains without --dhnm), one record per query:

    text, text_pos          the query and its positives
    text_neg                the sampled negatives' texts
    corpus                  the corpus file, relative to the output's folder through the paths given (symlinks
                            not resolved); ``corpus_column``: its text column, when not "text"
    candidate_ids           the ranked candidates' corpus ids: ``_id`` / ``id``, else the 0-based position
    candidate_scores        their cosines
    neg_ranks, neg_scores   the sampled negatives' ranks in candidate_ids and their cosines
    candidates              the candidates' texts, only with --store_texts

train_finetune.py --dhnm re-mines from the candidates, reading their texts from the corpus by id (files
with ``candidates`` texts and no ids, from earlier versions, still load). Ranks count from 0 after
removing the query's positives and the query text (and repeats of a text); ``--max_score`` /
``--max_positive_ratio`` drop candidates scoring above an absolute cosine / above ratio x the query's
best positive's score (likely unlabelled positives). Queries with too few candidates in the range, or
(BEIR) no relevant document in the corpus, are dropped; the counts and reasons are printed and kept in
``<output>.report.json``. Encoding, indexing and search print plain progress lines (about every 30 s)
that read well in a nohup or slurm log.
"""

import os
from pathlib import Path

from modules.cli import ArgumentParser, run_cli

SEARCH_BLOCK = 8192  # queries searched at a time: bounds the memory of the results and paces the progress lines


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)  # defaults shown in --help
    p.add_argument("input", help="retrieval dataset (.jsonl, .jsonl.gz, .parquet: text, text_pos) or a BEIR folder")
    p.add_argument("--model", required=True, help="sentence-transformers or transformers directory")
    p.add_argument("--output", required=True, help="mined dataset (.jsonl or .jsonl.gz)")
    p.add_argument("--split", default="train", help="BEIR folder: the qrels split, qrels/<split>.tsv (default train)")
    p.add_argument("--corpus", default=None, help="file of passages to mine from (default: the dataset's positives)")
    p.add_argument("--corpus_column", default="text")
    p.add_argument("--store_texts", action="store_true", help="also write the candidates' texts ('candidates')")
    p.add_argument("--num_negatives", type=int, default=7, help="negatives sampled per query")
    p.add_argument("--range_start", type=int, default=10, help="first rank negatives are sampled from")
    p.add_argument("--range_end", type=int, default=210, help="rank after the last one sampled from")
    p.add_argument("--keep_candidates", type=int, default=210, help="length of the ranked list kept for DHNM")
    p.add_argument("--max_score", type=float, default=None, help="drop candidates with cosine above this")
    p.add_argument("--max_positive_ratio", type=float, default=None,
                   help="drop candidates scoring above this x the query's best positive's score (e.g. 0.95)")
    p.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="auto: flat below 1M passages")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 x sqrt(corpus))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists searched")
    p.add_argument("--query_prefix", default="", help="instruction prepended to queries")
    p.add_argument("--query_max_len", type=int, default=64)
    p.add_argument("--passage_max_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if not 0 <= args.range_start < args.range_end <= args.keep_candidates:
        p.error("need 0 <= --range_start < --range_end <= --keep_candidates")
    args.beir = Path(args.input).is_dir() and (Path(args.input) / "corpus.jsonl").exists()
    if args.beir and args.corpus:
        p.error("a BEIR folder is mined against its own corpus.jsonl; leave out --corpus")
    args.inputs = [args.input]  # for the shared report
    return args


def read_beir_folder(args, report):
    """The queries of a BEIR folder judged relevant to a document (grade > 0), their relevant documents as positives
    (as texts and corpus positions, best grade first)."""
    from modules.beir import read_retrieval_split
    from modules.corpus import read_corpus

    data = read_retrieval_split(args.input, args.split, strict=False)
    corpus = read_corpus(corpus_file(args))
    records, positives = [], []
    for query_id, text in data.queries.items():
        judged = sorted(((doc, grade) for doc, grade in data.qrels[query_id].items() if grade > 0),
                        key=lambda judgement: -judgement[1])
        if not judged:
            continue
        relevant = [corpus.positions[doc] for doc, _ in judged if doc in corpus.positions]
        if not relevant:
            report.drop("no_relevant_document_in_corpus")
            continue
        records.append({"text": text, "text_pos": [corpus.texts[position] for position in relevant]})
        positives.append(relevant)
    return records, corpus, positives


def read_dataset(args, report):
    """The queries of a retrieval dataset and the corpus to mine; positives as corpus positions when they are in it."""
    from modules.cli import DataError
    from modules.corpus import read_corpus
    from modules.pair_tools import PairWriter
    from modules.records import iter_raw_records
    from modules.task_datasets import parse_record

    if not Path(args.input).exists():
        raise DataError(f"{args.input}: no such file or directory")
    records = []
    for where, raw in iter_raw_records(args.input):
        if isinstance(raw, dict):  # the query and its positives: columns of an earlier mining are left behind
            raw = {column: raw.get(column) for column in ("text", "text_pos")}
        records.append(parse_record(raw, "retri_contrast", where))
    if args.corpus:
        return records, read_corpus(args.corpus, args.corpus_column), None
    texts, positives = distinct_positives(records)
    path = corpus_file(args)
    with PairWriter(path, [args.input]) as writer:
        for text in texts:
            writer.write({"text": text})
    return records, read_corpus(path), positives


def corpus_file(args):
    """The corpus mined against, by the paths the user gave: the BEIR folder's, --corpus, or the positives written
    beside the output."""
    if args.beir:
        return Path(args.input) / "corpus.jsonl"
    if args.corpus:
        return Path(args.corpus)
    output = Path(args.output)
    return output.with_name(output.name.removesuffix(".gz").removesuffix(".jsonl") + ".corpus.jsonl")


def corpus_reference(args):
    """The corpus file relative to the output's folder, through the paths as given: a symlinked data folder stays a
    link in the reference (resolving it would tie the mined file to where the link points on this machine)."""
    return os.path.relpath(corpus_file(args).absolute(), Path(args.output).absolute().parent)


def distinct_positives(records):
    """The distinct positive texts, and each record's positives as indices into them."""
    texts = list(dict.fromkeys(text for record in records for text in record["text_pos"]))
    index = {text: i for i, text in enumerate(texts)}
    return texts, [[index[text] for text in record["text_pos"]] for record in records]


def best_positive_scores(query_embeddings, records, corpus, corpus_embeddings, positives, embed):
    """Each query's highest cosine with one of its positives: corpus rows (``positives``, or, with a --corpus, the
    rows holding a positive's text), the positives the corpus lacks embedded here."""
    import numpy as np

    if positives is None:
        texts, positives = distinct_positives(records)
        row = {text: i for i, text in reversed(list(enumerate(corpus.texts)))}  # a text's first row
        missing = [text for text in texts if text not in row]
        extra = embed(missing, "encoding the positives not in the corpus") if missing else corpus_embeddings[:0]
        extra_row = {text: len(corpus_embeddings) + i for i, text in enumerate(missing)}
        rows = [row.get(text, extra_row.get(text)) for text in texts]
        positives = [[rows[i] for i in indices] for indices in positives]
        corpus_embeddings = np.concatenate([corpus_embeddings, extra])
    return np.array([(corpus_embeddings[rows] @ query).max() for query, rows in zip(query_embeddings, positives)])


def explain_drops(report, args):
    removed = ("its positives, the query and the candidates over --max_score / --max_positive_ratio"
               if args.max_score is not None or args.max_positive_ratio else "its positives and the query")
    reasons = {
        "too_few_candidates_in_range": f"fewer than {args.num_negatives} candidates at ranks [{args.range_start}, "
                                       f"{args.range_end}) after removing {removed}",
        "no_relevant_document_in_corpus": "none of its relevant documents is in the corpus",
    }
    for reason, count in sorted(report.dropped.items()):
        print(f"dropped {count} of {report.read} queries: {reasons[reason]} ({reason})")


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    import torch

    from modules.cli import DataError
    from modules.mining import build_index, embed_with_progress, ranked_candidates, sample_negative_ranks
    from modules.progress import StageProgress
    from modules.model import EmbeddingModel
    from modules.pair_tools import PairWriter, Report

    report = Report("mine_hard_negatives")
    records, corpus, positives = (read_beir_folder if args.beir else read_dataset)(args, report)
    if not records:
        raise DataError(f"{args.input}: no query with a positive to mine for")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbeddingModel.from_pretrained(args.model).to(device)

    def embed(texts, stage, max_length=args.passage_max_len):
        return embed_with_progress(model, model.tokenizer, texts, max_length, args.batch_size, stage)

    corpus_embeddings = embed(corpus.texts, "encoding the corpus")
    kind = args.index if args.index != "auto" else ("flat" if len(corpus.texts) < 1_000_000 else "ivf")
    index = build_index(corpus_embeddings, kind, args.nlist, args.nprobe)
    queries = embed([args.query_prefix + r["text"] for r in records], "encoding the queries", args.query_max_len)
    limits = np.full(len(records), np.inf if args.max_score is None else args.max_score)
    if args.max_positive_ratio:
        best = best_positive_scores(queries, records, corpus, corpus_embeddings, positives, embed)
        limits = np.minimum(limits, args.max_positive_ratio * best)

    # room for the positives and the query, which are skipped
    depth = min(len(corpus.texts), args.keep_candidates + max(len(r["text_pos"]) for r in records) + 1)
    reference = corpus_reference(args)
    rng = np.random.default_rng(args.seed)
    progress = StageProgress("searching", len(records), "queries")
    with PairWriter(args.output, [args.input, corpus.path]) as writer:
        for start in range(0, len(records), SEARCH_BLOCK):
            block_scores, block_positions = index.search(queries[start : start + SEARCH_BLOCK], depth)
            for i, (scores, positions) in enumerate(zip(block_scores, block_positions), start=start):
                record, within_limit = records[i], scores <= limits[i]
                candidates, candidate_scores = ranked_candidates(
                    scores[within_limit], positions[within_limit], corpus.texts, {record["text"], *record["text_pos"]},
                    args.keep_candidates)
                ranks = sample_negative_ranks(len(candidates), args.num_negatives, args.range_start, args.range_end, rng)
                if ranks is None:
                    report.drop("too_few_candidates_in_range")
                    continue
                candidate_scores = [round(score, 4) for score in candidate_scores]  # ample for S0; a third of the bytes
                mined = {**record, "text_neg": [corpus.texts[candidates[r]] for r in ranks], "corpus": reference,
                         "candidate_ids": [corpus.ids[position] for position in candidates],
                         "candidate_scores": candidate_scores, "neg_ranks": ranks,
                         "neg_scores": [candidate_scores[r] for r in ranks]}
                if args.corpus and args.corpus_column != "text":
                    mined["corpus_column"] = args.corpus_column
                if args.store_texts:
                    mined["candidates"] = [corpus.texts[position] for position in candidates]
                writer.write(mined)
                report.keep()
            progress.update(min(start + SEARCH_BLOCK, len(records)))
    explain_drops(report, args)
    return report.finish(args)


if __name__ == "__main__":
    run_cli(main)

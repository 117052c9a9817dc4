"""Turn a BEIR-layout retrieval folder into a retri_contrast training file: one record per judged query, and
optionally a dev task folder of held-out queries for --eval_dir and eval/run_cmteb.py --local-task.

    python tools/beir_to_retrieval.py ../shared/data/en-cranfield-retrieval --output runs/own/train.jsonl \
        --dev_queries 40 --min_grade 2
    python tools/beir_to_retrieval.py ../shared/data/en-cranfield-retrieval --output cranfield_train.jsonl \
        --exclude_queries data/demo/cranfield_dev/queries.jsonl --min_grade 2

Each record is {"text": query, "text_pos": [its documents judged >= --min_grade, best first]}; queries
listed in --exclude_queries (a queries.jsonl, e.g. a dev split's) are left out, so training and
scoring never share a query. --dev_queries N (or a fraction, e.g. 0.2) holds out that many judged queries, drawn
with --seed, and writes them as a task folder (--dev_dir, default <output stem>_dev beside the output): task.json
(type Retrieval, split "dev"), their queries.jsonl and qrels.tsv (every judgement > 0), and a copy of the corpus.
Hard negatives can be added afterwards with tools/mine_hard_negatives.py.
"""

import json
import random
import re
from pathlib import Path

from modules.cli import ArgumentParser, UsageError, run_cli
from modules.pair_tools import PairWriter


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("folder", help="corpus.jsonl, queries.jsonl, and qrels/<split>.tsv or qrels.tsv (modules/beir.py)")
    p.add_argument("--split", default=None, help="qrels/<split>.tsv of a folder with qrels/ (default: qrels.tsv)")
    p.add_argument("--output", required=True)
    p.add_argument("--exclude_queries", default=None, help="queries.jsonl whose ids are left out (a dev split)")
    p.add_argument("--min_grade", type=float, default=1.0, help="lowest relevance grade that counts as a positive")
    p.add_argument("--dev_queries", type=float, default=0,
                   help="hold out this many judged queries (or this fraction, below 1) as a dev task folder")
    p.add_argument("--dev_dir", type=Path, default=None, help="the dev task folder (default: <output stem>_dev)")
    p.add_argument("--dev_name", default=None, help="the dev task's name in task.json (default: from the folder's)")
    p.add_argument("--language", default="und", help="the dev task's language code in task.json, e.g. eng")
    p.add_argument("--seed", type=int, default=0, help="draws the held-out queries")
    args = p.parse_args(argv)
    if args.dev_queries < 0 or (args.dev_queries >= 1 and not args.dev_queries.is_integer()):
        p.error(f"--dev_queries must be a count or a fraction below 1, got {args.dev_queries:g}")
    if args.dev_dir and not args.dev_queries:
        p.error("--dev_dir needs --dev_queries")
    return args


def main(argv=None):
    args = parse_args(argv)
    from modules.beir import read_retrieval_split  # after parsing: --help answers at once
    from modules.corpus import passage_text
    from modules.records import iter_raw_records

    data = read_retrieval_split(args.folder, args.split, strict=False)
    qrels = {query_id: {doc: grade for doc, grade in judged.items() if grade > 0} for query_id, judged in
             data.qrels.items()}
    queries = {query_id: text for query_id, text in data.queries.items() if qrels[query_id]}
    corpus = {doc_id: passage_text(doc, "text", doc_id) for doc_id, doc in data.corpus.items()}  # training's join
    excluded = set()
    if args.exclude_queries:
        excluded = {str(query.get("_id", query.get("id"))) for _, query in iter_raw_records(args.exclude_queries)}
    positives = {query_id: sorted(((grade, doc) for doc, grade in qrels[query_id].items()
                                   if grade >= args.min_grade and corpus.get(doc, "").strip()), key=lambda g: -g[0])
                 for query_id in queries if query_id not in excluded}
    judged = [query_id for query_id, found in positives.items() if found]
    held_out = held_out_queries(judged, args.dev_queries, args.seed)
    dev_dir = args.dev_dir or Path(args.output).with_name(Path(args.output).name.split(".")[0] + "_dev")
    if held_out:
        check_dev_dir(dev_dir, [Path(args.folder), Path(args.output)])
    written = 0
    with PairWriter(args.output, [Path(args.folder) / "corpus.jsonl"]) as writer:
        for query_id in judged:
            if query_id not in held_out:
                writer.write({"text": queries[query_id], "text_pos": [corpus[doc] for _, doc in positives[query_id]]})
                written += 1
    print(f"{written} queries written to {args.output} ({len(excluded & set(queries))} excluded)")
    if held_out:
        name = args.dev_name or camel_case(Path(args.folder).resolve().name) + "Dev"
        write_dev_task(dev_dir, name, args, [q for q in judged if q in held_out], queries, qrels)
        print(f"{len(held_out)} queries held out as the dev task {name} in {dev_dir} (--eval_dir, --local-task)")


def held_out_queries(judged, count, seed):
    """The ids of ``count`` judged queries (a fraction of them when below 1), drawn with ``seed``."""
    if not count:
        return set()
    size = round(count * len(judged)) if count < 1 else int(count)
    if not 0 < size < len(judged):
        raise UsageError(f"--dev_queries {count:g}: {size} of {len(judged)} judged queries leaves no "
                         f"{'dev' if size <= 0 else 'training'} query")
    return set(random.Random(seed).sample(judged, size))


def check_dev_dir(dev_dir, inputs):
    """Refuse a dev folder that holds files already, or that is or holds an input (the BEIR folder, the output)."""
    dev_dir = Path(dev_dir).resolve()
    for path in inputs:
        path = path.resolve()
        if path == dev_dir or dev_dir in path.parents or path in dev_dir.parents:
            raise UsageError(f"--dev_dir {dev_dir} would overlap {path}: choose a folder of its own")
    if dev_dir.exists() and any(dev_dir.iterdir()):
        raise UsageError(f"--dev_dir {dev_dir} is not empty: choose a new folder (nothing is overwritten)")


def camel_case(name):
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name) if part)


def write_dev_task(dev_dir, name, args, query_ids, queries, qrels):
    """A local task folder (modules/task_folders.py): task.json, queries.jsonl, qrels.tsv and the corpus, less the
    documents with neither text nor title (which a task folder refuses) and their judgements."""
    from modules.records import iter_raw_records

    dev_dir.mkdir(parents=True, exist_ok=True)
    kept, empty = set(), 0
    with open(dev_dir / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for _, document in iter_raw_records(Path(args.folder) / "corpus.jsonl"):
            if not any(isinstance(document.get(key), str) and document[key].strip() for key in ("title", "text")):
                empty += 1
                continue
            kept.add(str(document.get("_id", document.get("id"))))
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    if empty:
        print(f"{empty} empty document(s) left out of {dev_dir / 'corpus.jsonl'}")
    with open(dev_dir / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id in query_ids:
            handle.write(json.dumps({"id": query_id, "text": queries[query_id]}, ensure_ascii=False) + "\n")
    with open(dev_dir / "qrels.tsv", "w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id in query_ids:
            handle.writelines(f"{query_id}\t{doc}\t{grade:g}\n" for doc, grade in qrels[query_id].items()
                              if doc in kept)
    task = {"name": name, "type": "Retrieval", "language": [args.language], "splits": ["dev"],
            "description": f"{len(query_ids)} queries of {Path(args.folder).resolve().name} held out of "
                           f"{Path(args.output).name} (tools/beir_to_retrieval.py --seed {args.seed})"}
    (dev_dir / "task.json").write_text(json.dumps(task, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)

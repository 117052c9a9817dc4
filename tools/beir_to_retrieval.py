"""Turn a BEIR-layout retrieval folder into a retri_contrast training file: one record per judged query.

    python tools/beir_to_retrieval.py ../shared/data/en-cranfield-retrieval --output cranfield_train.jsonl \
        --exclude_queries data/demo/cranfield_dev/queries.jsonl --min_grade 2

Each record is {"text": query, "text_pos": [its documents judged >= --min_grade, best first]}; queries
listed in --exclude_queries (a queries.jsonl, e.g. a dev split's) are left out, so training and
scoring never share a query. Hard negatives can be added afterwards with tools/mine_hard_negatives.py.
"""

from pathlib import Path

from modules.cli import ArgumentParser, run_cli
from modules.pair_tools import PairWriter


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("folder", help="corpus.jsonl, queries.jsonl, and qrels/<split>.tsv or qrels.tsv")
    p.add_argument("--split", default=None, help="qrels/<split>.tsv of a folder with qrels/ (default: qrels.tsv)")
    p.add_argument("--output", required=True)
    p.add_argument("--exclude_queries", default=None, help="queries.jsonl whose ids are left out (a dev split)")
    p.add_argument("--min_grade", type=float, default=1.0, help="lowest relevance grade that counts as a positive")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from modules.data import iter_raw_records  # after parsing: --help answers at once
    from modules.evaluation import read_retrieval_folder

    queries, corpus, qrels = read_retrieval_folder(args.folder, args.split)
    excluded = set()
    if args.exclude_queries:
        excluded = {str(query.get("_id", query.get("id"))) for _, query in iter_raw_records(args.exclude_queries)}
    written = 0
    with PairWriter(args.output, [Path(args.folder) / "corpus.jsonl"]) as writer:
        for query_id, text in queries.items():
            judged = sorted(((grade, doc) for doc, grade in qrels[query_id].items()
                             if grade >= args.min_grade and corpus.get(doc, "").strip()), key=lambda g: -g[0])
            if query_id in excluded or not judged:
                continue
            writer.write({"text": text, "text_pos": [corpus[doc] for _, doc in judged]})
            written += 1
    print(f"{written} queries written to {args.output} ({len(excluded & set(queries))} excluded)")


if __name__ == "__main__":
    run_cli(main)

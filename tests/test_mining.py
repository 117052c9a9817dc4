"""Hard-negative mining: faiss mining against a brute-force ranking, the DHNM rule on a constructed case, resume."""

import json
import sys

import pytest
import torch
from transformers import BatchEncoding

from modules.data import TaskDataset
from modules.evaluation import embed_texts
from modules.mining import MiningState, dhnm_check, needs_replacement
from modules.model import EmbeddingModel
from tests.conftest import SENTENCES, assert_same_final_weights, run_script, write_jsonl
from tools import mine_hard_negatives

QUERIES = SENTENCES[:6]


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    records = [{"text": q, "text_pos": [q + " today", "yes, " + q]} for q in QUERIES]
    write_jsonl(root / "train.jsonl", records)
    corpus = [s + suffix for s in SENTENCES for suffix in ("", " today", " again", " at night")] + ["yes, " + q for q in QUERIES]
    write_jsonl(root / "corpus.jsonl", [{"text": t} for t in corpus])
    return root, corpus


def mine(tiny_bert, root, output, *extra):
    mine_hard_negatives.main([str(root / "train.jsonl"), "--model", str(tiny_bert), "--corpus", str(root / "corpus.jsonl"),
                              "--output", str(output), "--num_negatives", "4", "--range_start", "3", "--range_end", "12",
                              "--keep_candidates", "15", "--query_max_len", "32", "--passage_max_len", "32", *extra])
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_mining_matches_a_brute_force_ranking(tiny_bert, retrieval_data, tmp_path):
    root, corpus = retrieval_data
    mined = mine(tiny_bert, root, tmp_path / "flat.jsonl")
    model = EmbeddingModel.from_pretrained(tiny_bert)
    corpus_embeddings = embed_texts(model, model.tokenizer, corpus, 32)
    assert len(mined) == len(QUERIES)
    for record in mined:
        scores = corpus_embeddings @ embed_texts(model, model.tokenizer, [record["text"]], 32)[0]
        excluded = set(record["text_pos"]) | {record["text"]}
        expected = [corpus[i] for i in scores.argsort(descending=True).tolist() if corpus[i] not in excluded][:15]
        assert record["candidates"] == expected  # positives and the query skipped, order by cosine
        assert record["candidate_scores"] == sorted(record["candidate_scores"], reverse=True)
        assert len(set(record["neg_ranks"])) == 4 and all(3 <= r < 12 for r in record["neg_ranks"])
        assert record["text_neg"] == [record["candidates"][r] for r in record["neg_ranks"]]
        assert record["neg_scores"] == [record["candidate_scores"][r] for r in record["neg_ranks"]]


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_same_lists_on_a_small_corpus(tiny_bert, retrieval_data, tmp_path, index):
    root, _ = retrieval_data
    exact = mine(tiny_bert, root, tmp_path / "flat.jsonl")
    approximate = mine(tiny_bert, root, tmp_path / f"{index}.jsonl", "--index", index, "--nlist", "4", "--nprobe", "4")
    assert [r["candidates"] for r in approximate] == [r["candidates"] for r in exact]


def test_max_score_drops_likely_false_negatives(tiny_bert, retrieval_data, tmp_path):
    root, _ = retrieval_data
    unfiltered = mine(tiny_bert, root, tmp_path / "all.jsonl")
    cap = sorted(s for r in unfiltered for s in r["candidate_scores"])[-30]
    filtered = mine(tiny_bert, root, tmp_path / "capped.jsonl", "--max_score", str(cap), "--range_start", "0")
    assert all(s <= cap for r in filtered for s in r["candidate_scores"])
    assert any(r["candidates"][0] != u["candidates"][0] for r, u in zip(filtered, unfiltered))


class LookupModel(torch.nn.Module):
    """Embeds text id k as row k of a fixed table (a constructed case with known cosines)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask):
        return self.table[input_ids[:, 0]]


class LookupTokenizer:
    def __init__(self, texts):
        self.ids = {text: i for i, text in enumerate(texts)}

    def __call__(self, texts, **_):
        ids = torch.tensor([[self.ids[t]] for t in texts])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_dhnm_replaces_exactly_the_examples_that_meet_the_rule():
    """Query = e1; a text at cosine c is (c, sqrt(1-c^2)). Each record's current negatives score S."""
    n, skip = 2, 10
    cases = {  # name: (S0, current score S, replacements so far, expected window or None)
        "easy": (0.6, 0.4, 0, [10, 11]),            # 1.15*0.4 = 0.46 < 0.6 and |0.4| < 0.8
        "still_hard": (0.5, 0.45, 0, None),         # 1.15*0.45 = 0.5175 >= 0.5
        "too_similar": (0.99, 0.85, 0, None),       # ratio holds but |0.85| >= 0.8
        "third_time": (0.6, 0.3, 2, [14, 15]),      # i = 3: [(3-1)*2+10, 3*2+10)
        "exhausted": (0.6, 0.2, 9, None),           # i = 10: [28, 30) is past the 20 candidates
        "negative": (0.1, -0.5, 0, [10, 11]),       # 1.15*-0.5 < 0.1 and |-0.5| < 0.8
    }
    texts, rows, records = ["query"], [torch.tensor([1.0, 0.0])], []
    for name, (s0, score, _, _) in cases.items():
        candidates = [f"{name} candidate {k}" for k in range(20)]
        for k, text in enumerate(candidates):  # candidate k scores score (current ones) or 0.7 - k/100
            cosine = score if k < n else 0.7 - k / 100
            texts.append(text)
            rows.append(torch.tensor([cosine, (1 - cosine**2) ** 0.5]))
        records.append({"text": "query", "text_pos": ["p"], "candidates": candidates, "neg_ranks": list(range(n)),
                        "neg_scores": [s0] * n, "text_neg": candidates[:n]})
    state = MiningState([TaskDataset("mined", "retri_contrast", records)])
    state.replacements[0] = torch.tensor([c[2] for c in cases.values()])
    model, tokenizer = LookupModel(torch.stack(rows)), LookupTokenizer(texts)

    assert needs_replacement(torch.tensor([0.4, 0.45]), torch.tensor([0.6, 0.5])).tolist() == [True, False]
    updates = dhnm_check(model, tokenizer, state, 0, list(range(len(cases))), {"query": 8, "passage": 8}, skip=skip)
    expected = {i: window for i, (_, _, _, window) in enumerate(cases.values()) if window}
    assert {index: ranks for index, ranks, _ in updates} == expected
    for index, ranks, new_score in updates:
        assert new_score == pytest.approx(sum(0.7 - k / 100 for k in ranks) / n, abs=1e-6)
        state.replace(0, index, ranks, new_score)
        assert records[index]["text_neg"] == [records[index]["candidates"][k] for k in ranks]
    assert state.replacements[0].tolist() == [1, 0, 0, 3, 9, 1]

    saved = {key: {d: t.clone() for d, t in value.items()} for key, value in state.state_dict().items()}
    for record in records:
        record["text_neg"] = record["candidates"][:n]
    state.load_state_dict(saved)  # what resuming does: negatives rebuilt from the saved ranks
    assert records[0]["text_neg"] == ["easy candidate 10", "easy candidate 11"]


def test_resume_keeps_the_mining_state(tiny_bert, retrieval_data, tmp_path):
    root, _ = retrieval_data
    mine(tiny_bert, root, root / "mined.jsonl", "--num_negatives", "2", "--range_start", "2", "--range_end", "6")
    (tmp_path / "meta.txt").write_text(f"{root / 'mined.jsonl'} 3 type=retri_contrast\n")

    def run(output, *extra):
        return run_script([sys.executable, "train_finetune.py", "--model_name_or_path", str(tiny_bert), "--meta_list",
                           str(tmp_path / "meta.txt"), "--output_dir", str(output), "--retri_batch_size", "3",
                           "--retri_negatives", "2", "--query_max_len", "16", "--passage_max_len", "16", "--lr", "1e-3",
                           "--warmup_ratio", "0", "--max_steps", "6", "--save_every", "3", "--seed", "2", "--dhnm",
                           "--dhnm_interval", "1", "--dhnm_ratio", "1.0", "--dhnm_max_abs", "1.01", "--dhnm_skip", "2",
                           *extra])

    run(tmp_path / "full")
    summary = json.loads((tmp_path / "full" / "train_summary.json").read_text())
    assert summary["dhnm"]["checks"] == 6 and summary["dhnm"]["replaced"] > 0
    run(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))
    full, resumed = (torch.load(tmp_path / run_dir / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
                     for run_dir in ("full", "resumed"))
    assert full["replacements"][0].sum() > 0
    for key in ("ranks", "initial_scores", "replacements"):
        assert torch.equal(full[key][0], resumed[key][0])
    assert_same_final_weights(tmp_path / "full", tmp_path / "resumed")
    before = torch.load(tmp_path / "full" / "checkpoint-3" / "custom_checkpoint_0.pkl", weights_only=False)
    assert not torch.equal(before["replacements"][0], full["replacements"][0])  # the state did change after step 3


def test_dhnm_rule_for_scores_at_or_below_zero():
    """ratio * S < S0 reads "S fell below S0 / ratio"; for S0 <= 0 the same fall is S < S0 - (1 - 1/ratio)|S0|,
    so a negative that got harder (S rose towards 0) is never taken for an easy one."""
    initial = torch.tensor([0.6, 0.6, -0.1, -0.1, -0.1, 0.0, 0.0])
    score = torch.tensor([0.55, 0.4, -0.09, -0.11, -0.2, 0.01, -0.01])
    assert needs_replacement(score, initial).tolist() == [False, True, False, False, True, False, True]

"""Hard-negative mining: faiss mining against a brute-force ranking, BEIR input, corpus ids read back in training,
the DHNM rule on a constructed case, resume."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BatchEncoding

from modules.cli import DataError
from modules.corpus import read_corpus
from modules.data import load_meta_list
from modules.evaluation import embed_texts
from modules.mining import MiningState, dhnm_check, needs_replacement
from modules.model import EmbeddingModel
from modules.records import iter_raw_records
from modules.task_datasets import TaskDataset
from tests.conftest import REPO, SENTENCES, assert_same_final_weights, run_script, write_jsonl
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
    return read_jsonl(output)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def candidate_texts(mined_file, record):
    """The texts of a mined record's candidate ids, read from the corpus file the record names."""
    corpus = read_corpus(Path(mined_file).parent / record["corpus"], record.get("corpus_column", "text"))
    return [corpus.texts[corpus.positions[i]] for i in record["candidate_ids"]]


def test_mining_matches_a_brute_force_ranking(tiny_bert, retrieval_data, tmp_path):
    root, corpus = retrieval_data
    mined = mine(tiny_bert, root, tmp_path / "flat.jsonl")
    model = EmbeddingModel.from_pretrained(tiny_bert)
    corpus_embeddings = embed_texts(model, model.tokenizer, corpus, 32)
    assert len(mined) == len(QUERIES)
    for record in mined:
        scores = corpus_embeddings @ embed_texts(model, model.tokenizer, [record["text"]], 32)[0]
        excluded = set(record["text_pos"]) | {record["text"]}
        expected = [i for i in scores.argsort(descending=True).tolist() if corpus[i] not in excluded][:15]
        assert record["candidate_ids"] == expected  # line positions in the corpus; positives and the query skipped
        assert "candidates" not in record  # texts only with --store_texts
        assert record["candidate_scores"] == sorted(record["candidate_scores"], reverse=True)
        assert len(set(record["neg_ranks"])) == 4 and all(3 <= r < 12 for r in record["neg_ranks"])
        texts = candidate_texts(tmp_path / "flat.jsonl", record)
        assert record["text_neg"] == [texts[r] for r in record["neg_ranks"]]
        assert record["neg_scores"] == [record["candidate_scores"][r] for r in record["neg_ranks"]]


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_same_lists_on_a_small_corpus(tiny_bert, retrieval_data, tmp_path, index):
    root, _ = retrieval_data
    exact = mine(tiny_bert, root, tmp_path / "flat.jsonl")
    approximate = mine(tiny_bert, root, tmp_path / f"{index}.jsonl", "--index", index, "--nlist", "4", "--nprobe", "4")
    assert [r["candidate_ids"] for r in approximate] == [r["candidate_ids"] for r in exact]


def test_max_score_drops_likely_false_negatives(tiny_bert, retrieval_data, tmp_path):
    root, _ = retrieval_data
    unfiltered = mine(tiny_bert, root, tmp_path / "all.jsonl")
    cap = sorted(s for r in unfiltered for s in r["candidate_scores"])[-30]
    filtered = mine(tiny_bert, root, tmp_path / "capped.jsonl", "--max_score", str(cap), "--range_start", "0")
    assert all(s <= cap for r in filtered for s in r["candidate_scores"])
    assert any(r["candidate_ids"][0] != u["candidate_ids"][0] for r, u in zip(filtered, unfiltered))


def test_max_positive_ratio_compares_with_the_best_positive(tiny_bert, retrieval_data, tmp_path):
    """The first positive is unrelated to its query (scores low): the cap must follow the best positive."""
    root, _ = retrieval_data
    write_jsonl(tmp_path / "train.jsonl", [{"text": q, "text_pos": ["0931 zx qv 77 kj", q + " today"]} for q in QUERIES])
    (tmp_path / "corpus.jsonl").write_text((root / "corpus.jsonl").read_text())
    ratio, above_first = 1.0, 0
    unfiltered = mine(tiny_bert, tmp_path, tmp_path / "all.jsonl", "--range_start", "0")
    filtered = mine(tiny_bert, tmp_path, tmp_path / "capped.jsonl", "--range_start", "0", "--max_positive_ratio", str(ratio))
    model = EmbeddingModel.from_pretrained(tiny_bert)
    for record, before in zip(filtered, unfiltered, strict=True):
        query = embed_texts(model, model.tokenizer, [record["text"]], 32)[0]
        positive_scores = (embed_texts(model, model.tokenizer, record["text_pos"], 32) @ query).tolist()
        first, best = positive_scores[0], max(positive_scores)
        kept, below_cap = record["candidate_scores"], [s for s in before["candidate_scores"] if s <= ratio * best]
        assert kept[: len(below_cap)] == below_cap and max(kept) <= ratio * best
        above_first += sum(s > ratio * first for s in kept)
    assert above_first > 0  # the constructed case: a cap from the first positive would have dropped these


def test_positives_in_the_corpus_are_not_encoded_again(tiny_bert, retrieval_data, tmp_path, monkeypatch):
    """--max_positive_ratio with a --corpus that holds every positive: their rows are reused, only texts the corpus
    lacks are encoded (before, every positive was encoded a second time)."""
    import modules.mining

    root, _ = retrieval_data
    encoded, real = {}, modules.mining.embed_with_progress
    monkeypatch.setattr(modules.mining, "embed_with_progress", lambda model, tokenizer, texts, *args: encoded.update(
        {args[-1]: list(texts)}) or real(model, tokenizer, texts, *args))
    mine(tiny_bert, root, tmp_path / "capped.jsonl", "--max_positive_ratio", "1.0")
    assert list(encoded) == ["encoding the corpus", "encoding the queries"]
    write_jsonl(tmp_path / "train.jsonl", [{"text": q, "text_pos": ["0931 zx qv 77 kj", q + " today"]} for q in QUERIES])
    (tmp_path / "corpus.jsonl").write_text((root / "corpus.jsonl").read_text())
    encoded.clear()
    mine(tiny_bert, tmp_path, tmp_path / "other.jsonl", "--max_positive_ratio", "1.0")
    assert encoded["encoding the positives not in the corpus"] == ["0931 zx qv 77 kj"]


def test_without_a_corpus_the_positives_become_one_beside_the_output(tiny_bert, retrieval_data, tmp_path):
    root, _ = retrieval_data
    output = tmp_path / "out" / "mined.jsonl.gz"
    mine_hard_negatives.main([str(root / "train.jsonl"), "--model", str(tiny_bert), "--output", str(output),
                              "--num_negatives", "2", "--range_start", "1", "--range_end", "4", "--keep_candidates", "8",
                              "--max_positive_ratio", "1.0"])
    positives = [text for line in (root / "train.jsonl").read_text().splitlines() for text in json.loads(line)["text_pos"]]
    assert read_jsonl(tmp_path / "out" / "mined.corpus.jsonl") == [{"text": text} for text in positives]
    mined = [raw for _, raw in iter_raw_records(output)]
    assert len(mined) == len(QUERIES) and {r["corpus"] for r in mined} == {"mined.corpus.jsonl"}
    (tmp_path / "meta.txt").write_text(f"{output} 1 type=retri_contrast\n")
    for raw, record in zip(mined, load_meta_list(tmp_path / "meta.txt")[0].records, strict=True):
        assert list(record["candidates"]) == [positives[i] for i in raw["candidate_ids"]]  # ids: positions in the file
        assert not {record["text"], *record["text_pos"]} & set(record["candidates"])


def test_the_corpus_reference_goes_through_the_paths_given(tiny_bert, retrieval_data, tmp_path):
    """A run folder reaching its data through a symlink: the reference names the link, not its target, so the run
    still finds its corpus when moved to a cluster whose copy of the data sits elsewhere (the link re-made)."""
    root, corpus = retrieval_data
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(root, target_is_directory=True)
    mined = mine(tiny_bert, run / "data", run / "mined.jsonl")
    assert {r["corpus"] for r in mined} == {"data/corpus.jsonl"}

    cluster = tmp_path / "cluster"
    shutil.copytree(root, cluster / "store" / "data")
    (run / "data").unlink()
    moved = cluster / "home" / "run"
    moved.parent.mkdir(parents=True)
    run.rename(moved)
    (moved / "data").symlink_to(cluster / "store" / "data", target_is_directory=True)
    (moved / "meta.txt").write_text("mined.jsonl 1 type=retri_contrast\n")
    for raw, record in zip(mined, load_meta_list(moved / "meta.txt")[0].records, strict=True):
        assert list(record["candidates"]) == [corpus[i] for i in raw["candidate_ids"]]  # ids: lines of the corpus


def test_dropped_queries_are_counted_with_the_reason(tiny_bert, retrieval_data, tmp_path, capsys):
    root, _ = retrieval_data
    mined = mine(tiny_bert, root, tmp_path / "none.jsonl", "--max_score", "-1")
    out = capsys.readouterr().out
    assert mined == []
    assert "dropped 6 of 6 queries: fewer than 4 candidates at ranks [3, 12)" in out
    report = json.loads((tmp_path / "none.jsonl.report.json").read_text())
    assert report["dropped"] == {"too_few_candidates_in_range": 6}


# --------------------------------------------------------------------------- BEIR input, corpus ids


FILLER = " ".join(SENTENCES)  # real passages run to hundreds of characters


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    """A BEIR folder: q1 has two relevant documents (grades 1, 2) and one judged 0; q4 is judged in test only;
    q5's only relevant document is missing from the corpus."""
    root = tmp_path_factory.mktemp("beir")
    documents = [{"_id": f"d{i}", "title": s.split()[-1], "text": f"{s}{suffix}. {FILLER}"}
                 for i, (s, suffix) in enumerate((s, suffix) for suffix in ("", " again") for s in SENTENCES)]
    write_jsonl(root / "corpus.jsonl", documents)
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{k}", "text": SENTENCES[k] + "?"} for k in range(1, 6)])
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq1\td16\t2\nq1\td5\t0\n"
                                              "q2\td1\t1\nq3\td2\t1\nq5\tgone\t1\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td3\t1\n")
    return root, {d["_id"]: f"{d['title']} {d['text']}" for d in documents}


def mine_beir(tiny_bert, folder, output, *extra):
    mine_hard_negatives.main([str(folder), "--model", str(tiny_bert), "--output", str(output), "--num_negatives", "2",
                              "--range_start", "3", "--range_end", "12", "--keep_candidates", "28",
                              "--query_max_len", "32", "--passage_max_len", "32", *extra])
    return read_jsonl(output)


def test_mining_reads_a_beir_folder_and_writes_corpus_ids(tiny_bert, beir_folder, tmp_path, capsys):
    folder, documents = beir_folder
    mined = mine_beir(tiny_bert, folder, tmp_path / "out" / "mined.jsonl")
    out = capsys.readouterr().out
    assert [r["text"] for r in mined] == [SENTENCES[k] + "?" for k in (1, 2, 3)]  # train split; q5 has no positive
    relevant = {1: ["d16", "d0"], 2: ["d1"], 3: ["d2"]}  # best grade first
    for k, record in zip((1, 2, 3), mined):
        assert record["text_pos"] == [documents[d] for d in relevant[k]]  # title + text, every score > 0
        assert not set(relevant[k]) & set(record["candidate_ids"])
        assert (tmp_path / "out" / record["corpus"]).resolve() == (folder / "corpus.jsonl").resolve()
        texts = [documents[d] for d in record["candidate_ids"]]
        assert record["text_neg"] == [texts[r] for r in record["neg_ranks"]]
        assert candidate_texts(tmp_path / "out" / "mined.jsonl", record) == texts
    assert "dropped 1 of 4 queries: none of its relevant documents is in the corpus" in out
    for stage in ("encoding the corpus", "encoding the queries", "indexing", "searching"):
        assert any(line.startswith(stage) and "100%" in line for line in out.splitlines()), stage

    with_texts = mine_beir(tiny_bert, folder, tmp_path / "texts.jsonl", "--store_texts")
    assert [r["candidates"] for r in with_texts] == [[documents[d] for d in r["candidate_ids"]] for r in mined]
    assert 4 * (tmp_path / "out" / "mined.jsonl").stat().st_size < (tmp_path / "texts.jsonl").stat().st_size


def test_mined_ids_read_their_texts_from_the_corpus_once(tmp_path):
    """Training reads candidate texts by id from the corpus a record names; a DHNM replacement and a resume
    put the right corpus texts into text_neg. Files with the full texts (``candidates``) still load."""
    write_jsonl(tmp_path / "beir" / "corpus.jsonl", [{"_id": f"p{i}", "text": f"passage {i}"} for i in range(8)])
    ids = [f"p{i}" for i in (7, 6, 5, 4, 3, 2, 1)]
    mined = {"text": "q", "text_pos": ["passage 0"], "text_neg": ["written"] * 2, "corpus": "beir/corpus.jsonl",
             "candidate_ids": ids, "candidate_scores": [0.9 - k / 10 for k in range(7)], "neg_ranks": [0, 1],
             "neg_scores": [0.9, 0.8]}
    with_texts = {**{k: v for k, v in mined.items() if k not in ("corpus", "candidate_ids")},
                  "candidates": [f"passage {i[1]}" for i in ids]}
    write_jsonl(tmp_path / "mined.jsonl", [mined, {**mined, "text": "q2"}, with_texts])
    (tmp_path / "meta.txt").write_text("mined.jsonl 1 type=retri_contrast\n")
    datasets = load_meta_list(tmp_path / "meta.txt", negatives_per_kind={"retri_contrast": 2})
    records = datasets[0].records
    assert [r["text_neg"] for r in records] == [["passage 7", "passage 6"]] * 3
    assert records[0]["candidates"].texts is records[1]["candidates"].texts  # one read of the corpus

    state = MiningState.for_datasets(datasets, 2, "meta.txt")
    for index in range(3):
        state.replace(0, index, [4, 5], 0.3)
    assert [r["text_neg"] for r in records] == [["passage 3", "passage 2"]] * 3
    saved = {key: {d: t.clone() for d, t in value.items()} for key, value in state.state_dict().items()}
    for record in records:
        record["text_neg"] = []
    state.load_state_dict(saved)
    assert [r["text_neg"] for r in records] == [["passage 3", "passage 2"]] * 3


@pytest.mark.parametrize("change, message", [
    ({"corpus": "beir/missing.jsonl"}, r"mined.jsonl:2: corpus .*beir/missing.jsonl does not exist"),
    ({"candidate_ids": ["p1", "nope"]}, r"mined.jsonl:2: candidate id 'nope' is not in the corpus .*beir/corpus.jsonl"),
])
def test_bad_corpus_references_name_file_and_line(tmp_path, change, message):
    write_jsonl(tmp_path / "beir" / "corpus.jsonl", [{"_id": f"p{i}", "text": f"passage {i}"} for i in range(3)])
    good = {"text": "q", "text_pos": ["passage 0"], "corpus": "beir/corpus.jsonl", "candidate_ids": ["p1", "p2"],
            "candidate_scores": [0.5, 0.4], "neg_ranks": [1], "neg_scores": [0.4]}
    write_jsonl(tmp_path / "mined.jsonl", [good, {**good, **change}])
    (tmp_path / "meta.txt").write_text("mined.jsonl 1 type=retri_contrast\n")
    with pytest.raises(DataError, match=message):
        load_meta_list(tmp_path / "meta.txt")


@pytest.mark.parametrize("corpus, message", [
    (None, r"missing.jsonl does not exist"),
    ('{"text": "a passage"}\n{"title": "no text"}\n', r"corpus.jsonl:2: column 'text' must be a string"),
])
def test_the_tool_reports_a_bad_corpus_in_one_line(tiny_bert, retrieval_data, tmp_path, corpus, message):
    root, _ = retrieval_data
    corpus_file = tmp_path / ("missing.jsonl" if corpus is None else "corpus.jsonl")
    if corpus is not None:
        corpus_file.write_text(corpus)
    result = subprocess.run([sys.executable, "tools/mine_hard_negatives.py", str(root / "train.jsonl"), "--model",
                             str(tiny_bert), "--corpus", str(corpus_file), "--output", str(tmp_path / "out.jsonl")],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom tools import mine_hard_negatives\ntry:\n    mine_hard_negatives.parse_args(['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted({'torch', 'numpy', 'faiss'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert "--store_texts" in result.stdout and result.stdout.strip().endswith("[]")


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
    full, resumed = (load_file(tmp_path / run_dir / "checkpoint-6" / "dhnm_state.safetensors")
                     for run_dir in ("full", "resumed"))
    assert full["replacements.0"].sum() > 0
    for key in ("ranks.0", "initial_scores.0", "replacements.0"):
        assert torch.equal(full[key], resumed[key])
    assert_same_final_weights(tmp_path / "full", tmp_path / "resumed")
    before = load_file(tmp_path / "full" / "checkpoint-3" / "dhnm_state.safetensors")
    assert not torch.equal(before["replacements.0"], full["replacements.0"])  # the state did change after step 3
    assert not list((tmp_path / "full").glob("checkpoint-*/*custom_checkpoint*")), "a pickle of ours was saved"


def test_a_resume_keeps_the_retrieval_batch_dhnm_checks_and_what_the_run_recorded(tiny_bert, tiny_data, retrieval_data,
                                                                                   tmp_path):
    """Without --cbb a step may train another kind: DHNM then checks the last retrieval batch, which may lie before the
    checkpoint a run resumes from. Resumed there == never stopped: the same DHNM checks and state, the evaluation
    history from step 0, and the speed totals (the first step after a resume pays its warm-up again, untimed)."""
    import train_finetune
    from modules.samplers import build_sampler

    root, _ = retrieval_data
    mine(tiny_bert, root, tmp_path / "mined.jsonl", "--num_negatives", "2", "--range_start", "2", "--range_end", "6")
    (tmp_path / "meta.txt").write_text(f"mined.jsonl 1 type=retri_contrast\n{tiny_data / 'sts.jsonl'} 1 type=cosent\n")
    datasets = load_meta_list(tmp_path / "meta.txt", negatives_per_kind={"retri_contrast": 2})
    sampler = build_sampler(datasets, [3, 4], seed=2)
    kinds = [datasets[d].kind for epoch in (0, 1) for d, _, _ in sampler.local_batches(epoch)]
    # step k (> 1: a timed step before the checkpoint) trains a retrieval batch, and step k + 1, the one DHNM checks
    # at, a CoSENT batch
    k = next(i + 1 for i in range(1, len(kinds) - 1) if kinds[i:i + 2] == ["retri_contrast", "cosent"])

    def run(output, *extra):
        train_finetune.main([
            "--model_name_or_path", str(tiny_bert), "--meta_list", str(tmp_path / "meta.txt"), "--output_dir",
            str(output), "--retri_batch_size", "3", "--cosent_batch_size", "4", "--retri_negatives", "2",
            "--query_max_len", "16", "--passage_max_len", "16", "--pair_max_len", "16", "--lr", "1e-3", "--seed", "2",
            "--max_steps", str(k + 1), "--save_every", str(k), "--dhnm", "--dhnm_interval", str(k + 1), "--dhnm_ratio",
            "1.0", "--dhnm_max_abs", "1.01", "--dhnm_skip", "2", "--eval_sts_file", str(tiny_data / "sts.jsonl"),
            "--report_to", "none", "--num_workers", "0", *extra])
        return (json.loads((output / name).read_text()) for name in ("train_summary.json", "eval_results.json"))

    full, full_scores = run(tmp_path / "full")
    resumed, resumed_scores = run(tmp_path / "resumed", "--resume_from_checkpoint",
                                  str(tmp_path / "full" / f"checkpoint-{k}"))
    assert full["dhnm"]["checks"] == 1 and full["dhnm"]["replaced"] > 0
    assert {key: resumed["dhnm"][key] for key in ("checks", "checked", "replaced")} == \
        {key: full["dhnm"][key] for key in ("checks", "checked", "replaced")}
    assert resumed_scores["metrics_by_step"] == full_scores["metrics_by_step"]
    assert sorted(map(int, resumed_scores["metrics_by_step"])) == [0, k + 1]
    assert resumed["timed_steps"] == full["timed_steps"] - 1 and resumed["pairs"] > 0
    assert_same_final_weights(tmp_path / "full", tmp_path / "resumed")


def test_dhnm_rule_for_scores_at_or_below_zero():
    """ratio * S < S0 reads "S fell below S0 / ratio"; for S0 <= 0 the same fall is S < S0 - (1 - 1/ratio)|S0|,
    so a negative that got harder (S rose towards 0) is never taken for an easy one."""
    initial = torch.tensor([0.6, 0.6, -0.1, -0.1, -0.1, 0.0, 0.0])
    score = torch.tensor([0.55, 0.4, -0.09, -0.11, -0.2, 0.01, -0.01])
    assert needs_replacement(score, initial).tolist() == [False, True, False, False, True, False, True]

"""Streaming pair sources: ranks split the data, resume is exact, weights hold, no duplicate text in a batch."""

import gzip
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from modules.data import DataError
from modules.streaming import (
    PairSource, PretrainBatches, SourceStream, choose_source, read_pretrain_meta_list, take_unique_pairs,
)
from tests.conftest import minilm_path, write_jsonl


def pair_records(n, prefix="q"):
    return [{"text": f"{prefix} {i}", "text_pos": f"{prefix} answer {i} " + "x" * (i % 7)} for i in range(n)]


def one_epoch(stream):
    """Every pair a rank gets before its stream wraps to epoch 1."""
    pairs = []
    while True:
        pair = stream.next_pair()
        if stream.epoch == 1:
            return pairs
        pairs.append(pair)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "a.jsonl", pair_records(300, "a"))
    with gzip.open(root / "b.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in pair_records(50, "b"))
    pq.write_table(pa.Table.from_pylist(pair_records(90, "c")), root / "c.parquet", row_group_size=20)
    return root


@pytest.mark.parametrize("name,count", [("a.jsonl", 300), ("b.jsonl.gz", 50), ("c.parquet", 90)])
def test_ranks_split_an_epoch_exactly(corpus, name, count):
    """JSONL byte blocks, one gz file (fewer blocks than ranks) and parquet row groups: each record once."""
    source = PairSource(name, [corpus / name], 1.0)
    expected = {(r["text"], r["text_pos"]) for r in pair_records(count, name[0])}
    for world_size in (1, 3):
        parts = [one_epoch(SourceStream(source, 0, 7, rank, world_size, chunk_size=16, block_bytes=1000))
                 for rank in range(world_size)]
        together = [pair for part in parts for pair in part]
        assert len(together) == count and set(together) == expected
        assert all(part for part in parts)


def test_shuffles_and_reshuffles_each_epoch(corpus):
    stream = SourceStream(PairSource("a", [corpus / "a.jsonl"], 1.0), 0, 7, 0, 1, chunk_size=64, block_bytes=2000)
    tagged = [(stream.next_pair(), stream.epoch) for _ in range(600)]  # the epoch a pair came from
    first, second = ([pair for pair, epoch in tagged if epoch == e] for e in (0, 1))
    in_file_order = [(r["text"], r["text_pos"]) for r in pair_records(300, "a")]
    assert first != in_file_order and second != first and sorted(first) == sorted(second)


def stream_batches(sources, tokenizer, state=None, count=30, rank=0, world_size=1):
    batches = PretrainBatches(sources, 8, tokenizer, {"query": 16, "passage": 16}, seed=3, rank=rank,
                              world_size=world_size, chunk_size=10, block_bytes=700, state=state)
    iterator = iter(batches)
    return [next(iterator) for _ in range(count)]


def test_resume_gives_exactly_the_batches_of_the_uninterrupted_run(corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    duplicated = pair_records(40, "d") + pair_records(40, "d")[::3]  # held-back records cross the cut too
    write_jsonl(tmp_path / "dup.jsonl", duplicated)
    sources = [PairSource("a", [corpus / "a.jsonl"], 2.0), PairSource("b", [corpus / "b.jsonl.gz"], 1.0),
               PairSource("c", [corpus / "c.parquet"], 1.0), PairSource("d", [tmp_path / "dup.jsonl"], 1.0)]
    for world_size in (1, 2):
        full = stream_batches(sources, tokenizer, count=40, rank=1 % world_size, world_size=world_size)
        for cut in (7, 23):  # 23: past several source epochs
            state = json.loads(json.dumps(full[cut - 1]["loader_state"]))  # as a checkpoint stores it
            resumed = stream_batches(sources, tokenizer, state, count=40 - cut, rank=1 % world_size,
                                     world_size=world_size)
            for before, after in zip(full[cut:], resumed):
                assert before["source"] == after["source"]
                assert torch.equal(before["query"]["input_ids"], after["query"]["input_ids"])
                assert torch.equal(before["passage"]["input_ids"], after["passage"]["input_ids"])


def test_ranks_draw_the_same_source_every_step(corpus):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sources = [PairSource("a", [corpus / "a.jsonl"], 1.0), PairSource("c", [corpus / "c.parquet"], 1.0)]
    rank_0, rank_1 = (stream_batches(sources, tokenizer, rank=r, world_size=2) for r in (0, 1))
    assert [b["source"] for b in rank_0] == [b["source"] for b in rank_1]
    assert not torch.equal(rank_0[0]["query"]["input_ids"], rank_1[0]["query"]["input_ids"])


def test_weights_are_respected_over_many_draws():
    weights = [5.0, 3.0, 1.5, 0.5]
    draws = Counter(choose_source(11, step, weights) for step in range(40_000))
    for index, weight in enumerate(weights):
        p = weight / sum(weights)
        sigma = np.sqrt(40_000 * p * (1 - p))
        assert abs(draws[index] - 40_000 * p) < 4 * sigma


def test_no_text_twice_in_a_batch_and_nothing_lost(tmp_path):
    records = pair_records(30, "u")
    records += [{"text": r["text"], "text_pos": "other answer " + str(i)} for i, r in enumerate(records[:10])]
    records += [{"text": "new question " + str(i), "text_pos": r["text_pos"]} for i, r in enumerate(records[10:20])]
    records += [records[25]] * 4
    write_jsonl(tmp_path / "dups.jsonl", records)
    stream = SourceStream(PairSource("dups", [tmp_path / "dups.jsonl"], 1.0), 0, 5, 0, 1, 16, 1 << 20)
    delivered = []
    while len(delivered) < 3 * len(records):
        batch = take_unique_pairs(stream, 6)
        texts = [text for pair in batch for text in pair]
        assert len(texts) == len(set(texts)), batch
        delivered += batch
    # held back, never dropped: after ~3 epochs every record has come at least twice as often as it is in the file
    in_file, got = Counter((r["text"], r["text_pos"]) for r in records), Counter(delivered)
    assert all(got[pair] >= 2 * count for pair, count in in_file.items()) and set(got) == set(in_file)
    assert len(stream.held_back) < 6


def test_meta_list_and_record_errors_name_the_place(corpus, tmp_path):
    (tmp_path / "meta.txt").write_text(f"{corpus}/a.jsonl 2\n{corpus}/*.parquet 1 columns=text,text_pos\n{corpus} 0.5\n")
    sources = read_pretrain_meta_list(tmp_path / "meta.txt")
    assert [len(s.files) for s in sources] == [1, 1, 3] and sources[2].weight == 0.5
    for line, message in [(f"{corpus}/a.jsonl heavy", "weight must be a number"), (f"{corpus}/a.jsonl 0", "weight must be > 0"),
                          (f"{tmp_path}/none.jsonl 1", "no .jsonl/.jsonl.gz/.parquet files"),
                          (f"{corpus}/a.jsonl 1 cols=a,b", "unknown option")]:
        (tmp_path / "bad.txt").write_text("# header\n" + line + "\n")
        with pytest.raises(DataError, match=f"bad.txt:2: .*{message}"):
            read_pretrain_meta_list(tmp_path / "bad.txt")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.txt").write_text(f"{tmp_path}/empty.jsonl 1\n")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        read_pretrain_meta_list(tmp_path / "bad.txt")
    write_jsonl(tmp_path / "broken.jsonl", [{"text": "q", "text_pos": "p"}, {"text": "q2", "answer": "p2"}])
    stream = SourceStream(PairSource("broken", [tmp_path / "broken.jsonl"], 1.0, source="m.txt:1"), 0, 0, 0, 1, 4, 1 << 20)
    with pytest.raises(DataError, match=r"broken.jsonl at byte \d+: missing column 'text_pos'"):
        [stream.next_pair() for _ in range(2)]


def test_dataloader_workers_keep_the_batch_order(corpus):
    """Two workers, each tokenizing every other batch, give the in-process sequence (and its resume states)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sources = [PairSource("a", [corpus / "a.jsonl"], 1.0), PairSource("c", [corpus / "c.parquet"], 1.0)]
    in_process = stream_batches(sources, tokenizer, count=9)
    batches = PretrainBatches(sources, 8, tokenizer, {"query": 16, "passage": 16}, seed=3, chunk_size=10, block_bytes=700)
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    for expected in in_process:
        got = next(loader)
        assert torch.equal(got["query"]["input_ids"], expected["query"]["input_ids"])
        assert got["loader_state"] == expected["loader_state"]

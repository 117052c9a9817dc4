"""Streaming pair sources: ranks split the data, resume is exact, weights hold, no duplicate text in a batch."""

import gzip
import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from modules.cli import DataError
from modules.streaming import (
    PairSource, PretrainBatches, SourceStream, choose_source, read_pretrain_meta_list, take_unique_pairs,
)
from tests.conftest import minilm_path, write_jsonl
from tests.test_data import RecordingTokenizer


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


def stream_batches(sources, tokenizer, state=None, count=30, rank=0, world_size=1, **options):
    batches = PretrainBatches(sources, 8, tokenizer, {"query": 16, "passage": 16}, seed=3, rank=rank,
                              world_size=world_size, chunk_size=10, block_bytes=700, state=state, **options)
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
    for line, message in [(f"{corpus}/a.jsonl heavy", "weight must be a positive number, got 'heavy'"),
                          (f"{corpus}/a.jsonl 0", "weight must be a positive number, got 0.0"),
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
    with pytest.raises(DataError, match=r"broken.jsonl:2: missing column 'text_pos'"):  # the line, not a byte offset
        [stream.next_pair() for _ in range(2)]


@pytest.mark.parametrize("weight", ["inf", "nan", "-inf"])
def test_a_weight_that_is_not_finite_is_refused(corpus, tmp_path, weight):
    """An infinite weight made every draw's probabilities NaN ("Probabilities contain NaN") at step one."""
    (tmp_path / "meta.txt").write_text(f"{corpus}/a.jsonl 1\n{corpus}/c.parquet {weight}\n")
    with pytest.raises(DataError, match=rf"meta.txt:2: weight must be a positive number, got {weight}"):
        read_pretrain_meta_list(tmp_path / "meta.txt")


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


# ---------------------------------------------------------------- bad records, encodings, huge texts


def write_gzip(path, data: bytes):
    with gzip.open(path, "wb") as handle:
        handle.write(data)
    return path


def stream_of(path, skip_bad=False, block_bytes=200):
    """One rank's stream of one file, small blocks (a record's line is counted across blocks), 4-record chunks."""
    options = {"skip_bad": True} if skip_bad else {}  # (so the refusals also run on code without the flag)
    return SourceStream(PairSource("s", [path], 1.0, source="m.txt:1"), 0, 0, 0, 1, 4, block_bytes, **options)


def read_all(stream, count):
    return [stream.next_pair() for _ in range(count)]


BAD_PAIRS = [  # (raw line, the problem the refusal names); the first three also fit a parquet table of strings
    ('{"text": "q", "text_pos": ""}', "empty 'text_pos'"),
    ('{"text": " \\t\\n", "text_pos": "p"}', "empty 'text'"),
    ('{"text": "q", "text_pos": null}', "missing column 'text_pos'"),
    ('{"text": "q", "text_pos": ["  ", "second"]}', "empty 'text_pos'"),  # a list positive takes its first item
    ('{"text": "q", "text_pos": 3}', "column 'text_pos' must be a string"),
    ('{"text": "q", "text_pos": "p"', "invalid JSON"),
]


@pytest.mark.parametrize("suffix, bad_line, problem", [(suffix, *bad) for suffix in (".jsonl", ".jsonl.gz")
                                                        for bad in BAD_PAIRS]
                         + [(".parquet", *bad) for bad in BAD_PAIRS[:3]])
def test_a_bad_record_is_refused_naming_file_and_line(tmp_path, suffix, bad_line, problem):
    lines = [json.dumps(r) for r in pair_records(9)]
    lines.insert(6, bad_line)
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(lines) + "\n")
        where = r"pairs.jsonl:7"
    elif suffix == ".jsonl.gz":
        write_gzip(path, ("\n".join(lines) + "\n").encode())
        where = r"pairs.jsonl.gz:7"
    else:
        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines]), path, row_group_size=4)
        where = r"pairs.parquet row group 1 row 2"
    with pytest.raises(DataError, match=rf"{where}: {problem}"):
        read_all(stream_of(path), 10)


def test_skip_bad_records_skips_and_counts_them_and_resumes_exactly(tmp_path):
    from modules.streaming import skipped_record_lines

    good = pair_records(60, "g")
    lines = [json.dumps(r) for r in good]
    for position, (bad_line, _) in zip((3, 17, 18, 30, 44, 58), BAD_PAIRS):
        lines.insert(position, bad_line)
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    stream = stream_of(tmp_path / "mixed.jsonl", skip_bad=True)
    assert sorted(one_epoch(stream)) == sorted((r["text"], r["text_pos"]) for r in good)
    assert stream.skipped.count == len(BAD_PAIRS)
    source = PairSource("mixed", [tmp_path / "mixed.jsonl"], 1.0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    full = stream_batches([source], tokenizer, count=24, skip_bad=True)
    [line] = skipped_record_lines([source], full[-1]["loader_state"])
    count = re.fullmatch(rf"skipped (\d+) bad records of mixed \(first: {re.escape(str(tmp_path))}/mixed.jsonl:\d+: .+\)",
                         line).group(1)
    assert int(count) >= 3 * len(BAD_PAIRS)  # 24 batches of 8: over three passes through the 60 good records
    for cut in (5, 13):  # resumed in a chunk that skipped records, and later
        state = json.loads(json.dumps(full[cut - 1]["loader_state"]))
        resumed = stream_batches([source], tokenizer, state, count=24 - cut, skip_bad=True)
        for before, after in zip(full[cut:], resumed):
            assert torch.equal(before["query"]["input_ids"], after["query"]["input_ids"])
            assert before["loader_state"] == after["loader_state"]  # skip counts included


def test_a_source_of_only_bad_records_is_refused_when_skipping(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "", "text_pos": "p"}\n' * 5)
    with pytest.raises(DataError, match=r"m.txt:1: every record rank 0 reads is bad; skipped \d+ bad records of s "
                                        r"\(first: .*bad.jsonl:\d: empty 'text'\)"):
        stream_of(tmp_path / "bad.jsonl", skip_bad=True).next_pair()


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_text_that_is_not_utf8_is_refused_like_fine_tuning_does(tmp_path, suffix):
    """It was read with errors="replace" (.jsonl: garbled text trained on) or raised a bare UnicodeDecodeError (.gz)."""
    data = ('{"text": "q", "text_pos": "p"}\n' * 5 + '{"text": "café", "text_pos": "p"}\n').encode("latin-1")
    path = tmp_path / f"latin1{suffix}"
    write_gzip(path, data) if suffix.endswith(".gz") else path.write_bytes(data)
    with pytest.raises(DataError, match=rf"latin1{suffix}:6: not UTF-8 \(byte 0xe9 at column 14\)"):
        read_all(stream_of(path), 6)


def test_a_truncated_gzip_file_names_the_file_and_last_good_line(tmp_path):
    import zlib

    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in pair_records(3000)).encode())
    cut = whole[: len(whole) // 2]
    good_lines = zlib.decompressobj(31).decompress(cut).count(b"\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(cut)
    with pytest.raises(DataError, match=rf"cut.jsonl.gz: truncated or corrupt gzip file, unreadable after line "
                                        rf"{good_lines} \(Compressed file ended"):
        read_all(stream_of(tmp_path / "cut.jsonl.gz"), 3000)
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "q", "text_pos": "p"}\n')
    with pytest.raises(DataError, match=r"plain.jsonl.gz: truncated or corrupt gzip file, unreadable after line 0 "
                                        r"\(Not a gzipped file"):
        stream_of(tmp_path / "plain.jsonl.gz").next_pair()


def test_a_huge_text_is_cut_before_the_tokenizer_reads_it(tmp_path):
    """One 50 MB record cost 7.3 GB and 95 s: the tokenizer reads it all before truncating."""
    from modules.collator import MAX_CHARS_PER_TOKEN

    huge = " ".join(f"word{i % 97} déjà 東京" for i in range(100_000))  # ~1.6 MB
    write_jsonl(tmp_path / "huge.jsonl", [{"text": "question", "text_pos": huge}])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    recording = RecordingTokenizer(tokenizer)
    batch = next(iter(PretrainBatches([PairSource("huge", [tmp_path / "huge.jsonl"], 1.0)], 1, recording,
                                      {"query": 16, "passage": 32}, seed=0)))
    assert len(huge) > 1_000_000 and max(recording.lengths) == 32 * MAX_CHARS_PER_TOKEN
    expected = tokenizer([huge], truncation=True, max_length=32, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["passage"]["input_ids"], expected)


def test_a_bad_record_met_in_a_loader_worker_is_one_line(tmp_path):
    """A worker's exception reaches the training process wrapped in the worker's traceback; run_cli would print it."""
    from modules.streaming import checked_batch

    records = pair_records(12)
    records[5]["text_pos"] = ""
    write_jsonl(tmp_path / "pairs.jsonl", records)
    batches = PretrainBatches([PairSource("p", [tmp_path / "pairs.jsonl"], 1.0)], 4,
                              AutoTokenizer.from_pretrained(minilm_path()), {"query": 8, "passage": 8}, seed=0)
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    with pytest.raises(DataError) as refused:
        for _ in range(4):
            checked_batch(next(loader))
    assert str(refused.value) == f"{tmp_path / 'pairs.jsonl'}:6: empty 'text_pos'"


def pretrain_args(tiny_bert, meta, output_dir, *extra):
    return ["--model_name_or_path", str(tiny_bert), "--meta_list", str(meta), "--output_dir", str(output_dir),
            "--batch_size", "4", "--max_steps", "12", "--query_max_len", "16", "--passage_max_len", "16",
            "--report_to", "none", *extra]


def test_pretraining_refuses_a_bad_record_in_one_line_or_skips_it(tiny_bert, tmp_path, capsys):
    import subprocess
    import sys

    import train_pretrain
    from tests.conftest import REPO

    records = pair_records(40)
    records[6]["text_pos"] = "   "
    write_jsonl(tmp_path / "pairs.jsonl", records)
    (tmp_path / "meta.txt").write_text("pairs.jsonl 1\n")
    result = subprocess.run([sys.executable, "train_pretrain.py",  # two loader workers, the default
                             *pretrain_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "refused")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"train_pretrain.py: error: {tmp_path / 'pairs.jsonl'}:7: empty 'text_pos'")
    train_pretrain.main(pretrain_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "skipped", "--skip_bad_records"))
    assert re.search(rf"^skipped \d+ bad records? of pairs \(first: {re.escape(str(tmp_path))}/pairs.jsonl:7: "
                     r"empty 'text_pos'\)$", capsys.readouterr().out, re.MULTILINE)


# ---------------------------------------------------------------- texts with no visible character, lone surrogates


@pytest.mark.parametrize("suffix, bad_text, problem", [
    (".jsonl", "\u200b\u200c\u200d\u2060\ufeff", "empty 'text_pos': only invisible characters U+200B U+200C U+200D "
                                                   "U+2060 U+FEFF"),
    (".jsonl.gz", "\u00ad\u200b", "empty 'text_pos': only invisible characters U+00AD U+200B"),
    (".parquet", "\u2060 \u2060", "empty 'text_pos': only invisible characters U+2060 U+0020"),
    (".jsonl", "ok\ud800", "lone surrogate U+D800 in 'text_pos' at character 3: half of a UTF-16 pair, not text"),
    (".jsonl.gz", "\udbff", "lone surrogate U+DBFF in 'text_pos' at character 1: half of a UTF-16 pair, not text"),
], ids=["zero-width jsonl", "zero-width gz", "zero-width parquet", "surrogate jsonl", "surrogate gz"])
def test_a_pair_without_visible_text_or_with_a_lone_surrogate_is_refused_naming_file_and_line(tmp_path, suffix,
                                                                                           bad_text, problem):
    records = pair_records(9)
    records[6]["text_pos"] = bad_text
    path = tmp_path / f"pairs{suffix}"
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    if suffix == ".jsonl":
        path.write_bytes(lines)
    elif suffix == ".jsonl.gz":
        write_gzip(path, lines)
    else:
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    where = f"{path} row group 1 row 2" if suffix == ".parquet" else f"{path}:7"
    with pytest.raises(DataError) as refused:
        read_all(stream_of(path), 10)
    assert str(refused.value) == f"{where}: {problem}"


@pytest.mark.parametrize("bad_text, problem", [
    ("\u200b\ufeff", "empty 'text': only invisible characters U+200B U+FEFF"),
    ("caf\udce9", "lone surrogate U+DCE9 in 'text' at character 4: half of a UTF-16 pair, not text"),
], ids=["zero-width", "surrogate"])
def test_pretraining_refuses_a_text_without_visible_characters_or_with_a_lone_surrogate(tiny_bert, tmp_path, capsys,
                                                                                     monkeypatch, bad_text, problem):
    """Two loader workers (the default) read the records: the worker's error still ends the run in one line."""
    import train_pretrain
    from tests.test_data import refusal

    records = pair_records(40)
    records[6]["text"] = bad_text
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    (tmp_path / "meta.txt").write_text("pairs.jsonl 1\n")
    assert refusal(train_pretrain.main, pretrain_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "refused"),
                   "train_pretrain.py", monkeypatch, capsys) == f"train_pretrain.py: error: {pairs}:7: {problem}"
    train_pretrain.main(pretrain_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "skipped", "--skip_bad_records"))
    assert re.search(rf"^skipped \d+ bad records? of pairs \(first: {re.escape(f'{pairs}:7: {problem}')}\)$",
                     capsys.readouterr().out, re.MULTILINE)
    assert (tmp_path / "skipped" / "final").is_dir()


def test_pretraining_weights_whose_sum_is_infinite_are_refused_naming_the_line(tmp_path):
    """The sum was inf: every source's probability NaN, and numpy refused the first draw with a ValueError."""
    write_jsonl(tmp_path / "a.jsonl", pair_records(4))
    (tmp_path / "meta.txt").write_text("a.jsonl 1 name=a\na.jsonl 1.5e308 name=b\na.jsonl 1e308 name=c\n")
    with pytest.raises(DataError) as refused:
        read_pretrain_meta_list(tmp_path / "meta.txt")
    assert str(refused.value) == (f"{tmp_path / 'meta.txt'}:3: weight=1e+308 makes the sum of the weights infinite; "
                                  "weights are relative shares: divide them all by the same number")

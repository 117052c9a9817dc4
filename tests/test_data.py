"""Meta lists, record checking, the task-homogeneous sampler and the collator."""

import json
from collections import Counter

import pytest
import torch

from modules.cli import DataError
from modules.collator import TaskCollator
from modules.data import load_meta_list
from modules.meta_list import read_meta_list
from modules.samplers import EpochBatches, TaskBatchSampler, build_sampler
from tests.conftest import write_jsonl


def make_sampler(process_index=0, num_processes=1, seed=7):
    return TaskBatchSampler(dataset_sizes=[40, 25, 12], repeats=[1, 2, 3], batch_sizes=[4, 3, 2], seed=seed,
                            num_processes=num_processes, process_index=process_index)


def test_every_global_batch_comes_from_one_dataset_and_holds_no_duplicate():
    for dataset_index, indices, _ in make_sampler(num_processes=2).global_batches(0):
        size = make_sampler().dataset_sizes[dataset_index]
        assert all(0 <= i < size for i in indices)
        assert len(set(indices)) == len(indices)


def test_repeat_counts_are_respected():
    sampler = make_sampler()
    batches = sampler.global_batches(0)
    per_dataset = Counter(d for d, _, _ in batches)
    assert per_dataset == {0: 40 // 4, 1: 2 * (25 // 3), 2: 3 * (12 // 2)}
    assert len(sampler) == len(batches)
    seen = Counter(i for d, indices, _ in batches if d == 2 for i in indices)
    assert set(seen.values()) == {3}  # each record of a repeat-3 dataset drawn 3 times
    occurrences = Counter((i, draw) for d, indices, draw in batches if d == 2 for i in indices)
    assert set(occurrences.values()) == {1}  # a record's draws in one epoch carry distinct keys
    assert {draw for _, draw in occurrences} == {(0, 0), (0, 1), (0, 2)}  # (epoch, occurrence)


def test_processes_agree_and_slice_the_same_global_batch():
    rank0, rank1 = make_sampler(0, 2), make_sampler(1, 2)
    assert rank0.global_batches(3) == rank1.global_batches(3)
    for (d0, local0, draw0), (d1, local1, draw1), (d, global_indices, draw) in zip(
        rank0.local_batches(3), rank1.local_batches(3), rank0.global_batches(3)
    ):
        assert d0 == d1 == d and draw0 == draw1 == draw and draw[0] == 3
        assert local0 + local1 == global_indices


def test_deterministic_for_a_seed_and_different_across_epochs_and_seeds():
    assert make_sampler().global_batches(1) == make_sampler().global_batches(1)
    assert make_sampler().global_batches(1) != make_sampler().global_batches(2)
    assert make_sampler(seed=1).global_batches(1) != make_sampler(seed=2).global_batches(1)


def test_resume_starts_at_the_saved_batch(tiny_data, tiny_bert):
    from transformers import AutoTokenizer

    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    sampler = TaskBatchSampler([len(d) for d in datasets], [d.repeat for d in datasets], [4, 4, 4], seed=3)
    collator = TaskCollator(AutoTokenizer.from_pretrained(tiny_bert), {"query": 16, "passage": 16, "pair": 16},
                            {"retri_contrast": 1, "cls_contrast": 1}, seed=3)
    full = [json.dumps({k: str(v) for k, v in b.items()}) for b in EpochBatches(sampler, datasets, collator, 1)]
    resumed = [json.dumps({k: str(v) for k, v in b.items()}) for b in EpochBatches(sampler, datasets, collator, 1, start=5)]
    assert resumed == full[5:]


def weighted_sampler(weights, seed=7, process_index=0, num_processes=1):
    return TaskBatchSampler(dataset_sizes=[40, 25, 12], repeats=[1, 2, 3], batch_sizes=[4, 3, 2], seed=seed,
                            num_processes=num_processes, process_index=process_index, weights=weights)


def test_weights_set_each_datasets_share_of_an_epoch():
    sampler = weighted_sampler([1.0, 1.0, 2.0])
    assert len(sampler) == len(make_sampler()) == 10 + 16 + 18  # the epoch keeps the repeats' length
    assert sampler.batch_counts() == [11, 11, 22]
    for epoch in range(3):
        batches = sampler.global_batches(epoch)
        assert Counter(d for d, _, _ in batches) == {0: 11, 1: 11, 2: 22}
        assert batches == weighted_sampler([1.0, 1.0, 2.0]).global_batches(epoch)  # a function of (seed, epoch)
    assert weighted_sampler([1.0, 1.0, 2.0], seed=8).global_batches(0) != sampler.global_batches(0)
    # a down-weighted dataset continues its own permutation across epochs instead of restarting
    seen = [i for epoch in range(4) for d, indices, _ in weighted_sampler([10.0, 1.0, 1.0]).global_batches(epoch)
            if d == 1 for i in indices]
    assert len(seen) == 4 * weighted_sampler([10.0, 1.0, 1.0]).batch_counts()[1] * 3
    assert len(set(seen[: 8 * 3])) == 24  # the first 8 batches: one permutation of the 25 records, no repeats


def test_weighted_batches_are_sliced_alike_on_every_process_and_draw_fresh_keys():
    rank0, rank1 = weighted_sampler([3.0, 1.0, 1.0], 7, 0, 2), weighted_sampler([3.0, 1.0, 1.0], 7, 1, 2)
    for (d0, local0, draw0), (d1, local1, draw1) in zip(rank0.local_batches(2), rank1.local_batches(2)):
        assert d0 == d1 and draw0 == draw1 and not set(local0) & set(local1)
    draws = Counter((d, i, draw) for epoch in range(3) for d, indices, draw in rank0.global_batches(epoch)
                    for i in indices)
    assert set(draws.values()) == {1}  # no record is drawn twice with the same key


def test_weights_on_some_lines_only_are_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD_STS] * 4)
    (tmp_path / "meta.txt").write_text("a.jsonl 1 type=cosent weight=2\na.jsonl 1 type=cosent\n")
    with pytest.raises(DataError, match=r"meta.txt:2: no weight=W, but other lines of .* have one"):
        read_meta_list(tmp_path / "meta.txt")


def test_weights_whose_sum_is_infinite_are_refused_naming_the_line(tmp_path):
    """weight=1e308 twice: the sum was inf, every share NaN, and the sampler crashed at start with a ValueError."""
    write_jsonl(tmp_path / "a.jsonl", [GOOD_STS] * 8)
    meta = tmp_path / "meta.txt"
    meta.write_text("a.jsonl 1 type=cosent weight=1e308 name=a\na.jsonl 1 type=cosent weight=1e308 name=b\n")
    with pytest.raises(DataError) as refused:
        read_meta_list(meta)
    assert str(refused.value) == (f"{meta}:2: weight=1e+308 makes the sum of the weights infinite; weights are "
                                  "relative shares: divide them all by the same number")


def test_a_weight_near_the_float_maximum_shares_the_epoch_like_a_small_one():
    """weight=2**1022 with a finite sum: total x weight overflowed (an OverflowError at start)."""
    huge = weighted_sampler([2.0**1022, 2.0**1019, 2.0**1019])
    assert huge.batch_counts() == weighted_sampler([8.0, 1.0, 1.0]).batch_counts() == [35, 5, 4]
    assert TaskBatchSampler([16], [3], [4], seed=0, weights=[1.7e308]).batch_counts() == [12]


def test_too_small_dataset_is_rejected_naming_its_meta_line_and_file(tiny_data, tmp_path):
    (tmp_path / "meta.txt").write_text(f"{tiny_data / 'retri.jsonl'} 1 type=retri_contrast\n"
                                       f"{tiny_data / 'cls.jsonl'} 1\n")
    datasets = load_meta_list(tmp_path / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    message = rf"{tmp_path / 'meta.txt'}:2: {tiny_data / 'cls.jsonl'} has 16 records, fewer than one global batch"
    for cbb in (False, True):
        with pytest.raises(DataError, match=message):
            build_sampler(datasets, [4, 10], seed=0, num_processes=2, cbb=cbb)


def test_a_record_with_fewer_negatives_than_needed_is_refused(tmp_path):
    """Cycling a short pool would put the same negative into one softmax several times (+log k to its logit)."""
    records = [{"text": "q1", "text_pos": "p1", "text_neg": ["a", "b", "c", "d"]},
               {"text": "q2", "text_pos": "p2", "text_neg": ["e", "f", "g"]}]
    meta = meta_for(tmp_path, "d.jsonl 1 type=retri_contrast", records)
    assert len(load_meta_list(meta, negatives_per_kind={"retri_contrast": 3})[0]) == 2
    with pytest.raises(DataError, match=r"d.jsonl:2: 3 negatives in 'text_neg', fewer than the 4 each record needs"):
        load_meta_list(meta, negatives_per_kind={"retri_contrast": 4})


def test_repeated_records_draw_fresh_positives_and_negatives(tmp_path, tiny_bert):
    """A dataset with repeat k: each of a record's k draws in an epoch picks its own positive and negatives."""
    from transformers import AutoTokenizer

    records = [{"text": f"q{i}", "text_pos": [f"p{i}x{k}" for k in range(20)], "text_neg": [f"n{i}x{k}" for k in range(20)]}
               for i in range(8)]
    datasets = load_meta_list(meta_for(tmp_path, "d.jsonl 4 type=retri_contrast", records),
                              negatives_per_kind={"retri_contrast": 2})
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    collator = TaskCollator(tokenizer, {"query": 8, "passage": 8}, {"retri_contrast": 2}, seed=0)
    draws = {}
    for batch in EpochBatches(build_sampler(datasets, [2], seed=0), datasets, collator, 0):
        texts = tokenizer.batch_decode(batch["passage"]["input_ids"], skip_special_tokens=True)
        for row, index in enumerate(batch["indices"]):
            draws.setdefault(index, []).append((texts[row], texts[2 + 2 * row], texts[3 + 2 * row]))
    assert all(len(d) == 4 for d in draws.values())
    assert all(len(set(d)) == 4 for d in draws.values()), draws  # 20 x 20 x 19 choices: no draw repeats here


def test_meta_list_parsing(tiny_data):
    entries = read_meta_list(tiny_data / "meta.txt")
    assert [(e.path.name, e.repeat, e.kind) for e in entries] == [
        ("retri.jsonl", 2, "retri_contrast"), ("cls.jsonl", 1, None), ("sts.jsonl", 1, "cosent")]
    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    assert [d.kind for d in datasets] == ["retri_contrast", "cls_contrast", "cosent"]  # cls kind from its column


def test_collator_layout(tiny_data, tiny_bert):
    from transformers import AutoTokenizer

    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 3})
    collator = TaskCollator(AutoTokenizer.from_pretrained(tiny_bert), {"query": 8, "passage": 12, "pair": 10},
                            {"retri_contrast": 1, "cls_contrast": 3}, seed=0)
    retri = collator(datasets[0], [0, 1, 2], 0)
    assert retri["query"]["input_ids"].shape[0] == 3 and retri["passage"]["input_ids"].shape[0] == 3 + 3 * 1
    assert retri["query"]["input_ids"].shape[1] <= 8 and retri["passage"]["input_ids"].shape[1] <= 12
    cls = collator(datasets[1], [0, 1], 0)
    assert cls["passage"]["input_ids"].shape[0] == 2 + 2 * 3
    sts = collator(datasets[2], [0, 1, 2, 3], 0)
    assert sts["pair"]["input_ids"].shape[0] == 8 and sts["labels"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------- bad input: clear errors


def meta_for(tmp_path, line, records=None, raw=None, name="d.jsonl"):
    if raw is not None:
        (tmp_path / name).write_text(raw)
    elif records is not None:
        write_jsonl(tmp_path / name, records)
    (tmp_path / "meta.txt").write_text(line + "\n")
    return tmp_path / "meta.txt"


GOOD_STS = {"text": "a", "text_pair": "b", "label": 1.0}


@pytest.mark.parametrize("records, raw, kind, message", [
    ([GOOD_STS, {"text": "a", "label": 1}], None, "cosent", r"d.jsonl:2: missing column 'text_pair'"),
    ([GOOD_STS, {"text": "a", "text_pair": "b", "label": "high"}], None, "cosent", r"d.jsonl:2: column 'label' must be a number"),
    ([GOOD_STS, {"text": 3, "text_pair": "b", "label": 1}], None, "cosent", r"d.jsonl:2: column 'text' must be a string"),
    ([{"text": "q", "text_pos": "p", "text_neg": [1, 2]}], None, "retri_contrast", r"d.jsonl:1: column 'text_neg' must be a string or a list"),
    ([{"text": "q", "text_pos": "p", "text_neg": []}], None, "retri_contrast", r"d.jsonl:1: column 'text_neg' is empty"),
    ([{"text": "q", "text_pos": "p"}], None, "retri_contrast", r"d.jsonl:1: missing column 'text_neg'"),
    ([{**GOOD_STS, "type": "cosent"}, {**GOOD_STS, "type": "regression"}], None, None, r"d.jsonl:2: unknown type 'regression'"),
    ([{**GOOD_STS, "type": "cosent"}, {**GOOD_STS, "type": "cls_contrast"}], None, None, r"d.jsonl:2: type 'cls_contrast' but the dataset is 'cosent'"),
    ([GOOD_STS], None, None, r"d.jsonl:1: no 'type' column and no type=KIND"),
    (None, "", "cosent", r"d.jsonl: empty dataset"),
    (None, '{"text": "a", "text_pair": "b", "label": 1}\n{"text": "a",\n', "cosent", r"d.jsonl:2: invalid JSON"),
    (None, '["a", "b"]\n', "cosent", r"d.jsonl:1: a record must be a JSON object"),
    # empty or whitespace-only texts: trained on before
    ([GOOD_STS, {"text": "a", "text_pair": "", "label": 1}], None, "cosent", r"d.jsonl:2: empty 'text_pair'$"),
    ([{"text": " \t", "text_pair": "b", "label": 1}], None, "cosent", r"d.jsonl:1: empty 'text'$"),
    ([{"text": "\n", "text_pos": "p", "text_neg": ["n"]}], None, "retri_contrast", r"d.jsonl:1: empty 'text'$"),
    ([{"text": "q", "text_pos": " ", "text_neg": ["n"]}], None, "retri_contrast", r"d.jsonl:1: empty 'text_pos'$"),
    ([{"text": "q", "text_pos": ["p", ""], "text_neg": ["n"]}], None, "retri_contrast",
     r"d.jsonl:1: empty 'text_pos' \(item 2 of 2\)"),
    ([{"text": "q", "text_pos": "p", "text_neg": ["n", "m", "\u3000"]}], None, "retri_contrast",
     r"d.jsonl:1: empty 'text_neg' \(item 3 of 3\)"),
    # bytes that are not UTF-8 (a bare UnicodeDecodeError before, no file named) and a BOM (invalid JSON before)
    (None, '{"text": "a", "text_pair": "b", "label": 1}\n{"text": "caf\udce9", "text_pair": "b", "label": 1}\n',
     "cosent", r"d.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\); convert the file to UTF-8"),
])
def test_bad_records_name_file_and_line(tmp_path, records, raw, kind, message):
    if raw is not None:  # surrogate escapes stand for raw bytes
        (tmp_path / "d.jsonl").write_bytes(raw.encode("utf-8", "surrogateescape"))
    meta = meta_for(tmp_path, "d.jsonl 1" + (f" type={kind}" if kind else ""), records)
    with pytest.raises(DataError, match=message):
        load_meta_list(meta, negatives_per_kind={"retri_contrast": 1})


@pytest.mark.parametrize("line, message", [
    ("missing.jsonl 1", r"meta.txt:1: dataset path .*missing.jsonl does not exist"),
    ("d.jsonl", r"meta.txt:1: expected '<path> <repeat>"),
    ("d.jsonl two", r"meta.txt:1: repeat must be a positive integer, got 'two'"),
    ("d.jsonl 0", r"meta.txt:1: repeat must be a positive integer, got 0"),
    ("d.jsonl 1 type=sts", r"meta.txt:1: unknown type 'sts'"),
    ("d.jsonl 1 weight=0", r"meta.txt:1: weight must be a positive number, got 0.0"),
    ("d.jsonl 1 weight=x", r"meta.txt:1: weight must be a positive number, got 'x'"),
    ("d.jsonl 1 size=2", r"meta.txt:1: unknown option 'size=2'"),
    ("# only a comment", r"lists no datasets"),
    ("d.jsonl 1 weight=inf", r"meta.txt:1: weight must be a positive number, got inf"),
    ("d.jsonl 1 weight=nan", r"meta.txt:1: weight must be a positive number, got nan"),
])
def test_bad_meta_lists_name_the_line(tmp_path, line, message):
    meta = meta_for(tmp_path, line, [GOOD_STS])
    with pytest.raises(DataError, match=message):
        load_meta_list(meta)


def test_missing_meta_list(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_meta_list(tmp_path / "nope.txt")


def test_parquet_and_datasets_directory_read_like_jsonl(tmp_path):
    import datasets

    records = [dict(GOOD_STS, label=float(i)) for i in range(3)]
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "meta.txt").write_text("p.parquet 1 type=cosent\nsaved 1 type=cosent\n")
    loaded = load_meta_list(tmp_path / "meta.txt")
    assert [d.records for d in loaded] == [records, records]
    bad = [dict(GOOD_STS), {"text": "a", "text_pair": "b", "label": None}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    (tmp_path / "meta.txt").write_text("bad.parquet 1 type=cosent\n")
    with pytest.raises(DataError, match=r"bad.parquet row 1: missing column 'label'"):
        load_meta_list(tmp_path / "meta.txt")


def test_start_up_lines_give_each_datasets_share(tiny_data, tmp_path):
    from modules.samplers import BalancedBatchSampler, describe_batches

    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    lines = describe_batches(datasets, build_sampler(datasets, [4, 4, 4], seed=0))
    assert lines[0].startswith("retri (retri_contrast, ") and lines[0].endswith(
        ": 16 records, 8 batches an epoch, 50.0% of the steps")
    assert lines[2].endswith("sts (cosent, " + str(tiny_data / "meta.txt") + ":5): 16 records, 4 batches an epoch, "
                             "25.0% of the steps")
    cbb = describe_batches(datasets, BalancedBatchSampler(datasets, [4, 4, 4], seed=0))
    assert cbb[1].endswith("4 batches an epoch, 100.0% of the cls_contrast batches (one every step)")


def test_dataset_names_are_unique_folder_stem_or_given(tmp_path):
    """Two train.jsonl are not both "train" (names key prompts saved with the model): folder/stem where stems
    repeat, the file stem otherwise, name=NAME when given; two equal names are refused naming both lines."""
    for folder in ("en-stsb", "en-sick"):
        write_jsonl(tmp_path / folder / "train.jsonl", [{"text": "a", "text_pair": "b", "label": 1.0}])
    write_jsonl(tmp_path / "nli.jsonl.gz.jsonl", [{"text": "a", "text_pos": "b"}])
    meta = tmp_path / "meta.txt"
    meta.write_text("en-stsb/train.jsonl 1 type=cosent\nen-sick/train.jsonl 1 type=cosent\n"
                    "nli.jsonl.gz.jsonl 1 type=retri_contrast name=allnli\n")
    assert [e.name for e in read_meta_list(meta)] == ["en-stsb/train", "en-sick/train", "allnli"]
    meta.write_text("en-stsb/train.jsonl 1 type=cosent name=sts\nen-sick/train.jsonl 1 type=cosent name=sts\n")
    with pytest.raises(DataError, match=r"meta.txt:2: dataset name 'sts' is also the name of .*meta.txt:1"):
        read_meta_list(meta)


def test_pretraining_sources_get_unique_names(tmp_path):
    from modules.streaming import read_pretrain_meta_list

    for folder in ("a", "b"):
        write_jsonl(tmp_path / folder / "pairs.jsonl", [{"text": "q", "text_pos": "p"}])
    meta = tmp_path / "meta.txt"
    meta.write_text("a/pairs.jsonl 1\nb/pairs.jsonl 2 name=reddit\n")
    assert [s.name for s in read_pretrain_meta_list(meta)] == ["pairs", "reddit"]
    meta.write_text("a/pairs.jsonl 1\nb/pairs.jsonl 2\n")
    assert [s.name for s in read_pretrain_meta_list(meta)] == ["a/pairs", "b/pairs"]


# ---------------------------------------------------------------- --skip_bad_records, encodings, gzip, huge texts


def test_skip_bad_records_skips_whole_records_and_counts_them(tmp_path):
    """A record with one empty negative among good ones is skipped whole: its pool would otherwise differ from the file."""
    from modules.data import skipped_record_lines

    good = [{"text": f"q{i}", "text_pos": [f"p{i}"], "text_neg": [f"n{i}", f"m{i}"]} for i in range(5)]
    lines = [json.dumps(r) for r in good]
    lines[1:1] = ['{"text": "q", "text_pos": "p", "text_neg": ["n", " "]}', '{"text": "q", "text_pos":']
    lines[5:5] = ['{"text": "", "text_pos": "p", "text_neg": ["n"]}', '{"text": "q", "text_neg": ["n"]}',
                  '{"text": "q", "text_pos": 7, "text_neg": ["n"]}', '"a string"']
    meta = meta_for(tmp_path, "d.jsonl 1 type=retri_contrast name=mixed", raw="\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: empty 'text_neg' \(item 2 of 2\)"):
        load_meta_list(meta, negatives_per_kind={"retri_contrast": 1})
    [dataset] = load_meta_list(meta, negatives_per_kind={"retri_contrast": 1}, skip_bad=True)
    assert [r["text"] for r in dataset.records] == [r["text"] for r in good]
    assert skipped_record_lines([dataset]) == [
        f"skipped 6 bad records of mixed (first: {tmp_path / 'd.jsonl'}:2: empty 'text_neg' (item 2 of 2))"]


@pytest.mark.parametrize("records, message", [
    ([{"text": "q", "text_pos": "p", "text_neg": ["n"], "type": "cls_contrast"},
      {"text": "", "text_pair": "p", "label": 1, "type": "cosent"}],
     r"d.jsonl:2: type 'cosent' but the dataset is 'cls_contrast'"),
    ([{"text": "", "text_pos": "p", "text_neg": ["n"]}] * 3,
     r"d.jsonl: empty dataset .*every record was bad: skipped 3 bad records of .*d.jsonl \(first: .*d.jsonl:1: "
     r"empty 'text'\)"),
    ([{"text": "q", "text_pos": "p", "text_neg": ["n"]}], r"d.jsonl:1: 1 negatives in 'text_neg', fewer than the 2"),
])
def test_skip_bad_records_still_refuses_what_is_not_a_bad_record(tmp_path, records, message):
    """A dataset of mixed kinds, one left with no record, or negatives fewer than the flags need are the setup's
    problem, not a record's: skipping them would silently drop a dataset."""
    meta = meta_for(tmp_path, "d.jsonl 1" + ("" if "type" in records[0] else " type=retri_contrast"), records)
    with pytest.raises(DataError, match=message):
        load_meta_list(meta, negatives_per_kind={"retri_contrast": 2, "cls_contrast": 1}, skip_bad=True)


def gzip_bytes(text: str, encoding="utf-8"):
    import gzip

    return gzip.compress(text.encode(encoding))


STS_LINES = "".join(json.dumps(dict(GOOD_STS, label=float(i))) + "\n" for i in range(200))


@pytest.mark.parametrize("content, message", [
    (gzip_bytes(STS_LINES + '{"text": "café", "text_pair": "b", "label": 1}\n', "latin-1"),
     r"d.jsonl.gz:201: not UTF-8 \(byte 0xe9 at column 14\)"),
    (STS_LINES.encode(), r"d.jsonl.gz: truncated or corrupt gzip file, unreadable after line 0 \(Not a gzipped file"),
])
def test_unreadable_gzip_or_non_utf8_names_the_file_and_line(tmp_path, content, message):
    """A bare UnicodeDecodeError, EOFError or BadGzipFile (a traceback, no file named) before."""
    (tmp_path / "d.jsonl.gz").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_meta_list(meta_for(tmp_path, "d.jsonl.gz 1 type=cosent"))


def test_a_truncated_gzip_file_names_the_file_and_its_last_good_line(tmp_path):
    import zlib

    cut = gzip_bytes(STS_LINES * 20)[:-300]
    good_lines = zlib.decompressobj(31).decompress(cut).count(b"\n")
    (tmp_path / "d.jsonl.gz").write_bytes(cut)
    with pytest.raises(DataError, match=rf"d.jsonl.gz: truncated or corrupt gzip file, unreadable after line "
                                        rf"{good_lines} \(Compressed file ended before the end-of-stream marker"):
        load_meta_list(meta_for(tmp_path, "d.jsonl.gz 1 type=cosent"))


def test_meta_list_and_data_saved_with_a_bom_are_read(tmp_path):
    """Windows Notepad's UTF-8 starts with a BOM: glued to the first path, it "did not exist"."""
    (tmp_path / "d.jsonl").write_text(STS_LINES, encoding="utf-8-sig")
    (tmp_path / "meta.txt").write_text("d.jsonl 1 type=cosent\n", encoding="utf-8-sig")
    assert len(load_meta_list(tmp_path / "meta.txt")[0]) == 200
    (tmp_path / "meta.txt").write_bytes("# données\nd.jsonl 1 type=cosent\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"meta.txt:1: not UTF-8 \(byte 0xe9 at column 7\)"):
        read_meta_list(tmp_path / "meta.txt")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_meta_list_inside_the_output_dir_is_kept(tmp_path, overwrite):
    """Resuming with the meta list a run saved crashed with shutil.SameFileError; --overwrite_output_dir deleted it
    before copying it."""
    from argparse import Namespace

    from modules.outputs import write_run_config

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "meta.txt").write_text("d.jsonl 1 type=cosent\n")
    (output_dir / "old_checkpoint").mkdir()
    write_run_config(output_dir, Namespace(overwrite_output_dir=overwrite), [str(output_dir / "meta.txt")])
    assert (output_dir / "meta.txt").read_text() == "d.jsonl 1 type=cosent\n"
    assert (output_dir / "old_checkpoint").exists() != overwrite and (output_dir / "run_config.json").exists()


class RecordingTokenizer:
    """A tokenizer that notes the length of every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.lengths += [len(text) for text in texts]
        return self.tokenizer(texts, **kwargs)


def test_a_huge_text_is_cut_before_the_tokenizer_reads_it(tmp_path, tiny_bert):
    """One 50 MB record cost 7.3 GB and 95 s: the tokenizer reads a text whole before truncating it."""
    from transformers import AutoTokenizer

    from modules.collator import MAX_CHARS_PER_TOKEN

    huge = " ".join(f"word{i % 97} déjà 東京 x" for i in range(120_000))  # ~2 MB
    records = [{"text": "question", "text_pos": huge, "text_neg": ["n"]}, {"text": "q", "text_pos": "p", "text_neg": [huge]}]
    [dataset] = load_meta_list(meta_for(tmp_path, "d.jsonl 1 type=retri_contrast", records),
                               negatives_per_kind={"retri_contrast": 1})
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    recording = RecordingTokenizer(tokenizer)
    batch = TaskCollator(recording, {"query": 8, "passage": 48}, {"retri_contrast": 1})(dataset, [0, 1], 0)
    assert len(huge) > 2_000_000 and max(recording.lengths) == 48 * MAX_CHARS_PER_TOKEN
    expected = tokenizer([huge], truncation=True, max_length=48, return_tensors="pt")["input_ids"][0]
    passages = batch["passage"]["input_ids"]  # [positives | negatives]
    assert torch.equal(passages[0], expected) and torch.equal(passages[3], expected)


def finetune_args(tiny_bert, meta, output_dir, *extra):
    return ["--model_name_or_path", str(tiny_bert), "--meta_list", str(meta), "--output_dir", str(output_dir),
            "--cosent_batch_size", "4", "--query_max_len", "16", "--passage_max_len", "16", "--pair_max_len", "16",
            "--max_steps", "1", "--report_to", "none", *extra]


def test_fine_tuning_refuses_an_empty_text_in_one_line_or_skips_it(tiny_bert, tmp_path, capsys):
    import subprocess
    import sys

    import train_finetune
    from tests.conftest import REPO

    records = [dict(GOOD_STS, label=float(i)) for i in range(8)]
    records[4]["text_pair"] = " "
    write_jsonl(tmp_path / "en-stsb" / "train.jsonl", records)
    (tmp_path / "meta.txt").write_text("en-stsb/train.jsonl 1 type=cosent\n")
    result = subprocess.run([sys.executable, "train_finetune.py",
                             *finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "refused")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"train_finetune.py: error: {tmp_path / 'en-stsb' / 'train.jsonl'}:5: empty 'text_pair'")
    train_finetune.main(finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "skipped", "--skip_bad_records"))
    assert (f"skipped 1 bad record of train (first: {tmp_path / 'en-stsb' / 'train.jsonl'}:5: empty 'text_pair')"
            in capsys.readouterr().out.splitlines())


# ---------------------------------------------------------------- texts with no visible character, lone surrogates


ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"  # zero-width space, non-joiner, joiner, word joiner, BOM (category Cf)
ZERO_WIDTH_CODES = "U+200B U+200C U+200D U+2060 U+FEFF"
NOT_TEXT = "half of a UTF-16 pair, not text"
GOOD_RECORD = {"cosent": GOOD_STS, "retri_contrast": {"text": "q", "text_pos": "p", "text_neg": ["n"]},
               "cls_contrast": {"text": "q", "text_pos": "p", "text_neg": ["n"]},
               "parallel": {"text": "q", "text_pos": "p"}}


@pytest.mark.parametrize("record, kind, problem", [
    ({"text": ZERO_WIDTH, "text_pair": "b", "label": 1}, "cosent",
     f"empty 'text': only invisible characters {ZERO_WIDTH_CODES}"),
    ({"text": "a", "text_pair": "caf\ud800", "label": 1}, "cosent",
     f"lone surrogate U+D800 in 'text_pair' at character 4: {NOT_TEXT}"),
    ({"text": "q", "text_pos": "\u3164\ufe0f \u00ad", "text_neg": ["n"]}, "retri_contrast",
     "empty 'text_pos': only invisible characters U+3164 U+FE0F U+0020 U+00AD"),  # Hangul filler, variation selector
    ({"text": "q", "text_pos": ["p", "\udc00x"], "text_neg": ["n"]}, "retri_contrast",
     f"lone surrogate U+DC00 in 'text_pos' (item 2 of 2) at character 1: {NOT_TEXT}"),
    ({"text": "q", "text_pos": "p", "text_neg": ["n", "\u2060\u2060\t"]}, "cls_contrast",
     "empty 'text_neg' (item 2 of 2): only invisible characters U+2060 U+0009"),
    ({"text": "\x00\x7f\u200e\u200f\u202a\U000e0001", "text_pos": "p"}, "parallel",  # controls, bidi marks, a tag
     "empty 'text': only invisible characters U+0000 U+007F U+200E U+200F U+202A ..."),
    ({"text": "q", "text_pos": "p", "text_neg": ["n"], "candidates": ["c", "\u180e"], "neg_ranks": [0],
      "neg_scores": [0.5]}, "retri_contrast", "empty 'candidates' (item 2 of 2): only invisible characters U+180E"),
], ids=["zero-width text", "surrogate text_pair", "filler text_pos", "surrogate text_pos item",
        "zero-width text_neg item", "controls parallel text", "zero-width candidate"])
def test_a_text_with_no_visible_character_or_a_lone_surrogate_names_file_and_line(tmp_path, record, kind, problem):
    """Zero-width and other format characters alone trained as [CLS][SEP]; a lone surrogate (valid JSON, "\\ud800")
    passed the loader and stopped the run mid-loop with a tokenizer TypeError."""
    meta = meta_for(tmp_path, f"d.jsonl 1 type={kind}", [GOOD_RECORD[kind], record])
    with pytest.raises(DataError) as refused:
        load_meta_list(meta, negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    assert str(refused.value) == f"{tmp_path / 'd.jsonl'}:2: {problem}"


def test_a_text_with_a_visible_character_still_loads(tmp_path):
    """An emoji (written by json.dumps as a surrogate pair escape), a zero-width space inside a word, ideographic space
    around a word, private use (a font's glyph) are text."""
    texts = ["\U0001f600", "a\u200bb", "\u3000東京\u3000", "\u200b x", "\ue000"]
    meta = meta_for(tmp_path, "d.jsonl 1 type=cosent", [{"text": t, "text_pair": t, "label": 1} for t in texts])
    assert [r["text"] for r in load_meta_list(meta)[0].records] == texts


def test_a_mined_candidate_without_visible_text_in_its_corpus_is_a_bad_record(tmp_path):
    """Candidate ids read their texts from the corpus: the same rule, naming the record's line and the passage."""
    from modules.data import skipped_record_lines

    passages = [f"passage {i}" for i in range(6)]
    passages[3], passages[4] = ZERO_WIDTH, "x\ud800"
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"p{i}", "text": t} for i, t in enumerate(passages)])

    def mined(query, ids):
        return {"text": query, "text_pos": ["passage 0"], "corpus": "corpus.jsonl", "candidate_ids": ids,
                "neg_ranks": [0], "neg_scores": [0.9]}

    records = [mined("q1", ["p1", "p2"]), mined("q2", ["p1", "p3"]), mined("q3", ["p4"]), mined("q4", ["p5", "p2"])]
    meta = meta_for(tmp_path, "mined.jsonl 1 type=retri_contrast", records, name="mined.jsonl")
    with pytest.raises(DataError) as refused:
        load_meta_list(meta)
    first = (f"{tmp_path / 'mined.jsonl'}:2: candidate 'p3' of corpus {corpus}: empty text: only invisible characters "
             f"{ZERO_WIDTH_CODES}")
    assert str(refused.value) == first
    [dataset] = load_meta_list(meta, skip_bad=True)
    assert [r["text"] for r in dataset.records] == ["q1", "q4"]
    assert skipped_record_lines([dataset]) == [f"skipped 2 bad records of mined (first: {first})"]
    with pytest.raises(DataError, match=rf"mined.jsonl:1: candidate 'p4' of corpus .*: lone surrogate U\+D800 in text "
                                        rf"at character 2: {NOT_TEXT}"):
        load_meta_list(meta_for(tmp_path, "mined.jsonl 1 type=retri_contrast", records[2:3] * 3, name="mined.jsonl"))


def refusal(main, argv, script, monkeypatch, capsys):
    """What the script's entry point (``run_cli(main)``) ends with: exit status 2 and one line on stderr."""
    import sys

    from modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: main(argv))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("bad_text, problem", [
    (ZERO_WIDTH, f"empty 'text_pair': only invisible characters {ZERO_WIDTH_CODES}"),
    ("caf\ud800", f"lone surrogate U+D800 in 'text_pair' at character 4: {NOT_TEXT}"),
], ids=["zero-width", "surrogate"])
def test_fine_tuning_refuses_a_text_without_visible_characters_or_with_a_lone_surrogate(tiny_bert, tmp_path, capsys,
                                                                                     monkeypatch, bad_text, problem):
    import train_finetune

    records = [dict(GOOD_STS, label=float(i)) for i in range(8)]
    records[2]["text_pair"] = bad_text
    train = write_jsonl(tmp_path / "en-stsb" / "train.jsonl", records)
    (tmp_path / "meta.txt").write_text("en-stsb/train.jsonl 1 type=cosent\n")
    assert refusal(train_finetune.main, finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "refused"),
                   "train_finetune.py", monkeypatch, capsys) == f"train_finetune.py: error: {train}:3: {problem}"
    train_finetune.main(finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "skipped", "--skip_bad_records"))
    assert f"skipped 1 bad record of train (first: {train}:3: {problem})" in capsys.readouterr().out.splitlines()
    assert (tmp_path / "skipped" / "final").is_dir()


@pytest.mark.parametrize("bad_text, problem", [
    ("\u200b \u2060", "empty 'text': only invisible characters U+200B U+0020 U+2060"),
    ("\udfffok", f"lone surrogate U+DFFF in 'text' at character 1: {NOT_TEXT}"),
], ids=["zero-width", "surrogate"])
def test_an_eval_sts_file_with_such_a_text_is_refused_naming_its_line(tiny_bert, tmp_path, capsys, monkeypatch,
                                                                      bad_text, problem):
    import train_finetune

    write_jsonl(tmp_path / "train.jsonl", [dict(GOOD_STS, label=float(i)) for i in range(8)])
    (tmp_path / "meta.txt").write_text("train.jsonl 1 type=cosent\n")
    dev = write_jsonl(tmp_path / "dev.jsonl", [GOOD_STS, dict(GOOD_STS, text=bad_text)])
    assert refusal(train_finetune.main, finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "out",
                                                      "--eval_sts_file", str(dev)),
                   "train_finetune.py", monkeypatch, capsys) == f"train_finetune.py: error: {dev}:2: {problem}"


def test_fine_tuning_refuses_weights_whose_sum_is_infinite(tiny_bert, tmp_path, capsys, monkeypatch):
    import train_finetune

    write_jsonl(tmp_path / "a.jsonl", [dict(GOOD_STS, label=float(i)) for i in range(8)])
    (tmp_path / "meta.txt").write_text("a.jsonl 1 type=cosent weight=1e308 name=a\na.jsonl 1 type=cosent weight=1e308 "
                                       "name=b\n")
    assert refusal(train_finetune.main, finetune_args(tiny_bert, tmp_path / "meta.txt", tmp_path / "out"),
                   "train_finetune.py", monkeypatch, capsys) == (
        f"train_finetune.py: error: {tmp_path / 'meta.txt'}:2: weight=1e+308 makes the sum of the weights infinite; "
        "weights are relative shares: divide them all by the same number")

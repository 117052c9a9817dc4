"""The pair data tools (tools/filter_pairs.py, dedup_pairs.py, score_pairs.py) on real and constructed pairs."""

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest

from tests.conftest import REPO, minilm_path, shared_data, write_jsonl
from modules.cli import DataError


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


filter_pairs, dedup_pairs, score_pairs = (load_tool(name) for name in ("filter_pairs", "dedup_pairs", "score_pairs"))


def read_jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def expected_filtering(records, query_column, positive_column, rules):
    """Each record's reason to drop (or None), computed here without modules.pair_tools."""

    def share_of_script(text, script_prefix):
        letters = [c for c in text if unicodedata.category(c).startswith("L")]
        in_script = sum(unicodedata.name(c, "").startswith(script_prefix) for c in letters)
        return in_script / len(letters) if letters else 0.0

    reasons = []
    for record in records:
        query, positive = (re.sub(r"\s+", " ", record[c]).strip() for c in (query_column, positive_column))
        if not query or not positive:
            reasons.append("empty")
        elif unicodedata.normalize("NFKC", query).lower() == unicodedata.normalize("NFKC", positive).lower():
            reasons.append("identical")
        elif len(query) > rules["query_max_chars"]:
            reasons.append("query_too_long")
        elif len(positive) < rules["positive_min_chars"]:
            reasons.append("positive_too_short")
        elif min(share_of_script(query, rules["script"]), share_of_script(positive, rules["script"])) < rules["ratio"]:
            reasons.append("language")
        else:
            reasons.append(None)
    return reasons


@pytest.mark.parametrize("path, language, script, ratio, query_max, positive_min", [
    ("zh-atec/dev.jsonl", "zh", "CJK", 0.9, 30, 6),
    ("en-stsb/dev.jsonl", "en", "LATIN", 1.0, 100, 20),
])
def test_filter_real_pairs_matches_rules_recomputed(tmp_path, path, language, script, ratio, query_max, positive_min):
    source = shared_data(path)
    report = filter_pairs.main([
        str(source), "--output", str(tmp_path / "kept.jsonl"), "--positive_column", "text_pair",
        "--language", language, "--min_script_ratio", str(ratio),
        "--query_max_chars", str(query_max), "--positive_min_chars", str(positive_min)])

    records = read_jsonl(source)
    reasons = expected_filtering(records, "text", "text_pair", {
        "query_max_chars": query_max, "positive_min_chars": positive_min, "script": script, "ratio": ratio})
    expected_dropped = Counter(reason for reason in reasons if reason)
    assert {"query_too_long", "positive_too_short", "language"} <= set(expected_dropped)  # the rules fire here
    assert report["dropped"] == dict(expected_dropped)
    assert report["read"] == len(records) and report["kept"] == reasons.count(None)
    assert read_jsonl(tmp_path / "kept.jsonl") == [r for r, reason in zip(records, reasons) if reason is None]
    assert json.loads((tmp_path / "kept.jsonl.report.json").read_text())["dropped"] == report["dropped"]


def test_gzip_and_parquet_inputs_give_the_same_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_jsonl(shared_data("en-stsb/dev.jsonl"))[:300]
    write_jsonl(tmp_path / "pairs.jsonl", records)
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")

    options = ["--positive_column", "text_pair", "--query_max_chars", "60", "--language", "en"]
    outputs = {}
    for name in ("pairs.jsonl", "pairs.jsonl.gz", "pairs.parquet"):
        output = tmp_path / f"kept_from_{name}.jsonl.gz"
        filter_pairs.main([str(tmp_path / name), "--output", str(output), *options])
        outputs[name] = read_jsonl(output)
    assert 0 < len(outputs["pairs.jsonl"]) < len(records)
    assert outputs["pairs.jsonl"] == outputs["pairs.jsonl.gz"] == outputs["pairs.parquet"]
    assert all(r in records for r in outputs["pairs.jsonl"])


def test_each_rule_drops_its_constructed_pair(tmp_path):
    good = {"text": "how do I reset my password", "text_pos": "steps to reset a forgotten account password", "id": 0}
    at_bounds = {"text": "the quick brown fox jumps over the lazy dog and then ran off", "text_pos": "abc", "id": 1}
    bad = {
        "empty": {"text": " \t ", "text_pos": "something"},
        "identical": {"text": "Reset  my Password", "text_pos": "reset my password\n"},
        "query_too_short": {"text": "hi", "text_pos": "a greeting used in casual conversation"},
        "query_too_long": {"text": "a very long query " * 5, "text_pos": "long queries are dropped"},
        "positive_too_short": {"text": "what is two plus two", "text_pos": "4"},
        "positive_too_long": {"text": "lorem ipsum", "text_pos": "lorem ipsum dolor sit amet " * 10},
        "language": {"text": "如何重置密码", "text_pos": "reset password steps"},
        "repetition": {"text": "aaaaaaaaaaaaaaaaaaaaaaaa!", "text_pos": "a scream of surprise"},
    }
    assert len(at_bounds["text"]) == 60  # the bounds are inclusive
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, *bad.values(), at_bounds])
    report = filter_pairs.main([
        str(path), "--output", str(tmp_path / "kept.jsonl"), "--language", "en", "--query_min_chars", "3",
        "--query_max_chars", "60", "--positive_min_chars", "3", "--positive_max_chars", "200",
        "--max_top_char_ratio", "0.5"])
    assert report["dropped"] == {reason: 1 for reason in bad}
    assert read_jsonl(tmp_path / "kept.jsonl") == [good, at_bounds]


LONG_SENTENCE = ("The city council approved the new budget for public transportation after a long debate about the "
                 "cost of maintaining the old railway lines in the northern districts of the region.")
LONG_CHINESE = ("今天上午市政府召开新闻发布会，宣布将在明年春季开通连接城东和城西的第三条地铁线路，"
                "全线共设二十六座车站，预计每天可以运送乘客超过五十万人次，大大缓解早晚高峰的交通压力。")


def jaccard(a, b, n):
    shingles = [{t[i:i + n] for i in range(len(t) - n + 1)} for t in (a.lower(), b.lower())]
    return len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1])


def test_dedup_drops_exact_and_near_copies_keeps_different_texts_in_order(tmp_path):
    near_english = LONG_SENTENCE.replace("long debate", "heated debate")
    near_chinese = LONG_CHINESE.replace("二十六", "二十八")
    assert jaccard(LONG_SENTENCE, near_english, 5) > 0.85 and jaccard(LONG_CHINESE, near_chinese, 3) > 0.85
    records = [
        {"text": LONG_SENTENCE, "text_pos": "Transit budget approved.", "id": 0},
        {"text": "A recipe for banana bread with walnuts and cinnamon, baked for fifty minutes.", "text_pos": "Baking.",
         "id": 1},
        {"text": "  " + LONG_SENTENCE.upper(), "text_pos": "transit budget  approved.", "id": 2},  # same normalised
        {"text": near_english, "text_pos": "Transit budget approved.", "id": 3},
        {"text": LONG_CHINESE, "text_pos": "地铁三号线明年开通", "id": 4},
        {"text": "Scientists observed a comet passing close to Jupiter during the winter months.",
         "text_pos": "Astronomy news.", "id": 5},
        {"text": near_chinese, "text_pos": "地铁三号线明年开通", "id": 6},
        {"text": "The city council rejected a plan to build a stadium near the river.", "text_pos": "Sports.", "id": 7},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = dedup_pairs.main([str(path), "--output", str(tmp_path / "dedup.jsonl")])
    assert report["dropped"] == {"exact_duplicate": 1, "near_duplicate": 2}
    assert [r["id"] for r in read_jsonl(tmp_path / "dedup.jsonl")] == [0, 1, 4, 5, 7]
    assert read_jsonl(tmp_path / "dedup.jsonl") == [records[i] for i in (0, 1, 4, 5, 7)]

    dedup_pairs.main([str(path), "--output", str(tmp_path / "again.jsonl")])
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "dedup.jsonl").read_bytes()
    report = dedup_pairs.main([str(path), "--output", str(tmp_path / "exact.jsonl"), "--exact_only"])
    assert report["dropped"] == {"exact_duplicate": 1}


def test_dedup_key_one_side(tmp_path):
    query = "what is the capital of france"
    records = [{"text": query, "text_pos": positive} for positive in ("Paris.", "It is Paris, on the Seine.")]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    assert dedup_pairs.main([str(path), "--output", str(tmp_path / "pair.jsonl")])["kept"] == 2
    report = dedup_pairs.main([str(path), "--output", str(tmp_path / "query.jsonl"), "--key", "query"])
    assert report["dropped"] == {"exact_duplicate": 1}
    assert read_jsonl(tmp_path / "query.jsonl") == records[:1]


def test_dedup_real_pairs_exact_count_and_near_duplicates_are_similar(tmp_path):
    records = read_jsonl(shared_data("zh-atec/dev.jsonl"))[:4000]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    normalised = [" ".join(unicodedata.normalize("NFKC", r["text"]).lower().split()) for r in records]
    report = dedup_pairs.main([str(path), "--output", str(tmp_path / "exact.jsonl"), "--positive_column",
                               "text_pair", "--key", "query", "--exact_only"])
    assert report["dropped"] == {"exact_duplicate": len(records) - len(set(normalised))} and report["kept"] < 4000

    report = dedup_pairs.main([str(path), "--output", str(tmp_path / "near.jsonl"), "--positive_column", "text_pair",
                               "--key", "query"])
    kept = read_jsonl(tmp_path / "near.jsonl")
    assert report["dropped"]["near_duplicate"] > 0
    # Walk the input in order: every record missing from the output is an exact copy or has a
    # similar (true 3-gram Jaccard well above chance) earlier kept query.
    kept_queries, position = [], 0
    for record, text in zip(records, normalised):
        if position < len(kept) and kept[position] == record:
            kept_queries.append(text)
            position += 1
        elif text not in kept_queries:
            assert max(jaccard(text, other, 3) for other in kept_queries) >= 0.5, text
    assert position == len(kept)


def test_score_drops_unrelated_keeps_paraphrase_and_writes_the_direct_cosine(tmp_path):
    from sentence_transformers import SentenceTransformer

    paraphrase = {"text": "A man is playing a guitar.", "text_pair": "A man plays the guitar.", "id": "paraphrase"}
    unrelated = {"text": "A man is playing a guitar.", "text_pair": "The central bank raised interest rates again.",
                 "id": "unrelated"}
    records = [paraphrase, unrelated] + read_jsonl(shared_data("en-stsb/dev.jsonl"))[:21]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    report = score_pairs.main([str(path), "--output", str(tmp_path / "scored.jsonl"), "--model", str(minilm_path()),
                               "--positive_column", "text_pair", "--threshold", "0.4", "--batch_size", "4",
                               "--score_column", "teacher_score", "--device", "cpu"])

    model = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    queries, positives = (model.encode([r[column] for r in records], normalize_embeddings=True)
                          for column in ("text", "text_pair"))
    cosines = (queries * positives).sum(1)
    expected_kept = [dict(r, teacher_score=float(c)) for r, c in zip(records, cosines) if c >= 0.4]
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert scored[0]["id"] == "paraphrase"
    assert "unrelated" not in [r.get("id") for r in scored]
    assert report["dropped"] == {"below_threshold": len(records) - len(expected_kept)} and report["kept"] > 2
    assert [{k: v for k, v in r.items() if k != "teacher_score"} for r in scored] == \
           [{k: v for k, v in r.items() if k != "teacher_score"} for r in expected_kept]
    assert [r["teacher_score"] for r in scored] == pytest.approx([r["teacher_score"] for r in expected_kept], abs=1e-5)


def test_bad_records_name_file_and_line_or_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "a", "text_pos": "b"}, {"text": "c", "text_pos": "d"},
                                                  {"text": "query without a positive"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: missing column 'text_pos'")):
        filter_pairs.main([str(path), "--output", str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()

    wrong_type = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "a", "text_pos": 7}])
    with pytest.raises(DataError, match=re.escape(f"{wrong_type}:1: column 'text_pos' must be a string, got int")):
        dedup_pairs.main([str(wrong_type), "--output", str(tmp_path / "out.jsonl")])

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"text": "a", "text_pair": "b"}] * 2), tmp_path / "pairs.parquet")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'pairs.parquet'} row 0: missing column 'text_pos'")):
        filter_pairs.main([str(tmp_path / "pairs.parquet"), "--output", str(tmp_path / "out.jsonl")])

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a", "text_pos": "b"}\n{"text": "broken\n{"text": 1, "text_pos": "x"}\n'
                     '["not", "an", "object"]\n{"text": "c", "text_pos": "d"}\n')
    report = filter_pairs.main([str(mixed), "--output", str(tmp_path / "out.jsonl"), "--skip_bad"])
    assert report["dropped"] == {"bad_record": 3} and report["kept"] == 2
    assert [example.split(": ")[0] for example in report["bad_examples"]] == [f"{mixed}:{n}" for n in (2, 3, 4)]


def test_command_line_error_is_one_clear_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "a", "text_pos": "b"}, {"query": "c"}])
    result = subprocess.run([sys.executable, "tools/filter_pairs.py", str(path), "--output", str(tmp_path / "o.jsonl")],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {path}:2: missing column 'text'" in result.stderr


def test_a_writer_whose_last_flush_fails_leaves_no_partial_file(tmp_path):
    """On a full disk the buffered tail is written at close: that failure must not leave OUT.tmp behind either."""
    import errno

    from modules.pair_tools import PairWriter

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            return self.handle.write(text)

        def close(self):
            self.handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        with PairWriter(tmp_path / "out.jsonl", []) as writer:
            writer.handle = FullDisk(writer.handle)
            writer.write({"text": "a", "text_pos": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []

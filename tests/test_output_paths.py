"""modules/output_paths.py: an output that is, holds or lies inside an input is refused, by its path as given and
through links; the pair tools refuse it as tools/export_checkpoint.py and merge_checkpoints.py do (their own tests:
tests/test_export_checkpoint.py, tests/test_merge_checkpoints.py)."""

import os
import subprocess
import sys

import pytest

from modules.cli import UsageError
from modules.output_paths import overlap, refuse_output_over_inputs
from tests.conftest import REPO, write_jsonl


def test_the_three_overlaps_and_apart(tmp_path):
    run = tmp_path / "runs" / "x"
    checkpoint = run / "checkpoint-4"
    assert overlap(checkpoint, checkpoint) == "is"
    assert overlap(run, checkpoint) == overlap(tmp_path, checkpoint) == "contains"
    assert overlap(checkpoint / "out", checkpoint) == "lies inside"
    assert overlap(run / "step4", checkpoint) is None and overlap(run / "checkpoint-40", checkpoint) is None
    assert overlap(run / "checkpoint-4" / ".." / "checkpoint-4", checkpoint) == "is"


def test_links_both_ways(tmp_path):
    """An input reached through a link inside the output (replacing the output deletes the way to it), and an output
    that is a link to the input (writing it writes the input)."""
    checkpoint, out = tmp_path / "checkpoint-4", tmp_path / "out"
    checkpoint.mkdir()
    out.mkdir()
    (out / "link").symlink_to(checkpoint)
    (tmp_path / "alias").symlink_to(checkpoint)
    assert overlap(out, out / "link") == "contains"
    assert overlap(tmp_path / "alias", checkpoint) == "is"
    with pytest.raises(UsageError, match=f"^--output {out}: the output would overwrite an input: it contains "):
        refuse_output_over_inputs(out, [tmp_path / "elsewhere", out / "link"], name=f"--output {out}")


@pytest.mark.parametrize("output", ["pairs.jsonl", "saved/kept.jsonl"], ids=["is", "lies inside"])
def test_a_pair_tool_output_over_an_input_is_refused(tmp_path, output):
    """filter_pairs.py with its output on a JSONL input, or inside a saved ``datasets`` directory it reads."""
    from datasets import Dataset

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"text": "a query", "text_pos": "its passage"}])
    Dataset.from_list([{"text": "another query", "text_pos": "another passage"}]).save_to_disk(tmp_path / "saved")
    before = {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()}
    result = subprocess.run([sys.executable, "tools/filter_pairs.py", str(pairs), str(tmp_path / "saved"), "--output",
                             str(tmp_path / output)], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    relation, source = ("is", pairs) if output == "pairs.jsonl" else ("lies inside", tmp_path / "saved")
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"error: {tmp_path / output}: the output would overwrite an input: it {relation} {source}"), result.stderr
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*")) if path.is_file()} == before

"""Progress in every long stage (issue 27): embedding for a dev evaluation, for eval/dev_scores.py and for mining
shows a bar on a terminal and plain lines (share of the characters done, elapsed, left) every ~30 s in a log;
eval/run_cmteb.py prints a line per task and per encoding in a log, and no carriage-return bars."""

import io
import json

import modules.progress
from modules.progress import TextProgress, embedding_progress


def test_progress_counts_characters_not_texts():
    """embed_texts goes shortest first: after 90 one-character texts of 100 texts the work is 8% done, not 90%."""
    texts, stream = ["a"] * 90 + ["b" * 100] * 10, io.StringIO()
    progress = TextProgress(texts, "encoding", every=0, stream=stream, last_line=True)
    for start in range(0, 100, 10):
        progress.update(texts[start:start + 10])
    lines = stream.getvalue().splitlines()
    assert lines[8].startswith("encoding: 100 texts, 8% of their characters, 0:00:00 elapsed, ")
    assert lines[-1].startswith("encoding: 100 texts, 100% of their characters") and len(lines) == 10


def test_progress_is_silent_outside_a_stage_and_on_other_processes(capsys):
    texts = ["some text"] * 5
    TextProgress(texts, None, every=0).update(texts)
    with embedding_progress("scoring", enabled=False):
        modules.progress.text_progress(texts).update(texts)
    assert capsys.readouterr().err == ""


def test_an_in_training_evaluation_shows_its_progress_in_the_log(tiny_bert, tiny_data, tmp_path, capsys,
                                                                 monkeypatch):
    import train_finetune
    from tests.test_train_finetune import common_args

    monkeypatch.setattr(modules.progress, "EVERY", 0.0)
    train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path, "--report_to", "none", "--max_steps", "1",
                                    "--eval_sts_file", str(tiny_data / "sts.jsonl"))[1:])
    err = capsys.readouterr().err
    texts = 2 * len((tiny_data / "sts.jsonl").read_text().splitlines())
    for step in (0, 1):
        assert f"step {step}: dev evaluation: {texts} texts, 100% of their characters" in err, err[-2000:]


def test_dev_scores_shows_its_progress(tiny_bert, tiny_data, tmp_path, capsys, monkeypatch):
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "eval"))
    import dev_scores
    from modules.model import EmbeddingModel

    EmbeddingModel.from_pretrained(tiny_bert).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(modules.progress, "EVERY", 0.0)
    dev_scores.main(["--no_cache", "--model", str(tmp_path / "model"), "--sts", f"sts={tiny_data / 'sts.jsonl'}"])
    err = capsys.readouterr().err
    assert f"scoring {tmp_path / 'model'}: 32 texts, 100% of their characters" in err, err


def test_run_cmteb_in_a_log_prints_a_line_per_task_and_encoding_and_no_bars(tiny_bert, tmp_path, capsys):
    import sys

    from tests.conftest import REPO, shared_data

    sys.path.insert(0, str(REPO / "eval"))
    import _eval_fixtures as fixtures
    import run_cmteb
    from modules.model import EmbeddingModel

    EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=32).save_pretrained(tmp_path / "model")
    fixtures.build_sts_task(shared_data("en-stsb/dev.jsonl"), tmp_path / "tasks" / "STSB", "test", 40)
    capsys.readouterr()  # the setup's own save bars are not run_cmteb's
    common = ["--model", str(tmp_path / "model"), "--data-dir", str(tmp_path / "tasks"), "--tasks", "STSB"]
    run_cmteb.run([*common, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "C-MTEB: task 1/1 STSB (STS), 0:00:00 elapsed" in err and "C-MTEB: STSB: embedding " in err, err
    assert "\r" not in err
    run_cmteb.run([*common, "--output-dir", str(tmp_path / "quiet"), "--no-progress"])
    err = capsys.readouterr().err
    assert "C-MTEB:" not in err and "\r" not in err
    assert json.loads((tmp_path / "quiet" / "summary.json").read_text())["tasks"]["STSB"] is not None

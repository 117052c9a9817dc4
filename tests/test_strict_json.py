"""Every JSON file a run writes is JSON: a NaN or infinite value (a dev Spearman over equal gold scores) is written as
null and named in a warning line, never as the bare NaN / Infinity that Python's json writes and no strict reader
accepts."""

import json
import shutil

import pytest

from tests.conftest import SENTENCES, write_jsonl
from tests.test_train_finetune import common_args


def strict_json(path):
    """The content of ``path``, refusing NaN and Infinity (Python's json.loads reads them, strict readers do not)."""
    def reject(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def test_non_finite_floats_are_written_as_null_and_named(tmp_path, capsys):
    from modules.json_files import write_json

    path = tmp_path / "scores.json"
    write_json(path, {"steps": {0: {"spearman": float("nan"), "ap": 71.5}}, "rates": [1.0, float("inf")],
                      "pair": (float("-inf"), 2), "name": "run"})
    assert strict_json(path) == {"steps": {"0": {"spearman": None, "ap": 71.5}}, "rates": [1.0, None],
                                 "pair": [None, 2], "name": "run"}
    assert capsys.readouterr().err == (f"warning: {path}: not finite, written as null: steps.0.spearman = nan; "
                                       "rates[1] = inf; pair[0] = -inf\n")
    write_json(path, {"spearman": 80.0})  # nothing to say
    assert strict_json(path) == {"spearman": 80.0} and capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def flat_dev(tmp_path_factory):
    """An STS dev file whose gold scores are all equal: its Spearman is NaN at every evaluation."""
    path = tmp_path_factory.mktemp("flat_dev") / "dev.jsonl"
    write_jsonl(path, [{"text": s, "text_pair": SENTENCES[(i + 3) % len(SENTENCES)], "label": 2.0}
                       for i, s in enumerate(SENTENCES)])
    return path


def train(tiny_bert, tiny_data, flat_dev, output_dir, *extra):
    """Two steps scored on the flat dev file at every step, a checkpoint a step, WiSE-FT (final/ scored as saved)."""
    import train_finetune

    train_finetune.main(common_args(tiny_bert, tiny_data, output_dir, "--report_to", "none", "--num_workers", "0",
                                    "--eval_sts_file", str(flat_dev), "--eval_every", "1", "--max_steps", "2",
                                    "--save_every", "1", "--metric_for_best", "sts_spearman", "--wise_ft_alpha", "0.5",
                                    *extra)[1:])


@pytest.mark.filterwarnings("ignore:An input array is constant")  # the NaN these tests are about
def test_a_nan_dev_metric_is_null_in_every_json_of_the_run(tiny_bert, tiny_data, flat_dev, tmp_path, capsys):
    train(tiny_bert, tiny_data, flat_dev, tmp_path)
    err = capsys.readouterr().err
    summary = strict_json(tmp_path / "train_summary.json")
    assert summary["final_scores"] == {"sts_spearman": None} and "best" not in summary  # NaN is never best
    assert f"warning: {tmp_path / 'train_summary.json'}: not finite, written as null: final_scores.sts_spearman = nan" \
        in err
    results = strict_json(tmp_path / "eval_results.json")
    assert results["metrics_by_step"] == {step: {"sts_spearman": None} for step in ("0", "1", "2")}
    assert results["sts_spearman_by_step"] == {"0": None, "1": None, "2": None}
    assert results["final_scores"] == {"sts_spearman": None}
    assert f"warning: {tmp_path / 'eval_results.json'}: not finite, written as null: metrics_by_step.0.sts_spearman " \
        "= nan" in err
    for step in (1, 2):
        state = strict_json(tmp_path / f"checkpoint-{step}" / "trainer_state.json")
        assert state["eval_history"] == {str(s): {"sts_spearman": None} for s in range(step + 1)}


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_a_run_resumed_from_a_null_metric_reports_it_as_nan(tiny_bert, tiny_data, flat_dev, tmp_path, capsys):
    """The history read back from trainer_state.json holds null: the resumed run reports and writes it as before."""
    first = tmp_path / "first"
    train(tiny_bert, tiny_data, flat_dev, first)
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoint-1", resumed / "checkpoint-1")
    capsys.readouterr()
    train(tiny_bert, tiny_data, flat_dev, resumed, "--resume_from_checkpoint", "latest")
    out = capsys.readouterr().out
    assert f"resumed from {resumed / 'checkpoint-1'} at step 1" in out
    assert "dev Spearman: step 0 nan -> step 2 nan" in out  # the history read back holds NaN again, not None
    results = strict_json(resumed / "eval_results.json")
    assert results["metrics_by_step"] == {step: {"sts_spearman": None} for step in ("0", "1", "2")}

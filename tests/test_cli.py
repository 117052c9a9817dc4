"""The command line as a researcher meets it: fast --help with defaults, one-line errors, output dirs that
never mix two runs, a start-up summary, plain log lines in a log file, trackers."""

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_train_finetune import common_args

SCRIPTS = ["train_finetune.py", "train_pretrain.py", "train_llm_embed.py"]


def run(args):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_shows_every_default(script):
    result, seconds = run([script, "--help"])
    assert result.returncode == 0, result.stderr
    assert seconds < 1.0, f"{script} --help took {seconds:.2f} s"
    assert re.search(r"--lr LR\s+\(default: 2e-05\)", result.stdout)
    if script != "train_pretrain.py":
        assert re.search(r"--retri_temperature RETRI_TEMPERATURE\s+\(default: 0.01\)", result.stdout)
    else:
        assert re.search(r"--warmup_ratio WARMUP_RATIO\s+warmup steps as a share of --max_steps \(default: 0.1\)",
                         result.stdout)


def test_llm_help_states_its_pooling_and_no_encoder_only_flags():
    result, _ = run(["train_llm_embed.py", "--help"])
    assert re.search(r"--pooling \{mean,cls,lasttoken\}\s+\(default: 'lasttoken'\)", result.stdout)
    for refused in ("--extend_pe", "--pe_alpha", "--freeze_position_embeddings"):
        assert refused not in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_error_is_one_fast_line_with_exit_2(script, tmp_path):
    result, seconds = run([script, "--model_name_or_path", "m", "--meta_list", "x", "--output_dir", str(tmp_path),
                           "--lr", "fast"])
    assert result.returncode == 2 and seconds < 1.0, (result.returncode, seconds)
    assert result.stderr.strip().splitlines() == [
        f"{script}: error: argument --lr: invalid float value: 'fast' (see --help)"]


def test_a_missing_start_model_is_one_line_with_exit_2(tiny_data, tmp_path):
    result, _ = run(common_args(tmp_path / "no_model", tiny_data, tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"train_finetune.py: error: model {tmp_path / 'no_model'}: no such directory"


def test_a_used_output_dir_is_refused_unless_resuming_or_overwriting(tiny_bert, tiny_data, tmp_path):
    """An earlier run's checkpoints, scores and tracker logs must not sit beside a new run's model."""
    import train_finetune

    out = tmp_path / "run"
    train_finetune.main(common_args(tiny_bert, tiny_data, out, "--max_steps", "2", "--save_every", "1")[1:])
    assert (out / "checkpoint-1").is_dir()
    with pytest.raises(SystemExit) as refused:
        train_finetune.main(common_args(tiny_bert, tiny_data, out, "--max_steps", "2")[1:])
    assert refused.value.code == 2
    with pytest.raises(SystemExit):
        train_finetune.main(common_args(tiny_bert, tiny_data, out, "--max_steps", "2", "--overwrite_output_dir",
                                        "--resume_from_checkpoint", "latest")[1:])
    train_finetune.main(common_args(tiny_bert, tiny_data, out, "--max_steps", "2", "--resume_from_checkpoint",
                                    "latest")[1:])  # continues its own run
    train_finetune.main(common_args(tiny_bert, tiny_data, out, "--max_steps", "1", "--overwrite_output_dir")[1:])
    assert not list(out.glob("checkpoint-*")) and (out / "final").is_dir()
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 1
    assert len(list((out / "finetune").glob("events.out.tfevents*"))) == 1


def test_refused_output_dir_message(tiny_data, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    result, seconds = run(common_args(tmp_path / "m", tiny_data, tmp_path))
    assert result.returncode == 2 and seconds < 1.0
    assert result.stderr.strip() == (
        f"train_finetune.py: error: --output_dir {tmp_path} is not empty (old.txt): no checkpoint or final model (a run "
        "that stopped before saving one, or other files), nothing to resume: replace it with --overwrite_output_dir, "
        "or choose another directory (see --help)")


def test_start_up_summary_plain_log_lines_and_training_only_throughput(tiny_bert, tiny_data, tmp_path, capsys,
                                                                      monkeypatch):
    """Before step one the run says what it will do; in a log file (stderr not a terminal) every --log_every
    steps is one plain line; pairs/s counts training time only, not a (here slow) evaluation."""
    import modules.evaluation
    import train_finetune

    calls = []

    def spearman_slow_after_step_one(*args, **kwargs):
        calls.append(1)
        time.sleep(6 if len(calls) == 2 else 0)  # the evaluation after step 1
        return 0.5

    monkeypatch.setattr(modules.evaluation, "sts_spearman", spearman_slow_after_step_one)
    train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "3", "--eval_every", "1",
                                    "--eval_sts_file", str(tiny_data / "sts.jsonl"), "--num_workers", "0")[1:])
    out, err = capsys.readouterr()
    assert "datasets:\n  retri (retri_contrast, " in out
    assert re.search(r"  sts \(cosent, .*meta.txt:5\): 16 records, batch 4 per process / 4 global, 4 batches an "
                     r"epoch, 25.0% of the steps", out)
    assert "steps: 3, warmup 1, 16 steps an epoch (0.19 epochs), gradient accumulation 1" in out
    assert "processes: 1 (single process); master weights float32, mixed precision no, final/ saved as float32" in out
    assert f"outputs: {tmp_path}/final, no checkpoints (--save_every 0), trackers: tensorboard" in out
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "\r" not in err
    # step 2's window holds one 4-pair step, after a 6 s evaluation: 4 / (6 s + the step) < 0.67 if it counted
    pairs_per_s = float(re.search(r"pairs_per_s (\S+)", lines[1]).group(1))
    assert pairs_per_s > 1.0, lines
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert [(d["name"], d["kind"], d["records"], d["share"]) for d in summary["datasets"]] == [
        ("retri", "retri_contrast", 16, 0.5), ("cls", "cls_contrast", 16, 0.25), ("sts", "cosent", 16, 0.25)]
    assert summary["total_steps"] == 3 and summary["warmup_steps"] == 1 and summary["processes"] == 1


def test_report_to_none_writes_no_tracker_files_and_a_missing_tracker_is_refused(tiny_bert, tiny_data, tmp_path,
                                                                                monkeypatch):
    import accelerate.tracking

    import train_finetune

    train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path / "a", "--max_steps", "1", "--report_to",
                                    "none")[1:])
    assert not (tmp_path / "a" / "finetune").exists() and (tmp_path / "a" / "final").is_dir()
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"--report_to wandb,tensorboard: wandb, tensorboard not installed"):
        train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path / "b", "--max_steps", "1", "--report_to",
                                        "wandb,tensorboard")[1:])
    result, _ = run(common_args(tiny_bert, tiny_data, tmp_path / "c", "--report_to", "neptune"))
    assert result.returncode == 2 and "--report_to 'neptune'" in result.stderr


def test_a_run_prints_no_warnings_that_look_like_failure(tiny_bert, tiny_data, tmp_path):
    """No DeepSpeed device guess, no deprecation warnings from our own calls, no 'newly initialized' table at save,
    no progress-bar carriage returns in a log file."""
    result, _ = run(common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "1", "--gradient_checkpointing",
                                "--save_every", "1"))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for noise in ("Setting accelerator to CPU", "deprecated", "FutureWarning", "MISSING", "newly initialized", "\r"):
        assert noise not in output, (noise, output)


def test_every_script_and_tool_shows_its_defaults_in_help():
    """The reported case: tools/mine_hard_negatives.py --help showed no defaults. Every command-line script of the
    repo (training, eval/, tools/) builds its parser with modules.cli.ArgumentParser, which shows them."""
    scripts = [*REPO.glob("train_*.py"), *(REPO / "eval").glob("*.py"), *(REPO / "tools").glob("*.py")]
    plain = [str(path.relative_to(REPO)) for path in scripts if "argparse.ArgumentParser(" in path.read_text()]
    assert plain == []
    shown = subprocess.run([sys.executable, str(REPO / "tools" / "mine_hard_negatives.py"), "--help"],
                           capture_output=True, text=True, timeout=120).stdout
    helps = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=-)", shown)}
    for flag, default in [("--num_negatives", "7"), ("--range_end", "210"), ("--index", "'auto'")]:
        assert helps[flag].endswith(f"(default: {default})"), helps[flag]

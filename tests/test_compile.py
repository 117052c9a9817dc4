"""--torch_compile (modules/compilation.py): the same losses as eager, weights saved and resumed as eager ones, a
bounded number of graphs over varying shapes, and one-line refusals of what it cannot do."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, assert_same_final_weights
from tests.test_train_finetune import common_args

# inductor's fused kernels sum in another order than eager's: measured on the tiny BERT over the steps below, the losses
# and gradient norms differed by at most 1.2e-6 relative (float32)
LOSS_RTOL = 1e-5


def logged_losses(monkeypatch):
    """Every loss ("loss/<kind>") and gradient norm the run logs, per step."""
    from modules.progress import Progress

    logged = {}
    original = Progress.log

    def log(self, step, metrics):
        logged[step] = {name: value for name, value in metrics.items()
                        if name.startswith("loss") or name == "grad_norm"}
        original(self, step, metrics)

    monkeypatch.setattr(Progress, "log", log)
    return logged


def finetune(model, data, output_dir, monkeypatch, *extra):
    """train_finetune.py in this process, 8 steps saving at 4 and 8; the losses it logged."""
    import train_finetune

    losses = logged_losses(monkeypatch)
    train_finetune.main(common_args(model, data, output_dir, "--max_steps", "8", "--save_every", "4",
                                    "--report_to", "none", *extra)[1:])
    return losses


def test_compiled_finetune_resumes_eager_with_its_losses_and_saves_eager_weights(tiny_bert_no_dropout, tiny_data,
                                                                                 tmp_path, monkeypatch):
    """An eager run, and a compiled run resumed from its step-4 checkpoint (one compile, in this process; no dropout,
    whose masks inductor draws differently): steps 5-8 (all three task kinds, varying lengths and sub-batches) log the
    eager losses within LOSS_RTOL and end at the eager weights; the compiled run's checkpoint and final/ hold the eager
    keys (no _orig_mod.), so either kind of run resumes the other's checkpoints; one graph did it all."""
    eager = finetune(tiny_bert_no_dropout, tiny_data, tmp_path / "eager", monkeypatch)
    compiled = finetune(tiny_bert_no_dropout, tiny_data, tmp_path / "compiled", monkeypatch, "--torch_compile",
                        "--resume_from_checkpoint", str(tmp_path / "eager" / "checkpoint-4"))
    assert sorted(compiled) == [5, 6, 7, 8]
    assert {name for step in compiled for name in compiled[step]} >= {"loss/retri_contrast", "loss/cls_contrast",
                                                                       "loss/cosent"}
    for step, metrics in compiled.items():
        assert metrics.keys() == eager[step].keys()
        for name, value in metrics.items():
            assert value == pytest.approx(eager[step][name], rel=LOSS_RTOL), (step, name)

    checkpoint_keys = [load_file(tmp_path / run / "checkpoint-8" / "model.safetensors").keys()
                       for run in ("eager", "compiled")]
    assert checkpoint_keys[1] == checkpoint_keys[0]  # no _orig_mod. prefix
    final = assert_same_final_weights(tmp_path / "eager", tmp_path / "compiled", exact=False)  # the same keys too
    assert not [key for key in final if "_orig_mod" in key]
    summary = json.loads((tmp_path / "compiled" / "train_summary.json").read_text())["torch_compile"]
    assert summary["graphs"] == 1 and summary["graph_breaks"] == 0 and summary["compile_seconds"] > 0, summary


@pytest.mark.parametrize("flag", ["--padding_free", "--gradient_checkpointing"])
def test_flags_it_cannot_serve_are_refused_in_one_line_before_anything_loads(flag, tmp_path):
    result = subprocess.run([sys.executable, "train_finetune.py", "--model_name_or_path", "unread", "--meta_list",
                             "unread", "--output_dir", str(tmp_path / "out"), "--torch_compile", flag],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--torch_compile with {flag}" in result.stderr


@pytest.mark.parametrize("variable, value, named", [("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed"),
                                                    ("ACCELERATE_USE_FSDP", "true", "FSDP"),
                                                    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "dynamo_backend")])
@pytest.mark.parametrize("script", ["train_finetune", "train_pretrain"])
def test_launchers_it_cannot_run_under_are_refused(script, variable, value, named, tmp_path, monkeypatch, capsys):
    """accelerate launch names the launcher in these variables (what the Accelerator itself reads)."""
    import importlib

    parse_args = importlib.import_module(script).parse_args
    argv = ["--model_name_or_path", "unread", "--meta_list", "unread", "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1"][: 8 if script == "train_pretrain" else 6]
    monkeypatch.setenv(variable, value)
    parse_args(argv)  # eager runs are not refused
    with pytest.raises(SystemExit) as stop:
        parse_args([*argv, "--torch_compile"])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(error.splitlines()) == 1 and named in error and "--torch_compile" in error


def test_the_gpu_checks_compiled_run_parses(tmp_path):
    """bench/gpu_check.py runs it only on a GPU (compiling on CPU would slow the smoke check): its flags are checked."""
    from bench.gpu_check import SMOKE, compiled_variant, finetune_flags
    from train_finetune import parse_args

    args = parse_args(finetune_flags("unread", "unread", SMOKE["encoder"], 3) + compiled_variant()
                      + ["--output_dir", str(tmp_path / "out")])
    assert args.torch_compile

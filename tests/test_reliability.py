"""No run ends "successfully" with a wrong model or lost work: flags that make the math undefined, non-finite
losses and weights, a start model without its tokenizer, inputs longer than the position table, a half-written
final/, crafted or truncated checkpoints, and errors under accelerate launch."""

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SENTENCES, accelerate_cmd, write_jsonl
from tests.test_train_finetune import common_args


def run(args, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def assert_refused(result, *expected):
    """Exit 2, no traceback, the last line naming what is wrong."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in last_line(result), (text, last_line(result))


@pytest.fixture(scope="module")
def sts_data(tmp_path_factory):
    """One CoSENT dataset (64 batches of 4 over four repeats) and its meta list."""
    root = tmp_path_factory.mktemp("sts")
    n = len(SENTENCES)
    write_jsonl(root / "sts.jsonl", [{"text": s, "text_pair": SENTENCES[(i * 3) % n], "label": float((i * 7) % 6)}
                                     for i, s in enumerate(SENTENCES)])
    (root / "meta.txt").write_text("sts.jsonl 4 type=cosent\n")
    return root


# --------------------------------------------------------------------------- flags


FINETUNE = ["train_finetune.py", "--model_name_or_path", "m", "--meta_list", "x"]
PRETRAIN = ["train_pretrain.py", "--model_name_or_path", "m", "--meta_list", "x", "--max_steps", "5"]
LLM = ["train_llm_embed.py", "--model_name_or_path", "m", "--meta_list", "x"]


@pytest.mark.parametrize("command, flags, named", [
    (FINETUNE, ["--retri_temperature", "0"], "--retri_temperature must be > 0"),
    (FINETUNE, ["--cls_temperature", "-0.05"], "--cls_temperature must be > 0"),
    (FINETUNE, ["--cosent_temperature", "nan"], "--cosent_temperature must be a finite number"),
    (PRETRAIN, ["--temperature", "0"], "--temperature must be > 0"),
    (FINETUNE, ["--mrl_dims", "64,abc"], "--mrl_dims 64,abc"),
    (FINETUNE, ["--mrl_dims", "0,384"], "--mrl_dims 0,384"),
    (PRETRAIN, ["--mrl_dims=-8,384"], "--mrl_dims -8,384"),
    (FINETUNE, ["--mrl_dims", "64,384", "--mrl_weights", "0,0"], "--mrl_weights 0,0"),
    (FINETUNE, ["--mrl_dims", "64,384", "--mrl_weights", "1,-1"], "--mrl_weights 1,-1"),
    (FINETUNE, ["--mrl_weights", "1,1"], "--mrl_weights needs --mrl_dims"),
    (FINETUNE, ["--retri_batch_size", "0"], "--retri_batch_size must be >= 1"),
    (FINETUNE, ["--cosent_batch_size", "-2"], "--cosent_batch_size must be >= 1"),
    (FINETUNE, ["--grad_accum", "0"], "--grad_accum must be >= 1"),
    (LLM, ["--grad_accum", "0"], "--grad_accum must be >= 1"),
    (PRETRAIN, ["--batch_size", "0"], "--batch_size must be >= 1"),
    (FINETUNE, ["--scaling_dim", "-4"], "--scaling_dim must be >= 1"),
    (FINETUNE, ["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    (PRETRAIN, ["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    (FINETUNE, ["--lr=-1e-5"], "--lr must be >= 0"),
    (FINETUNE, ["--lr", "inf"], "--lr must be a finite number"),
    (FINETUNE, ["--hard_negative_alpha", "nan"], "--hard_negative_alpha must be a finite number"),
    (FINETUNE, ["--ema_decay", "1"], "--ema_decay must be in [0, 1)"),
    (FINETUNE, ["--improved_contrastive", "--cbb"], "--improved_contrastive needs in-batch negatives without --cbb"),
    (FINETUNE, ["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1]"),
    (FINETUNE, ["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    (FINETUNE, ["--retri_weight", "-1"], "--retri_weight must be >= 0"),
    (FINETUNE, ["--retri_weight", "0", "--cls_weight", "0", "--cosent_weight", "0"], "loss weights are all 0"),
    (FINETUNE, ["--epochs", "0"], "--epochs must be >= 1"),
    (FINETUNE, ["--query_max_len", "0"], "--query_max_len must be >= 1"),
    (FINETUNE, ["--length_buckets", "0"], "--length_buckets: expected auto or an integer >= 1"),
    (FINETUNE, ["--eval_every", "-5"], "--eval_every must be >= 0"),
    (FINETUNE, ["--save_every", "-1"], "--save_every must be >= 0"),
    (FINETUNE, ["--dhnm_interval", "0"], "--dhnm_interval must be >= 1"),
    (FINETUNE, ["--num_workers", "-1"], "--num_workers must be >= 0"),
    (FINETUNE, ["--timeout_minutes", "0"], "--timeout_minutes must be > 0"),
    (LLM, ["--lora_r", "0"], "--lora_r must be >= 1"),
])
def test_flags_that_make_the_math_undefined_are_refused_at_once(command, flags, named, tmp_path):
    started = time.perf_counter()
    result = run([sys.executable, *command, "--output_dir", str(tmp_path / "out"), *flags], timeout=60)
    assert_refused(result, named)
    assert time.perf_counter() - started < 2, "refused after loading the model or data"


# --------------------------------------------------------------------------- non-finite values


def test_a_non_finite_loss_stops_the_run_naming_step_dataset_and_loss(tiny_bert, sts_data, tmp_path):
    """--lr 1e4 without clipping: the weights blow up after a few steps. The run stops at the first non-finite loss,
    before the optimizer applies it; no checkpoint or final/ holds a non-finite weight."""
    from safetensors.torch import load_file
    import torch

    output = tmp_path / "out"
    result = run([sys.executable, "train_finetune.py", "--model_name_or_path", str(tiny_bert), "--meta_list",
                  str(sts_data / "meta.txt"), "--output_dir", str(output), "--cosent_batch_size", "4", "--lr", "1e4",
                  "--max_grad_norm", "0", "--max_steps", "12", "--save_every", "1", "--pair_max_len", "16",
                  "--report_to", "none"])
    assert_refused(result, "loss", "cosent", "sts (", "is nan")
    assert "step " in last_line(result)
    assert not (output / "final").exists()
    checkpoints = sorted(output.glob("checkpoint-*"))
    for checkpoint in checkpoints:
        for name, value in load_file(checkpoint / "model.safetensors").items():
            assert torch.isfinite(value).all(), (checkpoint.name, name)


def test_final_is_never_written_from_non_finite_weights(tiny_bert, tmp_path):
    from modules.cli import UsageError
    from modules.nonfinite import check_finite_weights
    import torch

    check_finite_weights({"a": torch.ones(3), "step": torch.tensor([1])}, "final/")
    with pytest.raises(UsageError, match=r"final/: 1 non-finite value in backbone.layer.weight"):
        check_finite_weights({"a": torch.ones(3), "backbone.layer.weight": torch.tensor([1.0, float("inf")])},
                             "final/")


# --------------------------------------------------------------------------- start model and lengths


def test_a_start_model_without_tokenizer_files_is_refused(tiny_bert, tiny_data, tmp_path):
    """Without them transformers builds a 5-token vocabulary: every word would become [UNK]."""
    model_dir = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_bert, model_dir)
    for path in model_dir.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    result = run([sys.executable, *common_args(model_dir, tiny_data, tmp_path / "out", "--max_steps", "1")])
    assert_refused(result, f"model {model_dir}: no tokenizer", "tokenizer.json")
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("script, flag", [("train_finetune.py", "--passage_max_len"),
                                          ("train_pretrain.py", "--passage_max_len")])
def test_a_max_length_beyond_the_position_table_is_refused_at_start(tiny_bert, tiny_data, tmp_path, script, flag):
    """The tiny BERT has 128 positions: a long batch would crash mid-run with nothing saved."""
    if script == "train_finetune.py":
        command = common_args(tiny_bert, tiny_data, tmp_path / "out", "--max_steps", "1", flag, "200")
    else:
        write_jsonl(tmp_path / "pairs.jsonl", [{"text": s, "text_pos": s + " today"} for s in SENTENCES])
        (tmp_path / "pt.txt").write_text("pairs.jsonl 1\n")
        command = [script, "--model_name_or_path", str(tiny_bert), "--meta_list", str(tmp_path / "pt.txt"),
                   "--output_dir", str(tmp_path / "out"), "--batch_size", "4", "--max_steps", "1", flag, "200"]
    result = run([sys.executable, *command])
    assert_refused(result, f"{flag} 200: the model has 128 positions")
    if script == "train_finetune.py":
        assert "--extend_pe" in last_line(result)


# --------------------------------------------------------------------------- final/ and checkpoints


def test_a_kill_during_the_final_save_leaves_no_final_directory(tiny_bert, sts_data, tmp_path, monkeypatch):
    """A final/ without modules.json would load in sentence-transformers as another model (mean pooling, no
    ScalingLayer): final/ appears whole or not at all."""
    import modules.outputs
    import train_finetune

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(modules.outputs, "write_model_card", killed)
    monkeypatch.setattr(sys, "argv", ["train_finetune.py"])
    output = tmp_path / "out"
    with pytest.raises(Killed):
        train_finetune.main(["--model_name_or_path", str(tiny_bert), "--meta_list", str(sts_data / "meta.txt"),
                             "--output_dir", str(output), "--cosent_batch_size", "4", "--max_steps", "1",
                             "--scaling_dim", "24", "--pair_max_len", "16", "--report_to", "none"])
    assert not (output / "final").exists()


@pytest.fixture(scope="module")
def saved_run(tiny_bert, tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "out"
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, output, "--max_steps", "4", "--save_every", "2")])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.parametrize("file_name", ["model.safetensors", "optimizer.bin", "scheduler.bin"])
def test_a_truncated_checkpoint_file_is_named(saved_run, tiny_bert, tiny_data, tmp_path, file_name):
    output = tmp_path / "out"
    shutil.copytree(saved_run, output)
    damaged = output / "checkpoint-4" / file_name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, output, "--max_steps", "4",
                                               "--resume_from_checkpoint", "latest")])
    assert_refused(result, str(damaged))


def test_resuming_latest_without_a_checkpoint_says_it_starts_afresh(tiny_bert, tiny_data, tmp_path):
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "out", "--max_steps", "1",
                                               "--resume_from_checkpoint", "latest")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no checkpoint in {tmp_path / 'out'}: starting at step 0" in result.stdout + result.stderr


class Payload:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_holding_a_pickle_of_ours_is_refused_without_unpickling_it(saved_run, tiny_bert, tiny_data,
                                                                                  tmp_path):
    """The DHNM state is saved as safetensors; a custom_checkpoint_*.pkl (accelerate's register_for_checkpointing,
    loaded with weights_only=False) is never read."""
    output = tmp_path / "out"
    shutil.copytree(saved_run, output)
    marker = tmp_path / "code_ran"
    with open(output / "checkpoint-4" / "custom_checkpoint_0.pkl", "wb") as handle:
        pickle.dump(Payload(marker), handle)
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, output, "--max_steps", "4",
                                               "--resume_from_checkpoint", "latest")])
    assert not marker.exists()
    assert_refused(result, "custom_checkpoint_0.pkl")


# --------------------------------------------------------------------------- a full disk


def no_space(path=None):
    """The error a write into a full disk raises: OSError 28, naming the file when open() raised it, not write()."""
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


def full_disk_at_checkpoint_4(monkeypatch, output):
    """accelerate's save_state finds the disk full writing checkpoint 4's optimizer state (half written)."""
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save
    target = output / "checkpoint-4.tmp" / "optimizer.bin"

    def save(obj, path, *args, **kwargs):
        if Path(path) == target:
            target.write_bytes(b"PK half")
            raise no_space(target)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    return target


def full_disk_at_the_summary(monkeypatch, output):
    """train_summary.json's write() finds the disk full: an OSError without a file name, as Path.write_text raises."""
    real_write_text = Path.write_text
    target = output / "train_summary.json"

    def write_text(self, data, *args, **kwargs):
        if self == target:
            with open(self, "w") as handle:
                handle.write(data[:10])
                raise no_space()
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return target


@pytest.mark.parametrize("fill_disk, kept", [(full_disk_at_checkpoint_4, [2]), (full_disk_at_the_summary, [2, 4, 6])])
def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_with_nothing_lost(
        tiny_bert, sts_data, tmp_path, monkeypatch, capsys, fill_disk, kept):
    """The script ends with exit status 2 and one line naming the file being written (a traceback before); the complete
    checkpoints stay, and resuming from the latest ends with the weights of a run that never stopped."""
    import train_finetune
    from modules.checkpoints import completed_checkpoints
    from modules.cli import run_cli
    from tests.conftest import assert_same_final_weights

    def args(output, *extra):
        return ["--model_name_or_path", str(tiny_bert), "--meta_list", str(sts_data / "meta.txt"), "--output_dir",
                str(output), "--cosent_batch_size", "4", "--max_steps", "6", "--save_every", "2", "--pair_max_len",
                "16", "--report_to", "none", *extra]

    train_finetune.main(args(tmp_path / "whole"))
    output = tmp_path / "out"
    with monkeypatch.context() as patches:
        target = fill_disk(patches, output)
        patches.setattr(sys, "argv", ["train_finetune.py"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            run_cli(lambda: train_finetune.main(args(output)))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"train_finetune.py: error: {target}: no space left on device;")
    assert completed_checkpoints(output) == [output / f"checkpoint-{step}" for step in kept]
    train_finetune.main(args(output, "--resume_from_checkpoint", "latest"))
    assert f"resumed from {output / f'checkpoint-{kept[-1]}'}" in capsys.readouterr().out
    assert_same_final_weights(tmp_path / "whole", output)
    assert (output / "train_summary.json").read_text() and not (output / "checkpoint-4.tmp").exists()


def torch_save_past_the_end_of_the_disk(path):
    """torch.save failing as it does on a full disk (seen on a 64 KiB tmpfs): its zip writer raises RuntimeError
    "unexpected pos", with no errno and no file name. A file size limit makes the write fail the same way here."""
    import resource
    import signal

    import torch

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        torch.save({"state": torch.zeros(10_000)}, str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def safetensors_save_file(tensors, filename):
    """What safetensors raises on a full disk (seen on a 64 KiB tmpfs): no OSError, the errno in its message."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def json_dump(obj, fp):
    """json.dump's write into a full disk: OSError 28 without a file name; the open file names it."""
    raise no_space()


class JsonlWriter:
    """A writer holding its open file (as the data tools' PairWriter does); its write finds the disk full."""

    def __init__(self, path):
        self.handle = open(path, "w")

    def write(self, record):
        raise no_space()


def writing(path, how):
    import errno

    if how == "quota":
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(path))
    if how == "safetensors":
        safetensors_save_file({}, str(path))
    if how in ("torch", "torch, disk not full"):
        torch_save_past_the_end_of_the_disk(path)
    if how == "writer":
        JsonlWriter(path).write({"text": "q"})
    with open(path, "w") as handle:
        json_dump({}, handle)


@pytest.mark.parametrize("how, problem", [("quota", "disk quota exceeded"), ("safetensors", "no space left on device"),
                                          ("torch", "no space left on device"), ("json", "no space left on device"),
                                          ("writer", "no space left on device")])
def test_a_full_disk_is_one_line_naming_the_file_whichever_writer_found_it(tmp_path, monkeypatch, capsys, how, problem):
    from modules.cli import run_cli

    path = tmp_path / "out" / "optimizer.bin"
    path.parent.mkdir()
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))  # no free block
    monkeypatch.setattr(os, "statvfs", lambda target: full)
    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(SystemExit) as stopped:
        run_cli(lambda: writing(path, how))
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tool.py: error: {path}: {problem}; free some space and run again (a training run resumes from its last "
        "complete checkpoint with --resume_from_checkpoint latest)"]


def test_a_failed_write_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """torch's writer says nothing of why it failed: only a disk left without a free block makes it a full disk."""
    from modules.cli import run_cli

    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(RuntimeError, match="unexpected pos"):
        run_cli(lambda: writing(tmp_path / "optimizer.bin", "torch, disk not full"))
    with pytest.raises(PermissionError):
        run_cli(lambda: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(tmp_path))))


# --------------------------------------------------------------------------- under accelerate launch


@pytest.mark.parametrize("processes", [1, 2])
def test_under_accelerate_launch_the_error_is_the_last_line(tiny_bert, tmp_path, processes):
    """The documented launch (accelerate launch -q) ends with the script's one-line error, not a launcher
    traceback; with 2 processes torch's failure report shows it as the root cause, its last line before the border."""
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "text_pair": "b", "label": "high"}\n')
    (tmp_path / "meta.txt").write_text("bad.jsonl 1 type=cosent\n")
    env = {"OMP_NUM_THREADS": "1"}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    result = run([*accelerate_cmd(processes), "-q", "train_finetune.py", "--model_name_or_path", str(tiny_bert),
                  "--meta_list", str(tmp_path / "meta.txt"), "--output_dir", str(tmp_path / "out")], env_extra=env)
    assert result.returncode != 0
    lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip().strip("=")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].endswith(f"train_finetune.py: error: {tmp_path / 'bad.jsonl'}:1: column 'label' must be a "
                              "number, got 'high'"), result.stderr[-3000:]


def test_timeout_minutes_reaches_the_process_group(tmp_path):
    """A paused process makes the others wait --timeout_minutes, not gloo's 30-minute default."""
    script = tmp_path / "paused.py"
    script.write_text(
        "import os, time\n"
        "from modules.training import make_accelerator\n"
        f"accelerator = make_accelerator({str(tmp_path / 'out')!r}, report_to=['none'], timeout_minutes=0.1)\n"
        "if accelerator.process_index == 1:\n"
        "    time.sleep(60)\n"
        "accelerator.wait_for_everyone()\n")
    started = time.perf_counter()
    result = run([*accelerate_cmd(2), "-q", str(script)], env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                 timeout=120)
    assert result.returncode != 0 and "Timed out waiting 6000ms" in result.stderr, result.stderr[-3000:]
    assert time.perf_counter() - started < 50, "the waiting process did not time out"


def test_every_documented_launch_is_quiet():
    """What a researcher copies launches with -q, so a bad input ends with its one line."""
    documents = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "Makefile",
                 *sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").iterdir()),
                 "train_finetune.py", "train_pretrain.py", "train_llm_embed.py"]
    loud = [f"{name}: {line.strip()}" for name in documents for line in (REPO / name).read_text().splitlines()
            if re.search(r"accelerate launch(?! -q)(\s|$)", line)]
    assert not loud, loud


def test_an_instruction_template_with_an_unknown_field_is_refused():
    from modules.llm import LLMSetupError, instruction_prompts

    assert instruction_prompts("Instruct: {task}\\nQuery: ", {"nli": "find entailed"}) == {
        "nli": "Instruct: find entailed\nQuery: "}
    with pytest.raises(LLMSetupError, match=r"unknown field \{instruction\}; the fields are \{task\} and \{text\}"):
        instruction_prompts("Instruct: {instruction}\\nQuery: {text}", {"nli": "find entailed"})

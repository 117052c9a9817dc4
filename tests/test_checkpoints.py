"""Checkpoints: a resume under a changed data setup is refused; replacing a checkpoint never leaves a half one."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modules import checkpoints
from modules.checkpoints import resolve_checkpoint, save_checkpoint
from tests.conftest import REPO
from tests.test_train_finetune import common_args

FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl")


@pytest.fixture(scope="module")
def saved_run(tiny_bert, tiny_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, output, "--max_steps", "3", "--save_every", "3")])
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def run(command):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.parametrize("change, expected", [
    (["--seed", "12"], "seed: 11 -> 12"),
    (["--cosent_batch_size", "2"], "datasets[2].batch_size: 4 -> 2"),
    (["--grad_accum", "2"], "grad_accum: 1 -> 2"),
    (["--meta_list", "OTHER"], "datasets[0].repeat: 2 -> 1"),
])
def test_resume_with_a_changed_setup_is_refused(saved_run, tiny_bert, tiny_data, tmp_path, change, expected):
    if change[1] == "OTHER":  # the same files, the retrieval set drawn once an epoch instead of twice
        other = tmp_path / "meta.txt"
        other.write_text((tiny_data / "meta.txt").read_text().replace("retri.jsonl 2", f"{tiny_data / 'retri.jsonl'} 1")
                         .replace("cls.jsonl", f"{tiny_data / 'cls.jsonl'}").replace("sts.jsonl", f"{tiny_data / 'sts.jsonl'}"))
        change = ["--meta_list", str(other)]
    result = run([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "again", "--max_steps", "6",
                                               "--resume_from_checkpoint", str(saved_run / "checkpoint-3"), *change)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("train_finetune.py: error: ") and "saved with another data setup" in message
    assert expected in message, message


def test_resume_with_another_process_count_or_a_missing_random_state_is_refused(saved_run, tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(saved_run / "checkpoint-3", checkpoint)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["data_order"]
    with pytest.raises(checkpoints.UsageError, match=r"processes: 1 -> 2"):
        checkpoints.check_resumable(checkpoint, {**saved, "processes": 2}, 2)
    (checkpoint / "random_states_0.pkl").unlink()
    with pytest.raises(checkpoints.UsageError, match=r"checkpoint-3: missing random_states_0.pkl"):
        checkpoints.check_resumable(checkpoint, saved, 1)


class FakeAccelerator:
    """What save_checkpoint needs of an Accelerator, for one process; save_state writes FILES holding ``content``."""

    is_main_process = True

    def __init__(self, content):
        self.content = content

    def wait_for_everyone(self):
        pass

    def save_state(self, directory):
        Path(directory).mkdir(parents=True)
        for name in FILES:
            (Path(directory) / name).write_text(self.content)


class Killed(Exception):
    pass


def test_a_kill_while_replacing_a_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Saving checkpoint-2 again (a resumed run reaching the same step): killed while the old copy is deleted."""
    save_checkpoint(FakeAccelerator("old"), tmp_path, 2, {"global_step": 2})
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process dies
        sorted(Path(path).iterdir())[0].unlink()
        raise Killed

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        save_checkpoint(FakeAccelerator("new"), tmp_path, 2, {"global_step": 2})
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    for path in tmp_path.iterdir():  # whatever looks like a whole checkpoint is one
        if re.fullmatch(r"checkpoint-\d+", path.name) and (path / "trainer_state.json").exists():
            assert all((path / name).exists() for name in FILES), sorted(p.name for p in path.iterdir())
    latest = resolve_checkpoint("latest", tmp_path)
    assert latest is not None and (latest / "model.safetensors").read_text() == "new"
    save_checkpoint(FakeAccelerator("newer"), tmp_path, 2, {"global_step": 2})  # the leftover copy is cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_every_file_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, Path.rename

    def recording_fsync(descriptor):
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def recording_rename(self, target):
        renamed.append((Path(self), Path(target), list(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "rename", recording_rename)
    save_checkpoint(FakeAccelerator("x"), tmp_path, 5, {"global_step": 5})
    partial, final, synced_before = next(r for r in renamed if r[1].name == "checkpoint-5")
    assert partial.name == "checkpoint-5.tmp"
    for name in (*FILES, "trainer_state.json", ""):
        assert partial / name in synced_before if name else partial in synced_before, name
    assert tmp_path in synced  # the rename itself is made durable

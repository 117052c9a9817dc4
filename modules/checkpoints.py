"""Checkpoints: ``save_state`` written atomically, found again, and loaded."""

import json
import re
import shutil
from pathlib import Path

from accelerate.utils import gather_object

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def save_checkpoint(accelerator, output_dir, step, trainer_state, save_total_limit=None, process_state=None):
    """``save_state`` into checkpoint-<step>.tmp, add the trainer state, then rename.

    ``process_state`` (e.g. a streaming loader's position, different on every process) is
    gathered and saved as ``trainer_state["process_states"][process_index]``. The rename is the
    last thing that happens, so a crash mid-save leaves only a ``.tmp`` directory, which
    ``resolve_checkpoint`` never picks.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process writes its own RNG state: all must finish before the rename
    if process_state is not None:
        trainer_state = dict(trainer_state, process_states=gather_object([process_state]))
    if accelerator.is_main_process:
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if save_total_limit:
            for old in completed_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def completed_checkpoints(output_dir):
    """checkpoint-<step> directories holding a trainer state, oldest first."""
    output_dir = Path(output_dir)
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.exists() else []:
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / TRAINER_STATE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from, output_dir):
    """``latest`` -> newest complete checkpoint in output_dir (None if there is none); else the path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = completed_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def load_checkpoint(accelerator, path):
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    saved_by = len(state.get("process_states", [])) or accelerator.num_processes
    if saved_by != accelerator.num_processes:
        raise ValueError(f"{path} was saved by {saved_by} processes, this run has {accelerator.num_processes}: each "
                         "process's data position is in the checkpoint, so resume with the same number of processes")
    return state


"""Checkpoints: ``save_state`` written atomically, found again, checked against the run, and loaded."""

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from accelerate.utils import gather_object
from safetensors.torch import save_file

from .cli import UsageError
from .json_files import write_json
from .nonfinite import check_finite_parameters

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def save_checkpoint(accelerator, output_dir, step, trainer_state, save_total_limit=None, process_state=None, keep=(),
                    model=None, states=()):
    """``save_state`` into checkpoint-<step>.tmp, add the trainer state (and the ``checkpoint_files()`` of ``states``,
    {file name: {name: tensor}} saved as safetensors: the DHNM state, the weight average), then rename; refused when
    ``model``'s weights are not finite.

    ``process_state`` (e.g. a streaming loader's position, different on every process) is
    gathered and saved as ``trainer_state["process_states"][process_index]``. The rename is the
    last thing that happens, so a crash mid-save leaves only a ``.tmp`` directory, which
    ``resolve_checkpoint`` never picks. ``save_total_limit`` keeps the newest checkpoints and those in ``keep``
    (the best one).
    """
    if model is not None:
        check_finite_parameters(accelerator, model, f"checkpoint-{step}")
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
        write_json(partial / TRAINER_STATE, trainer_state, warn=False)  # NaN dev scores as null; said at the end
        for state in states:
            for name, tensors in state.checkpoint_files().items():
                save_file(tensors, str(partial / name))
        _fsync_tree(partial)  # on disk before the rename makes it look whole
        replace_directory(partial, final)
        if save_total_limit:
            for old in completed_checkpoints(output_dir)[:-save_total_limit]:
                if old.name not in keep:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def written_whole(target):
    """Yield ``target.tmp`` to write into; once the block ends it is synced to disk and renamed to ``target`` (an
    existing one replaced), so a kill leaves ``target`` whole, old or new, or absent, never half-written."""
    target = Path(target)
    partial = target.with_name(target.name + ".tmp")
    if partial.exists():  # left by an interrupted write
        shutil.rmtree(partial)
    yield partial
    _fsync_tree(partial)
    replace_directory(partial, target)


def replace_directory(new, target):
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted last, so a
    kill at any point leaves a complete ``target`` (old or new) or none, never a half-deleted one."""
    aside = target.with_name(target.name + ".old")
    if aside.exists() and target.exists():  # left by an interrupted replace; target is complete
        shutil.rmtree(aside)
    if target.exists():
        target.rename(aside)
    new.rename(target)
    _fsync(target.parent)
    if aside.exists():
        shutil.rmtree(aside)


def _fsync_tree(directory):
    for path in sorted(Path(directory).rglob("*"), reverse=True):  # children before their folders
        _fsync(path)
    _fsync(directory)


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)  # works for folders too (POSIX)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
    """``latest`` -> newest complete checkpoint in output_dir (None, said on stdout, if there is none); else the
    path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = completed_checkpoints(output_dir)
        if not checkpoints and int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}: starting at step 0", flush=True)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).exists():
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def check_resumable(path, data_order, num_processes, schedule=None):
    """Refuse to resume from ``path`` when what fixes the data order or the learning-rate schedule changed
    since it was saved.

    ``data_order`` is what the script stores with every checkpoint (processes, datasets and their
    sizes, batch sizes, repeats or weights, seed, ...): the checkpoint's data position means nothing
    under another setup. ``schedule`` (steps, warmup, lr, scheduler) too: the restored scheduler keeps
    its saved base learning rates and step count, so a new --max_steps or --lr would make the
    learning rate jump rather than follow a new schedule. Every process's RNG state file must be
    there too (accelerate would skip a missing one silently, and dropout would no longer replay).
    """
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    saved = state.get("data_order")
    if saved is None:  # written before the data order was recorded
        print(f"warning: {path} does not record the data setup it was saved with; resuming unchecked",
              file=sys.stderr, flush=True)
        saved = data_order = {}
    changed = _differences(saved, json.loads(json.dumps(data_order)))  # as it would be saved: tuples become lists
    if changed:
        raise UsageError(f"{path} was saved with another data setup; resuming would continue at a wrong data "
                         f"position. Changed (checkpoint -> this run): {'; '.join(changed)}")
    if schedule is not None and "schedule" in state:
        changed = _differences(state["schedule"], json.loads(json.dumps(schedule)))
        if changed:
            raise UsageError(f"{path} was saved with another learning-rate schedule; the restored scheduler would "
                             f"not follow the new one. Changed (checkpoint -> this run): {'; '.join(changed)}. "
                             "To train on from these weights under a new schedule, export the checkpoint "
                             "(tools/export_checkpoint.py) and start a new run from it")
    missing = [f"random_states_{rank}.pkl" for rank in range(num_processes)
               if not (path / f"random_states_{rank}.pkl").exists()]
    if missing:
        raise UsageError(f"{path}: missing {', '.join(missing)} (each process's random state)")
    check_checkpoint_files(path)
    return state


def check_checkpoint_files(path):
    """Refuse a checkpoint with a truncated or damaged file (named), or with a pickle of arbitrary objects.

    Which files are trusted: accelerate loads the weights (safetensors), the optimizer, scheduler, sampler and
    random states with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only.
    ``custom_checkpoint_<n>.pkl`` (``register_for_checkpointing``) is unpickled with ``weights_only=False``, so
    it could run code: these scripts never write one (the DHNM state is a safetensors file), and a checkpoint
    holding one is refused unread.
    """
    import zipfile

    from safetensors import safe_open

    pickles = sorted(p.name for p in Path(path).glob("custom_checkpoint_*.pkl"))
    if pickles:
        raise UsageError(f"{path}: holds {', '.join(pickles)}, a pickle that resuming would unpickle (it could run "
                         "code); the training scripts never write one: resume only from checkpoints they wrote")
    for file in sorted(Path(path).rglob("*")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix in (".bin", ".pt", ".pkl"):
                # torch.save's zip format: a truncated file has no central directory at its end. Only the directory is
                # read (testzip would read the whole optimizer state a second time before load_state reads it).
                with zipfile.ZipFile(file):
                    pass
        except Exception as error:  # noqa: BLE001 - every reader error means the same: this file is damaged
            raise UsageError(f"{file}: damaged or truncated ({str(error).splitlines()[0]}); resume from an earlier "
                             "checkpoint") from None


def _differences(saved, current, name=""):
    """["datasets[2].batch_size: 4 -> 2", ...]: where two JSON values differ, down to the changed leaves."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [difference for key in sorted(set(saved) | set(current))
                for difference in _differences(saved.get(key), current.get(key), f"{name}.{key}" if name else key)]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [difference for i, (old, new) in enumerate(zip(saved, current))
                for difference in _differences(old, new, f"{name}[{i}]")]
    return [] if saved == current else [f"{name}: {saved!r} -> {current!r}"]


def load_checkpoint(accelerator, path, states=()):
    """``load_state`` and the ``states`` saved beside it; returns the trainer state."""
    for state in states:
        state.load_checkpoint_files(path)
    accelerator.load_state(str(path))
    return json.loads((Path(path) / TRAINER_STATE).read_text())

"""Reading weight files that someone else wrote (a checkpoint, a model directory): a damaged file is one line naming
it, and no file runs code when it is read.

``torch.load(weights_only=False)`` unpickles anything: a crafted file's ``__reduce__`` runs code as it is read (a
checkpoint handed to tools/export_checkpoint.py, merge_checkpoints.py or eval/run_cmteb.py --model). Every pickle here
is read with ``weights_only=True``, which rebuilds tensors, plain containers and the globals a caller allows. A
DeepSpeed checkpoint needs DEEPSPEED_GLOBALS, the plain state classes the engine pickles into its optimizer shards
(found in the ZeRO-1/2/3 checkpoints of the tests: the stage, the loss scaler, ZeRO-1/2's fragment addresses). Its
model states need none (no argparse.Namespace: accelerate hands DeepSpeed no ``args``).

DeepSpeed's zero_to_fp32 calls ``torch.load(weights_only=False)`` itself: under ``weights_only_loads`` torch overrides
that (its own TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, which reaches every ``torch.load`` whoever calls it), so
DeepSpeed's consolidation of the partitions (ZeRO-2/3 padding, frozen fragments) is used as it is rather than copied
and kept in step with DeepSpeed's format by hand; ``check_pickles`` names the file torch would refuse before
DeepSpeed reads it (torch's refusal does not say which file).
"""

import contextlib
import os

from .cli import UsageError

DEEPSPEED_GLOBALS = (  # (module, name): imported when a DeepSpeed checkpoint is read (deepspeed is slow to import)
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # bf16 and fp32 runs
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # fp16 runs
    ("deepspeed.utils.tensor_fragment", "fragment_address"),  # ZeRO-1/2
)
_FORCE, _FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_globals():
    import importlib

    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_GLOBALS]


def load_safetensors(path):
    """A safetensors file's tensors; a UsageError naming the file when it is damaged or truncated."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - the reader's errors (header, size, I/O) all mean: not a whole file
        raise damaged(path, error) from None


def open_safetensors(path):
    """A safetensors handle (tensors read when asked); a UsageError naming the file when its header does not fit
    the file (cut short, not safetensors)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), "pt")
    except Exception as error:  # noqa: BLE001 - as in load_safetensors
        raise damaged(path, error) from None


def load_pickle(path, allowed=(), **kwargs):
    """``torch.load(path, weights_only=True)`` on CPU with the globals ``allowed``; a UsageError naming the file
    when it holds another global or is damaged."""
    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - a refused global, a cut zip, a bad pickle: named below
        check_pickles([path], allowed)
        raise damaged(path, error) from None


def check_pickles(paths, allowed=()):
    """Refuse the first of ``paths`` (files torch.save wrote) that pickles a global outside torch's tensors and
    ``allowed`` (unpickling it could run code), or that is damaged: read without unpickling, tensors not read."""
    import torch

    for path in paths:
        try:
            with torch.serialization.safe_globals(list(allowed)):
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as error:  # noqa: BLE001 - not a zip torch.save wrote, or cut short
            raise damaged(path, error) from None
        if unsafe:
            raise UsageError(f"{path}: pickles {', '.join(unsafe)}, which unpickling would call (it could run code): "
                             "refused unread; a checkpoint holds tensors and the few types its writer saves")


@contextlib.contextmanager
def weights_only_loads(allowed=()):
    """Every ``torch.load`` in the block unpickles with ``weights_only=True`` and the globals ``allowed``, whatever
    its caller asks for (DeepSpeed's zero_to_fp32 asks for False): torch refuses any other global with
    pickle.UnpicklingError."""
    import torch

    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}  # both set: torch raises
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def damaged(path, error):
    """The one line for a file its reader failed on: the reader's first line says what is wrong with it."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UsageError(f"{path}: damaged or truncated ({first})")

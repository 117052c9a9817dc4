"""modules/weight_files.py: pickles are read weights-only, also by code that asks torch for more (DeepSpeed's
zero_to_fp32), with the DeepSpeed types allowed; a file that would run code or is damaged is one UsageError naming it.
The exports of real DeepSpeed checkpoints that rely on the allow-list are in tests/test_export_checkpoint.py."""

import os
import pickle

import pytest
import torch

from modules.cli import UsageError
from modules.weight_files import deepspeed_globals, load_pickle, weights_only_loads


class RunsCode:
    """An object whose pickle runs code when loaded: it makes the directory ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_loads_in_the_block_are_weights_only_whatever_the_caller_asks(tmp_path):
    marker, file = tmp_path / "code_ran", tmp_path / "states.pt"
    torch.save({"x": torch.ones(2), "code": RunsCode(marker)}, file)
    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    with weights_only_loads(deepspeed_globals()), pytest.raises(pickle.UnpicklingError, match="posix.mkdir"):
        torch.load(file, weights_only=False)  # as zero_to_fp32 calls it
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is put back


def test_the_deepspeed_types_load_in_the_block(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "dynamic": DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False), "address": fragment_address(numel=4, start=8)}
    torch.save(state, tmp_path / "optim_states.pt")
    with weights_only_loads(deepspeed_globals()):
        loaded = torch.load(tmp_path / "optim_states.pt", weights_only=False)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and loaded["address"] == fragment_address(numel=4, start=8)
    for scaler in ("loss_scaler", "dynamic"):
        assert type(loaded[scaler]) is type(state[scaler]) and vars(loaded[scaler]) == vars(state[scaler]), scaler


def test_a_pickle_with_code_or_cut_short_is_named(tmp_path):
    marker, file = tmp_path / "code_ran", tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "code": RunsCode(marker)}, file)
    with pytest.raises(UsageError, match=f"^{file}: pickles posix.mkdir, which unpickling would call"):
        load_pickle(file)
    assert not marker.exists()
    torch.save({"weight": torch.ones(1000)}, file)
    file.write_bytes(file.read_bytes()[:2000])
    with pytest.raises(UsageError, match=f"^{file}: damaged or truncated"):
        load_pickle(file)

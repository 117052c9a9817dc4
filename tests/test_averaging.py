"""WiSE-FT export: final/ = alpha x trained + (1 - alpha) x start, weights the start lacks exported as trained."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from modules.cli import UsageError
from modules.averaging import interpolate_with_start
from modules.model import EmbeddingModel
from tests.conftest import run_script
from tests.test_train_finetune import common_args


def test_interpolation_covers_shared_weights_only():
    trained = {"a": torch.ones(2), "b": torch.ones(3), "new": torch.ones(1), "ids": torch.arange(3)}
    start = {"a": torch.zeros(2), "b": torch.zeros(4), "ids": torch.zeros(3, dtype=torch.long)}
    averaged, kept = interpolate_with_start(trained, start, 0.25)
    assert torch.equal(averaged["a"], torch.full((2,), 0.25))
    assert kept == ["b", "new", "ids"] and torch.equal(averaged["ids"], torch.arange(3))
    with pytest.raises(UsageError, match="shares no weight"):
        interpolate_with_start({"lora": torch.ones(1)}, start, 0.5)


def test_the_script_exports_the_average_with_the_start_model(tiny_bert, tiny_data, tmp_path):
    for alpha in ("1.0", "0.5"):
        run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / alpha, "--max_steps", "2",
                                                 "--scaling_dim", "24", "--wise_ft_alpha", alpha)])
    trained, averaged = (load_file(tmp_path / alpha / "final" / "model.safetensors") for alpha in ("1.0", "0.5"))
    start = EmbeddingModel.from_pretrained(tiny_bert).backbone.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[name], start[name])
    shared = [key for key in averaged if key in start and not key.startswith("pooler.")]  # the pooler is unused
    assert len(shared) > 30
    for key in shared:
        assert torch.allclose(averaged[key], 0.5 * trained[key] + 0.5 * start[key], atol=1e-6), key
    dense = [load_file(tmp_path / alpha / "final" / "2_Dense" / "model.safetensors") for alpha in ("1.0", "0.5")]
    assert all(torch.equal(dense[0][k], dense[1][k]) for k in dense[0])  # new ScalingLayer: as trained


def test_bad_alpha_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    import train_finetune

    with pytest.raises(SystemExit) as stopped:
        train_finetune.parse_args(common_args(tiny_bert, tiny_data, tmp_path)[1:] + ["--wise_ft_alpha", "0"])
    assert stopped.value.code == 2 and "--wise_ft_alpha must be in (0, 1]" in capsys.readouterr().err

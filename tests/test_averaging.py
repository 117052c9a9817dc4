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


# --------------------------------------------------------------------------- moving average (--ema_decay)


def test_weight_ema_follows_the_recursion():
    from types import SimpleNamespace

    from modules.ema import WeightEMA

    layer = torch.nn.Linear(2, 1)
    layer.bias.requires_grad_(False)
    accelerator = SimpleNamespace(distributed_type="NO", unwrap_model=lambda model: model)
    ema = WeightEMA(accelerator, layer, 0.75)
    start = layer.weight.detach().clone()
    values = [torch.full((1, 2), float(v)) for v in (1, 2, 3)]
    expected = start
    for step, value in enumerate(values):
        layer.weight.data.copy_(value)
        ema.update(step)
        decay = min(0.75, (1 + step) / (10 + step))  # the warm-up
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(ema.average["weight"], expected) and "bias" not in ema.average
    exported = ema.apply_to({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    assert torch.allclose(exported["weight"], expected) and torch.equal(exported["bias"], layer.bias)


def test_final_holds_the_moving_average_and_survives_a_resume(tiny_bert, tiny_data, tmp_path):
    """Oracle: the same run without --ema_decay, saved at every step, averaged by hand. A run resumed at step 2 ends
    with the same average, and exporting its last checkpoint gives final/."""
    from modules.export import read_checkpoint

    steps, decay = 4, 0.6
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "plain", "--max_steps", str(steps),
                                             "--save_every", "1")])
    ema_args = ["--max_steps", str(steps), "--save_every", "2", "--ema_decay", str(decay)]
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "ema", *ema_args)])
    start = EmbeddingModel.from_pretrained(tiny_bert).state_dict()
    expected = {key: value.double() for key, value in start.items() if value.is_floating_point()}
    for step in range(1, steps + 1):
        trained = read_checkpoint(tmp_path / "plain" / f"checkpoint-{step}")[1]
        decay_t = min(decay, step / (9 + step))  # the warm-up of the update after step t = step - 1
        expected = {key: decay_t * value + (1 - decay_t) * trained[key].double() for key, value in expected.items()}
    final = EmbeddingModel.from_pretrained(tmp_path / "ema" / "final").state_dict()
    compared = [key for key in expected if "pooler" not in key and "position_ids" not in key]
    assert len(compared) > 30
    for key in compared:
        assert torch.allclose(final[key].double(), expected[key], atol=1e-6), key
    assert not torch.allclose(final[compared[0]].double(), trained[compared[0]].double(), atol=1e-6)

    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "resumed", *ema_args,
                                             "--resume_from_checkpoint", str(tmp_path / "ema" / "checkpoint-2"))])
    for name in ("model.safetensors", "README.md"):
        assert (tmp_path / "resumed" / "final" / name).exists()
    assert load_file(tmp_path / "resumed" / "final" / "model.safetensors").keys() == \
        load_file(tmp_path / "ema" / "final" / "model.safetensors").keys()
    for key, value in load_file(tmp_path / "ema" / "final" / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "resumed" / "final" / "model.safetensors")[key]), key

    run_script([sys.executable, "tools/export_checkpoint.py", str(tmp_path / "ema" / f"checkpoint-{steps}"),
                str(tmp_path / "exported")])
    for key, value in load_file(tmp_path / "ema" / "final" / "model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "exported" / "model.safetensors")[key]), key

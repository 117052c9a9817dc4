"""The embedding model: pooling, ScalingLayer, and the sentence-transformers round trip."""

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer

from modules.model import EmbeddingModel, pool
from tests.conftest import SENTENCES, minilm_path


def st_embeddings(path, texts):
    return torch.as_tensor(SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True))


@pytest.mark.parametrize("pooling, scaling_dim", [("mean", None), ("cls", None), ("mean", 48), ("cls", 20)])
def test_save_reload_with_sentence_transformers(tiny_bert, tmp_path, pooling, scaling_dim):
    model = EmbeddingModel.from_pretrained(tiny_bert, pooling=pooling, scaling_dim=scaling_dim, max_seq_length=64)
    ours = model.encode(SENTENCES)
    model.save_pretrained(tmp_path / "saved")

    modules = json.loads((tmp_path / "saved" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == (
        ["Transformer", "Pooling"] + (["Dense"] if scaling_dim else []) + ["Normalize"])
    assert json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())["pooling_mode"] == pooling
    assert list((tmp_path / "saved").glob("*.safetensors"))

    theirs = st_embeddings(tmp_path / "saved", SENTENCES)
    assert theirs.shape == (len(SENTENCES), scaling_dim or 32)
    assert torch.allclose(ours, theirs, atol=1e-5)

    reloaded = EmbeddingModel.from_pretrained(tmp_path / "saved")  # as a starting point, 2_Dense included
    assert reloaded.pooling == pooling and reloaded.output_dim == (scaling_dim or 32)
    assert torch.allclose(reloaded.encode(SENTENCES), ours, atol=1e-6)


def test_scaling_dim_must_match_an_existing_dense(tiny_bert, tmp_path):
    EmbeddingModel.from_pretrained(tiny_bert, scaling_dim=48).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="2_Dense maps to 48 dims but --scaling_dim is 64"):
        EmbeddingModel.from_pretrained(tmp_path / "m", scaling_dim=64)


def test_packaged_minilm_loads_with_its_pooling_and_matches_sentence_transformers():
    model = EmbeddingModel.from_pretrained(minilm_path())
    assert model.pooling == "mean" and model.output_dim == 384 and model.max_seq_length == 256
    assert torch.allclose(model.encode(SENTENCES[:4]), st_embeddings(minilm_path(), SENTENCES[:4]), atol=1e-5)


def test_lasttoken_pooling_picks_the_last_real_token_with_either_padding_side():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "lasttoken"), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.equal(pool(hidden, left, "lasttoken"), torch.stack([hidden[0, 4], hidden[1, 4]]))
    mean = pool(hidden, right, "mean")
    assert torch.allclose(mean[0], hidden[0, :3].mean(0))


@pytest.mark.parametrize("fsdp_version", [1, 2])
def test_fsdp_transformer_wrap_puts_every_layer_in_its_own_unit(tiny_bert, fsdp_version):
    """launch/fsdp.yaml names no layer class: accelerate takes the root module's _no_split_modules, so without
    one an encoder is a single FSDP unit (nothing sharded below the root)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = EmbeddingModel.from_pretrained(tiny_bert)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    plugin.set_auto_wrap_policy(model)
    if fsdp_version == 2:
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [name for name, module in model.named_modules() if name and policy is not None and policy(module)]
    else:
        wrapped = [name for name, module in model.named_modules() if name and plugin.auto_wrap_policy(module, False, 0)]
    assert {"backbone.encoder.layer.0", "backbone.encoder.layer.1"} <= set(wrapped), wrapped


def test_a_new_scaling_layer_keeps_every_cosine_of_the_backbone(tiny_bert):
    """A random ScalingLayer changed every similarity before training (STS-B dev 86.79 -> 86.65 at step 0)."""
    plain = EmbeddingModel.from_pretrained(tiny_bert).encode(SENTENCES)
    lifted = EmbeddingModel.from_pretrained(tiny_bert, scaling_dim=48).encode(SENTENCES)
    assert lifted.shape == (len(SENTENCES), 48)
    assert torch.allclose(lifted @ lifted.T, plain @ plain.T, atol=1e-5)


def test_the_scaling_layer_trains_at_its_own_learning_rate(tiny_bert):
    from modules.training import build_optimizer

    model = EmbeddingModel.from_pretrained(tiny_bert, scaling_dim=48)
    groups = build_optimizer(model, 2e-5, 0.01, scaling_lr=1e-3).param_groups
    scaling = {id(p) for p in model.scaling_layer.parameters()}
    for group in groups:
        in_scaling = {id(p) in scaling for p in group["params"]}
        assert len(in_scaling) == 1 and group["lr"] == (1e-3 if in_scaling.pop() else 2e-5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {g["lr"] for g in build_optimizer(model, 2e-5, 0.01).param_groups} == {2e-5}


def test_a_model_reads_no_more_tokens_than_its_position_table_holds(tiny_bert, tmp_path):
    """The tiny BERT has 128 positions and MiniLM's tokenizer (512): loaded, and saved as final/ is, it read 512
    tokens, so the saved model crashed on any text over 128 tokens (eval/run_cmteb.py: a tensor-size error)."""
    import json

    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(tiny_bert)
    assert model.max_seq_length == 128
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    long_text = " ".join(["word"] * 600)
    assert SentenceTransformer(str(tmp_path / "saved")).encode([long_text]).shape == (1, 32)
    assert EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=64).max_seq_length == 64  # shorter: as asked

"""Precision: fp32 master weights whatever the start model's dtype, fp32 ScalingLayer, export dtype on request."""

import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from modules.model import EmbeddingModel
from tests.conftest import SENTENCES, run_script
from tests.test_train_finetune import common_args

WEIGHT = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module")
def bf16_bert(tiny_bert, tmp_path_factory):
    """The tiny BERT stored in bfloat16, as a bf16 run's final/ is."""
    path = tmp_path_factory.mktemp("bf16_bert")
    AutoModel.from_pretrained(tiny_bert).to(torch.bfloat16).save_pretrained(path)
    EmbeddingModel.from_pretrained(tiny_bert).tokenizer.save_pretrained(path)
    assert load_file(path / "model.safetensors")[WEIGHT].dtype == torch.bfloat16
    return path


def test_a_bf16_checkpoint_loads_with_fp32_master_weights(bf16_bert):
    model = EmbeddingModel.from_pretrained(bf16_bert, scaling_dim=24)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # backbone and ScalingLayer
    kept = EmbeddingModel.from_pretrained(bf16_bert, scaling_dim=24, dtype=torch.bfloat16)
    assert {p.dtype for p in kept.backbone.parameters()} == {torch.bfloat16}
    assert kept.scaling_layer.weight.dtype == torch.float32  # the ScalingLayer stays fp32 either way
    assert kept.encode(SENTENCES[:2]).shape == (2, 24)


def test_one_step_from_a_bf16_checkpoint_changes_every_weight(bf16_bert, tiny_data, tmp_path):
    """At lr 2e-5 a bf16 master weight rounds most updates away; an fp32 one keeps them all."""
    run_script([sys.executable, *common_args(bf16_bert, tiny_data, tmp_path, "--max_steps", "1", "--lr", "2e-5",
                                             "--warmup_ratio", "0", "--max_grad_norm", "0")])
    start = load_file(bf16_bert / "model.safetensors")[WEIGHT].float()
    trained = load_file(tmp_path / "final" / "model.safetensors")[WEIGHT]
    assert trained.dtype == torch.float32  # the default export
    changed = (trained != start).float().mean().item()
    assert changed > 0.99, changed


def test_export_dtype_is_the_users_choice(tiny_bert, tiny_data, tmp_path):
    from sentence_transformers import SentenceTransformer

    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "1", "--scaling_dim", "24",
                                             "--save_dtype", "bfloat16")])
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    dense = load_file(tmp_path / "final" / "2_Dense" / "model.safetensors")
    assert {t.dtype for t in dense.values()} == {torch.bfloat16}
    embeddings = SentenceTransformer(str(tmp_path / "final"), device="cpu").encode(SENTENCES[:2])
    assert embeddings.shape == (2, 24)

"""tools/merge_checkpoints.py: mean, weighted mean and slerp of model directories and checkpoints, against direct
computations; the packaged MiniLM (safetensors, or an older pytorch_model.bin) merged with models our code saves
(no position_ids, a zero pooler); the merged model's card (front matter, lineage, no machine paths); models whose
trained tensors differ refused."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from modules.merging import slerp
from tests.conftest import REPO, SENTENCES, minilm_path, run_script, save_tiny_bert
from tests.test_train_finetune import common_args


@pytest.fixture(scope="module")
def two_runs(tiny_bert, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in ("1", "2"):
        run_script([sys.executable, *common_args(tiny_bert, tiny_data, root / seed, "--max_steps", "2", "--save_every",
                                                 "2", "--scaling_dim", "24", "--seed", seed)])
    return root


def merge(*args):
    return subprocess.run([sys.executable, "tools/merge_checkpoints.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def weights(model_dir):
    return {f"{path.relative_to(model_dir)}:{key}": value for path in sorted(model_dir.rglob("*.safetensors"))
            for key, value in load_file(path).items()}


def test_weighted_mean_of_two_final_models_and_a_checkpoint(two_runs, tmp_path):
    a, b = two_runs / "1" / "final", two_runs / "2" / "final"
    result = merge(a, b, two_runs / "2" / "checkpoint-2", "--weights", "1,2,1", "--output", tmp_path / "soup")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, merged = weights(a), weights(b), weights(tmp_path / "soup")
    assert merged.keys() == first.keys() and any("2_Dense" in key for key in merged)  # the ScalingLayer too
    for key, value in merged.items():
        if value.is_floating_point():  # the checkpoint exports as run 2's final/
            expected = (first[key].double() + 3 * second[key].double()) / 4
            assert torch.allclose(value.double(), expected, atol=1e-6), key
    assert not torch.equal(first[next(iter(first))], second[next(iter(first))])
    from sentence_transformers import SentenceTransformer

    embedding = SentenceTransformer(str(tmp_path / "soup"), device="cpu").encode(["a merged model"])
    assert embedding.shape == (1, 24)
    assert "| 1 |" in (tmp_path / "soup" / "README.md").read_text()


def test_slerp_of_two_models_follows_the_arc(two_runs, tmp_path):
    a, b = two_runs / "1" / "final", two_runs / "2" / "final"
    result = merge(a, b, "--method", "slerp", "--weights", "3,1", "--output", tmp_path / "slerp")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, merged = weights(a), weights(b), weights(tmp_path / "slerp")
    key = next(k for k, v in first.items() if v.is_floating_point() and v.dim() == 2)
    x, y = first[key].double().flatten(), second[key].double().flatten()
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    t = 0.25
    direction = (math.sin((1 - t) * theta) * x / x.norm() + math.sin(t * theta) * y / y.norm()) / math.sin(theta)
    expected = (0.75 * x.norm() + 0.25 * y.norm()) * direction / direction.norm()
    assert torch.allclose(merged[key].double().flatten(), expected, atol=1e-6)


def test_slerp_endpoints_and_parallel_tensors():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)


@pytest.mark.parametrize("args, message", [
    (["--method", "slerp", "--weights", "1,1,1"], "--method slerp merges exactly two models"),
    (["--weights", "1"], "--weights: one number >= 0 per model"),
    (["--weights", "0,0"], "--weights: one number >= 0 per model"),
])
def test_bad_merges_are_one_line(two_runs, tmp_path, args, message):
    models = [two_runs / "1" / "final", two_runs / "2" / "final"]
    if "1,1,1" in args:
        models.append(two_runs / "2" / "final")
    result = merge(*models, *args, "--output", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr


def test_models_of_another_shape_are_refused(two_runs, tmp_path):
    other = save_tiny_bert(tmp_path / "other", type_vocab_size=4)  # another token-type table
    result = merge(two_runs / "1" / "final", other, "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "2_Dense/model.safetensors" in result.stderr or "differ" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


# --- the merges people make: a fine-tune with its packaged start model, models saved in other layouts ---

@pytest.fixture(scope="module")
def minilm_saved(tmp_path_factory):
    """The packaged MiniLM as our code saves it (no position_ids buffer, a zero pooler): the same model, another
    layout."""
    from modules.model import EmbeddingModel

    path = tmp_path_factory.mktemp("minilm_saved") / "saved"
    EmbeddingModel.from_pretrained(minilm_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm_run(tiny_data, tmp_path_factory):
    """A 2-step fine-tune of the packaged MiniLM: run_config.json, its card, final/ and checkpoint-2."""
    run = tmp_path_factory.mktemp("minilm_runs") / "ft"
    run_script([sys.executable, *common_args(minilm_path(), tiny_data, run, "--max_steps", "2", "--save_every", "2")])
    return run


def packaged_as(layout, path):
    """A copy of the packaged MiniLM with its weights as older hub snapshots keep them: ``bin`` a
    pytorch_model.bin alone, its keys under ``bert.`` (as a BertForPreTraining checkpoint names them); ``beside`` a
    pytorch_model.bin beside model.safetensors; ``packaged`` the package's directory itself."""
    if layout == "packaged":
        return minilm_path()
    shutil.copytree(minilm_path(), path)
    state = load_file(path / "model.safetensors")
    prefix = "bert." if layout == "bin" else ""
    torch.save({prefix + key: value for key, value in state.items()}, path / "pytorch_model.bin")
    if layout == "bin":
        (path / "model.safetensors").unlink()
    return path


def tensors(model_dir):
    """Every tensor of a model directory's transformer, by name without a ``bert.`` prefix."""
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("pytorch_model*.bin"))
    state = {}
    for file in files:
        state.update(load_file(file) if file.suffix == ".safetensors" else torch.load(file, weights_only=True))
    return {key.removeprefix("bert."): value for key, value in state.items()}


def embeddings(model_dir):
    """(sentence-transformers', EmbeddingModel's) normalised embeddings of the test sentences."""
    from sentence_transformers import SentenceTransformer

    from modules.model import EmbeddingModel

    by_st = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    return by_st, EmbeddingModel.from_pretrained(model_dir).encode(SENTENCES)


def mixed_embeddings(model_dirs, weights):
    """Embeddings of the weighted mean of the models' trained weights, computed directly in an EmbeddingModel."""
    from modules.model import EmbeddingModel

    models = [EmbeddingModel.from_pretrained(model_dir) for model_dir in model_dirs]
    states = [model.state_dict() for model in models]
    mixed = {key: (sum(w * state[key].double() for w, state in zip(weights, states)) / sum(weights)).float()
             for key in states[0]}
    models[0].load_state_dict(mixed)
    return models[0].encode(SENTENCES)


@pytest.mark.parametrize("layout, method", [("packaged", "mean"), ("bin", "mean"), ("beside", "slerp")])
def test_the_packaged_model_merges_with_itself_as_our_code_saves_it(minilm_saved, tmp_path, layout, method):
    packaged = packaged_as(layout, tmp_path / "packaged")
    result = merge(packaged, minilm_saved, "--weights", "0.3,0.7", "--method", method, "--output", tmp_path / "m")
    assert result.returncode == 0, result.stderr[-3000:]
    first, merged = tensors(packaged), tensors(tmp_path / "m")
    assert merged.keys() == first.keys() and "embeddings.position_ids" in merged  # the first model's layout
    for key, value in merged.items():  # the same model: every tensor as it was, the pooler the first model's
        assert torch.allclose(value, first[key], rtol=1e-6, atol=0), key
    weight_files = sorted(p.name for p in (tmp_path / "m").glob("*.*") if p.suffix in (".bin", ".safetensors"))
    assert weight_files == (["pytorch_model.bin"] if layout == "bin" else ["model.safetensors"])  # no stale copy
    for merged_embeddings, packaged_embeddings in zip(embeddings(tmp_path / "m"), embeddings(minilm_path())):
        assert torch.allclose(merged_embeddings.cpu(), packaged_embeddings.cpu(), atol=1e-6)


def test_our_layout_first_keeps_ours(minilm_saved, tmp_path):
    result = merge(minilm_saved, minilm_path(), "--weights", "2,1", "--output", tmp_path / "m")
    assert result.returncode == 0, result.stderr[-3000:]
    merged, saved = tensors(tmp_path / "m"), tensors(minilm_saved)
    assert merged.keys() == saved.keys() and "embeddings.position_ids" not in merged
    assert not merged["pooler.dense.weight"].any()  # our zero pooler, not a third of the packaged one
    assert torch.allclose(embeddings(tmp_path / "m")[1], embeddings(minilm_path())[1], atol=1e-6)


def test_a_fine_tune_and_its_packaged_start_model_mix_by_their_weights(minilm_run, tmp_path):
    final = minilm_run / "final"
    result = merge(minilm_path(), final, "--weights", "1,3", "--output", tmp_path / "wise")
    assert result.returncode == 0, result.stderr[-3000:]
    start, trained, merged = tensors(minilm_path()), tensors(final), tensors(tmp_path / "wise")
    mixed = [key for key in trained if trained[key].is_floating_point() and not key.startswith("pooler.")]
    assert len(mixed) == 101 and not torch.equal(start[mixed[0]], trained[mixed[0]])
    for key in mixed:
        expected = (start[key].double() + 3 * trained[key].double()) / 4
        assert torch.allclose(merged[key].double(), expected, atol=1e-6), key
    direct = mixed_embeddings([minilm_path(), final], [1, 3])
    for merged_embeddings in embeddings(tmp_path / "wise"):
        assert torch.allclose(merged_embeddings.cpu(), direct, atol=1e-5)


def front_matter_of(card):
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))


def test_the_card_names_the_common_base_and_what_each_model_is(minilm_run, tmp_path):
    checkpoint = os.path.relpath(minilm_run / "checkpoint-2", REPO)  # relative, as a user types it
    result = merge(minilm_path(), minilm_run / "final", checkpoint, "--weights", "1,2,1", "--output", tmp_path / "soup")
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "soup" / "README.md").read_text()
    meta = front_matter_of(card)
    assert meta["library_name"] == "sentence-transformers" and "merge" in meta["tags"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["base_model_relation"] == "merge"
    packaged, final, step = meta["merged_models"]
    assert (packaged["model"], packaged["weight"], packaged["kind"]) == ("model", 1, "model")
    assert (final["model"], final["weight"], final["kind"], final["run"]) == ("final", 2, "run", "ft")
    assert final["lineage"] == "final/ of run ft, started from sentence-transformers/all-MiniLM-L6-v2"
    run = str(Path(checkpoint).parent)
    assert (step["model"], step["kind"], step["run"], step["step"]) == (checkpoint, "checkpoint", run, 2)
    assert f"| {checkpoint} | 1 | 25.0% | checkpoint of run {run} at step 2" in card
    assert not re.findall(r"(?:^|[\s`(|'\"])(/[^\s`|'\"]+)", card)  # no machine path
    assert str(REPO) not in card and str(tmp_path) not in card

    result = merge(tmp_path / "soup", minilm_path(), "--weights", "3,1", "--output", tmp_path / "soup2")
    assert result.returncode == 0, result.stderr[-3000:]
    soup = front_matter_of((tmp_path / "soup2" / "README.md").read_text())["merged_models"][0]
    assert soup["kind"] == "merge" and soup["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert soup["lineage"] == f"merge (mean) of model x 1, final x 2, {checkpoint} x 1"


def test_models_without_a_common_base_leave_base_model_out(tmp_path):
    from modules.merge_card import merge_card

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "README.md").write_text(f"---\nbase_model: org/{name}\n---\n\n# a fine-tune\n")
    meta = front_matter_of(merge_card([tmp_path / "a", tmp_path / "b"], [1.0, 1.0], "slerp", tmp_path / "out"))
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["merge_method"] == "slerp"
    assert [m["lineage"] for m in meta["merged_models"]] == ["model based on org/a", "model based on org/b"]


def edited_copy(final, path, edit):
    """A copy of a model directory with its model.safetensors edited by ``edit(state)``."""
    shutil.copytree(final, path)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")
    return path


def with_position_ids(state, ids=torch.arange(128)):
    state["embeddings.position_ids"] = ids[None].clone()


QUERY_BIAS = "encoder.layer.0.attention.self.query.bias"


@pytest.mark.parametrize("edit, named", [
    (lambda state: state.pop(QUERY_BIAS), f"tensor {QUERY_BIAS} is not in"),  # a trained weight missing
    (lambda state: state.update({"encoder.extra.weight": torch.ones(3)}), "tensor encoder.extra.weight is not in"),
    (lambda state: with_position_ids(state, torch.arange(128).flip(0)), "buffer embeddings.position_ids differs"),
], ids=["missing", "extra", "buffer"])
def test_a_trained_weight_in_one_model_only_or_a_different_buffer_is_refused(two_runs, tmp_path, edit, named):
    first = edited_copy(two_runs / "1" / "final", tmp_path / "first", with_position_ids)
    second = edited_copy(two_runs / "2" / "final", tmp_path / "second", edit)
    result = merge(first, second, "--output", tmp_path / "out")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("merge_checkpoints.py: error: ") and named in last and "model.safetensors" in last, last
    assert not (tmp_path / "out").exists()


def test_weights_outside_the_models_modules_are_left_out(two_runs, tmp_path):
    """A LoRA run's adapter/ beside the merged weights holds the first model's adapter alone: not carried over."""
    first = shutil.copytree(two_runs / "1" / "final", tmp_path / "first")
    (first / "adapter").mkdir()
    save_file({"lora_A.weight": torch.ones(2, 32)}, first / "adapter" / "adapter_model.safetensors")
    (first / "adapter" / "adapter_config.json").write_text("{}")
    result = merge(first, two_runs / "2" / "final", "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter").exists()
    assert (tmp_path / "out" / "2_Dense" / "model.safetensors").is_file()
    assert weights(tmp_path / "out").keys() == weights(two_runs / "1" / "final").keys()


# --- inputs that are not models, and outputs over inputs ---

def refusal(*args):
    """Run the tool expecting a refusal: exit status 2, no traceback; returns its error line."""
    result = merge(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("merge_checkpoints.py: error: "), last
    return last


def files_in(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("inside", ["final", "checkpoint-2"])
def test_an_output_inside_an_input_is_refused(two_runs, tmp_path, inside):
    """--output inside a model directory or a checkpoint would be written into that input: refused, nothing
    written."""
    run = shutil.copytree(two_runs / "2", tmp_path / "run", ignore=shutil.ignore_patterns("finetune"))
    before, output = files_in(run), run / inside / "soup"
    last = refusal(two_runs / "1" / "final", run / inside, "--output", output)
    assert f"--output {output}: the output would overwrite an input: it lies inside {run / inside}" in last, last
    assert files_in(run) == before and not output.exists()


@pytest.mark.parametrize("model", ["final", "checkpoint-2"])
def test_a_truncated_weights_file_is_one_line_naming_it(two_runs, tmp_path, model):
    """A model directory's or a checkpoint's model.safetensors cut in half."""
    run = shutil.copytree(two_runs / "2", tmp_path / "run", ignore=shutil.ignore_patterns("finetune"))
    file = run / model / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    last = refusal(two_runs / "1" / "final", run / model, "--output", tmp_path / "out")
    assert f"error: {file}: damaged or truncated" in last, last
    assert not (tmp_path / "out").exists()


def test_a_run_dir_is_named_with_the_models_it_holds(two_runs, tmp_path):
    run = two_runs / "1"
    last = refusal(run, two_runs / "2" / "final", "--output", tmp_path / "out")
    assert last.endswith(f"error: {run} is a run's output directory: give {run / 'final'} or one of its checkpoints "
                         "(checkpoint-2)"), last
    assert not (tmp_path / "out").exists()

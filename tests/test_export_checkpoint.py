"""tools/export_checkpoint.py: every kind of checkpoint the training scripts write becomes the final/ directory of its
step.

The oracle: a run with ``--max_steps N --save_every N`` writes checkpoint-N and final/ from the same weights, so the
export of checkpoint-N must hold final/'s files, tensor for tensor, and embed texts exactly as final/ does.
accelerate's FSDP launch needs a GPU: the FSDP checkpoints are written by accelerate's own ``save_fsdp_model`` from a
2-process FSDP2 model on CPU (gloo), this file run under torchrun (see ``__main__`` at the end).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, SENTENCES, accelerate_cmd, run_script, write_jsonl
from tests.test_llm_embed import script_args as llm_args
from tests.test_llm_embed import tiny_decoders  # noqa: F401 (a fixture)
from tests.test_train_finetune import CPU_ENV, common_args, two_process_cmd
from tests.test_weight_files import RunsCode

TOOL = "tools/export_checkpoint.py"
TEXTS = ["a man is playing a guitar", "the cat sleeps on the sofa today", "a dog"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny matrices: a second thread per process only waits on 2 cores
# Runs tokenize in a loader worker: a tokenizer called in the main process saves its last call's truncation and
# padding side in final/'s tokenizer files, which an export (its tokenizer never called) cannot know.
IN_A_WORKER = ["--num_workers", "1"]


def export(checkpoint, out, *flags):
    """Run the tool; returns its stdout, which must be the one line saying what was written."""
    result = run_script([sys.executable, TOOL, str(checkpoint), str(out), *flags])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0], result.stdout
    return lines[0]


def safetensors_files(directory):
    return {path.relative_to(directory): load_file(path) for path in sorted(Path(directory).rglob("*.safetensors"))}


def comparable_json(json_file):
    content = json.loads(Path(json_file).read_text())
    if Path(json_file).name == "adapter_config.json":  # peft keeps target_modules as a set: saved in any order
        content["target_modules"] = sorted(content["target_modules"])
    return content


def assert_same_model(final, exported):
    """Same files; every tensor equal (values and dtype); every JSON file equal; the same embeddings."""
    from sentence_transformers import SentenceTransformer

    def files(directory):
        return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())

    assert files(exported) == files(final)
    expected, got = safetensors_files(final), safetensors_files(exported)
    for name, tensors in expected.items():
        assert got[name].keys() == tensors.keys(), name
        for key, value in tensors.items():
            if key.startswith("pooler."):  # BERT's unused pooler: sentence-transformers draws it anew when it writes
                continue
            assert got[name][key].dtype == value.dtype and torch.equal(got[name][key], value), (name, key)
    for path in Path(final).rglob("*.json"):
        assert comparable_json(exported / path.relative_to(final)) == comparable_json(path), path
    embeddings = [SentenceTransformer(str(d), device="cpu").encode(TEXTS, convert_to_tensor=True) for d in (final, exported)]
    assert torch.equal(*embeddings)


def check_export(run_dir, tmp_path, step, kind):
    out = tmp_path / "exported"
    line = export(run_dir / f"checkpoint-{step}", out)
    assert kind in line and f"step {step}" in line, line
    assert_same_model(run_dir / "final", out)
    return out, line


@pytest.fixture(scope="module")
def single_run(tiny_bert, tiny_data, tmp_path_factory):
    """One process, 2 steps, checkpoint at step 2: a ScalingLayer, a prompt from --query_prefix_file, WiSE-FT 0.5."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    prefixes = run_dir.parent / "prefixes.json"
    prefixes.write_text(json.dumps({"retri": "query: "}))
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, run_dir, "--max_steps", "2", "--save_every", "2",
                                             "--scaling_dim", "24", "--query_prefix_file", str(prefixes),
                                             "--wise_ft_alpha", "0.5")], env_extra=ONE_THREAD)
    return run_dir


def test_single_process_checkpoint(single_run, tmp_path):
    """Exported as final/ (WiSE-FT applied); --no_wise_ft gives the checkpoint's own weights; --overwrite replaces."""
    out, line = check_export(single_run, tmp_path, 2, "single process")
    assert "WiSE-FT alpha 0.5" in line
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["retri"] == "query: "

    line = export(single_run / "checkpoint-2", out, "--no_wise_ft", "--overwrite")
    assert "WiSE-FT" not in line
    trained = load_file(single_run / "checkpoint-2" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(value, trained[f"backbone.{key}"]) for key, value in exported.items()
               if not key.startswith("pooler."))
    final = load_file(single_run / "final" / "model.safetensors")
    assert not torch.equal(exported["encoder.layer.0.output.dense.weight"], final["encoder.layer.0.output.dense.weight"])
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


def test_ddp_pretrain_checkpoint_in_bfloat16(tiny_bert, tmp_path):
    """train_pretrain.py on 2 DDP processes (gloo), --save_dtype bfloat16."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"text": s, "text_pos": s + " today"} for s in SENTENCES])
    (tmp_path / "meta.txt").write_text(f"{pairs} 1\n")
    run_dir = tmp_path / "run"
    run_script([*accelerate_cmd(2), "train_pretrain.py", "--model_name_or_path", str(tiny_bert), "--meta_list",
                str(tmp_path / "meta.txt"), "--output_dir", str(run_dir), "--batch_size", "4", "--query_max_len", "16",
                "--passage_max_len", "16", "--lr", "1e-3", "--warmup_steps", "1", *IN_A_WORKER,
                "--max_steps", "2", "--save_every", "2", "--save_dtype", "bfloat16"],
               env_extra={**CPU_ENV["ddp"], **ONE_THREAD})
    out, _ = check_export(run_dir, tmp_path, 2, "DDP (2 processes)")
    assert {value.dtype for value in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


@pytest.fixture(scope="module")
def zero1_run(tiny_bert, tiny_data, tmp_path_factory):
    """DeepSpeed ZeRO-1 in bf16 on 2 processes, with a frozen position table (a parameter without master copy,
    which DeepSpeed's ZeRO-1 checkpoint keeps only in the bf16 module)."""
    run_dir = tmp_path_factory.mktemp("zero1") / "run"
    run_script(two_process_cmd("deepspeed_zero1", "bf16") + common_args(
        tiny_bert, tiny_data, run_dir, "--max_steps", "2", "--save_every", "2", "--scaling_dim", "24",
        "--freeze_position_embeddings"), env_extra=ONE_THREAD)
    return run_dir


def test_deepspeed_zero1_checkpoint_takes_the_fp32_master_weights(zero1_run, tmp_path):
    out, _ = check_export(zero1_run, tmp_path, 2, "DeepSpeed ZeRO-1")
    trained = load_file(out / "model.safetensors")["encoder.layer.0.attention.self.query.weight"]
    assert (trained != trained.bfloat16().float()).float().mean() > 0.9  # not the engine's bf16 copy


def test_deepspeed_zero3_lora_llm_checkpoint(tiny_decoders, tiny_data, tmp_path):  # noqa: F811
    """train_llm_embed.py under ZeRO-3: LoRA weights from the partitioned fp32 masters, the frozen base from every
    process's fragments; merged model, adapter/ and 2_Dense as in final/."""
    run_dir = tmp_path / "run"
    cmd = accelerate_cmd(config_file=REPO / "launch" / "deepspeed_zero3_llm.yaml") + [
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", "train_llm_embed.py"]
    run_script(cmd + llm_args(tiny_decoders, tiny_data, run_dir, "--max_steps", "2", "--save_every", "2",
                              "--scaling_dim", "40", *IN_A_WORKER), env_extra=ONE_THREAD)
    check_export(run_dir, tmp_path, 2, "DeepSpeed ZeRO-3")


def test_single_process_lora_llm_checkpoint_with_instructions(tiny_decoders, tiny_data, tmp_path):  # noqa: F811
    """A LoRA Qwen2 on one process; its query instructions (from the meta list) are saved as prompts again."""
    run_dir = tmp_path / "run"
    llm = llm_args(tiny_decoders, tiny_data, run_dir, "--max_steps", "2", "--save_every", "2", "--instruction_template",
                   "Instruct: {task}\\nQuery: ", "--default_task", "Find a similar sentence", *IN_A_WORKER)
    llm[llm.index("--model_name_or_path") + 1] = str(tiny_decoders["qwen2"])
    run_script([sys.executable, "train_llm_embed.py", *llm], env_extra=ONE_THREAD)
    out, _ = check_export(run_dir, tmp_path, 2, "single process")
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_fsdp_sharded_and_full_state_dict_checkpoints(single_run, tmp_path):
    """SHARDED_STATE_DICT (a torch.distributed.checkpoint folder) and FULL_STATE_DICT (one .bin), as accelerate
    writes them for an FSDP2 model sharded over 2 processes, export to final/."""
    checkpoints = {}
    for state_dict_type in STATE_DICT_TYPES:
        shutil.copytree(single_run, tmp_path / state_dict_type / "run")
        checkpoints[state_dict_type] = tmp_path / state_dict_type / "run" / "checkpoint-2"
    run_script([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__,
                *map(str, checkpoints.values())], env_extra=ONE_THREAD)
    for state_dict_type, checkpoint in checkpoints.items():
        assert not (checkpoint / "model.safetensors").exists()
        check_export(checkpoint.parent, tmp_path / state_dict_type, 2, f"FSDP ({state_dict_type})")


def broken_run(single_run, tmp_path, damage):
    """A copy of the single-process run with ``damage(checkpoint_dir)`` applied; returns the checkpoint."""
    run_dir = tmp_path / f"run_{damage.__name__}"
    shutil.copytree(single_run, run_dir, ignore=shutil.ignore_patterns("final", "finetune"))
    damage(run_dir / "checkpoint-2")
    return run_dir / "checkpoint-2"


def no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()


def extra_key(checkpoint):
    weights = load_file(checkpoint / "model.safetensors")
    save_file({**weights, "backbone.pooler.dense.weight": torch.zeros(2, 2)}, checkpoint / "model.safetensors")


def no_run_config(checkpoint):
    (checkpoint.parent / "run_config.json").unlink()


def truncated_weights(checkpoint):
    cut_in_half(checkpoint / "model.safetensors")


def cut_in_half(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def refusal(*args):
    """Run the tool expecting a refusal: exit status 2, no traceback, nothing on stdout; returns its error line."""
    result = subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("export_checkpoint.py: error: ") and result.stdout == "", (last, result.stdout)
    return last


def test_errors_are_one_line_naming_the_path(single_run, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "file").write_text("x")
    orphan, bare, mismatched, cut = (broken_run(single_run, tmp_path, damage) for damage in (
        no_run_config, no_weights, extra_key, truncated_weights))
    cases = [  # checkpoint, out, what the line says
        (tmp_path, tmp_path / "a", [f"{tmp_path}: not a checkpoint"]),
        (orphan, tmp_path / "b", [f"{orphan.parent / 'run_config.json'}: not found"]),
        (bare, tmp_path / "c", [f"{bare}: no model weights"]),
        (mismatched, tmp_path / "d", [f"{mismatched}: its weights do not fit", "1 unexpected (backbone.pooler.dense.weight)"]),
        (single_run / "checkpoint-2", full, [f"{full} exists and is not empty"]),
        (cut, tmp_path / "e", [f"{cut / 'model.safetensors'}: damaged or truncated"]),
    ]
    for checkpoint, out, messages in cases:
        last = refusal(checkpoint, out)
        assert all(m in last for m in messages), last
        assert out == full or not out.exists()
    assert [p.name for p in full.iterdir()] == ["file"]


def files_in(directory):
    return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_an_output_that_is_holds_or_lies_inside_the_checkpoint_is_refused(single_run, tmp_path):
    """OUT replaced (--overwrite) would delete the checkpoint when it is the checkpoint or holds it (its run dir, a
    folder above); inside the checkpoint it would be written into it. Each is refused, nothing touched."""
    run_dir = shutil.copytree(single_run, tmp_path / "runs" / "run", ignore=shutil.ignore_patterns("final", "finetune"))
    checkpoint, before = run_dir / "checkpoint-2", files_in(tmp_path)
    for out in (checkpoint, run_dir, tmp_path / "runs", checkpoint / "exported"):
        last = refusal(checkpoint, out, "--overwrite")
        relation = "lies inside" if out == checkpoint / "exported" else "is" if out == checkpoint else "contains"
        assert f"{out}: the output would overwrite an input: it {relation} {checkpoint}" in last, last
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("pattern", ["mp_rank_00_model_states.pt", "*_optim_states.pt"], ids=["module", "optimizer"])
def test_a_deepspeed_checkpoint_holding_code_is_refused_unrun(zero1_run, tmp_path, pattern):
    """A real ZeRO-1 checkpoint with an object that runs code when unpickled added to the engine's model states
    (read by our export and by DeepSpeed's zero_to_fp32) or to an optimizer shard (zero_to_fp32): refused, the file
    and the global named, the code never run. The real checkpoints of the other DeepSpeed tests load: the types
    DeepSpeed stores are allowed."""
    run_dir = shutil.copytree(zero1_run, tmp_path / "run", ignore=shutil.ignore_patterns("final", "finetune"))
    file = sorted((run_dir / "checkpoint-2" / "pytorch_model").glob(pattern))[0]
    marker = tmp_path / "code_ran"
    state = torch.load(file, map_location="cpu", weights_only=False)  # written by the run above
    state["client_state"] = RunsCode(marker)
    torch.save(state, file)
    last = refusal(run_dir / "checkpoint-2", tmp_path / "out")
    assert f"error: {file}: " in last and "posix.mkdir" in last, last
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_help_answers_without_importing_torch():
    code = ("import runpy, sys; sys.argv = ['export_checkpoint.py', '--help']\n"
            "try: runpy.run_path('tools/export_checkpoint.py', run_name='__main__')\n"
            "except SystemExit as stop: assert stop.code == 0\n"
            "assert 'torch' not in sys.modules")
    result = run_script([sys.executable, "-c", code])
    assert "--no_wise_ft" in result.stdout and "--overwrite" in result.stdout


STATE_DICT_TYPES = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")


def write_fsdp_checkpoints(*checkpoints):
    """Replace the single-process weights of each checkpoint (one per STATE_DICT_TYPES) by what accelerate writes for
    the same model under FSDP2: every process holds a shard of every weight, and accelerate's own ``save_fsdp_model``
    saves them. Run under torchrun with 2 processes (gloo, CPU)."""
    import argparse
    from types import SimpleNamespace

    from accelerate import PartialState
    from accelerate.utils.fsdp_utils import save_fsdp_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    from modules.model_builders import build_encoder

    checkpoints = [Path(checkpoint) for checkpoint in checkpoints]
    processes = PartialState(cpu=True)  # the process group (gloo), and the state accelerate's logging asks for
    args = argparse.Namespace(**json.loads((checkpoints[0].parent / "run_config.json").read_text())["args"])
    model = build_encoder(args, SimpleNamespace(print=print))
    model.load_state_dict(load_file(checkpoints[0] / "model.safetensors"), strict=True)
    mesh = init_device_mesh("cpu", (processes.num_processes,))
    for layer in model.backbone.encoder.layer:  # as accelerate's TRANSFORMER_BASED_WRAP: one unit a layer
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for checkpoint, state_dict_type in zip(checkpoints, STATE_DICT_TYPES):
        plugin = SimpleNamespace(fsdp_version=2, state_dict_type=StateDictType[state_dict_type],
                                 state_dict_config=SimpleNamespace(), optim_state_dict_config=None)
        save_fsdp_model(plugin, processes, model, str(checkpoint))
        processes.wait_for_everyone()
        if processes.is_main_process:
            (checkpoint / "model.safetensors").unlink()
    processes.destroy_process_group()


if __name__ == "__main__":
    write_fsdp_checkpoints(*sys.argv[1:])

"""The GPU check: speed, memory and the distributed save/resume/export paths of our scripts on one GPU.

    bash bench/gpu_check.sh            # one GPU, under 8 minutes, nothing downloaded
    bash bench/gpu_check.sh --smoke    # the same runs on CPU at tiny sizes (CI runs this)

Every figure comes from a run of our own scripts (accelerate launch, as a researcher runs them) on random-weight
models of real shapes (tools/random_model.py) and synthetic pairs of varied length made from the bundled SICK
sentences; speed and memory are read from each run's train_summary.json (timed steps after the first; real tokens;
peak memory is CUDA's allocator peak on a GPU, the resident set on CPU). Parts:

- ``encoder``: BERT-large (335M) fine-tuning in bf16 autocast (float32 master weights): real tokens/s, MFU and peak
  memory with padded batches (--length_buckets 1), token-budget length buckets (our default) and padding-free
  forwards (flash_attention_2 where the flash-attn package is installed, else our sdpa_varlen reference); then the
  length-bucketed run again with --torch_compile (on a GPU only: compiling on CPU would make the smoke check minutes
  slower), its speed over the eager one and its compile seconds and graphs;
- ``gradcache``: BERT-base pretraining at a global batch of 16,384 pairs with GradCache mini-batches, against plain
  in-batch InfoNCE at the largest batch that fits (doubling until CUDA runs out of memory);
- ``lora``: a 0.5B Qwen2-shaped decoder with LoRA (bf16 frozen base): tokens/s, MFU and peak memory without and
  with gradient checkpointing, and padding-free;
- ``distributed``: FSDP (launch/fsdp.yaml with train_finetune.py, launch/fsdp_llm.yaml with train_llm_embed.py) and
  DeepSpeed ZeRO-2/3 (launch/deepspeed_zero{2,3}_llm.yaml): 4 steps saving at 2 and 4, a second run resumed from
  step 2, whose final/ must equal the first's (max abs difference reported) and load in sentence-transformers.

A part that cannot run here says why ({"skipped": ...}: accelerate's FSDP needs a GPU; DeepSpeed not installed); a
part that fails is {"error": ...} and the exit status is 1. Last line: one JSON object.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.random_model import demo_sentences, save_random_model  # noqa: E402

FULL = {
    "encoder": dict(size="large", batch=128, steps=20, query_len=64, passage_len=512),
    "gradcache": dict(size="base", batch=16384, mini_batch_size=1024, steps=3, max_len=64, plain_from=1024),
    "lora": dict(size="0.5b", batch=32, steps=10, query_len=128, passage_len=512),
    "distributed": dict(bert="base", qwen2="small", batch=16, processes=1),
}
SMOKE = {
    "encoder": dict(size="tiny", batch=8, steps=3, query_len=16, passage_len=64),
    "gradcache": dict(size="tiny", batch=32, mini_batch_size=8, steps=2, max_len=16, plain_from=8),
    "lora": dict(size="tiny", batch=4, steps=3, query_len=16, passage_len=48),
    "distributed": dict(bert="tiny", qwen2="tiny", batch=4, processes=2),
}
RUN_TIMEOUT = 600  # seconds for one run of a script
SPEED = ("pairs_per_s", "tokens_per_s", "tflops", "mfu", "peak_memory_mb")


class RunFailed(Exception):
    pass


class Check:
    """Runs our scripts under accelerate launch in a work folder, with the precision and peak of this check."""

    def __init__(self, work, smoke, peak_tflops):
        self.work, self.smoke = Path(work), smoke
        self.precision = "no" if smoke else "bf16"
        self.peak = ["--peak_tflops", str(peak_tflops)] if peak_tflops else []
        self.models = {}

    def model(self, arch, size):
        """A random model folder (built once)."""
        if (arch, size) not in self.models:
            folder = self.work / f"{arch}-{size}"
            count = save_random_model(arch, size, folder)
            self.models[arch, size] = (folder, count)
        return self.models[arch, size]

    def launch(self, script, flags, config="single.yaml", processes=1, out_of_memory_ok=False):
        """Run ``script`` with ``flags``; its train_summary.json, or None when CUDA ran out of memory and that is ok."""
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", self.precision]
        if processes > 1:
            command += ["--main_process_port", "0"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
        if self.smoke:
            env["OMP_NUM_THREADS"] = "1"
        try:
            result = subprocess.run([*command, str(REPO / script), *flags, "--report_to", "none"], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RunFailed(f"{script} {' '.join(flags)} ran past {RUN_TIMEOUT} s") from None
        if result.returncode != 0:
            if out_of_memory_ok and "out of memory" in result.stderr.lower():
                return None
            said = [line for line in result.stderr.splitlines() if "error" in line.lower()][:1]  # its one-line error
            raise RunFailed(f"{script} {' '.join(flags)} failed ({result.returncode}): {' '.join(said)} ... "
                            f"{result.stderr[-1500:]}")
        output_dir = Path(flags[flags.index("--output_dir") + 1])
        return json.loads((output_dir / "train_summary.json").read_text())


def write_pairs(path, count, seed=0):
    """``count`` (query, passage) pairs: a query of 1-2 SICK sentences, a passage of 1-40 (most short, some long)."""
    sentences, rng = demo_sentences(), random.Random(seed)
    with open(path, "w") as out:
        for _ in range(count):
            passage = min(40, 1 + int(rng.expovariate(1 / 6)))
            out.write(json.dumps({"text": " ".join(rng.sample(sentences, rng.randint(1, 2))),
                                  "text_pos": " ".join(rng.sample(sentences, passage))}) + "\n")
    return path


def finetune_data(work, records):
    folder = work / "finetune_data"
    folder.mkdir(exist_ok=True)
    write_pairs(folder / "pairs.jsonl", records)
    (folder / "meta.txt").write_text("pairs.jsonl 1 type=retri_contrast\n")
    return folder / "meta.txt"


def finetune_flags(model, meta, sizes, steps):
    """train_finetune.py / train_llm_embed.py flags of a run of ``steps`` on the pairs (no --output_dir)."""
    return ["--model_name_or_path", str(model), "--meta_list", str(meta),
            "--max_steps", str(steps), "--log_every", str(steps), "--retri_batch_size", str(sizes["batch"]),
            "--retri_negatives", "0", "--retri_temperature", "0.05", "--query_max_len", str(sizes["query_len"]),
            "--passage_max_len", str(sizes["passage_len"]), "--lr", "1e-5", "--warmup_ratio", "0", "--seed", "1"]


def speed(summary):
    return {key: float(f"{summary[key]:.4g}") for key in SPEED if summary.get(key) is not None}


def padding_free_attention():
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa_varlen"


def compiled_variant():
    """The flags of the encoder's compiled run: the length-bucketed one with --torch_compile."""
    return ["--attn_implementation", "sdpa", "--torch_compile"]


def encoder_part(check, sizes):
    model, count = check.model("bert", sizes["size"])
    meta = finetune_data(check.work, 4 * sizes["batch"] * sizes["steps"])
    attention = padding_free_attention()
    variants = {"padded": ["--length_buckets", "1", "--attn_implementation", "sdpa"],
                "length_buckets": ["--attn_implementation", "sdpa"],
                "padding_free": ["--padding_free", "--attn_implementation", attention]}
    if not check.smoke:
        variants["compiled"] = compiled_variant()
    result = {"model": f"random BERT-{sizes['size']} ({count / 1e6:.3g}M)", "batch": sizes["batch"],
              "padding_free_attention": attention}
    for name, flags in variants.items():
        output_dir = ["--output_dir", str(check.work / "encoder" / name)]
        summary = check.launch("train_finetune.py", finetune_flags(model, meta, sizes, sizes["steps"]) + output_dir
                               + flags + check.peak)
        result[name] = {**speed(summary), **summary.get("torch_compile", {})}
    result["padding_free_over_padded"] = round(result["padding_free"]["tokens_per_s"]
                                               / result["padded"]["tokens_per_s"], 3)
    if check.smoke:
        result["compiled"] = {"skipped": "compiling on CPU takes minutes (bench/loop_overhead.py times it)"}
    else:
        result["compiled_over_eager"] = round(result["compiled"]["tokens_per_s"]
                                              / result["length_buckets"]["tokens_per_s"], 3)
    return result


def gradcache_part(check, sizes):
    model, count = check.model("bert", sizes["size"])
    folder = check.work / "pretrain_data"
    folder.mkdir(exist_ok=True)
    write_pairs(folder / "pairs.jsonl", sizes["batch"] * (sizes["steps"] + 1), seed=1)
    (folder / "meta.txt").write_text("pairs.jsonl 1\n")

    def pretrain(name, batch, extra, out_of_memory_ok=False):
        flags = ["--model_name_or_path", str(model), "--meta_list", str(folder / "meta.txt"),
                 "--output_dir", str(check.work / "gradcache" / name), "--batch_size", str(batch),
                 "--max_steps", str(sizes["steps"]), "--log_every", str(sizes["steps"]),
                 "--query_max_len", str(sizes["max_len"]), "--passage_max_len", str(sizes["max_len"]),
                 "--lr", "1e-5", "--warmup_steps", "0", "--seed", "1", *extra, *check.peak]
        return check.launch("train_pretrain.py", flags, out_of_memory_ok=out_of_memory_ok)

    result = {"model": f"random BERT-{sizes['size']} ({count / 1e6:.3g}M)", "max_len": sizes["max_len"]}
    result["gradcache"] = {"batch": sizes["batch"], "mini_batch_size": sizes["mini_batch_size"],
                           **speed(pretrain("cached", sizes["batch"], ["--mini_batch_size",
                                                                       str(sizes["mini_batch_size"])]))}
    batch, largest = sizes["plain_from"], None
    while batch <= sizes["batch"]:  # plain InfoNCE, doubling until out of memory (or the cached batch)
        summary = pretrain(f"plain{batch}", batch, [], out_of_memory_ok=True)
        if summary is None:
            break
        largest = {"batch": batch, **speed(summary)}
        batch *= 2
    result["plain_largest"] = largest or {"batch": None, "note": f"out of memory at {sizes['plain_from']}"}
    return result


def lora_part(check, sizes):
    model, count = check.model("qwen2", sizes["size"])
    meta = finetune_data(check.work, 4 * sizes["batch"] * sizes["steps"])
    dtype = ["--torch_dtype", "float32" if check.smoke else "bfloat16"]
    variants = {"plain": [], "gradient_checkpointing": ["--gradient_checkpointing"],
                "padding_free": ["--padding_free", "--attn_implementation", padding_free_attention()]}
    result = {"model": f"random Qwen2-{sizes['size']} ({count / 1e6:.3g}M) + LoRA r 16", "batch": sizes["batch"]}
    for name, flags in variants.items():
        output_dir = ["--output_dir", str(check.work / "lora" / name)]
        summary = check.launch("train_llm_embed.py", finetune_flags(model, meta, sizes, sizes["steps"]) + output_dir
                               + dtype + flags + check.peak)
        result[name] = speed(summary)
    return result


def save_resume_export(check, name, script, config, flags, processes):
    """4 steps saving at 2 and 4; again resumed from step 2: the two final/ folders, compared, and one loaded."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    first, second = check.work / name / "first", check.work / name / "resumed"
    check.launch(script, [*flags, "--output_dir", str(first)], config, processes)
    check.launch(script, [*flags, "--output_dir", str(second), "--resume_from_checkpoint",
                          str(first / "checkpoint-2")], config, processes)
    difference, files = 0.0, sorted(p.relative_to(first) for p in (first / "final").rglob("*.safetensors"))
    for relative in files:
        a, b = load_file(first / relative), load_file(second / relative)
        if a.keys() != b.keys():
            raise RunFailed(f"{name}: {relative} holds other tensors after the resume")
        difference = max([difference, *((a[k].float() - b[k].float()).abs().max().item() for k in a)])
    embeddings = SentenceTransformer(str(second / "final"), device="cpu").encode(["a man is playing a guitar"])
    if not files or not math.isfinite(float(embeddings.sum())):
        raise RunFailed(f"{name}: final/ has no weights or embeds non-finite numbers")
    shards = sum(1 for _ in (first / "checkpoint-2").rglob("*") if _.is_file())
    return {"resume_max_abs_diff": difference, "final_files": [str(f) for f in files],
            "checkpoint_files": shards, "embedding_dim": int(embeddings.shape[1])}


def distributed_part(check, sizes):
    bert, _ = check.model("bert", sizes["bert"])
    qwen2, _ = check.model("qwen2", sizes["qwen2"])
    meta = finetune_data(check.work, 64)
    shape = dict(batch=sizes["batch"], query_len=16, passage_len=48)
    runs = {"fsdp_encoder": ("train_finetune.py", "fsdp.yaml", bert), "fsdp_llm": ("train_llm_embed.py",
            "fsdp_llm.yaml", qwen2), "zero2_llm": ("train_llm_embed.py", "deepspeed_zero2_llm.yaml", qwen2),
            "zero3_llm": ("train_llm_embed.py", "deepspeed_zero3_llm.yaml", qwen2)}
    result = {}
    for name, (script, config, model) in runs.items():
        if name.startswith("fsdp") and check.smoke:
            result[name] = {"skipped": "accelerate's FSDP needs a GPU"}
            continue
        if name.startswith("zero") and not importlib.util.find_spec("deepspeed"):
            result[name] = {"skipped": "deepspeed is not installed"}
            continue
        flags = finetune_flags(model, meta, shape, 4) + ["--save_every", "2"]
        result[name] = save_resume_export(check, name, script, config, flags, sizes["processes"])
    return result


PARTS = {"encoder": encoder_part, "gradcache": gradcache_part, "lora": lora_part, "distributed": distributed_part}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (what CI runs)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="for MFU (default: the GPU's datasheet peak; 1 with --smoke, a placeholder)")
    parser.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if unknown := [part for part in parts if part not in PARTS]:
        parser.error(f"--parts: unknown {', '.join(unknown)} (the parts are {', '.join(PARTS)})")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_check.py: no GPU here; run it with --smoke for the CPU check", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(0), "smoke": args.smoke,
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(args.work_dir or tmp, args.smoke, args.peak_tflops or (1.0 if args.smoke else None))
        check.work.mkdir(parents=True, exist_ok=True)
        for part in parts:
            part_started = time.perf_counter()
            try:
                result[part] = PARTS[part](check, (SMOKE if args.smoke else FULL)[part])
            except RunFailed as error:
                result[part] = {"error": str(error)}
            result[part]["seconds"] = round(time.perf_counter() - part_started, 1)
            print(f"{part}: {json.dumps(result[part])}", file=sys.stderr, flush=True)
    result["failed"] = [part for part in parts if "error" in result[part]]
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

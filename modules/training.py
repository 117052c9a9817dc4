"""Pieces every training script shares: the per-task forward, optimizer, checkpoints, run config."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def make_accelerator(output_dir, gradient_accumulation_steps=1):
    """The run's Accelerator: tensorboard logs in output_dir; gloo for multi-process runs on CPU."""
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    launched = "WORLD_SIZE" in os.environ  # by accelerate launch / torchrun: a process group is set up
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # the scripts step the scheduler once per optimizer step
        log_with="tensorboard",
        project_dir=output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else [],
    )


def add_output_arguments(parser):
    """Output, logging, evaluation and checkpoint flags every training script has."""
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only the final model)")
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--eval_sts_file", default=None, help="JSONL of text, text_pair, label: Spearman before/during/after")
    g.add_argument("--eval_every", type=int, default=0)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory")


def to_device(batch, device):
    """Move every tensor of a (nested) batch dict to ``device``."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def length_sorted_sub_batches(tokens, count=None, size=None):
    """[(row indices, tokens of those rows)]: rows sorted by length, cut into ``count`` sub-batches
    (or sub-batches of ``size`` rows), each trimmed to its own longest row. Right or left padding."""
    mask = tokens["attention_mask"]
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    right_padded = bool(mask[:, 0].all())
    sub_batches = []
    for rows in (order.tensor_split(count) if count else order.split(size)):
        width = int(lengths[rows].max())
        columns = slice(0, width) if right_padded else slice(mask.size(1) - width, None)
        sub_batches.append((rows, {key: value[rows, columns] for key, value in tokens.items()}))
    return sub_batches


def embed(model, tokens, length_buckets=1):
    """``model(**tokens)``, run as up to ``length_buckets`` forwards over rows of similar length.

    Each bucket is trimmed to its own longest row, so little compute goes to padding; the
    embeddings are the same as one padded forward (padding is masked), only cheaper when lengths vary.
    """
    if length_buckets <= 1 or tokens["attention_mask"].size(0) < 2 * length_buckets:
        return model(**tokens)
    sub_batches = length_sorted_sub_batches(tokens, count=length_buckets)
    outputs = torch.cat([model(**sub_tokens) for _, sub_tokens in sub_batches])
    return outputs[torch.argsort(torch.cat([rows for rows, _ in sub_batches]))]


def task_loss(model, batch, losses, length_buckets=1):
    """Embed one task-homogeneous batch and return its (unweighted) loss.

    Contrastive batches embed queries and passages separately (their max lengths differ);
    ``passage`` holds [positives | negatives of row 0 | negatives of row 1 | ...].
    """
    kind = batch["kind"]
    if kind == "cosent":
        first, second = embed(model, batch["pair"], length_buckets).chunk(2)
        return losses[kind](first, second, batch["labels"])
    queries = embed(model, batch["query"], length_buckets)
    passages = embed(model, batch["passage"], length_buckets)
    rows, num_negatives = queries.size(0), batch["num_negatives"]
    negatives = passages[rows:].view(rows, num_negatives, -1) if num_negatives else None
    return losses[kind](queries, passages[:rows], negatives)


def batch_size_and_tokens(batch):
    """(records, non-padding tokens) in one batch, for throughput logging."""
    if batch["kind"] == "cosent":
        return batch["labels"].numel(), int(batch["pair"]["attention_mask"].sum())
    return batch["query"]["input_ids"].size(0), int(
        batch["query"]["attention_mask"].sum() + batch["passage"]["attention_mask"].sum()
    )


def build_optimizer(model, lr, weight_decay):
    """AdamW with no weight decay on biases and norm weights (the usual BERT recipe).

    The fused kernel is several times faster per step than the default on CPU and GPU.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.dim() < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator, output_dir, step, trainer_state, save_total_limit=None, process_state=None):
    """``save_state`` into checkpoint-<step>.tmp, add the trainer state, then rename.

    ``process_state`` (e.g. a streaming loader's position, different on every process) is
    gathered and saved as ``trainer_state["process_states"][process_index]``. The rename is the
    last thing that happens, so a crash mid-save leaves only a ``.tmp`` directory, which
    ``resolve_checkpoint`` never picks.
    """
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
        (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if save_total_limit:
            for old in completed_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


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
    """``latest`` -> newest complete checkpoint in output_dir (None if there is none); else the path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = completed_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def load_checkpoint(accelerator, path):
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    saved_by = len(state.get("process_states", [])) or accelerator.num_processes
    if saved_by != accelerator.num_processes:
        raise ValueError(f"{path} was saved by {saved_by} processes, this run has {accelerator.num_processes}: each "
                         "process's data position is in the checkpoint, so resume with the same number of processes")
    return state


def finish_run(accelerator, model, output_dir, summary, eval_file=None, eval_history=None):
    """Write output_dir/final (a sentence-transformers directory), train_summary.json (with pairs/s)
    and, when there was a dev set, eval_results.json; then end the trackers."""
    summary["pairs_per_s"] = summary["pairs"] / summary["seconds"] if summary["seconds"] else None
    state_dict = accelerator.get_state_dict(model)  # every process takes part (sharded FSDP / ZeRO-3)
    if accelerator.is_main_process:
        final_dir = Path(output_dir) / "final"
        accelerator.unwrap_model(model).save_pretrained(final_dir, state_dict=state_dict)
        (Path(output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {final_dir}")
        if eval_history:
            _write_eval_results(output_dir, eval_file, eval_history)
    accelerator.end_training()


def write_run_config(output_dir, args, copy_files=()):
    """Record the command line, every argument and the data lists of a run in its output dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {"command": sys.argv, "args": {k: v for k, v in vars(args).items()}}
    (output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    for path in copy_files:
        if path:
            shutil.copy(path, output_dir / Path(path).name)


def _write_eval_results(output_dir, eval_file, history):
    """eval_results.json with the dev Spearman at each evaluated step, and a one-line summary."""
    (Path(output_dir) / "eval_results.json").write_text(json.dumps(
        {"eval_file": eval_file, "sts_spearman_by_step": history}, indent=2))
    first, last = min(history), max(history)
    print(f"dev Spearman: step {first} {history[first]:.2f} -> step {last} {history[last]:.2f}")

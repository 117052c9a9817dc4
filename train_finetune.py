"""Multi-task fine-tuning of an embedding model with Piccolo2's hybrid loss.

    accelerate launch --config_file launch/ddp.yaml train_finetune.py \
        --model_name_or_path PATH --meta_list meta_lists/demo.txt --output_dir runs/ft

Every batch comes from one dataset of the meta list and is scored with that dataset's loss:
retri_contrast (InfoNCE with in-batch + hard negatives), cls_contrast (InfoNCE over its own
negatives only) or cosent (CoSENT). All hyperparameters are below; edit freely for ablations.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from modules.data import EpochBatches, MetaEntry, TaskBatchSampler, TaskCollator, load_meta_list, load_task_dataset
from modules.evaluation import sts_spearman
from modules.losses import CoSENT, InfoNCE, Matryoshka, matryoshka_dims
from modules.model import EmbeddingModel
from modules.training import (
    batch_size_and_tokens, build_optimizer, load_checkpoint, resolve_checkpoint, save_checkpoint,
    task_loss, to_device, write_run_config,
)

KINDS = ("retri_contrast", "cls_contrast", "cosent")
PICCOLO_MRL_DIMS = (256, 512, 768, 1024, 1280, 1536, 1792)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="transformers or sentence-transformers directory")
    g.add_argument("--pooling", choices=["mean", "cls", "lasttoken"], default=None, help="default: the model's own, else mean")
    g.add_argument("--scaling_dim", type=int, default=None, help="add/keep a ScalingLayer hidden->dim (Piccolo2: 1792)")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--meta_list", required=True, help="lines of '<path> <repeat> [type=KIND] [batch_size=N]'")
    g.add_argument("--root_dir", default=None, help="base of relative meta-list paths (default: the meta list's dir)")
    g.add_argument("--retri_batch_size", type=int, default=32, help="per process")
    g.add_argument("--cls_batch_size", type=int, default=32, help="per process")
    g.add_argument("--cosent_batch_size", type=int, default=32, help="per process")
    g.add_argument("--retri_negatives", type=int, default=1, help="hard negatives per query (0: in-batch only)")
    g.add_argument("--cls_negatives", type=int, default=1, help="negatives per cls_contrast record (>= 1)")
    g.add_argument("--query_max_len", type=int, default=64)
    g.add_argument("--passage_max_len", type=int, default=256)
    g.add_argument("--pair_max_len", type=int, default=128, help="cosent texts")
    g.add_argument("--query_prefix", default="", help="instruction prepended to contrastive queries")
    g.add_argument("--num_workers", type=int, default=1, help="tokenizing dataloader workers")
    g.add_argument("--length_buckets", type=int, default=4,
                   help="split each forward into N length-sorted sub-batches to skip padding (1: off)")
    g = p.add_argument_group("loss")
    g.add_argument("--retri_temperature", type=float, default=0.01)
    g.add_argument("--cls_temperature", type=float, default=0.05)
    g.add_argument("--cosent_temperature", type=float, default=0.05)
    g.add_argument("--retri_weight", type=float, default=1.0)
    g.add_argument("--cls_weight", type=float, default=0.2)
    g.add_argument("--cosent_weight", type=float, default=0.04)
    g.add_argument("--retri_hard_negatives_only", action="store_true", help="no in-batch negatives for retrieval")
    g.add_argument("--mrl_dims", default="", help="comma list of Matryoshka dims, or 'piccolo' for 256..1792 (<= output)")
    g.add_argument("--mrl_weights", default="", help="comma list, one per MRL dim (default equal)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--lr_scheduler", default="linear", help="any transformers scheduler name")
    g.add_argument("--warmup_ratio", type=float, default=0.1)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--eval_sts_file", default=None, help="JSONL of text, text_pair, label: Spearman before/during/after")
    g.add_argument("--eval_every", type=int, default=0)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory")
    args = p.parse_args(argv)
    if args.cls_negatives < 1:
        p.error("--cls_negatives must be >= 1: cls_contrast has no in-batch negatives")
    return args


def main(argv=None):
    args = parse_args(argv)
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    launched = "WORLD_SIZE" in os.environ  # by accelerate launch / torchrun: a process group is set up
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        step_scheduler_with_optimizer=False,  # we step the scheduler once per optimizer step ourselves
        log_with="tensorboard",
        project_dir=args.output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else [],
    )
    set_seed(args.seed)  # before anything random is built (Piccolo builds its sampler first)

    # ---- data: every record checked now, so bad input fails before step one
    negatives = {"retri_contrast": args.retri_negatives, "cls_contrast": args.cls_negatives}
    datasets = load_meta_list(args.meta_list, args.root_dir, negatives)
    default_batch = {"retri_contrast": args.retri_batch_size, "cls_contrast": args.cls_batch_size,
                     "cosent": args.cosent_batch_size}
    sampler = TaskBatchSampler(
        dataset_sizes=[len(d) for d in datasets],
        repeats=[d.repeat for d in datasets],
        batch_sizes=[d.batch_size or default_batch[d.kind] for d in datasets],
        seed=args.seed,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )
    eval_pairs = load_task_dataset(MetaEntry(Path(args.eval_sts_file), 1, kind="cosent"), {}).records if args.eval_sts_file else None

    # ---- model and losses
    model = EmbeddingModel.from_pretrained(args.model_name_or_path, pooling=args.pooling, scaling_dim=args.scaling_dim)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    collator = TaskCollator(model.tokenizer, {"query": args.query_max_len, "passage": args.passage_max_len,
                                              "pair": args.pair_max_len}, negatives, args.seed, args.query_prefix)
    losses = {
        "retri_contrast": InfoNCE(args.retri_temperature, in_batch_negatives=not args.retri_hard_negatives_only),
        "cls_contrast": InfoNCE(args.cls_temperature, in_batch_negatives=False),
        "cosent": CoSENT(args.cosent_temperature),
    }
    loss_weights = {"retri_contrast": args.retri_weight, "cls_contrast": args.cls_weight, "cosent": args.cosent_weight}
    if args.mrl_dims:
        if args.mrl_dims == "piccolo":
            dims = matryoshka_dims(PICCOLO_MRL_DIMS, model.output_dim)
        else:
            dims = [int(d) for d in args.mrl_dims.split(",")]
        weights = [float(w) for w in args.mrl_weights.split(",")] if args.mrl_weights else None
        if not dims or max(dims) > model.output_dim:
            raise ValueError(f"--mrl_dims {args.mrl_dims}: dims must be <= the output size {model.output_dim}")
        losses = {kind: Matryoshka(loss, dims, weights) for kind, loss in losses.items()}

    # ---- optimizer and schedule (in optimizer steps)
    steps_per_epoch = len(sampler) // args.grad_accum
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps * args.grad_accum / len(sampler))
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    tokenizer = accelerator.unwrap_model(model).tokenizer

    # ---- resume
    global_step, start_epoch, start_batch = 0, 0, 0
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        global_step, start_epoch, start_batch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        accelerator.print(f"resumed from {checkpoint} at step {global_step} (epoch {start_epoch}, batch {start_batch})")

    if accelerator.is_main_process:
        write_run_config(args.output_dir, args, [args.meta_list])
    accelerator.init_trackers("finetune", config={k: str(v) for k, v in vars(args).items()})

    def evaluate():
        score = sts_spearman(model, tokenizer, eval_pairs, args.pair_max_len)
        accelerator.log({"eval/sts_spearman": score}, step=global_step)
        return score

    eval_history = {}
    if eval_pairs and checkpoint is None:
        eval_history[0] = evaluate()
        accelerator.print(f"step 0: dev Spearman {eval_history[0]:.2f}")

    # ---- train
    model.train()
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process)
    window = {"loss": torch.zeros(len(KINDS)), "count": torch.zeros(len(KINDS)), "pairs": 0, "tokens": 0,
              "start": time.perf_counter()}
    done = global_step >= total_steps
    measured = {"steps": 0, "pairs": 0, "tokens": 0, "seconds": 0.0}  # training steps only, after the first
    warm, step_start = False, time.perf_counter()
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        first = start_batch if epoch == start_epoch else 0
        loader = DataLoader(
            EpochBatches(sampler, datasets, collator, epoch, start=first),
            batch_size=None,
            num_workers=args.num_workers,
            generator=torch.Generator().manual_seed(args.seed + epoch),  # leaves the global RNG stream alone
        )
        for batch_in_epoch, batch in enumerate(loader, start=first):
            kind = batch["kind"]
            with accelerator.accumulate(model):
                loss = task_loss(model, to_device(batch, accelerator.device), losses, args.length_buckets)
                accelerator.backward(loss_weights[kind] * loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            pairs, tokens = batch_size_and_tokens(batch)
            window["loss"][KINDS.index(kind)] += loss.detach().float().cpu()
            window["count"][KINDS.index(kind)] += 1
            window["pairs"] += pairs * accelerator.num_processes
            window["tokens"] += tokens * accelerator.num_processes
            if warm:
                measured["pairs"] += pairs * accelerator.num_processes
                measured["tokens"] += tokens * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            scheduler.step()
            global_step += 1
            if warm:
                measured["seconds"] += time.perf_counter() - step_start
                measured["steps"] += 1
            warm = True
            progress.update(1)
            if global_step % args.log_every == 0 or global_step == total_steps:
                elapsed = time.perf_counter() - window["start"]
                task_losses = accelerator.reduce(window["loss"].to(accelerator.device), "mean").cpu()
                metrics = {f"loss/{k}": (task_losses[i] / window["count"][i]).item()
                           for i, k in enumerate(KINDS) if window["count"][i]}
                metrics.update({"lr": scheduler.get_last_lr()[0], "pairs_per_s": window["pairs"] / elapsed,
                                "tokens_per_s": window["tokens"] / elapsed, "epoch": epoch})
                accelerator.log(metrics, step=global_step)
                progress.set_postfix({k.removeprefix("loss/"): f"{v:.3g}" for k, v in metrics.items() if k != "epoch"})
                window.update(loss=torch.zeros(len(KINDS)), count=torch.zeros(len(KINDS)), pairs=0, tokens=0,
                              start=time.perf_counter())
            if eval_pairs and args.eval_every and global_step % args.eval_every == 0:
                eval_history[global_step] = evaluate()
            if args.save_every and global_step % args.save_every == 0:
                state = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch + 1}
                save_checkpoint(accelerator, args.output_dir, global_step, state, args.save_total_limit)
            if global_step >= total_steps:
                done = True
                break
            step_start = time.perf_counter()
    progress.close()

    # ---- final model and scores
    if eval_pairs:
        eval_history[global_step] = evaluate()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        final_dir = Path(args.output_dir) / "final"
        accelerator.unwrap_model(model).save_pretrained(final_dir, state_dict=state_dict)
        measured["pairs_per_s"] = measured["pairs"] / measured["seconds"] if measured["seconds"] else None
        (Path(args.output_dir) / "train_summary.json").write_text(json.dumps(measured, indent=2))
        if eval_pairs:
            (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(
                {"eval_file": args.eval_sts_file, "sts_spearman_by_step": eval_history}, indent=2))
            first_step, last_step = min(eval_history), max(eval_history)
            print(f"dev Spearman: step {first_step} {eval_history[first_step]:.2f} -> "
                  f"step {last_step} {eval_history[last_step]:.2f}")
        print(f"saved {final_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()

"""Weakly supervised pair pretraining: in-batch InfoNCE over streamed (query, positive) pairs.

    accelerate launch -q --config_file launch/ddp.yaml train_pretrain.py \
        --model_name_or_path PATH --meta_list meta_lists/pretrain_demo.txt --output_dir runs/pt \
        --batch_size 4096 --mini_batch_size 128 --max_steps 10000

Conan-Embedding's first stage and the 1B-pairs project (all-MiniLM-L6-v2): every step's global
batch comes from one source, drawn by weight; every other pair in the global batch (all processes)
is a negative; ``--mini_batch_size`` (rows) or ``--mini_batch_tokens`` (padded tokens) turns on GradCache so the
batch can be tens of thousands of pairs on limited memory. Data streams: nothing is read ahead, and a checkpoint holds every
process's position in every source, so resuming continues with exactly the batches that would
have come next. All hyperparameters are below; edit freely for ablations.
"""

import math

from modules.cli import ArgumentParser, UsageError, run_cli
from modules.flags import (
    DTYPE_NAMES, TORCH_DTYPE_HELP, add_attention_arguments, add_bucket_arguments, add_compile_arguments,
    add_output_arguments, check_output_arguments, claim_output_dir,
)
from modules.meta_list import PRETRAIN_META_LINE


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="transformers or sentence-transformers directory")
    g.add_argument("--pooling", choices=["mean", "cls", "lasttoken"], default=None, help="default: the model's own, else mean")
    g.add_argument("--torch_dtype", choices=DTYPE_NAMES, default="float32", help=TORCH_DTYPE_HELP)
    g.add_argument("--gradient_checkpointing", action="store_true")
    add_attention_arguments(g)
    add_compile_arguments(g)
    g = p.add_argument_group("data")
    g.add_argument("--meta_list", required=True, help=f"lines of '{PRETRAIN_META_LINE}'")
    g.add_argument("--root_dir", default=None, help="base of relative meta-list paths (default: the meta list's dir)")
    g.add_argument("--batch_size", type=int, default=256, help="pairs per process per step (global = x processes)")
    g.add_argument("--query_max_len", type=int, default=64)
    g.add_argument("--passage_max_len", type=int, default=256)
    g.add_argument("--query_prefix", default=None,
                   help="instruction prepended to queries, saved as the model's 'query' prompt (encode_query, mteb); "
                        "default: the start model's 'query' prompt, else none")
    g.add_argument("--shuffle_chunk", type=int, default=8192, help="records read and shuffled together")
    g.add_argument("--block_mb", type=int, default=64, help="JSONL files are split into blocks of this many MB")
    g.add_argument("--num_workers", type=int, default=2, help="tokenizing loader workers per process (0: in-process)")
    add_bucket_arguments(g, gradcache=True)
    g.add_argument("--skip_bad_records", action="store_true",
                   help="skip records with invalid JSON or a missing, non-text or empty text, counted in the log, "
                        "instead of stopping at the first")
    g = p.add_argument_group("loss")
    g.add_argument("--temperature", type=float, default=0.05, help="0.05 = scale 20 (MultipleNegativesRankingLoss)")
    g.add_argument("--symmetric", action="store_true", help="add the positive->query direction")
    g.add_argument("--loss_chunk_size", type=int, default=1024, help="query rows scored at once (memory only)")
    g.add_argument("--mrl_dims", default="", help="comma list of Matryoshka dims, or 'piccolo' for 256..1792 (<= output)")
    g.add_argument("--mrl_weights", default="", help="comma list, one per MRL dim (default equal)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=2e-5)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--lr_scheduler", default="linear", help="any transformers scheduler name")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="warmup steps as a share of --max_steps")
    g.add_argument("--warmup_steps", type=int, default=None, help="warmup steps (overrides --warmup_ratio)")
    g.add_argument("--max_steps", type=int, required=True, help="optimizer steps (the stream has no epochs)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=42)
    add_output_arguments(p)
    args = p.parse_args(argv)
    check_output_arguments(p, args)
    if args.max_steps < 1:
        p.error(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.warmup_steps is None:
        args.warmup_steps = math.ceil(args.warmup_ratio * args.max_steps)
    if not 0 <= args.warmup_steps <= args.max_steps:
        p.error(f"--warmup_steps {args.warmup_steps} must be in [0, --max_steps {args.max_steps}]")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_lock = claim_output_dir(args)  # held while main runs: one run at a time per --output_dir
    # imported after the flags are parsed, so that --help and flag errors answer at once
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from modules.checkpoints import check_resumable, load_checkpoint, resolve_checkpoint, save_checkpoint
    from modules.compilation import compile_figures, compile_for_training
    from modules.ema import WeightEMA
    from modules.evaluation import DevSets
    from modules.forward import embed, to_device
    from modules.gradcache import cached_loss_backward, check_gradcache_supported
    from modules.losses import InBatchInfoNCE
    from modules.matryoshka import matryoshka_from_flags
    from modules.model_builders import build_pretrain_encoder
    from modules.model_selection import DevRun
    from modules.nonfinite import stop_on_non_finite_loss
    from modules.outputs import finish_run, write_run_config
    from modules.progress import Progress, Stopwatch
    from modules.run_logs import GradNorms
    from modules.run_summary import pretrain_setup, startup_lines
    from modules.streaming import PretrainBatches, describe_sources, read_pretrain_meta_list
    from modules.streaming import checked_batch, skipped_record_count, skipped_record_lines
    from modules.padding_free import check_padding_free
    from modules.prompts import set_training_prompts
    from modules.throughput import FlopCounter, SpeedMeter, peak_tflops
    from modules.training import build_optimizer, make_accelerator, make_scheduler

    accelerator = make_accelerator(args.output_dir, max_grad_norm=args.max_grad_norm, report_to=args.report_to,
                                   timeout_minutes=args.timeout_minutes)
    set_seed(args.seed)
    gradcache = bool(args.mini_batch_size or args.mini_batch_tokens)  # --mini_batch_size / --mini_batch_tokens
    if gradcache:
        check_gradcache_supported(accelerator)

    sources = read_pretrain_meta_list(args.meta_list, args.root_dir)
    # what fixes the stream and the schedule, stored with every checkpoint: a resume under another setup is refused
    data_order = {"processes": accelerator.num_processes, "seed": args.seed, "batch_size": args.batch_size,
                  "shuffle_chunk": args.shuffle_chunk, "block_mb": args.block_mb, "sources": describe_sources(sources)}
    schedule = {"max_steps": args.max_steps, "warmup_steps": args.warmup_steps, "lr": args.lr,
                "lr_scheduler": args.lr_scheduler, **({"ema_decay": args.ema_decay} if args.ema_decay else {})}
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, data_order, accelerator.num_processes, schedule)
    dev_sets = DevSets(args.eval_sts_file, args.eval_dir)  # --eval_sts_file and --eval_dir task folders
    if args.metric_for_best and args.metric_for_best not in dev_sets.metric_names():
        raise UsageError(f"--metric_for_best {args.metric_for_best}: the dev metrics are "
                         f"{', '.join(dev_sets.metric_names())}")

    model = build_pretrain_encoder(args)
    query_prefix = set_training_prompts(model, args, [("pairs", "retri_contrast")])["pairs"]  # saved as "query"
    prompts = model.prompts
    if args.padding_free:
        check_padding_free(model, accelerator.device)
    compile_for_training(model, args)  # --torch_compile: in place, before DDP wraps it
    loss_fn = matryoshka_from_flags(InBatchInfoNCE(args.temperature, args.symmetric, chunk_size=args.loss_chunk_size),
                                    args.mrl_dims, args.mrl_weights, model.output_dim)
    if args.mrl_dims:
        accelerator.print(f"Matryoshka dims: {loss_fn.dims}")
    tokenizer = model.tokenizer
    # pairs/s, real tokens/s, model TFLOP/s and MFU of the log window and of the run (GradCache embeds twice)
    speed = SpeedMeter(FlopCounter(model, passes=4 if gradcache else 3), accelerator.num_processes,
                       peak_tflops(args.peak_tflops, accelerator.device))
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    scheduler = make_scheduler(args.lr_scheduler, optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = WeightEMA(accelerator, model, args.ema_decay) if args.ema_decay else None  # --ema_decay
    saved_beside = [ema] if ema is not None else []  # safetensors files in every checkpoint
    setup = pretrain_setup(args, accelerator, sources)
    accelerator.print("\n".join(startup_lines(setup)))

    global_step, loader_state, source_batches, state = 0, None, [0] * len(sources), {}
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, saved_beside)
        global_step, loader_state = state["global_step"], state["process_states"][accelerator.process_index]
        source_batches = state.get("source_batches", source_batches)  # counted since this resume if not saved
        speed.run.update(state.get("speed") or {})
        accelerator.print(f"resumed from {checkpoint} at step {global_step}")
    if accelerator.is_main_process:
        write_run_config(args.output_dir, args, [args.meta_list])
    accelerator.init_trackers("pretrain", config={k: str(v) for k, v in vars(args).items()})

    # Each process streams its own part; batches carry the loader state after them (the worker owns the stream).
    batches = PretrainBatches(sources, args.batch_size, tokenizer, {"query": args.query_max_len,
                              "passage": args.passage_max_len}, args.seed, accelerator.process_index,
                              accelerator.num_processes, args.shuffle_chunk, args.block_mb << 20, query_prefix,
                              loader_state, args.skip_bad_records)
    loader = iter(DataLoader(batches, batch_size=None, num_workers=args.num_workers,
                             generator=torch.Generator().manual_seed(args.seed)))  # leaves the global RNG alone

    max_lengths = {"query": args.query_max_len, "passage": args.passage_max_len, "pair": args.query_max_len}

    def save():  # a checkpoint and everything the run has recorded
        trainer_state = {"global_step": global_step, "data_order": data_order, "schedule": schedule,
                         "source_batches": source_batches, **dev.state(), "speed": speed.run}
        save_checkpoint(accelerator, args.output_dir, global_step, trainer_state, args.save_total_limit,
                        process_state=loader_state, keep=dev.best.kept(), model=model, states=saved_beside)

    # dev scores of what final/ would hold at each evaluation (the start model first), the best kept
    dev = DevRun(dev_sets, args, prompts, ema, state, accelerator.unwrap_model(model).output_dim)
    if dev and checkpoint is None and dev.evaluate(accelerator, model, tokenizer, max_lengths, 0):
        save()  # --keep_best: the start model is the best so far

    model.train()
    progress = Progress(args.max_steps, global_step, accelerator.is_local_main_process)
    window = {"loss": torch.zeros(()), "steps": 0}
    grad_norms = GradNorms(accelerator, args.max_grad_norm)  # clips; grad_norm before clipping, grad_clipped
    step_clock = Stopwatch()  # the clock runs in training steps only, not in evaluations or saves
    while global_step < args.max_steps:
        step_clock.start()
        batch = checked_batch(next(loader))  # a DataError met in a loader worker is raised here, as one line
        loader_state = batch.pop("loader_state")
        batch_source = batch.pop("source")
        source_batches[batch_source] += 1
        batch = to_device(batch, accelerator.device)
        if gradcache:
            loss = cached_loss_backward(model, [batch["query"], batch["passage"]], loss_fn, args.mini_batch_size,
                                        backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model),
                                        mini_batch_tokens=args.mini_batch_tokens, split_tokens=args.split_tokens)
        else:
            loss = loss_fn(embed(model, batch["query"], args.length_buckets, args.split_tokens),
                           embed(model, batch["passage"], args.length_buckets, args.split_tokens))
            accelerator.backward(loss)
        stop_on_non_finite_loss(accelerator, global_step + 1, [loss], [f"loss of {sources[batch_source].name} "
                                                                       f"({sources[batch_source].source})"])
        grad_norms.clip(model.parameters())
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(global_step)
        optimizer.zero_grad()
        global_step += 1
        speed.add_batches([batch])
        speed.add_step(step_clock.stop())
        progress.update()
        window.update(loss=window["loss"] + loss.detach().float().cpu(), steps=window["steps"] + 1)
        if global_step % args.log_every == 0 or global_step == args.max_steps:
            loss_sum = accelerator.reduce(window["loss"].to(accelerator.device), "mean").item()  # every process's part
            metrics = {"loss": loss_sum / window["steps"], "lr": scheduler.get_last_lr()[0], **grad_norms.metrics(),
                       **speed.window_metrics()}  # real tokens, MFU
            if args.skip_bad_records:
                metrics["skipped_records"] = skipped_record_count(loader_state)  # this process's, so far
            accelerator.log({**metrics, **{f"batches/{s.name}": n for s, n in zip(sources, source_batches)}},
                            step=global_step)
            progress.log(global_step, metrics)
            window = {"loss": torch.zeros(()), "steps": 0}
        new_best = dev.due(global_step, args.max_steps) and dev.evaluate(accelerator, model, tokenizer, max_lengths,
                                                                         global_step)
        if new_best or (args.save_every and global_step % args.save_every == 0):
            save()
    progress.close()

    final_step = dev.final_weights(accelerator, model, tokenizer, max_lengths, global_step, args.final_is_best,
                                   args.output_dir, saved_beside)  # --final_is_best: the best step's checkpoint
    by_source = {source.name: count for source, count in zip(sources, source_batches)}
    accelerator.print("batches per source: " + ", ".join(f"{name} {count} ({100 * count / global_step:.1f}%)"
                                                        for name, count in by_source.items()))
    for line in skipped_record_lines(sources, loader_state):  # every process: each reads its own records
        print(f"process {accelerator.process_index}: {line}" if accelerator.num_processes > 1 else line, flush=True)
    finish_run(accelerator, model, args, {**setup, "steps": global_step, "source_batches": by_source,
                                          **speed.run_figures(accelerator.device), **dev.summary(),
                                          **compile_figures(args)},
               dev.history, ema, final_step, dev.scorer(tokenizer, max_lengths) if dev else None,
               dev.variant_scorer(tokenizer, max_lengths) if dev else None)


if __name__ == "__main__":
    run_cli(main)

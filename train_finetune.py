"""Multi-task fine-tuning of an embedding model with Piccolo2's hybrid loss.

    accelerate launch -q --config_file launch/ddp.yaml train_finetune.py \
        --model_name_or_path PATH --meta_list meta_lists/demo.txt --output_dir runs/ft

Every batch comes from one dataset of the meta list and is scored with that dataset's loss:
retri_contrast (InfoNCE with in-batch + hard negatives), cls_contrast (InfoNCE over its own
negatives only) or cosent (CoSENT). All hyperparameters are below; edit freely for ablations.
"""

import math

from modules.cli import ArgumentParser, UsageError, run_cli
from modules.flags import (
    DTYPE_NAMES, PE_METHODS, STS_LOSS_HELP, TORCH_DTYPE_HELP, add_attention_arguments, add_bucket_arguments,
    add_compile_arguments, add_output_arguments, check_output_arguments, claim_output_dir, sts_loss_flag,
)
from modules.meta_list import META_LINE
from modules.model_builders import build_encoder
from modules.task_kinds import TASK_KINDS


def parse_args(argv=None, add_arguments=None, description=__doc__, decoder=False):
    """The fine-tuning flags; ``add_arguments(parser)`` adds a calling script's own, and ``decoder`` drops the
    encoders' position-table flags and pools the last token by default (train_llm_embed.py)."""
    p = ArgumentParser(description=description)
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="transformers or sentence-transformers directory")
    if decoder:
        g.add_argument("--pooling", choices=["mean", "cls", "lasttoken"], default="lasttoken")
    else:
        g.add_argument("--pooling", choices=["mean", "cls", "lasttoken"], default=None,
                       help="default: the model's own, else mean")
    g.add_argument("--scaling_dim", type=int, default=None,
                   help="add/keep a ScalingLayer hidden->dim (Piccolo2: 1792; default: none)")
    g.add_argument("--scaling_lr", type=float, default=None,
                   help="learning rate of the ScalingLayer (default: --lr); a new one starts semi-orthogonal")
    g.add_argument("--torch_dtype", choices=DTYPE_NAMES, default="float32", help=TORCH_DTYPE_HELP)
    g.add_argument("--gradient_checkpointing", action="store_true")
    add_attention_arguments(g, implementation=not decoder)  # train_llm_embed.py has its own --attn_implementation
    add_compile_arguments(g)
    if decoder:  # a rotary decoder is extended with --rope_scaling instead
        p.set_defaults(extend_pe=False, max_length=None, freeze_position_embeddings=False)
    else:
        g.add_argument("--extend_pe", action="store_true",
                       help="extend a learned absolute position table (BERT, XLM-R, ...) to --max_length tokens")
        g.add_argument("--max_length", type=int, default=None,
                       help="with --extend_pe: positions after extension (<= n^2)")
        g.add_argument("--pe_extension", choices=PE_METHODS, default="hierarchical",
                       help="hierarchical decomposition (short inputs unchanged) or tile (p_{k mod n}, ablation)")
        g.add_argument("--pe_alpha", type=float, default=0.4, help="alpha of the hierarchical decomposition")
        g.add_argument("--freeze_position_embeddings", action="store_true", help="keep the position table fixed")
    g = p.add_argument_group("data")
    g.add_argument("--meta_list", required=True, help=f"lines of '{META_LINE}'")
    g.add_argument("--root_dir", default=None, help="base of relative meta-list paths (default: the meta list's dir)")
    g.add_argument("--retri_batch_size", type=int, default=32, help="per process")
    g.add_argument("--cls_batch_size", type=int, default=32, help="per process")
    g.add_argument("--cosent_batch_size", type=int, default=32, help="per process")
    g.add_argument("--retri_negatives", type=int, default=1, help="hard negatives per query (0: in-batch only)")
    g.add_argument("--cls_negatives", type=int, default=1, help="negatives per cls_contrast record (>= 1)")
    g.add_argument("--query_max_len", type=int, default=64)
    g.add_argument("--passage_max_len", type=int, default=256)
    g.add_argument("--pair_max_len", type=int, default=128, help="cosent texts")
    g.add_argument("--query_prefix", default=None,
                   help="instruction prepended to contrastive queries, saved as the model's 'query' prompt "
                        "(encode_query, mteb); default: the start model's 'query' prompt, else none")
    g.add_argument("--query_prefix_file", default=None,
                   help="JSON {dataset name: query prefix}, saved with the model as prompts of those names; "
                        "other datasets get --query_prefix")
    g.add_argument("--num_workers", type=int, default=1, help="tokenizing dataloader workers")
    add_bucket_arguments(g)
    g.add_argument("--skip_bad_records", action="store_true",
                   help="skip (and count at start-up) records with invalid JSON or a missing, non-text or empty text, "
                        "instead of stopping at the first")
    g = p.add_argument_group("loss")
    g.add_argument("--retri_temperature", type=float, default=0.01)
    g.add_argument("--cls_temperature", type=float, default=0.05)
    g.add_argument("--cosent_temperature", type=float, default=0.05,
                   help="temperature of the cosent kind's objective, whichever --sts_loss picks (pearson has none)")
    g.add_argument("--sts_loss", type=sts_loss_flag, default="cosent", help=STS_LOSS_HELP)
    g.add_argument("--retri_weight", type=float, default=1.0,
                   help="loss weights are relative: each is divided by the largest among the run's task kinds")
    g.add_argument("--cls_weight", type=float, default=0.2)
    g.add_argument("--cosent_weight", type=float, default=0.04)
    g.add_argument("--retri_hard_negatives_only", action="store_true", help="no in-batch negatives for retrieval")
    g.add_argument("--mask_duplicates", action="store_true",
                   help="false negatives: drop from each query's softmax every candidate whose text equals the query or "
                        "one of its record's positives (other than the labelled one)")
    g.add_argument("--mask_margin", type=float, default=None,
                   help="false negatives: drop candidates scoring above the positive's cosine + M (Qwen3-Embedding: 0.1)")
    g.add_argument("--mask_relative", type=float, default=None,
                   help="false negatives: drop candidates scoring above R x the positive's cosine (NV-Retriever: 0.95)")
    g.add_argument("--hard_negative_alpha", type=float, default=0.0,
                   help="weight each query's own hard negatives by exp(A x their cosine) in the softmax (EmbeddingGemma: 5)")
    g.add_argument("--in_batch_alpha", type=float, default=0.0,
                   help="weight every other negative by exp(A x its cosine) (0: weight 1)")
    g.add_argument("--improved_contrastive", action="store_true",
                   help="retrieval: also query-query and positive-positive similarities in the denominator (GTE, Qwen3)")
    g.add_argument("--spread_out_weight", type=float, default=0.0,
                   help="retrieval: add W x the global orthogonal regulariser of the queries and of the positives")
    g.add_argument("--mrl_dims", default="", help="comma list of Matryoshka dims, or 'piccolo' for 256..1792 (<= output)")
    g.add_argument("--mrl_weights", default="", help="comma list, one per MRL dim (default equal)")
    g = p.add_argument_group("distillation (modules/distillation.py)")
    g.add_argument("--teacher_model", default=None,
                   help="frozen teacher embedding model, run on the fly: scores for --distill_weight, embeddings for "
                        "type=parallel corpora")
    g.add_argument("--distill_weight", type=float, default=0.0,
                   help="retrieval: add W x KL(teacher || student softmax) over the same candidates; the teacher's "
                        "scores from --teacher_model, else from the records' pos_scores / neg_scores")
    g.add_argument("--teacher_temperature", type=float, default=None,
                   help="temperature of the teacher's softmax (default: --retri_temperature; 1 for cross-encoder logits)")
    g.add_argument("--parallel_weight", type=float, default=1.0, help="weight of type=parallel corpora (MSE)")
    g.add_argument("--parallel_batch_size", type=int, default=32, help="per process")
    g = p.add_argument_group("Conan: dynamic hard-negative mining (data from tools/mine_hard_negatives.py) and CBB")
    g.add_argument("--dhnm", action="store_true", help="re-mine easy negatives of retri_contrast data with candidates")
    g.add_argument("--dhnm_interval", type=int, default=100, help="check the last retrieval batch every N steps")
    g.add_argument("--dhnm_ratio", type=float, default=1.15, help="replace when ratio * S < S0 ...")
    g.add_argument("--dhnm_max_abs", type=float, default=0.8, help="... and |S| < this")
    g.add_argument("--dhnm_skip", type=int, default=10, help="replacement i takes ranks [(i-1)n+skip, in+skip)")
    g.add_argument("--cbb", action="store_true",
                   help="cross-GPU batch balance: every step one batch of every task; processes share retrieval "
                        "queries and hold different negatives; loss = retrieval + cbb_beta * CoSENT")
    g.add_argument("--cbb_beta", type=float, default=0.8, help="CoSENT weight under --cbb")
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
    add_output_arguments(p)
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    check_output_arguments(p, args)
    if args.cls_negatives < 1:
        p.error("--cls_negatives must be >= 1: cls_contrast has no in-batch negatives")
    if args.extend_pe != (args.max_length is not None):
        p.error("--extend_pe and --max_length N go together")
    if args.extend_pe and args.freeze_position_embeddings:
        p.error("--freeze_position_embeddings: the extended position table has to be trained")
    if args.extend_pe:
        too_long = [f"--{role}_max_len {length}" for role, length in (
            ("query", args.query_max_len), ("passage", args.passage_max_len), ("pair", args.pair_max_len))
            if length > args.max_length]
        if too_long:
            p.error(f"{', '.join(too_long)} above --max_length {args.max_length}")
    if args.improved_contrastive and (args.cbb or args.retri_hard_negatives_only):
        p.error("--improved_contrastive needs in-batch negatives without --cbb (it compares every query and positive "
                "of the batch)")
    if args.distill_weight and args.dhnm and not args.teacher_model:
        p.error("--distill_weight with --dhnm needs --teacher_model: DHNM replaces negatives the data's teacher scores "
                "belong to")
    if args.dhnm and args.retri_negatives < 1:
        p.error("--dhnm needs --retri_negatives >= 1 (the mined negatives it replaces)")
    if args.retri_hard_negatives_only and args.retri_negatives < 1:
        p.error("--retri_hard_negatives_only needs --retri_negatives >= 1: with no negatives the positive is the "
                "only candidate, and the loss and its gradient are 0")
    return args


def max_lengths_in_use(max_lengths, datasets, dev_sets):
    """{flag: length} of the texts this run tokenizes: CoSENT pairs, contrastive queries and passages, dev sets."""
    roles = {role for d in datasets for role in (("pair",) if d.kind in ("cosent", "parallel") else ("query", "passage"))}
    return {f"--{role}_max_len": max_lengths[role] for role in sorted(roles | dev_sets.length_roles())}


def main(argv=None, add_arguments=None, build_model=build_encoder, description=__doc__, decoder=False):
    """Fine-tune; train_llm_embed.py reuses this loop with its own flags and model (``build_model(args, accelerator)``)."""
    args = parse_args(argv, add_arguments, description, decoder)
    run_lock = claim_output_dir(args)  # held while main runs: one run at a time per --output_dir
    # imported after the flags are parsed, so that --help and flag errors answer at once
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from modules.checkpoints import check_resumable, load_checkpoint, resolve_checkpoint, save_checkpoint
    from modules.collator import TaskCollator
    from modules.compilation import compile_figures, compile_for_training
    from modules.data import finetune_data
    from modules.distillation import build_teacher, distillation_terms
    from modules.ema import WeightEMA
    from modules.evaluation import DevSets
    from modules.forward import task_loss, to_device
    from modules.losses import contrastive_masks
    from modules.mining import MiningState, dhnm_round
    from modules.model_selection import DevRun
    from modules.nonfinite import stop_on_non_finite_loss
    from modules.objective import task_losses
    from modules.outputs import finish_run, write_run_config
    from modules.padding_free import check_padding_free
    from modules.position import check_lengths_fit
    from modules.prompts import set_training_prompts
    from modules.progress import Progress, Stopwatch
    from modules.run_logs import GradNorms, LossWindow
    from modules.run_summary import finetune_setup, startup_lines
    from modules.samplers import EpochBatches
    from modules.throughput import FlopCounter, SpeedMeter, peak_tflops
    from modules.training import build_optimizer, make_accelerator, make_scheduler

    accelerator = make_accelerator(args.output_dir, args.grad_accum, args.max_grad_norm, args.report_to,
                                   args.timeout_minutes)
    set_seed(args.seed)  # before anything random is built (Piccolo builds its sampler first)

    # ---- data: every record checked now, so bad input fails before step one; the batch sampler (task-homogeneous
    # batches, or one of every kind a step under --cbb); data_order, stored with every checkpoint (a resume under
    # another setup is refused)
    negatives = {"retri_contrast": args.retri_negatives, "cls_contrast": args.cls_negatives}
    negative_parts = accelerator.num_processes if args.cbb else 1  # CBB: each process its own n negatives a record
    datasets, batch_sizes, sampler, data_order = finetune_data(args, accelerator, negatives, negative_parts)
    # the schedule in optimizer steps, also checked on resume
    steps_per_epoch = len(sampler) // args.grad_accum
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps * args.grad_accum / len(sampler))
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    schedule = {"total_steps": total_steps, "warmup_steps": warmup_steps, "lr": args.lr, "scaling_lr": args.scaling_lr,
                "lr_scheduler": args.lr_scheduler, **({"ema_decay": args.ema_decay} if args.ema_decay else {})}
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        check_resumable(checkpoint, data_order, accelerator.num_processes, schedule)
    mining = None
    if args.dhnm:  # every mined record must hold exactly the negatives a step uses
        mining = MiningState.for_datasets(datasets, args.retri_negatives * negative_parts, args.meta_list)
    dev_sets = DevSets(args.eval_sts_file, args.eval_dir)  # --eval_sts_file and --eval_dir task folders
    if args.metric_for_best and args.metric_for_best not in dev_sets.metric_names():
        raise UsageError(f"--metric_for_best {args.metric_for_best}: the dev metrics are "
                         f"{', '.join(dev_sets.metric_names())}")

    # ---- model and losses
    model = build_model(args, accelerator)
    if args.padding_free:
        check_padding_free(model, accelerator.device)
    compile_for_training(model, args)  # --torch_compile: in place, before DDP wraps it
    max_lengths = {"query": args.query_max_len, "passage": args.passage_max_len, "pair": args.pair_max_len}
    lengths_in_use = max_lengths_in_use(max_lengths, datasets, dev_sets)
    check_lengths_fit(model.backbone, lengths_in_use,
                      ", or extend the position table with --extend_pe --max_length N")  # not a crash mid-run
    teacher = build_teacher(args, accelerator.device, model.output_dim, datasets, lengths_in_use)  # --teacher_model
    negative_part = (accelerator.process_index if args.cbb else 0, negative_parts)
    # query prefix of a dataset: the model's prompt of that name (--query_prefix_file, train_llm_embed.py's
    # instructions), else --query_prefix; final/ saves them as prompts (the "query" one for encode_query and mteb)
    query_prefix = set_training_prompts(model, args, [(d.name, d.kind) for d in datasets])
    prompts = model.prompts
    collator = TaskCollator(model.tokenizer, max_lengths, negatives, args.seed, query_prefix, negative_part,
                            hash_texts=args.mask_duplicates,  # the text hashes --mask_duplicates compares
                            teacher_tokenizer=teacher and teacher.tokenizer, teacher_prefix=teacher and teacher.query_prefix,
                            distill=bool(args.distill_weight))
    losses, loss_weights = task_losses(args, {d.kind for d in datasets}, model.output_dim)  # every loss flag
    accelerator.print("loss weights (relative to the largest): "
                      + ", ".join(f"{kind} {weight:.3g}" for kind, weight in loss_weights.items()))
    if args.mrl_dims:
        accelerator.print(f"Matryoshka dims: {losses['cosent'].dims}")

    # pairs/s, real tokens/s, model TFLOP/s and MFU of the log window and of the run (train_summary.json)
    speed = SpeedMeter(FlopCounter(model), accelerator.num_processes, peak_tflops(args.peak_tflops, accelerator.device),
                       shared_kinds=("retri_contrast",) if args.cbb else ())  # CBB's shared queries: one batch

    # ---- optimizer and schedule
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.scaling_lr)
    scheduler = make_scheduler(args.lr_scheduler, optimizer, warmup_steps, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    tokenizer = accelerator.unwrap_model(model).tokenizer
    ema = WeightEMA(accelerator, model, args.ema_decay) if args.ema_decay else None  # --ema_decay
    saved_beside = [state for state in (mining, ema) if state is not None]  # safetensors files in every checkpoint
    setup = finetune_setup(args, accelerator, datasets, batch_sizes, sampler, total_steps, warmup_steps, loss_weights)
    accelerator.print("\n".join(startup_lines(setup)))

    # ---- resume: weights, optimizer, data position, and what the run has recorded so far
    global_step, start_epoch, start_batch, state = 0, 0, 0, {}
    dhnm_log, last_mined = {"checks": 0, "checked": 0, "replaced": 0, "seconds": 0.0}, None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, saved_beside)
        global_step, start_epoch, start_batch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        dhnm_log, last_mined = state.get("dhnm", dhnm_log), state.get("last_mined")  # DHNM's next check needs it
        speed.run.update(state.get("speed") or {})
        accelerator.print(f"resumed from {checkpoint} at step {global_step} (epoch {start_epoch}, batch {start_batch})")

    if accelerator.is_main_process:
        write_run_config(args.output_dir, args, [args.meta_list])
    accelerator.init_trackers("finetune", config={k: str(v) for k, v in vars(args).items()})

    def save(epoch, next_batch):  # a checkpoint and everything the run has recorded
        trainer_state = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": next_batch,
                         "data_order": data_order, "schedule": schedule, **dev.state(), "dhnm": dhnm_log,
                         "last_mined": last_mined, "speed": speed.run}
        save_checkpoint(accelerator, args.output_dir, global_step, trainer_state, args.save_total_limit,
                        keep=dev.best.kept(), model=model, states=saved_beside)

    # dev scores of what final/ would hold at each evaluation (the start model first), the best kept
    dev = DevRun(dev_sets, args, prompts, ema, state, accelerator.unwrap_model(model).output_dim)
    if dev and checkpoint is None and dev.evaluate(accelerator, model, tokenizer, max_lengths, 0):
        save(0, 0)  # --keep_best: the start model is the best so far

    # ---- train
    model.train()
    progress = Progress(total_steps, global_step, accelerator.is_local_main_process)
    window = LossWindow(TASK_KINDS, datasets)  # loss/<kind>, and loss/<kind>/<dataset> where a kind has several
    grad_norms = GradNorms(accelerator, args.max_grad_norm)  # clips; grad_norm before clipping, grad_clipped
    done = global_step >= total_steps
    step_clock = Stopwatch()  # the clock runs in training steps only, not in evaluations or saves
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        first = start_batch if epoch == start_epoch else 0
        loader = DataLoader(
            EpochBatches(sampler, datasets, collator, epoch, start=first),
            batch_size=None,
            num_workers=0 if mining else args.num_workers,  # DHNM edits records in this process
            generator=torch.Generator().manual_seed(args.seed + epoch),  # leaves the global RNG stream alone
        )
        for batch_in_epoch, batch in enumerate(loader, start=first):
            parts = batch["parts"] if args.cbb else [batch]  # CBB: one batch of every task kind
            with accelerator.accumulate(model):
                part_losses = [task_loss(model, to_device(part, accelerator.device), losses, args.length_buckets,
                                         teacher, args.split_tokens) for part in parts]
                stop_on_non_finite_loss(accelerator, global_step + 1, part_losses, [
                    f"{part['kind']} loss of {datasets[part['dataset_index']].name} "
                    f"({datasets[part['dataset_index']].source})" for part in parts])
                accelerator.backward(sum(loss_weights[part["kind"]] * loss for part, loss in zip(parts, part_losses)))
                if accelerator.sync_gradients:
                    grad_norms.clip(model.parameters())
                optimizer.step()
                optimizer.zero_grad()
            speed.add_batches(parts)
            for part, loss in zip(parts, part_losses):
                window.add(part, loss)
                if mining is not None and part["dataset_index"] in mining:
                    last_mined = [part["dataset_index"], [int(i) for i in part["indices"]]]
            if not accelerator.sync_gradients:
                continue

            scheduler.step()
            if ema is not None:
                ema.update(global_step)
            global_step += 1
            speed.add_step(step_clock.stop())
            progress.update()
            if global_step % args.log_every == 0 or global_step == total_steps:
                metrics = {**window.metrics(accelerator), **distillation_terms(losses, accelerator),  # L_KD alone
                           "lr": scheduler.get_last_lr()[0], "epoch": epoch, **grad_norms.metrics(),
                           **speed.window_metrics(),  # real tokens, MFU
                           **contrastive_masks(losses)}  # candidates the false-negative masks removed, and the share
                accelerator.log(metrics, step=global_step)
                progress.log(global_step, metrics)
            if mining is not None and last_mined and global_step % args.dhnm_interval == 0:
                counts = dhnm_round(accelerator, model, tokenizer, mining, last_mined, max_lengths,
                                    query_prefix[datasets[last_mined[0]].name], args, dhnm_log)
                accelerator.log(counts, step=global_step)
                accelerator.print(f"step {global_step}: DHNM checked {counts['dhnm/checked']} examples, "
                                  f"replaced {counts['dhnm/replaced']}")
            new_best = dev.due(global_step, total_steps) and dev.evaluate(accelerator, model, tokenizer, max_lengths,
                                                                           global_step)
            if new_best or (args.save_every and global_step % args.save_every == 0):
                save(epoch, batch_in_epoch + 1)
            if global_step >= total_steps:
                done = True
                break
            step_clock.start()
    progress.close()

    # ---- final model and scores
    final_step = dev.final_weights(accelerator, model, tokenizer, max_lengths, global_step, args.final_is_best,
                                   args.output_dir, saved_beside)  # --final_is_best: the best step's checkpoint
    summary = {**setup, "steps": global_step, **speed.run_figures(accelerator.device), **dev.summary(),
               **compile_figures(args),
               **({"dhnm": dhnm_log} if mining is not None else {})}
    finish_run(accelerator, model, args, summary, dev.history, ema, final_step,
               dev.scorer(tokenizer, max_lengths) if dev else None,
               dev.variant_scorer(tokenizer, max_lengths) if dev else None)


if __name__ == "__main__":
    run_cli(main)

"""The model each training script trains, built from its flags before step one: train_finetune.py's encoder,
train_llm_embed.py's decoder with LoRA, train_pretrain.py's encoder. modules/export.py rebuilds a run's model with
the same builder. The heavy imports are inside the builders: the scripts import this module before they parse their
flags, and --help answers at once."""


def build_encoder(args, accelerator):
    """train_finetune.py's model: an encoder (or any EmbeddingModel directory), position table optionally extended."""
    from .model import DTYPES, EmbeddingModel
    from .position import extend_model_positions, freeze_position_embeddings

    attention = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = EmbeddingModel.from_pretrained(args.model_name_or_path, pooling=args.pooling, scaling_dim=args.scaling_dim,
                                           dtype=DTYPES[args.torch_dtype], **attention)
    if args.extend_pe:
        trained = extend_model_positions(model, args.max_length, args.pe_extension, args.pe_alpha)
        accelerator.print(f"position table: {trained} trained positions -> {args.max_length} ({args.pe_extension})")
    elif args.freeze_position_embeddings:
        freeze_position_embeddings(model.backbone)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def build_pretrain_encoder(args):
    """train_pretrain.py's model: the encoder, checked to read --query_max_len and --passage_max_len tokens."""
    from .model import DTYPES, EmbeddingModel
    from .position import check_lengths_fit

    attention = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = EmbeddingModel.from_pretrained(args.model_name_or_path, pooling=args.pooling, dtype=DTYPES[args.torch_dtype],
                                           **attention)
    check_lengths_fit(model.backbone, {"--query_max_len": args.query_max_len, "--passage_max_len": args.passage_max_len})
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def build_llm_model(args, accelerator):
    """train_llm_embed.py's model: the decoder embedding model (LoRA unless --full_finetune), its instruction prompts
    set."""
    from .llm import LLMEmbeddingModel, LLMSetupError, parameter_counts

    if args.rope_scaling is None and (args.rope_factor or args.rope_original_max_positions):
        raise LLMSetupError("--rope_factor / --rope_original_max_positions need --rope_scaling")
    if args.wise_ft_alpha < 1 and not args.full_finetune:
        raise LLMSetupError("--wise_ft_alpha averages full weights with the start model; with LoRA, scale the adapter "
                            "instead (or use --full_finetune)")
    if args.lora_r < 1 or not 0 <= args.lora_dropout < 1:
        raise LLMSetupError(f"--lora_r must be >= 1 and --lora_dropout in [0, 1), got {args.lora_r} and "
                            f"{args.lora_dropout}")
    prompts = llm_prompts(args)
    lora = None
    if not args.full_finetune:
        from peft import LoraConfig

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
                          task_type="FEATURE_EXTRACTION")
    model = LLMEmbeddingModel.from_pretrained(
        args.model_name_or_path, pooling=args.pooling, scaling_dim=args.scaling_dim,
        max_seq_length=max(args.query_max_len, args.passage_max_len, args.pair_max_len), lora=lora,
        rope=(args.rope_scaling, args.rope_factor, args.rope_original_max_positions) if args.rope_scaling else None,
        dtype=args.torch_dtype, attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code,
        gradient_checkpointing=args.gradient_checkpointing)
    model.prompts.update(prompts)
    trainable, total = parameter_counts(model)
    accelerator.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def llm_prompts(args):
    """The query prompts of train_llm_embed.py's run: {"query": default, <dataset>: its instruction} (empty without a
    template)."""
    from .llm import LLMSetupError, instruction_prompts
    from .meta_list import entry_kind, read_meta_list, read_query_prefixes

    if args.instruction_template is None:
        if args.task_instructions or args.default_task:
            raise LLMSetupError("--task_instructions / --default_task need --instruction_template")
        return {}
    if not (args.task_instructions or args.default_task):
        raise LLMSetupError("--instruction_template needs --task_instructions and/or --default_task")
    if args.query_prefix is not None or args.query_prefix_file:
        raise LLMSetupError("give queries --instruction_template (with --task_instructions / --default_task) or "
                            "--query_prefix / --query_prefix_file, not both")
    # datasets by name (the name load_task_dataset gives) and kind: only contrastive queries get instructions
    kinds = {e.name: entry_kind(e) for e in read_meta_list(args.meta_list, args.root_dir)}
    names = [name for name, kind in kinds.items() if kind != "cosent"]
    tasks = read_query_prefixes(args.task_instructions, kinds, "--task_instructions") if args.task_instructions else {}
    if set(tasks) - set(names):
        raise LLMSetupError(f"--task_instructions: {sorted(set(tasks) - set(names))} are cosent datasets, whose "
                            "pairs are embedded without instruction (only contrastive queries get one)")
    if args.default_task:
        tasks = {name: tasks.get(name, args.default_task) for name in names}
    return instruction_prompts(args.instruction_template, tasks, args.default_task)

"""Piccolo2's multi-task hybrid loss on a decoder LLM (Qwen2, Llama, Mistral, ...) with LoRA.

    accelerate launch -q --config_file launch/deepspeed_zero2_llm.yaml train_llm_embed.py \\
        --model_name_or_path Qwen/Qwen2-1.5B --meta_list meta_lists/my_tasks.txt --output_dir runs/llm \\
        --instruction_template 'Instruct: {task}\\nQuery: ' --task_instructions tasks.json \\
        --default_task 'Given a query, retrieve relevant passages' --gradient_checkpointing --lr 1e-4

The loop, data, losses, MRL, checkpoints and resume are train_finetune.py's (its flags work here, but
for the encoders' position-table flags: a rotary decoder takes --rope_scaling); this script adds the decoder: EOS appended by the tokenizer, left padding, last-token pooling,
LoRA through peft (or --full_finetune), per-dataset query instructions saved as sentence-transformers
prompts, RoPE scaling, and a final directory that holds the merged model (sentence-transformers) and
the adapter (adapter/). See modules/llm.py for the method and its sources.
"""


import train_finetune
from modules.cli import run_cli
from modules.flags import DEFAULT_LORA_TARGETS, ROPE_SCALINGS


def add_llm_arguments(parser):
    g = parser.add_argument_group("LLM backbone (train_llm_embed.py)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank (E5-mistral: 16)")
    g.add_argument("--lora_alpha", type=float, default=32, help="LoRA scale is alpha / r")
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default=DEFAULT_LORA_TARGETS,
                   help="comma list of Linear layer names (InternLM2: wqkv,wo,w1,w2,w3)")
    g.add_argument("--full_finetune", action="store_true", help="train every weight instead of a LoRA adapter")
    g.add_argument("--attn_implementation", default=None, help="sdpa | eager | flash_attention_2 (default: sdpa)")
    g.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    g.add_argument("--rope_scaling", choices=ROPE_SCALINGS, default=None,
                   help="RoPE scaling for inputs longer than the model was trained on; saved in config.json")
    g.add_argument("--rope_factor", type=float, default=None, help="with --rope_scaling: context x factor")
    g.add_argument("--rope_original_max_positions", type=int, default=None,
                   help="with --rope_scaling linear|yarn: the trained length (default: max_position_embeddings)")
    g.add_argument("--instruction_template", default=None,
                   help="query prompt with {task}, e.g. 'Instruct: {task}\\nQuery: ' (\\n is a newline); "
                        "documents get none")
    g.add_argument("--task_instructions", default=None, help="JSON {dataset name: task description}")
    g.add_argument("--default_task", default=None,
                   help="task of datasets not in --task_instructions; saved as the 'query' prompt")


def llm_prompts(args):
    """The query prompts of this run: {"query": default, <dataset>: its instruction} (empty without a template)."""
    from modules.data import entry_kind, read_meta_list, read_query_prefixes
    from modules.llm import LLMSetupError, instruction_prompts

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


def build_llm_model(args, accelerator):
    """The decoder embedding model of train_finetune.main, built from this script's flags."""
    from modules.llm import LLMEmbeddingModel, LLMSetupError, parameter_counts

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


def main(argv=None):
    train_finetune.main(argv, add_llm_arguments, build_llm_model, __doc__, decoder=True)


if __name__ == "__main__":
    run_cli(main)

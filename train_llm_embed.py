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
from modules.model_builders import build_llm_model


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


def main(argv=None):
    train_finetune.main(argv, add_llm_arguments, build_llm_model, __doc__, decoder=True)


if __name__ == "__main__":
    run_cli(main)

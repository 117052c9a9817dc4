"""Prompts of a C-MTEB run: the --prompts file, --instruction-template and --query-instruction, merged with the
prompts saved with the model into one set keyed like mteb's."""

from __future__ import annotations

import string
from pathlib import Path

from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from cmteb_errors import SetupError
from modules.json_object import read_json_object

# Task types whose queries get --query-instruction (the BGE / Piccolo convention).
QUERY_INSTRUCTION_TYPES = ("Retrieval", "Reranking")


def read_prompts(path: Path | None) -> dict[str, str]:
    """Read a --prompts file, checking its keys against mteb's task names, task types and prompt types."""
    if path is None:
        return {}
    if not path.is_file():
        raise SetupError(f"--prompts file {path} not found.")
    prompts = read_json_object(path, "--prompts", SetupError)
    not_text = [key for key, value in prompts.items() if not isinstance(value, str)]
    if not_text:
        raise SetupError(f"{path}: --prompts: the prompt of {not_text[0]!r} must be a string, got {prompts[not_text[0]]!r}.")
    try:
        AbsEncoder.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=True)
    except KeyError as error:
        raise SetupError(f"Invalid prompt keys in {path}: {error}") from None
    return prompts


def read_instruction_template(template: str | None) -> str | None:
    """The template with \\n read as a newline, checked to hold `{instruction}` and no other field (mteb fills
    it with `template.format(instruction=...)`; any other field would fail only once the model is loaded)."""
    if template is None:
        return None
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise SetupError(f"--instruction-template {template!r}: {error} (write a literal brace as {{{{ or }}}}).") from None
    unknown = [field for field in fields if field != "instruction"]
    if unknown:
        raise SetupError(f"--instruction-template {template!r}: unknown field {{{unknown[0]}}}; the only field "
                         "allowed is {instruction} (write a literal brace as {{ or }}).")
    if not fields:
        raise SetupError("--instruction-template must contain '{instruction}'.")
    return template.replace("\\n", "\n")


def merge_prompts(
    model_prompts: dict[str, str | None], file_prompts: dict[str, str], query_instruction: str | None
) -> dict[str, str]:
    """Prompts by mteb key: the model's own (non-empty) ones, then --prompts, then --query-instruction."""
    prompts = {key: value for key, value in model_prompts.items() if value}
    prompts.update(file_prompts)
    if query_instruction:
        prompts.update(
            {
                f"{task_type}-{PromptType.query.value}": query_instruction
                for task_type in QUERY_INSTRUCTION_TYPES
            }
        )
    return prompts

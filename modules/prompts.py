"""Prompts: the text a model puts before an input, saved with it as sentence-transformers prompts.

A run trains its contrastive queries with a prefix (``--query_prefix``, ``--query_prefix_file``, train_llm_embed.py's
instructions). ``final/`` saves each under the name that reads it back: ``"query"`` (sentence-transformers'
``encode_query``; mteb's queries of any task without a prompt of its own) and a dataset's name (mteb's prompt of a
task of that name). ``prompt_for`` picks a prompt as mteb does, so a dev set scored during training embeds its texts
exactly as the saved model is embedded when scored.
"""

from .task_kinds import CONTRASTIVE_KINDS  # the kinds whose queries take a prefix (TaskCollator)

QUERY = "query"


def prompt_for(prompts, task_name, task_type, input_type=None):
    """The prompt mteb (``get_prompt_name``) gives an input of a task: the first of '<task>-<input type>', '<task>',
    '<task type>-<input type>', '<task type>', '<input type>' that ``prompts`` holds; "" when none. ``input_type``:
    "query", "document", or None for the symmetric inputs of STS and pair classification."""
    keys = [f"{task_name}-{input_type}" if input_type else None, task_name,
            f"{task_type}-{input_type}" if input_type else None, task_type, input_type]
    return next((prompts[key] for key in keys if key and key in prompts), "")


def training_prompts(model_prompts, query_prefix, file_prefixes, datasets):
    """The query prefix each dataset trains with, and the prompts ``final/`` saves.

    ``model_prompts``: the start model's (train_llm_embed.py's instructions added); ``query_prefix``: --query_prefix
    (None: the start model's "query" prompt, else none); ``file_prefixes``: --query_prefix_file's {dataset: prefix};
    ``datasets``: (name, kind) of the meta list. A contrastive dataset's prefix is its own prompt, else the query
    prefix (other kinds embed no queries). The
    saved "query" prompt is --query_prefix when given, else the one prefix every contrastive dataset shares; with
    different prefixes and no --query_prefix it stays the start model's (each is saved under its dataset's name).
    Returns ({dataset: prefix}, prompts).
    """
    prompts = {**model_prompts, **file_prefixes}
    default = query_prefix if query_prefix is not None else prompts.get(QUERY, "")
    prefixes = {name: prompts.get(name, default) if kind in CONTRASTIVE_KINDS else "" for name, kind in datasets}
    used = {prefixes[name] for name, kind in datasets if kind in CONTRASTIVE_KINDS}
    if query_prefix is not None:
        prompts[QUERY] = query_prefix
    elif len(used) == 1 and QUERY not in model_prompts:
        prompts[QUERY] = used.pop()
    return prefixes, prompts


def set_training_prompts(model, args, datasets):
    """Give ``model`` the prompts final/ saves for a run with these flags and ``datasets`` ((name, kind) pairs); returns
    {dataset: query prefix} (see ``training_prompts``). The training scripts and the checkpoint export both call it."""
    from .meta_list import read_query_prefixes

    names = [name for name, _ in datasets]
    file = getattr(args, "query_prefix_file", None)
    file_prefixes = read_query_prefixes(file, names) if file else {}
    prefixes, model.prompts = training_prompts(model.prompts, args.query_prefix, file_prefixes, datasets)
    return prefixes

"""What a run was given, as a published model card shows it: paths without the directories of the machine that ran
it, and the options its command line set that can change the weights.

A card lists every option a run's command line sets (run_config.json's "command"), valued as parsed, except those in
WEIGHTLESS_FLAGS: an option added to a script later is listed until it is named there.
"""

import os
import shlex
from pathlib import Path

# Options that cannot change the weights final/ holds: where outputs go, what is logged or kept; the dev sets (scored,
# never trained on; the card names the step --final_is_best chose); the same computation faster or in less memory.
WEIGHTLESS_FLAGS = frozenset({
    "output_dir", "overwrite_output_dir", "log_every", "peak_tflops", "report_to", "save_every", "save_total_limit",
    "keep_best", "resume_from_checkpoint", "timeout_minutes",
    "eval_sts_file", "eval_dir", "eval_every",
    "num_workers", "gradient_checkpointing", "length_buckets", "split_tokens", "padding_free", "attn_implementation",
    "mini_batch_size", "mini_batch_tokens", "loss_chunk_size", "trust_remote_code",
})


def shown_path(path, run_dir=None):
    """``path`` as a card shows it: relative to the run's output dir when inside it (the dir itself by its name), as
    given when relative, else by its name alone (an absolute path names directories of one machine)."""
    path = Path(path)
    if run_dir is not None:
        run = Path(run_dir).resolve()
        try:
            inside = path.resolve().relative_to(run)
        except ValueError:
            pass
        else:
            return str(inside) if inside.parts else run.name
    return path.name if path.is_absolute() else os.path.normpath(path)


def shown_command(command, run_dir):
    """A command line with its absolute paths (``--flag=/path`` too) as ``shown_path`` shows them."""
    def shown(token):
        flag, equals, value = token.partition("=")
        if equals and flag.startswith("--"):
            return f"{flag}={shown(value)}"
        return shown_path(token, run_dir) if Path(token).is_absolute() else token

    return shlex.join(shown(str(token)) for token in command)


def given_flags(command, dests):
    """The options (by dest) a command line sets, in its order; argparse's unique-prefix abbreviations resolved."""
    given = {}
    for token in map(str, command[1:]):
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            matches = [name] if name in dests else [dest for dest in dests if dest.startswith(name)]
            if len(matches) == 1:
                given[matches[0]] = True
    return list(given)


def weight_options(command, options):
    """(dest, value) of every option of ``options`` (the parsed arguments) that ``command`` sets and that can change
    the weights."""
    return [(dest, options[dest]) for dest in given_flags(command, options) if dest not in WEIGHTLESS_FLAGS]

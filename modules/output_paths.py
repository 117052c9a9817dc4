"""Where a tool may write: never onto, around or into what it reads.

A tool writes its output whole and then puts it in place, replacing what was there (a directory with --overwrite, a
file always): an output that is an input, or holds one (a run dir holding the checkpoint being exported, a folder
above it), deletes that input; an output inside an input folder changes it. Every tool refuses the three alike, with
one line naming both paths. Paths are compared as given (made absolute: replacing a folder deletes a link in it, the
way to an input) and with links resolved (where the files really are).
"""

import os
from pathlib import Path

from .cli import UsageError


def overlap(output, source):
    """How ``output`` overlaps ``source``: "is", "contains", "lies inside" (the worst under either comparison), or
    None when they are apart."""
    found = {_relation(Path(resolve(output)), Path(resolve(source))) for resolve in (os.path.abspath, os.path.realpath)}
    return next((relation for relation in RELATIONS if relation in found), None)


RELATIONS = ("is", "contains", "lies inside")  # the worst first


def _relation(output, source):
    if output == source:
        return "is"
    if source.is_relative_to(output):
        return "contains"
    return "lies inside" if output.is_relative_to(source) else None


def refuse_output_over_inputs(output, inputs, name=None):
    """A UsageError when ``output`` is, contains or lies inside one of ``inputs``; ``name`` is how the line names
    the output (default: its path; ``--output PATH`` where an option names it)."""
    for source in inputs:
        relation = overlap(output, source)
        if relation:
            raise UsageError(f"{name or output}: the output would overwrite an input: it {relation} {source}")

"""The errors of eval/run_cmteb.py's work: each a UsageError, so that run_cmteb.py reports it in one line (exit 2),
without a traceback."""

from __future__ import annotations

from modules.cli import UsageError


class SetupError(UsageError):
    """A problem with the command line (tasks, types, dimensions, prompts), reported without a traceback."""


class ModelError(UsageError):
    """The model of --model cannot be used: unreadable weight files, non-finite embeddings."""


class NonFiniteScoreError(UsageError):
    """A score came out NaN or infinite; the reports record it as null and leave it out of the averages."""

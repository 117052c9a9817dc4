"""A file that holds one JSON object (a task.json, a --prompts file), read with errors that name the file and line."""

import json
from pathlib import Path

from .cli import DataError


def read_json_object(path, what="", error=DataError):
    """The JSON object in the file ``path``, as a dict. Invalid JSON, text that is not UTF-8 and JSON that is not an
    object raise ``error`` (a DataError unless the caller's own class is named) with the file, and for invalid JSON
    its line and column: "<path>:<line>: <what>: invalid JSON (<reason>, column <n>)". ``what`` (e.g. "--prompts")
    names the file's role in the message; empty, the message says only what is wrong."""
    path = Path(path)
    role = f"{what}: " if what else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as problem:
        raise error(f"{path}:{problem.lineno}: {role}invalid JSON ({problem.msg}, column {problem.colno})") from None
    except UnicodeDecodeError as problem:
        raise error(f"{path}: {role}not UTF-8 text ({problem.reason} at byte {problem.start})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {role}expected a JSON object, got {type(value).__name__}")
    return value

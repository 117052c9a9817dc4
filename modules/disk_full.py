"""A write that found the disk full, told in one line naming the file: what ``run_cli`` prints instead of a traceback.

A full disk seldom says so plainly: a ``write()`` (not an ``open()``) raises an OSError without a file name,
safetensors and tokenizers report "(os error 28)" in their own error, and torch's zip writer says only that its write
failed. Each form is recognised here, and the file is found on the traceback where the error does not name it.
"""

import errno
import io
import os
import re

DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# what the native writers raise instead of an OSError: safetensors names the errno ("... (os error 28)"); torch's zip
# writer (torch.save: optimizer, scheduler, random states) says only that its write failed, in one of three ways
NATIVE_ERRNO = re.compile(rf"\(os error ({errno.ENOSPC}|{errno.EDQUOT})\)")
TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed writing file|unexpected pos \d+|basic_ios::clear")
NEARLY_FULL = 1 << 20  # bytes free after a failed torch write that make it a full disk (it wrote up to the last block)


def disk_full_message(error):
    """``<path>: no space left on device; ...`` when ``error`` (or an error it was raised from) is a write into a full
    disk or over a quota, else None. Nothing is lost (checkpoints and final/ are renamed into place only once whole),
    so the line says to free space and run again. The path is the error's file name, or else the file the writer on
    the traceback was writing: a write() (not an open()) into a full disk raises an OSError without one."""
    for cause in _chain(error):
        code, path = _disk_full_errno(cause)
        if code:
            path = getattr(cause, "filename", None) or path or _path_being_written(cause.__traceback__)
            return (f"{f'{path}: ' if path else ''}{DISK_FULL[code]}; free some space and run again (a training run "
                    "resumes from its last complete checkpoint with --resume_from_checkpoint latest)")
    return None


def _chain(error):
    """``error`` and the errors it was raised from or during, innermost last."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _disk_full_errno(error):
    """(ENOSPC or EDQUOT, the path if already found) when ``error`` says the disk was full, else (None, None)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return error.errno, None
    native = NATIVE_ERRNO.search(str(error))
    if native:
        return int(native.group(1)), None
    if isinstance(error, RuntimeError) and TORCH_WRITE_FAILED.search(str(error)):
        path = _path_being_written(error.__traceback__)
        if path and _free_bytes(path) < NEARLY_FULL:  # torch gives no reason: a full disk only if it has no room
            return errno.ENOSPC, path
    return None, None


def _path_being_written(traceback, depth=3):
    """The file being written where ``traceback`` ends. Only the innermost ``depth`` frames are the writer's (outer
    ones hold other paths: the input being read, "file:line"); the innermost frame's first local that is a file's
    path (``Path.write_text``'s self, ``save_file``'s filename, ``save_pretrained``'s tokenizer_file, not its
    save_directory), an open file (``json.dump``'s fp), or an object naming one (torch's writer) or holding one (a
    writer's handle) names it."""
    frames = []
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames[-depth:]):
        for value in frame.f_locals.values():
            path = next(filter(None, map(_file_path, _named_paths(value))), None)
            if path:
                return path
    return None


def _named_paths(value):
    """What ``value`` may be or name: itself, its ``name`` (an open file, torch's writer), the names of the open files
    it holds."""
    yield value
    yield _attribute(value, "name")
    for attribute in list((_attribute(value, "__dict__") or {}).values()):
        if isinstance(attribute, io.IOBase):
            yield _attribute(attribute, "name")


def _attribute(value, name):
    """``value.name``, or None where it has none or it fails (a property of any object on the traceback may)."""
    try:
        return getattr(value, name, None)
    except Exception:  # noqa: BLE001
        return None


def _file_path(value):
    """``value`` if it is the path of a file (not a folder) in an existing folder, else None."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not (isinstance(path, str) and os.sep in path and len(path) < 4096):
        return None
    return path if os.path.isdir(os.path.dirname(path) or ".") and not os.path.isdir(path) else None


def _free_bytes(path):
    try:
        stats = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return NEARLY_FULL
    return stats.f_bavail * stats.f_frsize

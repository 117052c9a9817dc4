"""Content hashes of files and folders, under which results are filed (eval/run_cmteb.py) or kept (eval/dev_scores.py):
the same content gives the same hash on any machine and path."""

import hashlib
from pathlib import Path


def folder_files(root, keep=lambda path: True):
    """The files under ``root`` (sub-folders included, none whose relative path has a part starting with '.') that
    ``keep(path)`` accepts, in path order."""
    root = Path(root)
    return sorted(path for path in root.rglob("*") if path.is_file() and keep(path)
                  and not any(part.startswith(".") for part in path.relative_to(root).parts))


def files_digest(root, files, digest=None):
    """sha256 (``digest``, updated in place when given) over ``files``, each as its path relative to ``root`` and its
    bytes; the hash object."""
    digest = digest or hashlib.sha256()
    for path in files:
        digest.update(Path(path).relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return digest

"""One run at a time in an --output_dir: the run's main process holds ``<output_dir>/.run.lock`` (an ``flock``) for
the life of the run, so a second run started on the same directory is refused, naming the holder, instead of
writing its checkpoints and final/ over the first run's.

The kernel drops an ``flock`` when its holder ends, however it ends (a killed run leaves nothing held); the file
stays, holding the last holder's pid, host, start time and command for the refusal's message. It is not run
content: --output_dir counts as empty with it, and --overwrite_output_dir keeps it (deleting the file a lock
is held on would let a third run lock a new file of the same name).

Filesystems without working locks: on NFS without a lock daemon (``nolock``, or lockd unreachable) or a
filesystem that has no ``flock``, locking fails; the run then says so in one warning line and goes on unlocked
(a researcher on such a filesystem can still train; only the check of a second run is lost). Where locks are
local to one machine (NFS mounted ``nolock``, Lustre ``localflock``), runs on different machines are not told
apart and no warning can say so: there, give every run its own --output_dir.
"""

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
import weakref
from pathlib import Path

from .cli import UsageError

LOCK_NAME = ".run.lock"
BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # another holder; any other error: no working locks here

_held = weakref.WeakValueDictionary()  # real path of an output dir -> this process's RunLock on it


class RunLock:
    """This process's hold on an output dir: released by ``release()``, when the object is collected (the local of
    a run's ``main`` when it returns) or when the process ends. ``held`` is False where the filesystem cannot
    lock (the run goes on unlocked)."""

    def __init__(self, path, handle, held):
        self.path, self._handle, self.held = path, handle, held

    @property
    def released(self):
        return self._handle.closed

    def release(self):
        if not self.released:
            self._handle.close()  # closing the only descriptor drops the flock

    def __del__(self):
        self.release()


def run_contents(output_dir):
    """The entries of ``output_dir`` (an existing directory) that belong to a run: all but the lock file."""
    return sorted(path for path in Path(output_dir).iterdir() if path.name != LOCK_NAME)


def main_process():
    """Whether this process is its run's main one: rank 0 under a launcher (RANK, else LOCAL_RANK), or a process
    started alone. The other processes of a run parse the same flags and must not lock against their own run."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def lock_output_dir(output_dir):
    """Hold ``output_dir``'s lock for this process (the directory is created if new); returns the RunLock.

    Raises UsageError naming the holder when another process holds it. Within one process the lock is
    re-entrant: a second run in the same process (tests, a notebook) while an earlier one's lock is still
    referenced gets that same lock.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(output_dir)
        lock = _held.get(key)
        if lock is not None and not lock.released:
            return lock
        handle = open(output_dir / LOCK_NAME, "a+")  # neither truncated nor replaced: a holder may be writing it
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot create its lock file ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in BUSY:
            handle.close()
            raise UsageError(f"--output_dir {output_dir} is in use by another run ({holder(output_dir)}): wait for "
                             "it to end or choose another directory") from None
        print(f"warning: --output_dir {output_dir}: the filesystem cannot lock {LOCK_NAME} ({error.strerror}); "
              "a second run started on this directory will not be refused", file=sys.stderr, flush=True)
        lock = RunLock(output_dir / LOCK_NAME, handle, held=False)
    else:
        record_holder(handle)
        lock = RunLock(output_dir / LOCK_NAME, handle, held=True)
    _held[key] = lock
    return lock


def record_holder(handle):
    """Write this process's pid, host, start time and command into the lock file it holds."""
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
               "command": shlex.join(sys.argv)}, handle)
    handle.flush()


def holder(output_dir, longest_command=200):
    """The holder of ``output_dir``'s lock as the refusal names it: pid, host, start time and command."""
    try:
        found = json.loads((Path(output_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):  # the holder is between taking the lock and writing its details
        return "its details are not written yet"
    command = found.get("command", "")
    if len(command) > longest_command:
        command = command[:longest_command - 3] + "..."
    return f"pid {found.get('pid')} on host {found.get('host')}, started {found.get('started')}: {command}"

"""Command-line entry: bad input ends a script with one line naming the file, line or option, and exit status 2; so
does a full disk, naming the file being written.

Imports nothing heavy: scripts parse their flags before importing torch, so ``--help`` and flag errors
answer at once.
"""

import argparse
import copy
import sys
from pathlib import Path

from .disk_full import disk_full_message


class UsageError(ValueError):
    """Bad input (a flag, a flag combination, a file, a checkpoint); the message names it."""


class DataError(UsageError):
    """Bad input data or meta list; the message names the file and line."""


def run_cli(main):
    """Run a script's ``main()``; a UsageError, or a write that found the disk full (``disk_full_message``), prints
    ``<script>: error: <message>`` and exits 2, no traceback, in whichever process met it."""
    try:
        main()
    except UsageError as error:
        fail(str(error))
    except Exception as error:
        message = disk_full_message(error)
        if message is None:
            raise
        fail(message)


def fail(message):
    """End the script as argparse ends it on a bad flag: one line on stderr (and to the launcher), exit status 2."""
    line = f"{Path(sys.argv[0]).name}: error: {message}"
    print(line, file=sys.stderr, flush=True)
    report_to_launcher(line)
    sys.exit(2)


def report_to_launcher(line):
    """Under ``accelerate launch --multi_gpu`` (torch elastic), hand the error line to the launcher through the
    worker's error file: its failure report then shows the line as the root cause instead of "To enable
    traceback see ...", as the report's last line (``accelerate launch -q`` prints nothing else)."""
    import json
    import os
    import time

    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        with open(error_file, "w") as handle:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, handle)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default after its help (unless the help gives it)."""

    def _format_action(self, action):
        help = action.help or ""
        if not ("default" in help or action.required or action.default is argparse.SUPPRESS
                or not action.option_strings):
            action = copy.copy(action)
            shown = "none" if action.default is None else "%(default)r" if isinstance(action.default, str) \
                else "%(default)s"
            action.help = f"{help} (default: {shown})".lstrip()
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in ``--help``, and a flag error as one line (``<prog>: error: ...``), exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

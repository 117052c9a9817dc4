"""Command-line entry: bad input ends a script with one line naming the file, line or option, and exit status 2."""

import sys
from pathlib import Path


class UsageError(ValueError):
    """Bad input (a flag, a flag combination, a file, a checkpoint); the message names it."""


def run_cli(main):
    """Run a script's ``main()``; a UsageError prints ``<script>: error: <message>`` and exits 2, no traceback."""
    try:
        main()
    except UsageError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)

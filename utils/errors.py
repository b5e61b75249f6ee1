"""One kind of user-facing error and the wrapper that turns it into one line and exit code 2.

Anything the user can get wrong (a data folder, a CSV, a flag, a checkpoint) raises `InputError`
with a message that names the file and the problem. Scripts run their `main` through `run_cli`,
which prints `error: <message>` on stderr and exits with status 2 instead of a traceback.
"""
import sys


class InputError(Exception):
    """Bad user input. The message is one line: '<file or flag>: <what is wrong>'."""


def run_cli(main, argv=None):
    """Call `main(argv)`; an `InputError` becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

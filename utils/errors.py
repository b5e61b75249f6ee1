"""The errors a user sees as one line instead of a traceback, and the wrapper that prints them.

Anything the user can get wrong (a data folder, a CSV, a flag, a checkpoint) raises `InputError`
with a message that names the file and the problem (exit status 2). A training run whose loss
becomes NaN or infinite raises `TrainingDiverged` (exit status 1). Scripts run their `main`
through `run_cli`, which prints `error: <message>` on stderr and exits with that status.
"""
import sys


class InputError(Exception):
    """Bad user input. The message is one line: '<file or flag>: <what is wrong>'."""


class TrainingDiverged(Exception):
    """A training loss became NaN or infinite; the message says which and where the last good
    checkpoint is."""


def run_cli(main, argv=None):
    """Call `main(argv)`; an `InputError` becomes one line on stderr and exit code 2, a
    `TrainingDiverged` one line and exit code 1."""
    try:
        return main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)

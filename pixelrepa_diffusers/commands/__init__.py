"""The command-line tools installed as console scripts: pixelrepa-convert, pixelrepa-generate, pixelrepa-evaluate,
pixelrepa-push and pixelrepa-search-solver. The scripts in the repository's pipelines/ folder are thin entries to them."""

import argparse
import sys

from diffusers.utils import logging as diffusers_logging


class OneLineArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_command(command, errors: tuple = (ValueError, TypeError, OSError), prog: str | None = None) -> int:
    """The exit status of `command()`: 0, or 1 after one of `errors`, reported on stderr as the one line
    `[prog: ]error: <message>`. diffusers' bar for loading pipeline components is off, so that a failure after
    loading is still that one line."""
    diffusers_logging.disable_progress_bar()
    try:
        command()
    except errors as error:
        print(f"{prog + ': ' if prog else ''}error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0

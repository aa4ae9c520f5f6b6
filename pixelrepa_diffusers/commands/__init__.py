"""The command-line tools installed as console scripts: pixelrepa-convert, pixelrepa-generate, pixelrepa-evaluate and
pixelrepa-push. The scripts in the repository's pipelines/ folder are thin entries to them."""

import argparse


class OneLineArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as one line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

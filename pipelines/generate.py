"""Samples images of given classes from a PixelREPAPipeline and writes them as PNGs (and a grid).

The `pixelrepa-generate` command of an installed package; its code is pixelrepa_diffusers/commands/generate.py.
"""

import sys

from pixelrepa_diffusers.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())

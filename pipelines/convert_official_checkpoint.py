"""Converts an official PixelREPA or JiT checkpoint into a PixelREPAPipeline directory or a training checkpoint.

The `pixelrepa-convert` command of an installed package; its code is pixelrepa_diffusers/commands/convert_official_checkpoint.py.
"""

import sys

from pixelrepa_diffusers.commands.convert_official_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

"""Uploads a saved PixelREPAPipeline folder and its model card to the Hugging Face Hub.

The `pixelrepa-push` command of an installed package; its code is pixelrepa_diffusers/commands/push_to_hub.py.
"""

import sys

from pixelrepa_diffusers.commands.push_to_hub import main

if __name__ == "__main__":
    sys.exit(main())

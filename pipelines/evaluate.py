"""FID-50K and Inception Score of a PixelREPA / JiT pipeline, and on request precision, recall, sFID, KID and FD-DINOv2.

The `pixelrepa-evaluate` command of an installed package (`accelerate launch -m pixelrepa_diffusers.commands.evaluate`
there); its code is pixelrepa_diffusers/commands/evaluate.py.
"""

import sys

from pixelrepa_diffusers.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

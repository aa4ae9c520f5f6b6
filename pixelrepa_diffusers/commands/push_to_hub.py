"""Upload a saved PixelREPAPipeline folder and its model card to the Hugging Face Hub.

Only the card, json configs, safetensors weights and the remote-code modules are uploaded; checkpoints and other
files in the folder are left out. Example:

    python pipelines/push_to_hub.py --pipeline_dir pixelrepa-b-16 --hub_model_id me/PixelREPA-B-16 \
        --card_variant PixelREPA-B/16
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from pixelrepa_diffusers import PixelREPAPipeline
from pixelrepa_diffusers.hub import (
    VARIANT_KEYS, push_pipeline_to_hub, render_model_card, sample_grid_markdown, variant_card_settings,
    write_sample_grid,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline_dir", required=True, help="folder written by PixelREPAPipeline.save_pretrained")
    parser.add_argument("--hub_model_id", required=True, help="target repo, e.g. <user>/PixelREPA-B-16")
    parser.add_argument("--private", action="store_true", help="create the repo as private (default: public)")
    parser.add_argument("--token", default=None, help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument(
        "--card_variant",
        default=None,
        choices=sorted(VARIANT_KEYS),
        help="upload the card of this official variant, with the paper's figures (default: the folder's README.md)",
    )
    parser.add_argument("--sample_grid", type=int, nargs="*", default=None, metavar="CLASS",
                        help="render a grid of these classes (default when given bare: the first 4), 2 seeds each, "
                             "with the pipeline's own sampler into the folder's samples.png and show it in the card. "
                             "8 images of 50 Heun steps by default: seconds on a GPU, about 2 hours for H/16 on a "
                             "2-core CPU")
    parser.add_argument("--commit_message", default="Upload pipeline with pixelrepa-diffusers")
    return parser.parse_args(argv)


def push(args) -> None:
    grid = None
    if args.sample_grid is not None:
        pipeline = PixelREPAPipeline.from_pretrained(args.pipeline_dir)
        grid = write_sample_grid(pipeline, args.pipeline_dir, args.sample_grid, seeds=[0, 1])
    card = None
    if args.card_variant is not None:
        card = render_model_card(variant_card_settings(args.card_variant, args.hub_model_id), sample_grid=grid)
    elif grid is not None:
        card = ModelCard.load(Path(args.pipeline_dir) / "README.md")
        if "## Sampling settings" not in card.text:
            raise ValueError(f"{args.pipeline_dir}/README.md has no '## Sampling settings' section to show the grid "
                             "before; pass --card_variant or use a card written by this package.")
        card.text = card.text.replace("## Sampling settings", sample_grid_markdown(grid) + "## Sampling settings", 1)
    url = push_pipeline_to_hub(
        args.pipeline_dir,
        args.hub_model_id,
        card=card,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(url)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: push(args), errors=(ValueError, ConnectionError, HfHubHTTPError), prog="push_to_hub")


if __name__ == "__main__":
    sys.exit(main())

"""Converts an official PixelREPA or JiT checkpoint (checkpoint-last.pth, either save format) into a PixelREPAPipeline
directory, or, with --for_training, into a training checkpoint that continues the official run."""

import sys

from pixelrepa_diffusers.conversion import (
    WEIGHT_ENTRIES,
    convert_official_checkpoint,
    convert_official_training_checkpoint,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint_path", required=True, help="Official checkpoint-last.pth.")
    parser.add_argument("--output_dir", required=True, help="Where to write the pipeline (safetensors).")
    parser.add_argument("--weights", default="ema1", choices=sorted(WEIGHT_ENTRIES),
                        help="Which weights to export: EMA 0.9999, EMA 0.9996 or the raw weights; the papers sample "
                             "with ema1.")
    parser.add_argument("--for_training", action="store_true",
                        help="Write a training checkpoint instead of a pipeline: the raw weights, both EMAs, the "
                             "adapter and the AdamW state, for train_pixelrepa.py --resume_from_checkpoint.")
    parser.add_argument("--model", default=None,
                        help="JiT preset name (e.g. JiT-B/16, JiT-H/32); default: read from the checkpoint's args.")
    parser.add_argument("--in_context_start", type=int, default=None,
                        help="Needed only for a custom model that matches no preset.")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Default CFG scale stored in the pipeline; default: the published one of the variant.")
    return parser.parse_args(argv)


def convert(args) -> None:
    if args.for_training:
        convert_official_training_checkpoint(args.checkpoint_path, args.output_dir, model=args.model,
                                             in_context_start=args.in_context_start)
    else:
        convert_official_checkpoint(args.checkpoint_path, args.output_dir, weights=args.weights, model=args.model,
                                    in_context_start=args.in_context_start, guidance_scale=args.guidance_scale)
    print(f"Wrote a {'training checkpoint' if args.for_training else 'PixelREPAPipeline'} to {args.output_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: convert(args), errors=(ValueError, TypeError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())

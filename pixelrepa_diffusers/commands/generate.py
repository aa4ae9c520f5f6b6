"""Samples images of given classes from a PixelREPAPipeline and writes them as PNGs (and a grid)."""

import argparse
import math
import os
import sys

import PIL.Image
import torch
from diffusers.utils import make_image_grid

from pixelrepa_diffusers import PRECISIONS, JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.pipeline_pixelrepa import check_precision
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--class_labels", nargs="+", required=True, help="class ids or names, one image each")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, help="default: the pipeline's")
    parser.add_argument("--solver", choices=JiTFlowMatchScheduler.SOLVERS, default=None,
                        help="ODE solver; default: the pipeline's (converted pipelines: heun, the papers')")
    parser.add_argument("--time_grid", choices=JiTFlowMatchScheduler.TIME_GRIDS, default=None,
                        help="time grid; default: the pipeline's (uniform). The fast option of BENCHMARKS.md: "
                             "--solver multistep2 --time_grid guidance --num_inference_steps 25")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="transformer dtype (ODE stays fp32)")
    parser.add_argument("--precision", default="model",
                        help=f"numerical regime, one of {', '.join(PRECISIONS)}: model runs the --dtype weights as "
                             "they are; official is the papers' (fp32 weights under bf16 autocast, fp32 attention "
                             "logits); bf16_sdpa is bf16 autocast with SDPA attention in bf16. The last two need "
                             "--dtype fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (diffusers' compile_repeated_blocks, static shapes)")
    parser.add_argument("--output_dir", default="samples")
    return parser.parse_args(argv)


def generate(args) -> None:
    check_precision(args.precision, DTYPES[args.dtype])
    pipe = PixelREPAPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=DTYPES[args.dtype])
    pipe.to(args.device)
    if args.compile:
        pipe.transformer.compile_repeated_blocks(dynamic=False, fullgraph=True)
    overrides = {name: getattr(args, name) for name in ("solver", "time_grid") if getattr(args, name) is not None}
    if overrides:
        pipe.scheduler = JiTFlowMatchScheduler.from_config(pipe.scheduler.config, **overrides)
    labels = [int(label) if label.isdigit() else label for label in args.class_labels]
    images = pipe(
        labels,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        precision=args.precision,
    ).images
    os.makedirs(args.output_dir, exist_ok=True)
    for index, (label, image) in enumerate(zip(args.class_labels, images)):
        image.save(os.path.join(args.output_dir, f"{index:04d}-{label.replace(' ', '_')}.png"))
    columns = math.ceil(math.sqrt(len(images)))
    blank = PIL.Image.new("RGB", images[0].size, "white")
    padded = images + [blank] * (columns * math.ceil(len(images) / columns) - len(images))
    make_image_grid(padded, rows=len(padded) // columns, cols=columns).save(os.path.join(args.output_dir, "grid.png"))
    print(f"Wrote {len(images)} images and grid.png to {args.output_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())

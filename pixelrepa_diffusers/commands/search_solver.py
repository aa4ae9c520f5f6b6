"""Searches a solver for one pipeline, step count and guidance, and writes the pipeline with it as its scheduler.

`PixelREPAPipeline.from_pretrained(OUT)(class_labels, num_inference_steps=N)` then samples with the searched solver.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from pixelrepa_diffusers import PixelREPAPipeline
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command
from pixelrepa_diffusers.scheduling_jit_flow_match import check_guidance_interval
from pixelrepa_diffusers.solver_search import search_solver


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A pipeline folder or Hub id.")
    parser.add_argument("--output_dir", required=True,
                        help="Where the pipeline with the searched solver goes; must not exist. Written only when "
                             "the search has finished.")
    parser.add_argument("--num_inference_steps", type=int, default=10,
                        help="The evaluation budget: the searched solver's steps, one model evaluation each.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, help="Default: the pipeline's.")
    parser.add_argument("--num_samples", type=int, default=256, help="Noise draws the search fits.")
    parser.add_argument("--class_labels", nargs="+", default=None,
                        help="Class ids or names the draws' classes are drawn from. Default: all classes.")
    parser.add_argument("--teacher_steps", type=int, default=100,
                        help="Steps of the official Heun sampler whose samples the search approaches.")
    parser.add_argument("--search_steps", type=int, default=300, help="Adam steps.")
    parser.add_argument("--batch_size", type=int, default=32, help="Draws per Adam step (and per teacher batch).")
    parser.add_argument("--learning_rate", type=float, default=0.01, help="Adam's, decayed to 0 on a cosine.")
    parser.add_argument("--seed", type=int, default=1,
                        help="Seed of the draws and their classes (benchmark_solvers.py measures on seed 0: held out).")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute each block in the backward pass: the memory of the search's backward through "
                             "all evaluations drops to the blocks' inputs, for about a third more time.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", default=None,
                        help="Also write the search's figures here: distances before and after, seconds, settings.")
    return parser.parse_args(argv)


def search(args) -> None:
    for name in ("num_samples", "teacher_steps", "search_steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if os.path.exists(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} exists; name a new folder.")
    pipe = PixelREPAPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch.float32).to(args.device)
    guidance_scale = pipe.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
    guidance_interval = tuple(pipe.config.guidance_interval if args.guidance_interval is None
                              else args.guidance_interval)
    check_guidance_interval(guidance_interval)
    num_classes = pipe.transformer.config.num_classes
    if args.class_labels is None:
        choices = torch.arange(num_classes)
    else:
        choices = torch.tensor(pipe.class_label_ids([int(label) if label.isdigit() else label
                                                     for label in args.class_labels]))
    generator = torch.Generator().manual_seed(args.seed)
    class_labels = choices[torch.randint(len(choices), (args.num_samples,), generator=generator)]
    pipe.set_progress_bar_config(disable=True)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    start = time.perf_counter()
    scheduler, before, after = search_solver(
        pipe, args.num_inference_steps, guidance_scale, guidance_interval, class_labels, generator,
        args.teacher_steps, args.search_steps, args.batch_size, args.learning_rate)
    seconds = time.perf_counter() - start
    pipe.scheduler = scheduler
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".search-solver-", dir=parent)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        os.rename(staging, args.output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.output_json is not None:
        figures = dict(rms_before=before, rms_after=after, seconds=seconds, device=str(pipe.device),
                       guidance_scale=guidance_scale, guidance_interval=list(guidance_interval), **{
                           name: getattr(args, name) for name in ("pretrained_model_name_or_path", "output_dir",
                           "num_inference_steps", "num_samples", "teacher_steps", "search_steps", "batch_size",
                           "learning_rate", "seed")})
        with open(args.output_json, "w") as file:
            json.dump(figures, file, indent=2)
    print(f"RMS distance to Heun-{args.teacher_steps} on the {args.num_samples} search draws: {before:.5f} "
          f"(multistep2, guidance grid) -> {after:.5f} (searched), {args.num_inference_steps} evaluations. "
          f"Wrote {args.output_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: search(args), prog="pixelrepa-search-solver")


if __name__ == "__main__":
    sys.exit(main())

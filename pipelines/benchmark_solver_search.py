"""The cost and reach of pixelrepa-search-solver on one model: a searched solver per evaluation budget, the held-out
error against the number of search samples, and the held-out error at guidance scales other than the searched one.

Every search is timed as the CLI runs it (`search_solver.search`). Held-out errors are measured as
benchmark_solvers.py measures them: the RMS difference (on the [0, 1] image scale) to a converged reference (the
official Heun, uniform grid, --reference_steps steps) on noise of --seed, which the searches (seed 1) never saw. The
searched folders go to OUTPUT_DIR/steps-N, for `benchmark_solvers.py --searched_solvers` to put on the frontier.

    python -m pipelines.benchmark_solver_search --pretrained_model_name_or_path quickstart_output/model \
        --classes 0 1 2 3 4 5 6 7 8 9 --images_per_class 2 --output_dir search_digits
"""

import argparse
import json
import os
import sys
import time

import torch

from pipelines.benchmark_solvers import rms_error, sample, shared_noise
from pixelrepa_diffusers import JiTFlowMatchScheduler
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command
from pixelrepa_diffusers.commands.search_solver import parse_args as parse_search_args, search


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A pipeline folder.")
    parser.add_argument("--output_dir", required=True, help="Searched folders and results.json go here.")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="Held-out classes to sample.")
    parser.add_argument("--images_per_class", type=int, default=2, help="Held-out samples of each class.")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16], help="Budgets to search.")
    parser.add_argument("--num_samples", type=int, default=128, help="Search samples of each budget's search.")
    parser.add_argument("--sample_counts", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                        help="Search sample counts of the sweep, at --sweep_steps.")
    parser.add_argument("--sweep_steps", type=int, default=10, help="The budget of the sample-count sweep.")
    parser.add_argument("--other_scales", type=float, nargs="+", default=[1.5, 2.5, 3.0],
                        help="Guidance scales at which the --sweep_steps solver is measured besides its own.")
    parser.add_argument("--teacher_steps", type=int, default=100, help="Heun steps of the search's teacher.")
    parser.add_argument("--search_steps", type=int, default=300, help="Adam steps of each search.")
    parser.add_argument("--batch_size", type=int, default=32, help="Draws per Adam step.")
    parser.add_argument("--reference_steps", type=int, default=500, help="Heun steps of the converged reference.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the held-out noise.")
    return parser.parse_args(argv)


def benchmark(args) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    pipeline, labels, noise = shared_noise(args.pretrained_model_name_or_path, args.classes, args.images_per_class,
                                           args.seed)
    scale, interval = pipeline.config.guidance_scale, tuple(pipeline.config.guidance_interval)
    heun = JiTFlowMatchScheduler.from_config(pipeline.scheduler.config, solver="heun", time_grid="uniform")
    references = {}

    def held_out_error(scheduler, steps, guidance_scale, accept_other_guidance=False) -> float:
        if guidance_scale not in references:
            references[guidance_scale] = sample(pipeline, labels, noise, heun, args.reference_steps, guidance_scale,
                                                interval)[0]
        pipeline.scheduler = scheduler
        images = pipeline(labels, num_inference_steps=steps, guidance_scale=guidance_scale, guidance_interval=interval,
                          latents=noise, output_type="np", accept_other_guidance=accept_other_guidance).images
        return rms_error(images, references[guidance_scale])

    def timed_search(steps, num_samples, folder):
        search_args = parse_search_args([
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--output_dir", folder,
            "--num_inference_steps", str(steps), "--num_samples", str(num_samples), "--teacher_steps",
            str(args.teacher_steps), "--search_steps", str(args.search_steps), "--batch_size", str(args.batch_size),
            "--seed", "1", "--device", "cpu"])
        start = time.perf_counter()
        search(search_args)
        seconds = time.perf_counter() - start
        searched = JiTFlowMatchScheduler.from_pretrained(folder, subfolder="scheduler")
        return searched, seconds

    multistep = JiTFlowMatchScheduler.from_config(pipeline.scheduler.config, solver="multistep2", time_grid="guidance")
    budgets = []
    for steps in args.steps:
        searched, seconds = timed_search(steps, args.num_samples, os.path.join(args.output_dir, f"steps-{steps}"))
        budgets.append(dict(steps=steps, search_seconds=seconds, error=held_out_error(searched, steps, scale),
                            multistep2_error=held_out_error(multistep, steps, scale)))
        print(json.dumps(budgets[-1]))
    sweep = []
    for count in args.sample_counts:
        done = [budget for budget in budgets if (budget["steps"], args.num_samples) == (args.sweep_steps, count)]
        if done:  # the budget search above
            sweep.append(dict(num_samples=count, search_seconds=done[0]["search_seconds"], error=done[0]["error"]))
        else:
            folder = os.path.join(args.output_dir, f"steps-{args.sweep_steps}-samples-{count}")
            searched, seconds = timed_search(args.sweep_steps, count, folder)
            sweep.append(dict(num_samples=count, search_seconds=seconds,
                              error=held_out_error(searched, args.sweep_steps, scale)))
        print(json.dumps(sweep[-1]))
    searched = JiTFlowMatchScheduler.from_pretrained(os.path.join(args.output_dir, f"steps-{args.sweep_steps}"),
                                                     subfolder="scheduler")
    scales = []
    for other in [scale, *args.other_scales]:
        scales.append(dict(guidance_scale=other,
                           searched_error=held_out_error(searched, args.sweep_steps, other, accept_other_guidance=True),
                           multistep2_error=held_out_error(multistep, args.sweep_steps, other),
                           heun_50_error=held_out_error(heun, 50, other)))
        print(json.dumps(scales[-1]))
    results = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, guidance_scale=scale,
                   guidance_interval=list(interval), held_out=dict(classes=args.classes, seed=args.seed,
                   images_per_class=args.images_per_class, reference_steps=args.reference_steps),
                   search=dict(num_samples=args.num_samples, teacher_steps=args.teacher_steps,
                               search_steps=args.search_steps, batch_size=args.batch_size, seed=1,
                               threads=torch.get_num_threads()),
                   budgets=budgets, sample_counts=sweep, guidance_scales=scales)
    with open(os.path.join(args.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    print(f"Wrote {args.output_dir}/results.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: benchmark(args), prog="benchmark_solver_search.py")


if __name__ == "__main__":
    sys.exit(main())

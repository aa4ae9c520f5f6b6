"""diffusers' step caches on the solvers' frontier: error against wall time for each sampler, uncached and with each
cache that fits JiTTransformer2DModel (MagCache, TaylorSeer, PyramidAttentionBroadcast, FasterCache's attention reuse).

The error is benchmark_solvers.py's: the RMS difference (on the [0, 1] image scale) to a converged reference (official
Heun, uniform grid, --reference_steps steps) from the same noise. Samplers: the official Heun on the uniform grid,
`multistep2` on the guidance grid, and each --searched_solvers folder at its own step count. Writes a JSON and a
log-log plot of error against seconds.

    python -m pipelines.benchmark_caches --pretrained_model_name_or_path quickstart_output/model \
        --classes 0 1 2 3 4 5 6 7 8 9 --images_per_class 2 --searched_solvers search_digits/steps-10
"""

import argparse
import ast
import contextlib
import io
import json
import sys
import time

import torch
from diffusers.hooks import FasterCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

from pipelines.benchmark_solvers import rms_error, save_log_log_plot, shared_noise
from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command
from pixelrepa_diffusers.scheduling_jit_flow_match import in_guidance_interval

CACHES = ("none", "magcache", "taylorseer", "pab", "fastercache")


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A pipeline folder or Hub id.")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="Class ids to sample.")
    parser.add_argument("--images_per_class", type=int, default=2, help="Samples of each class.")
    parser.add_argument("--heun_steps", type=int, nargs="+", default=[25, 50], help="Official Heun step counts.")
    parser.add_argument("--multistep2_steps", type=int, nargs="+", default=[16, 25],
                        help="multistep2 / guidance grid step counts.")
    parser.add_argument("--searched_solvers", nargs="*", default=[], help="Folders written by search_solver.py.")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES, help="Caches to measure.")
    parser.add_argument("--reference_steps", type=int, default=500, help="Heun steps of the converged reference.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per setting; the median counts.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shared noise.")
    parser.add_argument("--output_json", default="benchmark_caches.json")
    parser.add_argument("--output_plot", default="benchmark_caches.png")
    return parser.parse_args(argv)


def cache_config(name: str, pipeline: PixelREPAPipeline, guided_times: list[float], mag_ratios=None):
    """
    The cache `name` as the README recommends it for a sampler whose guided evaluations are at `guided_times` (JiT
    time). PAB and FasterCache reuse attention outputs of earlier evaluations with the same batch, so their range (in
    diffusers' timestep units, 1000 * (1 - t)) starts at the third guided evaluation: PAB's up to t = 0.9 (from
    0.2 at the latest), FasterCache's to the end (from 0.32 at the latest). MagCache counts guided evaluations.
    """
    def diffusers_timestep() -> float:
        return 1000 * (1 - float(pipeline.current_timestep))

    third_guided = 1000 * (1 - guided_times[2]) + 0.5
    evaluations = len(guided_times)

    if name == "magcache":
        if mag_ratios is None:
            return MagCacheConfig(calibrate=True, num_inference_steps=evaluations)
        return MagCacheConfig(mag_ratios=mag_ratios, num_inference_steps=evaluations, threshold=0.06,
                              max_skip_steps=2 if evaluations < 40 else 3, retention_ratio=0.2)
    if name == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=3 if evaluations < 40 else 5, disable_cache_before_step=3,
                                     max_order=1, taylor_factors_dtype=torch.float32)
    if name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(100, min(800, third_guided)),
                                               current_timestep_callback=diffusers_timestep)
    return FasterCacheConfig(spatial_attention_block_skip_range=2,
                             spatial_attention_timestep_skip_range=(-1, min(681, third_guided)),
                             attention_weight_callback=lambda _: 0.5, tensor_format="BCHW",
                             is_guidance_distilled=True, current_timestep_callback=diffusers_timestep)


def benchmark(args) -> None:
    pipeline, labels, noise = shared_noise(args.pretrained_model_name_or_path, args.classes, args.images_per_class,
                                           args.seed)
    scale, interval = pipeline.config.guidance_scale, tuple(pipeline.config.guidance_interval)
    flow = pipeline.scheduler.config

    def run(scheduler, steps):
        pipeline.scheduler = scheduler
        return pipeline(labels, num_inference_steps=steps, latents=noise, output_type="np").images

    reference = run(JiTFlowMatchScheduler.from_config(flow, solver="heun", time_grid="uniform"), args.reference_steps)
    samplers = [("heun", steps, JiTFlowMatchScheduler.from_config(flow, solver="heun", time_grid="uniform"))
                for steps in args.heun_steps]
    samplers += [("multistep2", steps, JiTFlowMatchScheduler.from_config(flow, solver="multistep2",
                                                                         time_grid="guidance"))
                 for steps in args.multistep2_steps]
    for folder in args.searched_solvers:
        searched = JiTFlowMatchScheduler.from_pretrained(folder, subfolder="scheduler")
        samplers.append(("searched", len(searched.config.searched_times) - 1, searched))
    results = []
    for solver, steps, scheduler in samplers:
        scheduler.set_timesteps(steps, guidance_interval=interval, guidance_scale=scale)
        evaluations = len(scheduler.timesteps)
        guided = scheduler.timesteps[in_guidance_interval(scheduler.timesteps, interval)].tolist()
        for cache in args.caches:
            ratios = None
            if cache == "magcache":  # calibrated once per sampler: its ratios are printed as a Python list
                pipeline.transformer.enable_cache(cache_config(cache, pipeline, guided))
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    run(scheduler, steps)
                pipeline.transformer.disable_cache()
                ratios = ast.literal_eval(printed.getvalue().strip().splitlines()[-1])
            if cache != "none":
                pipeline.transformer.enable_cache(cache_config(cache, pipeline, guided, ratios))
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                images = run(scheduler, steps)
                seconds.append(time.perf_counter() - start)
            if cache != "none":
                pipeline.transformer.disable_cache()
            results.append(dict(solver=solver, steps=steps, evaluations=evaluations, cache=cache,
                                seconds=sorted(seconds)[len(seconds) // 2], error=rms_error(images, reference)))
            print(json.dumps(results[-1]))
    summary = dict(pretrained_model_name_or_path=args.pretrained_model_name_or_path, classes=args.classes,
                   images_per_class=args.images_per_class, seed=args.seed, guidance_scale=scale,
                   guidance_interval=list(interval), reference_steps=args.reference_steps,
                   threads=torch.get_num_threads(), results=results)
    with open(args.output_json, "w") as file:
        json.dump(summary, file, indent=2)
    plot(results, args.output_plot, f"{args.pretrained_model_name_or_path}: guidance {scale:g} on {list(interval)}")
    print(f"Wrote {args.output_json} and {args.output_plot}")


def plot(results: list[dict], path: str, title: str) -> None:
    """Error against seconds, log-log: one colour per cache, one marker per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    markers = {"heun": "o", "multistep2": "s", "searched": "*"}
    for index, cache in enumerate(CACHES):
        for solver, marker in markers.items():
            points = sorted((r["seconds"], r["error"]) for r in results if (r["cache"], r["solver"]) == (cache, solver))
            if points:
                axes.plot(*zip(*points), marker=marker, markersize=7, color=plt.cm.tab10(index),
                          label=f"{solver}, {cache}")
    save_log_log_plot(figure, axes, "seconds per call (this CPU)", title, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: benchmark(args), prog="benchmark_caches.py")


if __name__ == "__main__":
    sys.exit(main())

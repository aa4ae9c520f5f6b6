"""Sample quality against model evaluations for each solver and time grid, with guidance and its interval on.

For a trained pipeline and a set of classes, every solver x time grid x step count samples the same noise; the error
is the RMS difference (on the [0, 1] image scale) to a converged reference: the official Heun on a uniform grid with
many steps. Writes a JSON and a log-log PNG plot, and prints the fewest evaluations that match Heun-50's error.

    python pipelines/benchmark_solvers.py --pretrained_model_name_or_path quickstart_output/model \
        --classes 0 1 2 3 4 5 6 7 8 9 --images_per_class 4 --classifier_data_dir quickstart_output/digits \
        --output_json solvers.json --output_plot solvers.png
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.evaluation import image_folder_dataset
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command

PAPER_SETTING = ("heun", "uniform", 50)
# JiTFlowMatchScheduler's solvers that run on a time grid; a searched solver brings its own (--searched_solvers).
GRID_SOLVERS = tuple(solver for solver in JiTFlowMatchScheduler.SOLVERS if solver != "searched")
# diffusers' schedulers in the pipeline, on their own sigma grids (time grid "own"), made from the JiT config.
DIFFUSERS_SOLVERS = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "dpmsolver++_flow": (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction")),
    "dpmsolver++_sample": (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="sample")),
    "unipc_flow": (UniPCMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction")),
}


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A pipeline folder or Hub id.")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="Class ids to sample.")
    parser.add_argument("--images_per_class", type=int, default=4, help="Samples of each class.")
    parser.add_argument("--solvers", nargs="+", default=list(GRID_SOLVERS), choices=[*GRID_SOLVERS, *DIFFUSERS_SOLVERS],
                        help="Solvers to measure: JiTFlowMatchScheduler's, or diffusers' schedulers (on their own "
                             "sigma grid, so --time_grids does not apply to them).")
    parser.add_argument("--time_grids", nargs="+", default=list(JiTFlowMatchScheduler.TIME_GRIDS),
                        choices=JiTFlowMatchScheduler.TIME_GRIDS, help="Time grids to measure.")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 12, 15, 20, 25, 30, 40, 50],
                        help="Step counts to measure (Heun-50 on the uniform grid is always measured).")
    parser.add_argument("--searched_solvers", nargs="+", default=[],
                        help="Pipeline folders written by search_solver.py for this model: each one's searched "
                             "solver is measured at its own step count (time grid 'own').")
    parser.add_argument("--shift", type=float, default=3.0, help="Shift of the 'shifted' time grid.")
    parser.add_argument("--reference_steps", type=int, default=500, help="Heun steps of the converged reference.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, help="Default: the pipeline's.")
    parser.add_argument("--classifier_data_dir", default=None,
                        help="An image folder (one subfolder per class, in class-id order) to fit a pixel SVC on; "
                             "then each setting's class rate is reported.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shared noise.")
    parser.add_argument("--output_json", default="benchmark_solvers.json", help="Where the results go.")
    parser.add_argument("--output_plot", default="benchmark_solvers.png", help="The log-log plot of error vs evaluations.")
    args = parser.parse_args(argv)
    for name in ("images_per_class", "reference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.steps) < 1:
        parser.error(f"--steps must all be >= 1, got {args.steps}")
    return args


def fit_classifier(folder: str):
    """A pixel SVC fitted on an image folder; returns predict(images (N, H, W, C) in [0, 1]) -> class ids."""
    from sklearn.svm import SVC

    pixels, labels = [], []
    for label, name in enumerate(sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())):
        for image in image_folder_dataset(os.path.join(folder, name))["image"]:
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1) / 255)
            labels.append(label)
    classifier = SVC().fit(np.stack(pixels), np.asarray(labels))
    return lambda images: classifier.predict(images.reshape(len(images), -1))


def sample(pipeline, labels, noise, scheduler, steps, guidance_scale, guidance_interval):
    """Final images (N, H, W, C) in [0, 1], the evaluations per image and the wall time."""
    pipeline.scheduler = scheduler
    start = time.perf_counter()
    images = pipeline(labels, num_inference_steps=steps, guidance_scale=guidance_scale,
                      guidance_interval=guidance_interval, latents=noise, output_type="np").images
    seconds = time.perf_counter() - start
    return images, len(pipeline.scheduler.timesteps), seconds


def shared_noise(pretrained_model_name_or_path: str, classes: list[int], images_per_class: int, seed: int):
    """The pipeline (its bar off), and the labels and noise every setting of an error benchmark samples."""
    pipeline = PixelREPAPipeline.from_pretrained(pretrained_model_name_or_path)
    pipeline.set_progress_bar_config(disable=True)
    labels = [label for label in classes for _ in range(images_per_class)]
    config = pipeline.transformer.config
    noise = torch.randn(len(labels), config.in_channels, config.sample_size, config.sample_size,
                        generator=torch.Generator().manual_seed(seed))
    return pipeline, labels, noise


def save_log_log_plot(figure, axes, xlabel: str, title: str, path: str) -> None:
    """Log-log axes against the RMS error to the converged reference, the legend beside them, saved to `path`."""
    import matplotlib.pyplot as plt

    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("RMS error to the converged reference")
    axes.set_title(title)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def rms_error(images: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((images.astype(np.float64) - reference) ** 2)))


def fewest_evaluations_matching(results: list[dict], target: float) -> dict | None:
    """The result with the fewest evaluations whose error is at most `target` (ties: the smaller error)."""
    matching = [result for result in results if result["error"] <= target]
    return min(matching, key=lambda result: (result["evaluations"], result["error"])) if matching else None


def plot(results: list[dict], heun_50: dict, path: str, title: str) -> None:
    """Error against evaluations, log-log, one line per solver and grid; Heun-50's error as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    solvers = list(dict.fromkeys(result["solver"] for result in results))
    styles = {"uniform": "-", "guidance": "--", "shifted": ":", "own": "-."}
    for solver, time_grid in dict.fromkeys((result["solver"], result["time_grid"]) for result in results):
        line = sorted((result["evaluations"], result["error"]) for result in results
                      if result["solver"] == solver and result["time_grid"] == time_grid)
        axes.plot(*zip(*line), marker="o", markersize=3, color=plt.cm.tab10(solvers.index(solver) % 10),
                  linestyle=styles[time_grid], linewidth=2.5 if solver == "searched" else 1.2,
                  label=f"{solver} / {time_grid}")
    axes.axhline(heun_50["error"], color="gray", linestyle="--", label="Heun-50 (99 evaluations), the paper's")
    save_log_log_plot(figure, axes, "model evaluations per image", title, path)


def benchmark(args) -> None:
    pipeline, labels, noise = shared_noise(args.pretrained_model_name_or_path, args.classes, args.images_per_class,
                                           args.seed)
    config = pipeline.scheduler.config
    guidance_scale = pipeline.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
    guidance_interval = tuple(pipeline.config.guidance_interval if args.guidance_interval is None
                              else args.guidance_interval)
    predict = None if args.classifier_data_dir is None else fit_classifier(args.classifier_data_dir)

    def scheduler(solver, time_grid):
        if solver in DIFFUSERS_SOLVERS:
            scheduler_class, overrides = DIFFUSERS_SOLVERS[solver]
            return scheduler_class.from_config(config, **overrides)
        return JiTFlowMatchScheduler.from_config(config, solver=solver, time_grid=time_grid, shift=args.shift)

    reference, reference_evaluations, _ = sample(pipeline, labels, noise, scheduler("heun", "uniform"),
                                                 args.reference_steps, guidance_scale, guidance_interval)
    settings = [(solver, "own" if solver in DIFFUSERS_SOLVERS else time_grid, steps) for solver in args.solvers
                for time_grid in (args.time_grids[:1] if solver in DIFFUSERS_SOLVERS else args.time_grids)
                for steps in args.steps]
    if PAPER_SETTING not in settings:
        settings.append(PAPER_SETTING)
    measured = [(solver, time_grid, steps, scheduler(solver, time_grid)) for solver, time_grid, steps in settings]
    for folder in args.searched_solvers:
        searched = JiTFlowMatchScheduler.from_pretrained(folder, subfolder="scheduler")
        if searched.config.solver != "searched":
            raise ValueError(f"--searched_solvers {folder} holds solver {searched.config.solver!r}, not a searched "
                             "one.")
        measured.append(("searched", "own", len(searched.config.searched_times) - 1, searched))
    results = []
    for solver, time_grid, steps, solver_scheduler in measured:
        try:
            images, evaluations, seconds = sample(pipeline, labels, noise, solver_scheduler, steps,
                                                  guidance_scale, guidance_interval)
        except ValueError as error:  # e.g. fewer steps than the solver's order
            if solver == "searched":
                raise
            print(f"skipped {solver} / {time_grid} / {steps} steps: {error}")
            continue
        result = dict(solver=solver, time_grid=time_grid, steps=steps, evaluations=evaluations,
                      error=rms_error(images, reference), seconds=seconds)
        if predict is not None:
            result["class_rate"] = float((predict(images) == np.asarray(labels)).mean())
        results.append(result)
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in result.items()))
    heun_50 = next(result for result in results if (result["solver"], result["time_grid"], result["steps"])
                   == PAPER_SETTING)
    best = fewest_evaluations_matching(results, heun_50["error"])
    summary = dict(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path, classes=args.classes,
        images_per_class=args.images_per_class, seed=args.seed, guidance_scale=guidance_scale,
        guidance_interval=list(guidance_interval), t_eps=config.t_eps, noise_scale=config.noise_scale,
        shift=args.shift, reference=dict(solver="heun", time_grid="uniform", steps=args.reference_steps,
                                          evaluations=reference_evaluations),
        heun_50=heun_50, fewest_evaluations_matching_heun_50=best, results=results,
    )
    if predict is not None:
        summary["reference"]["class_rate"] = float((predict(reference) == np.asarray(labels)).mean())
    with open(args.output_json, "w") as file:
        json.dump(summary, file, indent=2)
    plot(results, heun_50, args.output_plot,
         f"{args.pretrained_model_name_or_path}: guidance {guidance_scale:g} on {list(guidance_interval)}")
    print(f"Heun-50 (uniform, {heun_50['evaluations']} evaluations): error {heun_50['error']:.4g}")
    print(f"Fewest evaluations at that error: {best['evaluations']} ({best['solver']} / {best['time_grid']} / "
          f"{best['steps']} steps, error {best['error']:.4g})")
    print(f"Wrote {args.output_json} and {args.output_plot}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: benchmark(args), errors=(OSError, ValueError), prog="benchmark_solvers.py")


if __name__ == "__main__":
    sys.exit(main())

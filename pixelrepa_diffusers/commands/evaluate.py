"""FID-50K and Inception Score of a PixelREPA / JiT pipeline, as the papers measure them, and on request
precision, recall, sFID (ADM's evaluator), KID and FD-DINOv2.

    accelerate launch pipelines/evaluate.py --pretrained_model_name_or_path PATH_OR_HUB_ID \
        --fid_statistics_file fid_stats/jit_in256_stats.npz --guidance_scale 2.6 2.8 3.0 --num_images 10000
    accelerate launch pipelines/evaluate.py --pretrained_model_name_or_path PATH_OR_HUB_ID \
        --fid_statistics_file VIRTUAL_imagenet256_labeled.npz --metrics fid is precision recall sfid

A sweep (several --guidance_scale or --guidance_interval_min values) also writes a PNG plot beside the JSON.

Each process generates its share of the images; a re-run with the same settings reuses finished shards. The
transformer is loaded in fp32 and samples in the regime `--precision` (default: official, the papers' own:
bf16 autocast with fp32 attention logits); accelerate's own mixed-precision setting is not used.
"""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator
from transformers import Dinov2Config

from pixelrepa_diffusers import PRECISIONS, JiTFlowMatchScheduler, JiTTransformer2DModel, PixelREPAPipeline
from pixelrepa_diffusers.evaluation import (
    DINOV2_MODEL,
    METRICS,
    EvaluationSettings,
    check_metrics,
    evaluate_pipeline,
    evaluation_class_labels,
    load_dinov2,
    load_inception,
    load_reference,
    plot_guidance_sweep,
)
from pixelrepa_diffusers.pipeline_pixelrepa import check_precision
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command


def summary(result: dict, show_interval: bool) -> str:
    """One line of a result's metrics."""
    interval = " (interval [{:g}, {:g}])".format(*result["guidance_interval"]) if show_interval else ""
    parts = [f"FID {result['fid']:.4f}"] if "fid" in result else []
    if "inception_score_mean" in result:
        parts.append(f"IS {result['inception_score_mean']:.2f} ± {result['inception_score_std']:.2f}")
    names = {"improved_precision": "precision", "improved_recall": "recall", "sfid": "sFID", "fd_dinov2": "FD-DINOv2"}
    parts += [f"{name} {result[key]:.4f}" for key, name in names.items() if key in result]
    if "kid_mean" in result:
        parts.append(f"KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}")
    return f"guidance_scale {result['guidance_scale']:g}{interval}: " + "  ".join(parts)


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--fid_statistics_file", required=True,
                        help="reference npz: ours (pipelines/compute_reference_stats.py; 'mu' and 'sigma' at least) or "
                             "an ADM reference batch (arr_0, mu, sigma, mu_s, sigma_s)")
    parser.add_argument("--metrics", nargs="+", default=["fid", "is"],
                        help=f"any of {', '.join(METRICS)} (default: fid is)")
    parser.add_argument("--dinov2_model", default=DINOV2_MODEL,
                        help="DINOv2 for fd_dinov2: Hub id or local folder of a transformers Dinov2Model, for offline "
                             f"machines (default: {DINOV2_MODEL}, ViT-L/14)")
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="images per KID subset (torch-fidelity's)")
    parser.add_argument("--num_images", type=int, default=50_000)
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=None,
                        help="one or more CFG scales (a sweep); default: the pipeline's")
    parser.add_argument("--guidance_interval_min", type=float, nargs="+", default=None,
                        help="one or more lower bounds of the CFG interval (a sweep); default: the pipeline's")
    parser.add_argument("--guidance_interval_max", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--solver", choices=JiTFlowMatchScheduler.SOLVERS, default=None,
                        help="ODE solver; default: the pipeline's (converted pipelines: heun, the papers')")
    parser.add_argument("--time_grid", choices=JiTFlowMatchScheduler.TIME_GRIDS, default=None,
                        help="time grid; default: the pipeline's (uniform). The fast option of BENCHMARKS.md: "
                             "--solver multistep2 --time_grid guidance --num_inference_steps 25")
    parser.add_argument("--class_balanced", action=argparse.BooleanOptionalAction, default=True,
                        help="num_images / num_classes images per class (default), or uniformly drawn labels")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward on each process")
    parser.add_argument("--images_per_shard", type=int, default=500,
                        help="images per saved unit of work; a shard should take less than the process-group timeout")
    parser.add_argument("--inception_weights", default=None,
                        help="torch-fidelity's Inception-v3 weights file, for offline machines")
    parser.add_argument("--save_images", default=None, help="also write every image as a PNG under this folder")
    parser.add_argument("--output_json", default="evaluation.json")
    parser.add_argument("--shard_dir", default=None, help="default: <output_json without .json>_shards")
    parser.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded with seed + i")
    parser.add_argument("--precision", default="official",
                        help=f"sampling regime, one of {', '.join(PRECISIONS)} (default: official, the papers' fp32 "
                             "weights under bf16 autocast with fp32 attention logits; model: plain fp32; bf16_sdpa: "
                             "bf16 autocast with SDPA attention in bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer (static shapes, one graph; each new batch shape compiles "
                             "once)")
    return parser.parse_args(argv)


def evaluate(args):
    check_metrics(args.metrics)
    check_precision(args.precision, torch.float32)
    accelerator = Accelerator()
    transformer_config = JiTTransformer2DModel.load_config(args.pretrained_model_name_or_path, subfolder="transformer")
    # Reject a bad num_images or reference before loading any weights.
    evaluation_class_labels(args.num_images, transformer_config["num_classes"], args.class_balanced, args.seed)
    dinov2_dim = Dinov2Config.from_pretrained(args.dinov2_model).hidden_size if "fd_dinov2" in args.metrics else None
    reference = load_reference(args.fid_statistics_file, args.metrics, transformer_config["sample_size"], dinov2_dim)
    with accelerator.main_process_first():
        inception = load_inception(args.inception_weights, accelerator.device)
        dinov2 = load_dinov2(args.dinov2_model, accelerator.device) if "fd_dinov2" in args.metrics else None
        pipeline = PixelREPAPipeline.from_pretrained(args.pretrained_model_name_or_path)
    overrides = {name: getattr(args, name) for name in ("solver", "time_grid") if getattr(args, name) is not None}
    if overrides:
        pipeline.scheduler = JiTFlowMatchScheduler.from_config(pipeline.scheduler.config, **overrides)
    pipeline.to(accelerator.device)
    if args.compile:
        pipeline.transformer.compile(dynamic=False, fullgraph=True)
    guidance_intervals = [None]
    if args.guidance_interval_min is not None or args.guidance_interval_max is not None:
        default_min, default_max = pipeline.config.guidance_interval
        maximum = default_max if args.guidance_interval_max is None else args.guidance_interval_max
        guidance_intervals = [(minimum, maximum) for minimum in args.guidance_interval_min or [default_min]]
    settings = EvaluationSettings(
        num_images=args.num_images,
        guidance_scales=args.guidance_scale or [None],
        guidance_intervals=guidance_intervals,
        num_inference_steps=args.num_inference_steps,
        batch_size=args.batch_size,
        images_per_shard=args.images_per_shard,
        class_balanced=args.class_balanced,
        seed=args.seed,
        precision=args.precision,
        metrics=args.metrics,
        kid_subset_size=args.kid_subset_size,
    )
    shard_dir = args.shard_dir or os.path.splitext(args.output_json)[0] + "_shards"
    results = evaluate_pipeline(pipeline, inception, reference, accelerator, shard_dir, settings, dinov2=dinov2,
                                save_images=args.save_images)
    if accelerator.is_main_process:
        for result in results:
            print(summary(result, len(guidance_intervals) > 1))
        report = {"arguments": vars(args), "num_processes": accelerator.num_processes, "results": results}
        with open(args.output_json, "w") as file:
            json.dump(report, file, indent=2)
        print(f"wrote {args.output_json}")
        if len(results) > 1:
            plot = os.path.splitext(args.output_json)[0] + ".png"
            plot_guidance_sweep(results, plot)
            print(f"wrote {plot}")
    accelerator.end_training()


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())

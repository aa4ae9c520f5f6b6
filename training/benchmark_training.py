"""Training-step speed of PixelREPA (forward, backward, AdamW, two EMAs) against a baseline in the same run.

    python -m training.benchmark_training --model JiT-B/16 --batch_size 128 --mixed_precision bf16 --compile \
        --peak_tflops 989 --reference_repo reference/PixelREPA

One step of ours is the step train_pixelrepa.py runs, its very function (training_step) with its --compile
(compile_blocks): JiTTrainingObjective (backbone, masked adapter, frozen DINOv2-B encoder) under accelerate's
autocast, backward, fused AdamW, foreach-lerp EMAs (0.9999, 0.9996), no host syncs. Baseline: the official Denoiser step as
its engine runs it (loss .item() calls, AdamW, a device sync, per-parameter EMA loops; its encoder a timm ViT of the
same shape) when `--reference_repo` is given; otherwise our objective with fp32 attention that materialises the
matrix, plain AdamW and no compile. Both use random weights (no downloads) and a fixed batch already on the
device, so data loading is not timed. FLOPs are counted analytically (see pipelines/benchmark_utils.py).
"""

import argparse
import copy
import json
import sys
import tempfile

import torch
from accelerate import Accelerator
from transformers import Dinov2Config, Dinov2Model

from pipelines.benchmark_utils import (
    add_benchmark_arguments,
    alternating_timings,
    check_benchmark_args,
    describe_machine,
    format_bytes,
    load_average,
    materialize_attention,
    median,
    model_flops_utilization,
    run_benchmark_cli,
    tensor_bytes,
    timed_call,
    training_flops,
    vit_encoder_flops,
)
from pipelines.official_code import (
    import_official,
    official_denoiser_args,
    official_sources,
    register_official_models,
)
from pixelrepa_diffusers import JiTTransformer2DModel, MaskedTransformerAdapter
from pixelrepa_diffusers.commands import OneLineArgumentParser
from pixelrepa_diffusers.encoders import AlignmentEncoder
from pixelrepa_diffusers.alignment import ALIGNMENTS
from pixelrepa_diffusers.losses import JiTTrainingObjective
from pixelrepa_diffusers.training_utils import ExponentialMovingAverage
from training.train_pixelrepa import compile_blocks, training_step

EMA_DECAYS = (0.9999, 0.9996)
ADAMW = dict(lr=2.5e-5, betas=(0.9, 0.95), weight_decay=0.0)


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="JiT-B/16", help="JiT preset name")
    parser.add_argument("--config_overrides", type=json.loads, default={},
                        help='JSON of JiTTransformer2DModel config overrides, e.g. \'{"num_layers": 2}\'')
    parser.add_argument("--encoder_overrides", type=json.loads, default={},
                        help="JSON of Dinov2Config overrides for the frozen encoder (default: ViT-B, 256 px, patch 16)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="bf16")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="ours only")
    parser.add_argument("--compile", action="store_true",
                        help="compile our blocks as train_pixelrepa.py --compile does (static shapes)")
    parser.add_argument("--compile_mode", default="default", help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--skip_baseline", action="store_true", help="time ours only (e.g. when the baseline OOMs)")
    parser.add_argument("--eager_baseline", action="store_true",
                        help="baseline: our very step uncompiled (with --compile: the compiled/eager ratio)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (H100 SXM dense bf16: 989)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed run")
    add_benchmark_arguments(parser, warmup=3)
    return parser.parse_args(argv)


def check_args(args) -> None:
    check_benchmark_args(args, positive=("batch_size", "steps"))
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak_tflops must be > 0, got {args.peak_tflops}.")
    chosen = [flag for flag, value in (("--reference_repo", args.reference_repo is not None),
                                       ("--skip_baseline", args.skip_baseline),
                                       ("--eager_baseline", args.eager_baseline)) if value]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} exclude each other.")
    if args.eager_baseline and not args.compile:
        raise ValueError("--eager_baseline needs --compile (without it, ours is the eager step).")


def encoder_config(args, transformer_config) -> Dinov2Config:
    """DINOv2 ViT-B/14 as the official code builds it: 256 px images in 16 px patches (overridable)."""
    return Dinov2Config(**{**args.encoder_overrides, "image_size": transformer_config.sample_size,
                           "patch_size": transformer_config.patch_size})


def build_objective(args, device, plain: bool):
    """(objective, random frozen encoder) on `device`; `plain` swaps in the materialised fp32 attention."""
    transformer = JiTTransformer2DModel.from_preset(args.model, **args.config_overrides)
    config = transformer.config
    encoder_settings = encoder_config(args, config)
    encoder = AlignmentEncoder(Dinov2Model(encoder_settings), config.sample_size)
    adapter = MaskedTransformerAdapter.from_transformer_config(config, out_channels=encoder_settings.hidden_size)
    if plain:
        materialize_attention(transformer)
        materialize_attention(adapter)
    elif args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        adapter.enable_gradient_checkpointing()
    objective = JiTTrainingObjective(transformer, alignment="pixelrepa", aligner=adapter)
    return objective.to(device).train(), encoder.to(device)


def our_step(args, accelerator, plain: bool = False, compiled: bool = False):
    """(step, resident tensors, objective) of our training step: train_pixelrepa.training_step, on blocks compiled as
    train_pixelrepa.py compiles them if `compiled`; `plain` is the baseline of our own."""
    objective, encoder = build_objective(args, accelerator.device, plain)
    parameters = [parameter for parameter in objective.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, **ADAMW, fused=not plain)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    emas = [ExponentialMovingAverage(objective.transformer, decay) for decay in EMA_DECAYS]
    if compiled:
        compile_blocks(objective.transformer, ALIGNMENTS["pixelrepa"], objective.aligner, encoder,
                       mode=args.compile_mode)
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)

    def step(images, labels):
        training_step(accelerator, objective, encoder, optimizer, lr_scheduler, emas, images, labels)

    def resident():
        return [*objective.parameters(), *objective.buffers(), *encoder.parameters(), *optimizer_state(optimizer),
                *(average for ema in emas for average in ema.averages.values())]

    return step, resident, accelerator.unwrap_model(objective)


def official_step(args, device, transformer_config):
    """(step, resident tensors) of the official training step, as engine_pixelREPA.train_one_epoch runs it, for the
    backbone shape `transformer_config`."""
    from timm.models.vision_transformer import VisionTransformer

    encoder_settings = encoder_config(args, transformer_config)

    def create_model(model_name, pretrained, img_size, patch_size):
        return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=encoder_settings.hidden_size,
                                 depth=encoder_settings.num_hidden_layers,
                                 num_heads=encoder_settings.num_attention_heads, mlp_ratio=encoder_settings.mlp_ratio,
                                 init_values=1e-5)

    with tempfile.TemporaryDirectory() as directory:
        source_dir = official_sources(args.reference_repo, directory)
        official = import_official(source_dir, create_model, device)
    with torch.device("meta"):
        adapter = MaskedTransformerAdapter.from_transformer_config(transformer_config,
                                                                   out_channels=encoder_settings.hidden_size)
    register_official_models(official.model, transformer_config, adapter.config)
    denoiser = official.denoiser.Denoiser(official_denoiser_args(transformer_config)).to(device).train()
    optimizer = torch.optim.AdamW(official.misc.add_weight_decay(denoiser, ADAMW["weight_decay"]), lr=ADAMW["lr"],
                                  betas=ADAMW["betas"])
    denoiser.ema_params1 = copy.deepcopy(list(denoiser.net.parameters()))
    denoiser.ema_params2 = copy.deepcopy(list(denoiser.net.parameters()))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def step(images, labels):
        with autocast:
            loss_jit, loss_mta = denoiser(images, labels)
        loss_jit.item()
        loss_mta.item()
        loss = loss_jit + 0.1 * loss_mta
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        denoiser.update_ema()
        loss.item()

    def resident():
        gradients = [parameter.grad for parameter in denoiser.parameters() if parameter.grad is not None]
        return [*denoiser.parameters(), *denoiser.buffers(), *gradients, *optimizer_state(optimizer),
                *denoiser.ema_params1, *denoiser.ema_params2]

    return step, resident


def optimizer_state(optimizer):
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def run(args) -> dict:
    check_args(args)
    device = torch.device(args.device)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    if device.index is not None and accelerator.device != device:
        raise ValueError(f"--device {device}: accelerate runs the step on {accelerator.device}; choose the GPU with "
                         "CUDA_VISIBLE_DEVICES.")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    steps = {}
    residents = {}
    steps["ours"], residents["ours"], objective = our_step(args, accelerator, compiled=args.compile)
    baseline_kind = ("none" if args.skip_baseline else "eager" if args.eager_baseline else "official"
                     if args.reference_repo is not None else "plain")
    if baseline_kind == "plain":
        steps["baseline"], residents["baseline"], _ = our_step(args, accelerator, plain=True)
    elif baseline_kind == "eager":
        steps["baseline"], residents["baseline"], _ = our_step(args, accelerator)
    elif baseline_kind == "official":
        steps["baseline"], residents["baseline"] = official_step(args, device, objective.transformer.config)

    config = objective.transformer.config
    images = torch.rand(args.batch_size, config.in_channels, config.sample_size, config.sample_size,
                        device=device) * 2 - 1
    labels = torch.randint(0, config.num_classes, (args.batch_size,), device=device)
    runs = {name: (lambda step=step: [step(images, labels) for _ in range(args.steps)]) for name, step in steps.items()}
    first_step_seconds = {}  # the first step holds the compilation
    for name, step in steps.items():
        first_step_seconds[name] = timed_call(lambda step=step: step(images, labels), device)[0]
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step(images, labels)
    resident_bytes = {name: tensor_bytes(resident()) for name, resident in residents.items()}
    machine = describe_machine(device)
    timings = alternating_timings(runs, resident_bytes, args.repeats, device)

    encoder_settings = encoder_config(args, config)
    encoder_flops = vit_encoder_flops(config.sample_size, config.patch_size, encoder_settings.hidden_size,
                                      encoder_settings.num_hidden_layers,
                                      int(encoder_settings.hidden_size * encoder_settings.mlp_ratio), 1)
    flops_per_image = training_flops(config, objective.aligner.config, encoder_flops)
    results = dict(
        machine=machine, load_average_after=load_average(), command=" ".join(sys.argv), baseline_kind=baseline_kind,
        model=args.model, config_overrides=args.config_overrides, encoder_overrides=args.encoder_overrides,
        batch_size=args.batch_size, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, steps_per_run=args.steps,
        gflops_per_image=flops_per_image / 1e9, peak_tflops=args.peak_tflops,
    )
    for name, timing in timings.items():
        seconds = median(timing["seconds"]) / args.steps
        images_per_second = args.batch_size / seconds
        achieved, mfu = model_flops_utilization(flops_per_image, images_per_second, args.peak_tflops)
        results[name] = dict(
            step_seconds=[value / args.steps for value in timing["seconds"]], median_step_seconds=seconds,
            images_per_second=images_per_second, achieved_tflops=achieved, mfu=mfu, peak_bytes=timing["peak_bytes"],
            first_step_seconds=first_step_seconds[name],
        )
    if "baseline" in results:
        results["speedup"] = results["ours"]["images_per_second"] / results["baseline"]["images_per_second"]
    return results


def report(results) -> None:
    machine = results["machine"]
    print(f"{machine['device_name']} ({machine['device']}, {machine['threads']} threads), torch {machine['torch']}, "
          f"{machine['date']}, load average {machine['load_average']} before, {results['load_average_after']} after")
    precision = "bf16 autocast" if results["mixed_precision"] == "bf16" else "fp32"
    checkpointing = ", gradient checkpointing" if results["gradient_checkpointing"] else ""
    print(f"PixelREPA {results['model']} {results['config_overrides'] or ''} batch {results['batch_size']}, "
          f"{precision}{checkpointing}{', compiled' if results['compile'] else ''}; "
          f"{results['gflops_per_image']:.4g} GFLOP per image; baseline {results['baseline_kind']}")
    for name in ("ours", "baseline"):
        if name not in results:
            continue
        entry = results[name]
        mfu = "" if entry["mfu"] is None else f", MFU {entry['mfu']:.1%}"
        print(f"{name:>8}: {entry['median_step_seconds']:.4f} s/step, {entry['images_per_second']:.2f} img/s, "
              f"{entry['achieved_tflops']:.3f} TFLOP/s{mfu}, peak memory {format_bytes(entry['peak_bytes'])}, "
              f"first step (with any compilation) {entry['first_step_seconds']:.2f} s")
    if "speedup" in results:
        print(f"speed-up ours / baseline (median img/s): {results['speedup']:.3f}x")


def main(argv=None) -> int:
    return run_benchmark_cli(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

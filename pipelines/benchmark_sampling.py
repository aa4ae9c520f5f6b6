"""Sampling speed of PixelREPAPipeline against a baseline timed in the same run, in alternating repeats.

    python -m pipelines.benchmark_sampling --model JiT-B/16 --batch_size 256 --dtype bf16 --compile \
        --reference_repo reference/PixelREPA

Baseline: the official `Denoiser.generate` (separate cond and uncond forwards, uncond also outside the CFG
interval, fp32 attention with the full matrix) with the same weights when `--reference_repo` is given; otherwise
our pipeline with that attention, fp32 weights and no compile. A bf16 baseline (`--baseline_dtype bf16`, the default
under `--dtype bf16`) runs in the official regime: bf16 autocast, fp32 attention logits. Ours runs with `--dtype`
weights in the regime `--precision`; so `--precision official --baseline_dtype fp32` gives the official regime's
deviation from fp32 (on the [0, 1] image scale). `--pretrained_model_name_or_path` takes trained weights (a pipeline
folder) instead of random ones. `--forward_only` times one transformer forward instead.
"""

import argparse
import copy
import json
import sys
import tempfile

import torch
import torch.nn as nn

from pipelines.benchmark_utils import (
    add_benchmark_arguments,
    alternating_timings,
    check_benchmark_args,
    describe_machine,
    format_bytes,
    load_average,
    materialize_attention,
    median,
    run_benchmark_cli,
    tensor_bytes,
    transformer_flops,
)
from pipelines.official_code import (
    import_official,
    official_denoiser_args,
    official_sources,
    randomize_trainable_,
    register_official_models,
)
from pixelrepa_diffusers import (
    PRECISIONS,
    JiTFlowMatchScheduler,
    JiTTransformer2DModel,
    MaskedTransformerAdapter,
    PixelREPAPipeline,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser
from pixelrepa_diffusers.commands.generate import DTYPES
from pixelrepa_diffusers.conversion import rename_official_keys
from pixelrepa_diffusers.pipeline_pixelrepa import check_precision, precision_attention, precision_autocast
from pixelrepa_diffusers.scheduling_jit_flow_match import GUIDANCE_INTERVAL

# The baseline runs in the official code's regimes, fp32 or bf16 autocast, so there is no fp16 to compare with.
BENCHMARK_DTYPES = ("bf16", "fp32")


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="JiT-B/16", help="JiT preset name")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="a pipeline folder whose trained transformer replaces --model's random weights")
    parser.add_argument("--config_overrides", type=json.loads, default={},
                        help='JSON of JiTTransformer2DModel config overrides, e.g. \'{"num_layers": 2}\'')
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Heun steps (2 * steps - 1 evaluations)")
    parser.add_argument("--guidance_scale", type=float, default=3.1)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=GUIDANCE_INTERVAL)
    parser.add_argument("--dtype", choices=BENCHMARK_DTYPES, default="fp32",
                        help="our transformer's weights (the ODE state stays fp32)")
    parser.add_argument("--precision", default="model",
                        help=f"our regime, one of {', '.join(PRECISIONS)} (see PixelREPAPipeline.__call__); "
                             "official and bf16_sdpa need --dtype fp32")
    parser.add_argument("--baseline_dtype", choices=BENCHMARK_DTYPES, default=None,
                        help="fp32, or bf16: the baseline in the official regime (bf16 autocast, fp32 attention "
                             "logits); default: --dtype")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block of our transformer (diffusers' compile_repeated_blocks, static "
                             "shapes)")
    parser.add_argument("--attention_backend", default=None,
                        help="diffusers attention backend of our transformer (set_attention_backend), e.g. native, "
                             "_native_cudnn, flash, _flash_3_hub; default: diffusers' active one (native)")
    parser.add_argument("--compile_mode", default="default",
                        help="torch.compile mode; 'reduce-overhead' adds CUDA graphs")
    parser.add_argument("--forward_only", action="store_true", help="time one transformer forward, not sampling")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top entries for ours")
    add_benchmark_arguments(parser, warmup=1)
    return parser.parse_args(argv)


def check_args(args) -> None:
    check_benchmark_args(args, positive=("batch_size", "num_inference_steps"))
    check_precision(args.precision, DTYPES[args.dtype])
    if args.pretrained_model_name_or_path is not None and args.reference_repo is not None:
        raise ValueError("--pretrained_model_name_or_path and --reference_repo do not combine: the official baseline "
                         "is built with random weights.")


class PlaceholderEncoder(nn.Module):
    """Stands in for the official Denoiser's timm encoder, which sampling never runs."""

    num_prefix_tokens = 1

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim


def build_models(args, device):
    """Our transformer (trained or random weights) and the baseline: the official Denoiser (same weights) or None."""
    if args.pretrained_model_name_or_path is not None:
        transformer = JiTTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer")
        return transformer, None
    transformer = JiTTransformer2DModel.from_preset(args.model, **args.config_overrides)
    if args.reference_repo is None:
        randomize_trainable_(transformer, args.seed)
        return transformer, None
    config = transformer.config

    def create_model(model_name, pretrained, img_size, patch_size):
        return PlaceholderEncoder(config.hidden_size)

    with tempfile.TemporaryDirectory() as directory:
        source_dir = official_sources(args.reference_repo, directory)
        official = import_official(source_dir, create_model, device)
    with torch.device("meta"):
        adapter = MaskedTransformerAdapter.from_transformer_config(config, out_channels=config.hidden_size)
    register_official_models(official.model, config, adapter.config)
    low, high = args.guidance_interval
    denoiser_args = official_denoiser_args(config, num_sampling_steps=args.num_inference_steps,
                                           cfg=args.guidance_scale, interval_min=low, interval_max=high)
    denoiser = official.denoiser.Denoiser(denoiser_args)
    randomize_trainable_(denoiser.net, args.seed)
    transformer.load_state_dict(rename_official_keys(denoiser.net.state_dict()))
    return transformer, denoiser.to(device).eval()


def baseline_dtype(args) -> str:
    return args.dtype if args.baseline_dtype is None else args.baseline_dtype


def baseline_autocast(args, device):
    """The official baseline's precision: bf16 autocast (as the official evaluation) or fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=baseline_dtype(args) == "bf16")


def baseline_precision(args) -> str:
    """Our plain baseline's regime: the official one (bf16 autocast, fp32 attention logits) or fp32."""
    return "official" if baseline_dtype(args) == "bf16" else "model"


def sampling_runs(args, transformer, denoiser, device):
    """(runs, resident bytes, outputs): name -> callable for ours and the baseline, the bytes of each one's weights,
    and the final samples each call leaves."""
    dtype = DTYPES[args.dtype]
    config = transformer.config
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, config.num_classes, (args.batch_size,), generator=generator).to(device)
    outputs = {}

    def pipeline_of(model):
        pipe = PixelREPAPipeline(model, JiTFlowMatchScheduler(solver="heun"), guidance_scale=args.guidance_scale,
                                 guidance_interval=tuple(args.guidance_interval))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def final_latents(name):
        def callback(pipe, step, timestep, tensors):
            outputs[name] = tensors["latents"]
            return {}
        return callback

    def noise():
        torch.manual_seed(args.seed)  # as the official generate, which draws from the global generator
        return torch.randn(args.batch_size, config.in_channels, config.sample_size, config.sample_size, device=device)

    if denoiser is None:
        plain = copy.deepcopy(transformer)
        materialize_attention(plain)
        plain_pipe = pipeline_of(plain.to(device).eval())
        baseline_module = plain

        def baseline():
            plain_pipe(labels, args.num_inference_steps, latents=noise(), output_type="pt",
                       callback_on_step_end=final_latents("baseline"), precision=baseline_precision(args))
    else:
        baseline_module = denoiser
        autocast = baseline_autocast(args, device)

        def baseline():
            torch.manual_seed(args.seed)
            with autocast:
                outputs["baseline"] = denoiser.generate(labels)

    transformer = transformer.to(device=device, dtype=dtype).eval()
    if args.compile:
        transformer.compile_repeated_blocks(mode=args.compile_mode, dynamic=False, fullgraph=True)
    pipe = pipeline_of(transformer)

    def ours():
        pipe(labels, args.num_inference_steps, latents=noise(), output_type="pt",
             callback_on_step_end=final_latents("ours"), precision=args.precision)

    resident = {"ours": module_bytes(transformer), "baseline": module_bytes(baseline_module)}
    return {"ours": ours, "baseline": baseline}, resident, outputs


def forward_runs(args, transformer, denoiser, device):
    """(runs, resident bytes, outputs) timing one transformer forward of ours and the baseline on the same inputs."""
    dtype = DTYPES[args.dtype]
    config = transformer.config
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.rand(args.batch_size, generator=generator)
    y = torch.randint(0, config.num_classes + 1, (args.batch_size,), generator=generator)
    x, t, y = x.to(device), t.to(device), y.to(device)
    outputs = {}
    if denoiser is None:
        net = copy.deepcopy(transformer)
        materialize_attention(net)
        net = net.to(device).eval()
        baseline_module = net

        @torch.no_grad()
        def baseline():
            precision = baseline_precision(args)
            with precision_attention(net, precision), precision_autocast(precision, device):
                outputs["baseline"] = net(x, t, y).sample
    else:
        baseline_module = denoiser.net
        autocast = baseline_autocast(args, device)

        @torch.no_grad()
        def baseline():
            with autocast:
                outputs["baseline"] = denoiser.net(x, t, y)

    transformer = transformer.to(device=device, dtype=dtype).eval()
    if args.compile:
        transformer.compile_repeated_blocks(mode=args.compile_mode, dynamic=False, fullgraph=True)

    @torch.no_grad()
    def ours():
        with precision_attention(transformer, args.precision), precision_autocast(args.precision, device):
            outputs["ours"] = transformer(x.to(dtype), t, y).sample

    resident = {"ours": module_bytes(transformer), "baseline": module_bytes(baseline_module)}
    return {"ours": ours, "baseline": baseline}, resident, outputs


def to_image(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model scale to the [0, 1] image scale the pipeline outputs, clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def module_bytes(module: nn.Module) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()])


def profile_table(function, device, row_limit=15) -> str:
    """torch.profiler's top entries (by self time on the device that does the work) for one call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as profiler:
        function()
    return profiler.key_averages().table(sort_by=sort_by, row_limit=row_limit)


def run(args) -> dict:
    check_args(args)
    device = torch.device(args.device)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    transformer, denoiser = build_models(args, device)
    if args.attention_backend is not None:
        try:
            transformer.set_attention_backend(args.attention_backend)
        except RuntimeError as error:  # diffusers: the backend's package or kernel is missing on this machine
            raise ValueError(str(error)) from error
    make_runs = forward_runs if args.forward_only else sampling_runs
    runs, resident, outputs = make_runs(args, transformer, denoiser, device)
    for _ in range(args.warmup):
        for function in runs.values():
            function()
    machine = describe_machine(device)
    timings = alternating_timings(runs, resident, args.repeats, device)

    ours, baseline = outputs["ours"].float(), outputs["baseline"].float()
    image_difference = (to_image(ours) - to_image(baseline)).abs()
    model_name = args.model if args.pretrained_model_name_or_path is None else args.pretrained_model_name_or_path
    evaluations = 1 if args.forward_only else 2 * args.num_inference_steps - 1
    results = dict(
        machine=machine,
        load_average_after=load_average(),
        command=" ".join(sys.argv),
        mode="forward" if args.forward_only else "sampling",
        baseline_kind="official" if denoiser is not None else "plain",
        model=model_name, config_overrides=args.config_overrides, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, model_evaluations=evaluations,
        guidance_scale=args.guidance_scale, guidance_interval=list(args.guidance_interval), dtype=args.dtype,
        precision=args.precision, compile=args.compile, attention_backend=args.attention_backend or "native",
        transformer_gflops_per_image=transformer_flops(transformer.config) / 1e9,
        baseline_dtype=baseline_dtype(args),
        max_image_difference=image_difference.max().item(),
        mean_image_difference=image_difference.mean().item(),
        relative_image_difference=(image_difference.norm() / to_image(baseline).norm()).item(),
        relative_difference=((ours - baseline).norm() / baseline.norm()).item(),
    )
    for name, timing in timings.items():
        seconds = median(timing["seconds"])
        results[name] = dict(seconds=timing["seconds"], median_seconds=seconds,
                             images_per_second=args.batch_size / seconds, peak_bytes=timing["peak_bytes"])
    results["speedup"] = results["ours"]["images_per_second"] / results["baseline"]["images_per_second"]
    if args.profile:
        results["profile"] = profile_table(runs["ours"], device)
    return results


def report(results) -> None:
    machine = results["machine"]
    what = "one forward" if results["mode"] == "forward" else (
        f"{results['num_inference_steps']}-step Heun ({results['model_evaluations']} evaluations), "
        f"CFG {results['guidance_scale']} on {results['guidance_interval']}")
    print(f"{machine['device_name']} ({machine['device']}, {machine['threads']} threads), torch {machine['torch']}, "
          f"{machine['date']}, load average {machine['load_average']} before, {results['load_average_after']} after")
    print(f"{results['model']} {results['config_overrides'] or ''} batch {results['batch_size']}, {what}; "
          f"ours {results['dtype']} weights, precision {results['precision']}"
          f"{' compiled' if results['compile'] else ''}, attention {results['attention_backend']}, baseline {results['baseline_kind']} "
          f"{'official regime' if results['baseline_dtype'] == 'bf16' else 'fp32'}")
    for name in ("ours", "baseline"):
        entry = results[name]
        print(f"{name:>8}: {entry['median_seconds']:.4f} s/batch, {entry['images_per_second']:.4g} img/s, "
              f"peak memory {format_bytes(entry['peak_bytes'])}")
    print(f"speed-up ours / baseline (median img/s): {results['speedup']:.3f}x")
    print(f"agreement on the [0, 1] image scale: max |ours - baseline| {results['max_image_difference']:.3e}, "
          f"mean {results['mean_image_difference']:.3e}, relative L2 {results['relative_image_difference']:.3e}; "
          f"relative L2 before clamping {results['relative_difference']:.3e}")
    if "profile" in results:
        print(results["profile"])


def main(argv=None) -> int:
    return run_benchmark_cli(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

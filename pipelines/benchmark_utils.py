"""What the sampling and training benchmarks share: analytic FLOP counts, timing, the machine's description, and
the CLI body."""

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from pixelrepa_diffusers.commands import run_command
from pixelrepa_diffusers.transformer_jit import JiTFP32LogitsAttnProcessor

# The tiny JiT and DINOv2 of dry runs (gpu_check.py --tiny) and of the tests.
TINY_CONFIG = dict(sample_size=32, patch_size=8, hidden_size=64, num_layers=4, num_attention_heads=4, num_classes=10,
                   bottleneck_dim=16, in_context_len=4, in_context_start=2)
TINY_ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4)


def materialize_attention(model: nn.Module) -> None:
    """Sets every attention of `model` (a JiT backbone or adapter) to the official attention, which materialises
    the fp32 matrix."""
    model.set_attn_processor(JiTFP32LogitsAttnProcessor())


# ---------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-adds of matrix products count 2; norms, activations and softmax are not counted)


def block_flops(length: int, hidden_size: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one JiT block on `length` tokens, per image (qkv, attention, projection, SwiGLU, adaLN)."""
    inner = int(int(hidden_size * mlp_ratio) * 2 / 3)
    linear = 2 * length * (4 * hidden_size * hidden_size + 3 * hidden_size * inner)
    attention = 4 * length * length * hidden_size
    modulation = 2 * hidden_size * 6 * hidden_size
    return linear + attention + modulation


def conditioning_flops(hidden_size: int) -> int:
    """Timestep embedder MLP (256 frequencies -> hidden -> hidden), per image."""
    return 2 * (256 * hidden_size + hidden_size * hidden_size)


def transformer_flops(config) -> int:
    """Forward FLOPs of a JiTTransformer2DModel per image."""
    tokens = (config.sample_size // config.patch_size) ** 2
    patch_pixels = config.patch_size**2 * config.in_channels
    hidden = config.hidden_size
    flops = conditioning_flops(hidden)
    flops += 2 * tokens * (patch_pixels * config.bottleneck_dim + config.bottleneck_dim * hidden)
    for index in range(config.num_layers):
        length = tokens + (config.in_context_len if index >= config.in_context_start else 0)
        flops += block_flops(length, hidden, config.mlp_ratio)
    flops += 2 * hidden * 2 * hidden + 2 * tokens * hidden * patch_pixels
    return flops


def adapter_flops(config) -> int:
    """Forward FLOPs of a MaskedTransformerAdapter per image."""
    tokens = (config.sample_size // config.patch_size) ** 2
    hidden = config.hidden_size
    flops = conditioning_flops(hidden)
    flops += config.num_layers * block_flops(tokens + config.in_context_len, hidden, config.mlp_ratio)
    if config.out_channels != hidden:
        flops += 2 * tokens * (hidden * hidden + hidden * config.out_channels)
    return flops


def vit_encoder_flops(image_size: int, patch_size: int, hidden_size: int, num_layers: int, intermediate_size: int,
                      num_prefix_tokens: int) -> int:
    """Forward FLOPs of a plain ViT encoder (DINOv2: GELU MLP) per image."""
    tokens = (image_size // patch_size) ** 2
    length = tokens + num_prefix_tokens
    per_block = 2 * length * (4 * hidden_size * hidden_size + 2 * hidden_size * intermediate_size)
    per_block += 4 * length * length * hidden_size
    return 2 * tokens * patch_size**2 * 3 * hidden_size + num_layers * per_block


def training_flops(transformer_config, adapter_config, encoder_flops: int) -> int:
    """Model FLOPs of one PixelREPA training image: backbone and adapter forward + backward (3x forward) plus the
    frozen encoder's forward. Recomputation under gradient checkpointing is not counted (model FLOPs)."""
    return 3 * (transformer_flops(transformer_config) + adapter_flops(adapter_config)) + encoder_flops


def model_flops_utilization(flops_per_image: float, images_per_second: float, peak_tflops: float | None):
    """(achieved TFLOP/s, MFU as a fraction of `peak_tflops` or None when no peak is given)."""
    achieved = flops_per_image * images_per_second / 1e12
    return achieved, None if peak_tflops is None else achieved / peak_tflops


# ---------------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(function, device: torch.device):
    """(seconds, transient peak bytes or None) of one call: the CUDA allocator's peak during the call above what was
    allocated before it; None off CUDA."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type != "cuda":
        return seconds, None
    return seconds, torch.cuda.max_memory_allocated(device) - allocated


def tensor_bytes(tensors) -> int:
    """Bytes held by the distinct storages of `tensors`."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def alternating_timings(runs: dict, resident_bytes: dict, repeats: int, device: torch.device, log=print) -> dict:
    """
    Times each callable of `runs` (name -> function) `repeats` times, alternating between them (A, B, A, B, ...)
    so that slow drifts of the machine hit all of them alike. Returns name -> {"seconds": [...], "peak_bytes"}, where
    peak_bytes is the path's resident state (`resident_bytes[name]`: weights, optimizer state, EMAs) plus the largest
    transient peak of its calls: what the path alone would hold on the GPU. None off CUDA.
    """
    results = {name: {"seconds": [], "peak_bytes": None} for name in runs}
    for repeat in range(repeats):
        for name, function in runs.items():
            seconds, transient = timed_call(function, device)
            results[name]["seconds"].append(seconds)
            if transient is not None:
                peak = resident_bytes[name] + transient
                results[name]["peak_bytes"] = max(peak, results[name]["peak_bytes"] or 0)
            log(f"repeat {repeat + 1}/{repeats} {name}: {seconds:.4f} s")
    return results


def median(values) -> float:
    return statistics.median(values)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages of the machine (Linux)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def describe_machine(device: torch.device) -> dict:
    """Device name, torch version, threads, date and load average, for the results record."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    return dict(device=str(device), device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), load_average=load_average(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def format_bytes(value) -> str:
    return "n/a (CPU)" if value is None else f"{value / 2**30:.2f} GiB"


def add_benchmark_arguments(parser, warmup: int) -> None:
    """The flags every benchmark takes: the official code, repeats and warm-up, device, threads, seed and output."""
    parser.add_argument("--reference_repo", default=None,
                        help="official kaist-cvml/PixelREPA: a work tree, a copy of its files, or a bare git repo")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs of each before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None, help="also write the results here")


def check_benchmark_args(args, positive: tuple[str, ...]) -> None:
    """Raises ValueError naming the flag unless the `positive` flags and --repeats are >= 1 and --warmup >= 0."""
    for name in (*positive, "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}.")


def write_results(args, run, report) -> None:
    """Runs `run(args)`, prints its report and writes `--output_json`."""
    results = run(args)
    report(results)
    if args.output_json is not None:
        with open(args.output_json, "w") as file:
            json.dump(results, file, indent=2)


def run_benchmark_cli(args, run, report) -> int:
    """A benchmark CLI's body (see `write_results`); bad input is one `error:` line and exit status 1."""
    return run_command(lambda: write_results(args, run, report), errors=(ValueError, TypeError))

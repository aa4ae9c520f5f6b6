"""Shared pieces of the sampling and training benchmarks: timing, analytic FLOP counts, and the official code.

The official PixelREPA sources are imported at run time from an external checkout (`--reference_repo`);
nothing of them is kept in this repository.
"""

import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .transformer_jit import JiTFP32LogitsAttnProcessor

OFFICIAL_FILES = ("model_pixelREPA.py", "denoiser_pixelREPA.py", "util/model_util.py", "util/misc.py")


# ---------------------------------------------------------------------------------------------------------------
# The official code


def official_sources(reference_repo, directory) -> Path:
    """
    The folder holding the official sources: `reference_repo` itself when it is a work tree (or a plain copy), else
    HEAD of the bare git repository `reference_repo` exported into `directory`.
    """
    reference_repo = Path(reference_repo)
    if (reference_repo / "model_pixelREPA.py").is_file():
        return reference_repo
    query = subprocess.run(["git", "-C", str(reference_repo), "rev-parse", "--is-bare-repository"],
                           capture_output=True, text=True)
    if query.returncode != 0 or query.stdout.strip() != "true":
        raise ValueError(f"reference_repo {str(reference_repo)!r} holds neither model_pixelREPA.py nor a bare git "
                         "repository of kaist-cvml/PixelREPA.")
    directory = Path(directory)
    for name in OFFICIAL_FILES:
        source = subprocess.run(["git", "-C", str(reference_repo), "show", f"HEAD:{name}"],
                                capture_output=True, check=True).stdout
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(source)
    return directory


def import_official(source_dir, create_model, device: torch.device):
    """
    Imports the official `model_pixelREPA`, `denoiser_pixelREPA` and `util.misc` modules from `source_dir`.

    `create_model(model_name, pretrained, img_size, patch_size)` stands in for timm's (it builds the frozen
    alignment encoder). On CUDA the dynamo cache limit is raised as main_pixelREPA.py does, so that its per-block
    `@torch.compile` stays compiled; off CUDA, `Tensor.cuda` becomes the identity, those decorators are undone, and
    `torch.cuda.amp.autocast(enabled=False)` (around the official attention logits) switches autocast off on
    `device`, so the official code runs eagerly on CPU in its own precision.
    """
    if device.type == "cuda":
        torch._dynamo.config.cache_size_limit = 128
    else:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.cuda.amp.autocast = lambda enabled: torch.autocast(device.type, enabled=enabled)
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
    saved_timm = sys.modules.get("timm")
    sys.modules["timm"] = types.SimpleNamespace(create_model=create_model)
    sys.path.insert(0, str(source_dir))
    try:
        model_module = importlib.import_module("model_pixelREPA")
        denoiser_module = importlib.import_module("denoiser_pixelREPA")
        misc_module = importlib.import_module("util.misc")
    finally:
        sys.path.remove(str(source_dir))
        if saved_timm is None:
            del sys.modules["timm"]
        else:
            sys.modules["timm"] = saved_timm
    if device.type != "cuda":
        for module_class in (model_module.JiTBlock, model_module.FinalLayer):
            module_class.forward = module_class.forward._torchdynamo_orig_callable
    return model_module, denoiser_module, misc_module


def official_jit_kwargs(config) -> dict:
    """Official `JiT(...)` keyword arguments for a JiTTransformer2DModel config."""
    return dict(
        input_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
        hidden_size=config.hidden_size, depth=config.num_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio, attn_drop=config.attention_dropout, proj_drop=config.dropout,
        num_classes=config.num_classes, bottleneck_dim=config.bottleneck_dim, in_context_len=config.in_context_len,
        in_context_start=config.in_context_start,
    )


def official_adapter_kwargs(config) -> dict:
    """Official `MaskedTransformerAdapter(...)` keyword arguments for a MaskedTransformerAdapter config."""
    return dict(
        input_size=config.sample_size, patch_size=config.patch_size, out_channels=config.out_channels,
        hidden_size=config.hidden_size, depth=config.num_layers, num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio, in_context_len=config.in_context_len, num_classes=config.num_classes,
    )


def official_denoiser_args(transformer_config, **overrides):
    """The official Denoiser's argparse namespace (main_pixelREPA.py defaults) for the benchmark's models.

    The backbone and adapter are registered by `register_official_models` under the names "benchmark-jit" and
    "benchmark-mta".
    """
    args = dict(
        model="benchmark-jit", mta="benchmark-mta", img_size=transformer_config.sample_size,
        class_num=transformer_config.num_classes, attn_dropout=transformer_config.attention_dropout,
        proj_dropout=transformer_config.dropout, patch_mask_ratio=0.2, label_drop_prob=0.1, P_mean=-0.8,
        P_std=0.8, t_eps=0.05, noise_scale=1.0, ema_decay1=0.9999, ema_decay2=0.9996,
        repa_model="vit_base_patch14_dinov2.lvd142m", repa_image_size=transformer_config.sample_size,
        repa_patch_size=transformer_config.patch_size, sampling_method="heun", num_sampling_steps=50, cfg=1.0,
        interval_min=0.1, interval_max=1.0,
    )
    return types.SimpleNamespace(**{**args, **overrides})


def register_official_models(model_module, transformer_config, adapter_config) -> None:
    """Registers the benchmark's backbone and adapter shapes in the official model tables."""
    jit_kwargs = official_jit_kwargs(transformer_config)
    adapter_kwargs = official_adapter_kwargs(adapter_config)
    for key in ("input_size", "in_channels", "num_classes", "attn_drop", "proj_drop"):
        jit_kwargs.pop(key)
    for key in ("input_size", "out_channels", "num_classes"):
        adapter_kwargs.pop(key)
    model_module.JiT_models["benchmark-jit"] = lambda **kwargs: model_module.JiT(**jit_kwargs, **kwargs)
    model_module.MaskedTransformerAdapter_models["benchmark-mta"] = (
        lambda **kwargs: model_module.MaskedTransformerAdapter(**adapter_kwargs, **kwargs)
    )


# ---------------------------------------------------------------------------------------------------------------
# Weights and baselines of our own


@torch.no_grad()
def randomize_parameters_(module: nn.Module, seed: int) -> None:
    """Non-degenerate random weights (the official init zeroes the outputs): matrices N(0, 1/fan_in), norm weights
    1 + N(0, 0.01), everything else N(0, 0.01); frozen parameters (the official pos_embed) are left alone."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        draw = torch.randn(parameter.shape, generator=generator)
        if parameter.ndim >= 2 and parameter.shape[0] > 1 and parameter.shape[1] > 1:
            value = draw * math.prod(parameter.shape[1:]) ** -0.5
        elif parameter.ndim == 1 and name.endswith("weight"):
            value = 1.0 + 0.1 * draw
        else:
            value = 0.1 * draw
        parameter.copy_(value)


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


def run_benchmark_cli(args, run, report) -> int:
    """A benchmark CLI's body: `run(args)`, print its report and write `--output_json`; bad input is one line."""
    try:
        results = run(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report(results)
    if args.output_json is not None:
        with open(args.output_json, "w") as file:
            json.dump(results, file, indent=2)
    return 0

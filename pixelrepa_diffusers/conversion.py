"""Conversion of official PixelREPA / JiT checkpoints (checkpoint-last.pth) to diffusers pipelines."""

import argparse
import os
import pickle
import re
import shutil
import tempfile
import zipfile

import torch

from .adapter_pixelrepa import MaskedTransformerAdapter
from .hub import CARD_VARIANTS, render_model_card, variant_card_settings
from .pipeline_pixelrepa import PixelREPAPipeline
from .scheduling_jit_flow_match import JiTFlowMatchScheduler
from .transformer_jit import JIT_PRESETS, JiTTransformer2DModel

# The only non-tensor class an official checkpoint holds: its training args.
CHECKPOINT_ALLOWED_GLOBALS = [argparse.Namespace]
WEIGHT_ENTRIES = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}

# (official key pattern, our key), applied in order to backbone and adapter keys.
KEY_RENAMES = [
    (r"^t_embedder\.mlp\.0\.", "timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "timestep_embedder.linear_2."),
    (r"^y_embedder\.embedding_table\.", "class_embedding."),
    (r"^x_embedder\.proj1\.", "patch_embed.proj_in."),
    (r"^x_embedder\.proj2\.", "patch_embed.proj_out."),
    (r"^in_context_posemb$", "in_context_pos_embed"),
    (r"\.attn\.qkv\.", ".attn.to_qkv."),
    (r"\.attn\.q_norm\.", ".attn.norm_q."),
    (r"\.attn\.k_norm\.", ".attn.norm_k."),
    (r"\.attn\.proj\.", ".attn.to_out."),
    (r"\.mlp\.w12\.", ".ff.proj_in."),
    (r"\.mlp\.w3\.", ".ff.proj_out."),
    (r"\.adaLN_modulation\.1\.", ".adaln_modulation."),
    (r"^final_layer\.norm_final\.", "final_layer.norm."),
    (r"^projection_layer\.mlp\.0\.", "projection.linear_1."),
    (r"^projection_layer\.mlp\.1\.", "projection.norm."),
    (r"^projection_layer\.mlp\.3\.", "projection.linear_2."),
]


def load_official_checkpoint(path: str) -> dict:
    """Loads an official checkpoint without running pickled code; ValueError if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist.")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"Refusing to load {path!r}: it holds objects outside the allow-list ({first_line})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path!r} is not a readable torch checkpoint (truncated or corrupt): {error}") from None
    required = ("model", "model_ema1", "model_ema2", "args")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ValueError(f"{path!r} is not an official PixelREPA/JiT checkpoint: expected entries {list(required)}.")
    if not isinstance(checkpoint["args"], argparse.Namespace):
        raise ValueError(f"{path!r} is not an official PixelREPA/JiT checkpoint: 'args' is not a Namespace.")
    return checkpoint


def rename_official_keys(state_dict: dict, prefix: str = "") -> dict:
    """Our key names for the official keys under `prefix` (which is stripped)."""
    renamed = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        for pattern, replacement in KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def backbone_state_dict(checkpoint: dict, weights: str) -> dict:
    """The official backbone weights of `weights` (ema1, ema2 or model), in official key names."""
    if weights not in WEIGHT_ENTRIES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_ENTRIES)}, got {weights!r}.")
    if weights == "model":
        return {key[len("net.") :]: value for key, value in checkpoint["model"].items() if key.startswith("net.")}
    return dict(checkpoint[WEIGHT_ENTRIES[weights]])


def infer_transformer_config(state_dict: dict, args: argparse.Namespace, model: str | None = None,
                             in_context_start: int | None = None) -> dict:
    """JiTTransformer2DModel config from the checkpoint's args and the (official-named) tensor shapes."""
    required = ("x_embedder.proj1.weight", "pos_embed", "y_embedder.embedding_table.weight", "blocks.0.attn.q_norm.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not an official JiT state dict: missing {missing}.")
    bottleneck_dim, in_channels, patch_size, _ = state_dict["x_embedder.proj1.weight"].shape
    _, num_patches, hidden_size = state_dict["pos_embed"].shape
    head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    inner_dim = state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
    num_layers = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    in_context = state_dict.get("in_context_posemb")
    config = dict(
        sample_size=int(round(num_patches**0.5)) * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        mlp_ratio=inner_dim * 1.5 / hidden_size,
        attention_dropout=float(getattr(args, "attn_dropout", 0.0)),
        dropout=float(getattr(args, "proj_dropout", 0.0)),
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        bottleneck_dim=bottleneck_dim,
        in_context_len=0 if in_context is None else in_context.shape[1],
    )
    model = model or getattr(args, "model", None)
    preset = JIT_PRESETS.get(model)
    if preset is not None:
        mismatched = {key: (value, config[key]) for key, value in preset.items()
                      if key not in ("sample_size", "in_context_start") and config[key] != value}
        if mismatched:
            raise ValueError(f"Checkpoint shapes do not match model {model!r}: {mismatched} (preset, checkpoint).")
        config["in_context_start"] = preset["in_context_start"]
    else:
        same_shape = [name for name, value in JIT_PRESETS.items()
                      if all(config[key] == value[key] for key in ("hidden_size", "num_layers", "num_attention_heads"))]
        if same_shape:
            config["in_context_start"] = JIT_PRESETS[same_shape[0]]["in_context_start"]
    if in_context_start is not None:
        config["in_context_start"] = in_context_start
    if "in_context_start" not in config:
        raise ValueError(f"Model {model!r} matches no preset and in_context_start cannot be read from shapes; pass it.")
    return config


def infer_adapter_config(state_dict: dict, transformer_config: dict) -> dict:
    """MaskedTransformerAdapter config from official adapter weights (keys without the module prefix)."""
    hidden_size = state_dict["in_context_posemb"].shape[-1]
    return dict(
        sample_size=transformer_config["sample_size"],
        patch_size=transformer_config["patch_size"],
        hidden_size=hidden_size,
        num_layers=len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")}),
        num_attention_heads=hidden_size // state_dict["blocks.0.attn.q_norm.weight"].shape[0],
        mlp_ratio=state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2 * 1.5 / hidden_size,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        in_context_len=state_dict["in_context_posemb"].shape[1],
        out_channels=state_dict["projection_layer.mlp.3.weight"].shape[0],
    )


def load_into(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Loads `state_dict` strictly, naming missing/unexpected keys in a ValueError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}.")
    model.load_state_dict(state_dict)


def imagenet_id2label(num_classes: int) -> dict[int, str]:
    """ImageNet-1k class names (torchvision's list) when the model has 1000 classes, else no names."""
    if num_classes != 1000:
        return {}
    from torchvision.models import ResNet50_Weights

    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def convert_official_checkpoint(checkpoint_path: str, output_dir: str, weights: str = "ema1",
                                model: str | None = None, in_context_start: int | None = None,
                                guidance_scale: float | None = None) -> PixelREPAPipeline:
    """
    Writes a PixelREPAPipeline (safetensors) converted from an official checkpoint to `output_dir`, plus the
    adapter in `output_dir/adapter` when the checkpoint has one, so training can resume from it.
    """
    checkpoint = load_official_checkpoint(checkpoint_path)
    args = checkpoint["args"]
    official_backbone = backbone_state_dict(checkpoint, weights)
    config = infer_transformer_config(official_backbone, args, model, in_context_start)
    transformer = JiTTransformer2DModel(**config)
    load_into(transformer, rename_official_keys(official_backbone), "transformer")

    adapter_prefix = "masked_transformer_adapter."
    official_adapter = {key[len(adapter_prefix) :]: value for key, value in checkpoint["model"].items()
                        if key.startswith(adapter_prefix)}
    adapter = None
    if official_adapter:
        adapter = MaskedTransformerAdapter(**infer_adapter_config(official_adapter, config))
        adapter_state = rename_official_keys(official_adapter)
        if adapter.projection is None:
            adapter_state = {key: value for key, value in adapter_state.items() if not key.startswith("projection.")}
        load_into(adapter, adapter_state, "adapter")

    preset_name = model or getattr(args, "model", None)
    method = "PixelREPA" if adapter is not None else "JiT"
    variant = f"{method}-{preset_name.split('-', 1)[-1]}" if preset_name in JIT_PRESETS else None
    if variant in CARD_VARIANTS:
        card_settings = variant_card_settings(variant, repo_id=f"<user>/{os.path.basename(os.path.abspath(output_dir))}")
        guidance_interval = (0.1, 1.0)
    else:
        card_settings = dict(
            model_name=os.path.basename(os.path.abspath(output_dir)),
            repo_id=f"<user>/{os.path.basename(os.path.abspath(output_dir))}",
            method=method,
            architecture=config,
            training={key: str(value) for key, value in sorted(vars(args).items())},
            weights_source=f"Converted from an official checkpoint ({weights} weights) with pixelrepa-diffusers.",
            guidance_scale=float(getattr(args, "cfg", 1.0)),
        )
        guidance_interval = (float(getattr(args, "interval_min", 0.1)), float(getattr(args, "interval_max", 1.0)))
    if guidance_scale is not None:
        card_settings["guidance_scale"] = guidance_scale
    scheduler = JiTFlowMatchScheduler(
        solver=getattr(args, "sampling_method", "heun"),
        t_eps=float(getattr(args, "t_eps", 0.05)),
        noise_scale=float(getattr(args, "noise_scale", 1.0)),
    )
    card = render_model_card(**card_settings, guidance_interval=guidance_interval, solver=scheduler.config.solver,
                             noise_scale=scheduler.config.noise_scale)
    pipeline = PixelREPAPipeline(
        transformer=transformer,
        scheduler=scheduler,
        id2label=imagenet_id2label(config["num_classes"]),
        guidance_scale=card_settings["guidance_scale"],
        guidance_interval=guidance_interval,
    )
    write_atomically(output_dir, lambda tmp: save_converted(tmp, pipeline, adapter, card))
    return pipeline


def save_converted(directory: str, pipeline: PixelREPAPipeline, adapter: MaskedTransformerAdapter | None,
                   card) -> None:
    pipeline.save_pretrained(directory, safe_serialization=True)
    card.save(os.path.join(directory, "README.md"))
    if adapter is not None:
        adapter.save_pretrained(os.path.join(directory, "adapter"), safe_serialization=True)


def write_atomically(output_dir: str, write) -> None:
    """Calls write(tmp_dir) and then moves tmp_dir to output_dir, so output_dir is complete or absent."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        write(tmp_dir)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

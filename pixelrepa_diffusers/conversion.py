"""Conversion of official PixelREPA / JiT checkpoints (checkpoint-last.pth) to diffusers pipelines."""

import argparse
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile

import torch
from safetensors.torch import save_file

from .adapter_pixelrepa import MaskedTransformerAdapter
from .hub import CARD_VARIANTS, render_model_card, variant_card_settings
from .pipeline_pixelrepa import PixelREPAPipeline
from .scheduling_jit_flow_match import JiTFlowMatchScheduler
from .training_utils import OPTIMIZER_MOMENTS_NAME, TRAINING_STATE_NAME, load_into
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


def official_trainable_names(model_state: dict) -> list[str]:
    """
    The official run's trainable parameters (Denoiser names) in the order of its AdamW state: util/misc.py
    add_weight_decay puts 1-D parameters and biases in the first group, the rest in the second.
    """
    trainable = [key for key in model_state
                 if key.startswith(("net.", "masked_transformer_adapter.")) and key != "net.pos_embed"]
    no_decay = [key for key in trainable if model_state[key].ndim == 1 or key.endswith(".bias")]
    return no_decay + [key for key in trainable if key not in set(no_decay)]


def training_parameter_name(official_name: str) -> str:
    """Our PixelREPATrainingObjective parameter name for an official Denoiser parameter name."""
    for official_prefix, prefix in (("net.", "transformer."), ("masked_transformer_adapter.", "aligner.")):
        if official_name.startswith(official_prefix):
            return prefix + next(iter(rename_official_keys({official_name: None}, official_prefix)))
    raise ValueError(f"{official_name!r} is neither a backbone nor an adapter parameter.")


def official_adamw_moments(checkpoint: dict, parameter_names: set[str]) -> dict[str, torch.Tensor]:
    """
    The official AdamW state as `<our parameter name>.<step|exp_avg|exp_avg_sq>` tensors, for every parameter in
    `parameter_names`; official parameters we do not have (the adapter's unused projection head) are left out.
    """
    optimizer = checkpoint.get("optimizer")
    if not isinstance(optimizer, dict) or not optimizer.get("state"):
        raise ValueError("the checkpoint has no AdamW state ('optimizer' is missing or empty), so the run cannot be "
                         "continued; use --init_from_pretrained on a converted pipeline to fine-tune instead.")
    names = official_trainable_names(checkpoint["model"])
    indices = [index for group in optimizer["param_groups"] for index in group["params"]]
    if indices != list(range(len(names))):
        raise ValueError(f"the optimizer state holds {len(indices)} parameters but the model has {len(names)} "
                         "trainable ones; it was not saved by the official code from this model.")
    moments = {}
    for index, official_name in enumerate(names):
        name = training_parameter_name(official_name)
        if name not in parameter_names:
            continue
        if index not in optimizer["state"]:
            raise ValueError(f"the optimizer state has no moments for {official_name!r}.")
        for field in ("step", "exp_avg", "exp_avg_sq"):
            moments[f"{name}.{field}"] = torch.as_tensor(optimizer["state"][index][field], dtype=torch.float32)
    missing = sorted(parameter_names - {key.rsplit(".", 1)[0] for key in moments})
    if missing:
        raise ValueError(f"the official checkpoint has no parameter for {missing[:5]}.")
    return moments


def convert_official_training_checkpoint(checkpoint_path: str, output_dir: str, model: str | None = None,
                                         in_context_start: int | None = None) -> None:
    """
    Writes a training checkpoint that `train_pixelrepa.py --resume_from_checkpoint` continues: the raw weights as
    the trained transformer, ema1 and ema2 as the two EMAs, the adapter, the AdamW moments mapped to our parameters,
    and the number of finished epochs.
    """
    checkpoint = load_official_checkpoint(checkpoint_path)
    args = checkpoint["args"]
    if "epoch" not in checkpoint:
        raise ValueError(f"{checkpoint_path!r} has no 'epoch' entry, so the run cannot be continued.")
    folders = {}
    for folder, weights in (("transformer", "model"), ("ema_1", "ema1"), ("ema_2", "ema2")):
        official_backbone = backbone_state_dict(checkpoint, weights)
        config = infer_transformer_config(official_backbone, args, model, in_context_start)
        folders[folder] = JiTTransformer2DModel(**config)
        load_into(folders[folder], rename_official_keys(official_backbone), folder)
    adapter_prefix = "masked_transformer_adapter."
    official_adapter = {key[len(adapter_prefix) :]: value for key, value in checkpoint["model"].items()
                        if key.startswith(adapter_prefix)}
    if official_adapter:
        adapter = MaskedTransformerAdapter(**infer_adapter_config(official_adapter, config))
        adapter_state = rename_official_keys(official_adapter)
        if adapter.projection is None:
            adapter_state = {key: value for key, value in adapter_state.items() if not key.startswith("projection.")}
        load_into(adapter, adapter_state, "adapter")
        folders["adapter"] = adapter
    parameter_names = {f"transformer.{name}" for name, _ in folders["transformer"].named_parameters()}
    if not official_adapter:
        parameter_names.discard("transformer.mask_token")  # trained only with the adapter
    else:
        parameter_names |= {f"aligner.{name}" for name, _ in folders["adapter"].named_parameters()}
    moments = official_adamw_moments(checkpoint, parameter_names)
    run_state = {
        "official_epochs": int(checkpoint["epoch"]) + 1,
        "alignment": "pixelrepa" if official_adapter else "none",
        "ema_decays": [float(args.ema_decay1), float(args.ema_decay2)],
        "official_args": {key: str(value) for key, value in sorted(vars(args).items())},
    }

    def write(directory):
        for name, module in folders.items():
            module.save_pretrained(os.path.join(directory, name), safe_serialization=True)
        save_file(moments, os.path.join(directory, OPTIMIZER_MOMENTS_NAME))
        with open(os.path.join(directory, TRAINING_STATE_NAME), "w") as file:
            json.dump(run_state, file, indent=2)

    write_atomically(output_dir, write)

"""Conversion of official PixelREPA / JiT checkpoints (checkpoint-last.pth) to diffusers pipelines."""

import argparse
import dataclasses
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
from .alignment import ALIGNMENTS
from .hub import CARD_METHODS, CARD_VARIANTS, CardSettings, render_model_card, variant_card_settings
from .pipeline_pixelrepa import PixelREPAPipeline
from .scheduling_jit_flow_match import JiTFlowMatchScheduler
from .serialization import pickled_code_refusal
from .training_utils import OPTIMIZER_MOMENTS_NAME, TRAINING_STATE_NAME, load_into, submodule_state
from .transformer_jit import JIT_PRESETS, JiTTransformer2DModel, swiglu_inner_dim

# The only non-tensor class an official checkpoint holds: its training args.
CHECKPOINT_ALLOWED_GLOBALS = [argparse.Namespace]
WEIGHT_ENTRIES = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}
# Official save formats (util/misc.py save_model of each codebase), and the alignment method each one trains.
FORMAT_ALIGNMENTS = {"pixelrepa": ALIGNMENTS["pixelrepa"], "jit": ALIGNMENTS["none"]}
ADAPTER_PREFIX = "masked_transformer_adapter."
# A JiT checkpoint has no mask_token; ours is drawn as the official init N(0, 0.02) from this seed.
MASK_TOKEN_SEED = 0
# What the official preset functions (JiT_B_16, ...) fix besides JIT_PRESETS: 32 in-context tokens, mlp_ratio 4.
PRESET_FIELDS = ("patch_size", "bottleneck_dim", "hidden_size", "num_attention_heads", "num_layers")
PRESET_IN_CONTEXT_LEN = 32
PRESET_MLP_RATIO = 4.0

# Our config field -> the official name: of the JiT / MaskedTransformerAdapter constructor argument
# (model_pixelREPA.py, model_jit.py), and of the Denoiser argument (main_pixelREPA.py) for those it takes.
OFFICIAL_NAMES = dict(
    sample_size="input_size", patch_size="patch_size", in_channels="in_channels", out_channels="out_channels",
    hidden_size="hidden_size", num_layers="depth", num_attention_heads="num_heads", mlp_ratio="mlp_ratio",
    attention_dropout="attn_drop", dropout="proj_drop", num_classes="num_classes", bottleneck_dim="bottleneck_dim",
    in_context_len="in_context_len", in_context_start="in_context_start",
)
OFFICIAL_DENOISER_NAMES = dict(sample_size="img_size", num_classes="class_num", attention_dropout="attn_dropout",
                               dropout="proj_dropout")

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


# torch.save writes a zip archive; its legacy format, and pickles, start with the PROTO opcode (pickle.PROTO).
ZIP_MAGIC = b"PK\x03\x04"


def load_official_checkpoint(path: str) -> dict:
    """Loads an official PixelREPA or JiT checkpoint without running pickled code; ValueError if it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist.")
    with open(path, "rb") as file:
        header = file.read(4)
    if not header.startswith((ZIP_MAGIC, pickle.PROTO)):
        raise ValueError(f"{path!r} is not a torch checkpoint: neither the zip archive of torch.save nor a pickle.")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickled_code_refusal(repr(path), error) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path!r} is not a readable torch checkpoint (truncated or corrupt): {error}") from None
    required = ("model", "args")
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in required):
        raise ValueError(f"{path!r} is not an official PixelREPA/JiT checkpoint: expected entries {list(required)}.")
    if not isinstance(checkpoint["args"], argparse.Namespace):
        raise ValueError(f"{path!r} is not an official PixelREPA/JiT checkpoint: 'args' is not a Namespace.")
    checkpoint_format(checkpoint)
    return checkpoint


def checkpoint_format(checkpoint: dict) -> str:
    """
    "pixelrepa" (kaist-cvml/PixelREPA: `model` holds `net.*` with `net.mask_token` and the adapter, the EMAs hold
    backbone keys without prefix) or "jit" (LTH14/JiT: no adapter or mask_token, every entry has `net.*` keys).
    """
    model_keys = checkpoint["model"].keys()
    has_adapter = any(key.startswith(ADAPTER_PREFIX) for key in model_keys)
    has_mask_token = "net.mask_token" in model_keys
    if has_adapter != has_mask_token:
        raise ValueError(
            f"The checkpoint's 'model' fits neither official format: it has {'' if has_adapter else 'no '}"
            f"{ADAPTER_PREFIX}* keys but {'' if has_mask_token else 'no '}net.mask_token."
        )
    return "pixelrepa" if has_adapter else "jit"


def backbone_state_dict(checkpoint: dict, weights: str) -> dict:
    """The backbone weights of `weights` (ema1, ema2 or model) in official key names without prefix, either format."""
    if weights not in WEIGHT_ENTRIES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_ENTRIES)}, got {weights!r}.")
    entry = WEIGHT_ENTRIES[weights]
    if entry not in checkpoint:
        held = sorted(key for key in WEIGHT_ENTRIES.values() if key in checkpoint)
        raise ValueError(f"The checkpoint has no {entry!r} entry for weights {weights!r}; it holds {held}.")
    if weights == "model" or checkpoint_format(checkpoint) == "jit":
        return submodule_state(checkpoint[entry], "net.")
    return dict(checkpoint[entry])


def adapter_state_dict(checkpoint: dict) -> dict:
    """The PixelREPA adapter weights (trained weights; no EMA exists) in official key names; empty for JiT."""
    return submodule_state(checkpoint["model"], ADAPTER_PREFIX)


def initial_mask_token(hidden_size: int) -> torch.Tensor:
    """The official mask_token init N(0, 0.02) of shape (1, 1, hidden_size), drawn from `MASK_TOKEN_SEED`."""
    generator = torch.Generator().manual_seed(MASK_TOKEN_SEED)
    return 0.02 * torch.randn(1, 1, hidden_size, generator=generator)


def rename_official_keys(state_dict: dict, prefix: str = "") -> dict:
    """Our key names for the official keys under `prefix` (which is stripped)."""
    renamed = {}
    for key, value in submodule_state(state_dict, prefix).items():
        for pattern, replacement in KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def official_kwargs(config, names: dict = OFFICIAL_NAMES) -> dict:
    """The official arguments (named by `names`) for the fields of our config that have one."""
    return {official: config[ours] for ours, official in names.items() if ours in config}


def read_shapes(state_dict: dict) -> dict:
    """Each shape-derived JiT field -> (value, the official tensor it is read from, that tensor's shape)."""
    required = ("x_embedder.proj1.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not an official JiT state dict: missing {missing}.")

    def shape(key):
        return tuple(state_dict[key].shape) if key in state_dict else "(absent)"

    bottleneck_dim, in_channels, patch_size, _ = shape("x_embedder.proj1.weight")
    _, num_patches, hidden_size = shape("pos_embed")
    num_layers = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    in_context = shape("in_context_posemb")
    return dict(
        patch_size=(patch_size, "x_embedder.proj1.weight", shape("x_embedder.proj1.weight")),
        in_channels=(in_channels, "x_embedder.proj1.weight", shape("x_embedder.proj1.weight")),
        bottleneck_dim=(bottleneck_dim, "x_embedder.proj1.weight", shape("x_embedder.proj1.weight")),
        sample_size=(int(round(num_patches**0.5)) * patch_size, "pos_embed", shape("pos_embed")),
        hidden_size=(hidden_size, "pos_embed", shape("pos_embed")),
        num_attention_heads=(hidden_size // shape("blocks.0.attn.q_norm.weight")[0], "blocks.0.attn.q_norm.weight",
                             shape("blocks.0.attn.q_norm.weight")),
        num_layers=(num_layers, "blocks.*", f"({num_layers} blocks)"),
        ff_inner_dim=(shape("blocks.0.mlp.w12.weight")[0] // 2, "blocks.0.mlp.w12.weight",
                      shape("blocks.0.mlp.w12.weight")),
        in_context_len=(0 if in_context == "(absent)" else in_context[1], "in_context_posemb", in_context),
        num_classes=(shape("y_embedder.embedding_table.weight")[0] - 1, "y_embedder.embedding_table.weight",
                     shape("y_embedder.embedding_table.weight")),
    )


def preset_mismatches(shapes: dict, preset_name: str) -> list[str]:
    """What in `read_shapes` output differs from what the official preset function builds, naming the tensors."""
    preset = JIT_PRESETS[preset_name]
    expected = {field: preset[field] for field in PRESET_FIELDS}
    expected.update(in_channels=3, in_context_len=PRESET_IN_CONTEXT_LEN,
                    ff_inner_dim=swiglu_inner_dim(preset["hidden_size"], PRESET_MLP_RATIO))
    return [f"{field} {shapes[field][0]} from {shapes[field][1]} {shapes[field][2]}, expected {value}"
            for field, value in expected.items() if shapes[field][0] != value]


def ff_width_config(hidden_size: int, inner_dim: int) -> dict:
    """mlp_ratio 4 alone when the official rule gives `inner_dim`, else also the width itself as ff_inner_dim."""
    if swiglu_inner_dim(hidden_size, PRESET_MLP_RATIO) == inner_dim:
        return dict(mlp_ratio=PRESET_MLP_RATIO, ff_inner_dim=None)
    return dict(mlp_ratio=PRESET_MLP_RATIO, ff_inner_dim=inner_dim)


def infer_transformer_config(state_dict: dict, args: argparse.Namespace, model: str | None = None,
                             in_context_start: int | None = None) -> dict:
    """JiTTransformer2DModel config from the checkpoint's args and the (official-named) tensor shapes."""
    shapes = read_shapes(state_dict)
    config = {field: shapes[field][0] for field in ("sample_size", "patch_size", "in_channels", "hidden_size",
                                                    "num_layers", "num_attention_heads")}
    config.update(ff_width_config(shapes["hidden_size"][0], shapes["ff_inner_dim"][0]))
    config.update(
        attention_dropout=float(getattr(args, OFFICIAL_DENOISER_NAMES["attention_dropout"], 0.0)),
        dropout=float(getattr(args, OFFICIAL_DENOISER_NAMES["dropout"], 0.0)),
        num_classes=shapes["num_classes"][0],
        bottleneck_dim=shapes["bottleneck_dim"][0],
        in_context_len=shapes["in_context_len"][0],
    )
    model = model or getattr(args, "model", None)
    if model in JIT_PRESETS:
        mismatches = preset_mismatches(shapes, model)
        if mismatches:
            raise ValueError(f"Checkpoint shapes do not match model {model!r}: {'; '.join(mismatches)}.")
        config["in_context_start"] = JIT_PRESETS[model]["in_context_start"]
    else:
        mismatches = {name: preset_mismatches(shapes, name) for name in JIT_PRESETS}
        nearest = min(mismatches, key=lambda name: len(mismatches[name]))
        if not mismatches[nearest]:
            config["in_context_start"] = JIT_PRESETS[nearest]["in_context_start"]
        elif in_context_start is None:
            raise ValueError(
                f"Model {model!r} matches no JiT variant (nearest {nearest}: {'; '.join(mismatches[nearest])}) and "
                "in_context_start cannot be read from shapes; pass in_context_start."
            )
    if in_context_start is not None:
        config["in_context_start"] = in_context_start
    return config


def infer_adapter_config(state_dict: dict, transformer_config: dict) -> dict:
    """MaskedTransformerAdapter config from official adapter weights (keys without the module prefix)."""
    required = ("in_context_posemb", "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight",
                "y_embedder.embedding_table.weight", "projection_layer.mlp.3.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"Not an official PixelREPA adapter state dict: missing {missing}.")
    hidden_size = state_dict["in_context_posemb"].shape[-1]
    return dict(
        sample_size=transformer_config["sample_size"],
        patch_size=transformer_config["patch_size"],
        hidden_size=hidden_size,
        num_layers=len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")}),
        num_attention_heads=hidden_size // state_dict["blocks.0.attn.q_norm.weight"].shape[0],
        **ff_width_config(hidden_size, state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2),
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        in_context_len=state_dict["in_context_posemb"].shape[1],
        out_channels=state_dict["projection_layer.mlp.3.weight"].shape[0],
    )


def transformer_from_checkpoint(checkpoint: dict, weights: str = "ema1", model: str | None = None,
                                in_context_start: int | None = None) -> JiTTransformer2DModel:
    """
    Our JiTTransformer2DModel with the backbone weights `weights` (ema1, ema2 or model) of an official checkpoint of
    either format; a JiT checkpoint has no mask_token, so it gets `initial_mask_token`.
    """
    official_backbone = backbone_state_dict(checkpoint, weights)
    config = infer_transformer_config(official_backbone, checkpoint["args"], model, in_context_start)
    transformer = JiTTransformer2DModel(**config)
    state = rename_official_keys(official_backbone)
    if checkpoint_format(checkpoint) == "jit":
        state["mask_token"] = initial_mask_token(config["hidden_size"])
    load_into(transformer, state, "transformer")
    return transformer


def adapter_from_checkpoint(checkpoint: dict, transformer_config: dict) -> MaskedTransformerAdapter | None:
    """Our MaskedTransformerAdapter with a PixelREPA checkpoint's adapter weights; None for a JiT checkpoint."""
    official_adapter = adapter_state_dict(checkpoint)
    if not official_adapter:
        return None
    adapter = MaskedTransformerAdapter(**infer_adapter_config(official_adapter, transformer_config))
    state = rename_official_keys(official_adapter)
    if adapter.projection is None:
        state = {key: value for key, value in state.items() if not key.startswith("projection.")}
    load_into(adapter, state, "adapter")
    return adapter


def imagenet_id2label(num_classes: int) -> dict[int, str]:
    """ImageNet-1k class names (torchvision's list) when the model has 1000 classes, else no names."""
    if num_classes != 1000:
        return {}
    from torchvision.models import ResNet50_Weights

    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def official_variant(checkpoint: dict, model: str | None = None) -> str | None:
    """The name ("PixelREPA-B/16", "JiT-H/32", ...) of the released variant a checkpoint is of, else None."""
    method = CARD_METHODS[FORMAT_ALIGNMENTS[checkpoint_format(checkpoint)].name]
    key = (method, model or getattr(checkpoint["args"], "model", None))
    return CARD_VARIANTS[key]["name"] if key in CARD_VARIANTS else None


def convert_official_checkpoint(checkpoint_path: str, output_dir: str, weights: str = "ema1",
                                model: str | None = None, in_context_start: int | None = None,
                                guidance_scale: float | None = None) -> PixelREPAPipeline:
    """
    Writes a PixelREPAPipeline (safetensors) converted from an official PixelREPA or JiT checkpoint to `output_dir`,
    plus the adapter in `output_dir/adapter` when the checkpoint has one, so training can resume from it. A released
    variant gets its published sampler settings; any other model those of the checkpoint's args.
    """
    checkpoint = load_official_checkpoint(checkpoint_path)
    args = checkpoint["args"]
    transformer = transformer_from_checkpoint(checkpoint, weights, model, in_context_start)
    config = {key: value for key, value in transformer.config.items() if not key.startswith("_")}
    adapter = adapter_from_checkpoint(checkpoint, config)

    method = CARD_METHODS[FORMAT_ALIGNMENTS[checkpoint_format(checkpoint)].name]
    variant = official_variant(checkpoint, model)
    repo_id = f"<user>/{os.path.basename(os.path.abspath(output_dir))}"
    if variant is not None:
        card_settings = variant_card_settings(variant, repo_id=repo_id, weights=weights)
    else:
        card_settings = CardSettings(
            model_name=os.path.basename(os.path.abspath(output_dir)),
            repo_id=repo_id,
            method=method,
            architecture=config,
            training={key: str(value) for key, value in sorted(vars(args).items())},
            weights_source=f"Converted from an official checkpoint ({weights} weights) with pixelrepa-diffusers.",
            guidance_scale=float(getattr(args, "cfg", 1.0)),
            guidance_interval=(float(getattr(args, "interval_min", 0.1)), float(getattr(args, "interval_max", 1.0))),
            solver=getattr(args, "sampling_method", "heun"),
            noise_scale=float(getattr(args, "noise_scale", 1.0)),
        )
    if guidance_scale is not None:
        card_settings = dataclasses.replace(card_settings, guidance_scale=guidance_scale)
    scheduler = JiTFlowMatchScheduler(
        solver=card_settings.solver,
        t_eps=float(getattr(args, "t_eps", 0.05)),
        noise_scale=card_settings.noise_scale,
    )
    card = render_model_card(card_settings)
    pipeline = PixelREPAPipeline(
        transformer=transformer,
        scheduler=scheduler,
        id2label=imagenet_id2label(config["num_classes"]),
        guidance_scale=card_settings.guidance_scale,
        guidance_interval=card_settings.guidance_interval,
    )
    write_atomically(output_dir, lambda tmp: save_converted(tmp, pipeline, adapter, card))
    return pipeline


def save_converted(directory: str, pipeline: PixelREPAPipeline, adapter: MaskedTransformerAdapter | None,
                   card) -> None:
    pipeline.save_pretrained(directory, safe_serialization=True)
    card.save(os.path.join(directory, "README.md"))
    if adapter is not None:
        adapter.save_pretrained(os.path.join(directory, ALIGNMENTS["pixelrepa"].folder), safe_serialization=True)


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
    trainable = [key for key in model_state if key.startswith(("net.", ADAPTER_PREFIX)) and key != "net.pos_embed"]
    no_decay = [key for key in trainable if model_state[key].ndim == 1 or key.endswith(".bias")]
    return no_decay + [key for key in trainable if key not in set(no_decay)]


def training_parameter_name(official_name: str) -> str:
    """Our JiTTrainingObjective parameter name for an official Denoiser parameter name."""
    for official_prefix, prefix in (("net.", "transformer."), (ADAPTER_PREFIX, "aligner.")):
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
    folders = {folder: transformer_from_checkpoint(checkpoint, weights, model, in_context_start)
               for folder, weights in (("transformer", "model"), ("ema_1", "ema1"), ("ema_2", "ema2"))}
    adapter = adapter_from_checkpoint(checkpoint, dict(folders["transformer"].config))
    method = FORMAT_ALIGNMENTS[checkpoint_format(checkpoint)]
    parameter_names = {f"transformer.{name}" for name, _ in folders["transformer"].named_parameters()}
    if not method.masks_tokens:
        parameter_names.discard("transformer.mask_token")  # trained only by a method that masks tokens
    if adapter is not None:
        folders[method.folder] = adapter
        parameter_names |= {f"aligner.{name}" for name, _ in adapter.named_parameters()}
    moments = official_adamw_moments(checkpoint, parameter_names)
    run_state = {
        "official_epochs": int(checkpoint["epoch"]) + 1,
        "alignment": method.name,
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

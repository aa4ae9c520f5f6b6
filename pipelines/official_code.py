"""The official PixelREPA and JiT code, for the benchmarks and the fixture maker: its sources from an external
checkout, imported to run here (off CUDA: on CPU, eagerly), its model tables and Denoiser arguments for our configs,
and random weights in its key layout.

Importing the official code patches torch globally (see `import_official`): run it in a process of its own.
"""

import importlib
import math
import subprocess
import sys
import types
import warnings
from pathlib import Path

import torch

from pixelrepa_diffusers.conversion import OFFICIAL_DENOISER_NAMES, official_kwargs

# Each codebase's sources and the modules imported from them (name in the returned namespace -> module).
CODEBASES = dict(
    pixelrepa=dict(
        files=("model_pixelREPA.py", "denoiser_pixelREPA.py", "util/model_util.py", "util/misc.py",
               "util/lr_sched.py"),
        modules=dict(model="model_pixelREPA", denoiser="denoiser_pixelREPA", misc="util.misc",
                     lr_sched="util.lr_sched"),
    ),
    jit=dict(files=("model_jit.py", "denoiser.py", "util/model_util.py"),
             modules=dict(model="model_jit", denoiser="denoiser")),
)
# The names `register_official_models` gives our shapes in the official model tables.
OFFICIAL_MODEL, OFFICIAL_ADAPTER = "benchmark-jit", "benchmark-mta"
# Parameters the random weights draw small (0.1 N(0, 1)) whatever their shape, in the official and our key layouts.
SMALL_PARAMETER_SUFFIXES = ("pos_embed", "in_context_posemb", "in_context_pos_embed", "mask_token")


def official_sources(reference_repo, directory, codebase: str = "pixelrepa", commit: str = "HEAD") -> Path:
    """
    The folder holding a codebase's sources: `reference_repo` itself when it holds them (a work tree or a copy),
    else `commit` of the git repository `reference_repo` exported into `directory`.
    """
    reference_repo, files = Path(reference_repo), CODEBASES[codebase]["files"]
    if (reference_repo / files[0]).is_file():
        return reference_repo
    query = subprocess.run(["git", "-C", str(reference_repo), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                           capture_output=True, text=True)
    if query.returncode != 0:
        raise ValueError(f"reference_repo {str(reference_repo)!r} holds neither {files[0]} nor a git repository "
                         f"with commit {commit}.")
    directory = Path(directory)
    for name in files:
        source = subprocess.run(["git", "-C", str(reference_repo), "show", f"{commit}:{name}"],
                                capture_output=True, check=True).stdout
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(source)
    return directory


def import_official(source_dir, create_model, device: torch.device, codebase: str = "pixelrepa"):
    """
    A codebase's modules from `source_dir` (namespace: model, denoiser, and for PixelREPA misc, lr_sched).

    `create_model(model_name, pretrained, img_size, patch_size)` stands in for timm's (it builds the frozen
    alignment encoder). A `util` package imported before (the other codebase's) is dropped first. On CUDA the dynamo
    cache limit is raised as main_pixelREPA.py does, so that the per-block `@torch.compile` stays compiled; off CUDA,
    `Tensor.cuda` becomes the identity, those decorators are undone, and `torch.cuda.amp.autocast(enabled=False)`
    (around the official attention logits) switches autocast off on `device`, so the official code runs eagerly in
    its own precision.
    """
    if device.type == "cuda":
        torch._dynamo.config.cache_size_limit = 128
    else:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.cuda.amp.autocast = lambda enabled: torch.autocast(device.type, enabled=enabled)
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
    for name in [name for name in sys.modules if name == "util" or name.startswith("util.")]:
        del sys.modules[name]
    saved_timm = sys.modules.get("timm")
    sys.modules["timm"] = types.SimpleNamespace(create_model=create_model)
    sys.path.insert(0, str(source_dir))
    try:
        modules = {key: importlib.import_module(name) for key, name in CODEBASES[codebase]["modules"].items()}
    finally:
        sys.path.remove(str(source_dir))
        if saved_timm is None:
            del sys.modules["timm"]
        else:
            sys.modules["timm"] = saved_timm
    if device.type != "cuda":
        for module_class in (modules["model"].JiTBlock, modules["model"].FinalLayer):
            module_class.forward = module_class.forward._torchdynamo_orig_callable
    return types.SimpleNamespace(**modules)


def register_official_models(model_module, transformer_config: dict, adapter_config: dict) -> None:
    """Registers the shapes of a JiTTransformer2DModel and a MaskedTransformerAdapter config in the official model
    tables, as OFFICIAL_MODEL and OFFICIAL_ADAPTER; the official Denoiser passes size, classes and dropouts itself."""
    passed_by_denoiser = ("input_size", "in_channels", "out_channels", "num_classes", "attn_drop", "proj_drop")
    jit_kwargs = {key: value for key, value in official_kwargs(transformer_config).items()
                  if key not in passed_by_denoiser}
    adapter_kwargs = {key: value for key, value in official_kwargs(adapter_config).items()
                      if key not in passed_by_denoiser}
    model_module.JiT_models[OFFICIAL_MODEL] = lambda **kwargs: model_module.JiT(**jit_kwargs, **kwargs)
    model_module.MaskedTransformerAdapter_models[OFFICIAL_ADAPTER] = (
        lambda **kwargs: model_module.MaskedTransformerAdapter(**adapter_kwargs, **kwargs)
    )


def official_denoiser_args(transformer_config: dict, **overrides) -> types.SimpleNamespace:
    """The official Denoiser's argparse namespace (main_pixelREPA.py defaults) for a JiTTransformer2DModel config
    and the models of `register_official_models`."""
    args = dict(
        official_kwargs(transformer_config, OFFICIAL_DENOISER_NAMES), model=OFFICIAL_MODEL, mta=OFFICIAL_ADAPTER,
        patch_mask_ratio=0.2, label_drop_prob=0.1, P_mean=-0.8, P_std=0.8, t_eps=0.05, noise_scale=1.0,
        ema_decay1=0.9999, ema_decay2=0.9996, repa_model="vit_base_patch14_dinov2.lvd142m",
        repa_image_size=transformer_config["sample_size"], repa_patch_size=transformer_config["patch_size"],
        sampling_method="heun", num_sampling_steps=50, cfg=1.0, interval_min=0.1, interval_max=1.0,
    )
    return types.SimpleNamespace(**{**args, **overrides})


def random_official_state_dict(manifest, seed: int) -> dict:
    """Non-degenerate float32 weights (the official init zeroes the outputs) for every (key, shape) of the manifest,
    drawn in manifest order: matrices N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1), the rest 0.1 N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in manifest:
        draw = torch.randn(shape, generator=generator, dtype=torch.float32)
        if key.endswith(SMALL_PARAMETER_SUFFIXES):
            state_dict[key] = 0.1 * draw
        elif len(shape) >= 2:
            state_dict[key] = draw * math.prod(shape[1:]) ** -0.5
        elif key.endswith("weight"):
            state_dict[key] = 1.0 + 0.1 * draw
        else:
            state_dict[key] = 0.1 * draw
    return state_dict


def manifest_of(module: torch.nn.Module) -> list:
    """(key, shape) of every state-dict entry, in state-dict order."""
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


def load_random_state(module: torch.nn.Module, seed: int):
    """Loads `random_official_state_dict` into `module`; returns its manifest and state."""
    manifest = manifest_of(module)
    state = random_official_state_dict(manifest, seed)
    module.load_state_dict(state)
    return manifest, state


@torch.no_grad()
def randomize_trainable_(module: torch.nn.Module, seed: int) -> None:
    """`random_official_state_dict` values for the trainable parameters of `module` (of either key layout); frozen
    ones (the fixed pos_embed) keep theirs."""
    parameters = {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}
    state = random_official_state_dict([(name, tuple(parameter.shape)) for name, parameter in parameters.items()],
                                       seed)
    for name, parameter in parameters.items():
        parameter.copy_(state[name])

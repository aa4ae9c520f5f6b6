"""Loading of the committed official-code fixtures (see tests/fixtures/official/README.md)."""

import inspect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from pipelines.official_code import random_official_state_dict
from pixelrepa_diffusers.conversion import OFFICIAL_NAMES
from tests.official_weights import load_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "official"
# The instruction set that oneDNN is capped to, by ONEDNN_MAX_CPU_ISA in the environment the process starts with,
# wherever a bf16 computation is compared with a committed fixture, and in the fixture maker. oneDNN picks its bf16
# kernels by instruction set, and its AMX and AVX-512 bf16 kernels round apart from the AVX2 path (which leaves bf16
# matrix products to ATen), so fixtures made on one CPU would otherwise fail on another.
BF16_FIXTURE_ISA = "AVX2"


def bf16_isa_problem() -> str | None:
    """Why this process's bf16 kernels are not the ones the bf16 fixtures were made with, or None if they are."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if isa != BF16_FIXTURE_ISA:
        return f"ONEDNN_MAX_CPU_ISA is {isa!r}, expected {BF16_FIXTURE_ISA!r}"
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return (f"ONEDNN_MAX_CPU_ISA={BF16_FIXTURE_ISA} is set but oneDNN still runs bf16 kernels: it was set after "
                "the process started")
    return None


def load_fixture(name: str):
    """(tensors, metadata) of a fixture file; JSON metadata values are decoded."""
    with safe_open(FIXTURES / name, "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata())
    for key in ("config", "cases", "denoiser_args", "args", "net_manifest", "adapter_manifest", "weights_seeds"):
        if key in metadata:
            metadata[key] = json.loads(metadata[key])
    return tensors, metadata


def official_state(tensors: dict, metadata: dict) -> dict:
    """The official-layout state dict of a fixture: stored as state.* or regenerated from its manifest and seed."""
    if metadata.get("manifest", "").endswith(".json"):
        return random_official_state_dict(load_manifest(FIXTURES / metadata["manifest"]), int(metadata["seed"]))
    return {key[len("state.") :]: value for key, value in tensors.items() if key.startswith("state.")}


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def load_variants() -> dict:
    """official_variants.json: the width cases (args, seed, Denoiser manifest) and the released variants' manifests."""
    return json.loads((FIXTURES / "official_variants.json").read_text())


def width_inputs(variant: str, variants: dict, tensors: dict):
    """Noisy image (regenerated from the case seed + image_input_seed_offset), t and y of a width case."""
    case = variants["width_cases"][variant]
    size = case["args"]["img_size"]
    generator = torch.Generator().manual_seed(case["seed"] + variants["image_input_seed_offset"])
    x = torch.randn(1, 3, size, size, generator=generator)
    return x, tensors[f"{variant}.t"], tensors[f"{variant}.y"]


def adapter_tokens(variant: str, variants: dict, hidden_size: int, num_tokens: int):
    """The adapter input tokens of a width case, regenerated from its seed + adapter_input_seed_offset."""
    seed = variants["width_cases"][variant]["seed"] + variants["adapter_input_seed_offset"]
    return torch.randn(1, num_tokens, hidden_size, generator=torch.Generator().manual_seed(seed))


def stored_rows(image, variants: dict):
    """The rows of an image that official_widths.safetensors stores (every row_stride-th at its resolution)."""
    return image[:, :, :: variants["row_stride"][str(image.shape[-1])]]


def our_config(arguments: dict, model_class, names: dict = OFFICIAL_NAMES) -> dict:
    """`model_class`'s config for official arguments (named by `names`); fields it lacks (the adapter's in_channels)
    are left out."""
    fields = inspect.signature(model_class.__init__).parameters
    return {ours: arguments[official] for ours, official in names.items() if official in arguments and ours in fields}

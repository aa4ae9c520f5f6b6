"""Deterministic random weights in the official PixelREPA key layout, for parity tests."""

import json
import math

import torch

SMALL_PARAMETER_SUFFIXES = ("pos_embed", "in_context_posemb", "mask_token")


def load_manifest(path):
    """Read a JSON list of [key, shape] pairs into a list of (key, shape tuple)."""
    with open(path) as file:
        entries = json.load(file)
    return [(key, tuple(shape)) for key, shape in entries]


def random_official_state_dict(manifest, seed):
    """Non-zero float32 weights for every (key, shape) of the manifest, drawn in manifest order."""
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

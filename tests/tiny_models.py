"""The tests' tiny transformer with random weights."""

import torch

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import JiTTransformer2DModel


def random_tiny_transformer(seed: int = 0) -> JiTTransformer2DModel:
    """The tiny config with random non-zero weights (zero-initialised outputs would prove nothing)."""
    torch.manual_seed(seed)
    model = JiTTransformer2DModel(**TINY_CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model.eval()

"""PixelREPA and JiT pixel-space diffusion transformers for diffusers."""

from .adapter_pixelrepa import MaskedTransformerAdapter
from .pipeline_pixelrepa import PRECISIONS, PixelREPAPipeline
from .scheduling_jit_flow_match import JiTFlowMatchScheduler
from .transformer_jit import JIT_PRESETS, JiTAttnProcessor, JiTFP32LogitsAttnProcessor, JiTTransformer2DModel

__all__ = [
    "JIT_PRESETS",
    "PRECISIONS",
    "JiTAttnProcessor",
    "JiTFP32LogitsAttnProcessor",
    "JiTFlowMatchScheduler",
    "JiTTransformer2DModel",
    "MaskedTransformerAdapter",
    "PixelREPAPipeline",
]

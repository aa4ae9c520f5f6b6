"""PixelREPA's Masked Transformer Adapter (Shin, Kim, Shim, arXiv 2603.14366)."""

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_utils import ModelMixin

from .transformer_jit import (
    JiTBlock,
    TimestepEmbedder,
    init_jit_weights,
    preset_config,
    rotary_cos_sin,
    swiglu_inner_dim,
)


# The adapter config fields that come from its backbone's config.
BACKBONE_FIELDS = ("sample_size", "patch_size", "hidden_size", "num_attention_heads", "mlp_ratio", "ff_inner_dim",
                   "num_classes", "in_context_len")


class ProjectionHead(nn.Module):
    """Linear, LayerNorm, SiLU, Linear: maps adapter tokens to the alignment encoder's width."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear_1 = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.norm(self.linear_1(x))))


class MaskedTransformerAdapter(ModelMixin, ConfigMixin, AttentionMixin):
    """
    Two JiT blocks with their own in-context class tokens and t/label embeddings, applied to the (partly masked)
    tokens of the JiT encoder half and aligned to a frozen encoder's patch features. The projection head exists only
    when `hidden_size != out_channels`. Masking is done by the caller with the backbone's `mask_token`. The SwiGLU
    inner width is `ff_inner_dim`, or when None the official `swiglu_inner_dim(hidden_size, mlp_ratio)`.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["JiTBlock"]
    _skip_layerwise_casting_patterns = ["timestep_embedder", "class_embedding"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        hidden_size: int = 768,
        num_layers: int = 2,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        ff_inner_dim: int | None = None,
        num_classes: int = 1000,
        in_context_len: int = 32,
        out_channels: int = 768,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size}).")
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size ({hidden_size}) / num_attention_heads ({num_attention_heads}) must be a multiple of 4."
            )
        self.gradient_checkpointing = False
        self.grid_size = sample_size // patch_size
        self.timestep_embedder = TimestepEmbedder(hidden_size)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        self.in_context_pos_embed = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        if ff_inner_dim is None:
            ff_inner_dim = swiglu_inner_dim(hidden_size, mlp_ratio)
        self.blocks = nn.ModuleList(
            [JiTBlock(hidden_size, num_attention_heads, ff_inner_dim, 0.0, 0.0) for _ in range(num_layers)]
        )
        self.projection = ProjectionHead(hidden_size, out_channels) if hidden_size != out_channels else None
        init_jit_weights(self)

    @classmethod
    def from_transformer_config(cls, config, out_channels: int, **config_overrides) -> "MaskedTransformerAdapter":
        """The official adapter of a backbone: 2 blocks with the width, heads, SwiGLU width, grid and classes of
        `config` (a JiTTransformer2DModel config, or a preset's part of one; absent fields keep the defaults)."""
        shared = {name: config[name] for name in BACKBONE_FIELDS if name in config}
        return cls(**{**shared, "out_channels": out_channels, **config_overrides})

    @classmethod
    def from_preset(cls, backbone: str, out_channels: int, **config_overrides) -> "MaskedTransformerAdapter":
        """The official adapter for a JiT preset name."""
        return cls.from_transformer_config(preset_config(backbone), out_channels, **config_overrides)

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, hidden_size) to features (B, N, out_channels)."""
        label_embedding = self.class_embedding(class_labels)
        conditioning = self.timestep_embedder(timestep) + label_embedding
        in_context_tokens = label_embedding.unsqueeze(1) + self.in_context_pos_embed
        x = torch.cat([in_context_tokens.to(tokens.dtype), tokens], dim=1)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_cos_sin(self.grid_size, head_dim, self.config.in_context_len, device=tokens.device)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, conditioning, cos, sin)
            else:
                x = block(x, conditioning, cos, sin)
        x = x[:, self.config.in_context_len :]
        if self.projection is not None:
            x = self.projection(x)
        return x

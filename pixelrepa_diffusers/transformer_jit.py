"""
JiT: a plain ViT that denoises raw pixels (Li & He, arXiv 2511.13720), as a diffusers model.

This module is published to the Hub as the transformer's remote code (`hub.remote_code_files`) and must stand alone
there: it imports torch, numpy and diffusers, never another module of this package (`hub.check_standalone` refuses
to publish it otherwise).
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

JIT_PRESETS = {
    "JiT-B/16": dict(sample_size=256, patch_size=16, hidden_size=768, num_layers=12, num_attention_heads=12,
                     bottleneck_dim=128, in_context_start=4),
    "JiT-L/16": dict(sample_size=256, patch_size=16, hidden_size=1024, num_layers=24, num_attention_heads=16,
                     bottleneck_dim=128, in_context_start=8),
    "JiT-H/16": dict(sample_size=256, patch_size=16, hidden_size=1280, num_layers=32, num_attention_heads=16,
                     bottleneck_dim=256, in_context_start=10),
    "JiT-B/32": dict(sample_size=512, patch_size=32, hidden_size=768, num_layers=12, num_attention_heads=12,
                     bottleneck_dim=128, in_context_start=4),
    "JiT-L/32": dict(sample_size=512, patch_size=32, hidden_size=1024, num_layers=24, num_attention_heads=16,
                     bottleneck_dim=128, in_context_start=8),
    "JiT-H/32": dict(sample_size=512, patch_size=32, hidden_size=1280, num_layers=32, num_attention_heads=16,
                     bottleneck_dim=256, in_context_start=10),
}


def preset_config(name: str) -> dict:
    """The config kwargs of a JiT preset, or a ValueError listing the known names."""
    if name not in JIT_PRESETS:
        raise ValueError(f"Unknown JiT preset {name!r}; expected one of {sorted(JIT_PRESETS)}.")
    return dict(JIT_PRESETS[name])


def class_name_index(id2label: dict) -> dict[str, int]:
    """The class index of every name of `id2label` (index -> name, or comma-separated synonyms)."""
    return {name.strip(): int(index) for index, names in id2label.items() for name in names.split(",")}


def class_label_ids(class_labels, names: dict[str, int], num_classes: int) -> list[int]:
    """
    Class labels as a list of ints in [0, num_classes), from ints, class names (keys of `names`, see
    class_name_index) or a 1-D integer tensor: the class conditioning the transformer takes, one image each.
    """
    if isinstance(class_labels, torch.Tensor):
        if class_labels.ndim > 1 or class_labels.is_floating_point():
            raise TypeError("class_labels tensor must be 1-D with integer dtype.")
        class_labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (int, str)):
        class_labels = [class_labels]
    if not isinstance(class_labels, (list, tuple)):
        raise TypeError(f"class_labels must be an int, a str, or a list of them, got {type(class_labels).__name__}.")
    if len(class_labels) == 0:
        raise ValueError("class_labels is empty; pass at least one class.")
    ids = []
    for label in class_labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"Unknown class name {label!r} in class_labels; see pipeline.labels for valid names.")
            ids.append(names[label])
        elif isinstance(label, int) and not isinstance(label, bool):
            ids.append(label)
        else:
            raise TypeError(f"class_labels entries must be ints or class names, got {type(label).__name__}.")
    for label in ids:
        if not 0 <= label < num_classes:
            raise ValueError(f"class_labels entry {label} is outside [0, {num_classes}).")
    return ids


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding, (grid_size**2, hidden_size): first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size // 4))
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    halves = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        angles = np.einsum("m,d->md", coord, omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return torch.from_numpy(np.concatenate(halves, axis=1)).float()


def rotary_cos_sin(grid_size: int, head_dim: int, num_prefix_tokens: int, device=None):
    """2D RoPE tables, (num_prefix_tokens + grid_size**2, head_dim); prefix tokens are not rotated (cos 1, sin 0)."""
    axis_dim = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, axis_dim, 2, device=device)[: axis_dim // 2].float() / axis_dim)
    # The official `arange(ft_seq_len) / ft_seq_len * pt_seq_len` (util/model_util.py), kept for its float rounding:
    # for some grids (13, 19, 21, ...) a position is one ulp off its integer, and parity keeps that.
    positions = torch.arange(grid_size, device=device) / grid_size * grid_size
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)
    rows = angles[:, None, :].expand(grid_size, grid_size, axis_dim)
    cols = angles[None, :, :].expand(grid_size, grid_size, axis_dim)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    cos = torch.cat([torch.ones(num_prefix_tokens, head_dim, device=device), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix_tokens, head_dim, device=device), angles.sin()])
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs (x0, x1) of the last dim by the given angles."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 with the weight and returned in the input dtype, as the official RMSNorm (so under
    bf16 autocast a bf16 input is rounded once, after the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * hidden).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class BottleneckPatchEmbed(nn.Module):
    """p x p conv to a low-rank bottleneck without bias, then a 1x1 conv to the hidden size."""

    def __init__(self, patch_size: int, in_channels: int, bottleneck_dim: int, hidden_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj_out = nn.Conv2d(bottleneck_dim, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of JiT time t in [0, 1], then an MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = nn.Linear(frequency_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.linear_2(F.silu(self.linear_1(features.to(self.linear_1.weight.dtype))))


def rotated_qkv(attn: "JiTAttention", hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Query, key and value (B, L, heads, head_dim) of `attn`, the query and key RMS-normed and rotated."""
    batch, length, _ = hidden_states.shape
    query, key, value = attn.to_qkv(hidden_states).view(batch, length, 3, attn.heads, -1).unbind(2)
    query = apply_rotary(attn.norm_q(query), cos[:, None], sin[:, None])
    key = apply_rotary(attn.norm_k(key), cos[:, None], sin[:, None])
    return query, key, value


class JiTAttnProcessor:
    """
    JiT attention through diffusers' `dispatch_attention_fn`: the backend set by `set_attention_backend`, else
    diffusers' active one (torch SDPA, "native", unless `DIFFUSERS_ATTN_BACKEND` says otherwise), in the compute dtype.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: "JiTAttention", hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        query, key, value = rotated_qkv(attn, hidden_states, cos, sin)
        hidden_states = dispatch_attention_fn(
            query.to(value.dtype),
            key.to(value.dtype),
            value,
            dropout_p=attn.attention_dropout if attn.training else 0.0,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(value.dtype)
        return attn.dropout(attn.to_out(hidden_states))


class JiTFP32LogitsAttnProcessor:
    """
    The official JiT attention: q k^T and the softmax in fp32 with autocast off, then the weights times v in the
    compute dtype (bf16 under bf16 autocast). Materialises the attention matrix; no diffusers backend applies.
    """

    def __call__(self, attn: "JiTAttention", hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        query, key, value = (x.transpose(1, 2) for x in rotated_qkv(attn, hidden_states, cos, sin))
        with torch.autocast(hidden_states.device.type, enabled=False):
            weights = query.float() @ key.float().transpose(-2, -1) * (1 / math.sqrt(query.shape[-1]))
            weights = F.dropout(weights.softmax(dim=-1), attn.attention_dropout if attn.training else 0.0)
        hidden_states = (weights.to(value.dtype) @ value).transpose(1, 2).flatten(2, 3)
        return attn.dropout(attn.to_out(hidden_states))


class JiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with qk RMSNorm and 2D RoPE; the processor computes it (`JiTAttnProcessor` by
    default)."""

    _default_processor_cls = JiTAttnProcessor
    _available_processors = [JiTAttnProcessor, JiTFP32LogitsAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.heads = num_heads
        self.attention_dropout = attention_dropout
        head_dim = hidden_size // num_heads
        self.to_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.set_processor(self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states, cos, sin)


def swiglu_inner_dim(hidden_size: int, mlp_ratio: float) -> int:
    """The official SwiGLU inner width: int(int(hidden_size * mlp_ratio) * 2 / 3), e.g. 3413 for 1280 and ratio 4."""
    return int(int(hidden_size * mlp_ratio) * 2 / 3)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward of inner width `inner_dim` with one fused input projection."""

    def __init__(self, hidden_size: int, inner_dim: int, dropout: float):
        super().__init__()
        self.proj_in = nn.Linear(hidden_size, 2 * inner_dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(F.silu(gate) * value))


class JiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the condition vector."""

    def __init__(self, hidden_size: int, num_heads: int, ff_inner_dim: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = JiTAttention(hidden_size, num_heads, attention_dropout, dropout)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.ff = SwiGLU(hidden_size, ff_inner_dim, dropout)
        self.adaln_modulation = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln_modulation(F.silu(c)).chunk(6, -1)
        attention = self.attn(modulate(self.norm1(hidden_states), shift_msa, scale_msa), cos, sin)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attention
        feed_forward = self.ff(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        return hidden_states + gate_mlp.unsqueeze(1) * feed_forward


# diffusers' block caches (MagCache, SeaCache, FirstBlockCache) find a block's hidden states and output by this entry.
TransformerBlockRegistry.register(JiTBlock, TransformerBlockMetadata(return_hidden_states_index=0))


class JiTFinalLayer(nn.Module):
    """RMSNorm with adaLN shift/scale, then a linear map to p*p*C pixel values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps=1e-6)
        self.adaln_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_jit_weights(module: nn.Module) -> None:
    """Official JiT/adapter init: xavier-uniform linears with zero bias, N(0, 0.02) embeddings, adaLN zeroed."""
    for submodule in module.modules():
        if isinstance(submodule, nn.Linear):
            nn.init.xavier_uniform_(submodule.weight)
            nn.init.zeros_(submodule.bias)
    nn.init.normal_(module.class_embedding.weight, std=0.02)
    nn.init.normal_(module.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(module.timestep_embedder.linear_2.weight, std=0.02)
    nn.init.normal_(module.in_context_pos_embed, std=0.02)
    for block in module.blocks:
        nn.init.zeros_(block.adaln_modulation.weight)
        nn.init.zeros_(block.adaln_modulation.bias)


class JiTTransformer2DModel(ModelMixin, ConfigMixin, AttentionMixin, CacheMixin):
    """
    JiT denoiser: predicts the clean image from a noisy one.

    Time is JiT time `t` in [0, 1], where t = 0 is pure noise and t = 1 is the clean image:
    `hidden_states = t * image + (1 - t) * noise`. `class_labels == num_classes` is the null class used for
    classifier-free guidance. After block `in_context_start`, `in_context_len` class tokens join the sequence.
    The SwiGLU inner width is `ff_inner_dim`, or when None the official `swiglu_inner_dim(hidden_size, mlp_ratio)`.
    `enable_cache` takes diffusers' MagCache, TaylorSeer, PyramidAttentionBroadcast and FasterCache (with
    `is_guidance_distilled=True`) configs; FirstBlockCache and SeaCache need as many tokens out of the last block as
    into the first, which the in-context tokens break unless `in_context_start` is 0.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JiTBlock"]
    _repeated_blocks = ["JiTBlock"]
    # Kept in their own dtype by enable_layerwise_casting, besides diffusers' defaults (patch_embed, the norms): the
    # t and label embeddings and the final layer to pixels (in fp8 it alone doubles the output error).
    _skip_layerwise_casting_patterns = ["timestep_embedder", "class_embedding", "final_layer"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        ff_inner_dim: int | None = None,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        num_classes: int = 1000,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size}).")
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size ({hidden_size}) / num_attention_heads ({num_attention_heads}) must be a multiple of 4 "
                "for 2D RoPE."
            )
        if not 0 <= in_context_start < num_layers:
            raise ValueError(f"in_context_start ({in_context_start}) must be in [0, num_layers={num_layers}).")
        self.gradient_checkpointing = False
        self.grid_size = sample_size // patch_size
        self.num_patches = self.grid_size**2

        self.timestep_embedder = TimestepEmbedder(hidden_size)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        self.patch_embed = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None])
        self.in_context_pos_embed = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        first_dropout_block, end_dropout_block = num_layers // 4, num_layers // 4 * 3
        if ff_inner_dim is None:
            ff_inner_dim = swiglu_inner_dim(hidden_size, mlp_ratio)
        self.blocks = nn.ModuleList(
            [
                JiTBlock(
                    hidden_size,
                    num_attention_heads,
                    ff_inner_dim,
                    attention_dropout if first_dropout_block <= i < end_dropout_block else 0.0,
                    dropout if first_dropout_block <= i < end_dropout_block else 0.0,
                )
                for i in range(num_layers)
            ]
        )
        self.final_layer = JiTFinalLayer(hidden_size, patch_size, in_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **config_overrides) -> "JiTTransformer2DModel":
        """A freshly initialised model of a named preset (JiT-B/16, L/16, H/16 at 256 px; B/32, L/32, H/32 at 512 px)."""
        return cls(**{**preset_config(name), **config_overrides})

    def initialize_weights(self) -> None:
        """The official initialisation, so training from scratch matches."""
        init_jit_weights(self)
        for conv in (self.patch_embed.proj_in, self.patch_embed.proj_out):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj_out.bias)
        nn.init.zeros_(self.final_layer.adaln_modulation.weight)
        nn.init.zeros_(self.final_layer.adaln_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def embed_conditions(self, timestep: torch.Tensor, class_labels: torch.Tensor):
        """The adaLN condition (timestep + label embedding) and the label embedding alone."""
        label_embedding = self.class_embedding(class_labels)
        return self.timestep_embedder(timestep) + label_embedding, label_embedding

    def embed_patches(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) to tokens (B, N, D) with the fixed position embedding, added in place as the official
        code does (so the tokens keep the patch embedding's dtype and layout, e.g. bf16 under bf16 autocast)."""
        tokens = self.patch_embed(hidden_states)
        tokens += self.pos_embed
        return tokens

    def run_blocks(self, tokens, conditioning, label_embedding, start: int, end: int) -> torch.Tensor:
        """Blocks start..end-1; the in-context class tokens are prepended before block `in_context_start`."""
        in_context_len, in_context_start = self.config.in_context_len, self.config.in_context_start
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_cos_sin(self.grid_size, head_dim, in_context_len, device=tokens.device)
        for index in range(start, end):
            if index == in_context_start:
                in_context_tokens = label_embedding.unsqueeze(1) + self.in_context_pos_embed
                tokens = torch.cat([in_context_tokens, tokens], dim=1)
            length = tokens.shape[1]
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(
                    self.blocks[index], tokens, conditioning, cos[-length:], sin[-length:]
                )
            else:
                tokens = self.blocks[index](tokens, conditioning, cos[-length:], sin[-length:])
        return tokens

    def unembed(self, tokens: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """Drops the in-context tokens and maps the image tokens back to an image (B, C, H, W)."""
        patches = self.final_layer(tokens[:, -self.num_patches :], conditioning)
        p, g, c = self.config.patch_size, self.grid_size, self.config.in_channels
        patches = patches.reshape(patches.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(patches.shape[0], c, g * p, g * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ):
        """
        Args:
            hidden_states: noisy images (B, C, H, W) at JiT time `timestep`.
            timestep: (B,) JiT time in [0, 1]; 1 is clean.
            class_labels: (B,) ints in [0, num_classes]; num_classes is the null class.

        Returns:
            `Transformer2DModelOutput` whose `sample` is the predicted clean image.
        """
        conditioning, label_embedding = self.embed_conditions(timestep, class_labels)
        tokens = self.embed_patches(hidden_states)
        tokens = self.run_blocks(tokens, conditioning, label_embedding, 0, self.config.num_layers)
        sample = self.unembed(tokens, conditioning)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

"""The representation-alignment methods of training: none (plain JiT), REPA and PixelREPA, one class each."""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .adapter_pixelrepa import MaskedTransformerAdapter


class REPAProjector(ModelMixin, ConfigMixin):
    """REPA's 3-layer MLP (SiLU) from backbone tokens to the alignment encoder's width."""

    @register_to_config
    def __init__(self, hidden_size: int = 768, projector_dim: int = 2048, out_channels: int = 768):
        super().__init__()
        self.linear_1 = nn.Linear(hidden_size, projector_dim)
        self.linear_2 = nn.Linear(projector_dim, projector_dim)
        self.linear_3 = nn.Linear(projector_dim, out_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_3(F.silu(self.linear_2(F.silu(self.linear_1(tokens)))))


class Alignment:
    """
    A representation-alignment method: which backbone tokens its aligner reads and how, the aligner it trains, and
    how a run of it is saved. Model cards describe it in hub.py, by its `name`.
    """

    name: str  # the --alignment choice
    default_weight: float | None = None  # the alignment loss weight of the method's paper
    aligner_class: type | None = None
    folder: str | None = None  # the aligner's folder in checkpoints
    masks_tokens = False  # the aligner sees partly masked tokens, so the backbone's mask_token is drawn and trained
    exports_aligner = False  # the aligner is saved with the final pipeline, in `folder`

    def alignment_depth(self, config, repa_depth: int | None) -> int:
        """The number of backbone blocks run before the aligner reads the tokens."""
        return config.in_context_start

    def build_aligner(self, config, encoder_width: int, projector_dim: int, pretrained: str | None):
        """The aligner of a backbone with `config` to the encoder's width (None without alignment)."""
        return None

    def enable_gradient_checkpointing(self, aligner) -> None:
        """Recomputes the aligner's activations in the backward pass, where it has blocks to recompute."""

    def compile(self, aligner, **compile_kwargs) -> None:
        """Compiles the aligner's repeated blocks with `torch.compile(**compile_kwargs)`, where it has any."""

    def features(self, aligner, tokens: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        The aligner's output for the backbone's image tokens `tokens` (B, N, hidden_size), partly replaced by the
        mask token where the method `masks_tokens`, at time `t` with the (dropped) class `labels`. Plain JiT has no
        aligner, so no features.
        """
        raise NotImplementedError(f"alignment {self.name!r} has no aligner.")


class NoAlignment(Alignment):
    """Plain JiT: the v-loss only."""

    name = "none"


class REPAAlignment(Alignment):
    """REPA: an MLP projector reads the image tokens after block `repa_depth` (default: in_context_start)."""

    name = "repa"
    default_weight = 0.5
    aligner_class, folder = REPAProjector, "projector"

    def alignment_depth(self, config, repa_depth):
        depth = config.in_context_start if repa_depth is None else repa_depth
        if not 1 <= depth <= config.num_layers:
            raise ValueError(f"repa_depth must be in [1, num_layers={config.num_layers}], got {depth}.")
        return depth

    def build_aligner(self, config, encoder_width, projector_dim, pretrained):
        return REPAProjector(hidden_size=config.hidden_size, projector_dim=projector_dim, out_channels=encoder_width)

    def features(self, aligner, tokens, t, labels):
        return aligner(tokens)


class PixelREPAAlignment(Alignment):
    """
    PixelREPA: the masked transformer adapter reads the tokens after block in_context_start, a random `mask_ratio` of
    them replaced by the backbone's mask token.
    """

    name = "pixelrepa"
    default_weight = 0.1
    aligner_class, folder = MaskedTransformerAdapter, "adapter"
    masks_tokens = exports_aligner = True

    def build_aligner(self, config, encoder_width, projector_dim, pretrained):
        """A new adapter, or the one in the `adapter/` folder of the `pretrained` pipeline when it has one."""
        folder = os.path.join(pretrained or "", self.folder)
        if pretrained is None or not os.path.isdir(folder):
            return MaskedTransformerAdapter.from_transformer_config(config, out_channels=encoder_width)
        adapter = MaskedTransformerAdapter.from_pretrained(folder)
        if adapter.config.out_channels != encoder_width:
            raise ValueError(f"the adapter in {folder} outputs {adapter.config.out_channels} channels but --encoder "
                             f"has width {encoder_width}")
        return adapter

    def enable_gradient_checkpointing(self, aligner):
        aligner.enable_gradient_checkpointing()

    def compile(self, aligner, **compile_kwargs):
        aligner.compile_repeated_blocks(**compile_kwargs)

    def features(self, aligner, tokens, t, labels):
        return aligner(tokens, t, labels)


# The --alignment choices.
ALIGNMENTS = {method.name: method for method in (NoAlignment(), REPAAlignment(), PixelREPAAlignment())}

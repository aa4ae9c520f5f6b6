"""The training objective of JiT (x-prediction, v-loss) with optional PixelREPA or REPA representation alignment."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .alignment import ALIGNMENTS
from .scheduling_jit_flow_match import velocity_from_x_prediction


@dataclass
class TrainingDraws:
    """The random numbers of one training step, drawn in the official order."""

    label_drop_uniform: torch.Tensor  # (B,) in [0, 1); the label is dropped where < label_dropout
    t_normal: torch.Tensor  # (B,) standard normal; t = sigmoid(p_std * t_normal + p_mean)
    noise: torch.Tensor  # (B, C, H, W) standard normal, scaled by noise_scale
    mask_uniform: torch.Tensor | None  # (B, N) in [0, 1); the token is kept where > mask_ratio (PixelREPA only)


def draw_training_randomness(images: torch.Tensor, num_patches: int, with_mask: bool) -> TrainingDraws:
    """Draws label dropout, time, noise and (optionally) the token mask from the global RNG, in that order."""
    batch_size = images.shape[0]
    label_drop_uniform = torch.rand(batch_size, device=images.device)
    t_normal = torch.randn(batch_size, device=images.device)
    noise = torch.randn_like(images)
    mask_uniform = torch.rand(batch_size, num_patches, device=images.device) if with_mask else None
    return TrainingDraws(label_drop_uniform, t_normal, noise, mask_uniform)


def drop_labels(class_labels: torch.Tensor, uniform: torch.Tensor, label_dropout: float, null_class: int):
    """Replaces each label by the null class where `uniform < label_dropout`."""
    return torch.where(uniform < label_dropout, torch.full_like(class_labels, null_class), class_labels)


def mask_tokens(tokens: torch.Tensor, uniform: torch.Tensor, mask_ratio: float, mask_token: torch.Tensor):
    """Keeps each token where `uniform > mask_ratio` and replaces the others by `mask_token`."""
    return torch.where((uniform > mask_ratio)[..., None], tokens, mask_token)


def logit_normal_time(normal: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """JiT time t = sigmoid(N(p_mean, p_std^2)) from a standard normal draw."""
    return torch.sigmoid(normal * p_std + p_mean)


def velocity_loss(x_pred: torch.Tensor, images: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, t_eps: float):
    """Mean squared error between the velocities implied by the clean image and by its prediction."""
    t = t.view(-1, *([1] * (images.ndim - 1)))
    target = velocity_from_x_prediction(images, noisy, t, t_eps)
    prediction = velocity_from_x_prediction(x_pred, noisy, t, t_eps)
    return (target - prediction).pow(2).mean()


def alignment_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(features, targets)."""
    return (1 - F.cosine_similarity(features, targets, dim=-1)).mean()


class JiTTrainingObjective(nn.Module):
    """
    The training loss of a JiT transformer: JiT's v-loss of an x-prediction at logit-normal time, with label dropout,
    plus the weighted cosine loss of a representation-alignment method of `ALIGNMENTS` ("none", "repa", "pixelrepa").
    The first `alignment_depth` blocks run once; their tokens feed both the rest of the backbone and the method's
    aligner (their image tokens, a random `mask_ratio` of them masked where the method `masks_tokens`), whose output
    is aligned to the frozen encoder's patch tokens.

    The alignment targets (the frozen encoder's patch tokens) are computed by the caller, so the encoder stays out of
    the trained, sharded and checkpointed module.
    """

    _no_split_modules = ["JiTBlock"]  # the FSDP units of accelerate's TRANSFORMER_BASED_WRAP

    def __init__(
        self,
        transformer: nn.Module,
        alignment: str = "pixelrepa",
        aligner: nn.Module | None = None,
        alignment_weight: float = 0.1,
        mask_ratio: float = 0.2,
        repa_depth: int | None = None,
        label_dropout: float = 0.1,
        p_mean: float = -0.8,
        p_std: float = 0.8,
        t_eps: float = 0.05,
        noise_scale: float = 1.0,
    ):
        super().__init__()
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {tuple(ALIGNMENTS)}, got {alignment!r}.")
        if (alignment == "none") != (aligner is None):
            raise ValueError(f"aligner must be given exactly when alignment is not 'none' (alignment={alignment!r}).")
        self.transformer = transformer
        self.method = ALIGNMENTS[alignment]
        self.aligner = aligner
        self.alignment_weight = alignment_weight
        self.mask_ratio = mask_ratio
        self.alignment_depth = self.method.alignment_depth(transformer.config, repa_depth)
        self.label_dropout = label_dropout
        self.p_mean = p_mean
        self.p_std = p_std
        self.t_eps = t_eps
        self.noise_scale = noise_scale

    def forward(
        self,
        images: torch.Tensor,
        class_labels: torch.Tensor,
        targets: torch.Tensor | None = None,
        draws: TrainingDraws | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            images: clean images (B, C, H, W) in [-1, 1].
            class_labels: (B,) class ids, before label dropout.
            targets: the frozen encoder's patch tokens (B, N, C_enc) for `images`; needed with alignment.
            draws: the step's random numbers; drawn from the global RNG when None.

        Returns:
            {"loss": total, "loss_jit": v-loss, "loss_alignment": cosine loss (0 without alignment)}.
        """
        if self.aligner is not None and targets is None:
            raise ValueError(f"targets (the encoder's patch tokens) are needed with alignment {self.method.name!r}.")
        transformer = self.transformer
        if draws is None:
            draws = draw_training_randomness(images, transformer.num_patches, self.method.masks_tokens)
        labels = drop_labels(class_labels, draws.label_drop_uniform, self.label_dropout, transformer.config.num_classes)
        t = logit_normal_time(draws.t_normal, self.p_mean, self.p_std)
        noise = draws.noise * self.noise_scale
        t_image = t.view(-1, 1, 1, 1)
        noisy = t_image * images + (1 - t_image) * noise

        conditioning, label_embedding = transformer.embed_conditions(t, labels)
        tokens = transformer.embed_patches(noisy)
        hidden = transformer.run_blocks(tokens, conditioning, label_embedding, 0, self.alignment_depth)
        num_layers = transformer.config.num_layers
        tokens = transformer.run_blocks(hidden, conditioning, label_embedding, self.alignment_depth, num_layers)
        x_pred = transformer.unembed(tokens, conditioning)
        loss_jit = velocity_loss(x_pred, images, noisy, t, self.t_eps)
        if self.aligner is None:
            return {"loss": loss_jit, "loss_jit": loss_jit, "loss_alignment": torch.zeros_like(loss_jit)}

        image_tokens = hidden[:, -transformer.num_patches :]
        if self.method.masks_tokens:
            image_tokens = mask_tokens(image_tokens, draws.mask_uniform, self.mask_ratio, transformer.mask_token)
        features = self.method.features(self.aligner, image_tokens, t, labels)
        loss_alignment = alignment_loss(features, targets)
        loss = loss_jit + self.alignment_weight * loss_alignment
        return {"loss": loss, "loss_jit": loss_jit, "loss_alignment": loss_alignment}

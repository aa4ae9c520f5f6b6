"""The frozen DINOv2 alignment target, on the official PixelREPA grid (256 px images, 16 px patches)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def resize_matrix(old_size, new_size, dtype=torch.float64):
    """The matrix (new_h * new_w, old_h * old_w) of antialiased bicubic resizing from old_size to new_size."""
    old_h, old_w = old_size
    basis = torch.eye(old_h * old_w, dtype=dtype).view(old_h * old_w, 1, old_h, old_w)
    resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    return resized.flatten(1).T


def resample_patch_embed(weight, new_size):
    """Resample conv patch-embedding kernels (out, in, h, w) to new_size (FlexiViT pseudo-inverse resampling).

    The new kernel w' is the least-norm solution of <resize(x), w'> = <x, w> for every patch x, where resize is
    antialiased bicubic interpolation: w' = pinv(R^T) w with R the resize matrix. Computed in float64.
    """
    out_channels, in_channels, old_h, old_w = weight.shape
    resize = resize_matrix((old_h, old_w), new_size)
    resampled = weight.to(torch.float64).flatten(2) @ torch.linalg.pinv(resize)
    return resampled.view(out_channels, in_channels, *new_size).to(weight.dtype)


def resample_position_embeddings(position_embeddings, new_grid, num_prefix_tokens=1):
    """Bicubically resize (with antialiasing) the square patch-position grid of (1, prefix + h*w, C) embeddings
    to new_grid, keeping the prefix (class token) embeddings."""
    prefix, grid = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    old_side = round(grid.shape[1] ** 0.5)
    grid = grid.to(torch.float64).view(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(position_embeddings.dtype)
    return torch.cat([prefix, grid], dim=1)


class AlignmentEncoder(nn.Module):
    """A frozen DINOv2 mapping images in [-1, 1] (B, 3, H, W) to its final patch tokens (B, N, hidden_size).

    Images are mapped to [0, 1], normalised with the ImageNet mean and std, and bilinearly resized to
    `resolution` when they have another size; class and register tokens are dropped.
    """

    def __init__(self, model, resolution):
        super().__init__()
        self.model = model
        self.resolution = resolution
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def hidden_size(self):
        return self.model.config.hidden_size

    @property
    def num_tokens(self):
        return (self.resolution // self.model.config.patch_size) ** 2

    @torch.no_grad()
    def forward(self, images):
        images = ((images + 1) / 2 - self.mean) / self.std
        if images.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        tokens = self.model(pixel_values=images).last_hidden_state
        return tokens[:, self.num_prefix_tokens:]


def load_alignment_encoder(pretrained_model_name_or_path, resolution=256, patch_size=16, cache_dir=None):
    """Load a transformers DINOv2 (Hub id or local folder) as a frozen AlignmentEncoder for `resolution` px
    images cut into `patch_size` px patches.

    As timm does for the official code (vit_base_patch14_dinov2 created at img_size 256, patch_size 16), the
    patch-embedding kernel is resampled to patch_size by pseudo-inverse resampling and the position grid is
    bicubically resized (with antialiasing) to (resolution // patch_size) squared, once, here. The defaults give
    the official 256 tokens; resolution=224, patch_size=14 gives REPA's grid (also 256 tokens).
    """
    if resolution % patch_size:
        raise ValueError(f"resolution ({resolution}) must be a multiple of patch_size ({patch_size})")
    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, cache_dir=cache_dir)
    if config.model_type not in DINOV2_MODEL_TYPES:
        raise ValueError(
            f"pretrained_model_name_or_path {pretrained_model_name_or_path!r} is a {config.model_type!r} model; "
            f"expected one of {DINOV2_MODEL_TYPES}"
        )
    pretrained = AutoModel.from_pretrained(pretrained_model_name_or_path, cache_dir=cache_dir)
    state_dict = pretrained.state_dict()
    grid = resolution // patch_size
    patch_key, position_key = "embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings"
    state_dict[patch_key] = resample_patch_embed(state_dict[patch_key], (patch_size, patch_size))
    state_dict[position_key] = resample_position_embeddings(state_dict[position_key], (grid, grid))
    config.image_size, config.patch_size = resolution, patch_size
    model = AutoModel.from_config(config).to(pretrained.dtype)
    model.load_state_dict(state_dict)
    return AlignmentEncoder(model, resolution)

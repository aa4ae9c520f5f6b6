"""A random-weight Inception-v3 with torch-fidelity's exact architecture, saved where torch-fidelity can load it."""

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import (
    BasicConv2d,
    FeatureExtractorInceptionV3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)


class InceptionV3Layout(nn.Module):
    """The layers of torch-fidelity's FeatureExtractorInceptionV3, without its weight loading."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)


def random_smooth_images(count, seed, brightness=0):
    """Blurry random uint8 images (count, 3, 32, 32): random 4x4 colour grids upsampled, offset by brightness."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(count, 3, 4, 4, generator=generator) * 160 + brightness
    return nn.functional.interpolate(grid, size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def random_inception_state_dict(seed=0):
    """Seeded He-normal convolutions, identity batch norms (small random shifts) and a fully connected layer
    scaled so that the unbiased logits of different images differ by a few units."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = InceptionV3Layout().state_dict()
    for key, value in state_dict.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        elif key.endswith("bn.bias"):
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
        elif key == "fc.weight":
            value.copy_(torch.randn(value.shape, generator=generator) * 64.0 / value.shape[1] ** 0.5)
        elif key == "fc.bias":
            value.zero_()
    return state_dict


@torch.no_grad()
def save_random_inception_weights(path, seed=0):
    """Write random weights in torch-fidelity's format, a torch.save'd state dict, and return the path.

    As training would, the batch norms then get the statistics of a batch (of random smooth images), so pool
    features keep varying between images; the last block's outputs are scaled by 0.05 so that FID between
    different image sets is O(10-100).
    """
    torch.save(random_inception_state_dict(seed), path)
    inception = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    batch_norms = [module for module in inception.modules() if isinstance(module, nn.BatchNorm2d)]
    for batch_norm in batch_norms:
        batch_norm.reset_running_stats()
        batch_norm.momentum = None
        batch_norm.train()
    inception(random_smooth_images(4, seed=seed, brightness=40))
    for module in inception.Mixed_7c.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.mul_(0.05)
            module.bias.mul_(0.05)
    torch.save(inception.state_dict(), path)
    return path

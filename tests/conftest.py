import torch

torch.set_num_threads(2)

TINY_CONFIG = dict(
    sample_size=32, patch_size=8, hidden_size=64, num_layers=4, num_attention_heads=4, num_classes=10,
    bottleneck_dim=16, in_context_len=4, in_context_start=2,
)


def random_tiny_transformer(seed: int = 0):
    """The tiny test config with random non-zero weights (zero-initialised outputs would prove nothing)."""
    from pixelrepa_diffusers import JiTTransformer2DModel

    torch.manual_seed(seed)
    model = JiTTransformer2DModel(**TINY_CONFIG)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model.eval()

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from pixelrepa_diffusers.encoders import (
    AlignmentEncoder,
    load_alignment_encoder,
    resample_patch_embed,
    resample_position_embeddings,
    resize_matrix,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# A tiny DINOv2 with the released checkpoints' patch size: 56 px images give a 4 x 4 grid of 14 px patches.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=56, patch_size=14,
            layerscale_value=0.5)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(path)
    return path


def test_resampled_kernel_keeps_responses_to_upsampled_patches():
    # FlexiViT's defining property: <resize(x), w'> = <x, w> for every 14 px patch x resized to 16 px.
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 14, 14, dtype=torch.float64)
    patches = torch.randn(7, 3, 14, 14, dtype=torch.float64)
    resampled = resample_patch_embed(weight, (16, 16))
    upsampled = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    assert resampled.shape == (5, 3, 16, 16)
    torch.testing.assert_close(
        torch.einsum("bchw,ochw->bo", upsampled, resampled), torch.einsum("bchw,ochw->bo", patches, weight)
    )


def test_resize_matrix_is_the_interpolation():
    image = torch.randn(4, 5, dtype=torch.float64)
    resized = F.interpolate(image[None, None], size=(6, 3), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(resize_matrix((4, 5), (6, 3)) @ image.flatten(), resized.flatten())


def test_resampling_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 14, 14)
    torch.testing.assert_close(
        resample_patch_embed(weight, (16, 16)),
        timm_layers.resample_patch_embed(weight, (16, 16)),
        atol=2e-5, rtol=1e-4,
    )
    position = torch.randn(1, 1 + 37 * 37, 8)
    torch.testing.assert_close(
        resample_position_embeddings(position, (16, 16)),
        timm_layers.resample_abs_pos_embed(position, (16, 16), num_prefix_tokens=1),
        atol=1e-5, rtol=1e-5,
    )


def test_official_grid_token_count_and_frozen(dinov2_dir):
    encoder = load_alignment_encoder(dinov2_dir, resolution=64, patch_size=16)
    assert isinstance(encoder, AlignmentEncoder)
    assert encoder.hidden_size == 32 and encoder.num_tokens == 16 and not encoder.training
    assert encoder.model.embeddings.patch_embeddings.projection.weight.shape == (32, 3, 16, 16)
    assert all(not parameter.requires_grad for parameter in encoder.parameters())
    images = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad
    # Other image sizes are resized to the encoder's resolution first, as in the official code.
    assert encoder(torch.zeros(1, 3, 128, 128)).shape == (1, 16, 32)


def test_normalisation_and_class_token_dropped(dinov2_dir):
    encoder = load_alignment_encoder(dinov2_dir, resolution=64, patch_size=16)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    hidden = encoder.model(pixel_values=((images + 1) / 2 - MEAN) / STD).last_hidden_state
    assert hidden.shape == (2, 17, 32)
    torch.testing.assert_close(encoder(images), hidden[:, 1:])


def test_unchanged_grid_keeps_pretrained_weights(dinov2_dir):
    # resolution 56, patch 14 is the pretrained grid: the encoder is the pretrained model itself.
    encoder = load_alignment_encoder(dinov2_dir, resolution=56, patch_size=14)
    pretrained = Dinov2Model.from_pretrained(dinov2_dir).eval()
    images = torch.rand(2, 3, 56, 56) * 2 - 1
    expected = pretrained(pixel_values=((images + 1) / 2 - MEAN) / STD).last_hidden_state[:, 1:]
    torch.testing.assert_close(encoder(images), expected)


def test_register_tokens_dropped(tmp_path):
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **TINY)).save_pretrained(tmp_path)
    encoder = load_alignment_encoder(tmp_path, resolution=64, patch_size=16)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    hidden = encoder.model(pixel_values=((images + 1) / 2 - MEAN) / STD).last_hidden_state
    assert hidden.shape == (1, 1 + 4 + 16, 32)
    torch.testing.assert_close(encoder(images), hidden[:, 5:])


def timm_state_dict(model):
    """The weights of a transformers Dinov2Model under timm VisionTransformer names."""
    hf = model.state_dict()
    state_dict = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        hf_layer, timm_block = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state_dict[f"{timm_block}attn.qkv.{kind}"] = torch.cat(
                [hf[f"{hf_layer}attention.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")]
            )
            for hf_name, timm_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj"),
                                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state_dict[f"{timm_block}{timm_name}.{kind}"] = hf[f"{hf_layer}{hf_name}.{kind}"]
        state_dict[f"{timm_block}ls1.gamma"] = hf[f"{hf_layer}layer_scale1.lambda1"]
        state_dict[f"{timm_block}ls2.gamma"] = hf[f"{hf_layer}layer_scale2.lambda1"]
    return state_dict


def test_matches_timm_model_created_at_new_grid(dinov2_dir):
    # The official target: timm creates the DINOv2 ViT at img_size 256, patch_size 16 and resamples the
    # pretrained weights while loading them (checkpoint_filter_fn). Same here at 64 px on tiny random weights.
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    reference = vision_transformer.VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, init_values=1.0, num_classes=0
    ).eval()
    pretrained = Dinov2Model.from_pretrained(dinov2_dir)
    reference.load_state_dict(vision_transformer.checkpoint_filter_fn(timm_state_dict(pretrained), reference))
    encoder = load_alignment_encoder(dinov2_dir, resolution=64, patch_size=16)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = reference.forward_features(((images + 1) / 2 - MEAN) / STD)[:, 1:]
    torch.testing.assert_close(encoder(images), expected, atol=3e-5, rtol=1e-5)


def test_rejects_bad_arguments(dinov2_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        load_alignment_encoder(dinov2_dir, resolution=60, patch_size=16)
    from transformers import ViTConfig, ViTModel

    vit_config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ViTModel(vit_config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        load_alignment_encoder(tmp_path)

import pytest
import torch

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import JIT_PRESETS, JiTFP32LogitsAttnProcessor, JiTTransformer2DModel
from tests.tiny_models import random_tiny_transformer


@pytest.mark.parametrize("name, millions", [("JiT-B/16", 131), ("JiT-L/16", 459), ("JiT-H/16", 953)])
def test_preset_sizes_match_the_paper(name, millions):
    with torch.device("meta"):
        model = JiTTransformer2DModel.from_preset(name)
    trainable = sum(p.numel() for p in model.parameters())
    assert round(trainable / 1e6) == millions
    assert model.config.sample_size == 256 and model.num_patches == 256


# The papers' parameter counts of the /16 models, in millions.
PAPER_PARAMETERS = {"JiT-B/16": 131, "JiT-L/16": 459, "JiT-H/16": 953}


def test_all_presets_build_at_their_patch_size_and_resolution_with_the_papers_parameter_counts():
    for name in JIT_PRESETS:
        with torch.device("meta"):
            model = JiTTransformer2DModel.from_preset(name)
        patch_size = int(name.rpartition("/")[2])
        # /16 models are the 256 px ones and /32 the 512 px ones: 16 x 16 patches each.
        assert (model.config.patch_size, model.config.sample_size, model.num_patches) == (patch_size, 16 * patch_size,
                                                                                            256)
        if name in PAPER_PARAMETERS:
            assert round(sum(parameter.numel() for parameter in model.parameters()) / 1e6) == PAPER_PARAMETERS[name]


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="Unknown JiT preset 'JiT-XL/2'"):
        JiTTransformer2DModel.from_preset("JiT-XL/2")


@pytest.mark.parametrize("overrides, match", [
    (dict(sample_size=30), "divisible by patch_size"),
    (dict(num_attention_heads=3), "multiple of 4"),
    (dict(in_context_start=4), "in_context_start"),
])
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        JiTTransformer2DModel(**{**TINY_CONFIG, **overrides})


def test_official_initialisation():
    model = JiTTransformer2DModel(**TINY_CONFIG)
    for block in model.blocks:
        assert block.adaln_modulation.weight.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    assert model.mask_token.abs().sum() > 0 and model.in_context_pos_embed.abs().sum() > 0
    assert 0.015 < model.class_embedding.weight.std() < 0.025
    # Zero-initialised output layer: a fresh model predicts exactly zero.
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])).sample
    assert out.abs().max() == 0


def test_encoder_and_decoder_halves_compose_to_forward():
    model = random_tiny_transformer()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7]), torch.tensor([3, 10])
    with torch.no_grad():
        conditioning, label_embedding = model.embed_conditions(t, y)
        tokens = model.run_blocks(model.embed_patches(x), conditioning, label_embedding, 0, 2)
        assert tokens.shape == (2, 16, 64)
        tokens = model.run_blocks(tokens, conditioning, label_embedding, 2, 4)
        assert tokens.shape == (2, 4 + 16, 64)
        torch.testing.assert_close(model.unembed(tokens, conditioning), model(x, t, y).sample, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_tiny_transformer().train()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7]), torch.tensor([3, 10])
    model(x, t, y).sample.square().mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y).sample.square().mean().backward()
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)


def test_fp32_logits_attention_agrees_with_sdpa_in_fp32_and_runs_in_bf16():
    model = random_tiny_transformer()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7]), torch.tensor([3, 10])
    with torch.no_grad():
        plain = model(x, t, y).sample
        model.set_attn_processor(JiTFP32LogitsAttnProcessor())
        assert {type(processor) for processor in model.attn_processors.values()} == {JiTFP32LogitsAttnProcessor}
        torch.testing.assert_close(model(x, t, y).sample, plain, rtol=1e-5, atol=1e-6)
        model.to(torch.bfloat16)
        bf16 = model(x.bfloat16(), t, y).sample
    assert bf16.dtype == torch.bfloat16
    assert ((bf16.float() - plain).norm() / plain.norm()) < 0.05


def test_dropout_only_in_the_middle_half_of_the_blocks():
    model = JiTTransformer2DModel(**{**TINY_CONFIG, "num_layers": 8, "in_context_start": 2, "dropout": 0.2,
                                     "attention_dropout": 0.1})
    rates = [block.attn.dropout.p for block in model.blocks]
    assert rates == [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0]
    assert [block.attn.attention_dropout for block in model.blocks][2] == 0.1


def test_save_and_load_in_safetensors(tmp_path):
    model = random_tiny_transformer()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = JiTTransformer2DModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

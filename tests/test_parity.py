"""Same weights, same outputs as the official code (fixtures made by tests/fixtures/make_official_fixtures.py)."""

import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler, JiTTransformer2DModel, MaskedTransformerAdapter, PixelREPAPipeline
from pixelrepa_diffusers.conversion import rename_official_keys
from tests.official_fixtures import load_fixture, load_variants, official_state, our_config, relative_error


def small_transformer():
    tensors, metadata = load_fixture("jit_small.safetensors")
    model = JiTTransformer2DModel(**our_config(metadata["config"], JiTTransformer2DModel))
    model.load_state_dict(rename_official_keys(official_state(tensors, metadata)))
    return model.eval(), tensors


def test_fixture_weights_are_non_zero():
    tensors, metadata = load_fixture("jit_small.safetensors")
    for key, value in official_state(tensors, metadata).items():
        assert value.abs().min() > 0 or value.abs().mean() > 1e-3, key
    assert tensors["output.forward"].std() > 1e-2


def test_small_forward_matches_official():
    model, tensors = small_transformer()
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    assert (y == model.config.num_classes).any(), "the null class must be covered"
    assert t.min() < 0.01 and t.max() > 0.99
    with torch.no_grad():
        sample = model(x, t, y).sample
        conditioning, label_embedding = model.embed_conditions(t, y)
        encoded = model.run_blocks(model.embed_patches(x), conditioning, label_embedding, 0, 2)
        decoded = model.unembed(model.run_blocks(encoded, conditioning, label_embedding, 2, 4), conditioning)
    assert relative_error(sample, tensors["output.forward"]) <= 1e-5
    assert relative_error(encoded, tensors["output.encoder"]) <= 1e-5
    assert relative_error(decoded, tensors["output.decoder"]) <= 1e-5


def test_per_sample_time_and_label_matter():
    model, tensors = small_transformer()
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    with torch.no_grad():
        base = model(x, t, y).sample
        other_t = model(x, t.flip(0), y).sample
        other_y = model(x, t, (y + 1) % 10).sample
    assert relative_error(other_t, base) > 1e-2
    assert relative_error(other_y, base) > 1e-3


def test_b16_preset_forward_matches_official():
    tensors, metadata = load_fixture("jit_b16.safetensors")
    model = JiTTransformer2DModel.from_preset("JiT-B/16")
    model.load_state_dict(rename_official_keys(official_state(tensors, metadata)))
    with torch.no_grad():
        sample = model.eval()(tensors["input.x"], tensors["input.t"], tensors["input.y"]).sample
    assert tensors["input.y"].max() == 1000
    assert relative_error(sample, tensors["output.forward"]) <= 1e-5


@pytest.mark.parametrize("case", ["heun_cfg3", "euler_cfg2", "heun_cfg1", "euler_boundary"])
def test_sampling_matches_official_generate(case):
    model, _ = small_transformer()
    tensors, metadata = load_fixture("sample_small.safetensors")
    settings = metadata["cases"][case]
    scheduler = JiTFlowMatchScheduler(solver=settings["sampling_method"], noise_scale=settings["noise_scale"])
    pipe = PixelREPAPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipeline, step, t, tensors_at_step):
        final["latents"] = tensors_at_step["latents"]
        return tensors_at_step

    images = pipe(
        tensors[f"{case}.labels"].tolist(),
        num_inference_steps=settings["num_sampling_steps"],
        guidance_scale=settings["cfg"],
        guidance_interval=(settings["interval_min"], settings["interval_max"]),
        latents=tensors[f"{case}.noise"],
        output_type="pt",
        callback_on_step_end=keep_latents,
    ).images
    expected = tensors[f"{case}.output"]
    assert relative_error(final["latents"], expected) <= 1e-4
    assert torch.allclose(images, ((expected + 1) / 2).clamp(0, 1), atol=1e-4)


@pytest.mark.parametrize("variant", list(load_variants()["full"]))
def test_presets_build_the_official_architecture_at_full_depth(variant):
    spec = load_variants()["full"][variant]
    official = {key[len("net.") :]: tuple(shape) for key, shape in spec["manifest"] if key.startswith("net.")}
    with torch.device("meta"):
        transformer = JiTTransformer2DModel.from_preset(spec["args"]["model"])
        adapter = MaskedTransformerAdapter.from_preset(spec["args"]["model"], out_channels=768)
    ours = {key: tuple(value.shape) for key, value in transformer.state_dict().items()}
    if spec["codebase"] == "jit":
        assert "mask_token" not in official
        ours.pop("mask_token")
    renamed = {new: official[old] for old, new in zip(official, rename_official_keys(dict.fromkeys(official)))}
    assert ours == renamed
    official_adapter = {key[len("masked_transformer_adapter.") :]: tuple(shape) for key, shape in spec["manifest"]
                        if key.startswith("masked_transformer_adapter.")}
    if official_adapter:
        renamed = {new: official_adapter[old] for old, new in
                   zip(official_adapter, rename_official_keys(dict.fromkeys(official_adapter)))}
        if adapter.projection is None:
            renamed = {key: shape for key, shape in renamed.items() if not key.startswith("projection.")}
        assert {key: tuple(value.shape) for key, value in adapter.state_dict().items()} == renamed

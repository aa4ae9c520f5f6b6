"""MaskedTransformerAdapter: its config from a backbone's, its projection head, and parity with the official one."""

import pytest
import torch

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import JiTTransformer2DModel, MaskedTransformerAdapter
from pixelrepa_diffusers.conversion import rename_official_keys
from tests.official_fixtures import load_fixture, official_state, our_config, relative_error


def test_from_transformer_config_takes_the_backbone_shape():
    backbone = JiTTransformer2DModel(**{**TINY_CONFIG, "mlp_ratio": 2.0, "ff_inner_dim": 96, "num_layers": 6,
                                        "bottleneck_dim": 8})
    adapter = MaskedTransformerAdapter.from_transformer_config(backbone.config, out_channels=48)
    expected = dict(sample_size=32, patch_size=8, hidden_size=64, num_attention_heads=4, mlp_ratio=2.0,
                    ff_inner_dim=96, num_classes=10, in_context_len=4, num_layers=2, out_channels=48)
    assert {key: adapter.config[key] for key in expected} == expected
    assert adapter.grid_size == backbone.grid_size
    assert adapter.blocks[0].ff.proj_out.in_features == 96
    overridden = MaskedTransformerAdapter.from_transformer_config(backbone.config, out_channels=48, num_layers=3)
    assert len(overridden.blocks) == 3


@pytest.mark.parametrize("preset", ["JiT-B/16", "JiT-H/32"])
def test_from_preset_is_from_transformer_config_of_the_preset(preset):
    with torch.device("meta"):
        backbone = JiTTransformer2DModel.from_preset(preset)
        from_config = MaskedTransformerAdapter.from_transformer_config(backbone.config, out_channels=768)
        from_preset = MaskedTransformerAdapter.from_preset(preset, out_channels=768)
    fields = [key for key in from_config.config if not key.startswith("_")]  # not diffusers' own entries
    assert {key: from_preset.config[key] for key in fields} == {key: from_config.config[key] for key in fields}


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="Unknown JiT preset"):
        MaskedTransformerAdapter.from_preset("DiT-B/16", out_channels=768)


def test_projection_head_only_when_the_widths_differ():
    assert MaskedTransformerAdapter.from_transformer_config(TINY_CONFIG, out_channels=64).projection is None
    adapter = MaskedTransformerAdapter.from_transformer_config(TINY_CONFIG, out_channels=48)
    features = adapter(torch.randn(2, 16, 64), torch.rand(2), torch.tensor([1, 10]))
    assert features.shape == (2, 16, 48)


@pytest.mark.parametrize("fixture, backbone", [("mta_small.safetensors", None), ("mta_b16.safetensors", "JiT-B/16")])
def test_adapter_matches_official(fixture, backbone):
    tensors, metadata = load_fixture(fixture)
    config = metadata["config"]
    if backbone is None:
        adapter = MaskedTransformerAdapter(**our_config(config, MaskedTransformerAdapter))
    else:
        adapter = MaskedTransformerAdapter.from_preset(backbone, out_channels=config["out_channels"])
    state = rename_official_keys(official_state(tensors, metadata))
    if adapter.projection is None:
        state = {key: value for key, value in state.items() if not key.startswith("projection.")}
    adapter.load_state_dict(state)
    with torch.no_grad():
        features = adapter.eval()(tensors["input.tokens"], tensors["input.t"], tensors["input.y"])
    assert relative_error(features, tensors["output.adapter"]) <= 1e-5

"""The training loss against the official PixelREPA code on fixed draws (fixtures/official/loss_small.safetensors)."""

import pytest
import torch

from tests.official_fixtures import load_fixture, official_state, our_config, relative_error
from pixelrepa_diffusers import JiTTransformer2DModel, MaskedTransformerAdapter
from pixelrepa_diffusers.alignment import ALIGNMENTS, REPAProjector
from pixelrepa_diffusers.conversion import rename_official_keys
from pixelrepa_diffusers.losses import (
    JiTTrainingObjective,
    TrainingDraws,
    alignment_loss,
    draw_training_randomness,
)


def official_objective(alignment="pixelrepa"):
    """The objective with the official fixture weights and the fixture's recipe settings."""
    jit_tensors, jit_metadata = load_fixture("jit_small.safetensors")
    transformer = JiTTransformer2DModel(**our_config(jit_metadata["config"], JiTTransformer2DModel))
    transformer.load_state_dict(rename_official_keys(official_state(jit_tensors, jit_metadata)))
    mta_tensors, mta_metadata = load_fixture("mta_small.safetensors")
    config = mta_metadata["config"]
    adapter = MaskedTransformerAdapter(**our_config(config, MaskedTransformerAdapter))
    adapter.load_state_dict(rename_official_keys(official_state(mta_tensors, mta_metadata)))
    tensors, metadata = load_fixture("loss_small.safetensors")
    args = metadata["denoiser_args"]
    objective = JiTTrainingObjective(
        transformer, alignment=alignment, aligner=adapter if alignment == "pixelrepa" else None,
        alignment_weight=0.1, mask_ratio=args["patch_mask_ratio"], label_dropout=args["label_drop_prob"],
        p_mean=args["P_mean"], p_std=args["P_std"], t_eps=args["t_eps"], noise_scale=args["noise_scale"],
    )
    return objective.train(), tensors


def fixture_draws(tensors):
    return TrainingDraws(
        label_drop_uniform=tensors["draw.label_drop_uniform"],
        t_normal=tensors["draw.t_normal"],
        noise=tensors["draw.noise"],
        mask_uniform=tensors["draw.mask_uniform"].flatten(1),
    )


def test_loss_matches_official_on_fixed_draws():
    objective, tensors = official_objective()
    assert (tensors["intermediate.labels_dropped"] == 10).any(), "the fixture must drop a label"
    assert 0 < tensors["intermediate.keep"].mean() < 1, "the fixture must mask some tokens"
    losses = objective(tensors["input.x"], tensors["input.y"], targets=tensors["input.z_dino"],
                       draws=fixture_draws(tensors))
    assert relative_error(losses["loss_jit"], tensors["output.loss_jit"]) <= 1e-6
    assert relative_error(losses["loss_alignment"], tensors["output.loss_mta"]) <= 1e-6
    assert relative_error(losses["loss"], tensors["output.loss"]) <= 1e-6
    torch.testing.assert_close(losses["loss"], losses["loss_jit"] + 0.1 * losses["loss_alignment"])


def test_masking_and_dropout_change_the_loss():
    # The fixture draws matter: keeping every token or every label gives other losses.
    objective, tensors = official_objective()
    draws = fixture_draws(tensors)
    reference = objective(tensors["input.x"], tensors["input.y"], targets=tensors["input.z_dino"], draws=draws)
    unmasked = TrainingDraws(draws.label_drop_uniform, draws.t_normal, draws.noise, torch.ones_like(draws.mask_uniform))
    no_drop = TrainingDraws(torch.ones_like(draws.label_drop_uniform), draws.t_normal, draws.noise, draws.mask_uniform)
    for other in (unmasked, no_drop):
        losses = objective(tensors["input.x"], tensors["input.y"], targets=tensors["input.z_dino"], draws=other)
        assert relative_error(losses["loss_alignment"], reference["loss_alignment"]) > 1e-4


def test_jit_only_objective_matches_official_jit_loss():
    objective, tensors = official_objective(alignment="none")
    losses = objective(tensors["input.x"], tensors["input.y"], draws=fixture_draws(tensors))
    assert relative_error(losses["loss"], tensors["output.loss_jit"]) <= 1e-6
    assert losses["loss_alignment"] == 0


def test_one_encoder_pass_feeds_both_losses():
    objective, tensors = official_objective()
    calls = []
    for block in objective.transformer.blocks:
        block.register_forward_hook(lambda module, args, output: calls.append(module))
    losses = objective(tensors["input.x"], tensors["input.y"], targets=tensors["input.z_dino"],
                       draws=fixture_draws(tensors))
    assert calls == list(objective.transformer.blocks)
    losses["loss_alignment"].backward()
    first_block = objective.transformer.blocks[0].attn.to_qkv.weight
    assert first_block.grad.abs().sum() > 0, "the adapter loss must reach the shared encoder half"
    assert objective.transformer.mask_token.grad.abs().sum() > 0


def test_repa_projector_reads_the_chosen_layer():
    objective, tensors = official_objective(alignment="none")
    transformer = objective.transformer
    torch.manual_seed(0)
    projector = REPAProjector(hidden_size=64, projector_dim=32, out_channels=48)
    repa = JiTTrainingObjective(transformer, alignment="repa", aligner=projector, repa_depth=3,
                                alignment_weight=0.5, t_eps=0.05)
    draws = fixture_draws(tensors)
    losses = repa(tensors["input.x"], tensors["input.y"], targets=tensors["input.z_dino"], draws=draws)
    # The same layer computed by hand: blocks 0..2 on the noisy image, image tokens only.
    t = torch.sigmoid(draws.t_normal * 0.8 - 0.8)
    labels = torch.where(draws.label_drop_uniform < 0.1, torch.full_like(tensors["input.y"], 10), tensors["input.y"])
    noisy = t.view(-1, 1, 1, 1) * tensors["input.x"] + (1 - t.view(-1, 1, 1, 1)) * draws.noise
    conditioning, label_embedding = transformer.embed_conditions(t, labels)
    hidden = transformer.run_blocks(transformer.embed_patches(noisy), conditioning, label_embedding, 0, 3)
    expected = alignment_loss(projector(hidden[:, -16:]), tensors["input.z_dino"])
    torch.testing.assert_close(losses["loss_alignment"], expected)
    assert relative_error(losses["loss_jit"], tensors["output.loss_jit"]) <= 1e-6
    torch.testing.assert_close(losses["loss"], losses["loss_jit"] + 0.5 * losses["loss_alignment"])


def test_draws_follow_the_official_order():
    images = torch.zeros(4, 3, 32, 32)
    torch.manual_seed(101)
    draws = draw_training_randomness(images, num_patches=16, with_mask=True)
    torch.manual_seed(101)
    assert torch.equal(draws.label_drop_uniform, torch.rand(4))
    assert torch.equal(draws.t_normal, torch.randn(4))
    assert torch.equal(draws.noise, torch.randn(4, 3, 32, 32))
    assert torch.equal(draws.mask_uniform, torch.rand(4, 1, 4, 4).flatten(1))


@pytest.mark.usefixtures("vectorized_random_draws")
def test_official_seed_replays_the_fixture_draws():
    _, tensors = official_objective()
    torch.manual_seed(101)
    draws = draw_training_randomness(tensors["input.x"], num_patches=16, with_mask=True)
    assert torch.equal(draws.noise, tensors["draw.noise"])
    assert torch.equal(draws.mask_uniform, tensors["draw.mask_uniform"].flatten(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(alignment="dino"), "alignment must be one of"),
    (dict(alignment="pixelrepa"), "aligner must be given"),
    (dict(alignment="repa", aligner=torch.nn.Identity(), repa_depth=9), "repa_depth must be in"),
])
def test_bad_arguments_are_named(kwargs, message):
    objective, _ = official_objective(alignment="none")
    with pytest.raises(ValueError, match=message):
        JiTTrainingObjective(objective.transformer, **kwargs)


def test_alignment_without_targets_is_refused():
    objective, tensors = official_objective()
    with pytest.raises(ValueError, match="targets .* are needed with alignment 'pixelrepa'"):
        objective(tensors["input.x"], tensors["input.y"], draws=fixture_draws(tensors))


def test_each_alignment_method_owns_its_defaults_and_folder():
    assert list(ALIGNMENTS) == ["none", "repa", "pixelrepa"]
    assert {name: (method.default_weight, method.folder, method.masks_tokens)
            for name, method in ALIGNMENTS.items()} == {
        "none": (None, None, False),
        "repa": (0.5, "projector", False),
        "pixelrepa": (0.1, "adapter", True),
    }
    assert [name for name, method in ALIGNMENTS.items() if method.exports_aligner] == ["pixelrepa"]


def test_aligners_are_built_from_the_backbone_config_and_encoder_width(tmp_path):
    objective, _ = official_objective(alignment="none")
    config = objective.transformer.config
    assert ALIGNMENTS["none"].build_aligner(config, 48, 32, None) is None
    projector = ALIGNMENTS["repa"].build_aligner(config, 48, 32, None)
    assert isinstance(projector, REPAProjector) and dict(projector.config).items() >= {
        "hidden_size": config.hidden_size, "projector_dim": 32, "out_channels": 48}.items()
    adapter = ALIGNMENTS["pixelrepa"].build_aligner(config, 48, 32, None)
    assert adapter.config.out_channels == 48 and adapter.config.hidden_size == config.hidden_size
    adapter.save_pretrained(tmp_path / "adapter")
    pretrained = ALIGNMENTS["pixelrepa"].build_aligner(config, 48, 32, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), pretrained.state_dict().values()))
    with pytest.raises(ValueError, match="outputs 48 channels but --encoder has width 32"):
        ALIGNMENTS["pixelrepa"].build_aligner(config, 32, 32, str(tmp_path))


@pytest.mark.parametrize("alignment, depth", [("none", 2), ("pixelrepa", 2), ("repa", 3)])
def test_alignment_depth_is_in_context_start_except_for_a_chosen_repa_depth(alignment, depth):
    objective, _ = official_objective(alignment="none")
    config = objective.transformer.config
    assert config.in_context_start == 2
    assert ALIGNMENTS[alignment].alignment_depth(config, 3) == depth
    assert ALIGNMENTS[alignment].alignment_depth(config, None) == 2

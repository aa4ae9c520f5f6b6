"""Official checkpoint -> convert CLI -> PixelREPAPipeline.from_pretrained -> the official images."""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import convert_official_checkpoint
from pipelines.official_code import random_official_state_dict
from pixelrepa_diffusers import JiTTransformer2DModel, MaskedTransformerAdapter, PixelREPAPipeline
from pixelrepa_diffusers.conversion import (
    adapter_from_checkpoint,
    backbone_state_dict,
    checkpoint_format,
    infer_transformer_config,
    initial_mask_token,
    load_official_checkpoint,
    official_variant,
    rename_official_keys,
    transformer_from_checkpoint,
)
from pixelrepa_diffusers.hub import render_model_card, variant_card_settings
from tests.official_fixtures import (
    adapter_tokens,
    load_fixture,
    load_variants,
    official_state,
    relative_error,
    stored_rows,
    width_inputs,
)
from tests.official_weights import official_checkpoint_dict

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "pipelines" / "convert_official_checkpoint.py"


def official_args(**overrides):
    fields = dict(model="JiT-small", mta="MTA-small", img_size=32, class_num=10, attn_dropout=0.0, proj_dropout=0.0,
                  noise_scale=1.0, t_eps=0.05, sampling_method="heun", num_sampling_steps=50, cfg=3.0,
                  interval_min=0.1, interval_max=1.0, patch_mask_ratio=0.2, output_dir="./output_dir",
                  gpu=0, distributed=True, dist_backend="nccl")
    fields.update(overrides)
    return argparse.Namespace(**fields)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """A checkpoint-last.pth laid out as main_pixelREPA.py saves it, from the random fixture weights."""
    net, net_meta = load_fixture("jit_small.safetensors")
    adapter, adapter_meta = load_fixture("mta_small.safetensors")
    net_state, adapter_state = official_state(net, net_meta), official_state(adapter, adapter_meta)
    model = {f"net.{key}": value for key, value in net_state.items()}
    model.update({f"masked_transformer_adapter.{key}": value for key, value in adapter_state.items()})
    model["repa_model.patch_embed.proj.weight"] = torch.randn(48, 3, 8, 8)
    parameters = [value for value in model.values()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.95))
    checkpoint = {
        "model": model,
        "optimizer": optimizer.state_dict(),
        "epoch": 4,
        "args": official_args(),
        "model_ema1": dict(net_state),
        "model_ema2": {key: value * 0.5 for key, value in net_state.items()},
    }
    path = tmp_path_factory.mktemp("official") / "checkpoint-last.pth"
    torch.save(checkpoint, path)
    return path


def run_cli(*args):
    """The CLI in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=REPO)


def run_cli_main(capsys, *args):
    """The CLI's main() in this process (faster), returning (exit code, stderr)."""
    code = convert_official_checkpoint.main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def test_round_trip_reproduces_official_sampling(official_checkpoint, tmp_path):
    out = tmp_path / "pipe"
    result = run_cli("--checkpoint_path", official_checkpoint, "--output_dir", out, "--in_context_start", 2)
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt*"))
    assert "library_name: diffusers" in (out / "README.md").read_text()
    pipe = PixelREPAPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_scale == 3.0 and list(pipe.config.guidance_interval) == [0.1, 1.0]

    samples, metadata = load_fixture("sample_small.safetensors")
    case = metadata["cases"]["heun_cfg3"]
    images = pipe(samples["heun_cfg3.labels"].tolist(), num_inference_steps=case["num_sampling_steps"],
                  latents=samples["heun_cfg3.noise"], output_type="pt").images
    expected = ((samples["heun_cfg3.output"] + 1) / 2).clamp(0, 1)
    assert relative_error(images, expected) <= 1e-4

    adapter = MaskedTransformerAdapter.from_pretrained(out / "adapter")
    tensors, _ = load_fixture("mta_small.safetensors")
    with torch.no_grad():
        features = adapter(tensors["input.tokens"], tensors["input.t"], tensors["input.y"])
    assert relative_error(features, tensors["output.adapter"]) <= 1e-5


def test_weights_choice_selects_ema2(official_checkpoint, tmp_path, capsys):
    assert run_cli_main(capsys, "--checkpoint_path", official_checkpoint, "--output_dir", tmp_path / "e1",
                        "--in_context_start", 2)[0] == 0
    assert run_cli_main(capsys, "--checkpoint_path", official_checkpoint, "--output_dir", tmp_path / "e2",
                        "--in_context_start", 2, "--weights", "ema2")[0] == 0
    ema1 = PixelREPAPipeline.from_pretrained(tmp_path / "e1").transformer.state_dict()
    ema2 = PixelREPAPipeline.from_pretrained(tmp_path / "e2").transformer.state_dict()
    torch.testing.assert_close(ema2["blocks.0.attn.to_qkv.weight"], 0.5 * ema1["blocks.0.attn.to_qkv.weight"])


def test_custom_model_without_in_context_start_is_refused(official_checkpoint, tmp_path, capsys):
    code, stderr = run_cli_main(capsys, "--checkpoint_path", official_checkpoint, "--output_dir", tmp_path / "x")
    assert code != 0 and "in_context_start" in stderr and len(stderr.strip().splitlines()) == 1
    assert "matches no JiT variant" in stderr and "hidden_size 64 from pos_embed (1, 16, 64), expected" in stderr
    assert not (tmp_path / "x").exists()


def test_preset_shape_mismatch_is_refused(official_checkpoint, tmp_path, capsys):
    code, stderr = run_cli_main(capsys, "--checkpoint_path", official_checkpoint, "--output_dir", tmp_path / "x",
                                "--model", "JiT-B/16")
    assert code != 0 and "do not match model 'JiT-B/16'" in stderr


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def bad_checkpoints(tmp_path, official_checkpoint):
    global MARKER
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(official_checkpoint.read_bytes()[:4096])
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"weight": torch.ones(2)}}, other)
    MARKER = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(), "args": official_args()}, evil)
    readme = tmp_path / "README.md"
    readme.write_text("# Not a checkpoint\n")
    return {"missing": tmp_path / "nope.pth", "truncated": truncated, "other": other, "evil": evil, "readme": readme}


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("truncated", "truncated or corrupt"),
                                           ("other", "not an official"), ("evil", "refusing to load"),
                                           ("readme", "is not a torch checkpoint")])
def test_cli_refuses_bad_checkpoints(official_checkpoint, tmp_path, kind, message, capsys):
    path = bad_checkpoints(tmp_path, official_checkpoint)[kind]
    code, stderr = run_cli_main(capsys, "--checkpoint_path", path, "--output_dir", tmp_path / "out",
                                "--in_context_start", 2)
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert "weights_only" not in stderr  # PyTorch's advice to unpickle unsafely is left out
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_cli_process_exits_non_zero_without_traceback(official_checkpoint, tmp_path):
    evil = bad_checkpoints(tmp_path, official_checkpoint)["evil"]
    result = run_cli("--checkpoint_path", evil, "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and "refusing to load" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_evil_fixture_would_run_code_if_unpickled_unsafely(official_checkpoint, tmp_path):
    evil = bad_checkpoints(tmp_path, official_checkpoint)["evil"]
    torch.load(evil, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_missing_weights_entry_is_named(official_checkpoint, tmp_path, capsys):
    checkpoint = load_official_checkpoint(official_checkpoint)
    del checkpoint["model_ema2"]
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    code, stderr = run_cli_main(capsys, "--checkpoint_path", old, "--output_dir", tmp_path / "x",
                                "--in_context_start", 2, "--weights", "ema2")
    assert code != 0 and len(stderr.strip().splitlines()) == 1
    assert "has no 'model_ema2' entry for weights 'ema2'" in stderr and not (tmp_path / "x").exists()
    code, _ = run_cli_main(capsys, "--checkpoint_path", old, "--output_dir", tmp_path / "y", "--in_context_start", 2)
    assert code == 0


def test_checkpoint_of_neither_format_is_refused(official_checkpoint, tmp_path, capsys):
    checkpoint = load_official_checkpoint(official_checkpoint)
    del checkpoint["model"]["net.mask_token"]
    mixed = tmp_path / "mixed.pth"
    torch.save(checkpoint, mixed)
    code, stderr = run_cli_main(capsys, "--checkpoint_path", mixed, "--output_dir", tmp_path / "x",
                                "--in_context_start", 2)
    assert code != 0 and len(stderr.strip().splitlines()) == 1
    assert "fits neither official format" in stderr and not (tmp_path / "x").exists()


# Each width case converts one of the three weight entries, so every format is tested with every --weights value.
WIDTH_WEIGHTS = {"PixelREPA-B/16": "ema1", "PixelREPA-L/16": "ema2", "PixelREPA-H/16": "model",
                 "JiT-B/16": "model", "JiT-L/16": "ema1", "JiT-H/16": "ema2",
                 "JiT-B/32": "ema2", "JiT-L/32": "model", "JiT-H/32": "ema1"}
SWIGLU_INNER = {768: 2048, 1024: 2730, 1280: 3413}  # int(int(4 * hidden) * 2 / 3), as the official code builds it


@pytest.fixture(scope="module")
def variants():
    return load_variants()


@pytest.fixture(scope="module")
def width_tensors():
    return load_fixture("official_widths.safetensors")[0]


@pytest.fixture(scope="module")
def converted_width(tmp_path_factory, variants):
    """variant -> pipeline folder converted by the CLI from an official-format checkpoint of its width model (the
    checkpoints are 100-534 MB, so each is deleted once converted, and the folders at the end)."""
    folders = {}

    def convert(variant):
        if variant not in folders:
            case = variants["width_cases"][variant]
            state = random_official_state_dict([(key, tuple(shape)) for key, shape in case["manifest"]], case["seed"])
            directory = tmp_path_factory.mktemp("width")
            path = directory / "checkpoint-last.pth"
            torch.save(official_checkpoint_dict(state, case["codebase"], argparse.Namespace(**case["args"]),
                                                WIDTH_WEIGHTS[variant]), path)
            code = convert_official_checkpoint.main(["--checkpoint_path", str(path), "--output_dir", str(directory / "pipe"),
                             "--weights", WIDTH_WEIGHTS[variant],
                             "--in_context_start", str(variants["width_in_context_start"])])
            assert code == 0
            path.unlink()
            folders[variant] = directory / "pipe"
        return folders[variant]

    yield convert
    for folder in folders.values():
        shutil.rmtree(folder)


@pytest.mark.parametrize("variant", WIDTH_WEIGHTS)
def test_width_model_converts_to_the_official_outputs(variant, converted_width, variants, width_tensors):
    folder = converted_width(variant)
    case = variants["width_cases"][variant]
    transformer = PixelREPAPipeline.from_pretrained(folder).transformer.eval()
    hidden_size = transformer.config.hidden_size
    assert transformer.blocks[0].ff.proj_out.in_features == SWIGLU_INNER[hidden_size]
    assert transformer.config.ff_inner_dim is None and transformer.config.mlp_ratio == 4.0
    x, t, y = width_inputs(variant, variants, width_tensors)
    with torch.no_grad():
        sample = transformer(x, t, y).sample
    assert relative_error(stored_rows(sample, variants), width_tensors[f"{variant}.forward"]) <= 1e-5
    if case["codebase"] == "pixelrepa":
        adapter = MaskedTransformerAdapter.from_pretrained(folder / "adapter").eval()
        assert adapter.config.out_channels == 768 and (adapter.projection is None) == (hidden_size == 768)
        tokens = adapter_tokens(variant, variants, hidden_size, transformer.num_patches)
        with torch.no_grad():
            features = adapter(tokens, t, y)
        assert relative_error(features, width_tensors[f"{variant}.adapter"]) <= 1e-5
    else:
        assert not (folder / "adapter").exists()
        torch.testing.assert_close(transformer.mask_token.data, initial_mask_token(hidden_size), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["PixelREPA-H/16", "JiT-H/32"])
def test_width_model_sampling_matches_official_generate(variant, converted_width, variants, width_tensors):
    case = variants["width_cases"][variant]
    settings, args = case["generate"], case["args"]
    pipe = PixelREPAPipeline.from_pretrained(converted_width(variant))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_scale == settings["cfg"] and list(pipe.config.guidance_interval) == [0.1, 1.0]
    assert pipe.scheduler.config.noise_scale == args["noise_scale"] == {256: 1.0, 512: 2.0}[args["img_size"]]
    size = args["img_size"]
    noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(settings["seed"]))
    final = {}

    def keep_latents(pipeline, step, t, tensors_at_step):
        final["latents"] = tensors_at_step["latents"]
        return tensors_at_step

    pipe(settings["labels"], num_inference_steps=settings["num_sampling_steps"], latents=noise, output_type="pt",
         callback_on_step_end=keep_latents)
    assert relative_error(stored_rows(final["latents"], variants), width_tensors[f"{variant}.generate"]) <= 1e-4


def meta_checkpoint(variant, variants, weights="ema1", **shape_overrides):
    """An official-format checkpoint of a released variant at full depth whose tensors take no memory (one element
    each, expanded), for models built on the meta device."""
    spec = variants["full"][variant]
    state = {key: torch.zeros(1).expand(shape_overrides.get(key, shape)) for key, shape in spec["manifest"]}
    return official_checkpoint_dict(state, spec["codebase"], argparse.Namespace(**spec["args"]), weights)


def public_config(model):
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


META_LOAD = "ignore:for .*copying from a non-meta parameter:UserWarning"  # loading into a meta model copies nothing


@pytest.mark.filterwarnings(META_LOAD)
@pytest.mark.parametrize("variant", WIDTH_WEIGHTS)
def test_released_variant_at_full_depth_converts_to_its_preset(variant, variants):
    args = variants["full"][variant]["args"]
    for weights in ("ema1", "ema2", "model"):
        checkpoint = meta_checkpoint(variant, variants, weights)
        assert checkpoint_format(checkpoint) == variants["full"][variant]["codebase"]
        assert official_variant(checkpoint) == variant
        official = backbone_state_dict(checkpoint, weights)
        with torch.device("meta"):
            transformer = transformer_from_checkpoint(checkpoint, weights)
            preset = JiTTransformer2DModel.from_preset(args["model"], dropout=args["proj_dropout"])
        assert public_config(transformer) == public_config(preset)
        expected_shapes = {key: tuple(value.shape) for key, value in rename_official_keys(official).items()}
        if checkpoint_format(checkpoint) == "jit":
            assert "mask_token" not in expected_shapes
            expected_shapes["mask_token"] = (1, 1, args_hidden(official))
        assert {key: tuple(value.shape) for key, value in transformer.state_dict().items()} == expected_shapes
        assert official["blocks.0.mlp.w12.weight"].shape[0] == 2 * SWIGLU_INNER[args_hidden(official)]
    with torch.device("meta"):
        adapter = adapter_from_checkpoint(checkpoint, public_config(transformer))
    if checkpoint_format(checkpoint) == "jit":
        assert adapter is None
    else:
        with torch.device("meta"):
            preset_adapter = MaskedTransformerAdapter.from_preset(args["model"], out_channels=768)
        assert public_config(adapter) == public_config(preset_adapter)
        assert adapter.blocks[0].ff.proj_out.in_features == SWIGLU_INNER[adapter.config.hidden_size]


def args_hidden(official_backbone):
    return official_backbone["pos_embed"].shape[-1]


def test_preset_with_another_swiglu_width_is_refused_naming_the_tensor(variants):
    checkpoint = meta_checkpoint("PixelREPA-H/16", variants, **{"net.blocks.0.mlp.w12.weight": (6824, 1280)})
    with pytest.raises(ValueError, match=r"ff_inner_dim 3412 from blocks\.0\.mlp\.w12\.weight \(6824, 1280\), "
                                         r"expected 3413"):
        infer_transformer_config(backbone_state_dict(checkpoint, "model"), checkpoint["args"])


@pytest.mark.filterwarnings(META_LOAD)
def test_custom_swiglu_width_is_read_from_shapes(variants):
    overrides = {}
    for i in range(32):
        overrides.update({f"net.blocks.{i}.mlp.w12.weight": (6824, 1280), f"net.blocks.{i}.mlp.w12.bias": (6824,),
                          f"net.blocks.{i}.mlp.w3.weight": (1280, 3412)})
    checkpoint = meta_checkpoint("JiT-H/32", variants, **overrides)
    with torch.device("meta"):
        transformer = transformer_from_checkpoint(checkpoint, model="JiT-custom", in_context_start=10)
    assert transformer.config.ff_inner_dim == 3412 and transformer.blocks[31].ff.proj_in.out_features == 6824
    assert isinstance(transformer.config.ff_inner_dim, int)


PUBLISHED_SAMPLERS = {  # guidance scale, noise scale (PixelREPA README; JiT README evaluation commands)
    "PixelREPA-B/16": (3.1, 1.0), "PixelREPA-L/16": (2.8, 1.0), "PixelREPA-H/16": (2.4, 1.0),
    "JiT-B/16": (3.0, 1.0), "JiT-L/16": (2.4, 1.0), "JiT-H/16": (2.2, 1.0),
    "JiT-B/32": (3.0, 2.0), "JiT-L/32": (2.5, 2.0), "JiT-H/32": (2.3, 2.0),
}


@pytest.mark.parametrize("variant", PUBLISHED_SAMPLERS)
def test_released_variants_default_to_their_published_sampler(variant):
    settings = variant_card_settings(variant, "<user>/x")
    assert (settings.guidance_scale, settings.noise_scale) == PUBLISHED_SAMPLERS[variant]
    assert settings.guidance_interval == (0.1, 1.0) and settings.num_inference_steps == 50
    assert settings.solver == "heun"
    assert settings.fid_statistics == f"fid_stats/jit_in{settings.architecture['sample_size']}_stats.npz"
    assert "(EMA 0.9999)" in settings.weights_source


@pytest.mark.parametrize("weights, described", [("ema2", "EMA 0.9996"), ("model", "the raw training weights")])
def test_cards_of_other_weights_leave_the_papers_metrics_out(weights, described):
    settings = variant_card_settings("JiT-H/32", "<user>/x", weights=weights)
    assert f"({described}" in settings.weights_source and settings.fid is None
    card = render_model_card(settings)
    assert card.data.eval_results is None and "Not measured yet" in card.text
    assert "| Initial noise scale | 2.0 |" in card.text


def test_full_size_jit_checkpoint_converts_with_its_published_defaults(variants, tmp_path, capsys):
    spec = variants["full"]["JiT-B/32"]
    state = {key: torch.full((1,), 0.02).expand(shape) for key, shape in spec["manifest"]}
    path = tmp_path / "checkpoint-last.pth"
    torch.save(official_checkpoint_dict(state, "jit", argparse.Namespace(**spec["args"])), path)
    code, stderr = run_cli_main(capsys, "--checkpoint_path", path, "--output_dir", tmp_path / "JiT-B-32")
    assert code == 0, stderr
    pipe = PixelREPAPipeline.from_pretrained(tmp_path / "JiT-B-32")
    assert pipe.config.guidance_scale == 3.0 and list(pipe.config.guidance_interval) == [0.1, 1.0]
    assert pipe.scheduler.config.noise_scale == 2.0 and pipe.scheduler.config.solver == "heun"
    assert pipe.transformer.config.sample_size == 512 and pipe.transformer.config.in_context_start == 4
    torch.testing.assert_close(pipe.transformer.mask_token.data, initial_mask_token(768), rtol=0, atol=0)
    assert 0.015 < pipe.transformer.mask_token.std() < 0.025
    card = (tmp_path / "JiT-B-32" / "README.md").read_text()
    assert "official 600-epoch checkpoint (EMA 0.9999), converted" in card and "512x512 images" in card
    assert "| Initial noise scale | 2.0 |" in card and "jit_in512_stats.npz" in card and "| FID-50K | 4.02 |" in card
    assert "Inception Score" not in card
    shutil.rmtree(tmp_path / "JiT-B-32")  # 533 MB

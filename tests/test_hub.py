"""Model cards, the upload's file set, and loading pushed pipelines by repo id from a local Hub server."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file

from pipelines.benchmark_utils import TINY_CONFIG
import pixelrepa_diffusers.scheduling_jit_flow_match
import pixelrepa_diffusers.transformer_jit
from tests.hub_server import LocalHub, unreachable_url
from tests.tiny_models import random_tiny_transformer
from pixelrepa_diffusers import JiTFlowMatchScheduler, MaskedTransformerAdapter, PixelREPAPipeline
from pixelrepa_diffusers.alignment import ALIGNMENTS
from pixelrepa_diffusers.hub import (
    CARD_METHODS,
    CARD_VARIANTS,
    CardSettings,
    alignment_card_text,
    push_pipeline_to_hub,
    released_variant,
    remote_code_files,
    render_model_card,
    training_recipe,
    upload_operations,
    variant_card_settings,
    write_variant_cards,
)
from pixelrepa_diffusers.transformer_jit import JIT_PRESETS

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "tester/tiny-pixelrepa"
TOKEN = "hf_local_test_token"  # the local Hub accepts any token; passing one keeps saved credentials out of tests
PIPELINE_FILES = {
    "README.md",
    "model_index.json",
    "pipeline_pixelrepa.py",
    "modular_pixelrepa.py",
    "modular_config.json",
    "modular_model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/transformer_jit.py",
    "scheduler/scheduler_config.json",
    "scheduler/scheduling_jit_flow_match.py",
    "adapter/config.json",
    "adapter/diffusion_pytorch_model.safetensors",
}

# Run in a fresh process with HF_ENDPOINT / HF_HUB_OFFLINE set, as a user would: once as a user with only diffusers
# (pixelrepa_diffusers made unimportable), once with the package, each with its own cache; both give the same images.
# Offline, diffusers 0.42 still asks the Hub about remote code given a repo id, so that user loads the folder that
# `snapshot_download` cached online (as the model card says).
LOAD_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)
repo_id, mode, remote_cache, images_path = sys.argv[1:]
sys.modules["pixelrepa_diffusers"] = None
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download, try_to_load_from_cache

if mode == "online":
    remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True, cache_dir=remote_cache)
    assert try_to_load_from_cache(repo_id, "adapter/config.json", cache_dir=remote_cache) is None  # _ignore_files
    snapshot_download(repo_id, cache_dir=remote_cache)
else:
    cached_folder = snapshot_download(repo_id, cache_dir=remote_cache)
    remote = DiffusionPipeline.from_pretrained(cached_folder, trust_remote_code=True)
assert type(remote).__module__.startswith("diffusers_modules."), type(remote)
del sys.modules["pixelrepa_diffusers"]
from pixelrepa_diffusers import PixelREPAPipeline

native = PixelREPAPipeline.from_pretrained(repo_id)
assert type(native) is PixelREPAPipeline, type(native)
images = {
    name: pipe([1, 7], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    for name, pipe in (("remote", remote), ("native", native))
}
torch.testing.assert_close(images["remote"], images["native"], rtol=0, atol=0)
if mode == "online":
    save_file({"images": images["native"]}, images_path)
else:
    torch.testing.assert_close(images["native"], load_file(images_path)["images"], rtol=0, atol=0)
"""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny pipeline with a card and an adapter, plus files a training run leaves that must not be uploaded."""
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline = PixelREPAPipeline(
        random_tiny_transformer(), JiTFlowMatchScheduler(), id2label={i: f"digit {i}" for i in range(10)},
        guidance_scale=2.0,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    adapter = MaskedTransformerAdapter(sample_size=32, patch_size=8, hidden_size=64, num_attention_heads=4,
                                       num_classes=10, in_context_len=4, out_channels=32)
    adapter.save_pretrained(folder / "adapter", safe_serialization=True)
    tiny_card(REPO_ID).save(folder / "README.md")
    for junk in ("checkpoints/checkpoint-10/optimizer.bin", "checkpoints/checkpoint-10/model.safetensors",
                 "transformer/diffusion_pytorch_model.bin", "training_args.bin", "logs/events.out", "samples.png"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_bytes(b"not for the Hub")
    return folder


def tiny_card(repo_id: str) -> ModelCard:
    return render_model_card(CardSettings(
        model_name="Tiny PixelREPA", repo_id=repo_id, method="PixelREPA", architecture=TINY_CONFIG,
        training={"Steps": 10, "Global batch": 8}, weights_source="Trained for a test.", guidance_scale=2.0,
        dataset="digits",
    ))


def folder_state(folder: Path) -> dict:
    """Every path under `folder` with its bytes, mode and modification time."""
    return {
        path.relative_to(folder): (path.read_bytes() if path.is_file() else None, path.stat().st_mode,
                                   path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def subprocess_env(tmp_path: Path, **overrides) -> dict:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE"))}
    return {**environment, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", **overrides}


def test_variant_cards_are_rendered_from_the_template_and_parse(tmp_path):
    written = write_variant_cards(tmp_path)
    committed = sorted(path.name for path in (REPO / "model_cards").glob("*.md") if path.name != "template.md")
    assert committed == sorted(path.name for path in written)
    for path in written:
        assert (REPO / "model_cards" / path.name).read_text() == path.read_text(), (
            f"model_cards/{path.name} is stale; regenerate with "
            "`python -c 'from pixelrepa_diffusers.hub import write_variant_cards; write_variant_cards()'`"
        )
    for (method, backbone), spec in CARD_VARIANTS.items():
        variant = spec["name"]
        card = ModelCard.load(REPO / "model_cards" / f"{variant.replace('/', '-')}.md")
        assert card.data.library_name == "diffusers"
        assert card.data.pipeline_tag == "unconditional-image-generation"
        assert card.data.license == "mit"
        assert card.data.datasets == ["imagenet-1k"]
        assert card.data.model_name == variant and method.lower() in card.data.tags
        metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
        published = {"fid": spec["fid"], "inception_score": spec["inception_score"]}
        assert metrics == {key: value for key, value in published.items() if value is not None}
        assert ("Inception Score" in card.text) == (spec["inception_score"] is not None)
        assert all(result.source_name.startswith("as reported by the") for result in card.data.eval_results)
        assert f"| Classifier-free guidance scale | {spec['guidance_scale']} |" in card.text
        assert "50 steps" in card.text and "applied for 0.1 < t < 1.0" in card.text
        resolution = JIT_PRESETS[backbone]["sample_size"]
        assert f"{resolution}x{resolution} images" in card.text and f"jit_in{resolution}_stats.npz" in card.text
        assert f"| Initial noise scale | {spec['noise_scale']} |" in card.text
        assert f"noise scale {spec['noise_scale']}" in card.text and "official 600-epoch checkpoint" in card.text
        assert "@misc{shin2026pixelrepa" in card.text and "@article{li2025jit" in card.text


def test_variants_are_keyed_by_method_and_backbone():
    assert CARD_VARIANTS["PixelREPA", "JiT-B/16"]["name"] == "PixelREPA-B/16"
    assert CARD_VARIANTS["JiT", "JiT-H/32"]["name"] == "JiT-H/32"
    assert {method for method, _ in CARD_VARIANTS} == {"PixelREPA", "JiT"}
    assert all(backbone in JIT_PRESETS for _, backbone in CARD_VARIANTS)


def test_cards_name_each_alignment_method_and_describe_its_aligner():
    assert CARD_METHODS == {"none": "JiT", "repa": "JiT+REPA", "pixelrepa": "PixelREPA"}
    assert list(CARD_METHODS) == list(ALIGNMENTS)
    assert alignment_card_text("none", 2, 0.2, "dinov2", None) is None
    assert alignment_card_text("repa", 3, 0.2, "dinov2", 0.5) == (
        "MLP projector on the tokens after block 3, cosine loss to dinov2, weight 0.5")
    assert alignment_card_text("pixelrepa", 2, 0.25, "dinov2", 0.1) == (
        "Masked Transformer Adapter on the tokens after block 2, 25% masked, cosine loss to dinov2, weight 0.1")


@pytest.mark.parametrize("alignment, backbone, variant", [
    ("pixelrepa", "JiT-L/16", "PixelREPA-L/16"), ("repa", "JiT-L/16", "JiT-L/16"), ("none", "JiT-H/32", "JiT-H/32"),
    ("pixelrepa", "JiT-B/32", None),
])
def test_a_run_defaults_to_its_methods_released_variant_else_plain_jits(alignment, backbone, variant):
    released = released_variant(alignment, backbone)
    assert (None if released is None else released["name"]) == variant


def test_training_recipe_takes_the_length_in_epochs_or_steps():
    common = dict(data="d", optimizer="o", learning_rate="l", p_mean=-0.8, p_std=0.8, t_eps=0.05, noise_scale=2.0,
                  label_dropout="0.1", ema="e", precision="p")
    recipe = training_recipe(**common, steps="7", alignment="a")
    assert list(recipe) == ["Data", "Steps", "Optimizer", "Learning rate", "Diffusion", "Label dropout", "EMA",
                            "Precision", "Alignment"]
    assert recipe["Diffusion"] == "x-prediction with v-loss; t = sigmoid(N(-0.8, 0.8^2)); t_eps 0.05; noise scale 2.0"
    assert list(training_recipe(**common, epochs="600", dropout="0"))[1:] == [
        "Epochs", "Optimizer", "Learning rate", "Diffusion", "Label dropout", "Dropout", "EMA", "Precision"]
    for length in ({}, dict(epochs="1", steps="2")):
        with pytest.raises(ValueError, match="exactly one of epochs and steps"):
            training_recipe(**common, **length)


def test_card_of_a_trained_model_without_metrics_parses():
    card = ModelCard(str(tiny_card("me/tiny")))
    assert card.data.eval_results is None and card.data.datasets == ["digits"]
    assert 'PixelREPAPipeline.from_pretrained("me/tiny")' in card.text
    assert "class_labels=[0, 1, 2, 3]" in card.text and "| Steps | 10 |" in card.text
    assert "Not measured yet" in card.text


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(method="DiT"), "method must be one of"),
        (dict(guidance_interval=(0.5, 0.2)), "guidance_interval"),
        (dict(fid=3.0, inception_score=280.0), "must be given together"),
        (dict(fid=3.0, metrics_source="measured"), "metrics_source_url must be given together"),
        (dict(inception_score=280.0), "need fid"),
        (dict(fid=3.0, inception_score=280.0, metrics_source="measured", metrics_source_url="https://example.org",
              dataset=None), "need the Hub dataset id"),
    ],
)
def test_render_model_card_rejects_bad_settings(override, message):
    settings = dict(
        model_name="x", repo_id="me/x", method="JiT", architecture=TINY_CONFIG, training={},
        weights_source="x", guidance_scale=1.0,
    )
    with pytest.raises(ValueError, match=message):
        render_model_card(CardSettings(**{**settings, **override}))


def test_remote_code_files_are_the_package_source(pipeline_dir):
    hub_index, files = remote_code_files(json.loads((pipeline_dir / "model_index.json").read_text()))
    assert hub_index["_class_name"] == ["pipeline_pixelrepa", "PixelREPAPipeline"]
    assert hub_index["transformer"] == ["transformer_jit", "JiTTransformer2DModel"]
    assert hub_index["scheduler"] == ["scheduling_jit_flow_match", "JiTFlowMatchScheduler"]
    assert hub_index["guidance_scale"] == 2.0 and hub_index["id2label"]["7"] == "digit 7"
    assert files["transformer/transformer_jit.py"] == Path(pixelrepa_diffusers.transformer_jit.__file__).read_bytes()
    assert files["scheduler/scheduling_jit_flow_match.py"] == Path(
        pixelrepa_diffusers.scheduling_jit_flow_match.__file__
    ).read_bytes()
    package_lines = Path(sys.modules[PixelREPAPipeline.__module__].__file__).read_text().splitlines()
    published_lines = files["pipeline_pixelrepa.py"].decode().splitlines()
    changed = [(old, new) for old, new in zip(package_lines, published_lines, strict=True) if old != new]
    assert changed == [
        ("from .scheduling_jit_flow_match import (", "from .scheduler.scheduling_jit_flow_match import ("),
        ("from .transformer_jit import (", "from .transformer.transformer_jit import ("),
    ]
    assert not any("pixelrepa_diffusers" in content.decode() for content in files.values())


def test_push_cli_uploads_only_card_configs_safetensors_and_modules(pipeline_dir, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO / "pipelines" / "push_to_hub.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        cli.main(["--pipeline_dir", str(pipeline_dir), "--hub_model_id", REPO_ID, "--token", TOKEN,
                  "--card_variant", "PixelREPA-B/16"])
        files = hub.files(REPO_ID)
    assert capsys.readouterr().out.startswith(f"{hub.url}/{REPO_ID}/commit/")
    assert set(files) - {".gitattributes"} == PIPELINE_FILES
    for path in ("transformer/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "adapter/diffusion_pytorch_model.safetensors"):
        assert files[path] == (pipeline_dir / path).read_bytes()
    hub_index = json.loads(files["model_index.json"])
    assert hub_index["_ignore_files"] == ["adapter/config.json", "adapter/diffusion_pytorch_model.safetensors"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.model_name == "PixelREPA-B/16" and f'from_pretrained("{REPO_ID}")' in card.text


def test_failed_upload_leaves_the_folder_untouched(pipeline_dir, monkeypatch):
    before = folder_state(pipeline_dir)
    with LocalHub(fail_commits=True) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        with pytest.raises(HfHubHTTPError, match="500"):
            push_pipeline_to_hub(pipeline_dir, REPO_ID, token=TOKEN)
        assert set(hub.files(REPO_ID)) == {".gitattributes"}
        assert ("POST", f"/api/models/{REPO_ID}/commit/main") in hub.requests
    assert folder_state(pipeline_dir) == before


def test_push_cli_with_unreachable_hub_prints_one_line(pipeline_dir, tmp_path):
    endpoint = unreachable_url()
    completed = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "push_to_hub.py"), "--pipeline_dir", str(pipeline_dir),
         "--hub_model_id", REPO_ID, "--token", TOKEN],
        env=subprocess_env(tmp_path, HF_ENDPOINT=endpoint), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode != 0
    assert completed.stderr.strip().splitlines() == [
        f"push_to_hub: error: Could not reach the Hugging Face Hub at {endpoint}: [Errno 111] Connection refused"
    ]


def test_load_by_repo_id_online_then_offline_from_cache(pipeline_dir, tmp_path, monkeypatch):
    images_path = tmp_path / "online_images.safetensors"
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        push_pipeline_to_hub(pipeline_dir, REPO_ID, token=TOKEN)
        online = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, REPO_ID, "online", str(tmp_path / "remote_cache"), str(images_path)],
            env=subprocess_env(tmp_path, HF_ENDPOINT=hub.url), capture_output=True, text=True, timeout=300,
        )
        assert online.returncode == 0, online.stderr
        assert ("GET", f"/api/models/{REPO_ID}/revision/main") in hub.requests
        resolved = {path.split("/resolve/", 1)[1].split("/", 1)[1] for _, path in hub.requests if "/resolve/" in path}
        assert {"pipeline_pixelrepa.py", "transformer/diffusion_pytorch_model.safetensors"} <= resolved

    assert not list((tmp_path / "hf_home" / "hub").rglob("adapter"))
    reference = PixelREPAPipeline.from_pretrained(pipeline_dir)
    expected = reference([1, 7], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    torch.testing.assert_close(load_file(images_path)["images"], expected)

    offline = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, REPO_ID, "offline", str(tmp_path / "remote_cache"), str(images_path)],
        env=subprocess_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert offline.returncode == 0, offline.stderr


@pytest.mark.parametrize("card_variant", [[], ["--card_variant", "PixelREPA-B/16"]])
def test_push_cli_renders_a_sample_grid_with_the_pipelines_sampler_into_the_card(pipeline_dir, tmp_path, monkeypatch,
                                                                                  card_variant):
    import shutil

    import numpy as np
    import PIL.Image

    from pixelrepa_diffusers.commands.push_to_hub import main as push_main

    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, folder)
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        assert push_main(["--pipeline_dir", str(folder), "--hub_model_id", REPO_ID, "--token", TOKEN,
                          "--sample_grid", "3", "7", *card_variant]) == 0
        files = hub.files(REPO_ID)
    card = files["README.md"].decode()
    assert "## Samples" in card and "![Samples of classes 3, 7](samples.png)" in card
    assert card.index("## Samples") < card.index("## Sampling settings")
    assert files["samples.png"] == (folder / "samples.png").read_bytes()
    grid = np.asarray(PIL.Image.open(folder / "samples.png").convert("RGB"))
    assert grid.shape == (64, 64, 3)  # a row per class, a column per seed (0, 1), 32 px each
    pipeline = PixelREPAPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    # The same batch as the grid's (classes 3, 3, 7, 7; seeds 0, 1, 0, 1): row 1, column 0 is class 7, seed 0.
    images = pipeline([3, 3, 7, 7], generator=[torch.Generator().manual_seed(seed) for seed in (0, 1, 0, 1)]).images
    np.testing.assert_array_equal(grid[32:, :32], np.asarray(images[2]))


def test_a_card_without_a_grid_says_nothing_of_one_and_uploads_no_image(pipeline_dir, monkeypatch):
    card = render_model_card(variant_card_settings("PixelREPA-B/16", REPO_ID))
    assert "## Samples" not in card.text and "samples.png" not in card.text
    assert "samples.png" not in {operation.path_in_repo for operation in upload_operations(pipeline_dir, REPO_ID)}


def test_a_bare_sample_grid_shows_the_first_four_classes(tmp_path):
    import PIL.Image

    from pixelrepa_diffusers.hub import write_sample_grid

    pipeline = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipeline.set_progress_bar_config(disable=True)
    grid = write_sample_grid(pipeline, tmp_path, [], seeds=[5])
    assert grid["class_labels"] == [0, 1, 2, 3] and grid["seeds"] == [5]
    assert PIL.Image.open(tmp_path / "samples.png").size == (32, 128)  # one column, four rows of 32 px

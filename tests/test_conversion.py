"""Official checkpoint -> convert CLI -> PixelREPAPipeline.from_pretrained -> the official images."""

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from official_fixtures import load_fixture, official_state, relative_error
from pixelrepa_diffusers import MaskedTransformerAdapter, PixelREPAPipeline

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
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(arg) for arg in args])
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
    return {"missing": tmp_path / "nope.pth", "truncated": truncated, "other": other, "evil": evil}


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("truncated", "truncated or corrupt"),
                                           ("other", "not an official"), ("evil", "Refusing to load")])
def test_cli_refuses_bad_checkpoints(official_checkpoint, tmp_path, kind, message, capsys):
    path = bad_checkpoints(tmp_path, official_checkpoint)[kind]
    code, stderr = run_cli_main(capsys, "--checkpoint_path", path, "--output_dir", tmp_path / "out",
                                "--in_context_start", 2)
    assert code != 0 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists()


def test_cli_process_exits_non_zero_without_traceback(official_checkpoint, tmp_path):
    evil = bad_checkpoints(tmp_path, official_checkpoint)["evil"]
    result = run_cli("--checkpoint_path", evil, "--output_dir", tmp_path / "out")
    assert result.returncode == 1 and "Refusing to load" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_evil_fixture_would_run_code_if_unpickled_unsafely(official_checkpoint, tmp_path):
    evil = bad_checkpoints(tmp_path, official_checkpoint)["evil"]
    torch.load(evil, weights_only=False)
    assert (tmp_path / "pwned").exists()

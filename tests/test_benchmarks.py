"""The sampling and training benchmark CLIs on CPU with tiny models (no timing is asserted), and the FLOP count."""

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend

from pipelines import benchmark_sampling, benchmark_solvers
from pipelines.benchmark_utils import (
    TINY_CONFIG,
    TINY_ENCODER,
    adapter_flops,
    model_flops_utilization,
    training_flops,
    transformer_flops,
    vit_encoder_flops,
)
from training import benchmark_checkpoint_memory, benchmark_data, benchmark_training

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/kaist-cvml+PixelREPA/repo")
TRAINING_TEST_ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)
# The tiny adapter of TINY_CONFIG, aligned to the 48-wide tiny encoder (so it has a projection head).
TINY_ADAPTER = dict(sample_size=32, patch_size=8, hidden_size=64, num_layers=2, mlp_ratio=4.0, in_context_len=4,
                    out_channels=48)
needs_official_code = pytest.mark.skipif(
    not MIRROR.exists() or importlib.util.find_spec("einops") is None,
    reason="the official PixelREPA mirror, or einops (which its code imports), is not here",
)


def run_cli(cli, *args, tmp_path):
    """Runs a benchmark CLI in-process; returns its results JSON."""
    output = tmp_path / "results.json"
    code = cli.main([*args, "--device", "cpu", "--output_json", str(output)])
    assert code == 0
    return json.loads(output.read_text())


def run_cli_subprocess(cli, *args, tmp_path):
    """Runs a benchmark CLI in its own process (the official code patches torch globally); returns its results."""
    output = tmp_path / "results.json"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", cli.__name__, *args, "--device", "cpu", "--num_threads", "1",
         "--output_json", str(output)],
        capture_output=True, text=True, cwd=REPO, env=environment, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(output.read_text())


def tiny_sampling_args(*extra):
    return ["--config_overrides", json.dumps(TINY_CONFIG), "--batch_size", "2", "--num_inference_steps", "3",
            "--repeats", "2", "--warmup", "0", *extra]


def tiny_training_args(*extra):
    return ["--config_overrides", json.dumps(TINY_CONFIG), "--encoder_overrides", json.dumps(TINY_ENCODER),
            "--batch_size", "2", "--steps", "1", "--repeats", "2", "--warmup", "1", "--mixed_precision", "no", *extra]


def test_flop_count_of_the_tiny_config_by_hand():
    tokens, hidden, inner = 16, 64, 170  # 4 x 4 patches of 8 px; SwiGLU width int(256 * 2 / 3)

    def block(length):  # qkv + out projection + SwiGLU, attention q k^T and a v, adaLN
        return 2 * length * (4 * hidden**2 + 3 * hidden * inner) + 4 * length**2 * hidden + 2 * hidden * 6 * hidden

    conditioning = 2 * (256 * hidden + hidden * hidden)
    backbone = (conditioning + 2 * tokens * (8 * 8 * 3 * 16 + 16 * hidden) + 2 * block(tokens) + 2 * block(tokens + 4)
                + 2 * hidden * 2 * hidden + 2 * tokens * hidden * 8 * 8 * 3)
    adapter = conditioning + 2 * block(tokens + 4) + 2 * tokens * (hidden * hidden + hidden * 48)
    encoder_block = 2 * 17 * (4 * 48**2 + 2 * 48 * 192) + 4 * 17**2 * 48
    encoder = 2 * tokens * 8 * 8 * 3 * 48 + 2 * encoder_block
    assert backbone == 8_173_568 and adapter == 4_495_360 and encoder == 2_285_952

    config = types.SimpleNamespace(in_channels=3, mlp_ratio=4.0, **TINY_CONFIG)
    adapter_config = types.SimpleNamespace(**TINY_ADAPTER)
    assert transformer_flops(config) == backbone
    assert adapter_flops(adapter_config) == adapter
    assert vit_encoder_flops(32, 8, 48, 2, 192, 1) == encoder
    assert training_flops(config, adapter_config, encoder) == 3 * (backbone + adapter) + encoder == 40_292_736


def test_b16_training_image_costs_about_220_gflop_and_mfu():
    config = types.SimpleNamespace(sample_size=256, patch_size=16, in_channels=3, hidden_size=768, num_layers=12,
                                   mlp_ratio=4.0, bottleneck_dim=128, in_context_len=32, in_context_start=4)
    adapter_config = types.SimpleNamespace(sample_size=256, patch_size=16, hidden_size=768, num_layers=2,
                                           mlp_ratio=4.0, in_context_len=32, out_channels=768)
    flops = training_flops(config, adapter_config, vit_encoder_flops(256, 16, 768, 12, 3072, 1))
    assert 215e9 < flops < 230e9
    achieved, mfu = model_flops_utilization(flops, 1000.0, 989.0)
    assert achieved == pytest.approx(flops * 1000 / 1e12)
    assert mfu == pytest.approx(achieved / 989.0)
    assert model_flops_utilization(flops, 1000.0, None)[1] is None


def test_sampling_cli_against_the_plain_baseline(tmp_path):
    results = run_cli(benchmark_sampling, *tiny_sampling_args(), tmp_path=tmp_path)
    assert results["baseline_kind"] == "plain" and results["model_evaluations"] == 5
    for name in ("ours", "baseline"):
        assert len(results[name]["seconds"]) == 2 and results[name]["images_per_second"] > 0
    assert results["speedup"] > 0
    assert results["relative_difference"] < 1e-5  # SDPA and the materialised fp32 attention agree in fp32


def test_sampling_cli_bf16_within_the_stated_tolerance(tmp_path):
    results = run_cli(benchmark_sampling,
                      *tiny_sampling_args("--dtype", "bf16", "--baseline_dtype", "fp32"), tmp_path=tmp_path)
    assert results["dtype"] == "bf16" and results["baseline_dtype"] == "fp32"
    assert 0 < results["mean_image_difference"] < 0.01  # BENCHMARKS.md states these bf16 tolerances
    assert results["relative_difference"] < 0.05


def test_sampling_cli_official_regime_is_the_bf16_baseline_and_close_to_fp32(tmp_path):
    same = run_cli(benchmark_sampling,
                   *tiny_sampling_args("--precision", "official", "--baseline_dtype", "bf16"), tmp_path=tmp_path)
    assert same["precision"] == "official" and same["baseline_dtype"] == "bf16"
    assert same["max_image_difference"] == 0  # the same ops as the baseline's official regime
    against_fp32 = run_cli(benchmark_sampling,
                           *tiny_sampling_args("--precision", "official", "--baseline_dtype", "fp32"),
                           tmp_path=tmp_path)
    assert 0 < against_fp32["mean_image_difference"] < 0.01
    assert 0 < against_fp32["relative_image_difference"] < 0.05


@pytest.mark.slow
@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_sampling_cli_with_an_attention_backend_and_regional_compile_matches_the_baseline(tmp_path):
    with attention_backend("native"):  # the CLI sets diffusers' process-wide backend; give it back
        results = run_cli(benchmark_sampling,
                          *tiny_sampling_args("--attention_backend", "_native_math", "--compile"), tmp_path=tmp_path)
    assert results["attention_backend"] == "_native_math" and results["compile"]
    assert results["relative_difference"] < 1e-5


def test_sampling_cli_forward_only(tmp_path):
    results = run_cli(benchmark_sampling, *tiny_sampling_args("--forward_only"), tmp_path=tmp_path)
    assert results["mode"] == "forward" and results["model_evaluations"] == 1
    assert results["relative_difference"] < 1e-5


def test_training_cli_against_the_plain_baseline(tmp_path):
    results = run_cli(benchmark_training, *tiny_training_args("--peak_tflops", "1"), tmp_path=tmp_path)
    assert results["baseline_kind"] == "plain"
    assert results["gflops_per_image"] * 1e9 == pytest.approx(40_292_736)
    for name in ("ours", "baseline"):
        entry = results[name]
        assert entry["images_per_second"] > 0
        assert entry["achieved_tflops"] == pytest.approx(results["gflops_per_image"] * entry["images_per_second"] / 1e3)
        assert entry["mfu"] == pytest.approx(entry["achieved_tflops"] / 1.0)
    assert results["speedup"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_training_cli_times_the_scripts_compiled_step_against_its_eager_step(tmp_path):
    # The shapes of test_training's compiled run, which then reuses these compiled blocks in the same pytest process.
    shapes = ("--encoder_overrides", json.dumps(TRAINING_TEST_ENCODER), "--batch_size", "8")
    torch._dynamo.utils.counters.clear()
    results = run_cli(benchmark_training, *tiny_training_args("--compile", "--eager_baseline", *shapes),
                      tmp_path=tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # train_pixelrepa.compile_blocks compiled
    assert results["baseline_kind"] == "eager" and results["compile"]
    assert results["speedup"] == results["ours"]["images_per_second"] / results["baseline"]["images_per_second"]
    for name in ("ours", "baseline"):
        assert results[name]["first_step_seconds"] > 0


def test_training_cli_gradient_checkpointing_without_baseline(tmp_path):
    results = run_cli(benchmark_training,
                      *tiny_training_args("--gradient_checkpointing", "--skip_baseline"), tmp_path=tmp_path)
    assert results["gradient_checkpointing"] and results["baseline_kind"] == "none"
    assert "baseline" not in results and "speedup" not in results
    assert results["ours"]["mfu"] is None


def test_checkpoint_memory_cli_finds_no_model_copy_on_any_process(tmp_path):
    output = tmp_path / "results.json"
    assert benchmark_checkpoint_memory.main(["--num_layers", "1", "--output_json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["script"] == str(REPO / "training" / "train_pixelrepa.py")
    assert results["parameters"] > 1e7  # B/16 width: one 768-wide block and the embeddings
    assert [process["rank"] for process in results["processes"]] == [0, 1]
    for process in results["processes"]:
        assert len(process["saves"]) == 2
        # Copying both EMAs, as checkpoints did before gathered_state_dict, adds 2.00 model copies on every process.
        assert process["model_copies"] < 0.1, process


def test_data_cli_times_every_layout_against_torchvision(tmp_path):
    output = tmp_path / "results.json"
    assert benchmark_data.main(["--num_images", "24", "--resolution", "32", "--min_seconds", "0.05", "--repeats", "1",
                                "--num_proc", "2", "--output_json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert list(results["paths"]) == [benchmark_data.BASELINE, "ours: image folder", "ours: Hub parquet",
                                      "ours: WebDataset tar", "ours: prepare_dataset.py output"]
    assert results["paths"][benchmark_data.BASELINE]["ratio"] == 1.0
    for entry in (*results["paths"].values(), *results["candidates"].values()):
        assert entry["images_per_second"] > 0
        assert entry["cores_for_target"] == 2000 / entry["images_per_second"]
    # Whole epochs: each run loads a multiple of the 24 images.
    assert all(entry["images_per_run"] % 24 == 0 for entry in results["paths"].values())
    raw = results["candidates"]["raw uint8 (prepare_dataset.py)"]
    assert raw["bytes_per_image"] == 3 * 32 * 32
    assert results["paths"]["ours: prepare_dataset.py output"]["bytes_per_image"] > raw["bytes_per_image"]  # + label
    assert results["paths"]["ours: image folder"]["bytes_per_image"] == results["source_bytes_per_image"]


@pytest.mark.parametrize("cli, arguments, message", [
    (benchmark_checkpoint_memory, ["--checkout", "/nonexistent"], "--checkout '/nonexistent' holds no training/"),
    (benchmark_checkpoint_memory, ["--num_layers", "0"], "--num_layers must be >= 1, got 0"),
    (benchmark_data, ["--min_seconds", "0"], "--min_seconds must be > 0, got 0.0"),
    (benchmark_data, ["--num_proc", "0"], "--num_proc must be >= 1, got 0"),
])
def test_data_and_checkpoint_benchmarks_bad_input_is_one_line(cli, arguments, message, capsys):
    assert cli.main(arguments) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error


@pytest.mark.parametrize("cli, argument, message", [
    (benchmark_sampling, ["--batch_size", "0"], "--batch_size must be >= 1"),
    (benchmark_training, ["--steps", "0"], "--steps must be >= 1"),
    (benchmark_training, ["--eager_baseline"], "--eager_baseline needs --compile"),
    (benchmark_training, ["--compile", "--eager_baseline", "--skip_baseline"],
     "--skip_baseline and --eager_baseline exclude each other"),
    (benchmark_sampling, ["--reference_repo", "/nonexistent"], "holds neither model_pixelREPA.py"),
    (benchmark_sampling, ["--precision", "fp16"], "precision must be one of"),
    (benchmark_sampling, ["--precision", "official", "--dtype", "bf16"], "--dtype fp32"),
    (benchmark_sampling, ["--attention_backend", "flash-attention"],
     "`backend='flash-attention'` must be one of the following"),
    pytest.param(benchmark_sampling, ["--attention_backend", "xformers"], "'xformers' is not usable",
                 marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is here")),
])
def test_bad_input_is_one_line_on_stderr(cli, argument, message, capsys):
    code = cli.main([*argument, "--model", "JiT-B/16", "--config_overrides", json.dumps(TINY_CONFIG),
                               "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 1
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error


@needs_official_code
def test_sampling_cli_against_the_official_code(tmp_path):
    arguments = tiny_sampling_args("--reference_repo", str(MIRROR))
    results = run_cli_subprocess(benchmark_sampling, *arguments, tmp_path=tmp_path)
    assert results["baseline_kind"] == "official"
    assert results["relative_difference"] < 1e-5  # same weights and noise: the official samples


@needs_official_code
def test_training_cli_against_the_official_code(tmp_path):
    arguments = tiny_training_args("--reference_repo", str(MIRROR))
    results = run_cli_subprocess(benchmark_training, *arguments, tmp_path=tmp_path)
    assert results["baseline_kind"] == "official"
    assert results["ours"]["images_per_second"] > 0 and results["baseline"]["images_per_second"] > 0


def test_benchmark_solvers_writes_results_and_plot(tmp_path, capsys):
    from tests.tiny_models import random_tiny_transformer
    from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline

    PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0).save_pretrained(
        tmp_path / "pipe")
    json_path, plot_path = tmp_path / "solvers.json", tmp_path / "solvers.png"
    code = benchmark_solvers.main([
        "--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--classes", "1", "2", "--images_per_class", "1",
        "--solvers", "heun", "multistep2", "flow_euler", "--time_grids", "uniform", "guidance", "--steps", "2", "8",
        "--reference_steps", "8", "--output_json", str(json_path), "--output_plot", str(plot_path)])
    assert code == 0
    summary = json.loads(json_path.read_text())
    results = {(r["solver"], r["time_grid"], r["steps"]): r for r in summary["results"]}
    assert set(results) == {(solver, grid, steps) for solver in ("heun", "multistep2") for grid in ("uniform", "guidance")
                            for steps in (2, 8)} | {("flow_euler", "own", 2), ("flow_euler", "own", 8),
                                                    ("heun", "uniform", 50)}
    assert results[("heun", "uniform", 8)]["error"] == 0  # the reference itself: same noise, same solver
    assert results[("heun", "uniform", 50)]["evaluations"] == 99 and results[("multistep2", "guidance", 8)][
        "evaluations"] == 8
    assert summary["heun_50"] == results[("heun", "uniform", 50)]
    best = summary["fewest_evaluations_matching_heun_50"]
    assert best["error"] <= summary["heun_50"]["error"]
    assert all(r["evaluations"] >= best["evaluations"] for r in summary["results"] if r["error"] <= best["error"])
    assert plot_path.stat().st_size > 10_000
    assert f"Fewest evaluations at that error: {best['evaluations']}" in capsys.readouterr().out

"""pipelines/gpu_check.py: its plan, backend probe, time limit and table on CPU; the tiny dry run end to end (slow)."""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_every_planned_run_is_a_command_line_its_benchmark_accepts_and_measures_the_gpu_figures():
    args = gpu_check.parse_args(["--reference_repo", "PixelREPA", "--device", "cuda"])
    runs = gpu_check.plan(args, {"native": "ok", "_native_cudnn": "ok", "flash": "not usable"})
    parsed = {}
    for name, command in runs.items():
        assert command[0] == "-m"
        module = importlib.import_module(command[1])
        parsed[name] = module.parse_args([*command[2:], "--output_json", "out.json"])  # exits on a flag it lacks
        assert parsed[name].device == "cuda"
    b16, h16, official = parsed["train_b16"], parsed["train_h16_ckpt"], parsed["sample_official"]
    # Training: B/16 compiled in bf16 against the official code, H/16 with checkpointing (no baseline fits).
    assert (b16.model, b16.batch_size, b16.mixed_precision, b16.compile, b16.reference_repo) == (
        "JiT-B/16", 128, "bf16", True, "PixelREPA")
    assert b16.peak_tflops == gpu_check.H100_PEAK_TFLOPS
    assert (h16.model, h16.gradient_checkpointing, h16.skip_baseline) == ("JiT-H/16", True, True)
    # Sampling: the official regime at batch 256 against the official code, then each usable backend in bf16.
    assert (official.batch_size, official.precision, official.reference_repo) == (256, "official", "PixelREPA")
    backends = {run.attention_backend: run for name, run in parsed.items() if name.startswith("sample_") and
                run.attention_backend is not None}
    assert sorted(backends) == ["_native_cudnn", "native"]
    assert all(run.dtype == "bf16" and run.compile and run.batch_size == 256 for run in backends.values())
    # Deviation from fp32: each of the three regimes once.
    deviations = [parsed[name] for name in parsed if name.startswith("deviation_")]
    assert all(run.baseline_dtype == "fp32" for run in deviations)
    assert sorted((run.dtype, run.precision) for run in deviations) == [
        ("bf16", "model"), ("fp32", "bf16_sdpa"), ("fp32", "official")]


def test_backend_probe_runs_what_works_and_says_why_the_others_do_not():
    status = gpu_check.available_backends(torch.device("cpu"), ("native", "xformers", "no_such_backend"))
    assert status["native"] == "ok"
    assert "'xformers' is not usable" in status["xformers"] or importlib.util.find_spec("xformers")
    assert "`backend='no_such_backend'` must be one of the following" in status["no_such_backend"]


def test_time_limit_stops_a_run_and_skips_the_rest(tmp_path):
    sleeper = ["-c", "import time; time.sleep(30)"]
    results = gpu_check.run_all({"slow": sleeper, "next": sleeper}, tmp_path, time_limit_s=2)
    assert results == {"slow": {"skipped": "stopped at the time limit of 2 s"},
                       "next": {"skipped": "the time limit of 2 s was reached"}}


def test_failed_run_records_its_last_error_line(tmp_path):
    failing = ["-c", "import sys; print('first', file=sys.stderr); sys.exit('error: bad flag')"]
    assert gpu_check.run_all({"bad": failing}, tmp_path, time_limit_s=60) == {"bad": {"error": "error: bad flag"}}


def test_table_has_a_row_per_run():
    entry = dict(images_per_second=100.0, peak_bytes=2**31, mfu=0.4)
    results = {
        "train_b16": {"ours": entry, "baseline": {**entry, "images_per_second": 50.0, "mfu": 0.2}},
        "sample_native": {"ours": dict(images_per_second=100.0, peak_bytes=2**31), "relative_image_difference": 1e-3},
        "deviation_official": {"ours": entry, "mean_image_difference": 1e-4, "max_image_difference": 1e-2,
                               "relative_image_difference": 3e-3},
        "sample_official": {"skipped": "the time limit of 570 s was reached"},
    }
    rows = gpu_check.summary_rows(results)
    assert rows[0] == ("train_b16", "100.0", "50.0", "MFU 40.0% / 20.0%", "2.00 GiB / 2.00 GiB")
    assert rows[1] == ("sample_native", "100.0", "-", "rel L2 to baseline 1.00e-03", "2.00 GiB")
    assert rows[2][3] == "mean 1.00e-04, max 1.00e-02, rel L2 3.00e-03"
    assert rows[3] == ("sample_official", "-", "-", "the time limit of 570 s was reached", "-")
    assert gpu_check.table(rows).count("\n") == 2 + len(rows)


def test_missing_reference_repo_is_one_line(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "pipelines.gpu_check", "--reference_repo",
                                "/nonexistent", "--output_dir", str(tmp_path)], capture_output=True, text=True,
                               cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 1
    assert completed.stderr == "error: --reference_repo /nonexistent does not exist\n"


@pytest.mark.slow
def test_tiny_dry_run_writes_the_json_and_table(tmp_path):
    completed = subprocess.run(["bash", str(REPO / "pipelines" / "gpu_check.sh"), "--tiny", "--device", "cpu",
                                "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                               env={"PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["backends"]["native"] == "ok"
    assert {name for name, result in summary["runs"].items() if "ours" not in result} == set()
    assert summary["runs"]["train_b16"]["ours"]["images_per_second"] > 0
    assert (tmp_path / "gpu_check.md").read_text().count("| sample_native |") == 1


def test_a_released_model_adds_the_search_and_the_fid_of_the_searched_solver(tmp_path):
    args = gpu_check.parse_args(["--device", "cuda", "--output_dir", str(tmp_path), "--released_model",
                                 "PixelREPA-B-16", "--fid_statistics_file", "jit_in256_stats.npz"])
    runs = gpu_check.plan(args, {})
    searched = str(tmp_path / "searched-10")
    assert runs["search_released"] == [
        "-m", "pixelrepa_diffusers.commands.search_solver", "--pretrained_model_name_or_path", "PixelREPA-B-16",
        "--output_dir", searched, "--num_inference_steps", "10", "--num_samples", "256", "--teacher_steps", "100",
        "--gradient_checkpointing", "--device", "cuda"]
    assert runs["fid_searched"] == [
        "-m", "pixelrepa_diffusers.commands.evaluate", "--pretrained_model_name_or_path", searched,
        "--fid_statistics_file", "jit_in256_stats.npz", "--num_images", "50000", "--batch_size", "256",
        "--num_inference_steps", "10"]
    (tmp_path / "searched-10").mkdir()  # a rerun: the search is done, the FID resumes
    assert "search_released" not in gpu_check.plan(args, {}) and "fid_searched" in gpu_check.plan(args, {})
    rows = gpu_check.summary_rows({
        "search_released": dict(rms_before=0.0123, rms_after=0.0045, seconds=312.4),
        "fid_searched": dict(arguments=dict(num_images=50000), results=[dict(fid=3.214, inception_score_mean=250.3)]),
    })
    assert rows == [("search_released", "-", "-", "RMS to Heun-100 0.0123 (multistep2) -> 0.0045 in 312 s", "-"),
                    ("fid_searched", "-", "-", "FID 3.21, IS 250.3 (50000 images)", "-")]


def test_a_released_model_without_statistics_is_one_line(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "pipelines.gpu_check", "--released_model", "PixelREPA-B-16",
                                "--output_dir", str(tmp_path)], capture_output=True, text=True,
                               cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 1
    assert completed.stderr.startswith("error: --released_model and --fid_statistics_file go together")
    assert completed.stderr.count("\n") == 1

"""FID / IS evaluation: parity with torch-fidelity, class balance, sharding over 2 processes, resume, bad input."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.transforms.functional import pil_to_tensor

from conftest import random_tiny_transformer
from inception_helpers import random_smooth_images, save_random_inception_weights
from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.data import center_crop_arr
from pixelrepa_diffusers.evaluation import (
    evaluation_class_labels,
    load_fid_statistics,
    load_inception,
)

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


def load_cli(name):
    """The module of pipelines/<name>.py."""
    spec = importlib.util.spec_from_file_location(name, REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pngs(images, folder):
    """uint8 (N, 3, H, W) images as folder/000000.png, ..."""
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(os.path.join(folder, f"{index:06d}.png"))
    return str(folder)


def torch_fidelity_metrics(generated_dir, reference_dir, weights):
    """torch-fidelity's own FID (against the reference folder) and IS, on CPU, without its cache."""
    return torch_fidelity.calculate_metrics(
        input1=generated_dir, input2=reference_dir, fid=True, isc=True, cuda=False, batch_size=20,
        feature_extractor_weights_path=weights, cache=False, save_cpu_ram=True, verbose=False,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Random Inception weights, a tiny saved pipeline, a reference image folder and its statistics made by
    pipelines/compute_reference_stats.py."""
    root = tmp_path_factory.mktemp("evaluation")
    weights = save_random_inception_weights(str(root / "inception.pth"))
    PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler()).save_pretrained(root / "pipeline")
    reference_dir = write_pngs(random_smooth_images(4, seed=2, brightness=80), root / "reference")
    stats = str(root / "reference_stats.npz")
    exit_code = load_cli("compute_reference_stats").main([
        "--image_folder", reference_dir, "--resolution", "32", "--output", stats,
        "--inception_weights", weights, "--batch_size", "4", "--num_workers", "0",
    ])
    assert exit_code == 0
    return {"root": root, "weights": weights, "pipeline": str(root / "pipeline"), "reference_dir": reference_dir,
            "stats": stats}


def test_reference_stats_from_a_dataset_use_the_adm_center_crop(assets, tmp_path):
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (40, 72, 3), dtype=np.uint8)) for _ in range(4)]
    datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()})).save_to_disk(
        tmp_path / "dataset"
    )
    exit_code = load_cli("compute_reference_stats").main([
        "--dataset_name", str(tmp_path / "dataset"), "--image_column", "img", "--resolution", "32",
        "--output", str(tmp_path / "stats.npz"), "--inception_weights", assets["weights"], "--num_workers", "0",
    ])
    assert exit_code == 0
    cropped = torch.stack([pil_to_tensor(center_crop_arr(image, 32)) for image in images])
    assert cropped.shape == (4, 3, 32, 32)
    features, _ = load_inception(assets["weights"])(cropped)
    statistics = load_fid_statistics(str(tmp_path / "stats.npz"))
    np.testing.assert_allclose(statistics["mu"], features.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(statistics["sigma"], np.cov(features.double().numpy(), rowvar=False), atol=1e-8)


def test_class_balanced_labels():
    labels = evaluation_class_labels(30, NUM_CLASSES)
    assert torch.equal(torch.bincount(labels, minlength=NUM_CLASSES), torch.full((NUM_CLASSES,), 3))
    drawn = evaluation_class_labels(30, NUM_CLASSES, class_balanced=False, seed=3)
    assert torch.equal(drawn, evaluation_class_labels(30, NUM_CLASSES, class_balanced=False, seed=3))
    assert drawn.min() >= 0 and drawn.max() < NUM_CLASSES
    with pytest.raises(ValueError, match="num_images must be at least 2"):
        evaluation_class_labels(1, NUM_CLASSES)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        evaluation_class_labels(25, NUM_CLASSES)


def cli_environment():
    """Environment of the evaluation subprocesses: one thread each, the repository importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def evaluate_arguments(assets, output_json, *extra):
    """CLI arguments of a small evaluation: 20 images of the tiny pipeline, 2 steps, shards of 5, a 2-scale sweep."""
    return [
        "--pretrained_model_name_or_path", assets["pipeline"], "--fid_statistics_file", assets["stats"],
        "--inception_weights", assets["weights"], "--num_images", "20", "--num_inference_steps", "2",
        "--batch_size", "5", "--images_per_shard", "5", "--guidance_scale", "1.0", "2.0",
        "--output_json", str(output_json), *extra,
    ]


@pytest.fixture(scope="module")
def two_process_run(assets):
    """pipelines/evaluate.py on 2 CPU processes: 20 images in 4 shards, a 2-scale sweep. (torchrun with
    ACCELERATE_USE_CPU, since `accelerate launch --cpu` starts several CPU processes only through mpirun.)"""
    output_json = assets["root"] / "two_process" / "results.json"
    output_json.parent.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "pipelines" / "evaluate.py"),
        *evaluate_arguments(assets, output_json, "--save_images", str(output_json.parent / "images")),
    ]
    environment = {**cli_environment(), "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_json, completed.stdout


def test_two_processes_share_shards_and_balance_classes(two_process_run, assets):
    output_json, stdout = two_process_run
    report = json.loads(output_json.read_text())
    assert report["num_processes"] == 2
    assert [result["guidance_scale"] for result in report["results"]] == [1.0, 2.0]
    assert "guidance_scale 2: FID" in stdout
    for result in report["results"]:
        assert result["reused_shards"] == 0 and np.isfinite(result["fid"])
        assert result["num_images"] == 20 and result["scheduler"]["solver"] == "heun"
        assert result["precision"] == "official" and result["transformer_dtype"] == "torch.float32"  # the defaults
        paths = sorted(Path(result["shard_dir"]).glob("shard-*.safetensors"))
        assert [path.name for path in paths] == [f"shard-{5 * i:06d}-{5 * i + 5:06d}.safetensors" for i in range(4)]
        makers = []
        for path in paths:
            with safe_open(path, "pt") as file:
                makers.append(file.metadata()["process_index"])
        assert makers == ["0", "1", "0", "1"]
        shards = [load_file(path) for path in paths]
        labels = torch.cat([shard["class_labels"] for shard in shards])
        assert torch.equal(torch.bincount(labels, minlength=NUM_CLASSES), torch.full((NUM_CLASSES,), 2))
        assert torch.equal(labels, torch.arange(NUM_CLASSES).repeat_interleave(2))


def test_fid_and_is_equal_torch_fidelity_calculate_metrics_on_the_saved_images(two_process_run, assets):
    output_json, _ = two_process_run
    first = json.loads(output_json.read_text())["results"][0]
    saved = output_json.parent / "images" / "guidance_1"
    assert sorted(path.name for path in saved.iterdir()) == [f"{index:06d}.png" for index in range(20)]
    # The reference statistics came from pipelines/compute_reference_stats.py; torch-fidelity reads the folder.
    expected = torch_fidelity_metrics(str(saved), assets["reference_dir"], assets["weights"])
    assert first["fid"] > 10 and first["inception_score_mean"] > 1.05  # the random Inception tells images apart
    assert abs(first["fid"] - expected["frechet_inception_distance"]) < 1e-3
    assert abs(first["inception_score_mean"] - expected["inception_score_mean"]) < 1e-3
    assert abs(first["inception_score_std"] - expected["inception_score_std"]) < 1e-3


def test_rerun_reuses_finished_shards(two_process_run, assets, tmp_path):
    output_json, _ = two_process_run
    first = json.loads(output_json.read_text())["results"]
    shard_root = tmp_path / "results_shards"
    shutil.copytree(output_json.parent / "results_shards", shard_root)
    scale_dir = shard_root / Path(first[0]["shard_dir"]).name
    lost = scale_dir / "shard-000005-000010.safetensors"
    before = load_file(lost)
    lost.unlink()  # as if process 1 crashed before finishing its first shard
    kept = {path: path.stat().st_mtime_ns for path in shard_root.rglob("shard-*.safetensors")}

    rerun_json = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), *evaluate_arguments(assets, rerun_json)],
        env=cli_environment(), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    second = json.loads(rerun_json.read_text())["results"]
    assert [result["reused_shards"] for result in second] == [3, 4]
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    # Image i depends only on seed + i, so one process regenerates what process 1 had made.
    after = load_file(lost)
    assert torch.equal(after["class_labels"], before["class_labels"])
    torch.testing.assert_close(after["features"], before["features"], rtol=1e-4, atol=1e-5)
    for old, new in zip(first, second):
        assert new["fid"] == pytest.approx(old["fid"], rel=1e-5)
        assert new["inception_score_mean"] == pytest.approx(old["inception_score_mean"], rel=1e-5)


def test_compiled_transformer_gives_the_same_metrics(assets, tmp_path):
    # In fp32 (--precision model): under bf16 autocast compiled kernels round apart from eager ones by design.
    results = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        output_json = tmp_path / f"{name}.json"
        completed = subprocess.run(
            [sys.executable, str(REPO / "pipelines" / "evaluate.py"), *evaluate_arguments(assets, output_json),
             "--precision", "model", *extra],
            env=cli_environment(), capture_output=True, text=True, timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[name] = json.loads(output_json.read_text())["results"]
    assert [result["precision"] for result in results["compiled"]] == ["model", "model"]
    # Compiled and eager fp32 agree to ~1e-6, which can flip a few uint8 pixels before Inception.
    for old, new in zip(results["eager"], results["compiled"]):
        assert new["fid"] == pytest.approx(old["fid"], rel=1e-3)
        assert new["inception_score_mean"] == pytest.approx(old["inception_score_mean"], rel=1e-3)


def bad_stats(path, **arrays):
    """An npz of the given arrays."""
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_mu", "lacks ['mu']"),
        ("wrong_shape", "has mu (64,) and sigma (64, 64)"),
        ("one_image", "num_images must be at least 2"),
        ("not_balanced", "multiple of the 10 classes"),
        ("missing_weights", "inception_weights: no such file"),
    ],
)
def test_evaluate_cli_bad_input_gives_one_line(case, message, assets, tmp_path, capsys):
    arguments = evaluate_arguments(assets, tmp_path / "results.json")
    replacements = {
        "no_mu": ("--fid_statistics_file", bad_stats(tmp_path / "no_mu.npz", sigma=np.eye(2048))),
        "wrong_shape": ("--fid_statistics_file", bad_stats(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))),
        "one_image": ("--num_images", "1"),
        "not_balanced": ("--num_images", "25"),
        "missing_weights": ("--inception_weights", str(tmp_path / "absent.pth")),
    }
    flag, value = replacements[case]
    arguments[arguments.index(flag) + 1] = value
    assert load_cli("evaluate").main(arguments) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "results.json").exists()


def test_evaluate_cli_bad_precision_gives_one_line(assets, tmp_path, capsys):
    arguments = [*evaluate_arguments(assets, tmp_path / "results.json"), "--precision", "bf16"]
    assert load_cli("evaluate").main(arguments) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: precision must be one of ('model', 'official'")
    assert not (tmp_path / "results.json").exists()


def test_offline_machine_without_inception_weights(assets, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    for name in ("HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens there: the network is unreachable
    arguments = evaluate_arguments(assets, tmp_path / "results.json")
    del arguments[arguments.index("--inception_weights") : arguments.index("--inception_weights") + 2]
    assert load_cli("evaluate").main(arguments) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "pass its path as inception_weights" in stderr


def test_evaluate_cli_process_exits_with_one_line_and_no_traceback(assets, tmp_path):
    arguments = evaluate_arguments(assets, tmp_path / "results.json")
    no_statistics = bad_stats(tmp_path / "no_mu_sigma.npz", mean=np.zeros(2048))
    arguments[arguments.index("--fid_statistics_file") + 1] = no_statistics
    completed = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), *arguments],
        env=cli_environment(), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().count("\n") == 0 and "lacks ['mu', 'sigma']" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_reference_stats_cli_bad_input(assets, tmp_path, capsys):
    cli = load_cli("compute_reference_stats")
    common = ["--output", str(tmp_path / "stats.npz"), "--inception_weights", assets["weights"], "--num_workers", "0"]
    assert cli.main(["--image_folder", str(tmp_path / "absent"), *common]) == 1
    assert capsys.readouterr().err.startswith("error: image_folder")
    write_pngs(random_smooth_images(1, seed=0, brightness=0), tmp_path / "one")
    assert cli.main(["--image_folder", str(tmp_path / "one"), *common]) == 1
    assert "at least 2 images" in capsys.readouterr().err
    assert not (tmp_path / "stats.npz").exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_inception_weights_that_would_run_code_are_refused(tmp_path):
    from pixelrepa_diffusers.evaluation import load_inception

    evil = tmp_path / "inception.pth"
    torch.save({"fc.weight": RunsCode()}, evil)
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_inception(str(evil))

"""Evaluation: FID / IS, precision, recall, KID, sFID, FD-DINOv2 against torch-fidelity and ADM's formulas, ADM
reference batches, sweep plots, class balance, sharding over 2 processes, resume, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import pil_to_tensor
from transformers import Dinov2Config, Dinov2Model

from pipelines import compute_reference_stats, evaluate
from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.data import center_crop_arr
from pixelrepa_diffusers.evaluation import (
    RunningMoments,
    evaluation_class_labels,
    image_features,
    load_dinov2,
    load_inception,
    load_reference,
    to_uint8,
)
from tests.tiny_models import random_tiny_transformer
from tests.inception_helpers import random_smooth_images, save_random_inception_weights
from tests.two_nodes import launch_two_nodes

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10


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
    exit_code = compute_reference_stats.main([
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
    exit_code = compute_reference_stats.main([
        "--dataset_name", str(tmp_path / "dataset"), "--image_column", "img", "--resolution", "32",
        "--output", str(tmp_path / "stats.npz"), "--inception_weights", assets["weights"], "--num_workers", "0",
    ])
    assert exit_code == 0
    cropped = torch.stack([pil_to_tensor(center_crop_arr(image, 32)) for image in images])
    assert cropped.shape == (4, 3, 32, 32)
    features, _ = load_inception(assets["weights"])(cropped)
    statistics = load_reference(str(tmp_path / "stats.npz"), ("fid",))
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


def test_two_nodes_without_a_shared_shard_dir_are_refused(assets, tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    arguments = [*evaluate_arguments(assets, tmp_path / "results.json"), "--shard_dir", shard_dir]
    for code, stderr in launch_two_nodes([REPO / "pipelines" / "evaluate.py", *arguments], private_folder=shard_dir):
        assert code != 0
        assert (f"error: shard_dir {shard_dir} is not one folder that every process sees: processes [1] "
                "of 2 do not find the main process's file there; on several nodes it must be a shared filesystem"
                ) in stderr, stderr[-2000:]
    assert not (tmp_path / "results.json").exists()


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


@pytest.mark.slow
@pytest.mark.usefixtures("compile_on_the_machines_kernels")
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
    assert evaluate.main(arguments) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "results.json").exists()


def test_evaluate_cli_bad_precision_gives_one_line(assets, tmp_path, capsys):
    arguments = [*evaluate_arguments(assets, tmp_path / "results.json"), "--precision", "bf16"]
    assert evaluate.main(arguments) == 1
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
    assert evaluate.main(arguments) == 1
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
    cli = compute_reference_stats
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
    refusal = "refusing to load inception_weights .*: it holds pickled objects outside the weights-only allow-list"
    with pytest.raises(ValueError, match=refusal):
        load_inception(str(evil))


# Precision, recall, sFID, KID and FD-DINOv2; ADM reference batches; guidance sweeps drawn as plots.

ALL_METRICS = ["fid", "is", "precision", "recall", "sfid", "kid", "fd_dinov2"]
KID_SUBSET_SIZE = 10


class ClassToken(torch.nn.Module):
    """What torch.hub.load("facebookresearch/dinov2", ...) returns, offline: a DINOv2 giving its final-norm class
    token."""

    def __init__(self, folder):
        super().__init__()
        self.model = Dinov2Model.from_pretrained(folder)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).pooler_output


@pytest.fixture(scope="module")
def metrics_assets(assets):
    """A random DINOv2 of the real architecture (ViT, patch 14, position grid of 518 px; narrow and shallow), a
    reference folder of 24 images (12 smooth random ones, 12 samples of the tiny pipeline from other seeds, so that
    precision and recall are neither 0 nor 1) and its reference npz with every metric's arrays, by
    compute_reference_stats."""
    root = assets["root"] / "metrics"
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                          image_size=518, layerscale_value=0.5)
    Dinov2Model(config).save_pretrained(root / "dinov2")
    pipeline = PixelREPAPipeline.from_pretrained(assets["pipeline"])
    samples = pipeline(torch.arange(12) % NUM_CLASSES, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                       generator=torch.Generator().manual_seed(1000)).images
    images = torch.cat([random_smooth_images(12, seed=5, brightness=60), to_uint8(samples)])
    reference_dir = write_pngs(images, root / "reference")
    stats = str(root / "reference.npz")
    exit_code = compute_reference_stats.main([
        "--image_folder", reference_dir, "--resolution", "32", "--output", stats, "--inception_weights",
        assets["weights"], "--batch_size", "8", "--num_workers", "0", "--metrics", *ALL_METRICS,
        "--dinov2_model", str(root / "dinov2"), "--num_features", "24",
    ])
    assert exit_code == 0
    return {**assets, "metrics_root": root, "dinov2": str(root / "dinov2"), "reference_dir": reference_dir,
            "stats": stats}


def metrics_arguments(assets, output_json, *extra):
    """evaluate_arguments for 10 images (2 shards) against the full reference, with every metric, KID subsets of 10
    and a 2 x 2 sweep over guidance scale and interval lower bound."""
    arguments = evaluate_arguments(assets, output_json)
    arguments[arguments.index("--num_images") + 1] = "10"
    return [
        *arguments, "--metrics", *ALL_METRICS, "--dinov2_model", assets["dinov2"],
        "--kid_subset_size", str(KID_SUBSET_SIZE), "--guidance_interval_min", "0.0", "0.5", *extra,
    ]


def one_setting(arguments):
    """The arguments cut to one setting of the sweep: guidance scale 1, interval [0, 1]."""
    scale, interval = arguments.index("--guidance_scale"), arguments.index("--guidance_interval_min")
    return [value for index, value in enumerate(arguments) if index not in (scale + 2, interval + 2)]


@pytest.fixture(scope="module")
def metrics_run(metrics_assets):
    """pipelines/evaluate.py with every metric on 2 CPU processes: 10 images in 2 shards for each of 4 settings."""
    output_json = metrics_assets["metrics_root"] / "run" / "results.json"
    output_json.parent.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "pipelines" / "evaluate.py"),
        *metrics_arguments(metrics_assets, output_json, "--save_images", str(output_json.parent / "images")),
    ]
    environment = {**cli_environment(), "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output_json, completed


def test_precision_recall_and_kid_equal_torch_fidelity_calculate_metrics(metrics_run, metrics_assets):
    output_json, _ = metrics_run
    first = json.loads(output_json.read_text())["results"][0]
    assert first["guidance_scale"] == 1.0 and first["guidance_interval"] == [0.0, 1.0]
    expected = torch_fidelity.calculate_metrics(
        input1=str(output_json.parent / "images" / "guidance_1_interval_0_1"), input2=metrics_assets["reference_dir"],
        prc=True, kid=True, kid_subset_size=KID_SUBSET_SIZE, cuda=False, batch_size=20, cache=False,
        feature_extractor="inception-v3-compat",  # ADM's; torch-fidelity's default for precision/recall is VGG-16
        feature_extractor_weights_path=metrics_assets["weights"], save_cpu_ram=True, verbose=False,
    )
    assert 0 < first["improved_precision"] < 1 or 0 < first["improved_recall"] < 1  # neither metric saturates
    assert abs(first["improved_precision"] - expected["precision"]) < 1e-3
    assert abs(first["improved_recall"] - expected["recall"]) < 1e-3
    assert first["kid_mean"] > 1e-3
    assert abs(first["kid_mean"] - expected["kernel_inception_distance_mean"]) < 1e-3
    assert abs(first["kid_std"] - expected["kernel_inception_distance_std"]) < 1e-3


def adm_spatial_features(inception, images):
    """ADM's spatial features re-derived: torch-fidelity's Inception run layer by layer up to mixed_6/conv (the
    1x1 branch of Mixed_6d, after its batch norm and ReLU), first 7 channels, flattened as TensorFlow's NHWC."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        x = getattr(inception, name)(x)
    x = inception.Mixed_6d.branch1x1(x)
    assert x.shape[1:] == (192, 17, 17)
    return x.permute(0, 2, 3, 1)[..., :7].reshape(len(x), -1).double().numpy()


def adm_frechet_distance(mu1, sigma1, mu2, sigma2):
    """FIDStatistics.frechet_distance of ADM's evaluator: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def read_pngs(folder):
    """uint8 (N, 3, H, W) of the PNGs in a folder, in name order."""
    return torch.stack([pil_to_tensor(Image.open(path)) for path in sorted(Path(folder).glob("*.png"))])


def test_sfid_equals_adm_formulas_on_rederived_spatial_features(metrics_run, metrics_assets):
    output_json, _ = metrics_run
    first = json.loads(output_json.read_text())["results"][0]
    inception = load_inception(metrics_assets["weights"])
    # Re-derived as the features were made: evaluate.py's processes ran one thread on batches of 5, the reference
    # statistics this process's threads on batches of 8. Convolution kernels that split their sums by thread (AVX2)
    # round features 1e-7 apart otherwise, which the near-singular 2023 x 2023 square root below makes 1e-3.
    threads = torch.get_num_threads()
    with torch.no_grad():
        images = read_pngs(output_json.parent / "images" / "guidance_1_interval_0_1")
        torch.set_num_threads(1)
        generated = np.concatenate([adm_spatial_features(inception, batch) for batch in images.split(5)])
        torch.set_num_threads(threads)
        reference_images = read_pngs(metrics_assets["reference_dir"])
        real = np.concatenate([adm_spatial_features(inception, batch) for batch in reference_images.split(8)])
    assert generated.shape == (10, 2023) and real.shape == (24, 2023)
    reference = np.load(metrics_assets["stats"])
    np.testing.assert_allclose(reference["mu_s"], real.mean(0), atol=1e-5)
    expected = adm_frechet_distance(generated.mean(0), np.cov(generated, rowvar=False), real.mean(0),
                                    np.cov(real, rowvar=False))
    assert expected > 1
    assert abs(first["sfid"] - expected) < 1e-3


def test_fd_dinov2_equals_torch_fidelity_with_the_same_random_dinov2(metrics_run, metrics_assets, monkeypatch):
    output_json, _ = metrics_run
    first = json.loads(output_json.read_text())["results"][0]
    loaded = []

    def hub_load(repository, model):
        loaded.append((repository, model))
        return ClassToken(metrics_assets["dinov2"])

    monkeypatch.setattr(torch.hub, "load", hub_load)
    expected = torch_fidelity.calculate_metrics(
        input1=str(output_json.parent / "images" / "guidance_1_interval_0_1"), input2=metrics_assets["reference_dir"],
        fid=True, feature_extractor="dinov2-vit-b-14", cuda=False, batch_size=20, cache=False, verbose=False,
    )
    assert loaded == [("facebookresearch/dinov2", "dinov2_vitb14")]
    assert first["fd_dinov2"] > 1e-3
    assert abs(first["fd_dinov2"] - expected["frechet_inception_distance"]) < 1e-3


def test_new_feature_sets_are_sharded_and_class_balanced(metrics_run):
    output_json, _ = metrics_run
    results = json.loads(output_json.read_text())["results"]
    settings = [(result["guidance_interval"][0], result["guidance_scale"]) for result in results]
    assert settings == [(0.0, 1.0), (0.0, 2.0), (0.5, 1.0), (0.5, 2.0)]
    for result in results:
        assert result["reused_shards"] == 0 and result["precision"] == "official"
        paths = sorted(Path(result["shard_dir"]).glob("shard-*.safetensors"))
        assert len(paths) == 2
        makers = []
        for path in paths:
            with safe_open(path, "pt") as file:
                makers.append(file.metadata()["process_index"])
                assert set(file.keys()) == {"features", "logits", "spatial", "dinov2", "class_labels"}
                assert file.get_slice("spatial").get_shape() == [5, 2023]
                assert file.get_slice("dinov2").get_shape() == [5, 48]
        assert makers == ["0", "1"]
        labels = torch.cat([load_file(path)["class_labels"] for path in paths])
        assert torch.equal(labels, torch.arange(NUM_CLASSES))


def test_sweep_plot_shows_the_json_values_and_marks_the_best(metrics_run):
    output_json, completed = metrics_run
    results = json.loads(output_json.read_text())["results"]
    plot = output_json.with_suffix(".png")
    assert f"wrote {plot}" in completed.stdout
    assert "guidance_scale 2 (interval [0.5, 1]): FID" in completed.stdout
    image = Image.open(plot)
    assert image.format == "PNG" and image.size[0] > 500
    described = json.loads(image.text["Description"])
    for key in ("fid", "inception_score_mean"):
        for minimum in (0.0, 0.5):
            expected = [[r["guidance_scale"], r[key]] for r in results if r["guidance_interval"][0] == minimum]
            assert described["series"][key][f"interval [{minimum:g}, 1]"] == expected
    best = min(results, key=lambda result: result["fid"])
    assert described["best"] == {key: best[key] for key in ("guidance_scale", "guidance_interval")}


def write_adm_batch(path, images, reference):
    """An ADM reference batch as distributed: arr_0 uint8 (N, H, W, 3) images, mu, sigma, mu_s, sigma_s."""
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy(), mu=reference["mu"], sigma=reference["sigma"],
             mu_s=reference["mu_s"], sigma_s=reference["sigma_s"])
    return str(path)


def test_adm_reference_batch_gives_the_metrics_of_our_npz(metrics_run, metrics_assets, tmp_path):
    output_json, _ = metrics_run
    reference = np.load(metrics_assets["stats"])
    adm = write_adm_batch(tmp_path / "VIRTUAL_random32.npz", read_pngs(metrics_assets["reference_dir"]), reference)
    outputs = {}
    for name, stats in (("ours", metrics_assets["stats"]), ("adm", adm)):
        outputs[name] = tmp_path / f"{name}.json"
        shard_dir = str(output_json.parent / "results_shards")
        arguments = one_setting(metrics_arguments(metrics_assets, outputs[name], "--shard_dir", shard_dir))
        arguments[arguments.index("--fid_statistics_file") + 1] = stats
        arguments[arguments.index("--metrics") + 1: arguments.index("--dinov2_model")] = ["fid", "precision",
                                                                                           "recall", "sfid", "kid"]
        assert evaluate.main(arguments) == 0
    ours, theirs = (json.loads(outputs[name].read_text())["results"] for name in ("ours", "adm"))
    assert len(ours) == len(theirs) == 1
    for mine, other in zip(ours, theirs):
        assert other["reused_shards"] == 2  # the shards of metrics_run hold every feature set asked for
        assert other["fid"] == pytest.approx(mine["fid"], abs=1e-6) and mine["fid"] > 10
        assert other["sfid"] == pytest.approx(mine["sfid"], abs=1e-6)
        # Features computed from arr_0 equal the stored ones (same images, same Inception) to float rounding.
        for key in ("improved_precision", "improved_recall", "kid_mean"):
            assert other[key] == pytest.approx(mine[key], abs=1e-4)


def test_rerun_regenerates_shards_lacking_a_new_feature_set(metrics_run, metrics_assets, tmp_path):
    output_json, _ = metrics_run
    first = json.loads(output_json.read_text())["results"][0]
    shard_root = tmp_path / "results_shards"
    run_dir = shard_root / Path(first["shard_dir"]).name
    run_dir.mkdir(parents=True)
    for path in Path(first["shard_dir"]).iterdir():
        shutil.copy(path, run_dir / path.name)
    partial = run_dir / "shard-000000-000005.safetensors"
    before = load_file(partial)
    save_file({key: value for key, value in before.items() if key != "spatial"}, partial)  # as if made without sFID
    kept = (run_dir / "shard-000005-000010.safetensors").stat().st_mtime_ns
    rerun_json = tmp_path / "results.json"
    arguments = one_setting(metrics_arguments(metrics_assets, rerun_json, "--shard_dir", str(shard_root)))
    completed = subprocess.run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), *arguments],
                               env=cli_environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (second,) = json.loads(rerun_json.read_text())["results"]
    assert second["shard_dir"] == str(run_dir) and second["reused_shards"] == 1
    assert (run_dir / "shard-000005-000010.safetensors").stat().st_mtime_ns == kept
    after = load_file(partial)
    for key in ("spatial", "dinov2", "features"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-5)
    for key in ("fid", "sfid", "fd_dinov2", "kid_mean", "improved_precision"):
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_metric", "metrics: unknown ['fd_clip']; choose from fid, is, precision"),
        ("no_features", "lacks ['features'] (or ADM's images arr_0), which precision needs"),
        ("no_spatial", "lacks ['mu_s', 'sigma_s'], which sfid needs"),
        ("other_resolution", "was built at 64 px; the pipeline samples at 32 px"),
        ("adm_other_resolution", "was built at 64 px; the pipeline samples at 32 px"),
        ("other_layer", "has features (24, 768); expected (N, 2048)"),
        ("spatial_shapes", "has mu_s (2023,) and sigma_s (768, 768); expected (2023,) and (2023, 2023)"),
        ("dinov2_width", "has mu_dinov2 (32,) and sigma_dinov2 (32, 32); expected (48,) and (48, 48)"),
        ("kid_subset", "kid_subset_size 30 is more than the 20 images or the 24 reference images"),
    ],
)
def test_metrics_bad_input_gives_one_line(case, message, metrics_assets, tmp_path, capsys):
    reference = dict(np.load(metrics_assets["stats"]))
    metrics = {"unknown_metric": ["fid", "fd_clip"], "no_features": ["fid", "precision"], "no_spatial": ["sfid"],
               "other_layer": ["kid"], "spatial_shapes": ["sfid"], "dinov2_width": ["fd_dinov2"],
               "kid_subset": ["kid", "--kid_subset_size", "30"]}.get(case, ["fid"])
    if case == "no_features":
        del reference["features"]
    elif case == "no_spatial":
        del reference["mu_s"]
        del reference["sigma_s"]
    elif case == "other_resolution":
        reference["resolution"] = np.array(64)
    elif case == "adm_other_resolution":
        del reference["resolution"]
        reference["arr_0"] = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    elif case == "other_layer":
        reference["features"] = reference["features"][:, :768]
    elif case == "spatial_shapes":
        reference["sigma_s"] = np.eye(768)
    elif case == "dinov2_width":  # statistics of a narrower DINOv2 than --dinov2_model's
        reference["mu_dinov2"], reference["sigma_dinov2"] = np.zeros(32), np.eye(32)
    stats = bad_stats(tmp_path / "reference.npz", **reference)
    arguments = [*evaluate_arguments(metrics_assets, tmp_path / "results.json"), "--metrics", *metrics,
                 "--dinov2_model", metrics_assets["dinov2"]]
    arguments[arguments.index("--fid_statistics_file") + 1] = stats
    assert evaluate.main(arguments) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.png").exists()
    assert not (tmp_path / "results_shards").exists()


def test_running_moments_equal_numpy_mean_and_covariance_in_constant_memory():
    rows = torch.rand(300, 2048, generator=torch.Generator().manual_seed(0)) * 4  # pool features are non-negative
    moments = RunningMoments()
    for batch in rows.split(64):
        moments.add(batch)
    statistics = moments.statistics()
    expected = rows.double().numpy()
    np.testing.assert_allclose(statistics["mu"], expected.mean(0), rtol=1e-12)
    np.testing.assert_allclose(statistics["sigma"], np.cov(expected, rowvar=False), rtol=1e-6, atol=1e-12)
    assert moments.sum.shape == (2048,) and moments.outer.shape == (2048, 2048)  # whatever the number of rows


# Reference statistics in shards: 2 processes against numpy over all images, resume, refusals, constant memory.


class PixelProjection(torch.nn.Module):
    """Stands in for Inception where its cost (0.3 s an image on one core here) would dominate: called like
    torch-fidelity's Inception on uint8 images (B, 3, 16, 16), it returns 2048 "pool features" and 1008 "logits",
    a fixed random projection of the pixels through a ReLU."""

    def __init__(self):
        super().__init__()
        weight = torch.randn(3 * 16 * 16, 2048 + 1008, generator=torch.Generator().manual_seed(0)) / 16
        self.register_buffer("weight", weight)

    def forward(self, images):
        outputs = torch.relu((images.flatten(1).float() / 255 - 0.5) @ self.weight)
        return outputs[:, :2048], outputs[:, 2048:]


STAND_IN_CLI = """import resource
import sys

from pipelines import compute_reference_stats
from tests.test_evaluation import PixelProjection

compute_reference_stats.load_inception = lambda weights, device: PixelProjection().to(device)
code = compute_reference_stats.main()
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB", file=sys.stderr)
sys.exit(code)
"""

# The stand-in's run: a few hundred images in 8 shards, 4 per process; Inception's (slow): fewer, with sFID.
SHARDED_RUNS = {
    "stand_in": {"images": 300, "resolution": 16, "shard_size": 40, "batch_size": 20,
                 "metrics": ["fid", "precision", "fd_dinov2"]},
    "inception": {"images": 80, "resolution": 32, "shard_size": 20, "batch_size": 10,
                  "metrics": ["fid", "precision", "sfid", "fd_dinov2"]},
}


def reference_cli(folder):
    """The stand-in's compute_reference_stats script, written into `folder`."""
    path = Path(folder) / "compute_reference_stats_stand_in.py"
    path.write_text(STAND_IN_CLI)
    return path


def reference_arguments(run, output, *extra):
    """compute_reference_stats arguments of a sharded run's settings, seed 1, 50 drawn features."""
    return [
        "--image_folder", run["image_folder"], "--resolution", str(run["resolution"]), "--output", str(output),
        "--inception_weights", run["weights"], "--batch_size", str(run["batch_size"]), "--num_workers", "0",
        "--shard_size", str(run["shard_size"]), "--metrics", *run["metrics"], "--dinov2_model", run["dinov2"],
        "--num_features", "50", "--seed", "1", *extra,
    ]


@pytest.fixture(scope="module", params=["stand_in", pytest.param("inception", marks=pytest.mark.slow)])
def sharded_reference(request, metrics_assets):
    """compute_reference_stats on 2 CPU processes (one thread each) over random 32 px images, several shards per
    process, with the stand-in or (slow) the random Inception."""
    root = metrics_assets["root"] / f"sharded_{request.param}"
    run = {**SHARDED_RUNS[request.param], "extractor": request.param, "weights": metrics_assets["weights"],
           "dinov2": metrics_assets["dinov2"], "output": root / "reference.npz"}
    images = torch.randint(0, 256, (run["images"], 3, 32, 32), generator=torch.Generator().manual_seed(7),
                           dtype=torch.uint8)
    run["image_folder"] = write_pngs(images, root / "images")
    script = reference_cli(root) if request.param == "stand_in" else REPO / "pipelines" / "compute_reference_stats.py"
    run["script"] = script
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *reference_arguments(run, run["output"])]
    environment = {**cli_environment(), "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return run


def test_sharded_reference_equals_numpy_over_all_images_and_the_seeded_draw(sharded_reference):
    run = sharded_reference
    # Today's computation: every image's features in one pass (one thread and the same batches as the run's
    # processes, so that features round alike), then np.mean and np.cov in float64.
    extractor = PixelProjection() if run["extractor"] == "stand_in" else load_inception(run["weights"])
    dinov2 = load_dinov2(run["dinov2"])
    sets = ["features", "spatial", "dinov2"] if "sfid" in run["metrics"] else ["features", "dinov2"]
    paths = sorted(Path(run["image_folder"]).glob("*.png"))
    pixels = torch.stack([pil_to_tensor(center_crop_arr(Image.open(path).convert("RGB"), run["resolution"]))
                          for path in paths])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = [image_features(batch, extractor, sets, dinov2) for batch in pixels.split(run["batch_size"])]
    torch.set_num_threads(threads)
    features = {name: torch.cat([batch[name] for batch in batches]).double().numpy() for name in sets}

    reference = np.load(run["output"])
    suffixes = {"features": "", "spatial": "_s", "dinov2": "_dinov2"}
    assert sorted(reference.files) == sorted(["features", "resolution"] + [f"{kind}{suffixes[name]}" for name in sets
                                                                          for kind in ("mu", "sigma")])
    for name in sets:
        np.testing.assert_allclose(reference[f"mu{suffixes[name]}"], features[name].mean(0), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(reference[f"sigma{suffixes[name]}"], np.cov(features[name], rowvar=False),
                                   rtol=1e-6, atol=1e-12)
    drawn = torch.randperm(run["images"], generator=torch.Generator().manual_seed(1))[:50].sort().values
    np.testing.assert_allclose(reference["features"], features["features"][drawn], rtol=1e-6, atol=1e-12)

    shard_dir = run["output"].parent / "reference_shards"
    starts = range(0, run["images"], run["shard_size"])
    names = [f"shard-{start:09d}-{min(start + run['shard_size'], run['images']):09d}.safetensors" for start in starts]
    assert sorted(path.name for path in shard_dir.glob("*.safetensors")) == names and len(names) >= 4
    makers = []
    for name in names:
        with safe_open(shard_dir / name, "pt") as file:
            makers.append(file.metadata()["process_index"])
    assert makers == ["0", "1"] * (len(names) // 2)


def test_reference_rerun_reuses_finished_shards_and_refuses_another_runs(sharded_reference, tmp_path):
    run = sharded_reference
    shard_dir = tmp_path / "shards"
    shutil.copytree(run["output"].parent / "reference_shards", shard_dir)
    lost = sorted(shard_dir.glob("*.safetensors"))[1]
    lost.unlink()  # as if process 1 was stopped before finishing its first shard
    kept = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in shard_dir.glob("*.safetensors")}

    output = tmp_path / "reference.npz"
    completed = subprocess.run(  # one plain process this time
        [sys.executable, str(run["script"]), *reference_arguments(run, output, "--shard_dir", str(shard_dir))],
        env=cli_environment(), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept} == kept
    with safe_open(lost, "pt") as file:
        assert file.metadata()["process_index"] == "0"
    before, after = np.load(run["output"]), np.load(output)
    assert before.files == after.files
    for name in before.files:
        assert np.array_equal(before[name], after[name]), name

    other = tmp_path / "other.npz"
    completed = subprocess.run(
        [sys.executable, str(run["script"]),
         *reference_arguments(run, other, "--shard_dir", str(shard_dir), "--seed", "2")],
        env=cli_environment(), capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: shard_dir {shard_dir} holds {sorted(kept)[0].name} of another run (features_draw "
                     "{'num_features': 50, 'seed': 1}, not {'num_features': 50, 'seed': 2}); remove its shards or "
                      "pass another shard_dir."]
    assert "Traceback" not in completed.stderr and not other.exists()
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept} == kept


def test_reference_stats_peak_memory_does_not_grow_with_the_image_count(tmp_path):
    # Two runs 10x apart in one process (the stand-in, 16 px images, 4 shards in the larger run, 100 drawn features).
    # Storing the pool features of every image, as before, adds 3600 x 2048 float32 = 29.5 MB from 400 to 4000
    # images (their logits 14.7 MB more); kept moments take 2 x 2048^2 float64 = 64 MiB whatever the count. So the
    # peak must grow by far less than 29.5 MB: the bound, 8 MB, leaves room for allocator noise (a few MB here).
    images = torch.randint(0, 256, (4000, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    script = reference_cli(tmp_path)
    peaks = {}
    for count in (400, 4000):
        folder = write_pngs(images[:count], tmp_path / f"images_{count}")
        completed = subprocess.run(
            [sys.executable, str(script), "--image_folder", folder, "--resolution", "16", "--output",
             str(tmp_path / f"reference_{count}.npz"), "--metrics", "fid", "precision", "--num_features", "100",
             "--shard_size", "1000", "--num_workers", "0"],
            env=cli_environment(), capture_output=True, text=True, timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        peaks[count] = int(completed.stderr.strip().splitlines()[-1].split()[2]) * 1024
    assert peaks[4000] - peaks[400] < 8e6, peaks

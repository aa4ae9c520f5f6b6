import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines import generate
from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from tests.tiny_models import random_tiny_transformer

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_generate_writes_images_and_grid(tmp_path, capsys):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), id2label={3: "three"})
    pipe.save_pretrained(tmp_path / "pipe")
    code = generate.main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "1", "three",
                            "5", "--num_inference_steps", "2", "--solver", "euler", "--output_dir",
                            str(tmp_path / "out")])
    assert code == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["0000-1.png", "0001-three.png", "0002-5.png", "grid.png"]
    assert PIL.Image.open(tmp_path / "out" / "grid.png").size == (64, 64)


def test_generate_bad_label_is_one_line(tmp_path, capsys):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    code = generate.main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "42",
                            "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "class_labels entry 42" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_generate_compiled_writes_the_eager_images(tmp_path):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "pipe")
    common = ["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "1", "5",
              "--num_inference_steps", "2"]
    assert generate.main([*common, "--output_dir", str(tmp_path / "eager")]) == 0
    assert generate.main([*common, "--compile", "--output_dir", str(tmp_path / "compiled")]) == 0
    for name in ("0000-1.png", "0001-5.png"):
        eager = np.asarray(PIL.Image.open(tmp_path / "eager" / name), dtype=np.int16)
        compiled = np.asarray(PIL.Image.open(tmp_path / "compiled" / name), dtype=np.int16)
        assert np.abs(eager - compiled).max() <= 1  # fp32 agreement to ~1e-6, up to uint8 rounding


def test_generate_precision_flag_reaches_the_pipeline(tmp_path):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "pipe")
    code = generate.main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "1", "5",
                            "--num_inference_steps", "2", "--precision", "official", "--device", "cpu",
                            "--output_dir", str(tmp_path / "out")])
    assert code == 0
    pipe.set_progress_bar_config(disable=True)
    for precision in ("official", "model"):
        expected = pipe([1, 5], num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0),
                        precision=precision).images
        written = [PIL.Image.open(tmp_path / "out" / name) for name in ("0000-1.png", "0001-5.png")]
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(written, expected))
        assert same == (precision == "official")


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "precision must be one of ('model', 'official', 'bf16_sdpa'), got 'fp16'"),
    (["--precision", "official", "--dtype", "bf16"], "--dtype fp32"),
])
def test_generate_bad_precision_is_one_line(tmp_path, capsys, argv, message):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    code = generate.main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "1",
                            "--output_dir", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_generate_solver_and_time_grid_flags_reach_the_scheduler(tmp_path):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "pipe")
    assert generate.main(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--class_labels", "1",
                            "--num_inference_steps", "5", "--solver", "multistep2", "--time_grid", "guidance",
                            "--output_dir", str(tmp_path / "out")]) == 0
    pipe.scheduler = JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance")
    expected = pipe([1], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pil").images
    written = np.asarray(PIL.Image.open(tmp_path / "out" / "0000-1.png"), dtype=np.int16)
    assert np.abs(written - np.asarray(expected[0], dtype=np.int16)).max() == 0
    pipe.scheduler = JiTFlowMatchScheduler()
    heun = pipe([1], num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pil").images
    assert np.abs(written - np.asarray(heun[0], dtype=np.int16)).max() > 0


def test_generate_path_that_is_neither_folder_nor_repo_id_is_one_line(tmp_path, capsys):
    code = generate.main(["--pretrained_model_name_or_path", "/nonexistent", "--class_labels", "1",
                            "--output_dir", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err == "error: No folder /nonexistent exists, and '/nonexistent' is not a Hub repo id.\n"


@pytest.mark.parametrize("script", ["generate", "evaluate", "convert_official_checkpoint", "push_to_hub"])
def test_every_cli_reports_a_bad_flag_in_one_line(script):
    result = subprocess.run([sys.executable, str(PIPELINES / f"{script}.py"), "--no_such_flag"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{script}.py: error: ")

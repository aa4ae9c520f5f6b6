"""The quick start (training/quickstart.sh) draws digits of the asked class, as judged by a digits classifier."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_CLASS = 20


def load_digit_folder(folder):
    """Grayscale pixels in [0, 1] (N, H * W) and labels of the quick start's image folder."""
    pixels, labels = [], []
    for label in range(10):
        for path in sorted((folder / str(label)).glob("*.png")):
            with Image.open(path) as image:
                pixels.append(np.asarray(image.convert("L"), dtype=np.float32).reshape(-1) / 255)
            labels.append(label)
    return np.stack(pixels), np.array(labels)


@pytest.mark.slow
def test_quickstart_samples_are_of_the_asked_class(tmp_path):
    output_dir = tmp_path / "quickstart_output"
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "training" / "quickstart.sh")],
        env={**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(output_dir)},
        capture_output=True, text=True, timeout=1800,
    )
    wall_time = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(output_dir / "samples.png") as grid:
        assert grid.size == (10 * 32, 10 * 32)

    pixels, labels = load_digit_folder(output_dir / "digits")
    train_pixels, test_pixels, train_labels, test_labels = train_test_split(
        pixels, labels, test_size=0.3, random_state=0, stratify=labels
    )
    assert SVC().fit(train_pixels, train_labels).score(test_pixels, test_labels) > 0.95, "the judge must be reliable"
    judge = SVC().fit(pixels, labels)

    pipeline = PixelREPAPipeline.from_pretrained(output_dir / "model")
    asked = np.repeat(np.arange(10), SAMPLES_PER_CLASS)
    images = pipeline(asked.tolist(), generator=torch.Generator().manual_seed(1), output_type="np").images
    predicted = judge.predict(images.mean(axis=-1).reshape(len(asked), -1))
    class_rate = (predicted == asked).mean()
    per_class = [(predicted[asked == digit] == digit).mean() for digit in range(10)]
    print(f"quick start: {wall_time:.0f} s, class rate {class_rate:.3f}, per class {np.round(per_class, 2).tolist()}")
    assert class_rate > 0.8
    assert min(per_class) > 0.5

    # diffusers' flow schedulers and our multistep solver, swapped in, sample the asked digits too.
    config = pipeline.scheduler.config
    for scheduler, steps in (
        (FlowMatchEulerDiscreteScheduler.from_config(config), 50),
        (DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction"), 25),
        (DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True, prediction_type="sample"), 25),
        (UniPCMultistepScheduler.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction"), 25),
        (JiTFlowMatchScheduler.from_config(config, solver="multistep2", time_grid="guidance"), 25),
    ):
        pipeline.scheduler = scheduler
        images = pipeline(asked.tolist(), num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                          output_type="np").images
        rate = (judge.predict(images.mean(axis=-1).reshape(len(asked), -1)) == asked).mean()
        print(f"{type(scheduler).__name__}, {steps} steps: class rate {rate:.3f}")
        assert rate > 0.8, type(scheduler).__name__

"""The package as a user installs it: a wheel in a fresh virtual environment, without the repository on the path."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.test_continue_official import official_checkpoint, official_step_fixture

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_wheel_converts_generates_and_renders_a_card(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("pixelrepa_diffusers-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    venv_bin = tmp_path / "venv" / "bin"
    # The dependencies come from this interpreter's site-packages (a plain path entry: its .pth files, among them
    # this checkout's editable install, are not run); the package itself only from the wheel.
    venv_site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    (venv_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv_bin / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   env=environment)

    def run(*command):
        result = subprocess.run([str(part) for part in command], cwd=tmp_path, env=environment, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    location = run(venv_bin / "python", "-c", "import pixelrepa_diffusers; print(pixelrepa_diffusers.__file__)")
    assert location.startswith(str(venv_site)), location
    tensors, metadata, args = official_step_fixture()
    torch.save(official_checkpoint(tensors, metadata, args), tmp_path / "checkpoint-last.pth")
    run(venv_bin / "pixelrepa-convert", "--checkpoint_path", "checkpoint-last.pth", "--output_dir", "converted",
        "--in_context_start", "1")
    assert (tmp_path / "converted" / "README.md").read_text().startswith("---")  # the card, from the packaged template
    run(venv_bin / "pixelrepa-generate", "--pretrained_model_name_or_path", "converted", "--class_labels", "1", "2",
        "--num_inference_steps", "2", "--output_dir", "samples")
    assert sorted(path.name for path in (tmp_path / "samples").iterdir()) == ["0000-1.png", "0001-2.png", "grid.png"]
    card = run(venv_bin / "python", "-c", "from pixelrepa_diffusers.hub import render_model_card, variant_card_settings;"
               " print(render_model_card(variant_card_settings('PixelREPA-H/16', 'u/PixelREPA-H-16')))")
    assert "PixelREPA-H/16" in card and "1.81" in card  # the packaged template, filled with the paper's H/16 FID
    for command in ("pixelrepa-convert", "pixelrepa-generate", "pixelrepa-evaluate", "pixelrepa-push"):
        run(venv_bin / command, "--help")
        bad = subprocess.run([venv_bin / command, "--no_such_flag"], cwd=tmp_path, env=environment, capture_output=True,
                             text=True)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr

"""
The loading routes a pushed repo offers a user with diffusers but not this package: ModularPipeline, AutoModel and
DiffusionPipeline with remote code, each run from the local Hub server in a fresh virtual environment.
"""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.hub import push_pipeline_to_hub, upload_operations
from pixelrepa_diffusers.modular_pixelrepa import PixelREPABlocks
from tests.tiny_models import random_tiny_transformer
from tests.hub_server import LocalHub
from tests.test_hub import subprocess_env, tiny_card

REPO_ID = "tester/tiny-modular"
TOKEN = "hf_local_test_token"
ID2LABEL = {i: f"digit {i}, {name}" for i, name in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
CLASS_LABELS = [1, "digit 7", "seven"]  # an index, a name, and a comma-separated synonym
MODULAR_SETTINGS = dict(num_inference_steps=4, guidance_scale=3.0, guidance_interval=(0.0, 0.5))
MODULES = ("pipeline_pixelrepa.py", "modular_pixelrepa.py", "transformer/transformer_jit.py",
           "scheduler/scheduling_jit_flow_match.py")

# Run by a fresh virtual environment's python, from outside the repo, with HF_ENDPOINT at the local Hub: loads the
# pushed repo by id all three ways and writes what each computes, and the modular pipeline's error for an unknown
# class name, to a safetensors file.
LOAD_SCRIPT = """
import json
import sys

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)
repo_id, inputs_path, results_path, arguments = sys.argv[1:]
class_labels, settings = json.loads(arguments)
try:
    import pixelrepa_diffusers
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"pixelrepa_diffusers is importable here, from {pixelrepa_diffusers.__file__}")
from diffusers import AutoModel, DiffusionPipeline, ModularPipeline
from huggingface_hub import snapshot_download

inputs = load_file(inputs_path)
results = {}

modular = ModularPipeline.from_pretrained(repo_id, trust_remote_code=True)
modular.load_components(trust_remote_code=True)
assert type(modular.blocks).__module__.startswith("diffusers_modules."), type(modular.blocks)
results["modular"] = modular(class_labels=class_labels, num_inference_steps=3, generator=torch.manual_seed(0),
                             output_type="pt", output="images")
results["modular_given_latents"] = torch.from_numpy(modular(
    class_labels=class_labels, latents=inputs["noise"], output_type="np", output="images", **settings)).contiguous()
try:
    modular(class_labels=[1, "xyz"], num_inference_steps=3, output="images")
    unknown_class_error = "no error"
except ValueError as error:
    unknown_class_error = str(error)

for name, transformer in (
    ("automodel", AutoModel.from_pretrained(repo_id, subfolder="transformer", trust_remote_code=True)),
    ("automodel_folder", AutoModel.from_pretrained(
        snapshot_download(repo_id, allow_patterns=["transformer/*"]) + "/transformer", trust_remote_code=True)),
):
    assert type(transformer).__module__.startswith("diffusers_modules."), type(transformer)
    with torch.no_grad():
        results[name] = transformer(inputs["hidden_states"], inputs["timestep"], inputs["class_labels"]).sample

remote = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
assert type(remote).__module__.startswith("diffusers_modules."), type(remote)
results["diffusion_pipeline"] = remote(class_labels, num_inference_steps=3, generator=torch.manual_seed(0),
                                       output_type="pt").images
save_file(results, results_path, metadata={"unknown_class_error": unknown_class_error})
"""


SEARCHED = dict(solver="searched", searched_times=[0.0, 0.3, 0.7, 1.0],
                searched_coefficients=[[1.0], [1.4, -0.4], [1.5, -0.6, 0.1]], searched_guidance_scale=2.5,
                searched_guidance_interval=[0.2, 0.8])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[PixelREPAPipeline, Path]:
    """
    A tiny pipeline with class names, guidance and the 512 px models' noise scale (the Heun solver and the uniform
    grid by default, as the papers sample), and the folder it is saved in with a card.
    """
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(noise_scale=2.0), id2label=ID2LABEL,
                             guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder, safe_serialization=True)
    tiny_card(REPO_ID).save(folder / "README.md")
    return pipe, folder


@pytest.fixture(scope="module")
def python_without_package(tmp_path_factory) -> Path:
    """
    The python of a fresh virtual environment that imports this interpreter's dependencies (diffusers, torch) but not
    this package: its site-packages is a plain path entry, so the editable install's .pth finder is not run.
    """
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    venv_site = next((venv / "lib").glob("python3*/site-packages"))
    (venv_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


@pytest.mark.parametrize("scheduler, settings", [
    (dict(solver="euler", t_eps=0.1), dict(num_inference_steps=3, guidance_scale=1.0)),
    (dict(solver="multistep2", time_grid="guidance"),
     dict(num_inference_steps=5, guidance_scale=2.5, guidance_interval=(0.2, 0.8))),
    (SEARCHED, dict(num_inference_steps=3, guidance_scale=2.5, guidance_interval=(0.2, 0.8))),
    (SEARCHED, dict(num_inference_steps=3, guidance_scale=3.0, accept_other_guidance=True)),
])
def test_blocks_sample_as_the_pipeline_with_other_solvers_and_guidance(scheduler, settings):
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(**scheduler), id2label=ID2LABEL,
                             guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    modular = PixelREPABlocks().init_pipeline()
    modular.update_components(transformer=pipe.transformer, scheduler_config=dict(pipe.scheduler.config),
                              id2label=pipe.config.id2label, guidance_scale=2.0)
    modular.set_progress_bar_config(disable=True)
    labels = [2, "nine"]
    expected = pipe(labels, generator=[torch.manual_seed(3), torch.manual_seed(4)], output_type="pt", **settings)
    images = modular(class_labels=labels, generator=[torch.manual_seed(3), torch.manual_seed(4)], output_type="pt",
                     output="images", **settings)
    torch.testing.assert_close(images, expected.images, rtol=0, atol=1e-5)


def test_blocks_without_a_transformer_say_how_to_load_it():
    modular = PixelREPABlocks().init_pipeline()
    with pytest.raises(ValueError, match=r"^The pipeline has no transformer; load it with "
                                         r"pipe\.load_components\(trust_remote_code=True\)\.$"):
        modular(class_labels=[1], output="images")


def test_upload_lists_the_modular_and_automodel_files(pipeline):
    _, folder = pipeline
    before = (folder / "transformer" / "config.json").read_bytes()
    operations = {operation.path_in_repo: operation.path_or_fileobj
                  for operation in upload_operations(folder, REPO_ID, tiny_card(REPO_ID))}
    assert {"modular_model_index.json", "modular_config.json", "modular_pixelrepa.py",
            "transformer/config.json"} <= set(operations)
    for path in MODULES:
        source = operations[path].decode()
        assert "pixelrepa_diffusers" not in source, path
        relative = set(re.findall(r"^\s*from\s+\.([\w.]+)\s+import", source, flags=re.MULTILINE))
        assert relative <= {"transformer.transformer_jit", "scheduler.scheduling_jit_flow_match"}, path

    auto_map = {"AutoModel": "transformer_jit.JiTTransformer2DModel"}
    assert json.loads(operations["model_index.json"])["auto_map"] == auto_map
    published_config = json.loads(operations["transformer/config.json"])
    assert published_config == {**json.loads(before), "auto_map": auto_map}
    assert (folder / "transformer" / "config.json").read_bytes() == before
    assert json.loads(operations["modular_config.json"])["auto_map"] == {
        "ModularPipelineBlocks": "modular_pixelrepa.PixelREPABlocks"}
    modular_index = json.loads(operations["modular_model_index.json"])
    assert modular_index["transformer"][2] == dict(
        pretrained_model_name_or_path=REPO_ID, subfolder="transformer", type_hint=[None, None], variant=None,
        revision=None)
    assert modular_index["scheduler_config"] == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert modular_index["id2label"]["7"] == "digit 7, seven" and modular_index["guidance_scale"] == 2.0


def test_upload_refuses_a_pipeline_config_the_blocks_do_not_take(pipeline, tmp_path):
    _, folder = pipeline
    shutil.copytree(folder, tmp_path / "pipeline")
    model_index = json.loads((folder / "model_index.json").read_text())
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({**model_index, "guidance_rescale": 0.7}))
    with pytest.raises(ValueError, match=r"PixelREPABlocks takes the configs \['guidance_interval', "
                                         r"'guidance_scale', 'id2label', 'scheduler_config'\]"):
        upload_operations(tmp_path / "pipeline", REPO_ID)


def test_diffusers_alone_loads_the_pushed_repo_three_ways_and_samples_as_the_pipeline(
    pipeline, python_without_package, tmp_path, monkeypatch
):
    pipe, folder = pipeline
    generator = torch.Generator().manual_seed(1)
    num_classes = pipe.transformer.config.num_classes
    inputs = {
        "noise": torch.randn(len(CLASS_LABELS), 3, 32, 32, generator=generator),
        "hidden_states": torch.randn(3, 3, 32, 32, generator=generator),
        "timestep": torch.tensor([0.0, 0.4, 0.97]),
        "class_labels": torch.tensor([3, 7, num_classes]),  # the last is the null class
    }
    save_file(inputs, tmp_path / "inputs.safetensors")
    with LocalHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        push_pipeline_to_hub(folder, REPO_ID, token=TOKEN)
        completed = subprocess.run(
            [python_without_package, "-c", LOAD_SCRIPT, REPO_ID, tmp_path / "inputs.safetensors",
             tmp_path / "results.safetensors", json.dumps([CLASS_LABELS, MODULAR_SETTINGS])],
            cwd=tmp_path, env=subprocess_env(tmp_path, HF_ENDPOINT=hub.url), capture_output=True, text=True,
            timeout=600,
        )
    assert completed.returncode == 0, completed.stderr[-4000:]
    with safe_open(tmp_path / "results.safetensors", "pt") as results:
        loaded = {name: results.get_tensor(name) for name in results.keys()}
        unknown_class_error = results.metadata()["unknown_class_error"]

    expected = pipe(CLASS_LABELS, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    torch.testing.assert_close(loaded["modular"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["diffusion_pipeline"], expected, rtol=0, atol=1e-5)
    expected_np = pipe(CLASS_LABELS, latents=inputs["noise"], output_type="np", **MODULAR_SETTINGS).images
    torch.testing.assert_close(loaded["modular_given_latents"], torch.from_numpy(expected_np), rtol=0, atol=1e-5)
    with torch.no_grad():
        forward = pipe.transformer(inputs["hidden_states"], inputs["timestep"], inputs["class_labels"]).sample
    torch.testing.assert_close(loaded["automodel"], forward, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["automodel_folder"], forward, rtol=0, atol=1e-5)

    with pytest.raises(ValueError) as pipeline_error:
        pipe([1, "xyz"], num_inference_steps=3)
    assert unknown_class_error == str(pipeline_error.value)
    assert unknown_class_error == "Unknown class name 'xyz' in class_labels; see pipeline.labels for valid names."

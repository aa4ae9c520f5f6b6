"""PixelREPAPipeline.from_pretrained with diffusers' loading arguments, from folders and from the local Hub server."""

import copy
import logging

import diffusers
import huggingface_hub
import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.hub import push_pipeline_to_hub
from tests.tiny_models import random_tiny_transformer
from tests.hub_server import LocalHub

REPO_ID = "tester/tiny-variants"
TOKEN = "hf_local_test_token"


def sample(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe([1, 7], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pipeline folder with fp32 weights and a bf16 variant (save_pretrained(variant="bf16")), and its pipeline."""
    folder = tmp_path_factory.mktemp("variants")
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.save_pretrained(folder)
    bf16 = PixelREPAPipeline(copy.deepcopy(pipe.transformer).to(torch.bfloat16), pipe.scheduler, guidance_scale=2.0)
    bf16.save_pretrained(folder, variant="bf16")
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\nA tiny pipeline for tests.\n")
    return folder, pipe


@pytest.fixture(scope="module")
def hub(saved):
    """The saved folder pushed to the local Hub server, which serves it for the module's tests."""
    with LocalHub() as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                      server.url + "/{repo_id}/resolve/{revision}/{filename}")
        push_pipeline_to_hub(saved[0], REPO_ID, token=TOKEN)
        yield server


def downloaded(requests):
    """The repo paths of the files fetched (GET) in `requests`, a slice of `LocalHub.requests`."""
    return {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in requests
            if method == "GET" and "/resolve/" in path}


def test_bf16_variant_loads_from_the_hub_and_downloads_only_its_weights(saved, hub, tmp_path):
    folder, pipe = saved
    start = len(hub.requests)
    loaded = PixelREPAPipeline.from_pretrained(REPO_ID, variant="bf16", torch_dtype=torch.bfloat16,
                                               cache_dir=tmp_path, token=TOKEN, force_download=True)
    assert loaded.transformer.dtype == torch.bfloat16
    for name, value in pipe.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], value.bfloat16()), name
    weights = {path for path in downloaded(hub.requests[start:]) if path.startswith("transformer/")}
    assert weights == {"transformer/config.json", "transformer/diffusion_pytorch_model.bf16.safetensors"}


def test_default_load_from_the_hub_skips_variants_and_code(saved, hub, tmp_path):
    folder, pipe = saved
    start = len(hub.requests)
    loaded = PixelREPAPipeline.from_pretrained(REPO_ID, cache_dir=tmp_path, token=TOKEN, use_safetensors=True,
                                               low_cpu_mem_usage=False)
    assert downloaded(hub.requests[start:]) == {
        "model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    }
    assert loaded.transformer.dtype == torch.float32
    torch.testing.assert_close(sample(loaded), sample(pipe), rtol=0, atol=0)


def test_variant_the_repo_lacks_gets_diffusers_message(saved, hub, tmp_path):
    message = r"^You are trying to load the model files of the `variant=fp16`, but no such modeling files are available\.$"
    with pytest.raises(ValueError, match=message):
        PixelREPAPipeline.from_pretrained(REPO_ID, variant="fp16", cache_dir=tmp_path, token=TOKEN)
    with pytest.raises(ValueError, match=message):
        PixelREPAPipeline.from_pretrained(saved[0], variant="fp16")


def test_loading_logs_each_component_as_diffusers_does(saved):
    logger = diffusers.utils.logging.get_logger("diffusers.pipelines.pipeline_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        PixelREPAPipeline.from_pretrained(saved[0])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    loaded = [record.getMessage() for record in records if record.getMessage().startswith("Loaded ")]
    assert sorted(loaded) == [f"Loaded {name} as {cls} from `{name}` subfolder of {saved[0]}."  # in set order
                              for name, cls in (("scheduler", "JiTFlowMatchScheduler"),
                                                ("transformer", "JiTTransformer2DModel"))]


def test_dtype_is_diffusers_name_for_torch_dtype(saved):
    folder, pipe = saved
    assert PixelREPAPipeline.from_pretrained(folder, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    by_name = PixelREPAPipeline.from_pretrained(folder, dtype={"transformer": torch.float16, "default": torch.bfloat16})
    assert by_name.transformer.dtype == torch.float16
    with pytest.raises(ValueError, match=r"^You have passed both `dtype` and `torch_dtype`\. Please only pass `dtype`"):
        PixelREPAPipeline.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)


def test_per_component_torch_dtype_and_variant_from_a_folder(saved):
    folder, pipe = saved
    by_name = PixelREPAPipeline.from_pretrained(folder, torch_dtype={"transformer": torch.bfloat16,
                                                                     "default": torch.float16})
    by_default = PixelREPAPipeline.from_pretrained(folder, torch_dtype={"default": torch.float16})
    unlisted = PixelREPAPipeline.from_pretrained(folder, torch_dtype={"scheduler": torch.float16})
    assert (by_name.transformer.dtype, by_default.transformer.dtype) == (torch.bfloat16, torch.float16)
    assert unlisted.transformer.dtype == torch.float32  # diffusers: components not named load in fp32
    variant = PixelREPAPipeline.from_pretrained(folder, variant="bf16", torch_dtype=torch.bfloat16)
    torch.testing.assert_close(variant.transformer.state_dict(), by_name.transformer.state_dict(), rtol=0, atol=0)


def test_bin_weights_load_with_use_safetensors_false(saved, tmp_path):
    folder, pipe = saved
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.bin").exists()
    loaded = PixelREPAPipeline.from_pretrained(tmp_path, use_safetensors=False)
    torch.testing.assert_close(sample(loaded), sample(pipe), rtol=0, atol=0)
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        PixelREPAPipeline.from_pretrained(tmp_path, use_safetensors=True)


@pytest.mark.parametrize("device_map", ["balanced", "cpu"])
def test_device_map_loads_and_samples_like_eager(saved, device_map):
    folder, pipe = saved
    loaded = PixelREPAPipeline.from_pretrained(folder, device_map=device_map)
    assert loaded.transformer.device == torch.device("cpu")
    torch.testing.assert_close(sample(loaded), sample(pipe), rtol=0, atol=0)


def test_device_map_has_diffusers_pipeline_meaning(saved):
    with pytest.raises(NotImplementedError, match="auto not supported. Supported strategies are: balanced"):
        PixelREPAPipeline.from_pretrained(saved[0], device_map="auto")


@pytest.mark.parametrize("argument", ["custom_pipeline", "trust_remote_code", "use_onnx", "dduf_file"])
def test_arguments_that_do_not_apply_are_a_type_error_naming_them(saved, argument):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{argument}'"):
        PixelREPAPipeline.from_pretrained(saved[0], **{argument: True})


@pytest.mark.parametrize("path", ["/nonexistent", "./no/such/folder", "a/b/c"])
def test_path_that_is_neither_a_folder_nor_a_repo_id_is_one_line(path):
    with pytest.raises(FileNotFoundError) as raised:
        PixelREPAPipeline.from_pretrained(path)
    assert str(raised.value) == f"No folder {path} exists, and {path!r} is not a Hub repo id."

"""diffusers' model machinery on the JiT transformer and the adapter: attention backends and processors, regional
compile, layerwise casting and offloading, each against the official-code fixtures (tests/fixtures/official)."""

import importlib.util

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from torch.utils._python_dispatch import TorchDispatchMode

from pixelrepa_diffusers import (
    JiTAttnProcessor, JiTFlowMatchScheduler, JiTFP32LogitsAttnProcessor, JiTTransformer2DModel,
    MaskedTransformerAdapter, PixelREPAPipeline,
)
from pixelrepa_diffusers.conversion import rename_official_keys
from tests.official_fixtures import load_fixture, official_state, our_config, relative_error

# The backends of diffusers' dispatch that run on any CPU (flex runs too, unfused, without compile).
CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")


@pytest.fixture(autouse=True)
def restore_active_backend():
    """set_attention_backend also sets diffusers' process-wide active backend; each test gets it back as it was."""
    with attention_backend("native"):
        yield


def official_small():
    """The official small JiT fixture: our model with its weights, and its inputs and forward output."""
    tensors, metadata = load_fixture("jit_small.safetensors")
    model = JiTTransformer2DModel(**our_config(metadata["config"], JiTTransformer2DModel))
    model.load_state_dict(rename_official_keys(official_state(tensors, metadata)))
    return model.eval(), (tensors["input.x"], tensors["input.t"], tensors["input.y"]), tensors["output.forward"]


def official_small_adapter():
    tensors, metadata = load_fixture("mta_small.safetensors")
    config = metadata["config"]
    adapter = MaskedTransformerAdapter(**our_config(config, MaskedTransformerAdapter))
    adapter.load_state_dict(rename_official_keys(official_state(tensors, metadata)))
    inputs = (tensors["input.tokens"], tensors["input.t"], tensors["input.y"])
    return adapter.eval(), inputs, tensors["output.adapter"]


class AttentionKernels(TorchDispatchMode):
    """The names of the attention kernels (SDPA variants, softmax) that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "attention" in name or "softmax" in name:
            self.names.add(name)
        return func(*args, **(kwargs or {}))


def test_attention_modules_are_diffusers_attention_with_the_dispatch_processor_by_default():
    model, _, _ = official_small()
    adapter, _, _ = official_small_adapter()
    assert list(model.attn_processors) == [f"blocks.{i}.attn.processor" for i in range(model.config.num_layers)]
    assert list(adapter.attn_processors) == [f"blocks.{i}.attn.processor" for i in range(adapter.config.num_layers)]
    for processors in (model.attn_processors, adapter.attn_processors):
        assert {type(processor) for processor in processors.values()} == {JiTAttnProcessor}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_cpu_backend_matches_the_official_forward_and_adapter(backend):
    model, inputs, expected = official_small()
    adapter, adapter_inputs, adapter_expected = official_small_adapter()
    model.set_attention_backend(backend)
    adapter.set_attention_backend(backend)
    assert {processor._attention_backend.value for processor in model.attn_processors.values()} == {backend}
    with torch.no_grad():
        assert relative_error(model(*inputs).sample, expected) <= 1e-5
        assert relative_error(adapter(*adapter_inputs), adapter_expected) <= 1e-5


def test_set_attention_backend_switches_the_kernel():
    model, inputs, _ = official_small()
    kernels = {}
    for backend in ("native", "_native_math"):
        model.set_attention_backend(backend)
        with torch.no_grad(), AttentionKernels() as recorder:
            model(*inputs)
        kernels[backend] = recorder.names
    assert kernels["native"] == {"_scaled_dot_product_flash_attention_for_cpu"}
    assert kernels["_native_math"] == {"_safe_softmax"}  # SDPA's math path: matmuls and a softmax


def test_fp32_logits_processor_is_selectable_and_matches_the_official_forward_in_fp32():
    model, inputs, expected = official_small()
    model.set_attn_processor(JiTFP32LogitsAttnProcessor())
    with torch.no_grad(), AttentionKernels() as recorder:
        sample = model(*inputs).sample
    assert recorder.names == {"_softmax"}
    assert relative_error(sample, expected) <= 1e-5


def test_official_precision_keeps_the_backend_set_on_the_transformer():
    model, _, _ = official_small()
    model.set_attention_backend("_native_math")
    pipe = PixelREPAPipeline(model, JiTFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe([1], num_inference_steps=1, output_type="pt", precision="official")
    processors = model.attn_processors.values()
    assert {(type(p), p._attention_backend.value) for p in processors} == {(JiTAttnProcessor, "_native_math")}


def test_unknown_backend_gets_diffusers_value_error():
    model, _, _ = official_small()
    with pytest.raises(ValueError, match=r"`backend='flash_attention'` must be one of the following: "):
        model.set_attention_backend("flash_attention")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_backend_missing_on_this_machine_gets_diffusers_error():
    model, _, _ = official_small()
    with pytest.raises(RuntimeError, match=r"'flash' is not usable .* install `flash-attn>="):
        model.set_attention_backend("flash")


@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_regional_compile_matches_eager_and_the_official_forward_in_fp32():
    model, inputs, expected = official_small()
    with torch.no_grad():
        eager = model(*inputs).sample
        model.compile_repeated_blocks(dynamic=False, fullgraph=True)
        compiled = model(*inputs).sample
    assert model._compiled_call_impl is None and all(block._compiled_call_impl is not None for block in model.blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert relative_error(compiled, expected) <= 1e-5


@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_regional_compile_of_the_adapter_with_a_backend_matches_the_official_adapter():
    adapter, inputs, expected = official_small_adapter()
    adapter.set_attention_backend("_native_math")
    adapter.compile_repeated_blocks(dynamic=False, fullgraph=True)
    with torch.no_grad():
        assert relative_error(adapter(*inputs), expected) <= 1e-5


@pytest.mark.usefixtures("bf16_fixture_isa")
def test_fp8_layerwise_casting_keeps_the_skipped_layers_and_stays_near_the_official_forward():
    model, (x, t, y), expected = official_small()
    model.to(torch.bfloat16)
    with torch.no_grad():
        bf16 = model(x.bfloat16(), t, y).sample
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16  # the compute dtype, which the pipeline feeds
    stored = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert stored["blocks.0.attn.to_qkv.weight"] == stored["blocks.3.adaln_modulation.weight"] == torch.float8_e4m3fn
    for name in ("timestep_embedder.linear_1.weight", "class_embedding.weight", "final_layer.linear.weight",
                 "final_layer.adaln_modulation.weight", "patch_embed.proj_in.weight", "blocks.0.norm1.weight",
                 "blocks.0.attn.norm_q.weight", "in_context_pos_embed"):
        assert stored[name] == torch.bfloat16, name
    with torch.no_grad():
        cast = model(x.bfloat16(), t, y).sample
    assert cast.dtype == torch.bfloat16
    # Measured 0.019 from the fp32 fixture and from bf16 weights (bf16 weights alone: 0.0084); casting the final
    # layer too would give 0.033.
    assert relative_error(cast, expected) <= 0.03 and relative_error(cast, bf16) <= 0.03


@pytest.mark.usefixtures("bf16_fixture_isa")
def test_fp8_layerwise_casting_runs_on_the_adapter_and_in_the_pipeline():
    adapter, (tokens, t, y), expected = official_small_adapter()
    adapter.to(torch.bfloat16).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        # Measured 0.040 (bf16 weights alone: 0.0063).
        assert relative_error(adapter(tokens.bfloat16(), t, y), expected) <= 0.05
    model, _, _ = official_small()
    model.to(torch.bfloat16).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    pipe = PixelREPAPipeline(model, JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 7], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.std() > 0.01


def tiny_pipeline():
    pipe = PixelREPAPipeline(official_small()[0], JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe):
    return pipe([1, 7], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images


def test_model_cpu_offload_samples_like_eager():
    eager = sample(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")  # the only device here: onload to it
    assert hasattr(pipe.transformer, "_hf_hook")
    torch.testing.assert_close(sample(pipe), eager, rtol=0, atol=0)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_through_disk_samples_like_eager(offload_type, tmp_path):
    eager = sample(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type,
                              num_blocks_per_group=1 if offload_type == "block_level" else None,
                              offload_to_disk_path=str(tmp_path))
    images = sample(pipe)
    assert list(tmp_path.glob("*.safetensors"))  # the weights went to disk and came back for each group
    torch.testing.assert_close(images, eager, rtol=0, atol=0)


@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_backend_switched_and_blocks_compiled_match_the_official_forward_in_fp32():
    model, inputs, expected = official_small()
    model.set_attention_backend("_native_math")
    model.compile_repeated_blocks(dynamic=False, fullgraph=True)
    with torch.no_grad():
        assert relative_error(model(*inputs).sample, expected) <= 1e-5


@pytest.mark.slow
@pytest.mark.usefixtures("bf16_fixture_isa")
@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_backend_switched_blocks_compiled_and_layers_cast_stay_near_the_official_forward():
    cast_model, (x, t, y), expected = official_small()
    cast_model.set_attention_backend("_native_math")
    cast_model.to(torch.bfloat16)
    cast_model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    # diffusers' casting hooks build Parameters in forward, which a full graph cannot hold: compile with breaks.
    cast_model.compile_repeated_blocks(dynamic=False)
    with torch.no_grad():
        cast = cast_model(x.bfloat16(), t, y).sample
    assert relative_error(cast, expected) <= 0.03  # as eager casting (measured 0.019)

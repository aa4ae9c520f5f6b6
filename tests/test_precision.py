"""The sampling precision regimes (PRECISIONS): the dtypes their ops run in, and the official regime against the
official code run in its own regime (fixture made by tests/fixtures/make_official_fixtures.py)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import (
    PRECISIONS, JiTAttnProcessor, JiTFlowMatchScheduler, JiTTransformer2DModel, PixelREPAPipeline,
)
from pixelrepa_diffusers.conversion import rename_official_keys
from pixelrepa_diffusers.pipeline_pixelrepa import precision_attention, precision_autocast
from tests.official_fixtures import load_fixture, official_state, our_config, relative_error

# Two heads of 32 channels, so that q k^T (last dim: the 16 or 20 tokens) and weights @ v (last dim 32) differ in shape.
HEAD_DIM = 32
CONFIG = {**TINY_CONFIG, "num_attention_heads": 2}


class OpDtypes(TorchDispatchMode):
    """Counts (kind, input dtypes) of the matrix products, convolutions, softmaxes and SDPA calls that reach the
    kernels (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        dtypes = tuple(str(arg.dtype).removeprefix("torch.") for arg in args if isinstance(arg, torch.Tensor))
        if name == "bmm":
            kind = "weights @ v" if args[1].shape[-1] == HEAD_DIM else "q @ k^T"
        elif name in ("addmm", "mm"):
            kind = "linear"
        elif name in ("convolution", "_softmax"):
            kind = name
        elif "scaled_dot_product" in name:
            kind = "sdpa"
        else:
            return func(*args, **(kwargs or {}))
        self.seen[(kind, dtypes)] += 1
        return func(*args, **(kwargs or {}))


def sample_recording(precision):
    """(op dtype counts, ODE state dtypes, transformer input and output dtypes, number of transformer calls) of a
    2-step Heun sample with guidance (3 evaluations) on random weights."""
    torch.manual_seed(0)
    transformer = JiTTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.1)
    pipe = PixelREPAPipeline(transformer.eval(), JiTFlowMatchScheduler(), guidance_scale=2.0,
                             guidance_interval=(0.0, 1.0))
    pipe.set_progress_bar_config(disable=True)
    states, calls = set(), []
    hook = transformer.register_forward_hook(lambda module, args, output: calls.append((args[0].dtype, output[0].dtype)))

    def keep_state(pipeline, step, t, tensors):
        states.add(tensors["latents"].dtype)
        return {}

    recorder = OpDtypes()
    with recorder:
        pipe([1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt", precision=precision,
             callback_on_step_end=keep_state)
    hook.remove()
    # The call leaves the transformer's own processors.
    assert {type(processor) for processor in transformer.attn_processors.values()} == {JiTAttnProcessor}
    return recorder.seen, states, set(calls), len(calls)


def test_official_regime_runs_linears_in_bf16_and_logits_softmax_in_fp32():
    seen, states, calls, num_calls = sample_recording("official")
    attentions = CONFIG["num_layers"] * num_calls
    assert num_calls == 3 and calls == {(torch.float32, torch.bfloat16)}
    assert states == {torch.float32}
    assert {kind for kind, _ in seen} == {"linear", "convolution", "q @ k^T", "_softmax", "weights @ v"}
    for (kind, dtypes), count in seen.items():
        expected = "float32" if kind in ("q @ k^T", "_softmax") else "bfloat16"
        assert set(dtypes) == {expected}, (kind, dtypes)
    assert sum(count for (kind, _), count in seen.items() if kind == "q @ k^T") == attentions
    assert sum(count for (kind, _), count in seen.items() if kind == "_softmax") == attentions


def test_bf16_sdpa_regime_runs_everything_in_bf16_through_sdpa():
    seen, states, calls, num_calls = sample_recording("bf16_sdpa")
    assert states == {torch.float32} and calls == {(torch.float32, torch.bfloat16)}
    assert {kind for kind, _ in seen} == {"linear", "convolution", "sdpa"}
    assert all(set(dtypes) == {"bfloat16"} for _, dtypes in seen)
    assert sum(count for (kind, _), count in seen.items() if kind == "sdpa") == CONFIG["num_layers"] * num_calls


def test_model_regime_runs_fp32_weights_in_fp32():
    seen, states, calls, _ = sample_recording("model")
    assert states == {torch.float32} and calls == {(torch.float32, torch.float32)}
    assert {kind for kind, _ in seen} == {"linear", "convolution", "sdpa"}
    assert all(set(dtypes) == {"float32"} for _, dtypes in seen)


def official_small_transformer():
    tensors, metadata = load_fixture("jit_small.safetensors")
    model = JiTTransformer2DModel(**our_config(metadata["config"], JiTTransformer2DModel))
    model.load_state_dict(rename_official_keys(official_state(tensors, metadata)))
    return model.eval()


@pytest.mark.usefixtures("bf16_fixture_isa")
def test_official_regime_forward_matches_the_official_code_in_its_regime():
    # Bit-exact with oneDNN capped to the fixture's instruction set (1 and 2 threads).
    model = official_small_transformer()
    tensors, _ = load_fixture("official_precision_small.safetensors")
    x, t, y = tensors["input.x"], tensors["input.t"], tensors["input.y"]
    expected = tensors["output.forward"]
    with torch.no_grad():
        with precision_attention(model, "official"), precision_autocast("official", torch.device("cpu")):
            official = model(x, t, y).sample
        with precision_attention(model, "bf16_sdpa"), precision_autocast("bf16_sdpa", torch.device("cpu")):
            sdpa = model(x, t, y).sample
        fp32 = model(x, t, y).sample
    assert official.dtype == torch.bfloat16
    assert relative_error(official, expected) <= 1e-4  # measured 0
    # The fixture tells the regimes apart: bf16 SDPA (3.9e-3 here) and fp32 (6.9e-3) are far from it.
    assert relative_error(sdpa, expected) > 1e-3 and relative_error(fp32, expected) > 1e-3


@pytest.mark.usefixtures("bf16_fixture_isa")
def test_official_regime_steps_match_official_generate_under_autocast():
    # Every Heun step starts from the official state before it, so each step's error is that of one step: whole
    # 8-step samples of this random model drift apart by ~3% on a CPU whose bf16 kernels round a single value apart.
    model = official_small_transformer()
    tensors, metadata = load_fixture("official_precision_small.safetensors")
    case = metadata["cases"]["heun_cfg3"]
    states = tensors["heun_cfg3.states"]  # the official ODE state before the first step and after each step
    steps = case["num_sampling_steps"]
    pipe = PixelREPAPipeline(model, JiTFlowMatchScheduler(solver=case["sampling_method"],
                                                          noise_scale=case["noise_scale"]))
    pipe.set_progress_bar_config(disable=True)
    errors = []

    def teacher_force(pipeline, evaluation, t, tensors_at_step):
        heun = evaluation < 2 * (steps - 1)  # the last step is Euler, one evaluation
        if heun and evaluation % 2 == 0:  # a Heun predictor: the step is not done yet
            return {}
        step = (evaluation + 1) // 2 if heun else steps
        errors.append(relative_error(tensors_at_step["latents"], states[step]))
        return {"latents": states[step].clone()}

    pipe(tensors["heun_cfg3.labels"].tolist(), num_inference_steps=steps, guidance_scale=case["cfg"],
         guidance_interval=(case["interval_min"], case["interval_max"]), latents=tensors["heun_cfg3.noise"],
         output_type="pt", callback_on_step_end=teacher_force, precision="official")
    assert len(errors) == steps
    # Measured 0 on the CPU that made the fixture; bf16 kernels that round a value apart give a few 1e-7.
    assert max(errors) <= 1e-5


@pytest.mark.parametrize("precision, dtype, match", [
    ("fp16", torch.float32, r"precision must be one of \('model', 'official', 'bf16_sdpa'\), got 'fp16'"),
    ("official", torch.bfloat16, r"precision 'official' runs fp32 weights .* dtype=torch.float32"),
    ("bf16_sdpa", torch.float16, r"precision 'bf16_sdpa' runs fp32 weights .* torch.float16"),
])
def test_bad_precision_is_refused(precision, dtype, match):
    transformer = JiTTransformer2DModel(**TINY_CONFIG).to(dtype)
    pipe = PixelREPAPipeline(transformer, JiTFlowMatchScheduler())
    with pytest.raises(ValueError, match=match):
        pipe([1], num_inference_steps=1, precision=precision)

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pixelrepa_diffusers import JiTFlowMatchScheduler, JiTTransformer2DModel, PixelREPAPipeline
from tests.tiny_models import random_tiny_transformer

ID2LABEL = {i: name for i, name in enumerate(["zero", "one", "two", "three", "four, 4", "five", "six", "seven",
                                               "eight", "nine"])}


@pytest.fixture
def pipe():
    pipeline = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), id2label=ID2LABEL,
                                 guidance_scale=2.5, guidance_interval=(0.1, 1.0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_output_types_agree_and_are_in_unit_range(pipe):
    kwargs = dict(num_inference_steps=3)
    pt = pipe([1, 2], generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    np_images = pipe([1, 2], generator=torch.manual_seed(0), output_type="np", **kwargs).images
    pil = pipe([1, 2], generator=torch.manual_seed(0), output_type="pil", **kwargs).images
    assert pt.shape == (2, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1 and pt.std() > 0.01
    assert np_images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(pil[0]), np.round(np_images[0] * 255), atol=1)


def test_class_names_equal_class_ids(pipe):
    by_id = pipe([4, 7], num_inference_steps=2, generator=torch.manual_seed(1), output_type="pt").images
    by_name = pipe(["4", "seven"], num_inference_steps=2, generator=torch.manual_seed(1), output_type="pt").images
    assert torch.equal(by_id, by_name)
    assert pipe.get_label_ids(["four", "4", "nine"]) == [4, 4, 9]


def test_generator_list_gives_per_image_noise(pipe):
    together = pipe([1, 2], num_inference_steps=2, output_type="pt",
                    generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).images
    alone = pipe([2], num_inference_steps=2, output_type="pt", generator=[torch.Generator().manual_seed(4)]).images
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)


def test_latents_are_scaled_by_noise_scale(pipe):
    latents = torch.randn(1, 3, 32, 32, generator=torch.manual_seed(5))
    pipe.scheduler = JiTFlowMatchScheduler(noise_scale=2.0)
    seen = {}

    def first_latents(pipeline, step, t, tensors):
        seen.setdefault(step, tensors["latents"].clone())
        return {}

    pipe([3], num_inference_steps=1, latents=latents, callback_on_step_end=first_latents, output_type="pt",
         guidance_scale=1.0)
    # One Euler step from t=0 to 1 lands exactly on the x-prediction made from 2 * latents.
    with torch.no_grad():
        expected = pipe.transformer(2 * latents, torch.zeros(1), torch.tensor([3])).sample
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)


def test_guidance_only_inside_interval_and_batched(pipe):
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    pipe([1], num_inference_steps=10, guidance_interval=(0.1, 1.0), output_type="pt")
    hook.remove()
    # Heun, 10 steps: 19 evaluations at t = 0, .1, .1, .2, ...; t <= 0.1 runs without the unconditional half.
    assert len(calls) == 19
    assert calls[:3] == [1, 1, 1] and set(calls[3:]) == {2}


def test_bf16_transformer_keeps_fp32_state(pipe):
    pipe.transformer.to(torch.bfloat16)
    images = pipe([1, 2], num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_save_load_round_trip_in_safetensors(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors"]
    loaded = PixelREPAPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, JiTTransformer2DModel)
    assert loaded.config.guidance_scale == 2.5 and loaded.get_label_ids("seven") == [7]
    before = pipe([1, 9], num_inference_steps=3, generator=torch.manual_seed(2), output_type="pt").images
    after = loaded([1, 9], num_inference_steps=3, generator=torch.manual_seed(2), output_type="pt").images
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(class_labels=[10]), ValueError, "class_labels entry 10"),
        (dict(class_labels=[-1]), ValueError, "class_labels entry -1"),
        (dict(class_labels=["unicorn"]), ValueError, "Unknown class name 'unicorn'"),
        (dict(class_labels=[]), ValueError, "class_labels is empty"),
        (dict(class_labels=[1.5]), TypeError, "class_labels entries"),
        (dict(class_labels=[1], num_inference_steps=0), ValueError, "num_inference_steps must be >= 1"),
        (dict(class_labels=[1], latents=torch.randn(1, 3, 16, 16)), ValueError, "latents must have shape"),
        (dict(class_labels=[1, 2], generator=[torch.manual_seed(0)]), ValueError, "generator is a list of 1"),
        (dict(class_labels=[1], output_type="tensor"), ValueError, "output_type must be one of"),
        (dict(class_labels=[1], guidance_interval=(0.5, 0.2)), ValueError, "guidance_interval"),
        (dict(class_labels=[1], guidance_interval=(-0.1, 1.0)), ValueError, "guidance_interval"),
        (dict(class_labels=[1], guidance_interval=(0.1, 1.5)), ValueError, "guidance_interval"),
    ],
)
def test_bad_input_is_refused(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(**kwargs)


@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_compiled_transformer_samples_like_eager(pipe):
    """torch.compile (static shapes, one graph) is an optimised path; in fp32 it must sample what eager does."""
    eager = pipe([1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.transformer.compile(dynamic=False, fullgraph=True)
    compiled = pipe([1, 7], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert not torch.equal(eager[0], eager[1])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


DIFFUSERS_SCHEDULERS = {
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
    "dpmsolver++_flow": (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction")),
    "dpmsolver++_sample": (DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="sample")),
    "unipc_flow": (UniPCMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction")),
}


@pytest.fixture(scope="module")
def converged():
    """Noise and the converged official ODE from it (Heun, 100 steps, guidance 2.5 on (0.1, 1.0))."""
    pipeline = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.5)
    pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return noise, pipeline([1, 2], num_inference_steps=100, latents=noise, output_type="pt").images


@pytest.mark.parametrize("name", sorted(DIFFUSERS_SCHEDULERS))
def test_diffusers_schedulers_integrate_the_jit_ode(pipe, converged, name):
    """From the same noise, each lands near the converged official ODE, guidance interval on."""
    noise, reference = converged
    scheduler_class, overrides = DIFFUSERS_SCHEDULERS[name]
    pipe.scheduler = scheduler_class.from_config(JiTFlowMatchScheduler(noise_scale=2.0).config, **overrides)
    assert pipe.flow_settings() == (2.0, 0.05)  # carried over by from_config
    pipe.scheduler = scheduler_class.from_config(JiTFlowMatchScheduler().config, **overrides)
    images = pipe([1, 2], num_inference_steps=30, latents=noise, output_type="pt").images
    error = (images - reference).pow(2).mean().sqrt().item()
    far = (pipe([1, 2], num_inference_steps=30, latents=noise, guidance_scale=1.0, output_type="pt").images
           - reference).pow(2).mean().sqrt().item()
    assert error < 0.02 and error < far / 3, (error, far)


def test_guidance_interval_is_in_jit_time_for_diffusers_schedulers(pipe):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda x, t, y, **kwargs: calls.append((x.shape[0], t[0].item())) or forward(x, t, y,
                                                                                                          **kwargs)
    pipe([3], num_inference_steps=10, guidance_interval=(0.5, 1.0), output_type="pt")
    times = 1 - pipe.scheduler.sigmas[:10]
    assert [t for _, t in calls] == pytest.approx(times.tolist())
    assert [batch for batch, _ in calls] == [2 if 0.5 < t < 1.0 else 1 for t in times.tolist()]


def test_saved_pipeline_keeps_a_diffusers_scheduler(pipe, tmp_path):
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True,
                                                         prediction_type="flow_prediction")
    pipe.save_pretrained(tmp_path)
    loaded = PixelREPAPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, UniPCMultistepScheduler) and loaded.scheduler.config.use_flow_sigmas


@pytest.mark.parametrize("scheduler, error, match", [
    (lambda: DDIMScheduler(), TypeError, "scheduler must be one of .*'UniPCMultistepScheduler'.*got DDIMScheduler"),
    (lambda: DPMSolverMultistepScheduler(), ValueError, "needs use_flow_sigmas=True"),
    (lambda: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="sample"), ValueError,
     r"needs prediction_type in \('flow_prediction',\)"),
])
def test_unsupported_schedulers_are_refused(pipe, scheduler, error, match):
    pipe.scheduler = scheduler()
    with pytest.raises(error, match=match):
        pipe([1], num_inference_steps=2)


def test_steps_a_diffusers_scheduler_cannot_take_are_refused(pipe):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\] for FlowMatchEulerDiscrete"):
        pipe([1], num_inference_steps=1001)


CHECK_INPUTS_DEFAULTS = dict(class_labels=[1], num_inference_steps=2, guidance_interval=(0.1, 1.0), generator=None,
                             latents=None, output_type="pt", callback_on_step_end_tensor_inputs=["latents"],
                             precision="model")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(class_labels=[10]), ValueError, "class_labels entry 10"),
        (dict(class_labels=["unicorn"]), ValueError, "Unknown class name 'unicorn'"),
        (dict(class_labels=[]), ValueError, "class_labels is empty"),
        (dict(class_labels=[1.5]), TypeError, "class_labels entries"),
        (dict(class_labels=torch.ones(1, 2, dtype=torch.long)), TypeError, "class_labels tensor must be 1-D"),
        (dict(latents=torch.randn(1, 3, 16, 16)), ValueError, r"latents must have shape \(1, 3, 32, 32\)"),
        (dict(class_labels=[1, 2], generator=[torch.manual_seed(0)]), ValueError, "generator is a list of 1"),
        (dict(output_type="tensor"), ValueError, "output_type must be one of"),
        (dict(guidance_interval=(0.5, 0.2)), ValueError, "guidance_interval must be"),
        (dict(callback_on_step_end_tensor_inputs=["x_pred"]), ValueError, "entry 'x_pred' is not in"),
        (dict(precision="fp16"), ValueError, "precision must be one of"),
    ],
)
def test_check_inputs_refuses_what_call_refuses_with_the_same_message(pipe, kwargs, error, match):
    arguments = {**CHECK_INPUTS_DEFAULTS, **kwargs}
    with pytest.raises(error, match=match):
        pipe.check_inputs(**arguments)
    with pytest.raises(error, match=match):
        pipe(**arguments)


def test_check_inputs_passes_good_arguments_and_checks_steps_of_diffusers_schedulers(pipe):
    pipe.check_inputs(**CHECK_INPUTS_DEFAULTS)
    pipe.check_inputs(**{**CHECK_INPUTS_DEFAULTS, "class_labels": ["seven", 2], "latents": torch.randn(2, 3, 32, 32),
                         "generator": [torch.manual_seed(0), torch.manual_seed(1)]})
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        pipe.check_inputs(**{**CHECK_INPUTS_DEFAULTS, "num_inference_steps": 0})
    with pytest.raises(TypeError, match="num_inference_steps must be an int, got float"):
        pipe.check_inputs(**{**CHECK_INPUTS_DEFAULTS, "num_inference_steps": 2.0})
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(TypeError, match="scheduler must be one of"):
        pipe.check_inputs(**CHECK_INPUTS_DEFAULTS)


def test_a_call_sets_the_regime_and_reads_the_labels_once_however_many_steps(pipe, monkeypatch):
    processor_sets, label_reads, regimes = [], [], []
    set_attn_processor, class_label_ids = pipe.transformer.set_attn_processor, pipe.class_label_ids
    monkeypatch.setattr(pipe.transformer, "set_attn_processor",
                        lambda processor: processor_sets.append(processor) or set_attn_processor(processor))
    monkeypatch.setattr(pipe, "class_label_ids", lambda labels: label_reads.append(labels) or class_label_ids(labels))

    def record_regime(pipeline, step, t, tensors):
        regimes.append(({type(p).__name__ for p in pipeline.transformer.attn_processors.values()},
                        torch.is_autocast_enabled("cpu")))
        return tensors

    before = pipe.transformer.attn_processors
    pipe([1, "seven"], num_inference_steps=4, output_type="pt", precision="official",
         callback_on_step_end=record_regime)
    assert len(label_reads) == 1
    assert len(processor_sets) == 2  # the regime's processors, then the caller's back
    # Every evaluation ran with the official processors; the solver and callbacks run outside autocast.
    assert regimes == [({"JiTFP32LogitsAttnProcessor"}, False)] * pipe.num_timesteps
    assert pipe.transformer.attn_processors.keys() == before.keys()
    assert all(type(pipe.transformer.attn_processors[name]) is type(before[name]) for name in before)

"""The conventions diffusers' own pipeline tests (PipelineTesterMixin) state, as PixelREPAPipeline keeps them:
callbacks that read and steer the call's state, "latent" output, and schedulers that carry the model's flow
settings."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.callbacks import PipelineCallback

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from tests.tiny_models import random_tiny_transformer

STEPS = 4  # Heun: 2 * 4 - 1 = 7 model evaluations, one callback each


@pytest.fixture
def pipe():
    pipeline = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.5,
                                 guidance_interval=(0.0, 1.0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipe, **kwargs):
    return pipe([1, 2], num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="latent",
                **kwargs).images


def batch_sizes(pipe, **kwargs):
    """The batch size of every transformer call of a run: 4 where guidance applies, 2 where it does not."""
    sizes = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    run(pipe, **kwargs)
    hook.remove()
    return sizes


def test_guidance_scale_is_the_calls_and_a_callback_can_raise_it(pipe):
    assert pipe.guidance_scale == 2.5 and pipe.do_classifier_free_guidance  # the registered default
    run(pipe, guidance_scale=4.0)
    assert pipe.guidance_scale == 4.0 and pipe.num_timesteps == 2 * STEPS - 1

    def raise_guidance(pipeline, step, t, tensors):  # diffusers' test_callback_cfg
        pipeline._guidance_scale += 1.0
        return tensors

    sizes = batch_sizes(pipe, guidance_scale=1.0, callback_on_step_end=raise_guidance)
    assert pipe.guidance_scale == 1.0 + pipe.num_timesteps
    assert sizes == [2] + [4] * (pipe.num_timesteps - 1)  # no guidance at 1.0, then guided from the callback on


def test_a_callback_steers_the_guidance_of_the_remaining_steps(pipe):
    def guidance_off(pipeline, step, t, tensors):
        pipeline._guidance_scale = 1.0
        return tensors

    assert batch_sizes(pipe, callback_on_step_end=guidance_off) == [4] + [2] * (2 * STEPS - 2)
    steered = run(pipe, callback_on_step_end=guidance_off)
    assert not torch.equal(steered, run(pipe))


def test_callbacks_see_and_replace_the_tensors_they_name(pipe):
    def check_and_zero_last(pipeline, step, t, tensors):  # diffusers' test_callback_inputs
        assert set(tensors) == set(pipeline._callback_tensor_inputs) == {"latents"}
        if step == pipeline.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    assert run(pipe, callback_on_step_end=check_and_zero_last).abs().sum() == 0
    assert run(pipe, callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=[]).abs().sum() > 0


def test_interrupt_returns_the_sample_reached(pipe):
    states = []

    def keep(pipeline, step, t, tensors):
        states.append(tensors["latents"].clone())
        return tensors

    run(pipe, callback_on_step_end=keep)
    calls = []

    def interrupt_at_two(pipeline, step, t, tensors):
        calls.append(step)
        pipeline._interrupt = step == 2
        return tensors

    interrupted = run(pipe, callback_on_step_end=interrupt_at_two)
    assert calls == [0, 1, 2] and pipe.interrupt
    torch.testing.assert_close(interrupted, states[2], rtol=0, atol=0)
    run(pipe)
    assert not pipe.interrupt  # every call starts uninterrupted


class InterruptAt(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        pipeline._interrupt = step_index == self.config.cutoff_step_index
        return callback_kwargs


def test_pipeline_callbacks_are_taken_with_their_tensor_inputs(pipe):
    pipe([1], num_inference_steps=STEPS, callback_on_step_end=InterruptAt(cutoff_step_ratio=None, cutoff_step_index=1),
         callback_on_step_end_tensor_inputs=[], output_type="latent")
    assert pipe.interrupt


def test_latent_output_is_the_sample_before_post_processing(pipe):
    latent = run(pipe)
    pt = pipe([1, 2], num_inference_steps=STEPS, generator=torch.manual_seed(0), output_type="pt").images
    assert latent.dtype == torch.float32 and latent.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    assert latent.min() < 0  # not the [0, 1] images


@pytest.mark.parametrize("replacement, found", [
    (torch.zeros(2, 3, 16, 16), r"\(2, 3, 16, 16\)"),
    (torch.zeros(1, 3, 32, 32), r"\(1, 3, 32, 32\)"),
    (None, "NoneType"),
])
def test_a_callback_returning_latents_of_another_shape_is_refused(pipe, replacement, found):
    with pytest.raises(ValueError, match=rf"^callback_on_step_end returned latents of shape {found}; expected a "
                                         r"tensor of shape \(2, 3, 32, 32\)\.$"):
        run(pipe, callback_on_step_end=lambda pipeline, step, t, tensors: {"latents": replacement})


@pytest.mark.parametrize("scheduler", [
    lambda: FlowMatchEulerDiscreteScheduler(),
    lambda: UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
])
def test_a_scheduler_without_the_models_flow_settings_is_refused(pipe, scheduler):
    pipe.scheduler = scheduler()
    name = type(pipe.scheduler).__name__
    with pytest.raises(ValueError, match=rf"^scheduler {name} lacks the model's noise_scale and t_eps; build it with "
                                         rf"{name}\.from_config\(pipe\.scheduler\.config, \.\.\.\) from the "
                                         r"pipeline's JiT scheduler\.$"):
        pipe([1], num_inference_steps=STEPS)


@pytest.mark.parametrize("noise_scale", [1.0, 2.0])
def test_from_config_carries_the_flow_settings_at_their_defaults_too(pipe, noise_scale):
    pipe.scheduler = JiTFlowMatchScheduler(noise_scale=noise_scale)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.flow_settings() == (noise_scale, 0.05)
    inputs = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    pipe([1], num_inference_steps=STEPS, latents=torch.ones(1, 3, 32, 32), output_type="latent")
    hook.remove()
    assert inputs[0].shape == (2, 3, 32, 32) and (inputs[0] == noise_scale).all()  # guided; the model's noise scale

"""
Modular Diffusers blocks that sample class-conditional images with a JiT / PixelREPA transformer as PixelREPAPipeline
does with its JiT scheduler: same noise from the same seed, same solver, guidance only inside the guidance interval.

This module is published to the Hub next to the pipeline's components, for
`ModularPipeline.from_pretrained(repo, trust_remote_code=True)`, and must stand alone there: it may import torch,
diffusers and the repo's other published modules (relative imports), never the pixelrepa-diffusers package.
"""

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.image_processor import VaeImageProcessor
from diffusers.modular_pipelines import (
    ComponentSpec,
    ConfigSpec,
    InputParam,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    OutputParam,
    SequentialPipelineBlocks,
)
from diffusers.utils.torch_utils import randn_tensor

from .scheduling_jit_flow_match import (
    GUIDANCE_INTERVAL, JiTFlowMatchScheduler, check_guidance_interval, in_guidance_interval,
)
from .transformer_jit import JiTTransformer2DModel, class_label_ids, class_name_index

OUTPUT_TYPES = ("pil", "np", "pt")


class PixelREPAClassLabelsStep(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return "Turns class labels (indices, or names from the pipeline's id2label) into class ids, one image each."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("transformer", JiTTransformer2DModel)]

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return [ConfigSpec("id2label", {}, "class index to name(s), comma-separated synonyms")]

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("class_labels", required=True, description="class indices or names, one image each")]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("class_ids", type_hint=torch.Tensor, description="(B,) class indices")]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        if components.transformer is None:
            raise ValueError("The pipeline has no transformer; load it with "
                             "pipe.load_components(trust_remote_code=True).")
        ids = class_label_ids(block_state.class_labels, class_name_index(components.config.id2label),
                              components.transformer.config.num_classes)
        block_state.class_ids = torch.tensor(ids, device=components._execution_device)
        self.set_block_state(state, block_state)
        return components, state


class PixelREPASetTimestepsStep(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return ("Makes the JiT scheduler from the pipeline's scheduler_config and sets its timesteps, the JiT times "
                "of the model evaluations, and which of them use classifier-free guidance: guidance_scale != 1 and t "
                "inside guidance_interval (both default to the pipeline's).")

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return [
            ConfigSpec("scheduler_config", {}, "JiTFlowMatchScheduler config (the repo's scheduler_config.json)"),
            ConfigSpec("guidance_scale", 1.0, "default classifier-free guidance scale (1.0 disables guidance)"),
            ConfigSpec("guidance_interval", list(GUIDANCE_INTERVAL), "default (min, max) JiT-time interval of guidance"),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("num_inference_steps", type_hint=int, default=50, description="ODE steps"),
            InputParam("guidance_scale", type_hint=float, description="CFG scale; None: the pipeline's default"),
            InputParam("guidance_interval", type_hint=tuple, description="CFG interval; None: the pipeline's default"),
            InputParam("accept_other_guidance", type_hint=bool, default=False,
                       description='let a "searched" solver sample with guidance other than it was searched for'),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [
            OutputParam("scheduler", type_hint=JiTFlowMatchScheduler, description="the solver, timesteps set"),
            OutputParam("timesteps", type_hint=torch.Tensor, description="JiT times of the model evaluations"),
            OutputParam("guided", type_hint=list, description="per evaluation: whether guidance applies"),
        ]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        if block_state.guidance_scale is None:
            block_state.guidance_scale = components.config.guidance_scale
        if block_state.guidance_interval is None:
            block_state.guidance_interval = components.config.guidance_interval
        block_state.guidance_interval = tuple(block_state.guidance_interval)
        check_guidance_interval(block_state.guidance_interval)
        scheduler = JiTFlowMatchScheduler.from_config(components.config.scheduler_config)
        scheduler.set_timesteps(
            block_state.num_inference_steps, device=components._execution_device,
            guidance_interval=None if block_state.guidance_scale == 1.0 else block_state.guidance_interval,
            guidance_scale=block_state.guidance_scale, accept_other_guidance=block_state.accept_other_guidance,
        )
        in_interval = in_guidance_interval(scheduler.timesteps.to("cpu", torch.float32), block_state.guidance_interval)
        block_state.scheduler = scheduler
        block_state.timesteps = scheduler.timesteps
        block_state.guided = [block_state.guidance_scale != 1.0 and flag for flag in in_interval.tolist()]
        self.set_block_state(state, block_state)
        return components, state


class PixelREPAPrepareLatentsStep(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return ("Draws the initial noise (standard normal, fp32, from `generator`) unless `latents` are given, and "
                "scales it by the scheduler's noise_scale.")

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("transformer", JiTTransformer2DModel)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("class_ids", required=True, type_hint=torch.Tensor),
            InputParam("scheduler", required=True, type_hint=JiTFlowMatchScheduler),
            InputParam("generator", description="torch generator(s) for the initial noise, one per image if a list"),
            InputParam("latents", type_hint=torch.Tensor,
                       description="standard-normal initial noise (B, C, H, W); scaled by the scheduler's noise_scale"),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("latents", type_hint=torch.Tensor, description="the ODE state at t = 0, fp32")]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        config = components.transformer.config
        batch_size = len(block_state.class_ids)
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(block_state.generator, list) and len(block_state.generator) != batch_size:
            raise ValueError(f"generator is a list of {len(block_state.generator)} but {batch_size} images were "
                             "asked for.")
        if block_state.latents is not None and tuple(block_state.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(block_state.latents.shape)}.")
        device = components._execution_device
        if block_state.latents is None:
            block_state.latents = randn_tensor(shape, generator=block_state.generator, device=device,
                                               dtype=torch.float32)
        noise_scale = block_state.scheduler.config.noise_scale
        block_state.latents = block_state.latents.to(device=device, dtype=torch.float32) * noise_scale
        self.set_block_state(state, block_state)
        return components, state


class PixelREPALoopDenoiser(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return ("Predicts the clean image at time t, with classifier-free guidance (the null class as the "
                "unconditional input) where `guided[i]`. A sub-block of PixelREPADenoiseStep.")

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("transformer", JiTTransformer2DModel)]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", required=True, type_hint=torch.Tensor),
            InputParam("class_ids", required=True, type_hint=torch.Tensor),
            InputParam("guidance_scale", required=True, type_hint=float),
            InputParam("guided", required=True, type_hint=list),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("x_pred", type_hint=torch.Tensor, description="predicted clean image, fp32")]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        transformer = components.transformer
        latents, class_ids = block_state.latents, block_state.class_ids
        if block_state.guided[i]:
            null_ids = torch.full_like(class_ids, transformer.config.num_classes)
            latents, class_ids = torch.cat([latents, latents]), torch.cat([class_ids, null_ids])
        x_pred = transformer(latents.to(transformer.dtype), t.expand(latents.shape[0]), class_ids).sample.float()
        if block_state.guided[i]:
            x_cond, x_uncond = x_pred.chunk(2)
            x_pred = x_uncond + block_state.guidance_scale * (x_cond - x_uncond)
        block_state.x_pred = x_pred
        return components, block_state


class PixelREPALoopAfterDenoiser(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return "Advances the ODE state with the scheduler's step. A sub-block of PixelREPADenoiseStep."

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("scheduler", required=True, type_hint=JiTFlowMatchScheduler),
            InputParam("x_pred", required=True, type_hint=torch.Tensor),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("latents", type_hint=torch.Tensor, description="the ODE state, fp32")]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        block_state.latents = block_state.scheduler.step(block_state.x_pred, t, block_state.latents).prev_sample
        return components, block_state


class PixelREPADenoiseStep(LoopSequentialPipelineBlocks):
    model_name = "pixelrepa"
    block_classes = [PixelREPALoopDenoiser, PixelREPALoopAfterDenoiser]
    block_names = ["denoiser", "after_denoiser"]

    @property
    def description(self) -> str:
        return ("Integrates the flow ODE from t = 0 to 1, running `denoiser` then `after_denoiser` at each of the "
                "scheduler's timesteps.")

    @property
    def loop_inputs(self) -> list[InputParam]:
        return [InputParam("timesteps", required=True, type_hint=torch.Tensor)]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        with self.progress_bar(total=len(block_state.timesteps)) as progress_bar:
            for i, t in enumerate(block_state.timesteps):
                components, block_state = self.loop_step(components, block_state, i=i, t=t)
                progress_bar.update()
        self.set_block_state(state, block_state)
        return components, state


class PixelREPAOutputStep(ModularPipelineBlocks):
    model_name = "pixelrepa"

    @property
    def description(self) -> str:
        return "Turns the sample into images in [0, 1]: PIL images, an array (B, H, W, C) or a tensor (B, C, H, W)."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("image_processor", VaeImageProcessor, config=FrozenDict({"vae_scale_factor": 1}),
                              default_creation_method="from_config")]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", required=True, type_hint=torch.Tensor),
            InputParam("output_type", type_hint=str, default="pil", description=f"one of {OUTPUT_TYPES}"),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("images", description="the images, as `output_type` says")]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        if block_state.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {block_state.output_type!r}.")
        block_state.images = components.image_processor.postprocess(block_state.latents,
                                                                    output_type=block_state.output_type)
        self.set_block_state(state, block_state)
        return components, state


class PixelREPABlocks(SequentialPipelineBlocks):
    """
    Class-conditional sampling: class labels to ids, the scheduler's timesteps, the initial noise, the denoising
    loop, images.

    `ModularPipeline.from_pretrained(repo, trust_remote_code=True)` builds the pipeline; `load_components(
    trust_remote_code=True)` loads the transformer; `pipe(class_labels=..., output="images")` samples.
    """

    model_name = "pixelrepa"
    block_classes = [PixelREPAClassLabelsStep, PixelREPASetTimestepsStep, PixelREPAPrepareLatentsStep,
                     PixelREPADenoiseStep, PixelREPAOutputStep]
    block_names = ["labels", "set_timesteps", "prepare_latents", "denoise", "postprocess"]

    @property
    def description(self) -> str:
        return ("Samples class-conditional images with a JiT / PixelREPA transformer and the JiT flow-matching "
                "scheduler (Heun by default), classifier-free guidance inside the guidance interval.")

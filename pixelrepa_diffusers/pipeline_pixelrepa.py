"""
Class-conditional pixel-space sampling with JiT / PixelREPA transformers.

This module is published to the Hub as the pipeline's remote code (`hub.remote_code_files`) and must stand alone
there: it imports torch, diffusers and the two published component modules, never another module of this package
(`hub.check_standalone` refuses to publish it otherwise). Hence the pipeline carries its own loader, and
`uses_jit_scheduler` matches the scheduler by class name: remote code loads its own copy of the class.
"""

import contextlib
import os
from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .scheduling_jit_flow_match import (
    FLOW_SETTINGS, GUIDANCE_INTERVAL, JiTFlowMatchScheduler, check_guidance_interval, in_guidance_interval,
)
from .transformer_jit import (
    JiTAttnProcessor, JiTFP32LogitsAttnProcessor, JiTTransformer2DModel, class_label_ids, class_name_index,
)

# "latent": the sample as the ODE leaves it, in [-1, 1] up to the model's error, before any post-processing.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Numerical regimes of the transformer while sampling (the ODE state is fp32 in all of them):
#   "model": the transformer in its own weight dtype with autocast off, and its own attention processors
#       (JiTAttnProcessor through diffusers' attention dispatch, torch SDPA, by default).
#   "official": what the JiT and PixelREPA papers sample and evaluate with: fp32 weights under bf16 autocast,
#       attention logits q k^T and softmax in fp32 with autocast off, attention weights @ v in bf16.
#   "bf16_sdpa": fp32 weights under bf16 autocast with attention through diffusers' dispatch in bf16 (SDPA, flash
#       attention on GPU, or the backend chosen with `transformer.set_attention_backend`).
PRECISIONS = ("model", "official", "bf16_sdpa")
# diffusers' flow-matching schedulers the pipeline drives (sigma = 1 - JiT time), with the model outputs each takes.
DIFFUSERS_SCHEDULERS = {
    FlowMatchEulerDiscreteScheduler: ("flow_prediction",),
    DPMSolverMultistepScheduler: ("flow_prediction", "sample"),
    UniPCMultistepScheduler: ("flow_prediction",),
}
SCHEDULER_CLASSES = {cls.__name__: cls for cls in (JiTFlowMatchScheduler, *DIFFUSERS_SCHEDULERS)}
# What from_pretrained downloads of a repo besides the transformer's weights (safetensors, else .bin): never code.
PIPELINE_FILES = ["model_index.json", "transformer/*.json", "scheduler/*.json"]
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# This package's component classes by name: (their module, as save_pretrained names it in model_index.json, and
# the name of its published file, e.g. "transformer_jit").
COMPONENT_MODULES = {
    component.__name__: (component.__module__, component.__module__.rpartition(".")[2])
    for component in (JiTTransformer2DModel, JiTFlowMatchScheduler)
}


class PixelREPAPipeline(DiffusionPipeline):
    """
    Samples images of given classes by integrating the JiT flow ODE from noise (t = 0) to image (t = 1), with
    classifier-free guidance applied only for t inside `guidance_interval`.

    Args:
        transformer: the x-predicting JiT denoiser.
        scheduler: the ODE solver: a `JiTFlowMatchScheduler`, or one of diffusers' flow-matching schedulers
            (`FlowMatchEulerDiscreteScheduler`; `DPMSolverMultistepScheduler` or `UniPCMultistepScheduler` with
            `use_flow_sigmas=True`), made with `X.from_config(pipe.scheduler.config, ...)` so that it keeps the
            model's noise_scale and t_eps.
        id2label: class index to name; names may then be used as class labels.
        guidance_scale: default classifier-free guidance scale (1.0 disables guidance).
        guidance_interval: default (min, max) JiT-time interval where guidance applies.
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: JiTTransformer2DModel,
        scheduler: JiTFlowMatchScheduler | FlowMatchEulerDiscreteScheduler | DPMSolverMultistepScheduler
        | UniPCMultistepScheduler,
        id2label: dict | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple | list = GUIDANCE_INTERVAL,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        check_guidance_interval(guidance_interval)
        id2label = {int(key): value for key, value in (id2label or {}).items()}
        self.register_to_config(
            id2label=id2label, guidance_scale=guidance_scale, guidance_interval=list(guidance_interval)
        )
        self.labels = class_name_index(id2label)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)
        # The state of a call, which callbacks read and may change (see the properties below).
        self._guidance_scale = guidance_scale
        self._num_timesteps = 0
        self._current_timestep = None
        self._interrupt = False

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | dict | None = None,
        low_cpu_mem_usage: bool = True,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        proxies: dict[str, str] | None = None,
    ) -> "PixelREPAPipeline":
        """
        Loads a saved pipeline folder or a Hub repo id with this package's classes, online or offline from the HF
        cache, through `DiffusionPipeline.from_pretrained` with the arguments of it that apply to a transformer and a
        scheduler:

        - dtype (diffusers' name; `torch_dtype`, deprecated there, also works): the transformer's dtype, or a dict of
          component name (or "default") to dtype.
        - variant: load `diffusion_pytorch_model.<variant>.safetensors` (as `save_pretrained(variant=...)` writes).
        - use_safetensors: None prefers safetensors and falls back to `.bin` (loaded with `weights_only=True`); True
          requires safetensors; False loads `.bin`.
        - device_map and low_cpu_mem_usage: as in `DiffusionPipeline.from_pretrained`.
        - revision, cache_dir, token, local_files_only, force_download, proxies: passed to `snapshot_download` for a
          repo id.

        Repos pushed by `push_pipeline_to_hub` also carry remote code for
        `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`. This method neither downloads nor runs
        it: a repo id is downloaded here, configs and weights only (diffusers' `download` would fetch the code files
        its model index names), and `load_config` reads the model index as naming this package's classes.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            try:
                validate_repo_id(folder)
            except HFValidationError:
                raise FileNotFoundError(f"No folder {folder} exists, and {folder!r} is not a Hub repo id.") from None
            download = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                            force_download=force_download, proxies=proxies)
            repo_id = folder
            for suffix in {None: WEIGHT_SUFFIXES, True: (".safetensors",), False: (".bin",)}[use_safetensors]:
                folder = snapshot_download(repo_id, allow_patterns=PIPELINE_FILES + weight_patterns(variant, suffix),
                                           ignore_patterns=None if variant else [f"transformer/*.*{suffix}"],
                                           **download)
                if weight_files(folder):
                    break
        config = cls.load_config(folder)
        scheduler_class = config["scheduler"][1]
        if scheduler_class not in SCHEDULER_CLASSES:
            raise TypeError(f"{folder} has a {scheduler_class} scheduler; expected one of {sorted(SCHEDULER_CLASSES)}.")
        pipeline = super().from_pretrained(
            folder, dtype=dtype, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors,
            device_map=device_map, low_cpu_mem_usage=low_cpu_mem_usage,
        )
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    @classmethod
    def load_config(cls, *args, **kwargs):
        """
        diffusers' `load_config`, reading a model index published with remote code as naming this package's
        classes: its `[module, class]` entries name the published copies of this package's modules (see
        `hub.remote_code_files`), and loading must never import code from a repository.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if config.get("_class_name") == [cls.__module__.rpartition(".")[2], cls.__name__]:
            config["_class_name"] = cls.__name__
        config.pop("auto_map", None)  # where AutoModel finds the published transformer module
        for name, entry in config.items():
            if isinstance(entry, list) and len(entry) == 2 and entry[1] in COMPONENT_MODULES:
                module, published_module = COMPONENT_MODULES[entry[1]]
                if entry[0] == published_module:
                    config[name] = [module, entry[1]]
        return loaded

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class indices of ImageNet-style class names (any comma-separated synonym of `id2label` works)."""
        names = [label] if isinstance(label, str) else list(label)
        return class_label_ids(names, self.labels, self.transformer.config.num_classes)

    def class_label_ids(self, class_labels) -> list[int]:
        """Class labels as a list of ints in [0, num_classes), from ints, names or a 1-D tensor."""
        return class_label_ids(class_labels, self.labels, self.transformer.config.num_classes)

    def check_inputs(
        self,
        class_labels,
        num_inference_steps,
        guidance_interval,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        precision,
    ) -> list[int]:
        """
        Raises on arguments `__call__` cannot sample with, and on an unsupported scheduler; returns the class ids of
        `class_labels`. The JiT scheduler checks `num_inference_steps` against its solver itself.
        """
        check_precision(precision, self.transformer.dtype)
        labels = self.class_label_ids(class_labels)
        batch_size = len(labels)
        check_guidance_interval(guidance_interval)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs entry {name!r} is not in "
                                 f"{self._callback_tensor_inputs}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator is a list of {len(generator)} but {batch_size} images were asked for.")
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        if not uses_jit_scheduler(self.scheduler):
            self.flow_settings()
            num_train_timesteps = self.scheduler.config.num_train_timesteps
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}.")
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}] for "
                                 f"{type(self.scheduler).__name__} (its num_train_timesteps), got "
                                 f"{num_inference_steps}.")
        return labels

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running call (the registered default before any call); callbacks may change
        it through `_guidance_scale`."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        """The number of model evaluations of the running (or last) call, one callback each."""
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The JiT time of the running model evaluation (None outside a call): what the timestep callbacks of
        diffusers' PyramidAttentionBroadcast and FasterCache read, as 1000 * (1 - t) in their direction."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `_interrupt = True` from a callback to stop sampling; the call returns the sample reached."""
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        precision: str = "model",
        accept_other_guidance: bool = False,
    ):
        """
        Args:
            class_labels: class indices or names, one image each.
            num_inference_steps: ODE steps over the scheduler's time grid (uniform by default).
            guidance_scale: CFG scale; defaults to the pipeline's registered value.
            guidance_interval: (min, max) JiT-time interval for CFG; defaults to the registered value.
            generator: torch generator(s) for the initial noise, one per image if a list.
            latents: standard-normal initial noise (B, C, H, W); scaled by the scheduler's `noise_scale`.
            output_type: "pil", "np" (B, H, W, C) in [0, 1], "pt" (B, C, H, W) in [0, 1], or "latent": the sample
                as the sampler produced it (B, C, H, W), in [-1, 1] up to the model's error, not post-processed.
            return_dict: return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: called as `fn(pipe, step, t, tensors)` after each model evaluation (a
                `PipelineCallback` too); may return replacements for the tensors named in
                `callback_on_step_end_tensor_inputs`, and may change `pipe._guidance_scale` or set
                `pipe._interrupt = True` for the rest of the call.
            precision: the transformer's numerical regime, one of `PRECISIONS`: "model" (its weight dtype, no
                autocast), "official" (the papers': fp32 weights, bf16 autocast, fp32 attention logits) or
                "bf16_sdpa" (bf16 autocast, SDPA attention in bf16). The last two need fp32 weights.
            accept_other_guidance: let a "searched" scheduler sample with a guidance scale or interval other than
                it was searched for (its coefficients were fitted to those).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        guidance_interval = tuple(self.config.guidance_interval if guidance_interval is None else guidance_interval)
        labels = self.check_inputs(class_labels, num_inference_steps, guidance_interval, generator, latents,
                                   output_type, callback_on_step_end_tensor_inputs, precision)
        batch_size = len(labels)
        config = self.transformer.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        noise_scale, t_eps = self.flow_settings()
        latents = latents.to(device=device, dtype=torch.float32) * noise_scale

        jit_scheduler = uses_jit_scheduler(self.scheduler)
        timesteps = self.evaluation_times(num_inference_steps, device, jit_scheduler, guidance_scale,
                                          None if guidance_scale == 1.0 else guidance_interval, accept_other_guidance)
        in_interval = in_guidance_interval(timesteps.detach().to("cpu", torch.float32), guidance_interval).tolist()
        class_labels = torch.tensor(labels, device=device)
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(timesteps)
        self._interrupt = False

        with self.progress_bar(total=len(timesteps)) as progress_bar, precision_attention(self.transformer, precision):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                guidance = self.guidance_scale if self.do_classifier_free_guidance and in_interval[i] else None
                self._current_timestep = t
                x_pred = self.predict_clean_image(latents, t, class_labels, guidance, precision)
                if jit_scheduler:
                    latents = self.scheduler.step(x_pred, t, latents).prev_sample
                else:
                    latents = self.diffusers_step(x_pred, i, latents, t_eps)

                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents}
                    callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    # The callback may replace the state but not its shape: the next evaluation takes it as is.
                    if not isinstance(latents, torch.Tensor) or latents.shape != shape:
                        found = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                        raise ValueError(f"callback_on_step_end returned latents of shape {found}; expected a "
                                         f"tensor of shape {shape}.")
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def predict_clean_image(self, latents: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor,
                            guidance: float | None, precision: str) -> torch.Tensor:
        """The model's clean-image prediction (fp32) at JiT time `t`: x_uncond + guidance (x_cond - x_uncond), or
        x_cond where `guidance` is None."""
        if guidance is not None:
            model_input = torch.cat([latents, latents])
            labels_input = torch.cat([class_labels, torch.full_like(class_labels, self.transformer.config.num_classes)])
        else:
            model_input, labels_input = latents, class_labels
        # A guided call has twice the batch, so diffusers' caches (transformer.enable_cache) keep its states apart.
        with self.transformer.cache_context("cond_uncond" if guidance is not None else "cond"), \
                precision_autocast(precision, latents.device):
            x_pred = self.transformer(
                model_input.to(self.transformer.dtype), t.expand(model_input.shape[0]), labels_input
            ).sample.float()
        if guidance is not None:
            x_cond, x_uncond = x_pred.chunk(2)
            x_pred = x_uncond + guidance * (x_cond - x_uncond)
        return x_pred

    def flow_settings(self) -> tuple[float, float]:
        """
        (noise_scale, t_eps) of the model: the JiT scheduler's, which a diffusers scheduler made with
        `X.from_config(pipe.scheduler.config, ...)` carries in its config.
        """
        config = self.scheduler.config
        if any(name not in config for name in FLOW_SETTINGS):
            name = type(self.scheduler).__name__
            raise ValueError(f"scheduler {name} lacks the model's {' and '.join(FLOW_SETTINGS)}; build it with "
                             f"{name}.from_config(pipe.scheduler.config, ...) from the pipeline's JiT scheduler.")
        return config.noise_scale, config.t_eps

    def evaluation_times(self, num_inference_steps: int, device, jit_scheduler: bool, guidance_scale: float,
                         guidance_interval, accept_other_guidance: bool) -> torch.Tensor:
        """Sets the scheduler's timesteps; returns the JiT times of the model evaluations (t = 1 - sigma)."""
        if jit_scheduler:
            self.scheduler.set_timesteps(num_inference_steps, device=device, guidance_interval=guidance_interval,
                                         guidance_scale=guidance_scale, accept_other_guidance=accept_other_guidance)
            return self.scheduler.timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = self.scheduler.sigmas[: len(self.scheduler.timesteps)]
        return (1 - sigmas).to(device=device, dtype=torch.float32)

    def diffusers_step(self, x_pred: torch.Tensor, index: int, latents: torch.Tensor, t_eps: float) -> torch.Tensor:
        """One step of a diffusers scheduler, fed the x-prediction or the official clamped velocity in sigma."""
        if getattr(self.scheduler.config, "prediction_type", "flow_prediction") == "sample":
            model_output = x_pred
        else:  # dz/dsigma = -dz/dt = (z - x_pred) / max(sigma, t_eps)
            sigma = self.scheduler.sigmas[index].to(device=latents.device, dtype=torch.float32)
            model_output = (latents - x_pred) / sigma.clamp_min(t_eps)
        return self.scheduler.step(model_output, self.scheduler.timesteps[index], latents).prev_sample.float()


def weight_patterns(variant: str | None, suffix: str) -> list[str]:
    """Hub patterns of the transformer's weight files of `variant` (any variant when None) ending in `suffix`."""
    return [f"transformer/*.{variant}{suffix}" if variant else f"transformer/*{suffix}"]


def weight_files(folder: str) -> list[str]:
    """The names of the transformer weight files (safetensors or .bin, any variant or shard) in a pipeline folder."""
    return sorted(name for name in os.listdir(os.path.join(folder, "transformer")) if name.endswith(WEIGHT_SUFFIXES))


def uses_jit_scheduler(scheduler) -> bool:
    """
    True for a JiTFlowMatchScheduler (by name: remote code loads its own copy of the class), False for a supported
    diffusers scheduler; TypeError for any other, ValueError for a supported one configured otherwise.
    """
    name = type(scheduler).__name__
    if name == JiTFlowMatchScheduler.__name__:
        return True
    if type(scheduler) not in DIFFUSERS_SCHEDULERS:
        raise TypeError(f"scheduler must be one of {sorted(SCHEDULER_CLASSES)}, got {name}.")
    if name != "FlowMatchEulerDiscreteScheduler":
        if not scheduler.config.use_flow_sigmas:
            raise ValueError(f"{name} needs use_flow_sigmas=True to integrate the flow ODE.")
        if scheduler.config.prediction_type not in DIFFUSERS_SCHEDULERS[type(scheduler)]:
            raise ValueError(f"{name} needs prediction_type in {DIFFUSERS_SCHEDULERS[type(scheduler)]}, got "
                             f"{scheduler.config.prediction_type!r}.")
    return False


def check_precision(precision: str, transformer_dtype: torch.dtype) -> None:
    """Raises ValueError unless `precision` is one of PRECISIONS and, if it autocasts, the weights are fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if precision != "model" and transformer_dtype != torch.float32:
        raise ValueError(
            f"precision {precision!r} runs fp32 weights under bf16 autocast, but the transformer is {transformer_dtype}; "
            "load it with dtype=torch.float32, the default (--dtype fp32 on the command line)."
        )


@contextlib.contextmanager
def precision_attention(transformer: JiTTransformer2DModel, precision: str):
    """
    Sets the attention processors of the regime `precision` (see PRECISIONS, checked by `check_precision`) for the
    block: "official" swaps in `JiTFP32LogitsAttnProcessor` and "bf16_sdpa" `JiTAttnProcessor` where another is set.
    """
    processors = transformer.attn_processors
    if precision == "official":
        transformer.set_attn_processor(JiTFP32LogitsAttnProcessor())
    elif precision == "bf16_sdpa":
        transformer.set_attn_processor({
            name: processor if isinstance(processor, JiTAttnProcessor) else JiTAttnProcessor()
            for name, processor in processors.items()
        })
    try:
        yield
    finally:
        transformer.set_attn_processor(dict(processors))


def precision_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast of the regime `precision` on `device`: bf16 for "official" and "bf16_sdpa", none for "model"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "model")

"""Training helpers: exponential moving averages (FSDP2-aware), atomic, durable, pruned checkpoint folders of diffusers
model folders, and the loss meter."""

import json
import os
import pickle
import re
import shutil

import torch
from accelerate import init_empty_weights
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, load
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .serialization import pickled_code_refusal
from .transformer_jit import JiTTransformer2DModel

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PREFIX = ".tmp-checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
# The AdamW state of a training checkpoint converted from an official run, as `<parameter>.<field>` tensors.
OPTIMIZER_MOMENTS_NAME = "optimizer_moments.safetensors"
ADAMW_FIELDS = ("step", "exp_avg", "exp_avg_sq")

logger = get_logger(__name__)


class ExponentialMovingAverage:
    """
    Averages of a model's parameters, `average = decay * average + (1 - decay) * parameter` after every update, from
    the first step on (no warm-up), as in the official JiT / PixelREPA code. Buffers are copied, not averaged. Under
    FSDP2 the parameters are sharded DTensors and each process averages its own shards.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.averages = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        self.buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        parameters = [parameter.detach() for parameter in model.parameters()]
        torch._foreach_lerp_(list(self.averages.values()), parameters, 1.0 - self.decay)

    @torch.no_grad()
    def gathered_state_dict(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """
        The averages and buffers as a full state dict of the model where `keep` (the process that writes or samples
        them), else None; every process must call. Plain tensors come as they are, not copied: read them only, before
        the next update. FSDP2 shards are gathered one tensor at a time and kept on the CPU, so no process holds a
        full copy on its device.
        """
        state = {}
        for name, average in self.averages.items():
            if isinstance(average, DTensor):
                full = average.full_tensor()  # a collective: every process, every tensor
                average = full.cpu() if keep else None
                del full
            if keep:
                state[name] = average
        return {**state, **self.buffers} if keep else None

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Sets the averages from a full state dict of the model; under FSDP2 every process must call."""
        missing = sorted(set(self.averages) - set(state_dict))
        if missing:
            raise ValueError(f"the EMA state dict lacks {len(missing)} parameters, e.g. {missing[:3]}.")
        for name, average in self.averages.items():
            value = state_dict[name].to(device=average.device, dtype=average.dtype)
            if isinstance(average, DTensor):
                value = distribute_tensor(value, average.device_mesh, average.placements)
            average.copy_(value)


def load_into(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Loads `state_dict` strictly, naming missing/unexpected keys in a ValueError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}.")
    model.load_state_dict(state_dict)


def read_model_folder(model_class, config, folder: str, what: str) -> dict[str, torch.Tensor]:
    """The full state dict of a saved diffusers model folder, refusing one saved with another config than `config`."""
    saved = model_class.from_pretrained(folder)
    differences = {key: (value, config[key]) for key, value in saved.config.items()
                   if not key.startswith("_") and config.get(key) != value}
    if differences:
        raise ValueError(f"{what} in {folder} has another config than this run (saved, run): {differences}")
    return saved.state_dict()


def unsharded_copy(model_class, config, state_dict):
    """A plain, frozen `model_class` with `config` that holds the full `state_dict` (e.g. gathered from FSDP shards)."""
    with init_empty_weights():
        model = model_class.from_config(config)
    model.load_state_dict(state_dict, assign=True)
    return model.requires_grad_(False).eval()


def submodule_state(state_dict: dict, prefix: str) -> dict:
    """The entries of `state_dict` under `prefix`, without it."""
    return {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}


def read_run_state(checkpoint: str, alignment: str, ema_decays: list[float]) -> dict:
    """The training_state.json of a checkpoint, refused when it was saved with another alignment or EMA decays."""
    with open(os.path.join(checkpoint, TRAINING_STATE_NAME)) as file:
        state = json.load(file)
    if state["alignment"] != alignment or state["ema_decays"] != ema_decays:
        raise ValueError(f"{checkpoint} was saved with --alignment {state['alignment']} --ema_decays "
                         f"{' '.join(map(str, state['ema_decays']))}; resume with the same flags")
    return state


def load_model_folders(input_dir: str, trained, emas: list, transformer_config) -> None:
    """
    Loads a checkpoint's transformer and aligner into `trained` (a JiTTrainingObjective; skipped when None)
    and its EMAs.
    """
    if trained is not None:
        folder = os.path.join(input_dir, "transformer")
        load_into(trained.transformer, read_model_folder(JiTTransformer2DModel, transformer_config, folder,
                                                         "transformer"), "transformer")
        if trained.aligner is not None:
            method = trained.method
            load_into(trained.aligner, read_model_folder(method.aligner_class, trained.aligner.config,
                                                         os.path.join(input_dir, method.folder), method.folder),
                      method.folder)
    for index, ema in enumerate(emas, start=1):
        ema.load_full_state_dict(read_model_folder(JiTTransformer2DModel, transformer_config,
                                                   os.path.join(input_dir, f"ema_{index}"), f"ema_{index}"))


class TrainingCheckpointer:
    """
    Saves and resumes a run. Checkpoints go through accelerate's save_state / load_state, whose hooks write the
    trained transformer, its aligner and the EMAs as diffusers folders (full tensors, also under FSDP2) with the step
    and skipped image count in training_state.json, and read them back. A converted official run (conversion.py)
    resumes from its weight folders and AdamW moments instead, at the step its finished epochs count.
    """

    def __init__(self, accelerator, checkpoint: str | None, alignment: str, ema_decays: list[float]):
        """Reads the training state of `checkpoint`, the folder the run resumes from (None: a fresh start)."""
        self.accelerator = accelerator
        self.checkpoint = checkpoint
        self.run_state = None if checkpoint is None else read_run_state(checkpoint, alignment, ema_decays)
        if self.official_epochs is not None and accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError(f"{checkpoint} is a converted official run; continue it under DDP or in one process "
                             "(its AdamW state is loaded unsharded)")
        self.trained, self.emas = None, []
        self.global_step = 0
        self.skipped_images = 0
        accelerator.register_save_state_pre_hook(self.save_model_hook)
        accelerator.register_load_state_pre_hook(self.load_model_hook)

    @property
    def official_epochs(self) -> int | None:
        """The finished epochs of the converted official run the run resumes from; None for any other start."""
        return None if self.run_state is None else self.run_state.get("official_epochs")

    def schedule_start(self, steps_per_epoch: int) -> int:
        """The optimizer step the lr schedule is built at: a converted official run's finished epochs in steps, else 0
        (load_state restores the schedule of a checkpoint of ours)."""
        return 0 if self.official_epochs is None else self.official_epochs * steps_per_epoch

    def start(self, trained, emas: list, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> int:
        """
        Takes the trained module (the unwrapped JiTTrainingObjective) and the EMAs that checkpoints hold, restores
        the checkpoint into them, the optimizer and accelerate's prepared objects (refusing pickled objects outside
        the weights-only allow-list), and returns the optimizer step the run continues at.
        """
        self.trained, self.emas = trained, emas
        if self.official_epochs is not None:
            load_model_folders(self.checkpoint, trained, emas, trained.transformer.config)
            load_adamw_moments(optimizer, trained,
                               load_file(os.path.join(self.checkpoint, OPTIMIZER_MOMENTS_NAME)))
            self.global_step = self.schedule_start(steps_per_epoch)
            logger.info(f"Continuing the official run in {self.checkpoint} after {self.official_epochs} epochs, at "
                        f"step {self.global_step}")
        elif self.checkpoint is not None:
            try:
                self.accelerator.load_state(self.checkpoint)
            except pickle.UnpicklingError as error:
                raise pickled_code_refusal(self.checkpoint, error) from None
            logger.info(f"Resumed from {self.checkpoint} at step {self.global_step}")
        return self.global_step

    def save(self, output_dir: str, global_step: int, skipped_images: int, total_limit: int | None) -> str:
        """Writes `checkpoint-<global_step>` (see save_checkpoint); returns its path."""
        self.global_step, self.skipped_images = global_step, skipped_images
        return save_checkpoint(self.accelerator, output_dir, global_step, total_limit)

    def save_model_hook(self, models, weights, output_dir):
        trained, config = self.trained, self.trained.transformer.config
        state = self.accelerator.get_state_dict(models[0])  # full tensors; collectives under FSDP, as are the EMAs'
        ema_states = [ema.gathered_state_dict(keep=self.accelerator.is_main_process) for ema in self.emas]
        if self.accelerator.is_main_process:
            unsharded_copy(JiTTransformer2DModel, config, submodule_state(state, "transformer.")).save_pretrained(
                os.path.join(output_dir, "transformer"))
            if trained.aligner is not None:
                unsharded_copy(trained.method.aligner_class, trained.aligner.config,
                               submodule_state(state, "aligner.")).save_pretrained(
                    os.path.join(output_dir, trained.method.folder))
            for index, ema_state in enumerate(ema_states, start=1):
                unsharded_copy(JiTTransformer2DModel, config, ema_state).save_pretrained(
                    os.path.join(output_dir, f"ema_{index}"))
            run_state = {"global_step": self.global_step, "skipped_images": self.skipped_images,
                         "alignment": trained.method.name, "ema_decays": [ema.decay for ema in self.emas]}
            with open(os.path.join(output_dir, TRAINING_STATE_NAME), "w") as file:
                json.dump(run_state, file, indent=2)
        if weights:  # accelerate's own copy of the models; under FSDP it writes its model shards instead
            weights.pop()

    def load_model_hook(self, models, input_dir):
        accelerator = self.accelerator
        # accelerate ignores RNG states it cannot read (weights-only); an inexact resume must fail instead.
        load(os.path.join(input_dir, f"random_states_{accelerator.process_index}.pkl"))
        # under FSDP, accelerate has restored the model from its shards and passes no models
        unwrapped = accelerator.unwrap_model(models.pop()) if models else None
        load_model_folders(input_dir, unwrapped, self.emas, self.trained.transformer.config)
        run_state = read_run_state(input_dir, self.trained.method.name, [ema.decay for ema in self.emas])
        self.global_step, self.skipped_images = run_state["global_step"], run_state["skipped_images"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class LossMeter:
    """
    The loss terms summed on the device between logging steps, the first step with a non-finite loss, and the
    unreadable images skipped. Only check_finite, means and skipped sync with the host; every process calls them.
    """

    NAMES = ("loss", "loss_jit", "loss_alignment")

    def __init__(self, accelerator, skipped_images: int = 0):
        self.accelerator = accelerator
        self.sums = torch.zeros(len(self.NAMES), device=accelerator.device)
        self.count = torch.zeros((), device=accelerator.device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
        self.skipped_images = skipped_images  # over all processes, up to the last call of skipped()
        self.skipped_here = 0  # by this process since then

    def add(self, losses: dict[str, torch.Tensor], step: int) -> None:
        """Adds the loss terms of a batch of optimizer step `step`."""
        self.sums += torch.stack([losses[name].detach().float() for name in self.NAMES])
        self.count += 1
        bad = ~torch.isfinite(losses["loss"].detach()) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(bad, step, self.first_nonfinite_step)

    def skip(self, count: int) -> None:
        """Counts `count` unreadable images left out of this process's batch."""
        self.skipped_here += count

    def check_finite(self, last_checkpoint: str | None) -> None:
        """Raises NonFiniteLossError naming the first step of any process with a non-finite loss."""
        step = self.accelerator.reduce(self.first_nonfinite_step.clone(), reduction="max").item()
        if step >= 0:
            raise NonFiniteLossError(f"the loss is not finite at step {step}; stopped, the last good checkpoint is "
                                     f"{last_checkpoint or 'none'}")

    def means(self) -> dict[str, float]:
        """The loss terms averaged over batches and processes since the last call."""
        means = self.accelerator.reduce(self.sums / self.count, reduction="mean").tolist()
        self.sums.zero_()
        self.count.zero_()
        return dict(zip(self.NAMES, means))

    def skipped(self) -> int:
        """The unreadable images skipped by all processes so far."""
        here = torch.tensor(self.skipped_here, device=self.accelerator.device)
        self.skipped_images += self.accelerator.reduce(here, reduction="sum").item()
        self.skipped_here = 0
        return self.skipped_images


def load_adamw_moments(optimizer: torch.optim.Optimizer, module: torch.nn.Module, moments: dict) -> None:
    """Sets the AdamW state of every parameter `optimizer` trains from `moments` (`<name in module>.<field>`)."""
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    trained = [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    expected = {f"{name}.{field}" for name in trained for field in ADAMW_FIELDS}
    if set(moments) != expected:
        missing, unexpected = sorted(expected - set(moments)), sorted(set(moments) - expected)
        raise ValueError(f"the AdamW moments do not fit the trained parameters: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}.")
    state = {index: {field: moments[f"{name}.{field}"] for field in ADAMW_FIELDS} for index, name in enumerate(trained)}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoint folders `checkpoint-<step>` in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of output_dir, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Deletes the temporary folders left by interrupted saves; returns their paths."""
    if not os.path.isdir(output_dir):
        return []
    removed = [os.path.join(output_dir, name) for name in os.listdir(output_dir) if name.startswith(TEMPORARY_PREFIX)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def fsync_path(path: str) -> None:
    """Flushes a file's or a folder's entries to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: str, write) -> None:
    """Calls write(file) on `path`.tmp, flushes it to the disk, renames it to `path` and flushes the folder, so that
    `path` only ever exists complete, even after a power loss."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def fsync_tree(folder: str) -> None:
    """Flushes every file under `folder`, then every folder, deepest first, to the disk."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """
    Writes `accelerator.save_state` to a temporary folder and renames it to `checkpoint-<step>` only once every
    process has finished, so a `checkpoint-<step>` folder is always complete. The files and folders are on the disk
    before the rename, and the rename before the return, so a power loss never leaves a `checkpoint-<step>` with
    empty files. Then keeps the newest `total_limit`.
    """
    temporary = os.path.join(output_dir, f"{TEMPORARY_PREFIX}{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if accelerator.is_main_process and os.path.exists(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        fsync_tree(temporary)
        os.replace(temporary, final)
        fsync_path(output_dir)
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final

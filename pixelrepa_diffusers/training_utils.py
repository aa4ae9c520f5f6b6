"""Training helpers: exponential moving averages (FSDP2-aware) and atomic, pruned checkpoint folders."""

import os
import re
import shutil

import numpy as np
import torch
from PIL import Image
from torch.distributed.tensor import DTensor, distribute_tensor

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_PREFIX = ".tmp-checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
# The AdamW state of a training checkpoint converted from an official run, as `<parameter>.<field>` tensors.
OPTIMIZER_MOMENTS_NAME = "optimizer_moments.safetensors"
ADAMW_FIELDS = ("step", "exp_avg", "exp_avg_sq")


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
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A full copy of the averages and buffers, a state dict of the model; under FSDP2 every process must call."""
        averages = {name: average.full_tensor() if isinstance(average, DTensor) else average.clone()
                    for name, average in self.averages.items()}
        return {**averages, **{name: buffer.clone() for name, buffer in self.buffers.items()}}

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


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """
    Writes `accelerator.save_state` to a temporary folder and renames it to `checkpoint-<step>` only once every
    process has finished, so a `checkpoint-<step>` folder is always complete. Then keeps the newest `total_limit`.
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
        os.replace(temporary, final)
        if total_limit is not None:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def image_grid(images: np.ndarray, rows: int) -> Image.Image:
    """Images (N, H, W, 3) in [0, 1], row-major, as one PIL image of `rows` rows."""
    count, height, width, channels = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows evenly.")
    columns = count // rows
    grid = images.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    return Image.fromarray(np.round(grid.reshape(rows * height, columns * width, channels) * 255).astype(np.uint8))

"""What the processes of a run on several nodes must share."""

import os
import secrets

from accelerate.utils import broadcast_object_list, gather_object


def check_shared_folder(accelerator, folder: str, flag: str) -> None:
    """
    Raises ValueError on every process unless every process sees the same `folder`: the main process writes a random
    token there, and every process reads it back. What one process writes there (checkpoints, evaluation shards),
    the others read, so on several nodes `folder` must be one filesystem that all of them see.
    """
    token = [secrets.token_hex(16) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    path = os.path.join(folder, f".shared-folder-check-{token[0]}")
    if accelerator.is_main_process:
        with open(path, "w") as file:
            file.write(token[0])
    accelerator.wait_for_everyone()
    try:
        with open(path) as file:
            seen = file.read() == token[0]
    except FileNotFoundError:
        seen = False
    blind = [index for index, seen_here in enumerate(gather_object([seen])) if not seen_here]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.remove(path)
    if blind:
        raise ValueError(f"{flag} {folder} is not one folder that every process sees: processes {blind} of "
                         f"{accelerator.num_processes} do not find the main process's file there; on several nodes "
                         "it must be a shared filesystem")

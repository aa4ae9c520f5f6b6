"""The memory a training checkpoint adds on each process, measured on the training script itself.

    python -m training.benchmark_checkpoint_memory --num_processes 2
    git worktree add /tmp/earlier <commit> && python -m training.benchmark_checkpoint_memory --checkout /tmp/earlier

Runs the training script of --checkout (default: this checkout) on --num_processes CPU processes (torchrun, gloo, DDP)
with a JiT-B/16-width model of --num_layers blocks, two EMAs, a tiny random DINOv2 and random 64 px images, for
--steps steps with a checkpoint after each. Every process samples its resident memory each millisecond during each
`Accelerator.save_state`; the figure is the peak minus the memory at its start. Divided by the fp32 bytes of the
backbone, it is the number of model copies a checkpoint adds, which holds at any model size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.benchmark_utils import describe_machine, load_average, run_benchmark_cli
from pixelrepa_diffusers.commands import OneLineArgumentParser
from pixelrepa_diffusers.transformer_jit import JIT_PRESETS, JiTTransformer2DModel

REPO = Path(__file__).resolve().parents[1]
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", default=str(REPO), help="the checkout of this repository whose script is run")
    parser.add_argument("--model", default="JiT-B/16", choices=sorted(JIT_PRESETS), help="the width of the model")
    parser.add_argument("--num_layers", type=int, default=12, help="blocks of the backbone")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps, each followed by a checkpoint")
    parser.add_argument("--output_json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * PAGE_SIZE


def measure_saves(results_path: str, training_args: list[str]) -> int:
    """In each torchrun process: runs the checkout's training script (first on sys.path) with every
    `Accelerator.save_state` sampled, and writes [{"start", "peak"}] per save to `results_path`.<rank>."""
    import accelerate

    import pixelrepa_diffusers
    from training import train_pixelrepa

    saves, original = [], accelerate.Accelerator.save_state

    def save_state(self, *args, **kwargs):
        start = resident_bytes()
        peak, done = [start], threading.Event()

        def sample():
            while not done.wait(0.001):
                peak[0] = max(peak[0], resident_bytes())

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            return original(self, *args, **kwargs)
        finally:
            done.set()
            sampler.join()
            saves.append({"start": start, "peak": max(peak[0], resident_bytes())})

    accelerate.Accelerator.save_state = save_state
    code = train_pixelrepa.main(training_args)
    with open(f"{results_path}.{os.environ['RANK']}", "w") as file:
        json.dump({"saves": saves, "script": train_pixelrepa.__file__, "library": pixelrepa_diffusers.__file__}, file)
    return code


def model_config(model: str, num_layers: int) -> dict:
    """The preset's width at 64 px with `num_layers` blocks (in-context tokens from the last block at most) and 2
    classes."""
    preset = JIT_PRESETS[model]
    return {**preset, "sample_size": 64, "num_layers": num_layers, "num_classes": 2,
            "in_context_start": min(preset["in_context_start"], num_layers - 1)}


def write_assets(root: Path, config: dict) -> list[str]:
    """The JiT config, a tiny random DINOv2 and 2 classes x 4 random 64 px images; the training flags."""
    from transformers import Dinov2Config, Dinov2Model

    (root / "jit.json").write_text(json.dumps(config))
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=64,
                             patch_size=16)).save_pretrained(root / "dinov2")
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / "data" / str(label)).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "data" / str(label) / f"{index}.png")
    return ["--train_data_dir", str(root / "data"), "--model_config_path", str(root / "jit.json"),
            "--resolution", "64", "--encoder", str(root / "dinov2"), "--encoder_resolution", "64",
            "--encoder_patch_size", "16", "--train_batch_size", "2", "--mixed_precision", "no",
            "--dataloader_num_workers", "0", "--report_to", "none", "--validation_steps", "1000",
            "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--output_dir", str(root / "output")]


def run(args) -> dict:
    for name in ("num_layers", "num_processes", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not (Path(args.checkout) / "training" / "train_pixelrepa.py").is_file():
        raise ValueError(f"--checkout {args.checkout!r} holds no training/train_pixelrepa.py; expected a checkout of "
                         "this repository.")
    config = model_config(args.model, args.num_layers)
    with torch.device("meta"):
        parameters = sum(parameter.numel() for parameter in JiTTransformer2DModel(**config).parameters())
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        training_args = [*write_assets(root, config), "--max_train_steps", str(args.steps)]
        # The checkout's packages come first on the path; this file is loaded by its path, whatever the checkout.
        child = (f"import importlib.util, sys; sys.path.insert(0, {args.checkout!r}); "
                 f"spec = importlib.util.spec_from_file_location('checkpoint_memory', {__file__!r}); "
                 "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
                 f"sys.exit(module.measure_saves({str(root / 'saves')!r}, sys.argv[1:]))")
        (root / "child.py").write_text(child)
        # glibc serves every allocation of 64 KiB or more by its own mmap and unmaps it when freed, so that resident
        # memory follows the tensors alive instead of keeping freed heap (gradients freed by zero_grad) for reuse.
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": args.checkout,
                       "MALLOC_MMAP_THRESHOLD_": "65536"}
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(args.num_processes), str(root / "child.py"), *training_args],
            env=environment, capture_output=True, text=True,
        )
        if completed.returncode != 0:
            errors = [line for line in completed.stderr.splitlines() if "error:" in line] or ["see its log"]
            raise ValueError(f"the training run of --checkout {args.checkout!r} failed: {errors[0]}")
        ranks = [json.loads((root / f"saves.{rank}").read_text()) for rank in range(args.num_processes)]
    model_bytes = 4 * parameters
    processes = []
    for rank, measured in enumerate(ranks):
        added = max(save["peak"] - save["start"] for save in measured["saves"])
        processes.append(dict(rank=rank, saves=measured["saves"], added_bytes=added, model_copies=added / model_bytes))
    return dict(machine=describe_machine(torch.device("cpu")), load_average_after=load_average(),
                command=" ".join(sys.argv), checkout=args.checkout, script=ranks[0]["script"], library=ranks[0]["library"], model=args.model,
                num_layers=args.num_layers, parameters=parameters, model_bytes=model_bytes, processes=processes)


def report(results) -> None:
    machine = results["machine"]
    print(f"{machine['device_name']}, torch {machine['torch']}, {machine['date']}, load average "
          f"{machine['load_average']} before, {results['load_average_after']} after")
    print(f"command: {results['command']}")
    print(f"script: {results['script']}, library: {results['library']}")
    print(f"{results['model']} width, {results['num_layers']} blocks: {results['parameters'] / 1e6:.1f}M parameters, "
          f"{results['model_bytes'] / 2**20:.0f} MiB in fp32")
    print(f"{'process':>8} {'added by a checkpoint':>22} {'model copies':>13}")
    for process in results["processes"]:
        print(f"{process['rank']:>8} {process['added_bytes'] / 2**20:>18.0f} MiB {process['model_copies']:>13.2f}")


def main(argv=None) -> int:
    return run_benchmark_cli(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

"""training/train_pixelrepa.py on CPU with a tiny JiT, a tiny random DINOv2 and a tiny image folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from accelerate.utils import load as accelerate_load
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import PixelREPAPipeline
from pixelrepa_diffusers.data import load_train_dataset
from pixelrepa_diffusers.losses import JiTTrainingObjective
from pixelrepa_diffusers.training_utils import (
    ExponentialMovingAverage,
    latest_checkpoint,
    list_checkpoints,
    remove_incomplete_checkpoints,
)
from tests.hub_server import LocalHub, repo_key
from tests.test_data import LAYOUTS as DATA_LAYOUTS
from tests.test_data import hub_layout
from tests.two_nodes import launch_two_nodes
from training import prepare_dataset, train_pixelrepa

REPO = Path(__file__).resolve().parent.parent

SCRIPT = REPO / "training" / "train_pixelrepa.py"
TINY_JIT = {**TINY_CONFIG, "num_classes": 3, "dropout": 0.1}
WEIGHT_FOLDERS = ("transformer", "adapter", "ema_1", "ema_2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random DINOv2 saved with save_pretrained, a JiT config, and 3 classes x 8 images plus a corrupt file."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    encoder = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32,
                           patch_size=8)
    Dinov2Model(encoder).save_pretrained(root / "dinov2")
    (root / "jit.json").write_text(json.dumps(TINY_JIT))
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / "data" / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (root / "data" / "class_1" / "corrupt.png").write_bytes(b"\x89PNG not really")
    return root


def flags(assets, output_dir, *extra):
    """The tiny run's command line; the tiny JiT config unless `extra` starts from pretrained weights."""
    model = [] if "--init_from_pretrained" in extra else ["--model_config_path", str(assets / "jit.json")]
    return [
        "--train_data_dir", str(assets / "data"), *model, "--resolution", "32", "--encoder", str(assets / "dinov2"),
        "--encoder_resolution", "32",
        "--encoder_patch_size", "8", "--train_batch_size", "8", "--learning_rate", "1e-3", "--lr_warmup_steps", "2",
        "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "none",
        "--validation_steps", "1000", "--ema_decays", "0.9", "0.5", "--output_dir", str(output_dir), *extra,
    ]


def train(assets, output_dir, *extra):
    """Runs the script in this process, as a fresh accelerate session; returns its exit code."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_pixelrepa.main(flags(assets, output_dir, *extra))


def folder_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def pixelrepa_run(assets, tmp_path_factory):
    """7 PixelREPA steps (3 per epoch) with tensorboard, validation every 3 steps and checkpoints every 2."""
    output_dir = tmp_path_factory.mktemp("run") / "out"
    code = train(assets, output_dir, "--max_train_steps", "7", "--checkpointing_steps", "2", "--logging_steps", "1",
                 "--validation_steps", "3", "--validation_num_inference_steps", "2", "--report_to", "tensorboard",
                 "--checkpoints_total_limit", "2", "--sample_grid", "1", "2")
    assert code == 0
    return output_dir


def test_run_saves_loadable_pipeline_card_and_adapter(pixelrepa_run):
    pipeline = PixelREPAPipeline.from_pretrained(pixelrepa_run)
    assert pipeline.get_label_ids(["class_0", "class_2"]) == [0, 2]
    images = pipeline([0, 2], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # The pipeline holds the first EMA of the last checkpoint, not the raw weights.
    last = pixelrepa_run / "checkpoint-7"
    assert_same_weights(folder_weights(pixelrepa_run / "transformer"), folder_weights(last / "ema_1"))
    assert_same_weights(folder_weights(pixelrepa_run / "adapter"), folder_weights(last / "adapter"))
    card = (pixelrepa_run / "README.md").read_text()
    assert "PixelREPA" in card and "0.9 (these weights), 0.5" in card and "7 (global batch 8)" in card
    assert "data, ADM center crop to 32 px" in card
    # --sample_grid 1 2: the final pipeline's own samples of classes 1 and 2, seeds 0 and 1, shown in the card.
    assert "![Samples of classes 1, 2](samples.png)" in card
    grid = np.asarray(PIL.Image.open(pixelrepa_run / "samples.png").convert("RGB"))
    images = pipeline([1, 1, 2, 2], generator=[torch.Generator().manual_seed(seed) for seed in (0, 1, 0, 1)]).images
    assert grid.shape == (64, 64, 3) and np.array_equal(grid[32:, 32:], np.asarray(images[3]))  # class 2, seed 1
    assert ModelCard.load(pixelrepa_run / "README.md").data.datasets is None  # a local folder is no Hub dataset id


def test_checkpoints_hold_diffusers_folders_without_the_encoder_and_are_pruned(pixelrepa_run):
    assert [step for step, _ in list_checkpoints(pixelrepa_run)] == [6, 7]
    checkpoint = pixelrepa_run / "checkpoint-7"
    assert sorted(os.listdir(checkpoint)) == sorted([*WEIGHT_FOLDERS, "optimizer.bin", "random_states_0.pkl",
                                                     "scheduler.bin", "training_state.json"])
    for folder in WEIGHT_FOLDERS:
        assert sorted(os.listdir(checkpoint / folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    saved_weights = sorted(str(path.relative_to(checkpoint)) for path in checkpoint.rglob("*.safetensors"))
    assert saved_weights == sorted(f"{folder}/diffusion_pytorch_model.safetensors" for folder in WEIGHT_FOLDERS)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["global_step"] == 7


def test_corrupt_image_is_skipped_and_counted(pixelrepa_run):
    # 25 files, 24 readable; 7 steps of 8 cover each file at least twice, the corrupt one included.
    state = json.loads((pixelrepa_run / "checkpoint-7" / "training_state.json").read_text())
    assert state["skipped_images"] >= 1


def test_a_batch_of_only_corrupt_images_does_not_stop_training(assets, tmp_path):
    # Batches of one image over one epoch: one batch holds only the corrupt file.
    assert train(assets, tmp_path, "--train_batch_size", "1", "--max_train_steps", "25",
                 "--checkpointing_steps", "25", "--logging_steps", "5") == 0
    state = json.loads((tmp_path / "checkpoint-25" / "training_state.json").read_text())
    assert state["skipped_images"] == 1
    for folder in WEIGHT_FOLDERS:
        assert all(torch.isfinite(value).all() for value in folder_weights(tmp_path / "checkpoint-25" / folder).values())


def test_trackers_get_loss_terms_lr_throughput_and_validation_grid(pixelrepa_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(pixelrepa_run / "logs" / "train_pixelrepa"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "loss_jit", "loss_alignment", "lr", "images_per_second", "skipped_images"} <= scalars
    assert [event.step for event in events.Scalars("loss_jit")] == list(range(1, 8))
    assert events.Tags()["images"] == ["validation"]
    grids = sorted(os.listdir(pixelrepa_run / "validation"))
    assert grids == ["step-0000003.png", "step-0000006.png"]
    with Image.open(pixelrepa_run / "validation" / grids[0]) as grid:
        assert grid.size == (4 * 32, 3 * 32)  # 4 images per class, one row for each of the 3 classes


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_resume_is_bit_exact(assets, tmp_path, accumulation):
    # 3 batches per epoch; the stop falls inside epoch 1, so resuming skips batches and reshuffles by epoch.
    common = ("--gradient_accumulation_steps", accumulation, "--checkpointing_steps", "100",
              "--checkpoints_total_limit", "2")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train(assets, straight, *common, "--max_train_steps", "6") == 0
    assert train(assets, halves, *common, "--max_train_steps", "3") == 0
    assert train(assets, halves, *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest") == 0
    for folder in WEIGHT_FOLDERS:
        assert_same_weights(folder_weights(straight / "checkpoint-6" / folder),
                            folder_weights(halves / "checkpoint-6" / folder))
    moved = folder_weights(halves / "checkpoint-6" / "ema_2")["blocks.0.attn.to_qkv.weight"]
    assert not torch.equal(moved, folder_weights(halves / "checkpoint-3" / "ema_2")["blocks.0.attn.to_qkv.weight"])


def logged_losses(output_dir):
    """{loss term: [values per step]} from the run's tensorboard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "logs" / "train_pixelrepa"))
    events.Reload()
    return {name: [event.value for event in events.Scalars(name)] for name in ("loss", "loss_jit", "loss_alignment")}


@pytest.mark.usefixtures("compile_on_the_machines_kernels")
def test_compiled_run_and_its_resume_equal_the_eager_run(assets, tmp_path):
    # No dropout: compiled kernels draw their own dropout masks, so only dropout-free steps can be compared.
    config = tmp_path / "jit.json"
    config.write_text(json.dumps({**TINY_JIT, "dropout": 0.0}))
    common = ("--model_config_path", str(config), "--checkpointing_steps", "100", "--checkpoints_total_limit", "2",
              "--logging_steps", "1", "--report_to", "tensorboard")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train(assets, eager, *common, "--max_train_steps", "4", "--no-compile") == 0
    torch._dynamo.utils.counters.clear()
    assert train(assets, compiled, *common, "--max_train_steps", "2", "--compile") == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert train(assets, compiled, *common, "--max_train_steps", "4", "--compile",
                 "--resume_from_checkpoint", "latest") == 0
    # fp32: inductor fuses and reorders the block arithmetic, measured 1.2e-7 apart after 4 AdamW steps at lr 1e-3
    bound = 1e-6
    for folder in WEIGHT_FOLDERS:
        first, second = folder_weights(eager / "checkpoint-4" / folder), folder_weights(compiled / "checkpoint-4" / folder)
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=bound, msg=f"{folder}/{key}")
    eager_losses, compiled_losses = logged_losses(eager), logged_losses(compiled)
    for name, values in eager_losses.items():
        assert len(values) == 4 and len(compiled_losses[name]) == 4
        assert compiled_losses[name] == pytest.approx(values, rel=1e-5), name


def test_interrupted_save_never_becomes_latest(assets, tmp_path, monkeypatch):
    import accelerate.accelerator

    class Interrupted(Exception):
        pass

    real_save = accelerate.accelerator.save_accelerator_state
    calls = []

    def save_then_die(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise Interrupted  # after the hook wrote the model folders, before the optimizer and RNG files
        return real_save(*args, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, "save_accelerator_state", save_then_die)
    with pytest.raises(Interrupted):
        train(assets, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    monkeypatch.undo()
    assert (tmp_path / ".tmp-checkpoint-4" / "transformer").is_dir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert train(assets, tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2",
                 "--resume_from_checkpoint", "latest") == 0
    assert not (tmp_path / ".tmp-checkpoint-4").exists()
    assert json.loads((tmp_path / "checkpoint-4" / "training_state.json").read_text())["global_step"] == 4


def test_checkpoints_are_on_the_disk_before_they_are_renamed(assets, tmp_path, monkeypatch):
    real_fsync = os.fsync
    synced = []  # (path, whether checkpoint-2 existed then)

    def recording_fsync(descriptor):
        synced.append((os.readlink(f"/proc/self/fd/{descriptor}"), (tmp_path / "checkpoint-2").exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert train(assets, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2") == 0
    temporary = str(tmp_path / ".tmp-checkpoint-2")
    written = {str(path).replace("checkpoint-2", ".tmp-checkpoint-2")
               for path in [tmp_path / "checkpoint-2", *(tmp_path / "checkpoint-2").rglob("*")]}
    before_rename = [path for path, renamed in synced if path.startswith(temporary)]
    assert set(before_rename) == written and not any(renamed for path, renamed in synced if path in written)
    assert before_rename[-1] == temporary  # the files, then the folders, the checkpoint's own folder last
    assert (str(tmp_path), True) in synced  # the rename itself, after it happened


def prepared_layout(root):
    """The output of prepare_dataset.py for the Hub layout with ClassLabel labels."""
    source = hub_layout(root.parent / f"{root.name}_source", class_label=True)
    assert prepare_dataset.main(["--dataset_name", str(source), "--resolution", "32", "--output_dir", str(root),
                                 "--cache_dir", str(root.parent / "cache")]) == 0
    return root


# Each layout's 6 images in 3 classes: (build, data flags, the trained pipeline's labels). The image folder is in
# every other test.
LAYOUTS = {**DATA_LAYOUTS, "prepare_dataset.py": (prepared_layout, {}, ["ant", "bee", "cat"])}


def layout_flags(assets, output_dir, source, columns, *extra):
    """The tiny run's flags on `source` (a --dataset_name) instead of the image folder, with batches of 2."""
    argv = flags(assets, output_dir, "--train_batch_size", "2", *extra)
    argv[argv.index("--train_data_dir"):argv.index("--train_data_dir") + 2] = ["--dataset_name", str(source)]
    return argv + [argument for column, name in columns.items() for argument in (f"--{column}", name)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_step_on_every_data_layout(assets, tmp_path, layout):
    build, columns, class_names = LAYOUTS[layout]
    source = build(tmp_path / "source")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = layout_flags(assets, tmp_path / "out", source, columns, "--max_train_steps", "1", "--cache_dir",
                        str(tmp_path / "cache"))
    assert train_pixelrepa.main(argv) == 0
    config = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert config["id2label"] == {str(index): name for index, name in enumerate(class_names)}


def test_a_hub_dataset_id_trains_and_prepares(assets, tmp_path):
    """The Hub's imagenet-1k layout as a dataset repository on the local Hub, by its id, through both scripts."""
    repo = hub_layout(tmp_path / "repo", class_label=True)
    files = {str(path.relative_to(repo)): path.read_bytes() for path in repo.rglob("*") if path.is_file()}
    with LocalHub() as hub:
        hub.commit(repo_key("datasets", "user/imagenet-tiny"), files)
        environment = {**subprocess_env(), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home")}
        train_command = [sys.executable, str(SCRIPT), *layout_flags(assets, tmp_path / "out", "user/imagenet-tiny", {},
                                                                   "--max_train_steps", "1")]
        prepare_command = [sys.executable, str(REPO / "training" / "prepare_dataset.py"), "--dataset_name",
                           "user/imagenet-tiny", "--resolution", "32", "--output_dir", str(tmp_path / "prepared")]
        for command in (train_command, prepare_command):
            result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
    assert ("GET", "/api/datasets/user/imagenet-tiny") in hub.requests
    config = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert config["id2label"] == {"0": "ant", "1": "bee", "2": "cat"}
    prepared = load_train_dataset(dataset_name=str(tmp_path / "prepared"), resolution=32, random_flip=False)
    local = load_train_dataset(dataset_name=str(repo), resolution=32, random_flip=False,
                               cache_dir=str(tmp_path / "cache"))
    assert len(prepared) == 6 and all(torch.equal(prepared[i]["pixel_values"], local[i]["pixel_values"])
                                      for i in range(6))


class WritesAFile:
    """A pickle that would create `path` if it were ever unpickled with code execution."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_never_runs_pickled_code(assets, tmp_path, capsys, name):
    assert train(assets, tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2") == 0
    marker = tmp_path / "code-was-run"
    torch.save({"state": WritesAFile(marker)}, tmp_path / "checkpoint-2" / name)
    code = train(assets, tmp_path, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert code == 1 and not marker.exists()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"train_pixelrepa.py: error: refusing to load {tmp_path / 'checkpoint-2'}: it holds pickled")


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch, capsys):
    real_forward = JiTTrainingObjective.forward
    calls = []

    def forward(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(JiTTrainingObjective, "forward", forward)
    code = train(assets, tmp_path, "--max_train_steps", "8", "--checkpointing_steps", "2", "--logging_steps", "100")
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == (f"train_pixelrepa.py: error: the loss is not finite at step 5; stopped, the last good "
                         f"checkpoint is {tmp_path / 'checkpoint-4'}")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    for folder in WEIGHT_FOLDERS:
        assert all(torch.isfinite(value).all() for value in folder_weights(tmp_path / "checkpoint-4" / folder).values())


@pytest.mark.parametrize("alignment, folder", [("repa", "projector"), ("none", None)])
def test_repa_and_plain_jit_runs(assets, tmp_path, alignment, folder):
    assert train(assets, tmp_path, "--alignment", alignment, "--max_train_steps", "2",
                 "--checkpointing_steps", "2") == 0
    names = set(os.listdir(tmp_path / "checkpoint-2"))
    assert ("adapter" in names, "projector" in names) == (False, folder == "projector")
    card = ModelCard.load(tmp_path / "README.md")
    assert ("repa" in card.data.tags, "pixelrepa" in card.data.tags) == (alignment == "repa", False)
    if alignment == "repa":
        assert "weight 0.5" in card.text  # REPA's own default weight
    PixelREPAPipeline.from_pretrained(tmp_path)


def test_init_from_pretrained_starts_from_its_weights_and_guidance(assets, pixelrepa_run, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(pixelrepa_run, source, ignore=shutil.ignore_patterns("checkpoint-*", "logs", "validation"))
    model_index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**model_index, "guidance_scale": 2.5}))
    # With a zero learning rate, one step leaves the weights (and so the EMAs) where they started.
    assert train(assets, tmp_path / "out", "--init_from_pretrained", str(source), "--max_train_steps", "1",
                 "--learning_rate", "0", "--checkpointing_steps", "1") == 0
    for folder in ("transformer", "adapter"):
        assert_same_weights(folder_weights(tmp_path / "out" / "checkpoint-1" / folder), folder_weights(source / folder))
    assert PixelREPAPipeline.from_pretrained(tmp_path / "out").config.guidance_scale == 2.5  # the source's


def base_learning_rate_flags(assets, output_dir, *extra):
    """The tiny run's flags with the official lr rule (--base_learning_rate) instead of an absolute lr."""
    command = flags(assets, output_dir, *extra)
    index = command.index("--learning_rate")
    return command[:index] + ["--base_learning_rate", "0.032"] + command[index + 2:]


def optimizer_learning_rate(checkpoint):
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)["param_groups"][0]["lr"]


def test_learning_rate_follows_the_global_batch_in_one_process(assets, tmp_path, caplog):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with caplog.at_level("INFO"):
        assert train_pixelrepa.main(base_learning_rate_flags(assets, tmp_path, "--train_batch_size", "4",
                                                             "--max_train_steps", "3", "--checkpointing_steps", "3")) == 0
    assert "lr 0.0005 (--base_learning_rate 0.032 x global batch 4 / 256)" in caplog.text
    assert optimizer_learning_rate(tmp_path / "checkpoint-3") == pytest.approx(5e-4, rel=1e-12)  # past 2 warm-up steps


def test_the_plan_derives_the_defaults_and_leaves_the_flags_alone(assets, tmp_path):
    args = train_pixelrepa.parse_args(base_learning_rate_flags(assets, tmp_path, "--gradient_accumulation_steps", "2",
                                                               "--num_train_epochs", "3"))
    flags_before = dict(vars(args))
    plan = train_pixelrepa.plan_training(args, num_images=24, num_classes=3, num_processes=2)
    assert vars(args) == flags_before
    assert plan == train_pixelrepa.TrainingPlan(
        global_batch_size=32, steps_per_epoch=1, max_train_steps=3, num_train_epochs=3, lr_warmup_steps=2,
        learning_rate=0.032 * 32 / 256, learning_rate_origin="--base_learning_rate 0.032 x global batch 32 / 256",
        guidance_scale=1.0, alignment_weight=0.1, validation_classes=[0, 1, 2],
    )
    tracked = train_pixelrepa.tracker_config(args, plan)
    assert tracked["global_batch_size"] == 32 and tracked["max_train_steps"] == 3 and tracked["alignment_weight"] == 0.1
    assert tracked["validation_classes"] == "[0, 1, 2]"
    with pytest.raises(ValueError, match="--train_batch_size 8 x 4 processes is more than the 24 training images"):
        train_pixelrepa.plan_training(args, num_images=24, num_classes=3, num_processes=4)


@pytest.mark.parametrize("alignment, model, guidance_scale", [
    ("pixelrepa", "JiT-L/16", 2.8), ("repa", "JiT-L/16", 2.4), ("none", "JiT-H/32", 2.3), ("pixelrepa", "JiT-B/32", 1.0),
])
def test_default_guidance_scale_is_the_papers_for_the_method_and_backbone(tmp_path, alignment, model, guidance_scale):
    args = train_pixelrepa.parse_args(["--train_data_dir", str(tmp_path), "--model", model, "--alignment", alignment])
    assert train_pixelrepa.default_guidance_scale(args) == guidance_scale


def test_ddp_two_cpu_processes_save_a_loadable_pipeline(assets, tmp_path):
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), *base_learning_rate_flags(assets, output_dir, "--train_batch_size", "4",
                                                      "--max_train_steps", "3", "--checkpointing_steps", "3")]
    result = subprocess.run(command, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps of 8 images" in result.stderr  # 2 processes x 4 images
    # The official rule: twice the global batch of the one-process run, twice its learning rate.
    assert "lr 0.001 (--base_learning_rate 0.032 x global batch 8 / 256)" in result.stderr
    assert optimizer_learning_rate(output_dir / "checkpoint-3") == pytest.approx(1e-3, rel=1e-12)
    checkpoint = output_dir / "checkpoint-3"
    ranks = [accelerate_load(checkpoint / f"random_states_{rank}.pkl") for rank in (0, 1)]
    assert not torch.equal(ranks[0]["torch_manual_seed"], ranks[1]["torch_manual_seed"]), "ranks must draw other noise"
    pipeline = PixelREPAPipeline.from_pretrained(output_dir)
    assert pipeline([1], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


FSDP_CONFIG = REPO / "training" / "configs" / "accelerate_fsdp.yaml"


def launch_two_processes(assets, output_dir, *extra, fsdp=True):
    """Runs the script in 2 CPU processes: FSDP2 from the shipped accelerate config, or DDP through torchrun."""
    script = [str(SCRIPT), *flags(assets, output_dir, "--train_batch_size", "4", *extra)]
    if fsdp:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                   "--num_processes", "2", "--main_process_port", "0", str(REPO / "tests" / "fsdp_on_cpu.py"), *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    return subprocess.run(command, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_two_nodes_with_node_local_output_dirs_are_refused(assets, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    results = launch_two_nodes([SCRIPT, *flags(assets, output_dir, "--train_batch_size", "4", "--max_train_steps", "2")],
                               private_folder=output_dir)
    for code, stderr in results:
        assert code != 0
        assert (f"train_pixelrepa.py: error: --output_dir {tmp_path / 'out'} is not one folder that every process "
                "sees: processes [1] of 2 do not find the main process's file there; on several nodes it must be a "
                "shared filesystem") in stderr, stderr[-2000:]
    assert list((tmp_path / "out").iterdir()) == []  # the private folders were the only ones written


@pytest.mark.slow
def test_two_nodes_sharing_the_output_dir_train_and_resume_exactly(assets, tmp_path):
    common = ("--max_train_steps", "4", "--checkpointing_steps", "2")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for output_dir, extra in ((straight, common), (halves, ("--max_train_steps", "2", "--checkpointing_steps", "2")),
                              (halves, (*common, "--resume_from_checkpoint", "latest"))):
        for code, stderr in launch_two_nodes([SCRIPT, *flags(assets, output_dir, "--train_batch_size", "4", *extra)]):
            assert code == 0, stderr[-3000:]
    for folder in WEIGHT_FOLDERS:
        assert_same_weights(folder_weights(straight / "checkpoint-4" / folder),
                            folder_weights(halves / "checkpoint-4" / folder))
    assert not list(straight.glob(".shared-folder-check-*"))


@pytest.mark.slow
def test_fsdp2_shards_trains_like_ddp_and_resumes_exactly(assets, tmp_path):
    common = ("--mixed_precision", "bf16", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--validation_steps", "2",
              "--validation_num_inference_steps", "2")
    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    for output_dir, use_fsdp in ((ddp, False), (fsdp, True)):
        result = launch_two_processes(assets, output_dir, *common, "--max_train_steps", "4", fsdp=use_fsdp)
        assert result.returncode == 0, result.stderr[-3000:]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(fsdp / "checkpoint-2" / "pytorch_model_fsdp_0"))
    assert sorted(os.listdir(fsdp / "validation")) == ["step-0000002.png", "step-0000004.png"]
    # Sharded, the same recipe trains the same weights (bf16 autocast with fp32 weights and reductions, as DDP),
    # also accumulating gradients over 2 batches; 3 steps per epoch, so the resume below skips batches.
    for folder in WEIGHT_FOLDERS:
        ours, reference = folder_weights(fsdp / "checkpoint-4" / folder), folder_weights(ddp / "checkpoint-4" / folder)
        assert ours.keys() == reference.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{folder} {key}")
    weight = "blocks.0.attn.to_qkv.weight"
    assert not torch.equal(folder_weights(fsdp / "checkpoint-2" / "transformer")[weight],
                           folder_weights(fsdp / "checkpoint-4" / "transformer")[weight])
    # Stopped at step 2 and resumed from its checkpoint, FSDP ends bit for bit where the straight run does.
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    result = launch_two_processes(assets, resumed, *common, "--max_train_steps", "4", "--resume_from_checkpoint",
                                  "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {resumed / 'checkpoint-2'} at step 2" in result.stderr
    for folder in WEIGHT_FOLDERS:
        assert_same_weights(folder_weights(fsdp / "checkpoint-4" / folder),
                            folder_weights(resumed / "checkpoint-4" / folder))
    pipeline = PixelREPAPipeline.from_pretrained(resumed)
    assert_same_weights(pipeline.transformer.state_dict(), folder_weights(resumed / "checkpoint-4" / "ema_1"))


@pytest.mark.parametrize("distributed_type, fsdp_version, message", [
    (DistributedType.FSDP, 1, "FSDP1 is not supported; set fsdp_version: 2"),
    (DistributedType.DEEPSPEED, None, "DeepSpeed is not supported"),
])
def test_fsdp1_and_deepspeed_are_refused(distributed_type, fsdp_version, message):
    with pytest.raises(ValueError, match=message):
        train_pixelrepa.check_distributed_type(distributed_type, fsdp_version)
    train_pixelrepa.check_distributed_type(DistributedType.FSDP, 2)
    train_pixelrepa.check_distributed_type(DistributedType.MULTI_GPU, None)


def test_sigkill_during_training_then_resume(assets, tmp_path):
    output_dir = tmp_path / "killed"
    command = [sys.executable, str(SCRIPT), *flags(assets, output_dir, "--max_train_steps", "10000",
                                                   "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(step >= 4 for step, _ in list_checkpoints(output_dir)):
            assert process.poll() is None and time.monotonic() < deadline, "training did not reach step 4"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    step = list_checkpoints(output_dir)[-1][0]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *flags(assets, output_dir, "--max_train_steps", str(step + 2),
                                             "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")],
        env=subprocess_env(), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {output_dir / f'checkpoint-{step}'} at step {step}" in result.stderr
    assert not [name for name in os.listdir(output_dir) if name.startswith(".tmp-")]
    PixelREPAPipeline.from_pretrained(output_dir)
    # The killed and resumed run ends exactly where an uninterrupted one does.
    straight = tmp_path / "straight"
    assert train(assets, straight, "--max_train_steps", str(step + 2), "--checkpointing_steps", "100") == 0
    for folder in WEIGHT_FOLDERS:
        assert_same_weights(folder_weights(straight / f"checkpoint-{step + 2}" / folder),
                            folder_weights(output_dir / f"checkpoint-{step + 2}" / folder))


def test_help_lists_every_flag_with_its_default(capsys):
    parser = train_pixelrepa.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        train_pixelrepa.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    actions = [action for action in parser._actions if action.dest != "help"]
    assert len(actions) > 50
    for action in actions:
        assert action.option_strings[0] in text
    assert text.count("(default:") == len(actions)
    for expected in ("(default: JiT-B/16)", "(default: pixelrepa)", "(default: facebook/dinov2-base)",
                     "(default: [0.9999, 0.9996])", "(default: 0.2)", "(default: bf16)"):
        assert expected in " ".join(text.split())


@pytest.mark.parametrize("argv, code, message", [
    (["--alignment", "dino"], 2, "argument --alignment: invalid choice: 'dino'"),
    (["--train_batch_size", "many"], 2, "argument --train_batch_size: invalid int value: 'many'"),
    (["--dataset_name", "x"], 1, "pass exactly one of --train_data_dir and --dataset_name"),
    (["--ema_decays", "1.5"], 1, "--ema_decays values must be in [0, 1), got 1.5"),
    (["--alignment", "none", "--alignment_weight", "0.3"], 1, "--alignment_weight needs --alignment pixelrepa or repa"),
    (["--encoder", "/nonexistent/dinov2"], 1, "/nonexistent/dinov2"),
])
def test_bad_flags_give_one_clear_line(assets, tmp_path, capsys, argv, code, message):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        result = train_pixelrepa.main(flags(assets, tmp_path, *argv))
    except SystemExit as exit_info:
        result = exit_info.code
    assert result == code
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("train_pixelrepa.py: error:") and message in error[0]


def test_torchrun_without_cpu_backend_is_refused(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train(assets, tmp_path, "--max_train_steps", "1") == 1
    assert "set ACCELERATE_USE_CPU=1" in capsys.readouterr().err


def test_ema_follows_the_official_update_from_the_initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.9)
    expected = [parameter.detach().clone() for parameter in model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.update(model)
        expected = [0.9 * old + 0.1 * parameter.detach() for old, parameter in zip(expected, model.parameters())]
    for average, value in zip(ema.averages.values(), expected):
        torch.testing.assert_close(average, value, rtol=1e-6, atol=1e-7)
        assert not average.requires_grad
    assert ema.gathered_state_dict(keep=False) is None  # a process that does not write holds no copy
    state = ema.gathered_state_dict(keep=True)
    assert state.keys() == model.state_dict().keys()
    assert state["weight"].data_ptr() == ema.averages["weight"].data_ptr()  # unsharded: the averages, not a copy
    restored = ExponentialMovingAverage(model, decay=0.9)
    restored.load_full_state_dict(state)
    for name, average in restored.averages.items():
        assert torch.equal(average, state[name])
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        restored.load_full_state_dict({"weight": state["weight"]})
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialMovingAverage(model, decay=1.0)


def test_checkpoint_listing_ignores_incomplete_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".tmp-checkpoint-12", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
    assert list_checkpoints(tmp_path) == [(2, str(tmp_path / "checkpoint-2")), (10, str(tmp_path / "checkpoint-10"))]
    assert remove_incomplete_checkpoints(tmp_path) == [str(tmp_path / ".tmp-checkpoint-12")]
    assert not (tmp_path / ".tmp-checkpoint-12").exists()

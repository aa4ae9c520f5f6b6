"""Continuing an official run: checkpoint-last.pth -> training checkpoint -> the official step, exactly."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model

from pipelines.official_code import random_official_state_dict
from tests.official_fixtures import load_fixture, relative_error
from tests.official_weights import official_training_checkpoint
from pixelrepa_diffusers import JiTTransformer2DModel, MaskedTransformerAdapter
from pixelrepa_diffusers.conversion import (
    convert_official_training_checkpoint,
    official_trainable_names,
    rename_official_keys,
    training_parameter_name,
)
from pixelrepa_diffusers.losses import JiTTrainingObjective, draw_training_randomness
from pixelrepa_diffusers.training_utils import (
    OPTIMIZER_MOMENTS_NAME,
    TRAINING_STATE_NAME,
    ExponentialMovingAverage,
    TrainingCheckpointer,
)
from training import train_pixelrepa

REPO = Path(__file__).resolve().parent.parent


def official_step_fixture():
    """(tensors, metadata, official args) of the recorded official training step."""
    tensors, metadata = load_fixture("train_step_tiny.safetensors")
    return tensors, metadata, argparse.Namespace(**metadata["args"])


def official_checkpoint(tensors, metadata, args, jit_format=False):
    """The official checkpoint-last.pth the fixture's step resumed from (regenerated, as the fixture script checks)."""
    net_seed, adapter_seed = metadata["weights_seeds"]
    net_state = random_official_state_dict(metadata["net_manifest"], net_seed)
    adapter_state = None if jit_format else random_official_state_dict(metadata["adapter_manifest"], adapter_seed)
    other = {} if jit_format else {key[len("checkpoint.other."):]: value for key, value in tensors.items()
                                   if key.startswith("checkpoint.other.")}
    return official_training_checkpoint(net_state, adapter_state, other, args, int(metadata["epoch"]),
                                        int(metadata["checkpoint_seed"]))


def assert_same(actual, expected):
    """Equal up to fp32 rounding: 1e-6 absolute, and 1e-5 relative to the tensor's norm (moments are ~1e-3)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert relative_error(actual, expected) <= 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tensors, metadata, args = official_step_fixture()
    root = tmp_path_factory.mktemp("official")
    torch.save(official_checkpoint(tensors, metadata, args), root / "checkpoint-last.pth")
    convert_official_training_checkpoint(str(root / "checkpoint-last.pth"), str(root / "converted"),
                                         in_context_start=1)
    return root / "converted"


def test_converted_checkpoint_holds_weights_emas_adapter_and_moments(converted):
    tensors, metadata, args = official_step_fixture()
    checkpoint = official_checkpoint(tensors, metadata, args)
    state = json.loads((converted / TRAINING_STATE_NAME).read_text())
    assert state["official_epochs"] == int(metadata["epoch"]) + 1
    assert state["alignment"] == "pixelrepa" and state["ema_decays"] == [0.9, 0.5]
    transformer = JiTTransformer2DModel.from_pretrained(converted / "transformer")
    ema_2 = JiTTransformer2DModel.from_pretrained(converted / "ema_2")
    assert torch.equal(transformer.blocks[1].ff.proj_in.weight, checkpoint["model"]["net.blocks.1.mlp.w12.weight"])
    assert torch.equal(ema_2.final_layer.linear.bias, checkpoint["model_ema2"]["final_layer.linear.bias"])
    moments = load_file(converted / OPTIMIZER_MOMENTS_NAME)
    adapter_count = sum(1 for _ in MaskedTransformerAdapter.from_pretrained(converted / "adapter").parameters())
    assert len(moments) == 3 * (sum(1 for _ in transformer.parameters()) + adapter_count)
    assert moments["aligner.projection.linear_2.weight.exp_avg"].abs().min() > 0


def test_one_step_from_an_official_checkpoint_equals_the_official_step(converted):
    """Same batch and draws: the weights, AdamW moments and both EMAs after one step equal the official ones."""
    tensors, metadata, args = official_step_fixture()
    config = JiTTransformer2DModel.load_config(converted / "transformer")
    torch.manual_seed(123)  # the weights built here are overwritten by the checkpoint's
    transformer = JiTTransformer2DModel.from_config(config)
    adapter = MaskedTransformerAdapter.from_config(MaskedTransformerAdapter.load_config(converted / "adapter"))
    objective = JiTTrainingObjective(
        transformer, alignment="pixelrepa", aligner=adapter, alignment_weight=0.1, mask_ratio=args.patch_mask_ratio,
        label_dropout=args.label_drop_prob, p_mean=args.P_mean, p_std=args.P_std, t_eps=args.t_eps,
        noise_scale=args.noise_scale,
    )
    emas = [ExponentialMovingAverage(transformer, decay) for decay in (args.ema_decay1, args.ema_decay2)]
    optimizer = torch.optim.AdamW(train_pixelrepa.optimizer_parameter_groups(objective, 0.0), lr=args.lr,
                                  betas=(0.9, 0.95), eps=1e-8, fused=True)
    steps_per_epoch = int(metadata["steps_per_epoch"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    checkpointer = TrainingCheckpointer(Accelerator(), str(converted), "pixelrepa", [args.ema_decay1, args.ema_decay2])
    start_step = checkpointer.schedule_start(steps_per_epoch)
    assert start_step == (int(metadata["epoch"]) + 1) * steps_per_epoch
    lr_scheduler = train_pixelrepa.build_lr_scheduler("constant_with_warmup", optimizer,
                                                      args.warmup_epochs * steps_per_epoch,
                                                      args.epochs * steps_per_epoch, 1, start_step)
    assert checkpointer.start(objective, emas, optimizer, steps_per_epoch) == start_step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(float(metadata["lr"]), rel=1e-12)  # no second warm-up

    steps_before = official_checkpoint(tensors, metadata, args)["optimizer"]["state"][0]["step"]
    x, y = tensors["input.x"], tensors["input.y"]
    objective.train()
    torch.manual_seed(int(metadata["torch_seed"]))
    draws = draw_training_randomness(x, transformer.num_patches, with_mask=True)
    loss = objective(x, y, targets=tensors["input.z_dino"], draws=draws)["loss"]
    loss.backward()
    optimizer.step()
    lr_scheduler.step()
    for ema in emas:
        ema.update(transformer)

    torch.testing.assert_close(loss.detach(), tensors["output.loss"], rtol=1e-6, atol=1e-6)
    parameters = dict(objective.named_parameters())
    official_names = [key[len("after.model."):] for key in tensors if key.startswith("after.model.")]
    assert len(official_names) == len(parameters)
    for official_name in official_names:
        parameter = parameters[training_parameter_name(official_name)]
        state = optimizer.state[parameter]
        assert_same(parameter.detach(), tensors[f"after.model.{official_name}"])
        assert_same(state["exp_avg"], tensors[f"after.exp_avg.{official_name}"])
        assert_same(state["exp_avg_sq"], tensors[f"after.exp_avg_sq.{official_name}"])
        assert float(state["step"]) == float(steps_before) + 1
    official_backbone_names = rename_official_keys({key: key for key, _ in metadata["net_manifest"]})
    for number, ema in enumerate(emas, start=1):
        for name, average in ema.averages.items():
            official = tensors[f"after.ema{number}.{official_backbone_names[name]}"]
            assert_same(average, official)



@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    """10 classes x 1 image at 32 px and a tiny random DINOv2 of the width the official tiny adapter aligns to."""
    root = tmp_path_factory.mktemp("run_assets")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32,
                             patch_size=8)).save_pretrained(root / "dinov2")
    rng = np.random.default_rng(0)
    for label in range(10):
        (root / "data" / f"class_{label}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "data" / f"class_{label}" / "0.png")
    return root


def continue_run(run_assets, converted, output_dir, *extra):
    """train_pixelrepa.py continuing the converted official run (2 steps an epoch, 6 finished epochs)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train_pixelrepa.main([
        "--train_data_dir", str(run_assets / "data"), "--resolution", "32", "--encoder", str(run_assets / "dinov2"),
        "--encoder_resolution", "32", "--encoder_patch_size", "8", "--train_batch_size", "4",
        "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "none", "--validation_steps", "1000",
        "--resume_from_checkpoint", str(converted), "--output_dir", str(output_dir), "--checkpointing_steps", "1",
        *extra,
    ])


def test_the_training_script_continues_the_official_run(run_assets, converted, tmp_path, caplog):
    _, _, args = official_step_fixture()
    config = str(converted / "transformer" / "config.json")
    with caplog.at_level("INFO"):
        assert continue_run(run_assets, converted, tmp_path, "--model_config_path", config, "--ema_decays", "0.9",
                            "0.5", "--base_learning_rate", "0.064", "--max_train_steps", "13") == 0
    assert "after 6 epochs, at step 12" in caplog.text
    assert "lr 0.001 (--base_learning_rate 0.064 x global batch 4 / 256)" in caplog.text
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-13"]
    optimizer = torch.load(tmp_path / "checkpoint-13" / "optimizer.bin", weights_only=True)
    # 12 steps are past the 5 warm-up epochs (10 steps): the official run's full lr, no second warm-up.
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(1e-3, rel=1e-12)
    steps = {float(state["step"]) for state in optimizer["state"].values()}
    assert steps == {float(official_checkpoint(*official_step_fixture())["optimizer"]["state"][0]["step"]) + 1}
    weights = load_file(tmp_path / "checkpoint-13" / "transformer" / "diffusion_pytorch_model.safetensors")
    for number, decay in ((1, args.ema_decay1), (2, args.ema_decay2)):
        before = load_file(converted / f"ema_{number}" / "diffusion_pytorch_model.safetensors")
        after = load_file(tmp_path / "checkpoint-13" / f"ema_{number}" / "diffusion_pytorch_model.safetensors")
        key = "blocks.0.attn.to_qkv.weight"
        torch.testing.assert_close(after[key], decay * before[key] + (1 - decay) * weights[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flag, value, message", [
    ("--alignment", "none", "was saved with --alignment pixelrepa --ema_decays 0.9 0.5; resume with the same flags"),
    ("--model_config_path", {"hidden_size": 32}, "has another config than this run (saved, run): {'hidden_size': (24, "
                                                 "32)}"),
])
def test_continuing_with_other_flags_is_refused_before_any_step(run_assets, converted, tmp_path, capsys, flag, value,
                                                                message):
    config = JiTTransformer2DModel.load_config(converted / "transformer")
    if flag == "--model_config_path":
        config, value = {**config, **value}, tmp_path / "other.json"
        value.write_text(json.dumps(config))
    else:
        (tmp_path / "same.json").write_text(json.dumps(config))
    extra = [flag, str(value)] if flag == "--model_config_path" else ["--model_config_path", str(tmp_path / "same.json"),
                                                                      flag, value]
    assert continue_run(run_assets, converted, tmp_path / "out", "--ema_decays", "0.9", "0.5", "--max_train_steps",
                        "13", *extra) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train_pixelrepa.py: error: ") and message in error
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_continuing_under_fsdp2_is_refused_before_any_step(run_assets, converted, tmp_path):
    # Its AdamW moments are loaded unsharded, so an official run continues under DDP or in one process only.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "training" / "configs" / "accelerate_fsdp.yaml"), "--num_processes", "2", "--main_process_port",
        "0", str(REPO / "tests" / "fsdp_on_cpu.py"), str(REPO / "training" / "train_pixelrepa.py"),
        "--train_data_dir", str(run_assets / "data"), "--resolution", "32", "--encoder", str(run_assets / "dinov2"),
        "--encoder_resolution", "32", "--encoder_patch_size", "8", "--train_batch_size", "2", "--report_to", "none",
        "--ema_decays", "0.9", "0.5", "--resume_from_checkpoint", str(converted), "--output_dir", str(tmp_path / "out"),
    ]
    result = subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (f"train_pixelrepa.py: error: {converted} is a converted official run; continue it under DDP or in one "
            "process (its AdamW state is loaded unsharded)") in result.stderr, result.stderr[-3000:]
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_cli_writes_a_training_checkpoint_and_refuses_one_without_adamw_state(tmp_path):
    tensors, metadata, args = official_step_fixture()
    checkpoint = official_checkpoint(tensors, metadata, args)
    torch.save(checkpoint, tmp_path / "full.pth")
    torch.save({**checkpoint, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "empty.pth")
    cli = [sys.executable, str(REPO / "pipelines" / "convert_official_checkpoint.py"), "--for_training",
           "--in_context_start", "1", "--checkpoint_path"]
    written = subprocess.run([*cli, tmp_path / "full.pth", "--output_dir", tmp_path / "ok"], capture_output=True,
                             text=True)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "ok" / OPTIMIZER_MOMENTS_NAME).is_file()
    refused = subprocess.run([*cli, tmp_path / "empty.pth", "--output_dir", tmp_path / "no"], capture_output=True,
                             text=True)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "has no AdamW state" in refused.stderr and not (tmp_path / "no").exists()


def test_a_jit_checkpoint_converts_to_a_plain_jit_training_checkpoint(tmp_path):
    """LTH14/JiT format: `net.` in all three entries, no adapter or mask_token; alignment none, all moments mapped."""
    tensors, metadata, args = official_step_fixture()
    manifest = [(key, shape) for key, shape in metadata["net_manifest"] if key != "mask_token"]
    jit_metadata = {**metadata, "net_manifest": manifest}
    checkpoint = official_checkpoint(tensors, jit_metadata, args, jit_format=True)
    torch.save(checkpoint, tmp_path / "checkpoint-last.pth")
    convert_official_training_checkpoint(str(tmp_path / "checkpoint-last.pth"), str(tmp_path / "converted"),
                                         in_context_start=1)
    state = json.loads((tmp_path / "converted" / TRAINING_STATE_NAME).read_text())
    assert state["alignment"] == "none" and not (tmp_path / "converted" / "adapter").exists()
    ema_1 = load_file(tmp_path / "converted" / "ema_1" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(ema_1["blocks.0.attn.to_qkv.weight"], checkpoint["model_ema1"]["net.blocks.0.attn.qkv.weight"])
    moments = load_file(tmp_path / "converted" / OPTIMIZER_MOMENTS_NAME)
    names = {key.rsplit(".", 1)[0] for key in moments}
    transformer = JiTTransformer2DModel.from_pretrained(tmp_path / "converted" / "transformer")
    assert names == {f"transformer.{name}" for name, _ in transformer.named_parameters()} - {"transformer.mask_token"}
    official = checkpoint["optimizer"]["state"]
    no_decay_count = len(checkpoint["optimizer"]["param_groups"][0]["params"])
    first_decay = official_trainable_names(checkpoint["model"])[no_decay_count]
    assert torch.equal(moments[f"{training_parameter_name(first_decay)}.exp_avg"], official[no_decay_count]["exp_avg"])


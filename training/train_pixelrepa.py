"""Train a class-conditional JiT pixel-space diffusion transformer with PixelREPA, REPA or no alignment.

    accelerate launch training/train_pixelrepa.py --train_data_dir imagenet/train --output_dir pixelrepa-b16

Defaults are the PixelREPA paper's recipe for JiT-B/16 on ImageNet 256x256 (8 GPUs x 128 images per step).
Also runs under `torchrun` (on CPU: `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...`) or plain `python`, and
shards under FSDP2: `accelerate launch --config_file training/configs/accelerate_fsdp.yaml ...`.
Checkpoints (`checkpoint-<step>`) hold the transformer, the adapter or projector and the EMAs as diffusers folders
(safetensors), the optimizer, lr scheduler and RNG states; the frozen encoder is never saved. At the end, output_dir
holds a PixelREPAPipeline with the first EMA and a model card.
"""

import argparse
import json
import logging
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, load, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from safetensors.torch import load_file
from torch.distributed.fsdp import MixedPrecisionPolicy
from tqdm.auto import tqdm

from pixelrepa_diffusers import (
    JIT_PRESETS,
    JiTFlowMatchScheduler,
    JiTTransformer2DModel,
    MaskedTransformerAdapter,
    PixelREPAPipeline,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser
from pixelrepa_diffusers.data import collate_train_batch, load_train_dataset
from pixelrepa_diffusers.encoders import load_alignment_encoder
from pixelrepa_diffusers.hub import CARD_VARIANTS, push_pipeline_to_hub, render_model_card
from pixelrepa_diffusers.alignment import ALIGNMENTS, REPAProjector
from pixelrepa_diffusers.losses import PixelREPATrainingObjective
from pixelrepa_diffusers.training_utils import (
    OPTIMIZER_MOMENTS_NAME,
    TRAINING_STATE_NAME,
    ExponentialMovingAverage,
    image_grid,
    latest_checkpoint,
    load_adamw_moments,
    load_into,
    read_model_folder,
    remove_incomplete_checkpoints,
    save_checkpoint,
)

logger = get_logger(__name__)

DEFAULT_ALIGNMENT_WEIGHT = {"pixelrepa": 0.1, "repa": 0.5}
ALIGNER_FOLDER = {"pixelrepa": "adapter", "repa": "projector"}
ALIGNER_CLASS = {"pixelrepa": MaskedTransformerAdapter, "repa": REPAProjector}
METHOD_NAME = {"none": "JiT", "repa": "JiT+REPA", "pixelrepa": "PixelREPA"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default and keeps the description's line breaks."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def build_parser():
    parser = OneLineArgumentParser(
        prog="train_pixelrepa.py", description=__doc__, formatter_class=HelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None, help="An image folder with one subfolder per class.")
    data.add_argument("--dataset_name", default=None,
                      help="A Hub dataset id, a local dataset repository, a save_to_disk folder, or the output of "
                           "training/prepare_dataset.py (pre-cropped, fastest).")
    data.add_argument("--dataset_config_name", default=None, help="The config of --dataset_name.")
    data.add_argument("--image_column", default="image", help="The image column of --dataset_name.")
    data.add_argument("--label_column", default="label", help="The class-id column of --dataset_name.")
    data.add_argument("--cache_dir", default=None, help="Where datasets and models downloaded from the Hub are cached.")
    data.add_argument("--resolution", type=int, default=256, help="Side of the ADM center crop, in pixels.")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                      help="Flip training images horizontally with probability 0.5.")
    data.add_argument("--dataloader_num_workers", type=int, default=12, help="Data loading processes per device.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="JiT-B/16", choices=sorted(JIT_PRESETS),
                       help="JiT preset; its sample_size is set to --resolution and num_classes to the data's.")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model_config_path", default=None,
                        help="A JiTTransformer2DModel config.json (or its folder) to train from scratch instead of "
                             "--model.")
    source.add_argument("--init_from_pretrained", default=None,
                        help="A pipeline folder (e.g. written by pipelines/convert_official_checkpoint.py) whose "
                             "transformer, and adapter/ subfolder if any, are the starting weights instead of --model.")
    model.add_argument("--dropout", type=float, default=0.0,
                       help="Projection dropout on the middle half of the blocks of --model (the paper: 0.2 for H/16).")
    model.add_argument("--attention_dropout", type=float, default=0.0,
                       help="Attention dropout on the middle half of the blocks of --model.")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute block activations in the backward pass to save memory.")

    alignment = parser.add_argument_group("representation alignment")
    alignment.add_argument("--alignment", default="pixelrepa", choices=list(ALIGNMENTS),
                           help="pixelrepa: masked transformer adapter on the tokens after block in_context_start; "
                                "repa: MLP projector on the tokens after block --repa_depth; none: plain JiT.")
    alignment.add_argument("--encoder", default="facebook/dinov2-base",
                           help="The frozen DINOv2 whose patch tokens are the alignment target (Hub id or folder).")
    alignment.add_argument("--encoder_resolution", type=int, default=256,
                           help="Image size the encoder sees (the official grid: 256 px with 16 px patches).")
    alignment.add_argument("--encoder_patch_size", type=int, default=16,
                           help="Encoder patch size; its kernel is resampled from the checkpoint's (14 for DINOv2).")
    alignment.add_argument("--alignment_weight", type=float, default=None,
                           help="Weight of the alignment loss; default 0.1 for pixelrepa (PixelREPA paper) and 0.5 "
                                "for repa (REPA paper).")
    alignment.add_argument("--mask_ratio", type=float, default=0.2,
                           help="Fraction of adapter input tokens replaced by the mask token (pixelrepa).")
    alignment.add_argument("--repa_depth", type=int, default=None,
                           help="Blocks run before the REPA projector reads the image tokens (repa); default: the "
                                "model's in_context_start.")
    alignment.add_argument("--projector_dim", type=int, default=2048, help="Hidden width of the REPA projector.")

    recipe = parser.add_argument_group("diffusion recipe")
    recipe.add_argument("--label_dropout", type=float, default=0.1,
                        help="Probability of replacing a label by the null class (for guidance).")
    recipe.add_argument("--p_mean", type=float, default=-0.8, help="Mean of the logit-normal training time.")
    recipe.add_argument("--p_std", type=float, default=0.8, help="Standard deviation of the logit-normal time.")
    recipe.add_argument("--t_eps", type=float, default=0.05, help="Lower clamp of 1 - t in the velocity.")
    recipe.add_argument("--noise_scale", type=float, default=1.0,
                        help="Standard deviation of the noise (the paper: 2.0 at 512 px).")
    recipe.add_argument("--ema_decays", type=float, nargs="+", default=[0.9999, 0.9996],
                        help="Decays of the EMAs of the transformer; the first is exported for sampling.")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--seed", type=int, default=0, help="Seed of weights, data order and noise.")
    optimization.add_argument("--train_batch_size", type=int, default=128, help="Images per device per step.")
    optimization.add_argument("--gradient_accumulation_steps", type=int, default=1,
                              help="Batches accumulated per optimizer step.")
    optimization.add_argument("--num_train_epochs", type=int, default=600, help="Epochs, unless --max_train_steps.")
    optimization.add_argument("--max_train_steps", type=int, default=None,
                              help="Optimizer steps; overrides --num_train_epochs.")
    optimization.add_argument("--base_learning_rate", type=float, default=5e-5,
                              help="The learning rate is this x the global batch / 256 (the official rule).")
    optimization.add_argument("--learning_rate", type=float, default=None,
                              help="An absolute learning rate instead of the --base_learning_rate rule.")
    optimization.add_argument("--lr_scheduler", default="constant_with_warmup",
                              choices=[scheduler.value for scheduler in SchedulerType], help="Learning rate schedule.")
    optimization.add_argument("--lr_warmup_steps", type=int, default=None,
                              help="Linear warm-up steps; default: 5 epochs.")
    optimization.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optimization.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2.")
    optimization.add_argument("--adam_weight_decay", type=float, default=0.0,
                              help="AdamW weight decay (never applied to biases, norms and other 1-D parameters).")
    optimization.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optimization.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"],
                              help="Autocast precision; weights, EMAs and optimizer states stay in fp32.")

    output = parser.add_argument_group("checkpoints, logging and validation")
    output.add_argument("--output_dir", default="pixelrepa-output", help="Where checkpoints and the pipeline go.")
    output.add_argument("--checkpointing_steps", type=int, default=5000, help="Save a checkpoint every N steps.")
    output.add_argument("--checkpoints_total_limit", type=int, default=1,
                        help="Keep only the newest N checkpoints (older ones are deleted after a save completes).")
    output.add_argument("--resume_from_checkpoint", default=None,
                        help="'latest' (the newest checkpoint in --output_dir, or a fresh start if none) or a "
                             "checkpoint folder.")
    output.add_argument("--report_to", default="tensorboard",
                        help="Trackers: tensorboard, wandb, comet_ml, all, or none.")
    output.add_argument("--logging_dir", default="logs", help="Tracker folder inside --output_dir.")
    output.add_argument("--logging_steps", type=int, default=100,
                        help="Log loss terms, lr and throughput every N steps (the only per-step host syncs).")
    output.add_argument("--validation_steps", type=int, default=5000,
                        help="Sample a grid of classes with the first EMA every N steps.")
    output.add_argument("--validation_classes", type=int, nargs="+", default=None,
                        help="Class ids of the validation grid rows; default: 8 evenly spaced classes.")
    output.add_argument("--validation_images_per_class", type=int, default=4, help="Columns of the validation grid.")
    output.add_argument("--validation_num_inference_steps", type=int, default=50, help="Heun steps for validation.")
    output.add_argument("--guidance_scale", type=float, default=None,
                        help="Guidance scale of validation and of the saved pipeline; default: that of the "
                             "--init_from_pretrained pipeline, else the paper's for --model (PixelREPA B/L/H-16: "
                             "3.1/2.8/2.4; JiT, also for repa: 3.0/2.4/2.2), else 1.0.")
    output.add_argument("--push_to_hub", action="store_true",
                        help="Upload the final pipeline and card (not the checkpoints) to --hub_model_id.")
    output.add_argument("--hub_model_id", default=None, help="Hub repository id for --push_to_hub.")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Raises ValueError naming the flag when the flags do not fit together; fills the alignment weight default."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("pass exactly one of --train_data_dir and --dataset_name")
    positive = ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                "checkpointing_steps", "logging_steps", "validation_steps", "validation_images_per_class",
                "validation_num_inference_steps", "projector_dim", "encoder_resolution", "encoder_patch_size")
    for name in positive + ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    for name in ("mask_ratio", "label_dropout", "dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for decay in args.ema_decays:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--ema_decays values must be in [0, 1), got {decay}")
    if args.alignment == "none" and args.alignment_weight is not None:
        raise ValueError("--alignment_weight needs --alignment pixelrepa or repa")
    if args.alignment != "repa" and args.repa_depth is not None:
        raise ValueError("--repa_depth needs --alignment repa")
    if args.push_to_hub and args.hub_model_id is None:
        raise ValueError("--push_to_hub needs --hub_model_id")
    if args.lr_warmup_steps is not None and args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.alignment_weight is None and args.alignment != "none":
        args.alignment_weight = DEFAULT_ALIGNMENT_WEIGHT[args.alignment]


def check_distributed_type(distributed_type, fsdp_version):
    """Raises ValueError for the accelerate setups the script does not support: DeepSpeed and FSDP1."""
    if distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("DeepSpeed is not supported; use DDP (`accelerate launch --multi_gpu`) or FSDP2 "
                         "(`--config_file training/configs/accelerate_fsdp.yaml`)")
    if distributed_type == DistributedType.FSDP and fsdp_version != 2:
        raise ValueError(f"FSDP{fsdp_version} is not supported; set fsdp_version: 2 in the accelerate config (see "
                         "training/configs/accelerate_fsdp.yaml)")


def build_transformer(args, num_classes):
    """The transformer to train: a preset, a config file, or pretrained weights; checked against the data."""
    if args.init_from_pretrained is not None:
        transformer = JiTTransformer2DModel.from_pretrained(args.init_from_pretrained, subfolder="transformer")
    elif args.model_config_path is not None:
        transformer = JiTTransformer2DModel.from_config(JiTTransformer2DModel.load_config(args.model_config_path))
    else:
        transformer = JiTTransformer2DModel.from_preset(
            args.model, sample_size=args.resolution, num_classes=num_classes, dropout=args.dropout,
            attention_dropout=args.attention_dropout,
        )
    config = transformer.config
    if config.sample_size != args.resolution:
        raise ValueError(f"--resolution {args.resolution} does not match the model's sample_size {config.sample_size}")
    if config.num_classes != num_classes:
        raise ValueError(f"the data has {num_classes} classes but the model has num_classes {config.num_classes}")
    return transformer


def build_aligner(args, transformer, encoder_width):
    """The adapter (pixelrepa) or projector (repa) that maps backbone tokens to the encoder's width."""
    config = transformer.config
    if args.alignment == "repa":
        return REPAProjector(hidden_size=config.hidden_size, projector_dim=args.projector_dim,
                             out_channels=encoder_width)
    pretrained_adapter = os.path.join(args.init_from_pretrained or "", "adapter")
    if args.init_from_pretrained is not None and os.path.isdir(pretrained_adapter):
        adapter = MaskedTransformerAdapter.from_pretrained(pretrained_adapter)
        if adapter.config.out_channels != encoder_width:
            raise ValueError(f"the adapter in {pretrained_adapter} outputs {adapter.config.out_channels} channels but "
                             f"--encoder has width {encoder_width}")
        return adapter
    return MaskedTransformerAdapter.from_transformer_config(config, out_channels=encoder_width)


def optimizer_parameter_groups(module, weight_decay):
    """Trainable parameters in two AdamW groups: weight decay on matrices only, as the official code does."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim == 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def resolve_learning_rate(args, global_batch_size):
    """The run's learning rate and how it was derived: --learning_rate, else --base_learning_rate x batch / 256."""
    if args.learning_rate is not None:
        return args.learning_rate, "--learning_rate"
    learning_rate = args.base_learning_rate * global_batch_size / 256
    return learning_rate, f"--base_learning_rate {args.base_learning_rate:g} x global batch {global_batch_size} / 256"


def default_guidance_scale(args):
    """The source pipeline's guidance scale, else the paper's for the run's preset and method, else 1.0 (none)."""
    if args.init_from_pretrained is not None:
        return PixelREPAPipeline.load_config(args.init_from_pretrained)["guidance_scale"]
    if args.model_config_path is not None:
        return 1.0
    variant = args.model.replace("JiT", "PixelREPA") if args.alignment == "pixelrepa" else args.model
    return CARD_VARIANTS[variant]["guidance_scale"] if variant in CARD_VARIANTS else 1.0


def unsharded_copy(model_class, config, state_dict):
    """A plain, frozen `model_class` with `config` that holds the full `state_dict` (e.g. gathered from FSDP shards)."""
    with init_empty_weights():
        model = model_class.from_config(config)
    model.load_state_dict(state_dict, assign=True)
    return model.requires_grad_(False).eval()


def submodule_state(state_dict, prefix):
    """The entries of `state_dict` under `prefix`, without it."""
    return {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}


def read_run_state(checkpoint, args):
    """The training_state.json of a checkpoint, refused before any step when it was saved with other flags."""
    with open(os.path.join(checkpoint, TRAINING_STATE_NAME)) as file:
        state = json.load(file)
    if state["alignment"] != args.alignment or state["ema_decays"] != args.ema_decays:
        raise ValueError(f"{checkpoint} was saved with --alignment {state['alignment']} --ema_decays "
                         f"{' '.join(map(str, state['ema_decays']))}; resume with the same flags")
    return state


def load_model_folders(input_dir, trained, emas, transformer_config, alignment):
    """Loads a checkpoint's transformer and adapter or projector into `trained` (unless None) and its EMAs."""
    if trained is not None:
        folder = os.path.join(input_dir, "transformer")
        load_into(trained.transformer, read_model_folder(JiTTransformer2DModel, transformer_config, folder,
                                                         "transformer"), "transformer")
        if trained.aligner is not None:
            name = ALIGNER_FOLDER[alignment]
            load_into(trained.aligner, read_model_folder(ALIGNER_CLASS[alignment], trained.aligner.config,
                                                         os.path.join(input_dir, name), name), name)
    for index, ema in enumerate(emas, start=1):
        ema.load_full_state_dict(read_model_folder(JiTTransformer2DModel, transformer_config,
                                                   os.path.join(input_dir, f"ema_{index}"), f"ema_{index}"))


def build_lr_scheduler(args, optimizer, num_processes, start_step):
    """The lr schedule, already `start_step` optimizer steps along; it steps once per process per optimizer step."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes, last_epoch=start_step * num_processes - 1,
    )


def resolve_checkpoint(args):
    """The checkpoint folder to resume from, or None for a fresh start."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    for path in (args.resume_from_checkpoint, os.path.join(args.output_dir, args.resume_from_checkpoint)):
        if os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
            return path
    raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")


def validation_grid(transformer, args, class_ids):
    """A PIL grid of samples of the first EMA: one row per class, a fixed seed."""
    pipeline = PixelREPAPipeline(
        transformer=transformer, scheduler=JiTFlowMatchScheduler(t_eps=args.t_eps, noise_scale=args.noise_scale)
    )
    pipeline.set_progress_bar_config(disable=True)
    labels = [class_id for class_id in class_ids for _ in range(args.validation_images_per_class)]
    images = pipeline(
        labels, num_inference_steps=args.validation_num_inference_steps, guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed), output_type="np",
    ).images
    return image_grid(images, rows=len(class_ids))


def log_validation(accelerator, grid, step, path):
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption=f"step {step}")}, step=step)
    logger.info(f"Saved validation grid {path}")


def save_final_outputs(args, ema_transformer, adapter, split, id2label, dataset_description, global_step):
    """The first EMA as a PixelREPAPipeline in output_dir (plus the adapter, if any) and its model card."""
    pipeline = PixelREPAPipeline(
        transformer=ema_transformer,
        scheduler=JiTFlowMatchScheduler(t_eps=args.t_eps, noise_scale=args.noise_scale),
        id2label=id2label,
        guidance_scale=args.guidance_scale,
        guidance_interval=(0.1, 1.0),
    )
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    if adapter is not None:
        adapter.save_pretrained(os.path.join(args.output_dir, "adapter"), safe_serialization=True)
    config = ema_transformer.config
    training = {
        "Data": f"{dataset_description}, ADM center crop to {args.resolution} px"
                + (", random horizontal flip" if args.random_flip else ""),
        "Steps": f"{global_step} (global batch {args.global_batch_size})",
        "Optimizer": f"AdamW, betas ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.adam_weight_decay}",
        "Learning rate": "{:g} ({}), {} with {} warm-up steps".format(
            *resolve_learning_rate(args, args.global_batch_size), args.lr_scheduler, args.lr_warmup_steps),
        "Diffusion": f"x-prediction with v-loss; t = sigmoid(N({args.p_mean}, {args.p_std}^2)); t_eps {args.t_eps}; "
                     f"noise scale {args.noise_scale}",
        "Label dropout": f"{args.label_dropout}",
        "EMA": f"{args.ema_decays[0]} (these weights)" + "".join(f", {decay}" for decay in args.ema_decays[1:]),
        "Precision": args.mixed_precision,
    }
    if args.alignment == "pixelrepa":
        training["Alignment"] = (f"Masked Transformer Adapter on the tokens after block {config.in_context_start}, "
                                 f"{args.mask_ratio:.0%} masked, cosine loss to {args.encoder}, weight "
                                 f"{args.alignment_weight}")
    elif args.alignment == "repa":
        training["Alignment"] = (f"MLP projector on the tokens after block {split}, cosine loss to "
                                 f"{args.encoder}, weight {args.alignment_weight}")
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    card = render_model_card(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        method=METHOD_NAME[args.alignment],
        architecture=dict(config),
        training=training,
        weights_source=(f"Trained with pixelrepa-diffusers' training/train_pixelrepa.py for {global_step} steps; "
                        f"the weights are the EMA with decay {args.ema_decays[0]}."),
        guidance_scale=args.guidance_scale,
        noise_scale=args.noise_scale,
        dataset=hub_dataset_id(args),
    )
    card.save(os.path.join(args.output_dir, "README.md"))
    if args.push_to_hub:
        url = push_pipeline_to_hub(args.output_dir, args.hub_model_id, card)
        logger.info(f"Pushed the pipeline to {url}")


def hub_dataset_id(args):
    """The Hub id of the training data for the card's metadata; None for local data."""
    if args.dataset_name is None or os.path.exists(args.dataset_name):
        return None
    return args.dataset_name


def tracker_config(args):
    """The run's flags as tracker hyperparameters (scalars; lists and None as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()}


def train(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != accelerator.num_processes:
        raise ValueError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; on CPU, "
                         "set ACCELERATE_USE_CPU=1 for torchrun")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    check_distributed_type(accelerator.distributed_type, accelerator.state.fsdp_plugin.fsdp_version if fsdp else None)
    if fsdp:
        # fp32 weights, gradients and reductions under autocast, as with DDP: FSDP2's bf16 parameter casting would
        # also cast the images, the noise and the loss to bf16.
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for path in remove_incomplete_checkpoints(args.output_dir):
            logger.info(f"Removed the incomplete checkpoint {path}")
    checkpoint = resolve_checkpoint(args)
    run_state = None if checkpoint is None else read_run_state(checkpoint, args)
    official_epochs = None if run_state is None else run_state.get("official_epochs")
    if official_epochs is not None and fsdp:
        raise ValueError(f"{checkpoint} is a converted official run; continue it under DDP or in one process "
                         "(its AdamW state is loaded unsharded)")

    dataset = load_train_dataset(
        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column, label_column=args.label_column,
        resolution=args.resolution, random_flip=args.random_flip, cache_dir=args.cache_dir, seed=args.seed,
    )
    num_classes = len(dataset.class_names)
    if args.validation_classes is None:
        args.validation_classes = sorted({round(i) for i in np.linspace(0, num_classes - 1, min(8, num_classes))})
    if not all(0 <= class_id < num_classes for class_id in args.validation_classes):
        raise ValueError(f"--validation_classes must be in [0, {num_classes}), got {args.validation_classes}")
    set_seed(args.seed)
    transformer = build_transformer(args, num_classes)
    encoder, aligner = None, None
    if args.alignment != "none":
        encoder = load_alignment_encoder(args.encoder, resolution=args.encoder_resolution,
                                         patch_size=args.encoder_patch_size, cache_dir=args.cache_dir)
        if encoder.num_tokens != transformer.num_patches:
            raise ValueError(f"--encoder gives {encoder.num_tokens} tokens at --encoder_resolution "
                             f"{args.encoder_resolution} / --encoder_patch_size {args.encoder_patch_size}, but the "
                             f"model has {transformer.num_patches} patches; they must match one to one")
        aligner = build_aligner(args, transformer, encoder.hidden_size)
    if args.alignment != "pixelrepa":
        transformer.mask_token.requires_grad_(False)  # used only by the adapter
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if args.alignment == "pixelrepa":
            aligner.enable_gradient_checkpointing()
    objective = PixelREPATrainingObjective(
        transformer, alignment=args.alignment, aligner=aligner,
        alignment_weight=args.alignment_weight, mask_ratio=args.mask_ratio, repa_depth=args.repa_depth,
        label_dropout=args.label_dropout, p_mean=args.p_mean, p_std=args.p_std, t_eps=args.t_eps,
        noise_scale=args.noise_scale,
    )

    args.global_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate, learning_rate_origin = resolve_learning_rate(args, args.global_batch_size)
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(objective, args.adam_weight_decay), lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True,
    )
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_train_batch,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed),
    )
    batches_per_epoch = len(dataset) // (args.train_batch_size * accelerator.num_processes)
    if batches_per_epoch == 0:
        raise ValueError(f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes is more "
                         f"than the {len(dataset)} training images")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = 5 * steps_per_epoch
    if args.guidance_scale is None:
        args.guidance_scale = default_guidance_scale(args)
    # An official run continues at the step its finished epochs count, with the schedule already that far along.
    start_step = 0 if official_epochs is None else official_epochs * steps_per_epoch
    lr_scheduler = build_lr_scheduler(args, optimizer, accelerator.num_processes, start_step)

    objective, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        objective, optimizer, train_dataloader, lr_scheduler
    )
    trained = accelerator.unwrap_model(objective)  # under FSDP2, the same module with sharded parameters
    transformer = trained.transformer
    transformer_config = transformer.config
    aligner_config = None if trained.aligner is None else trained.aligner.config
    if encoder is not None:
        encoder.to(accelerator.device)  # frozen and outside the trained module: never sharded nor saved
    emas = [ExponentialMovingAverage(transformer, decay) for decay in args.ema_decays]
    training_state = {"global_step": 0, "skipped_images": 0}

    def save_model_hook(models, weights, output_dir):
        state = accelerator.get_state_dict(models[0])  # full tensors; collectives under FSDP, as are the EMAs'
        ema_states = [ema.full_state_dict() for ema in emas]
        if accelerator.is_main_process:
            unsharded_copy(JiTTransformer2DModel, transformer_config, submodule_state(state, "transformer.")
                           ).save_pretrained(os.path.join(output_dir, "transformer"))
            if aligner_config is not None:
                unsharded_copy(ALIGNER_CLASS[args.alignment], aligner_config, submodule_state(state, "aligner.")
                               ).save_pretrained(os.path.join(output_dir, ALIGNER_FOLDER[args.alignment]))
            for index, ema_state in enumerate(ema_states, start=1):
                unsharded_copy(JiTTransformer2DModel, transformer_config, ema_state).save_pretrained(
                    os.path.join(output_dir, f"ema_{index}"))
            run_state = {**training_state, "alignment": args.alignment, "ema_decays": args.ema_decays}
            with open(os.path.join(output_dir, TRAINING_STATE_NAME), "w") as file:
                json.dump(run_state, file, indent=2)
        if weights:  # accelerate's own copy of the models; under FSDP it writes its model shards instead
            weights.pop()

    def load_model_hook(models, input_dir):
        # accelerate ignores RNG states it cannot read (weights-only); an inexact resume must fail instead.
        load(os.path.join(input_dir, f"random_states_{accelerator.process_index}.pkl"))
        # under FSDP, accelerate has restored the model from its shards and passes no models
        unwrapped = accelerator.unwrap_model(models.pop()) if models else None
        load_model_folders(input_dir, unwrapped, emas, transformer_config, args.alignment)
        training_state["global_step"] = run_state["global_step"]
        training_state["skipped_images"] = run_state["skipped_images"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    set_seed(args.seed, device_specific=True)  # each process draws its own noise; a resume restores the RNGs
    if official_epochs is not None:
        load_model_folders(checkpoint, trained, emas, transformer_config, args.alignment)
        load_adamw_moments(optimizer, trained, load_file(os.path.join(checkpoint, OPTIMIZER_MOMENTS_NAME)))
        training_state["global_step"] = start_step
        logger.info(f"Continuing the official run in {checkpoint} after {official_epochs} epochs, at step "
                    f"{start_step}")
    elif checkpoint is not None:
        try:
            accelerator.load_state(checkpoint)
        except pickle.UnpicklingError as error:
            raise ValueError(f"refusing to load {checkpoint}: it holds pickled objects outside the weights-only "
                             f"allow-list ({str(error).strip().splitlines()[0]})") from None
        logger.info(f"Resumed from {checkpoint} at step {training_state['global_step']}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run")
    global_step = training_state["global_step"]
    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    accelerator.init_trackers("train_pixelrepa", config=tracker_config(args))
    logger.info(f"{len(dataset)} images of {len(dataset.class_names)} classes; {args.max_train_steps} steps of "
                f"{args.global_batch_size} images ({args.num_train_epochs} epochs), lr {learning_rate:g} "
                f"({learning_rate_origin}), "
                f"alignment {args.alignment}")
    validation_dir = os.path.join(args.output_dir, "validation")

    loss_names = ("loss", "loss_jit", "loss_alignment")
    loss_sums = torch.zeros(len(loss_names), device=accelerator.device)
    loss_count = torch.zeros((), device=accelerator.device)
    first_nonfinite_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)
    skipped_since_save = 0
    last_log = (time.perf_counter(), global_step)
    last_checkpoint = checkpoint

    def check_finite():
        step = accelerator.reduce(first_nonfinite_step.clone(), reduction="max").item()
        if step >= 0:
            raise NonFiniteLossError(f"the loss is not finite at step {step}; stopped, the last good checkpoint is "
                                     f"{last_checkpoint or 'none'}")

    def count_skipped():
        local = torch.tensor(skipped_since_save, device=accelerator.device)
        return training_state["skipped_images"] + accelerator.reduce(local, reduction="sum").item()

    with tqdm(total=args.max_train_steps, initial=global_step, desc="Steps",
              disable=not accelerator.is_local_main_process) as progress_bar:
        objective.train()
        for epoch in range(first_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps:
                break
            train_dataloader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            epoch_loader = train_dataloader
            if epoch == first_epoch and batches_to_skip:
                epoch_loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
            for batch in epoch_loader:
                skipped_since_save += batch["num_skipped"]
                images = batch["pixel_values"].to(torch.float32).div(255) * 2 - 1
                class_labels = batch["class_labels"]
                weight = 1.0
                if images.shape[0] == 0:  # all images unreadable: a zero-weight step keeps the processes in step
                    images = torch.zeros(1, 3, args.resolution, args.resolution, device=accelerator.device)
                    class_labels = torch.zeros(1, dtype=torch.long, device=accelerator.device)
                    weight = 0.0
                with accelerator.accumulate(objective):
                    with accelerator.autocast():
                        targets = None
                        if encoder is not None:
                            with torch.no_grad():
                                targets = encoder(images)
                        losses = objective(images, class_labels, targets)
                    accelerator.backward(losses["loss"] * weight)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if weight:
                    loss_sums += torch.stack([losses[name].detach().float() for name in loss_names])
                    loss_count += 1
                    bad = ~torch.isfinite(losses["loss"].detach()) & (first_nonfinite_step < 0)
                    first_nonfinite_step = torch.where(bad, global_step + 1, first_nonfinite_step)
                if not accelerator.sync_gradients:
                    continue

                for ema in emas:
                    ema.update(transformer)
                global_step += 1
                training_state["global_step"] = global_step
                progress_bar.update(1)

                if global_step % args.logging_steps == 0:
                    check_finite()
                    means = accelerator.reduce(loss_sums / loss_count, reduction="mean").tolist()
                    now = time.perf_counter()
                    images_per_second = (global_step - last_log[1]) * args.global_batch_size / (now - last_log[0])
                    logs = dict(zip(loss_names, means), lr=lr_scheduler.get_last_lr()[0],
                                images_per_second=images_per_second, skipped_images=count_skipped())
                    accelerator.log(logs, step=global_step)
                    progress_bar.set_postfix(loss=f"{means[0]:.4f}", jit=f"{means[1]:.4f}", align=f"{means[2]:.4f}",
                                             lr=f"{logs['lr']:.2e}")
                    loss_sums.zero_()
                    loss_count.zero_()
                    last_log = (now, global_step)

                if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                    check_finite()
                    training_state["skipped_images"] = count_skipped()
                    skipped_since_save = 0
                    last_checkpoint = save_checkpoint(accelerator, args.output_dir, global_step,
                                                      args.checkpoints_total_limit)
                    logger.info(f"Saved {last_checkpoint}")

                if global_step % args.validation_steps == 0:
                    ema_state = emas[0].full_state_dict()  # every process: a collective under FSDP
                    if accelerator.is_main_process:
                        os.makedirs(validation_dir, exist_ok=True)
                        ema_transformer = unsharded_copy(JiTTransformer2DModel, transformer_config, ema_state)
                        grid = validation_grid(ema_transformer, args, args.validation_classes)
                        log_validation(accelerator, grid, global_step,
                                       os.path.join(validation_dir, f"step-{global_step:07d}.png"))

                if global_step >= args.max_train_steps:
                    break

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(objective)  # full tensors; collectives under FSDP, as is the EMA's
    ema_state = emas[0].full_state_dict()
    if accelerator.is_main_process:
        if training_state["skipped_images"]:
            logger.info(f"Skipped {training_state['skipped_images']} unreadable images in total")
        source = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
        id2label = dict(enumerate(dataset.class_names))
        ema_transformer = unsharded_copy(JiTTransformer2DModel, transformer_config, ema_state)
        adapter = None
        if args.alignment == "pixelrepa":
            adapter = unsharded_copy(MaskedTransformerAdapter, aligner_config, submodule_state(state, "aligner."))
        save_final_outputs(args, ema_transformer, adapter, trained.alignment_depth, id2label, source, global_step)
        logger.info(f"Saved the PixelREPAPipeline (EMA {args.ema_decays[0]}) to {args.output_dir}")
    accelerator.end_training()


def main(argv=None):
    try:
        train(parse_args(argv))
    except (ValueError, OSError, NonFiniteLossError) as error:
        print(f"train_pixelrepa.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

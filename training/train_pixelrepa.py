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
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.utils import make_image_grid
from torch.distributed.fsdp import MixedPrecisionPolicy
from tqdm.auto import tqdm

from pixelrepa_diffusers import JIT_PRESETS, JiTFlowMatchScheduler, JiTTransformer2DModel, PixelREPAPipeline
from pixelrepa_diffusers.alignment import ALIGNMENTS
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command
from pixelrepa_diffusers.data import collate_train_batch, load_train_dataset
from pixelrepa_diffusers.distributed import check_shared_folder
from pixelrepa_diffusers.encoders import load_alignment_encoder
from pixelrepa_diffusers.scheduling_jit_flow_match import GUIDANCE_INTERVAL
from pixelrepa_diffusers.hub import (
    CARD_METHODS, CardSettings, alignment_card_text, push_pipeline_to_hub, released_variant, render_model_card,
    training_recipe, write_sample_grid,
)
from pixelrepa_diffusers.losses import JiTTrainingObjective
from pixelrepa_diffusers.training_utils import (
    TRAINING_STATE_NAME,
    ExponentialMovingAverage,
    LossMeter,
    NonFiniteLossError,
    TrainingCheckpointer,
    latest_checkpoint,
    remove_incomplete_checkpoints,
    submodule_state,
    unsharded_copy,
)

logger = get_logger(__name__)

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default and keeps the description's line breaks."""


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
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile each block of the backbone, the adapter and the encoder, for static "
                            "shapes (a batch of another size, e.g. after unreadable images, compiles once more); "
                            "default: on with CUDA, off on CPU.")

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
    output.add_argument("--sample_grid", type=int, nargs="*", default=None, metavar="CLASS",
                        help="At the end, sample these classes (bare: the first 4), 2 seeds each, with the final "
                             "pipeline's own sampler into output_dir/samples.png and show the grid in the card: 16 "
                             "images of 50 Heun steps, seconds on a GPU.")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Raises ValueError naming the flag when the flags do not fit together."""
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


def optimizer_parameter_groups(module, weight_decay):
    """Trainable parameters in two AdamW groups: weight decay on matrices only, as the official code does."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim == 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


@dataclass(frozen=True)
class TrainingPlan:
    """The settings a run derives from its flags, its data and its number of processes."""

    global_batch_size: int
    steps_per_epoch: int
    max_train_steps: int
    num_train_epochs: int
    lr_warmup_steps: int
    learning_rate: float
    learning_rate_origin: str  # how learning_rate was derived, for the log and the card
    guidance_scale: float
    alignment_weight: float | None
    validation_classes: list[int]


def plan_training(args, num_images, num_classes, num_processes):
    """The run's TrainingPlan: the flags, with the defaults that depend on the data, the processes or the model."""
    validation_classes = args.validation_classes
    if validation_classes is None:
        validation_classes = sorted({round(i) for i in np.linspace(0, num_classes - 1, min(8, num_classes))})
    if not all(0 <= class_id < num_classes for class_id in validation_classes):
        raise ValueError(f"--validation_classes must be in [0, {num_classes}), got {validation_classes}")
    batches_per_epoch = num_images // (args.train_batch_size * num_processes)
    if batches_per_epoch == 0:
        raise ValueError(f"--train_batch_size {args.train_batch_size} x {num_processes} processes is more "
                         f"than the {num_images} training images")
    global_batch_size = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.num_train_epochs * steps_per_epoch if args.max_train_steps is None else args.max_train_steps
    if args.learning_rate is not None:
        learning_rate, learning_rate_origin = args.learning_rate, "--learning_rate"
    else:
        learning_rate = args.base_learning_rate * global_batch_size / 256
        learning_rate_origin = (f"--base_learning_rate {args.base_learning_rate:g} x global batch {global_batch_size} "
                                "/ 256")
    return TrainingPlan(
        global_batch_size=global_batch_size,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps,
        num_train_epochs=math.ceil(max_train_steps / steps_per_epoch),
        lr_warmup_steps=5 * steps_per_epoch if args.lr_warmup_steps is None else args.lr_warmup_steps,
        learning_rate=learning_rate,
        learning_rate_origin=learning_rate_origin,
        guidance_scale=default_guidance_scale(args) if args.guidance_scale is None else args.guidance_scale,
        alignment_weight=(ALIGNMENTS[args.alignment].default_weight if args.alignment_weight is None
                          else args.alignment_weight),
        validation_classes=validation_classes,
    )


def default_guidance_scale(args):
    """The source pipeline's guidance scale, else the paper's for the run's preset and method, else 1.0 (none)."""
    if args.init_from_pretrained is not None:
        return PixelREPAPipeline.load_config(args.init_from_pretrained)["guidance_scale"]
    if args.model_config_path is not None:
        return 1.0
    variant = released_variant(args.alignment, args.model)
    return 1.0 if variant is None else variant["guidance_scale"]


def build_lr_scheduler(name, optimizer, warmup_steps, total_steps, num_processes, start_step):
    """The lr schedule, already `start_step` optimizer steps along; it steps once per process per optimizer step."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes, last_epoch=start_step * num_processes - 1,
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


def validation_grid(transformer, args, class_ids, guidance_scale):
    """A PIL grid of samples of the first EMA: one row per class, a fixed seed."""
    pipeline = PixelREPAPipeline(
        transformer=transformer, scheduler=JiTFlowMatchScheduler(t_eps=args.t_eps, noise_scale=args.noise_scale)
    )
    pipeline.set_progress_bar_config(disable=True)
    labels = [class_id for class_id in class_ids for _ in range(args.validation_images_per_class)]
    images = pipeline(
        labels, num_inference_steps=args.validation_num_inference_steps, guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images
    return make_image_grid(images, rows=len(class_ids), cols=args.validation_images_per_class)


def log_validation(accelerator, grid, step, path):
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(grid, caption=f"step {step}")}, step=step)
    logger.info(f"Saved validation grid {path}")


def save_final_outputs(args, plan, ema_transformer, aligner, alignment_depth, id2label, dataset_description,
                       global_step):
    """The first EMA as a PixelREPAPipeline in output_dir (plus the aligner, if the method exports it) and its card."""
    method = ALIGNMENTS[args.alignment]
    pipeline = PixelREPAPipeline(
        transformer=ema_transformer,
        scheduler=JiTFlowMatchScheduler(t_eps=args.t_eps, noise_scale=args.noise_scale),
        id2label=id2label,
        guidance_scale=plan.guidance_scale,
        guidance_interval=GUIDANCE_INTERVAL,
    )
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    grid = None
    if args.sample_grid is not None:
        grid = write_sample_grid(pipeline, args.output_dir, args.sample_grid, seeds=[0, 1])
    if method.exports_aligner:
        aligner.save_pretrained(os.path.join(args.output_dir, method.folder), safe_serialization=True)
    training = training_recipe(
        data=f"{dataset_description}, ADM center crop to {args.resolution} px"
             + (", random horizontal flip" if args.random_flip else ""),
        steps=f"{global_step} (global batch {plan.global_batch_size})",
        optimizer=f"AdamW, betas ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.adam_weight_decay}",
        learning_rate=f"{plan.learning_rate:g} ({plan.learning_rate_origin}), {args.lr_scheduler} with "
                      f"{plan.lr_warmup_steps} warm-up steps",
        p_mean=args.p_mean,
        p_std=args.p_std,
        t_eps=args.t_eps,
        noise_scale=args.noise_scale,
        label_dropout=f"{args.label_dropout}",
        ema=f"{args.ema_decays[0]} (these weights)" + "".join(f", {decay}" for decay in args.ema_decays[1:]),
        precision=args.mixed_precision,
        alignment=alignment_card_text(args.alignment, alignment_depth, args.mask_ratio, args.encoder,
                                      plan.alignment_weight),
    )
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    card = render_model_card(
        CardSettings(
            model_name=repo_id.split("/")[-1],
            repo_id=repo_id,
            method=CARD_METHODS[args.alignment],
            architecture=dict(ema_transformer.config),
            training=training,
            weights_source=(f"Trained with pixelrepa-diffusers' training/train_pixelrepa.py for {global_step} steps; "
                            f"the weights are the EMA with decay {args.ema_decays[0]}."),
            guidance_scale=plan.guidance_scale,
            noise_scale=args.noise_scale,
            dataset=hub_dataset_id(args),
        ),
        sample_grid=grid,
    )
    card.save(os.path.join(args.output_dir, "README.md"))
    if args.push_to_hub:
        url = push_pipeline_to_hub(args.output_dir, args.hub_model_id, card)
        logger.info(f"Pushed the pipeline to {url}")


def compile_blocks(transformer, method, aligner, encoder, mode="default"):
    """Compiles every repeated block, each whole (fullgraph) and for static shapes, as the official code compiles
    its JiT blocks: the backbone's, the aligner's where it has blocks, and the frozen encoder's layers."""
    compile_kwargs = dict(mode=mode, dynamic=False, fullgraph=True)
    transformer.compile_repeated_blocks(**compile_kwargs)
    method.compile(aligner, **compile_kwargs)
    if encoder is not None:
        for layer in encoder.model.encoder.layer:
            layer.compile(**compile_kwargs)


def training_step(accelerator, objective, encoder, optimizer, lr_scheduler, emas, images, class_labels, weight=1.0):
    """One batch: forward and backward under autocast; at the end of an accumulation cycle, the optimizer and lr
    steps and the EMA updates. Returns the loss terms (device tensors: no host sync)."""
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
    if accelerator.sync_gradients:
        transformer = accelerator.unwrap_model(objective).transformer
        for ema in emas:
            ema.update(transformer)
    return losses


def hub_dataset_id(args):
    """The Hub id of the training data for the card's metadata; None for local data."""
    if args.dataset_name is None or os.path.exists(args.dataset_name):
        return None
    return args.dataset_name


def tracker_config(args, plan):
    """The run's flags and plan as tracker hyperparameters (scalars; lists and None as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in {**vars(args), **asdict(plan)}.items()}


def train(args):
    # Setup accelerator
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
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
    check_shared_folder(accelerator, args.output_dir, "--output_dir")
    checkpoint = resolve_checkpoint(args)
    checkpointer = TrainingCheckpointer(accelerator, checkpoint, args.alignment, args.ema_decays)

    # Data: each node's main process builds the datasets cache; the node's other processes then read it
    with accelerator.local_main_process_first():
        dataset = load_train_dataset(
            train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name, image_column=args.image_column,
            label_column=args.label_column, resolution=args.resolution, random_flip=args.random_flip,
            cache_dir=args.cache_dir, seed=args.seed,
        )
    num_classes = len(dataset.class_names)
    plan = plan_training(args, len(dataset), num_classes, accelerator.num_processes)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_train_batch,
        num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed),
    )

    # Create model: the transformer, the method's aligner and the frozen alignment encoder
    set_seed(args.seed)
    method = ALIGNMENTS[args.alignment]
    transformer = build_transformer(args, num_classes)
    encoder, aligner = None, None
    if method.aligner_class is not None:
        encoder = load_alignment_encoder(args.encoder, resolution=args.encoder_resolution,
                                         patch_size=args.encoder_patch_size, cache_dir=args.cache_dir)
        if encoder.num_tokens != transformer.num_patches:
            raise ValueError(f"--encoder gives {encoder.num_tokens} tokens at --encoder_resolution "
                             f"{args.encoder_resolution} / --encoder_patch_size {args.encoder_patch_size}, but the "
                             f"model has {transformer.num_patches} patches; they must match one to one")
        aligner = method.build_aligner(transformer.config, encoder.hidden_size, args.projector_dim,
                                       args.init_from_pretrained)
    if not method.masks_tokens:
        transformer.mask_token.requires_grad_(False)  # used only by an aligner of masked tokens
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        method.enable_gradient_checkpointing(aligner)
    compiled = accelerator.device.type == "cuda" if args.compile is None else args.compile
    if compiled:
        compile_blocks(transformer, method, aligner, encoder)
    objective = JiTTrainingObjective(
        transformer, alignment=args.alignment, aligner=aligner,
        alignment_weight=plan.alignment_weight, mask_ratio=args.mask_ratio, repa_depth=args.repa_depth,
        label_dropout=args.label_dropout, p_mean=args.p_mean, p_std=args.p_std, t_eps=args.t_eps,
        noise_scale=args.noise_scale,
    )

    # Optimizer and schedule; an official run continues at the step its finished epochs count, the schedule that far
    optimizer = torch.optim.AdamW(
        optimizer_parameter_groups(objective, args.adam_weight_decay), lr=plan.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True,
    )
    lr_scheduler = build_lr_scheduler(args.lr_scheduler, optimizer, plan.lr_warmup_steps, plan.max_train_steps,
                                      accelerator.num_processes, checkpointer.schedule_start(plan.steps_per_epoch))
    objective, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        objective, optimizer, train_dataloader, lr_scheduler
    )
    trained = accelerator.unwrap_model(objective)  # under FSDP2, the same module with sharded parameters
    transformer = trained.transformer
    if encoder is not None:
        encoder.to(accelerator.device)  # frozen and outside the trained module: never sharded nor saved
    emas = [ExponentialMovingAverage(transformer, decay) for decay in args.ema_decays]

    # Resume: a checkpoint of this script, a converted official run, or a fresh start
    set_seed(args.seed, device_specific=True)  # each process draws its own noise; a resume restores the RNGs
    global_step = checkpointer.start(trained, emas, optimizer, plan.steps_per_epoch)
    if checkpoint is None and args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run")
    first_epoch = global_step // plan.steps_per_epoch
    batches_to_skip = (global_step % plan.steps_per_epoch) * args.gradient_accumulation_steps

    accelerator.init_trackers("train_pixelrepa", config=tracker_config(args, plan))
    logger.info(f"{len(dataset)} images of {num_classes} classes; {plan.max_train_steps} steps of "
                f"{plan.global_batch_size} images ({plan.num_train_epochs} epochs), lr {plan.learning_rate:g} "
                f"({plan.learning_rate_origin}), alignment {args.alignment}, "
                f"{'compiled blocks' if compiled else 'eager'}")
    validation_dir = os.path.join(args.output_dir, "validation")
    meter = LossMeter(accelerator, checkpointer.skipped_images)
    last_log = (time.perf_counter(), global_step)
    last_checkpoint = checkpoint

    # Training loop
    with tqdm(total=plan.max_train_steps, initial=global_step, desc="Steps",
              disable=not accelerator.is_local_main_process) as progress_bar:
        objective.train()
        for epoch in range(first_epoch, plan.num_train_epochs):
            if global_step >= plan.max_train_steps:
                break
            train_dataloader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            epoch_loader = train_dataloader
            if epoch == first_epoch and batches_to_skip:
                epoch_loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
            for batch in epoch_loader:
                meter.skip(batch["num_skipped"])
                images = batch["pixel_values"].to(torch.float32).div(255) * 2 - 1
                class_labels = batch["class_labels"]
                weight = 1.0
                if images.shape[0] == 0:  # all images unreadable: a zero-weight step keeps the processes in step
                    images = torch.zeros(1, 3, args.resolution, args.resolution, device=accelerator.device)
                    class_labels = torch.zeros(1, dtype=torch.long, device=accelerator.device)
                    weight = 0.0
                losses = training_step(accelerator, objective, encoder, optimizer, lr_scheduler, emas, images,
                                       class_labels, weight)
                if weight:
                    meter.add(losses, global_step + 1)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress_bar.update(1)

                if global_step % args.logging_steps == 0:
                    meter.check_finite(last_checkpoint)
                    now = time.perf_counter()
                    images_per_second = (global_step - last_log[1]) * plan.global_batch_size / (now - last_log[0])
                    logs = {**meter.means(), "lr": lr_scheduler.get_last_lr()[0],
                            "images_per_second": images_per_second, "skipped_images": meter.skipped()}
                    accelerator.log(logs, step=global_step)
                    progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", jit=f"{logs['loss_jit']:.4f}",
                                             align=f"{logs['loss_alignment']:.4f}", lr=f"{logs['lr']:.2e}")
                    last_log = (now, global_step)

                if global_step % args.checkpointing_steps == 0 or global_step == plan.max_train_steps:
                    meter.check_finite(last_checkpoint)
                    last_checkpoint = checkpointer.save(args.output_dir, global_step, meter.skipped(),
                                                        args.checkpoints_total_limit)
                    logger.info(f"Saved {last_checkpoint}")

                if global_step % args.validation_steps == 0:
                    ema_state = emas[0].gathered_state_dict(keep=accelerator.is_main_process)
                    if accelerator.is_main_process:
                        os.makedirs(validation_dir, exist_ok=True)
                        ema_transformer = unsharded_copy(JiTTransformer2DModel, transformer.config,
                                                         ema_state).to(accelerator.device)
                        grid = validation_grid(ema_transformer, args, plan.validation_classes, plan.guidance_scale)
                        log_validation(accelerator, grid, global_step,
                                       os.path.join(validation_dir, f"step-{global_step:07d}.png"))

                if global_step >= plan.max_train_steps:
                    break

    # Save the pipeline: the first EMA, and the aligner where the method exports it
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(objective)  # full tensors; collectives under FSDP, as is the EMA's
    ema_state = emas[0].gathered_state_dict(keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        if checkpointer.skipped_images:
            logger.info(f"Skipped {checkpointer.skipped_images} unreadable images in total")
        source = args.dataset_name or os.path.basename(os.path.normpath(args.train_data_dir))
        ema_transformer = unsharded_copy(JiTTransformer2DModel, transformer.config, ema_state)
        exported = None
        if method.exports_aligner:
            exported = unsharded_copy(method.aligner_class, trained.aligner.config, submodule_state(state, "aligner."))
        save_final_outputs(args, plan, ema_transformer, exported, trained.alignment_depth,
                           dict(enumerate(dataset.class_names)), source, global_step)
        logger.info(f"Saved the PixelREPAPipeline (EMA {args.ema_decays[0]}) to {args.output_dir}")
    accelerator.end_training()


def main(argv=None) -> int:
    return run_command(lambda: train(parse_args(argv)), errors=(ValueError, OSError, NonFiniteLossError),
                       prog="train_pixelrepa.py")


if __name__ == "__main__":
    sys.exit(main())

"""FID and Inception Score of class-conditional pipelines, measured as the JiT and PixelREPA papers report them.

Images go straight from the pipeline into torch-fidelity's Inception-v3 as uint8 tensors; FID compares the 2048-d
pool features with reference statistics (an npz with `mu` and `sigma`, like the official
fid_stats/jit_in256_stats.npz) and IS uses the unbiased logits with 10 splits, both through torch-fidelity's own
metric functions. Each process of an `accelerate launch` generates its share of fixed image-index shards and
saves their features to safetensors files, so a re-run reuses every finished shard.
"""

import functools
import hashlib
import json
import os
import pickle
import urllib.error

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.hub import download_url_to_file
from torch.utils.data import DataLoader
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS, center_crop_arr, check_resolution
from .pipeline_pixelrepa import check_precision

INCEPTION_FEATURES = ["2048", "logits_unbiased"]
FEATURE_DIM = 2048


def resolve_inception_weights(path: str | None = None) -> str:
    """Local path of torch-fidelity's Inception-v3 weights: `path` if given, else the torch hub cache copy,
    downloaded there first if absent."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"inception_weights: no such file {path!r}.")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            download_url_to_file(URL_INCEPTION_V3, cached)
        except urllib.error.URLError as error:
            raise FileNotFoundError(
                f"Inception-v3 weights are not at {cached} and could not be downloaded from {URL_INCEPTION_V3} "
                f"({error.reason}); download that file on a connected machine and pass its path as inception_weights."
            ) from error
    return cached


def load_inception(weights_path: str | None = None, device: str | torch.device = "cpu") -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3; called on uint8 (B, 3, H, W) it returns (pool features (B, 2048), unbiased
    logits (B, 1008))."""
    path = resolve_inception_weights(weights_path)
    # torch-fidelity unpickles the file with weights_only=False; a weights_only load first refuses code objects.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"inception_weights {path!r} is not a plain state dict; refusing to load it ({first_line})") from None
    inception = FeatureExtractorInceptionV3(
        "inception-v3-compat", INCEPTION_FEATURES, feature_extractor_weights_path=path
    )
    return inception.to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8, rounding to nearest like the official PNG export."""
    return images.mul(255).round().clamp(0, 255).to(torch.uint8)


def load_fid_statistics(path: str) -> dict[str, np.ndarray]:
    """Reference statistics {"mu": (2048,), "sigma": (2048, 2048)} from an npz file."""
    statistics = np.load(path)
    if not isinstance(statistics, np.lib.npyio.NpzFile):
        raise ValueError(f"fid_statistics_file {path!r} is not an npz archive with arrays 'mu' and 'sigma'.")
    with statistics:
        missing = sorted({"mu", "sigma"} - set(statistics.files))
        if missing:
            raise ValueError(
                f"fid_statistics_file {path!r} lacks {missing}; it has {sorted(statistics.files)}, "
                "expected 'mu' and 'sigma'."
            )
        mu, sigma = statistics["mu"], statistics["sigma"]
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(
            f"fid_statistics_file {path!r} has mu {mu.shape} and sigma {sigma.shape}; expected ({FEATURE_DIM},) "
            f"and ({FEATURE_DIM}, {FEATURE_DIM}), the Inception-v3 pool features."
        )
    return {"mu": mu, "sigma": sigma}


def save_fid_statistics(path: str, statistics: dict[str, np.ndarray]) -> None:
    """Writes statistics as an npz with arrays `mu` and `sigma`."""
    np.savez(path, mu=statistics["mu"], sigma=statistics["sigma"])


def frechet_inception_distance(features: torch.Tensor, reference: dict[str, np.ndarray]) -> float:
    """FID between Inception pool features (N, 2048) and reference statistics, by torch-fidelity."""
    statistics = fid_features_to_statistics(features.cpu())
    as_float64 = [{key: stats[key].astype(np.float64) for key in ("mu", "sigma")} for stats in (statistics, reference)]
    return fid_statistics_to_metric(*as_float64, verbose=False)[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the Inception Score over `splits` splits of unbiased logits, by
    torch-fidelity (same shuffle seed as `calculate_metrics`)."""
    metrics = isc_features_to_metric(logits.cpu(), splits=splits)
    return metrics[KEY_METRIC_ISC_MEAN], metrics[KEY_METRIC_ISC_STD]


def evaluation_class_labels(num_images: int, num_classes: int, class_balanced: bool = True, seed: int = 0):
    """Class label of each image index: num_images / num_classes of each class in class order if class_balanced,
    else uniform draws seeded by `seed`."""
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 to estimate a covariance, got {num_images}.")
    if not class_balanced:
        return torch.randint(num_classes, (num_images,), generator=torch.Generator().manual_seed(seed))
    if num_images % num_classes != 0:
        raise ValueError(
            f"num_images must be a multiple of the {num_classes} classes for a class-balanced evaluation, "
            f"got {num_images}."
        )
    return torch.arange(num_classes).repeat_interleave(num_images // num_classes)


def image_folder_dataset(folder: str) -> datasets.Dataset:
    """A dataset with an "image" column of every image file under `folder` (recursive, in sorted path order)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image_folder {folder!r} is not a directory.")
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    return datasets.Dataset.from_dict({"image": paths}, features=datasets.Features({"image": datasets.Image()}))


def crop_batch(batch: dict, image_column: str, resolution: int) -> dict:
    """{"pixels": uint8 (3, resolution, resolution) tensors} of a batch of PIL images after the ADM center crop."""
    images = [center_crop_arr(image.convert("RGB"), resolution) for image in batch[image_column]]
    return {"pixels": [pil_to_tensor(image) for image in images]}


@torch.no_grad()
def dataset_statistics(
    dataset,
    inception: FeatureExtractorInceptionV3,
    image_column: str = "image",
    resolution: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """FID statistics of a `datasets.Dataset` of images after the ADM center crop to `resolution`."""
    check_resolution(resolution)
    if image_column not in dataset.column_names:
        raise ValueError(f"image_column {image_column!r} is not a column of the dataset: {dataset.column_names}.")
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(f"image_column {image_column!r} holds {dataset.features[image_column]}, expected images.")
    if len(dataset) < 2:
        raise ValueError(f"the dataset needs at least 2 images to estimate a covariance, got {len(dataset)}.")

    crop = functools.partial(crop_batch, image_column=image_column, resolution=resolution)
    loader = DataLoader(dataset.with_transform(crop), batch_size=batch_size, num_workers=num_workers)
    device = inception.fc.weight.device
    features = []
    for batch in tqdm(loader, desc="Inception features", unit="batch"):
        pool_features, _ = inception(batch["pixels"].to(device))
        features.append(pool_features.cpu())
    return fid_features_to_statistics(torch.cat(features))


def sampling_settings(pipeline, guidance_scale, guidance_interval, **settings) -> dict:
    """Every setting that determines the evaluated images, with the pipeline's defaults filled in."""
    config = pipeline.config
    return {
        "model": pipeline.name_or_path,
        "guidance_scale": config.guidance_scale if guidance_scale is None else guidance_scale,
        "guidance_interval": list(config.guidance_interval if guidance_interval is None else guidance_interval),
        "scheduler": {key: value for key, value in pipeline.scheduler.config.items() if not key.startswith("_")},
        "transformer_dtype": str(pipeline.transformer.dtype),
        **settings,
    }


@torch.no_grad()
def generate_shard(pipeline, inception, labels, start, end, settings, batch_size, save_dir, progress_bar):
    """Generates images start..end-1 (image i from noise seeded with seed + i) and returns their Inception
    features, logits and class labels."""
    features, logits = [], []
    for batch in torch.arange(start, end).split(batch_size):
        generators = [torch.Generator().manual_seed(settings["seed"] + index) for index in batch.tolist()]
        images = pipeline(
            labels[batch],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            guidance_interval=settings["guidance_interval"],
            generator=generators,
            output_type="pt",
            precision=settings["precision"],
        ).images
        images = to_uint8(images)
        if save_dir is not None:
            for index, image in zip(batch.tolist(), images.permute(0, 2, 3, 1).cpu().numpy()):
                Image.fromarray(image).save(os.path.join(save_dir, f"{index:06d}.png"))
        batch_features, batch_logits = inception(images)
        features.append(batch_features.cpu())
        logits.append(batch_logits.cpu())
        progress_bar.update(len(batch))
    return {"features": torch.cat(features), "logits": torch.cat(logits), "class_labels": labels[start:end].clone()}


def evaluate_pipeline(
    pipeline,
    inception: FeatureExtractorInceptionV3,
    reference_statistics: dict[str, np.ndarray],
    accelerator: Accelerator,
    shard_dir: str,
    num_images: int = 50_000,
    guidance_scales: list[float | None] = (None,),
    guidance_interval: tuple[float, float] | None = None,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    images_per_shard: int = 500,
    class_balanced: bool = True,
    seed: int = 0,
    isc_splits: int = 10,
    save_images: str | None = None,
    precision: str = "official",
) -> list[dict] | None:
    """
    FID and IS of `num_images` samples for each guidance scale (None: the pipeline's default), sampled in the
    regime `precision` (one of `PRECISIONS`; "official", the papers' bf16 autocast with fp32 attention logits, by
    default).

    Image indices are cut into shards of `images_per_shard`, saved as
    `shard_dir/guidance_<scale>-<settings hash>/shard-<start>-<end>.safetensors`. Shards already there are reused,
    so a crashed run resumes where it stopped, with any number of processes; process r of an accelerate run
    generates unfinished shards r, r + world_size, ... and the main process merges all shards.
    `save_images` also writes each generated image as `<save_images>/guidance_<scale>/<index>.png`.

    Returns, on the main process, one dict per guidance scale with its settings, `fid`, `inception_score_mean`,
    `inception_score_std` and the number of `reused_shards`; None on the other processes.
    """
    check_precision(precision, pipeline.transformer.dtype)
    labels = evaluation_class_labels(num_images, pipeline.transformer.config.num_classes, class_balanced, seed)
    if num_images < isc_splits:
        raise ValueError(f"num_images must be at least isc_splits ({isc_splits}), got {num_images}.")
    if batch_size < 1 or images_per_shard < 1:
        raise ValueError(f"batch_size and images_per_shard must be >= 1, got {batch_size} and {images_per_shard}.")
    bounds = [(start, min(start + images_per_shard, num_images)) for start in range(0, num_images, images_per_shard)]
    pipeline.set_progress_bar_config(disable=True)

    results = []
    for guidance_scale in guidance_scales:
        settings = sampling_settings(
            pipeline, guidance_scale, guidance_interval, num_images=num_images,
            num_inference_steps=num_inference_steps, class_balanced=class_balanced, seed=seed, precision=precision,
        )
        name = f"guidance_{settings['guidance_scale']:g}"
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        run_dir = os.path.join(shard_dir, f"{name}-{digest}")
        save_dir = None if save_images is None else os.path.join(save_images, name)
        for directory in (run_dir, save_dir):
            if directory is not None:
                os.makedirs(directory, exist_ok=True)
        if accelerator.is_main_process:
            with open(os.path.join(run_dir, "settings.json"), "w") as file:
                json.dump(settings, file, indent=2)

        paths = [os.path.join(run_dir, f"shard-{start:06d}-{end:06d}.safetensors") for start, end in bounds]
        finished = [os.path.exists(path) for path in paths]
        unfinished = [shard for shard in range(len(paths)) if not finished[shard]]
        pending = unfinished[accelerator.process_index :: accelerator.num_processes]
        accelerator.wait_for_everyone()
        progress_bar = tqdm(
            total=sum(bounds[shard][1] - bounds[shard][0] for shard in pending), unit="image", desc=name,
            disable=not accelerator.is_main_process,
        )
        for shard in pending:
            tensors = generate_shard(
                pipeline, inception, labels, *bounds[shard], settings, batch_size, save_dir, progress_bar
            )
            save_file(tensors, paths[shard] + ".tmp", metadata={"process_index": str(accelerator.process_index)})
            os.replace(paths[shard] + ".tmp", paths[shard])
        progress_bar.close()
        accelerator.wait_for_everyone()

        if accelerator.is_main_process:
            shards = [load_file(path) for path in paths]
            is_mean, is_std = inception_score(torch.cat([shard["logits"] for shard in shards]), isc_splits)
            fid = frechet_inception_distance(torch.cat([shard["features"] for shard in shards]), reference_statistics)
            results.append(
                {
                    **settings,
                    "fid": fid,
                    "inception_score_mean": is_mean,
                    "inception_score_std": is_std,
                    "reused_shards": sum(finished),
                    "shard_dir": run_dir,
                }
            )
    return results if accelerator.is_main_process else None

"""FID and Inception Score of class-conditional pipelines, measured as the JiT and PixelREPA papers report them.

Images go straight from the pipeline into torch-fidelity's Inception-v3 as uint8 tensors; FID compares the 2048-d
pool features with reference statistics (an npz with `mu` and `sigma`, like the official
fid_stats/jit_in256_stats.npz) and IS uses the unbiased logits with 10 splits, both through torch-fidelity's own
metric functions. Each process of an `accelerate launch` generates its share of fixed image-index shards and
saves their features to safetensors files, so a re-run reuses every finished shard.
"""

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import urllib.error
import zipfile
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch.hub import download_url_to_file
from torch.utils.data import DataLoader
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm
from transformers import Dinov2Model

from .data import IMAGE_EXTENSIONS, center_crop_arr, check_resolution
from .distributed import check_shared_folder
from .pipeline_pixelrepa import check_precision
from .serialization import pickled_code_refusal
from .training_utils import write_atomically

INCEPTION_FEATURES = ["2048", "logits_unbiased"]
FEATURE_DIM = 2048
DINOV2_MODEL = "facebook/dinov2-large"


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
        raise pickled_code_refusal(f"inception_weights {path!r}", error) from None
    inception = FeatureExtractorInceptionV3(
        "inception-v3-compat", INCEPTION_FEATURES, feature_extractor_weights_path=path
    )
    return inception.to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8, rounding to nearest like the official PNG export."""
    return images.mul(255).round().clamp(0, 255).to(torch.uint8)


METRICS = ("fid", "is", "precision", "recall", "sfid", "kid", "fd_dinov2")
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
# Reference arrays each metric needs; "features" can also come from an ADM reference batch's images, arr_0.
REFERENCE_ARRAYS = {
    "fid": ("mu", "sigma"),
    "is": (),
    "precision": ("features",),
    "recall": ("features",),
    "kid": ("features",),
    "sfid": ("mu_s", "sigma_s"),
    "fd_dinov2": ("mu_dinov2", "sigma_dinov2"),
}


def check_metrics(metrics) -> None:
    """Raises ValueError unless every name in `metrics` is one of METRICS."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics: unknown {unknown or 'empty list'}; choose from {', '.join(METRICS)}.")


def feature_sets(metrics) -> list[str]:
    """Names of the per-image feature sets that `metrics` need: Inception `features` and `logits` always,
    ADM's `spatial` features for sfid, DINOv2 class tokens `dinov2` for fd_dinov2."""
    return ["features", "logits"] + ["spatial"] * ("sfid" in metrics) + ["dinov2"] * ("fd_dinov2" in metrics)


def load_reference(path: str, metrics=("fid",), resolution: int | None = None, dinov2_dim: int | None = None):
    """The reference arrays that `metrics` need, from our npz (pipelines/compute_reference_stats.py) or an ADM
    reference batch such as VIRTUAL_imagenet256_labeled.npz (arr_0, mu, sigma, mu_s, sigma_s).

    Returns a dict of mu/sigma, features, mu_s/sigma_s and mu_dinov2/sigma_dinov2 as needed, plus `images_file`
    (this path) when features must be computed from an ADM batch's arr_0, which only evaluate_pipeline's main
    process then loads. `resolution`, if given, must be the one the reference was built at (its `resolution`
    array or the size of arr_0); `dinov2_dim` is the width of the DINOv2 in use.
    """
    check_metrics(metrics)
    archive = np.load(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"fid_statistics_file {path!r} is not an npz archive with arrays 'mu' and 'sigma'.")
    with archive:
        files = set(archive.files)
        for metric in metrics:
            missing = [
                name for name in REFERENCE_ARRAYS[metric]
                if name not in files and not (name == "features" and "arr_0" in files)
            ]
            if missing:
                images = " (or ADM's images arr_0)" if missing == ["features"] else ""
                raise ValueError(
                    f"fid_statistics_file {path!r} lacks {missing}{images}, which {metric} needs; "
                    f"it has {sorted(files)}."
                )
        needed = {name for metric in metrics for name in REFERENCE_ARRAYS[metric]}
        reference = {name: archive[name] for name in sorted(needed & files)}
        built_at = int(archive["resolution"]) if "resolution" in files else None
    if "arr_0" in files:
        shape, dtype = npz_array_header(path, "arr_0")
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise ValueError(f"fid_statistics_file {path!r} has arr_0 {shape} {dtype}; expected uint8 (N, H, W, 3) "
                             "images.")
        built_at = shape[1]
        if "features" in needed and "features" not in files:
            reference["images_file"] = path
    if resolution is not None and built_at is not None and built_at != resolution:
        raise ValueError(
            f"fid_statistics_file {path!r} was built at {built_at} px; the pipeline samples at {resolution} px."
        )
    check_shapes(path, reference, "mu", "sigma", FEATURE_DIM, "the Inception-v3 pool features")
    check_shapes(path, reference, "mu_s", "sigma_s", SPATIAL_DIM,
                 "ADM's spatial features (first 7 channels of Inception's mixed_6/conv, 17 x 17)")
    check_shapes(path, reference, "mu_dinov2", "sigma_dinov2", dinov2_dim, "the DINOv2 class token in use")
    if "features" in reference and (reference["features"].ndim != 2 or reference["features"].shape[1] != FEATURE_DIM):
        raise ValueError(
            f"fid_statistics_file {path!r} has features {reference['features'].shape}; expected (N, {FEATURE_DIM}), "
            "the Inception-v3 pool features (another feature layer?)."
        )
    return reference


def npz_array_header(path: str, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of array `name` of an npz, read from its header without loading the array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(file)
    return shape, dtype


def check_shapes(path, reference, mean, covariance, dim, what) -> None:
    """Raises ValueError unless reference[mean] is (dim,) and reference[covariance] (dim, dim), when present."""
    if mean not in reference:
        return
    mu, sigma = reference[mean], reference[covariance]
    if dim is None:
        dim = mu.shape[0]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"fid_statistics_file {path!r} has {mean} {mu.shape} and {covariance} {sigma.shape}; expected ({dim},) "
            f"and ({dim}, {dim}), {what}."
        )


def save_reference(path: str, reference: dict[str, np.ndarray]) -> None:
    """Writes reference arrays (mu, sigma, resolution and any of features, mu_s, sigma_s, mu_dinov2, sigma_dinov2)
    as an npz."""
    np.savez(path, **reference)


def frechet_distance(features: torch.Tensor, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Fréchet distance between the Gaussian of features (N, D) and reference statistics, by torch-fidelity."""
    statistics = fid_features_to_statistics(features.cpu())
    reference = {"mu": mu, "sigma": sigma}
    as_float64 = [{key: stats[key].astype(np.float64) for key in ("mu", "sigma")} for stats in (statistics, reference)]
    return fid_statistics_to_metric(*as_float64, verbose=False)[KEY_METRIC_FID]


def frechet_inception_distance(features: torch.Tensor, reference: dict[str, np.ndarray]) -> float:
    """FID between Inception pool features (N, 2048) and reference statistics, by torch-fidelity."""
    return frechet_distance(features, reference["mu"], reference["sigma"])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation of the Inception Score over `splits` splits of unbiased logits, by
    torch-fidelity (same shuffle seed as `calculate_metrics`)."""
    metrics = isc_features_to_metric(logits.cpu(), splits=splits)
    return metrics[KEY_METRIC_ISC_MEAN], metrics[KEY_METRIC_ISC_STD]


class DinoV2ClassToken(torch.nn.Module):
    """A transformers DINOv2 returning its final-norm class token, as facebookresearch/dinov2's forward does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).pooler_output


class DinoV2FeatureExtractor(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 feature extractor (its resize to 224, normalisation and forward) around a
    transformers DINOv2, which loads from a local folder on offline machines."""

    def __init__(self, model):
        FeatureExtractorBase.__init__(self, "dinov2", ["dinov2"])
        self.feature_extractor_internal_dtype = torch.float32
        self.model = DinoV2ClassToken(model)
        self.requires_grad_(False)
        self.eval()


def load_dinov2(pretrained_model_name_or_path: str = DINOV2_MODEL, device: str | torch.device = "cpu"):
    """DINOv2 (a Hub id or a local folder of a transformers Dinov2Model) as torch-fidelity's DINOv2 feature
    extractor; called on uint8 (B, 3, H, W) it returns a 1-tuple of class tokens (B, hidden_size)."""
    model = Dinov2Model.from_pretrained(pretrained_model_name_or_path)
    return DinoV2FeatureExtractor(model).to(device)


@torch.no_grad()
def image_features(images: torch.Tensor, inception, sets=("features", "logits"), dinov2=None) -> dict:
    """Features of uint8 images (B, 3, H, W) on CPU: Inception pool `features` (B, 2048) and unbiased `logits`,
    plus ADM's `spatial` features (B, 2023: the first 7 channels of Inception's mixed_6/conv, i.e. Mixed_6d's
    1x1 branch, flattened in TensorFlow's height, width, channel order) and DINOv2 class tokens `dinov2` if in
    `sets`."""
    captured = {}

    def keep_spatial(module, inputs, output):
        captured["spatial"] = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    hook = inception.Mixed_6d.branch1x1.register_forward_hook(keep_spatial) if "spatial" in sets else None
    features, logits = inception(images)
    if hook is not None:
        hook.remove()
    result = {"features": features.cpu(), "logits": logits.cpu(), **{k: v.cpu() for k, v in captured.items()}}
    if "dinov2" in sets:
        (result["dinov2"],) = dinov2(images)
        result["dinov2"] = result["dinov2"].cpu()
    return result


@torch.no_grad()
def tensor_features(images: torch.Tensor, inception, batch_size: int = 64) -> torch.Tensor:
    """Inception pool features (N, 2048) of uint8 images (N, 3, H, W)."""
    device = inception.fc.weight.device
    return torch.cat([image_features(batch.to(device), inception)["features"] for batch in images.split(batch_size)])


def compute_metrics(metrics, features: dict, reference: dict, isc_splits=10, kid_subset_size=1000) -> dict:
    """Each of `metrics` from the generated images' feature sets and the reference arrays (load_reference, with
    `features` filled in for an ADM batch): fid, inception_score_mean/std, precision, recall (k = 3, ADM's and
    torch-fidelity's), kid_mean/std (torch-fidelity's defaults, subsets of kid_subset_size), sfid, fd_dinov2."""
    results = {}
    if "fid" in metrics:
        results["fid"] = frechet_inception_distance(features["features"], reference)
    if "is" in metrics:
        results["inception_score_mean"], results["inception_score_std"] = inception_score(features["logits"],
                                                                                          isc_splits)
    if "precision" in metrics or "recall" in metrics:
        real = torch.from_numpy(np.asarray(reference["features"], dtype=np.float32))
        prc = prc_features_to_metric(features["features"], real, prc_neighborhood=3, prc_batch_size=10000,
                                     save_cpu_ram=True, verbose=False)
        results.update({f"improved_{key}": prc[key] for key in ("precision", "recall") if key in metrics})
    if "kid" in metrics:
        real = torch.from_numpy(np.asarray(reference["features"], dtype=np.float32))
        kid = kid_features_to_metric(features["features"], real, kid_subset_size=kid_subset_size, verbose=False)
        results["kid_mean"], results["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
    if "sfid" in metrics:
        results["sfid"] = frechet_distance(features["spatial"], reference["mu_s"], reference["sigma_s"])
    if "fd_dinov2" in metrics:
        results["fd_dinov2"] = frechet_distance(features["dinov2"], reference["mu_dinov2"], reference["sigma_dinov2"])
    return results


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
def dataset_reference(
    dataset,
    inception: FeatureExtractorInceptionV3,
    accelerator: Accelerator,
    shard_dir: str,
    metrics=("fid",),
    dinov2=None,
    image_column: str = "image",
    resolution: int = 256,
    batch_size: int = 64,
    num_workers: int = 0,
    num_features: int = 10_000,
    seed: int = 0,
    shard_size: int = 10_000,
) -> dict[str, np.ndarray] | None:
    """
    Reference arrays of a `datasets.Dataset` of images after the ADM center crop to `resolution`, for `metrics`:
    FID statistics mu/sigma and the resolution always; pool `features` of `num_features` images drawn with `seed`
    (all if fewer) for precision, recall and KID; mu_s/sigma_s for sFID; mu_dinov2/sigma_dinov2 for FD-DINOv2.

    Image indices are cut into shards of `shard_size`, whatever the number of processes; process r of an accelerate
    run computes unfinished shards r, r + world_size, ... and saves each as `shard_dir/shard-<start>-<end>.safetensors`:
    per feature set its count, float64 sum and sum of outer products, plus the drawn images' pool features and
    indices, with the run's settings in the metadata. Shards already there are reused, so a rerun resumes with any
    number of processes; shards of other settings are refused. The main process sums the shards in order, so memory
    does not grow with the number of images.

    Returns the arrays on the main process, None on the others.
    """
    check_metrics(metrics)
    check_resolution(resolution)
    if image_column not in dataset.column_names:
        raise ValueError(f"image_column {image_column!r} is not a column of the dataset: {dataset.column_names}.")
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(f"image_column {image_column!r} holds {dataset.features[image_column]}, expected images.")
    if len(dataset) < 2:
        raise ValueError(f"the dataset needs at least 2 images to estimate a covariance, got {len(dataset)}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
    check_shared_folder(accelerator, shard_dir, "shard_dir")

    sets = [name for name in feature_sets(metrics) if name != "logits"]  # no reference metric reads logits
    # The seeded draw of images whose pool features precision, recall and KID compare with.
    keep, draw = torch.zeros(0, dtype=torch.long), None
    if {"precision", "recall", "kid"} & set(metrics):
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_features].sort().values
        draw = {"num_features": num_features, "seed": seed}
    settings = {
        "num_images": len(dataset), "shard_size": shard_size, "resolution": resolution, "feature_sets": sets,
        "features_draw": draw, "inception": weights_digest(inception),
        "dinov2": None if dinov2 is None else weights_digest(dinov2),
    }
    check_reference_shards(shard_dir, settings)
    bounds = [(start, min(start + shard_size, len(dataset))) for start in range(0, len(dataset), shard_size)]
    paths = [os.path.join(shard_dir, f"shard-{start:09d}-{end:09d}.safetensors") for start, end in bounds]
    unfinished = [shard for shard, path in enumerate(paths) if not os.path.exists(path)]
    pending = unfinished[accelerator.process_index :: accelerator.num_processes]
    accelerator.wait_for_everyone()

    crop = functools.partial(crop_batch, image_column=image_column, resolution=resolution)
    progress_bar = tqdm(total=sum(bounds[shard][1] - bounds[shard][0] for shard in pending), unit="img",
                        desc="reference features", disable=not accelerator.is_main_process)
    for shard in pending:
        start, end = bounds[shard]
        loader = DataLoader(dataset.select(range(start, end)).with_transform(crop), batch_size=batch_size,
                            num_workers=num_workers)
        metadata = {"settings": json.dumps(settings, sort_keys=True), "process_index": str(accelerator.process_index)}
        tensors = reference_shard(loader, start, inception, sets, dinov2, keep, accelerator.device, progress_bar)
        write_atomically(paths[shard], lambda file: file.write(save(tensors, metadata)))
    progress_bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None

    moments = {name: RunningMoments() for name in sets}
    kept = []
    for path in tqdm(paths, desc="summing shards", unit="shard"):
        tensors = load_file(path)
        for name in sets:
            moments[name].merge(int(tensors[f"{name}.count"]), tensors[f"{name}.sum"], tensors[f"{name}.outer"])
        kept.append(tensors["kept_features"].clone())  # its own memory: load_file's tensors share the file's map
    reference = {**moments["features"].statistics(), "resolution": np.array(resolution)}
    if draw is not None:
        reference["features"] = torch.cat(kept).numpy()
    for name, suffix in (("spatial", "_s"), ("dinov2", "_dinov2")):
        if name in moments:
            statistics = moments[name].statistics()
            reference[f"mu{suffix}"], reference[f"sigma{suffix}"] = statistics["mu"], statistics["sigma"]
    return reference


def reference_shard(loader, start, inception, sets, dinov2, keep, device, progress_bar) -> dict[str, torch.Tensor]:
    """What a shard file holds for the images of `loader`, the first of which is dataset image `start`: per feature
    set `<name>.count`, `<name>.sum` and `<name>.outer` (RunningMoments), and the pool features `kept_features` of
    its images whose index is in `keep`, with those indices as `kept_indices`."""
    moments = {name: RunningMoments() for name in sets}
    kept_features, kept_indices = [], []
    for batch in loader:
        features = image_features(batch["pixels"].to(device), inception, sets, dinov2)
        for name in sets:
            moments[name].add(features[name])
        end = start + len(batch["pixels"])
        indices = keep[(keep >= start) & (keep < end)]
        kept_features.append(features["features"][indices - start])
        kept_indices.append(indices)
        start = end
        progress_bar.update(len(batch["pixels"]))
    tensors = {"kept_features": torch.cat(kept_features), "kept_indices": torch.cat(kept_indices)}
    for name in sets:
        tensors.update(moments[name].tensors(name))
    return tensors


def check_reference_shards(shard_dir: str, settings: dict) -> None:
    """Raises ValueError if `shard_dir` holds a safetensors file that is not a reference shard made with
    `settings`."""
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(shard_dir, name), "pt") as file:
            metadata = file.metadata() or {}
        if "settings" not in metadata:
            raise ValueError(f"shard_dir {shard_dir} holds {name}, which is not a reference statistics shard; pass "
                             "another shard_dir.")
        theirs = json.loads(metadata["settings"])
        differing = [f"{key} {theirs.get(key)}, not {value}" for key, value in settings.items()
                     if theirs.get(key) != value]
        if differing:
            raise ValueError(f"shard_dir {shard_dir} holds {name} of another run ({'; '.join(differing)}); remove "
                             "its shards or pass another shard_dir.")


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class RunningMoments:
    """The mean and unbiased covariance of feature rows added batch by batch, in float64, in memory that does not
    grow with the number of rows (a sum and a sum of outer products), as `np.mean` and `np.cov` give them."""

    def __init__(self):
        self.count, self.sum, self.outer = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double().cpu()
        self.allocate(rows.shape[1])
        self.sum += rows.sum(0)
        self.outer.addmm_(rows.T, rows)
        self.count += len(rows)

    def merge(self, count: int, total: torch.Tensor, outer: torch.Tensor) -> None:
        """Adds the moments of other rows: their count, float64 sum and sum of outer products."""
        self.allocate(len(total))
        self.sum += total
        self.outer += outer
        self.count += count

    def allocate(self, dim: int) -> None:
        """Zero sums for rows of `dim` columns, unless there are sums already."""
        if self.sum is None:
            self.sum, self.outer = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{"<name>.count", "<name>.sum", "<name>.outer"}, as a shard file stores them."""
        return {f"{name}.count": torch.tensor(self.count), f"{name}.sum": self.sum, f"{name}.outer": self.outer}

    def statistics(self) -> dict[str, np.ndarray]:
        """{"mu", "sigma"} as float64 arrays."""
        mean = self.sum / self.count
        covariance = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return {"mu": mean.numpy(), "sigma": covariance.numpy()}


@dataclasses.dataclass
class EvaluationSettings:
    """
    What `evaluate_pipeline` measures and how it samples: `metrics` (any of METRICS) of `num_images` samples for each
    guidance interval and guidance scale (None: the pipeline's default), in the regime `precision` (one of
    PRECISIONS; "official", the papers' bf16 autocast with fp32 attention logits, by default).
    """

    num_images: int = 50_000
    guidance_scales: Sequence[float | None] = (None,)
    guidance_intervals: Sequence[tuple[float, float] | None] = (None,)
    num_inference_steps: int = 50
    batch_size: int = 64
    images_per_shard: int = 500
    class_balanced: bool = True
    seed: int = 0
    isc_splits: int = 10
    precision: str = "official"
    metrics: Sequence[str] = ("fid", "is")
    kid_subset_size: int = 1000


@dataclasses.dataclass
class EvaluationRun:
    """One (guidance scale, guidance interval) of an evaluation: its sampling settings, shard files and the shards
    this process generates."""

    settings: dict
    run_dir: str
    save_dir: str | None
    paths: list[str]
    finished: list[bool]
    pending: list[int]


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
def generate_shard(pipeline, inception, labels, start, end, settings, batch_size, save_dir, progress_bar,
                   sets=("features", "logits"), dinov2=None):
    """Generates images start..end-1 (image i from noise seeded with seed + i) and returns their feature sets
    (image_features) and class labels."""
    features = {name: [] for name in sets}
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
        for name, value in image_features(images, inception, sets, dinov2).items():
            features[name].append(value)
        progress_bar.update(len(batch))
    return {**{name: torch.cat(value) for name, value in features.items()}, "class_labels": labels[start:end].clone()}


def shard_is_finished(path: str, sets) -> bool:
    """Whether the shard file exists and holds every feature set in `sets`."""
    if not os.path.exists(path):
        return False
    with safe_open(path, "pt") as file:
        return set(sets) <= set(file.keys())


def evaluate_pipeline(
    pipeline,
    inception: FeatureExtractorInceptionV3,
    reference: dict,
    accelerator: Accelerator,
    shard_dir: str,
    settings: EvaluationSettings,
    dinov2=None,
    save_images: str | None = None,
) -> list[dict] | None:
    """
    The metrics of `settings` for each of its guidance settings. `reference` comes from `load_reference`; `dinov2`
    (load_dinov2) is needed for fd_dinov2.

    Image indices are cut into shards of `settings.images_per_shard`, saved as
    `shard_dir/<name>-<settings hash>/shard-<start>-<end>.safetensors`, name `guidance_<scale>` (plus
    `_interval_<min>_<max>` for an interval other than the pipeline's), with the feature sets the metrics
    need. Shards already there with those sets are reused, so a crashed run resumes where it stopped, with any
    number of processes; process r of an accelerate run generates unfinished shards r, r + world_size, ... and the
    main process merges all shards. One progress bar on the main process counts its images over the whole run.
    `save_images` also writes each generated image as `<save_images>/<name>/<index>.png`.

    Returns, on the main process, one dict per setting with its settings, the metrics (`fid`,
    `inception_score_mean`, `inception_score_std`, `improved_precision`, `improved_recall`, `kid_mean`, `kid_std`,
    `sfid`, `fd_dinov2`, as asked) and the number of `reused_shards`; None on the other processes.
    """
    labels = check_evaluation(pipeline, reference, settings, dinov2)
    pipeline.set_progress_bar_config(disable=True)
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
    check_shared_folder(accelerator, shard_dir, "shard_dir")
    runs = plan_runs(pipeline, settings, accelerator, shard_dir, save_images)
    accelerator.wait_for_everyone()
    generate_runs(pipeline, inception, runs, labels, settings, accelerator, dinov2)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return merge_runs(runs, reference, inception, settings)


def check_evaluation(pipeline, reference: dict, settings: EvaluationSettings, dinov2) -> torch.Tensor:
    """Raises on settings `evaluate_pipeline` cannot measure; returns the class label of every image index."""
    check_metrics(settings.metrics)
    check_precision(settings.precision, pipeline.transformer.dtype)
    if "fd_dinov2" in settings.metrics and dinov2 is None:
        raise ValueError("metric fd_dinov2 needs a DINOv2 (load_dinov2).")
    if "kid" in settings.metrics:
        num_reference = (len(reference["features"]) if "features" in reference
                         else npz_array_header(reference["images_file"], "arr_0")[0][0])
        if settings.kid_subset_size > min(settings.num_images, num_reference):
            raise ValueError(f"kid_subset_size {settings.kid_subset_size} is more than the {settings.num_images} "
                             f"images or the {num_reference} reference images.")
    labels = evaluation_class_labels(settings.num_images, pipeline.transformer.config.num_classes,
                                     settings.class_balanced, settings.seed)
    if settings.num_images < settings.isc_splits:
        raise ValueError(f"num_images must be at least isc_splits ({settings.isc_splits}), got {settings.num_images}.")
    if settings.batch_size < 1 or settings.images_per_shard < 1:
        raise ValueError(f"batch_size and images_per_shard must be >= 1, got {settings.batch_size} and "
                         f"{settings.images_per_shard}.")
    return labels


def shard_bounds(settings: EvaluationSettings) -> list[tuple[int, int]]:
    """The (start, end) image indices of each shard."""
    return [(start, min(start + settings.images_per_shard, settings.num_images))
            for start in range(0, settings.num_images, settings.images_per_shard)]


def plan_runs(pipeline, settings: EvaluationSettings, accelerator: Accelerator, shard_dir: str,
              save_images: str | None) -> list[EvaluationRun]:
    """One run per guidance setting, its folders made and its settings.json written, with the unfinished shards
    this process generates."""
    sets = feature_sets(settings.metrics)
    bounds = shard_bounds(settings)
    runs = []
    for guidance_interval in settings.guidance_intervals:
        for guidance_scale in settings.guidance_scales:
            run_settings = sampling_settings(
                pipeline, guidance_scale, guidance_interval, num_images=settings.num_images,
                num_inference_steps=settings.num_inference_steps, class_balanced=settings.class_balanced,
                seed=settings.seed, precision=settings.precision,
            )
            name = f"guidance_{run_settings['guidance_scale']:g}"
            if run_settings["guidance_interval"] != list(pipeline.config.guidance_interval):
                name += "_interval_{:g}_{:g}".format(*run_settings["guidance_interval"])
            digest = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()[:16]
            run_dir = os.path.join(shard_dir, f"{name}-{digest}")
            save_dir = None if save_images is None else os.path.join(save_images, name)
            for directory in (run_dir, save_dir):
                if directory is not None:
                    os.makedirs(directory, exist_ok=True)
            if accelerator.is_main_process:
                with open(os.path.join(run_dir, "settings.json"), "w") as file:
                    json.dump(run_settings, file, indent=2)
            paths = [os.path.join(run_dir, f"shard-{start:06d}-{end:06d}.safetensors") for start, end in bounds]
            finished = [shard_is_finished(path, sets) for path in paths]
            unfinished = [shard for shard in range(len(paths)) if not finished[shard]]
            pending = unfinished[accelerator.process_index :: accelerator.num_processes]
            runs.append(EvaluationRun(run_settings, run_dir, save_dir, paths, finished, pending))
    return runs


def generate_runs(pipeline, inception, runs: list[EvaluationRun], labels: torch.Tensor,
                  settings: EvaluationSettings, accelerator: Accelerator, dinov2) -> None:
    """Generates this process's pending shards of every run, each written atomically."""
    sets = feature_sets(settings.metrics)
    bounds = shard_bounds(settings)
    progress_bar = tqdm(
        total=sum(bounds[shard][1] - bounds[shard][0] for run in runs for shard in run.pending), unit="img",
        desc="generating", disable=not accelerator.is_main_process,
    )
    for run in runs:
        for shard in run.pending:
            tensors = generate_shard(
                pipeline, inception, labels, *bounds[shard], run.settings, settings.batch_size, run.save_dir,
                progress_bar, sets, dinov2,
            )
            metadata = {"process_index": str(accelerator.process_index)}
            write_atomically(run.paths[shard], lambda file: file.write(save(tensors, metadata)))
    progress_bar.close()


def merge_runs(runs: list[EvaluationRun], reference: dict, inception, settings: EvaluationSettings) -> list[dict]:
    """Each run's settings and metrics, from all of its shards."""
    if "images_file" in reference:
        with np.load(reference["images_file"]) as archive:
            images = torch.from_numpy(archive["arr_0"]).permute(0, 3, 1, 2)
        reference = {**reference, "features": tensor_features(images, inception, settings.batch_size).numpy()}
    sets = feature_sets(settings.metrics)
    results = []
    for run in runs:
        shards = [load_file(path) for path in run.paths]
        features = {name: torch.cat([shard[name] for shard in shards]) for name in sets}
        results.append(
            {
                **run.settings,
                **compute_metrics(settings.metrics, features, reference, settings.isc_splits,
                                  settings.kid_subset_size),
                "reused_shards": sum(run.finished),
                "shard_dir": run.run_dir,
            }
        )
    return results


METRIC_LABELS = {"fid": "FID", "inception_score_mean": "IS"}


def plot_guidance_sweep(results: list[dict], path: str) -> None:
    """PNG of FID and IS against guidance scale, one line per guidance interval, the lowest FID marked; the plotted
    points are also written into the PNG's "Description" text as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in METRIC_LABELS if key in results[0]]
    intervals = sorted({tuple(result["guidance_interval"]) for result in results})
    best = min(results, key=lambda result: result["fid"]) if "fid" in keys else None
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    plotted = {key: {} for key in keys}
    for axis, key in zip(axes[0], keys):
        for interval in intervals:
            points = sorted((r["guidance_scale"], r[key]) for r in results if tuple(r["guidance_interval"]) == interval)
            label = f"interval [{interval[0]:g}, {interval[1]:g}]"
            axis.plot(*zip(*points), marker="o", label=label)
            plotted[key][label] = points
        if best is not None:
            axis.plot(best["guidance_scale"], best[key], marker="*", markersize=16, color="black", linestyle="none",
                      label=f"best FID: scale {best['guidance_scale']:g}, interval {best['guidance_interval']}")
        axis.set_xlabel("guidance scale")
        axis.set_ylabel(METRIC_LABELS[key])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    description = {"series": plotted}
    if best is not None:
        description["best"] = {"guidance_scale": best["guidance_scale"], "guidance_interval": best["guidance_interval"]}
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Description": json.dumps(description)})
    plt.close(figure)

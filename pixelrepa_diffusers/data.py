"""Class-labelled training images: ADM center crop, seeded random flip, and skipping of unreadable images."""

import io
import json
import logging
import os

import datasets
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# The settings of a training/prepare_dataset.py run, in its output folder beside the shards.
PREPARED_MANIFEST = "prepared.json"
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# What PIL raises for a missing, truncated, corrupt or oversized image file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def check_resolution(resolution):
    """Raise ValueError unless resolution is a positive int."""
    if not (isinstance(resolution, int) and resolution > 0):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")


def center_crop_arr(pil_image, image_size):
    """ADM center crop: box-halve while the short side is >= 2 * image_size, bicubic-resize the short side to
    image_size, then crop the center image_size x image_size square."""
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def decode_image(image):
    """An RGB PIL image from a datasets image record {"bytes", "path"}, or None (logged) when it cannot be read."""
    source = image["path"] if image["bytes"] is None else io.BytesIO(image["bytes"])
    try:
        with Image.open(source) as pil_image:
            return pil_image.convert("RGB")
    except DECODE_ERRORS as error:
        logger.warning("Skipping unreadable image %s: %s", image["path"], error)
        return None


def crop_to_array(pil_image, resolution):
    """ADM center crop of an RGB PIL image as a contiguous uint8 array (3, resolution, resolution)."""
    return np.ascontiguousarray(np.asarray(center_crop_arr(pil_image, resolution)).transpose(2, 0, 1))


def scan_image_folder(train_data_dir):
    """A dataset of image paths ("image", not decoded) and class ids ("label") from one subfolder per class.

    Classes are the subfolder names sorted as in torchvision's ImageFolder; images are found recursively.
    """
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"train_data_dir {train_data_dir!r} is not a directory")
    class_names = sorted(entry.name for entry in os.scandir(train_data_dir) if entry.is_dir())
    if not class_names:
        raise ValueError(
            f"train_data_dir {train_data_dir!r} has no class subfolders; expected one subfolder per class"
        )
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        for root, dirs, files in os.walk(os.path.join(train_data_dir, class_name), followlinks=True):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(root, name))
                    labels.append(label)
    if not paths:
        raise ValueError(f"train_data_dir {train_data_dir!r} has no images with extensions {IMAGE_EXTENSIONS}")
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)}
    )
    images = [{"path": path, "bytes": None} for path in paths]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def prepared_shard_names(num_shards):
    """The file names of the Arrow shards training/prepare_dataset.py writes."""
    return [f"train-{index:05d}-of-{num_shards:05d}.arrow" for index in range(num_shards)]


def load_prepared(directory):
    """The output of training/prepare_dataset.py: its Arrow shards, memory-mapped (nothing is copied)."""
    with open(os.path.join(directory, PREPARED_MANIFEST)) as file:
        num_shards = json.load(file)["num_shards"]
    paths = [os.path.join(directory, name) for name in prepared_shard_names(num_shards)]
    finished = sum(os.path.isfile(path) for path in paths)
    if finished < num_shards:
        raise ValueError(f"{directory!r} holds {finished} of the {num_shards} shards of training/prepare_dataset.py; "
                         "run the same command again to finish it")
    return datasets.concatenate_datasets([datasets.Dataset.from_file(path) for path in paths])


def load_datasets_source(dataset_name, dataset_config_name=None, split="train", cache_dir=None):
    """One split of a Hub dataset, a local dataset repository, a folder written by save_to_disk, or the output of
    training/prepare_dataset.py."""
    if os.path.isfile(os.path.join(dataset_name, PREPARED_MANIFEST)):
        return load_prepared(dataset_name)
    saved_dataset = os.path.isfile(os.path.join(dataset_name, datasets.config.DATASET_STATE_JSON_FILENAME))
    saved_dict = os.path.isfile(os.path.join(dataset_name, datasets.config.DATASETDICT_JSON_FILENAME))
    if saved_dataset:
        return datasets.load_from_disk(dataset_name)
    if saved_dict:
        splits = datasets.load_from_disk(dataset_name)
        if split not in splits:
            raise ValueError(f"split {split!r} is not in {dataset_name!r}; available: {list(splits)}")
        return splits[split]
    # Checked from the file names (or the Hub's listing) before load_dataset converts any split to Arrow.
    splits = datasets.get_dataset_split_names(dataset_name, dataset_config_name)
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {dataset_name!r}; available: {splits}")
    return datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)


def load_image_table(
    train_data_dir=None,
    dataset_name=None,
    dataset_config_name=None,
    image_column="image",
    label_column="label",
    cache_dir=None,
    split="train",
):
    """The training images as a datasets.Dataset with two columns: the images and "label" (a ClassLabel, or integer
    class ids; see class_names).

    The images are "image", an undecoded datasets.Image (records {"bytes", "path"}), or, in the output of
    training/prepare_dataset.py (found by its binary "pixel_values" column; image_column is then not used),
    "pixel_values": the raw bytes of a center-cropped uint8 array (3, R, R).
    """
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("pass exactly one of train_data_dir (an image folder) and dataset_name (a datasets dataset)")
    if train_data_dir is not None:
        return scan_image_folder(train_data_dir)
    table = load_datasets_source(dataset_name, dataset_config_name, split, cache_dir)
    prepared = table.features.get("pixel_values") == datasets.Value("binary")
    if prepared:
        image_column = "pixel_values"
    for argument, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in table.column_names:
            raise ValueError(
                f"{argument} {column!r} is not a column of {dataset_name!r}; columns: {table.column_names}"
            )
    if len(table) == 0:
        raise ValueError(f"split {split!r} of {dataset_name!r} has no rows")
    table = table.select_columns([image_column, label_column])
    if label_column != "label":
        table = table.rename_column(label_column, "label")
    if not prepared:
        if not isinstance(table.features[image_column], datasets.Image):
            raise ValueError(
                f"image_column {image_column!r} of {dataset_name!r} is {table.features[image_column]}; "
                "expected an Image feature"
            )
        if image_column != "image":
            table = table.rename_column(image_column, "image")
        table = table.cast_column("image", datasets.Image(decode=False))  # a change of features, no rewrite
    label_feature = table.features["label"]
    integer_ids = isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
    if not (integer_ids or isinstance(label_feature, datasets.ClassLabel)):
        raise ValueError(
            f"label_column {label_column!r} of {dataset_name!r} is {label_feature}; expected integer class ids"
        )
    return table


def class_names(table) -> list[str]:
    """
    The class names of a table from load_image_table: its ClassLabel's, else the ids 0 to the largest as strings
    (integer labels stay as they are: casting them to a ClassLabel would rewrite the whole table, images included).
    """
    feature = table.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.names
    return [str(label) for label in range(int(np.max(table.with_format("numpy")["label"])) + 1)]


class ImageClassDataset(torch.utils.data.Dataset):
    """Items {"pixel_values": uint8 (3, R, R), "class_labels": int64 ()}, or None for an image that cannot be read.

    Images are ADM center-cropped to R (unless the table is pre-cropped) and flipped horizontally with
    probability 0.5. The flip of item `index` in epoch `epoch` is drawn from numpy's SeedSequence of
    (seed, epoch, index), so it is the same in any worker or process and after a resume. Call set_epoch at the
    start of every epoch (before the DataLoader iterator is created; not with persistent_workers).
    """

    def __init__(self, table, resolution=256, random_flip=True, seed=0):
        check_resolution(resolution)
        self.precropped = "pixel_values" in table.column_names
        if self.precropped and len(table[0]["pixel_values"]) != 3 * resolution**2:
            side = round((len(table[0]["pixel_values"]) / 3) ** 0.5)
            raise ValueError(
                f"the prepared dataset holds {side} px images, but resolution={resolution}; "
                "prepare it again with training/prepare_dataset.py --resolution"
            )
        self.table = table
        self.class_names = class_names(table)
        self.resolution = resolution
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.table)

    def __getitem__(self, index):
        row = self.table[index]
        if self.precropped:
            pixel_values = torch.frombuffer(bytearray(row["pixel_values"]), dtype=torch.uint8)
            pixel_values = pixel_values.view(3, self.resolution, self.resolution)
        else:
            image = decode_image(row["image"])
            if image is None:
                return None
            pixel_values = torch.from_numpy(crop_to_array(image, self.resolution))
        if self.random_flip and np.random.default_rng((self.seed, self.epoch, index)).random() < 0.5:
            pixel_values = pixel_values.flip(2)
        return {"pixel_values": pixel_values, "class_labels": torch.tensor(row["label"], dtype=torch.int64)}


def load_train_dataset(
    train_data_dir=None,
    dataset_name=None,
    dataset_config_name=None,
    image_column="image",
    label_column="label",
    resolution=256,
    random_flip=True,
    cache_dir=None,
    split="train",
    seed=0,
):
    """The training set from an image folder (one subfolder per class) or a datasets dataset (Hub id, local
    dataset repository, save_to_disk folder, or the output of training/prepare_dataset.py)."""
    check_resolution(resolution)
    table = load_image_table(
        train_data_dir, dataset_name, dataset_config_name, image_column, label_column, cache_dir, split
    )
    return ImageClassDataset(table, resolution=resolution, random_flip=random_flip, seed=seed)


def collate_train_batch(items):
    """Stack the readable items into {"pixel_values": uint8 (B, 3, H, W), "class_labels": (B,), "num_skipped"};
    B is 0 (pixel_values (0, 3, 0, 0)) when no item of the batch could be read."""
    kept = [item for item in items if item is not None]
    if not kept:
        pixel_values, class_labels = torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
        return {"pixel_values": pixel_values, "class_labels": class_labels, "num_skipped": len(items)}
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
        "class_labels": torch.stack([item["class_labels"] for item in kept]),
        "num_skipped": len(items) - len(kept),
    }


def make_quickstart_dataset(output_dir, resolution=32):
    """Write scikit-learn's bundled digits (1797 8x8 images, classes 0-9) as an image folder for the quick start.

    Each digit is scaled from 0..16 to 0..255 (white ink on black), bicubic-upscaled to resolution, converted
    to RGB and saved as output_dir/<digit>/<index>.png. Deterministic; load it with
    load_train_dataset(train_data_dir=output_dir, resolution=resolution).
    """
    from sklearn.datasets import load_digits

    check_resolution(resolution)
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        class_dir = os.path.join(output_dir, str(label))
        os.makedirs(class_dir, exist_ok=True)
        upscaled = Image.fromarray(image).resize((resolution, resolution), resample=Image.BICUBIC)
        upscaled.convert("RGB").save(os.path.join(class_dir, f"{index:04d}.png"))

"""Write the ADM center crops of a training set once, for nodes with few CPU cores per GPU.

One CPU core decodes and crops about 240 ImageNet-sized JPEGs a second, and reads about 5,000 prepared crops
(training/benchmark_data.py, BENCHMARKS.md). A node of 8 GPUs that trains on 2,000 images/s needs about 9 cores for
the images as they are and half a core for the prepared copy. With the cores to spare, train on the images as they
are.

OUTPUT_DIR holds Arrow shards train-0000k-of-0000n.arrow, columns "pixel_values" (binary: the raw bytes of a uint8
array (3, R, R)) and "label", and prepared.json, the run's settings. Train on it with `--dataset_name OUTPUT_DIR`:
the shards are memory-mapped, not copied, and only the random flip is left to do. Raw bytes, because the lossless
formats measured either load barely faster than the JPEGs (PNG 1.3x, WebP 1.8x) or save little (zstd: 23% smaller,
at a seventh of the raw rate). 3 * R * R bytes per image: 252 GB for ImageNet at 256 px, 1 TB at 512 px. A shard
appears only when complete, so running the same command again after a crash finishes the job. Unreadable images
are skipped, logged and counted.

    python training/prepare_dataset.py --train_data_dir imagenet/train --resolution 256 --output_dir imagenet-256
"""

import argparse
import json
import math
import multiprocessing
import os
import sys

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command
from pixelrepa_diffusers.data import (
    PREPARED_MANIFEST,
    check_resolution,
    crop_to_array,
    decode_image,
    load_image_table,
    load_prepared,
    prepared_shard_names,
)
from pixelrepa_diffusers.training_utils import write_atomically

BATCH_SIZE = 64  # images per Arrow record batch


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", default=None, help="An image folder with one subfolder per class.")
    parser.add_argument(
        "--dataset_name", default=None, help="A Hub dataset id, a local dataset repository or a save_to_disk folder."
    )
    parser.add_argument("--dataset_config_name", default=None, help="The config of --dataset_name.")
    parser.add_argument("--split", default="train", help="The split of --dataset_name.")
    parser.add_argument("--image_column", default="image", help="The image column of --dataset_name.")
    parser.add_argument("--label_column", default="label", help="The class-id column of --dataset_name.")
    parser.add_argument("--cache_dir", default=None, help="Where datasets caches downloaded data.")
    parser.add_argument("--resolution", type=int, default=256, help="Side of the square ADM center crop.")
    parser.add_argument("--output_dir", required=True, help="Where to write the shards.")
    parser.add_argument("--shard_size", type=int, default=1000, help="Source images per shard.")
    parser.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="Processes that decode and crop images (default: the CPU cores this process may use).")
    return parser.parse_args(argv)


def run_settings(args, table):
    """What a shard depends on: a rerun resumes only an output_dir written with the same settings."""
    if args.train_data_dir is not None:
        source = os.path.abspath(args.train_data_dir)
    else:
        name = os.path.abspath(args.dataset_name) if os.path.isdir(args.dataset_name) else args.dataset_name
        source = f"{name} (config {args.dataset_config_name}, split {args.split})"
    return {"format": "uint8 (3, R, R) ADM center crops", "source": source, "source_rows": len(table),
            "resolution": args.resolution, "shard_size": args.shard_size,
            "num_shards": math.ceil(len(table) / args.shard_size)}


def open_output_dir(output_dir, settings):
    """Starts output_dir (new or empty), or checks that it holds a run with the same settings and removes the
    partial shards a crash of that run left."""
    manifest = os.path.join(output_dir, PREPARED_MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as file:
            earlier = json.load(file)
        if earlier != settings:
            keys = [key for key in settings if earlier.get(key) != settings[key]]
            raise ValueError(
                f"output_dir {output_dir!r} holds a run with {', '.join(f'{key} {earlier.get(key)!r}' for key in keys)}; "
                f"this run has {', '.join(f'{key} {settings[key]!r}' for key in keys)}: pass another output_dir"
            )
        for name in os.listdir(output_dir):
            if name.endswith(".tmp"):  # a shard write_atomically did not finish
                os.remove(os.path.join(output_dir, name))
        return
    if os.path.exists(output_dir) and not (os.path.isdir(output_dir) and not os.listdir(output_dir)):
        found = sorted(os.listdir(output_dir))[:3] if os.path.isdir(output_dir) else "a file"
        raise ValueError(f"output_dir {output_dir!r} holds no {PREPARED_MANIFEST}, so it is not a run of this script; "
                         f"expected a new or empty folder, found {found}")
    os.makedirs(output_dir, exist_ok=True)
    write_atomically(manifest, lambda file: file.write(json.dumps(settings, indent=2).encode()))


def crop_batch(batch, resolution):
    """Decode and center-crop a batch of images, dropping those that cannot be read."""
    pixel_values, labels = [], []
    for image, label in zip(batch["image"], batch["label"]):
        pil_image = decode_image(image)
        if pil_image is not None:
            pixel_values.append(crop_to_array(pil_image, resolution).tobytes())
            labels.append(label)
    return {"pixel_values": pixel_values, "label": labels}


def start_worker(*state):
    global worker_state
    worker_state = state


def write_shard(index):
    """Crops shard `index` of the source table (given to start_worker) into its Arrow file."""
    table, settings, output_dir = worker_state
    schema = datasets.Features({"pixel_values": datasets.Value("binary"), "label": table.features["label"]}).arrow_schema
    start = index * settings["shard_size"]
    rows = table.select(range(start, min(start + settings["shard_size"], len(table))))

    def write(file):
        with pa.ipc.new_stream(file, schema) as writer:
            for batch in rows.iter(batch_size=BATCH_SIZE):
                writer.write_batch(pa.RecordBatch.from_pydict(crop_batch(batch, settings["resolution"]), schema=schema))

    path = os.path.join(output_dir, prepared_shard_names(settings["num_shards"])[index])
    write_atomically(path, write)


def prepare_dataset(args):
    """Writes the shards not yet in output_dir; returns (images kept, unreadable images skipped, shards written)."""
    check_resolution(args.resolution)
    for name in ("num_proc", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    table = load_image_table(
        args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column, args.label_column,
        args.cache_dir, args.split,
    )
    if "pixel_values" in table.column_names:
        raise ValueError(f"dataset_name {args.dataset_name!r} is already a prepared dataset")
    settings = run_settings(args, table)
    output_dir = os.path.abspath(args.output_dir)
    open_output_dir(output_dir, settings)
    names = prepared_shard_names(settings["num_shards"])
    todo = [index for index, name in enumerate(names) if not os.path.isfile(os.path.join(output_dir, name))]
    if todo:
        with multiprocessing.Pool(min(args.num_proc, len(todo)), start_worker, (table, settings, output_dir)) as pool:
            progress = tqdm(total=len(names), initial=len(names) - len(todo), desc="Cropping shards")
            for _ in pool.imap_unordered(write_shard, todo):
                progress.update()
            progress.close()
    kept = len(load_prepared(output_dir))
    return kept, len(table) - kept, len(todo)


def prepare_and_report(args) -> None:
    kept, skipped, written = prepare_dataset(args)
    print(f"{args.output_dir} holds {kept} images ({written} shards written now); skipped {skipped} unreadable images.")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: prepare_and_report(args), errors=(ValueError, FileNotFoundError, ConnectionError),
                       prog="prepare_dataset.py")


if __name__ == "__main__":
    sys.exit(main())

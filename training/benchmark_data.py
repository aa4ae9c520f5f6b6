"""Training-data loading speed of one CPU core for each data layout, against torchvision's ImageFolder in the same run.

    python -m training.benchmark_data --num_images 600 --resolution 256

One process, DataLoader num_workers=0, torch threads 1, shuffled batches: images/s is what one core delivers.
Baseline: torchvision.datasets.ImageFolder with the ADM center crop (center_crop_arr), a random flip and
PILToTensor. Timed as training runs them, through load_train_dataset and ImageClassDataset: the image folder
(--train_data_dir), the Hub's parquet layout (data/train-0000k-of-0000n.parquet, image and label), WebDataset tar
shards (.jpg/.cls) and the output of training/prepare_dataset.py; the datasets cache each builds is made before the
timing. To choose the prepared format it also times decoding (and flipping) the same crops stored losslessly in other
ways, and gives the bytes per image of everything.

The images are --num_images JPEGs (quality 95, 340-480 x 300-400 px, as ImageNet's) cut from the real photos that
scikit-learn ships, or, with --source_dir, copies of images taken from that image folder.
"""

import argparse
import functools
import io
import math
import os
import sys
import tarfile
import tempfile
import time

import datasets
import numpy as np
import pyarrow as pa
import torch
import torchvision
from PIL import Image

from pipelines.benchmark_utils import (
    alternating_timings,
    check_benchmark_args,
    describe_machine,
    load_average,
    median,
    run_benchmark_cli,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser
from pixelrepa_diffusers.data import center_crop_arr, collate_train_batch, load_train_dataset, scan_image_folder
from training import prepare_dataset

BASELINE = "torchvision ImageFolder"


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_dir", default=None,
                        help="take the images from this image folder (one subfolder per class) instead of the photos")
    parser.add_argument("--num_images", type=int, default=600)
    parser.add_argument("--num_classes", type=int, default=10, help="classes of the photo images")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--min_seconds", type=float, default=2.0,
                        help="each timed run loads whole epochs for at least this long (calibrated in the warm-up)")
    parser.add_argument("--num_proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes of prepare_dataset.py (its run is timed too)")
    parser.add_argument("--target_images_per_second", type=float, default=2000.0,
                        help="a node's need, for the cores each layout takes to meet it")
    parser.add_argument("--work_dir", default=None, help="where to build the layouts (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each before timing (at least 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None, help="also write the results here")
    return parser.parse_args(argv)


def check_args(args) -> None:
    check_benchmark_args(args, positive=("num_images", "num_classes", "resolution", "batch_size", "num_proc", "warmup"))
    if args.min_seconds <= 0:
        raise ValueError(f"--min_seconds must be > 0, got {args.min_seconds}.")
    if args.work_dir is not None and os.path.exists(args.work_dir) and os.listdir(args.work_dir):
        raise ValueError(f"--work_dir {args.work_dir!r} is not empty; expected a new or empty folder.")


def photo_jpegs(num_images, seed):
    """JPEG bytes of ImageNet-sized crops (no resampling) of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    jpegs = []
    for index in range(num_images):
        photo = photos[index % len(photos)]
        width, height = int(rng.integers(340, 481)), int(rng.integers(300, 401))
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        buffer = io.BytesIO()
        photo.crop((left, top, left + width, top + height)).save(buffer, format="JPEG", quality=95)
        jpegs.append(buffer.getvalue())
    return jpegs


def source_images(args):
    """(image bytes, class ids, class names): the photo JPEGs, or --num_images images spread over --source_dir."""
    if args.source_dir is None:
        labels = [index % args.num_classes for index in range(args.num_images)]
        return photo_jpegs(args.num_images, args.seed), labels, [f"class{k:03d}" for k in range(args.num_classes)]
    table = scan_image_folder(args.source_dir)
    picked = np.unique(np.linspace(0, len(table) - 1, min(args.num_images, len(table))).astype(int))
    rows = table.select(picked)
    images = []
    for image in rows["image"]:
        with open(image["path"], "rb") as file:
            images.append(file.read())
    return images, rows["label"], table.features["label"].names


def build_layouts(work_dir, images, labels, class_names):
    """The image folder, the Hub's parquet layout (two shards) and WebDataset tar shards (two) of the images."""
    folder = os.path.join(work_dir, "folder")
    for index, (data, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, class_names[label]), exist_ok=True)
        with open(os.path.join(folder, class_names[label], f"{index:06d}.JPEG"), "wb") as file:
            file.write(data)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    records = [{"bytes": data, "path": f"{index:06d}.JPEG"} for index, data in enumerate(images)]
    table = datasets.Dataset.from_dict({"image": records, "label": labels}, features=features)
    os.makedirs(os.path.join(work_dir, "webdataset"))
    for shard in range(2):
        table.shard(2, shard, contiguous=True).to_parquet(
            os.path.join(work_dir, "parquet", "data", f"train-{shard:05d}-of-00002.parquet"))
    bounds = [0, math.ceil(len(images) / 2), len(images)]
    for shard in range(2):
        with tarfile.open(os.path.join(work_dir, "webdataset", f"train-{shard:05d}.tar"), "w") as tar:
            for index in range(bounds[shard], bounds[shard + 1]):
                for extension, data in (("jpg", images[index]), ("cls", str(labels[index]).encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def loader_epoch(dataset, args, collate_fn):
    """One shuffled epoch of a DataLoader over `dataset` in this process (num_workers=0); returns the images loaded."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))

    def epoch():
        return sum(len(batch[1] if collate_fn is None else batch["class_labels"]) for batch in loader)

    return epoch


def decoding_epoch(stored, decode):
    def epoch():
        for data in stored:
            decode(data).flip(2)
        return len(stored)

    return epoch


def repeat(epoch, count):
    for _ in range(count):
        epoch()


def stored_crop_candidates(crops, resolution):
    """name -> (stored bytes of each crop, decode to a uint8 (3, R, R) tensor) for lossless ways to store crops."""
    zstd = pa.Codec("zstd", compression_level=3)
    size = 3 * resolution * resolution

    def encode(crop, **options):
        buffer = io.BytesIO()
        Image.fromarray(crop.transpose(1, 2, 0)).save(buffer, **options)
        return buffer.getvalue()

    def decode_image(data):
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)

    def decode_raw(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, resolution, resolution)

    return {
        "raw uint8 (prepare_dataset.py)": ([crop.tobytes() for crop in crops], decode_raw),
        "zstd-3 of the raw bytes (pyarrow)": (
            [zstd.compress(crop.tobytes(), asbytes=True) for crop in crops],
            lambda data: decode_raw(zstd.decompress(data, decompressed_size=size, asbytes=True))),
        "PNG, compress_level 1": ([encode(crop, format="PNG", compress_level=1) for crop in crops], decode_image),
        "WebP lossless, method 0": ([encode(crop, format="WEBP", lossless=True, quality=0, method=0)
                                     for crop in crops], decode_image),
    }


def run(args) -> dict:
    check_args(args)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or temporary
        images, labels, class_names = source_images(args)
        folder = build_layouts(work_dir, images, labels, class_names)
        prepared_dir = os.path.join(work_dir, "prepared")
        start = time.perf_counter()
        prepare_dataset.prepare_dataset(prepare_dataset.parse_args([
            "--train_data_dir", folder, "--resolution", str(args.resolution), "--output_dir", prepared_dir,
            "--num_proc", str(args.num_proc),
            "--shard_size", str(math.ceil(len(images) / (4 * args.num_proc)))]))  # 4 shards per process
        prepare_seconds = time.perf_counter() - start
        cache = os.path.join(work_dir, "cache")
        crop = functools.partial(center_crop_arr, image_size=args.resolution)
        flip_to_tensor = torchvision.transforms.Compose([
            torchvision.transforms.Lambda(crop), torchvision.transforms.RandomHorizontalFlip(),
            torchvision.transforms.PILToTensor(),
        ])
        sources = {
            BASELINE: (torchvision.datasets.ImageFolder(folder, transform=flip_to_tensor), None, folder),
            "ours: image folder": (dict(train_data_dir=folder), collate_train_batch, folder),
            "ours: Hub parquet": (dict(dataset_name=os.path.join(work_dir, "parquet")), collate_train_batch,
                                  os.path.join(work_dir, "parquet", "data")),
            "ours: WebDataset tar": (dict(dataset_name=os.path.join(work_dir, "webdataset"), image_column="jpg",
                                          label_column="cls"), collate_train_batch,
                                     os.path.join(work_dir, "webdataset")),
            "ours: prepare_dataset.py output": (dict(dataset_name=prepared_dir), collate_train_batch, prepared_dir),
        }
        epochs, sizes = {}, {}
        for name, (dataset, collate_fn, files) in sources.items():
            if collate_fn is not None:
                dataset = load_train_dataset(**dataset, resolution=args.resolution, cache_dir=cache, seed=args.seed)
            epochs[name] = loader_epoch(dataset, args, collate_fn)
            sizes[name] = folder_bytes(files) / len(dataset)
        unflipped = load_train_dataset(dataset_name=prepared_dir, resolution=args.resolution, random_flip=False)
        crops = [unflipped[index]["pixel_values"].numpy() for index in range(len(unflipped))]
        candidates = stored_crop_candidates(crops, args.resolution)
        for name, (stored, decode) in candidates.items():
            epochs[name] = decoding_epoch(stored, decode)
            sizes[name] = sum(len(data) for data in stored) / len(stored)

        # Each timed run loads whole epochs, as many as fill --min_seconds in the last warm-up epoch.
        runs, images_per_run = {}, {}
        for name, epoch in epochs.items():
            for _ in range(args.warmup):
                start = time.perf_counter()
                images_per_epoch = epoch()
                seconds = time.perf_counter() - start
            count = max(1, math.ceil(args.min_seconds / seconds))
            runs[name] = functools.partial(repeat, epoch, count)
            images_per_run[name] = count * images_per_epoch
        machine = describe_machine(torch.device("cpu"))
        timings = alternating_timings(runs, {}, args.repeats, torch.device("cpu"))
        mean_size = np.mean([Image.open(io.BytesIO(data)).size for data in images], axis=0)

    results = dict(
        machine=machine, load_average_after=load_average(), command=" ".join(sys.argv),
        source=args.source_dir or "JPEG crops of the scikit-learn sample photos",
        num_images=len(images), source_bytes_per_image=float(np.mean([len(data) for data in images])),
        source_mean_size=[float(side) for side in mean_size], resolution=args.resolution,
        batch_size=args.batch_size, target_images_per_second=args.target_images_per_second,
        prepare=dict(seconds=prepare_seconds, num_proc=args.num_proc, images_per_second=len(images) / prepare_seconds),
        paths={}, candidates={},
    )
    for name, timing in timings.items():
        images_per_second = images_per_run[name] / median(timing["seconds"])
        results["candidates" if name in candidates else "paths"][name] = dict(
            seconds=timing["seconds"], images_per_run=images_per_run[name], images_per_second=images_per_second,
            bytes_per_image=sizes[name],
        )
    baseline = results["paths"][BASELINE]["images_per_second"]
    for entry in (*results["paths"].values(), *results["candidates"].values()):
        entry["ratio"] = entry["images_per_second"] / baseline
        entry["cores_for_target"] = args.target_images_per_second / entry["images_per_second"]
    return results


def report(results) -> None:
    machine = results["machine"]
    print(f"{machine['device_name']} (1 core, torch threads {machine['threads']}), torch {machine['torch']}, "
          f"{machine['date']}, load average {machine['load_average']} before, {results['load_average_after']} after")
    print(f"command: {results['command']}")
    width, height = results["source_mean_size"]
    print(f"{results['num_images']} images ({results['source']}; {results['source_bytes_per_image'] / 1e3:.0f} KB, "
          f"{width:.0f} x {height:.0f} px on average), {results['resolution']} px crops, batch {results['batch_size']}, "
          "one process, num_workers 0")
    target = results["target_images_per_second"]
    for section, title in (("paths", "Loading (DataLoader over the dataset class)"),
                           ("candidates", "Stored crops: decode + flip of the same crops")):
        print(f"{title:<48} {'img/s/core':>10} {'x baseline':>10} {'bytes/image':>12} {f'cores for {target:g}/s':>16}")
        for name, entry in results[section].items():
            print(f"{name:<48} {entry['images_per_second']:>10.1f} {entry['ratio']:>10.2f} "
                  f"{entry['bytes_per_image']:>12,.0f} {entry['cores_for_target']:>16.2f}")
    prepare = results["prepare"]
    print(f"prepare_dataset.py: {results['num_images']} images in {prepare['seconds']:.1f} s with "
          f"{prepare['num_proc']} processes ({prepare['images_per_second']:.0f} img/s, start-up included)")


def main(argv=None) -> int:
    return run_benchmark_cli(parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())

"""Write a pre-cropped uint8 copy of a training set, so that data loading keeps up with a GPU.

The output is a datasets folder (save_to_disk, Arrow) with columns "pixel_values" (binary: the raw bytes of a
uint8 array (3, R, R), already ADM center-cropped to R) and "label" (ClassLabel). Train on it with
`--dataset_name OUTPUT_DIR`; only the random flip is left to do at training time. It takes 3 * R * R bytes per
image (about 250 GB for ImageNet at 256 px). Unreadable images are skipped, logged and counted.

    python training/prepare_dataset.py --train_data_dir imagenet/train --resolution 256 \
        --output_dir imagenet-256-prepared --num_proc 32
"""

import argparse
import os
import sys
import tempfile

import datasets

from pixelrepa_diffusers.data import check_resolution, crop_to_array, decode_image, load_image_table
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command


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
    parser.add_argument("--output_dir", required=True, help="Where to write the prepared dataset.")
    parser.add_argument("--num_proc", type=int, default=1, help="Processes that decode and crop images.")
    return parser.parse_args(argv)


def crop_batch(batch, resolution):
    """Decode and center-crop a batch of images, dropping those that cannot be read."""
    pixel_values, labels = [], []
    for image, label in zip(batch["image"], batch["label"]):
        pil_image = decode_image(image)
        if pil_image is not None:
            pixel_values.append(crop_to_array(pil_image, resolution).tobytes())
            labels.append(label)
    return {"pixel_values": pixel_values, "label": labels}


def prepare_dataset(args):
    """Crop every readable image of the source and save the result; returns (kept, skipped) counts."""
    check_resolution(args.resolution)
    if args.num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {args.num_proc}")
    table = load_image_table(
        args.train_data_dir, args.dataset_name, args.dataset_config_name, args.image_column, args.label_column,
        args.cache_dir, args.split,
    )
    if "pixel_values" in table.column_names:
        raise ValueError(f"dataset_name {args.dataset_name!r} is already a prepared dataset")
    features = datasets.Features({"pixel_values": datasets.Value("binary"), "label": table.features["label"]})
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    # The cropped shards go to a temporary folder beside output_dir, not to memory or the datasets cache.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(output_dir)) as shard_dir:
        prepared = table.map(
            crop_batch,
            batched=True,
            batch_size=64,
            num_proc=args.num_proc,
            features=features,
            remove_columns=["image"],
            fn_kwargs={"resolution": args.resolution},
            cache_file_name=os.path.join(shard_dir, "cropped.arrow"),
            desc="Cropping",
        )
        prepared.save_to_disk(output_dir)
        return len(prepared), len(table) - len(prepared)


def prepare_and_report(args) -> None:
    kept, skipped = prepare_dataset(args)
    print(f"Wrote {kept} images to {args.output_dir}; skipped {skipped} unreadable images.")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: prepare_and_report(args), errors=(ValueError, FileNotFoundError, ConnectionError),
                       prog="prepare_dataset.py")


if __name__ == "__main__":
    sys.exit(main())

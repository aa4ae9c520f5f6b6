"""FID reference statistics (an npz with Inception-v3 pool-feature `mu` and `sigma`) of an image collection.

Images get the ADM center crop used in training, so statistics of ImageNet train at 256 px rebuild the
official fid_stats/jit_in256_stats.npz:

    python pipelines/compute_reference_stats.py --image_folder /data/imagenet/train --resolution 256 \
        --output fid_stats/in256_stats.npz
    python pipelines/compute_reference_stats.py --dataset_name my/dataset --image_column img --output stats.npz
"""

import argparse
import sys

import torch

from pixelrepa_diffusers.data import load_datasets_source
from pixelrepa_diffusers.evaluation import dataset_statistics, image_folder_dataset, load_inception, save_fid_statistics


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_folder", help="folder searched recursively for images")
    source.add_argument("--dataset_name", help="Hub dataset id, local dataset repository or save_to_disk folder")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--resolution", type=int, default=256, help="ADM center-crop size")
    parser.add_argument("--output", required=True, help="the npz to write")
    parser.add_argument("--inception_weights", default=None,
                        help="torch-fidelity's Inception-v3 weights file, for offline machines")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=4, help="image decoding processes")
    return parser.parse_args(argv)


def compute(args):
    if args.image_folder is not None:
        dataset = image_folder_dataset(args.image_folder)
    else:
        dataset = load_datasets_source(args.dataset_name, args.dataset_config_name, args.split)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inception = load_inception(args.inception_weights, device)
    statistics = dataset_statistics(
        dataset, inception, args.image_column, args.resolution, args.batch_size, args.num_workers
    )
    save_fid_statistics(args.output, statistics)
    print(f"wrote {args.output} (statistics of {len(dataset)} images at {args.resolution} px)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        compute(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

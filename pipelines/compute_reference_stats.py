"""Reference arrays of an image collection for pipelines/evaluate.py: an npz with the Inception-v3 pool-feature
`mu` and `sigma` (FID) and the `resolution`, plus, with --metrics, pool `features` (precision, recall, KID),
ADM's spatial statistics `mu_s` and `sigma_s` (sFID) and DINOv2 statistics `mu_dinov2` and `sigma_dinov2`.

Images get the ADM center crop used in training, so statistics of ImageNet train at 256 px rebuild the
official fid_stats/jit_in256_stats.npz:

    python pipelines/compute_reference_stats.py --image_folder /data/imagenet/train --resolution 256 \
        --output fid_stats/in256_stats.npz
    python pipelines/compute_reference_stats.py --dataset_name my/dataset --image_column img --output stats.npz
    python pipelines/compute_reference_stats.py --image_folder /data/imagenet/train --output in256_reference.npz \
        --metrics fid precision recall kid sfid fd_dinov2 --dinov2_model /models/dinov2-large

Under `accelerate launch` (or `torchrun --nproc_per_node N`) the processes share the work: images are cut into
shards of --shard_size, each saved with its partial moments to --shard_dir (a folder every node sees), and a
rerun, with any number of processes, reuses the finished shards. Memory does not grow with the number of images.
"""

import argparse
import os
import sys

from accelerate import Accelerator

from pixelrepa_diffusers.data import load_datasets_source
from pixelrepa_diffusers.evaluation import (
    DINOV2_MODEL,
    METRICS,
    check_metrics,
    dataset_reference,
    image_folder_dataset,
    load_dinov2,
    load_inception,
    save_reference,
)
from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--metrics", nargs="+", default=["fid"],
                        help=f"metrics to build the reference for, any of {', '.join(METRICS)} (default: fid)")
    parser.add_argument("--num_features", type=int, default=10_000,
                        help="images (drawn at random, seeded) whose pool features are stored for precision, recall "
                             "and KID; ADM's reference batches hold 10,000")
    parser.add_argument("--seed", type=int, default=0, help="seed of that draw")
    parser.add_argument("--dinov2_model", default=DINOV2_MODEL,
                        help="DINOv2 for fd_dinov2: Hub id or local folder of a transformers Dinov2Model")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward on each process")
    parser.add_argument("--num_workers", type=int, default=4, help="image decoding processes of each process")
    parser.add_argument("--shard_size", type=int, default=10_000,
                        help="images per saved unit of work, whatever the number of processes")
    parser.add_argument("--shard_dir", default=None,
                        help="folder of the shard files, shared by every node; default: <output without .npz>_shards")
    return parser.parse_args(argv)


def compute(args):
    check_metrics(args.metrics)
    accelerator = Accelerator()
    if args.image_folder is not None:
        dataset = image_folder_dataset(args.image_folder)
    else:
        dataset = load_datasets_source(args.dataset_name, args.dataset_config_name, args.split)
    with accelerator.main_process_first():
        inception = load_inception(args.inception_weights, accelerator.device)
        dinov2 = load_dinov2(args.dinov2_model, accelerator.device) if "fd_dinov2" in args.metrics else None
    reference = dataset_reference(
        dataset, inception, accelerator, args.shard_dir or os.path.splitext(args.output)[0] + "_shards",
        args.metrics, dinov2, args.image_column, args.resolution, args.batch_size, args.num_workers,
        args.num_features, args.seed, args.shard_size,
    )
    if accelerator.is_main_process:
        save_reference(args.output, reference)
        print(f"wrote {args.output} ({', '.join(sorted(reference))} of {len(dataset)} images at {args.resolution} px)")
    accelerator.end_training()


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: compute(args))


if __name__ == "__main__":
    sys.exit(main())

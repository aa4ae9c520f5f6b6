"""Write a small synthetic image folder: one subfolder per shape (disc, square, triangle, cross, ring, bar).

Each image is a shape of random size, position and color on a random dark background, so a model trained on it
has to learn geometry rather than a color per class. A second built-in data set besides the quick start's digits,
for CPU-sized measurements (e.g. pipelines/benchmark_solvers.py).

    python training/make_shapes_dataset.py --output_dir shapes --resolution 32 --images_per_class 300
"""

import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from pixelrepa_diffusers.commands import OneLineArgumentParser, run_command

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center, radius: float, color) -> None:
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "disc":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=color)
    elif shape == "cross":
        width = radius / 3
        draw.rectangle((x - width, y - radius, x + width, y + radius), fill=color)
        draw.rectangle((x - radius, y - width, x + radius, y + width), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, round(radius / 3)))
    else:
        draw.rectangle((x - radius, y - radius / 4, x + radius, y + radius / 4), fill=color)


def make_shapes_dataset(output_dir: str, resolution: int = 32, images_per_class: int = 300, seed: int = 0) -> None:
    """Writes `images_per_class` PNGs of each of SHAPES to output_dir/<index>-<shape>/."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}.")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}.")
    rng = np.random.default_rng(seed)
    for index, shape in enumerate(SHAPES):
        folder = os.path.join(output_dir, f"{index}-{shape}")
        os.makedirs(folder, exist_ok=True)
        for number in range(images_per_class):
            background = tuple(int(value) for value in rng.integers(0, 80, 3))
            image = Image.new("RGB", (resolution, resolution), background)
            radius = rng.uniform(0.2, 0.4) * resolution
            center = rng.uniform(radius, resolution - radius, 2)
            color = tuple(int(value) for value in rng.integers(120, 256, 3))
            draw_shape(ImageDraw.Draw(image), shape, center, radius, color)
            image.save(os.path.join(folder, f"{number:04d}.png"))


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="The image folder to write.")
    parser.add_argument("--resolution", type=int, default=32, help="Image side in pixels.")
    parser.add_argument("--images_per_class", type=int, default=300, help="Images of each shape.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of sizes, positions and colors.")
    args = parser.parse_args(argv)
    return run_command(lambda: write_shapes(args), errors=(ValueError, OSError), prog="make_shapes_dataset.py")


def write_shapes(args) -> None:
    make_shapes_dataset(args.output_dir, args.resolution, args.images_per_class, args.seed)
    print(f"Wrote {len(SHAPES)} x {args.images_per_class} images to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())

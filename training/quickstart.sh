#!/usr/bin/env bash
# Quick start: train a tiny PixelREPA model on scikit-learn's bundled digits (1797 8x8 images, classes 0-9,
# upscaled to 32 px, not flipped: a mirrored digit is another glyph) on CPU, then write a grid of samples, one row
# per digit, to quickstart_output/samples.png. About 6 minutes on 2 CPU cores. Nothing is downloaded but Python packages: the alignment encoder is a tiny
# randomly initialised DINOv2, so alignment here only shows the mechanics (real runs use facebook/dinov2-base).
#
#   bash training/quickstart.sh
#
# OUTPUT_DIR sets the output folder; PYTHON an existing interpreter with the project installed (skips .venv setup).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${OUTPUT_DIR:-quickstart_output}
if [ -z "${PYTHON:-}" ]; then
    bash .ci/setup_env.sh
    PYTHON=.venv/bin/python
fi
# One intra-op thread: the matrices are tiny, and a second thread mostly waits when the cores are shared.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)

echo "Writing the digits image folder and a tiny random DINOv2 (no pretrained weights) to $OUTPUT_DIR"
"$PYTHON" - "$OUTPUT_DIR" <<'EOF'
import sys

import torch
from transformers import Dinov2Config, Dinov2Model

from pixelrepa_diffusers.data import make_quickstart_dataset

output_dir = sys.argv[1]
make_quickstart_dataset(f"{output_dir}/digits", resolution=32)
torch.manual_seed(0)
config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
                      patch_size=8)
Dinov2Model(config).save_pretrained(f"{output_dir}/tiny-dinov2-random")
EOF

"$PYTHON" training/train_pixelrepa.py \
    --train_data_dir "$OUTPUT_DIR/digits" \
    --model_config_path training/configs/quickstart_jit.json \
    --resolution 32 --no-random_flip \
    --alignment pixelrepa \
    --encoder "$OUTPUT_DIR/tiny-dinov2-random" --encoder_resolution 32 --encoder_patch_size 8 \
    --train_batch_size 64 \
    --learning_rate 2e-3 --lr_warmup_steps 50 \
    --max_train_steps 800 \
    --ema_decays 0.99 0.999 \
    --guidance_scale 2.0 \
    --mixed_precision no \
    --dataloader_num_workers 0 \
    --checkpointing_steps 200 \
    --logging_steps 50 \
    --validation_steps 200 --validation_classes 0 1 2 3 4 5 6 7 8 9 --validation_num_inference_steps 20 \
    --report_to tensorboard \
    --output_dir "$OUTPUT_DIR/model"

"$PYTHON" - "$OUTPUT_DIR" <<'EOF'
import sys

import torch
from diffusers.utils import make_image_grid

from pixelrepa_diffusers import PixelREPAPipeline

output_dir = sys.argv[1]
pipeline = PixelREPAPipeline.from_pretrained(f"{output_dir}/model")
columns = 10
labels = [digit for digit in range(10) for _ in range(columns)]
images = pipeline(labels, generator=torch.Generator().manual_seed(0)).images
make_image_grid(images, rows=10, cols=columns).save(f"{output_dir}/samples.png")
print(f"Wrote {output_dir}/samples.png: row d holds {columns} samples of digit d")
EOF
echo "Done in $(( $(date +%s) - start )) s; the pipeline is in $OUTPUT_DIR/model"

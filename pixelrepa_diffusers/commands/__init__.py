"""The command-line tools installed as console scripts: pixelrepa-convert, pixelrepa-generate, pixelrepa-evaluate and
pixelrepa-push. The scripts in the repository's pipelines/ folder are thin entries to them."""

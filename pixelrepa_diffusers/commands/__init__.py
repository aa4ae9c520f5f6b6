"""The command-line tools installed as console scripts (pixelrepa-convert, pixelrepa-generate, pixelrepa-push)."""

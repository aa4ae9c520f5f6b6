"""The training script and the tools around it (dataset preparation, the training benchmark)."""

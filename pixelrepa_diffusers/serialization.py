"""Loading torch pickles (`torch.load(weights_only=True)`) without running the code they may hold."""

import pickle


def pickled_code_refusal(what: str, error: pickle.UnpicklingError) -> ValueError:
    """The error for a file that `torch.load(weights_only=True)` refused: PyTorch's reason, without its advice to
    retry with weights_only=False, which runs the file's code."""
    parts = [part.strip() for part in str(error).split("\n\n")]
    reason = " ".join(part for part in parts if part and "weights_only" not in part)
    return ValueError(f"refusing to load {what}: it holds pickled objects outside the weights-only allow-list "
                      f"({reason})")

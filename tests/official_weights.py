"""Official PixelREPA / JiT checkpoints of random weights (see pipelines/official_code.py), and their manifests."""

import json

import torch


def load_manifest(path):
    """Read a JSON list of [key, shape] pairs into a list of (key, shape tuple)."""
    with open(path) as file:
        entries = json.load(file)
    return [(key, tuple(shape)) for key, shape in entries]


def official_adamw_groups(model_state):
    """The official AdamW parameter groups (util/misc.py add_weight_decay) as lists of Denoiser parameter names."""
    trainable = [key for key in model_state
                 if key.startswith(("net.", "masked_transformer_adapter.")) and key != "net.pos_embed"]
    no_decay = [key for key in trainable if model_state[key].ndim == 1 or key.endswith(".bias")]
    decay = [key for key in trainable if key not in no_decay]
    return no_decay, decay


def official_training_checkpoint(net_state, adapter_state, other_state, args, epoch, seed):
    """
    A checkpoint-last.pth dict as the official PixelREPA code saves it (util/misc.py save_model), with random non-zero
    EMAs and AdamW moments for every trainable parameter. `other_state` holds the Denoiser's remaining entries (frozen
    encoder, normalisation buffers). Without `adapter_state`, the JiT layout: `net.` keys in all three weight entries.
    """
    generator = torch.Generator().manual_seed(seed)
    model = {f"net.{key}": value for key, value in net_state.items()}
    model.update(other_state)
    if adapter_state is not None:
        model.update({f"masked_transformer_adapter.{key}": value for key, value in adapter_state.items()})
    emas = []
    for _ in range(2):
        ema = {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in net_state.items()}
        ema["pos_embed"] = net_state["pos_embed"]  # frozen: its average is itself
        emas.append(ema if adapter_state is not None else {f"net.{key}": value for key, value in ema.items()})
    groups = official_adamw_groups(model)
    state, param_groups, index = {}, [], 0
    for names, weight_decay in zip(groups, (0.0, args.weight_decay)):
        indices = list(range(index, index + len(names)))
        for position, name in zip(indices, names):
            shape = model[name].shape
            state[position] = {
                "step": torch.tensor(float(epoch * 7 + 3)),
                "exp_avg": 1e-3 * torch.randn(shape, generator=generator),
                "exp_avg_sq": 1e-6 * (0.5 + torch.rand(shape, generator=generator)),
            }
        param_groups.append(dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, amsgrad=False,
                                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                                 decoupled_weight_decay=True, params=indices))
        index += len(names)
    return {"model": model, "optimizer": {"state": state, "param_groups": param_groups}, "epoch": epoch,
            "args": args, "model_ema1": emas[0], "model_ema2": emas[1]}


def official_checkpoint_dict(denoiser_state, checkpoint_format, args, weights="ema1", other_value=0.01):
    """
    A checkpoint-last.pth dict as the official save_model writes it, from an official Denoiser.state_dict().

    "pixelrepa" (kaist-cvml/PixelREPA): `model` is the whole Denoiser, the EMAs hold the backbone without `net.`.
    "jit" (LTH14/JiT): `model`, `model_ema1` and `model_ema2` are all whole-Denoiser state dicts (`net.*`).
    The backbone of the entry named by `weights` (ema1, ema2 or model) is `denoiser_state`'s; the other entries'
    backbones are the constant `other_value`, stored as one element, so a wrong pick changes every output.
    """
    entries = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}
    backbone = {key: value for key, value in denoiser_state.items() if key.startswith("net.")}
    stand_in = {key: torch.full((1,), other_value).expand(value.shape) for key, value in backbone.items()}
    checkpoint = {}
    for name, entry in entries.items():
        chosen = backbone if name == weights else stand_in
        if checkpoint_format == "pixelrepa" and name != "model":
            checkpoint[entry] = {key[len("net.") :]: value for key, value in chosen.items()}
        elif checkpoint_format == "pixelrepa":
            checkpoint[entry] = {**denoiser_state, **chosen}
        else:
            checkpoint[entry] = dict(chosen)
    checkpoint.update(
        optimizer={"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "weight_decay": 0.0,
                                                  "params": list(range(len(denoiser_state)))}]},
        epoch=599,
        args=args,
    )
    return checkpoint

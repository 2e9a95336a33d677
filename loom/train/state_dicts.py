"""State dicts of a laid-out model and its optimizers under the whole model's parameter names, so
a checkpoint loads under any tp, pp, dp, cp or world size (DTensor shards under FSDP/TP are
saved as they are: torch.distributed.checkpoint reshards them); and each rank's RNG states."""
from __future__ import annotations

import torch
from torch import nn

from loom.parallel.pipeline import tied_copy

TIED_COPY, TIED_SOURCE = "output.weight", "tok_embeddings.weight"


def _checkpoint_names(part: nn.Module) -> dict[str, str]:
    """A part's own state-dict names -> the names its checkpoint entries have: the same, except
    that a pipeline's last-stage copy of a tied output weight is saved and loaded as the
    embedding it copies (one tensor in every checkpoint, whatever the layout)."""
    return {TIED_COPY: TIED_SOURCE} if tied_copy(part) is not None else {}


def _renamed(d: dict, names: dict[str, str], optimizer: bool = False) -> dict:
    """d with its keys renamed by `names` (parameter name -> name in the checkpoint): model
    entries are parameter names, flattened optimizer entries 'state.<parameter name>.<state>'."""
    if not names:
        return d

    def rename(key: str) -> str:
        if not optimizer:
            return names.get(key, key)
        for own, saved in names.items():
            prefix = f"state.{own}."
            if key.startswith(prefix):
                return f"state.{saved}.{key[len(prefix):]}"
        return key

    return {rename(k): v for k, v in d.items()}


def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Full-model name -> parameter (a DTensor shard under FSDP/TP) over this rank's model parts
    (pipeline stages keep the names of the whole model)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(_renamed(get_model_state_dict(part), _checkpoint_names(part)))
    return out


def set_model_state(parts: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Load `state` (checkpoint names, see model_state) into this rank's parts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for part in parts:
        names = _checkpoint_names(part)
        own = {names.get(k, k): k for k in part.state_dict().keys()}
        # Not strict: `state` may be a part of the model (a LoRA checkpoint's adapters, a base's
        # weights without them); DCP has already refused a checkpoint that lacks what was asked.
        set_model_state_dict(part, {own[k]: v for k, v in state.items() if k in own},
                             options=StateDictOptions(strict=False))


def _optim_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict:
    """'state.<param name>.<exp_avg|exp_avg_sq|step>' -> tensor, over all parts. Hyperparameters
    (param_groups) are left out: they are not tensors and come from the config."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out: dict[str, torch.Tensor] = {}
    for part, opt in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, opt, options=_optim_options())
        flat = _renamed({k: v for k, v in flat.items() if k.startswith("state.")}, _checkpoint_names(part), True)
        out.update(flat)
    return out


def load_optimizer_state(parts, optimizers, state: dict) -> None:
    """Put loaded 'state.*' tensors into the optimizers, keeping their own param_groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for part, opt in zip(parts, optimizers):
        flat = get_optimizer_state_dict(part, opt, options=_optim_options())
        saved_as = _renamed({k: k for k in flat}, _checkpoint_names(part), True)  # checkpoint name -> own
        flat.update({own: state[k] for k, own in saved_as.items() if k in state})
        set_optimizer_state_dict(part, opt, flat, options=_optim_options())


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

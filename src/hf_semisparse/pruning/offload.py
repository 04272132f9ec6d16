"""Read and write a target weight whether it sits in the module or is offloaded by accelerate (cpu/disk).

A model loaded with a `device_map` holding "cpu" or "disk" keeps some weights outside their modules: accelerate's
`AlignDevicesHook` loads them from a weights map before each forward and puts the module back on the meta
device after. Pruning such a weight means writing the new values into that weights map.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def offload_hook(module: nn.Module):
    """accelerate's offloading hook of `module` (None when its weights live in the module)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return None
    hooks = getattr(hook, "hooks", [hook])  # SequentialHook
    for h in hooks:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_offloaded(module: nn.Module) -> bool:
    return offload_hook(module) is not None


def read_weight(module: nn.Module, device: torch.device | None = None, name: str = "weight") -> torch.Tensor:
    """The module's parameter `name` as stored (parameter layout), on `device` (default: where it is)."""
    hook = offload_hook(module)
    weight = hook.weights_map[name] if hook is not None else getattr(module, name).detach()
    return weight if device is None else weight.to(device)


def write_weight(module: nn.Module, new: torch.Tensor, name: str = "weight") -> None:
    """Replace the module's parameter `name` (parameter layout, same shape) with `new`, cast to its dtype."""
    hook = offload_hook(module)
    if hook is None:
        param = getattr(module, name)
        with torch.no_grad():
            param.copy_(new.to(param.dtype))
        return
    weights_map = hook.weights_map
    dataset = getattr(weights_map, "dataset", weights_map)
    key = f"{getattr(weights_map, 'prefix', '')}{name}"
    old = weights_map[name]
    value = new.detach().to(device=old.device, dtype=old.dtype).contiguous()
    state_dict = getattr(dataset, "state_dict", None)
    index = getattr(dataset, "index", None)
    folder = getattr(dataset, "save_folder", None)
    if isinstance(dataset, dict):
        dataset[key] = value
    elif state_dict is not None and key in state_dict:
        state_dict[key] = value
    elif index is not None and key in index and "safetensors_file" not in index[key] and folder is not None:
        from accelerate.utils import offload_weight

        offload_weight(value.cpu(), key, folder, index=index)  # accelerate's own scratch file, rewritten
    elif state_dict is not None:
        # the weight is read straight from the user's checkpoint file, which must never be modified: keep the
        # pruned value in memory instead
        logger.debug(
            "%s: offloaded weight comes from a checkpoint file; the pruned value stays in memory", key
        )
        state_dict[key] = value.cpu()
    else:  # pragma: no cover - an offload layout accelerate does not produce today
        raise TypeError(
            f"cannot write the offloaded weight {key}: unknown weights map {type(dataset).__name__}"
        )

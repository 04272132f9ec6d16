"""Sibling projections of one input (BERT's query/key/value, LLaMA's q/k/v and gate/up) as one 2:4 GEMM.

BERT's self-attention runs `self.query(h)`, `self.key(h)` and `self.value(h)`: three GEMMs that each read `h`.
One GEMM over the concatenated weights reads it once and has a wider output, which the 2:4 kernels run more
efficiently: on an H100 with cuSPARSELt 0.8, bert-base's three 768x768 projections at M = 24576 take 145.8 us
one by one and 118.7 us as one 2304x768 GEMM (docs/performance.md).

`fuse_projections` replaces each sibling by a `ProjectionSlice`. The first slice called with an input runs the
joined `SemiSparseLinear` and keeps its output; its siblings called with that same tensor object return their
columns of it (views, no copy). State dict keys do not change: each slice's `weight` and `bias` are views of its
rows of the joined weight.
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# child names that, in transformers models, are projections of one input
SIBLING_SETS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_is_compiling = torch.compiler.is_compiling
_WARNED: set[int] = set()
_GROUPS: weakref.WeakValueDictionary[int, ProjectionGroup] = weakref.WeakValueDictionary()


class ProjectionGroup:
    """The joined `SemiSparseLinear` of sibling projections, and the output its slices share (per thread).

    Not a module: the slices own the state dict entries (views of `layer`'s weight), so the joined layer must
    not add its own. `semi_sparse_layers(model)` finds it for dispatch tuning.
    """

    def __init__(self, layer: nn.Module, names: list[str], bounds: list[tuple[int, int]], where: str) -> None:
        self.layer, self.names, self.bounds, self.where = layer, names, bounds, where
        self.separate = False  # set when the siblings turn out to read different inputs
        self.one_input = False  # the siblings always read one input (decoder-only models): see compiled_part
        self._local = threading.local()
        _GROUPS[layer._id] = self

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s projection of `x`: its columns of the joined GEMM's output for this very tensor."""
        state = self._local
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version counter
        if getattr(state, "input", None) is not x or state.version != version:
            if getattr(state, "pending", None):
                self._siblings_disagree()
                if self.separate:
                    return self.slice_forward(x, index)
            state.input, state.version, state.output = x, version, self.layer(x)
            state.pending = set(range(len(self.bounds)))
        start, stop = self.bounds[index]
        out = state.output[..., start:stop]
        state.pending.discard(index)
        if not state.pending:  # every sibling has its part: let go of the input and the joined output
            state.input = state.output = None
        return out

    def compiled_part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """`part` inside a compiled graph (the custom op `joined_part`), as a new tensor.

        A traced graph cannot hold `part`'s Python state, but the op's body runs at call time: the first sibling
        of a round (inductor may order them as it likes) runs the joined GEMM; the others copy their columns
        from its output, which is let go once every sibling has taken its part (so nothing stays allocated
        between calls: CUDA graph trees check that). Under CUDA graphs the copies replay from the joined output's
        recorded address. Inductor may hand the siblings different buffers holding the same input; with
        `one_input` (the self-attention and MLP siblings of decoder-only models) a round is complete when every
        sibling took its part of an input of the same shape and dtype, whatever the buffers; otherwise a buffer
        not seen in the round starts a new one.
        """
        state = self._local
        pending = getattr(state, "compiled_pending", None)
        key = (x.data_ptr(), tuple(x.shape), x.dtype)
        previous = getattr(state, "compiled_key", None)
        same_input = previous == key or (self.one_input and previous is not None and previous[1:] == key[1:])
        same_round = pending and index in pending and same_input
        if not same_round:
            state.compiled_key, state.compiled_output = key, self.layer.run(x)
            state.compiled_pending = pending = set(range(len(self.bounds)))
        start, stop = self.bounds[index]
        out = state.compiled_output[..., start:stop].contiguous()  # columns of a row-major output: a copy
        pending.discard(index)
        if not pending:
            state.compiled_key = state.compiled_output = None
        return out

    def slice_forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index` on its own: dense on its rows where a dense copy is kept, else the joined GEMM."""
        start, stop = self.bounds[index]
        weight = self.layer.weight
        if weight is not None:
            bias = self.layer.bias
            return F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
        return self.layer(x)[..., start:stop]

    def _siblings_disagree(self) -> None:
        # a new input arrived before every sibling took its part of the last one (cross-attention: query reads
        # the decoder state, key and value the encoder's): the joined GEMM would compute unused columns
        if self.layer.weight is not None:
            self.separate = True
        if id(self) not in _WARNED:
            _WARNED.add(id(self))
            what = (
                "they now run one by one on their dense rows"
                if self.separate
                else "each of them runs the whole joined GEMM (no dense copy to run them alone)"
            )
            logger.warning(
                "hf_semisparse: the fused projections %s of %s are called on different inputs; %s. Pass "
                "accelerate_24(..., fuse_projections=False) to run them on 2:4 kernels one by one.",
                "+".join(self.names),
                self.where,
                what,
            )


class ProjectionSlice(nn.Module):
    """One projection of a `ProjectionGroup`: `slice(x)` equals the original `nn.Linear(x)`."""

    def __init__(self, group: ProjectionGroup, index: int, has_bias: bool = True) -> None:
        super().__init__()
        self.__dict__["group"] = group  # not a submodule: the joined layer has no state dict entries
        self.index, self.has_bias = index, has_bias
        start, stop = group.bounds[index]
        self.in_features, self.out_features = group.layer.in_features, stop - start
        self._alias_parameters()
        self.register_load_state_dict_post_hook(_after_load)
        if group.layer.weight is None:
            from .linear import refuse_state_dict_without_weight

            self.register_state_dict_post_hook(refuse_state_dict_without_weight)

    def _alias_parameters(self) -> None:
        start, stop = self.group.bounds[self.index]
        for name in ("weight", "bias"):
            full = getattr(self.group.layer, name)
            kept = full is not None and (name == "weight" or self.has_bias)  # no bias: its joined rows are 0
            self.register_parameter(
                name, nn.Parameter(full[start:stop], requires_grad=False) if kept else None
            )

    def extra_repr(self) -> str:
        start, stop = self.group.bounds[self.index]
        return (
            f"{self.group.names[self.index]} of {'+'.join(self.group.names)}: rows {start}:{stop} of one 2:4 GEMM "
            f"{self.group.layer.out_features}x{self.in_features}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group.separate:
            return group.slice_forward(x, self.index)
        if (
            _is_compiling()
        ):  # the shared output is per-call Python state: kept in the op's body, not the graph
            start, stop = group.bounds[self.index]
            return torch.ops.hf_semisparse.joined_part(
                x, group.layer.compressed, group.layer._id, self.index, start, stop
            )
        return group.part(x, self.index)


@torch.library.custom_op("hf_semisparse::joined_part", mutates_args=())
def joined_part(
    x: torch.Tensor, compressed: torch.Tensor, layer_id: int, index: int, start: int, stop: int
) -> torch.Tensor:
    """Sibling `index`'s projection of `x` (columns `start:stop` of the joined 2:4 GEMM), in compiled graphs."""
    from .tuning import compiled_call

    group = _GROUPS.get(layer_id)
    if group is None:
        raise RuntimeError(f"the joined projections of SemiSparseLinear {layer_id} no longer exist")
    with compiled_call():
        return group.compiled_part(x, index)


@joined_part.register_fake
def _(x, compressed, layer_id, index, start, stop):
    return x.new_empty(*x.shape[:-1], stop - start)


def _after_load(module: ProjectionSlice, incompatible_keys) -> None:
    """After `load_state_dict`: the loaded rows go into the joined weight (with `assign=True` they arrive as new
    tensors), the slice views it again, and the joined layer compresses it again."""
    from .linear import _after_load as compress_again

    group = module.group
    start, stop = group.bounds[module.index]
    with torch.no_grad():
        for name in ("weight", "bias"):
            loaded, full = module._parameters.get(name), getattr(group.layer, name)
            if loaded is not None and full is not None and loaded.data_ptr() != full[start:stop].data_ptr():
                full[start:stop].copy_(loaded)
    module._alias_parameters()
    compress_again(group.layer, incompatible_keys)


def _joinable(linears: list[nn.Module]) -> bool:
    first = linears[0]
    return all(
        type(lin) is nn.Linear
        and lin.in_features == first.in_features
        and lin.weight.dtype == first.weight.dtype
        and lin.weight.device == first.weight.device
        for lin in linears
    )


def fuse_projections(
    model: nn.Module, eligible: set[str], keep_dense: bool = True, kernel: str = "cusparselt"
) -> dict[str, list[str]]:
    """Replace sibling projections (`SIBLING_SETS`) of `model` by `ProjectionSlice`s of one joined
    `SemiSparseLinear`, in place. Only `nn.Linear` children whose names are all in `eligible` (2:4 layers that
    can run on the 2:4 kernels), of one input width, dtype and device, are joined.

    Returns {parent module name: [joined child names]}.
    """
    from .linear import SemiSparseLinear

    joined: dict[str, list[str]] = {}
    for parent_name, parent in list(model.named_modules()):
        for names in SIBLING_SETS:
            full = [f"{parent_name}.{n}" if parent_name else n for n in names]
            linears = [getattr(parent, n, None) for n in names]
            if not all(name in eligible for name in full) or not _joinable(linears):
                continue
            bounds, start = [], 0
            for lin in linears:
                bounds.append((start, start + lin.out_features))
                start += lin.out_features
            cat = nn.Linear(linears[0].in_features, start, bias=False, device="meta")
            with torch.no_grad():
                cat.weight = nn.Parameter(
                    torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False
                )
                if any(lin.bias is not None for lin in linears):
                    cat.bias = nn.Parameter(
                        torch.cat(
                            [
                                lin.bias.detach()
                                if lin.bias is not None
                                else lin.weight.new_zeros(lin.out_features)
                                for lin in linears
                            ]
                        ),
                        requires_grad=False,
                    )
            group = ProjectionGroup(
                SemiSparseLinear(cat, keep_dense=keep_dense, kernel=kernel), list(names), bounds, parent_name
            )
            for index, (name, lin) in enumerate(zip(names, linears, strict=True)):
                setattr(parent, name, ProjectionSlice(group, index, has_bias=lin.bias is not None))
            joined[parent_name] = list(names)
    if joined:
        logger.info("hf_semisparse: %d groups of sibling projections run as one 2:4 GEMM each", len(joined))
    return joined


def semi_sparse_layers(model: nn.Module) -> list[nn.Module]:
    """Every `SemiSparseLinear` that runs in `model`'s forward: its modules, and the joined layers of its
    `ProjectionSlice`s (which are not modules of the model)."""
    from .linear import SemiSparseLinear

    layers: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, SemiSparseLinear):
            layers[id(module)] = module
        elif isinstance(module, ProjectionSlice):
            layers.setdefault(id(module.group.layer), module.group.layer)
    return list(layers.values())

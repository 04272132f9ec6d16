"""Sibling projections of one input (BERT's query/key/value, LLaMA's q/k/v and gate/up) as one 2:4 GEMM.

BERT's self-attention runs `self.query(h)`, `self.key(h)` and `self.value(h)`: three GEMMs that each read `h`.
One GEMM over the concatenated weights reads it once and has a wider output, which the 2:4 kernels run more
efficiently: on an H100 with cuSPARSELt 0.8, bert-base's three 768x768 projections at M = 24576 take 145.8 us
one by one and 118.7 us as one 2304x768 GEMM (docs/performance.md).

`fuse_projections` replaces each sibling by a `ProjectionSlice`. The first slice called with an input runs the
joined `SemiSparseLinear` and keeps its output; its siblings called with that same tensor object return their
columns of it (views, no copy). State dict keys do not change: each slice's `weight` and `bias` are views of its
rows of the joined weight.

Under torch.compile the same happens while Dynamo traces: the first sibling puts one `hf_semisparse::linear_24`
call of the joined layer into the graph, and its siblings, traced with that same input, take column slices of its
output, so the compiled graph has one 2:4 GEMM per group and input and no copy of its columns (`traced_part`).
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# child names that, in transformers models, are projections of one input
SIBLING_SETS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_is_compiling = torch.compiler.is_compiling
_WARNED: set[int] = set()


class ProjectionGroup:
    """The joined `SemiSparseLinear` of sibling projections, and the output its slices share (per thread).

    Not a module: the slices own the state dict entries (views of `layer`'s weight), so the joined layer must
    not add its own. `semi_sparse_layers(model)` finds it for dispatch tuning.
    """

    def __init__(self, layer: nn.Module, names: list[str], bounds: list[tuple[int, int]], where: str) -> None:
        self.layer, self.names, self.bounds, self.where = layer, names, bounds, where
        self.separate = False  # set when the siblings turn out to read different inputs
        self.one_input = False  # the siblings always all read one input (no cross-attention): see traced_part
        self._local = threading.local()

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

    def traced_part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """`part` while Dynamo traces: sibling `index`'s columns of one joined GEMM in the graph, as a view.

        The first sibling traced with `x` puts the joined layer's call (`hf_semisparse::linear_24`) into the graph;
        a sibling traced next with the same traced tensor slices that call's output. The round's state lives in
        `_TRACED_ROUND` during tracing only (Dynamo records the attribute writes and replays the last, None): it is
        cleared once every sibling took its part, so no traced tensor outlives the trace. One that did would become
        an extra graph output, kept in the CUDA graph trees' pool, and its next value would fail Dynamo's guards.

        Rounds are shared only by siblings that always all read one input (`one_input`: self-attention and MLP
        groups; a cross-attention's key and value read the encoder's states, or are not computed once cached).
        The others run one by one (`slice_forward`), as do siblings of a `one_input` group found reading different
        inputs during a trace: that group is marked not `one_input` (the next call compiles again), as eager calls
        mark it `separate`.
        """
        if not self.one_input:
            return self.slice_forward(x, index)
        bit, done = 1 << index, (1 << len(self.bounds)) - 1
        # (group, input, joined output, bits of the siblings that took their part), or None
        state = _TRACED_ROUND.state
        if state is not None and state[0] is self and not state[3] & bit:
            if state[1] is not x:  # a sibling of this round reads another input
                self.one_input = False
                _TRACED_ROUND.state = None
                return self.slice_forward(x, index)
            output, taken = state[2], state[3] | bit
        else:  # a new round; one left unfinished by another group is dropped (its slices are traced already)
            output, taken = self.layer(x), bit
        _TRACED_ROUND.state = None if taken == done else (self, x, output, taken)
        start, stop = self.bounds[index]
        return output[..., start:stop]

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
        if _is_compiling():  # one joined call per input in the traced graph, each sibling a view of it
            return group.traced_part(x, self.index)
        return group.part(x, self.index)


class _TracedRound:
    """The round of joined projections being traced (`ProjectionGroup.traced_part`); None outside one."""

    state: tuple | None = None


_TRACED_ROUND = _TracedRound()


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


# transformers' names of attentions whose key and value read another input than their query (and are not computed
# once cached), besides those with "cross" or "encoder_attn" in them: Pix2Struct's decoder, T5's, SAM's two-way
# blocks (parts of a name), Kosmos-2's text model (a whole module name)
_OTHER_INPUT_PARTS = ("encoder_decoder_attention", "encdecattention", "token_to_image", "image_to_token")
_OTHER_INPUT_NAMES = ("x_attn",)


def reads_one_input(parent_name: str, parent: nn.Module) -> bool:
    """Whether the siblings of `parent` always all read one input: not a cross-attention (whose key and value read
    the encoder's states, or are not computed once cached), by transformers' module names (`crossattention`,
    `encoder_attn`, `cross_attn`, `*CrossAttention`, and those above). A cross-attention missed here costs one
    recompile (the trace finds the different inputs), or, where only its query runs (once its key and value are
    cached), a joined output kept from one call to the next and an extra graph output."""
    where = f"{parent_name}.{type(parent).__name__}".lower()
    if "cross" in where or "encoder_attn" in where or any(part in where for part in _OTHER_INPUT_PARTS):
        return False
    return not any(name in _OTHER_INPUT_NAMES for name in where.split("."))


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
            group.one_input = reads_one_input(parent_name, parent)
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

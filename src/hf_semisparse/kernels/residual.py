"""The residual add of BERT-style output blocks, and the GELU of BERT-style intermediate blocks, fused into the 2:4
GEMM that precedes them.

BERT's `BertSelfOutput` and `BertOutput` (and every transformers block copied from them: RoBERTa, ELECTRA,
XLM-R, ...) run `LayerNorm(dropout(dense(h)) + residual)`. In inference the dropout is the identity, so the add
can be the sparse GEMM's epilogue (`SemiSparseLinear(x, residual=r)`): one pass less over the activations per
block, two per transformer layer. A block is fused only when its `forward` is BERT's own code (compared as
bytecode), so a model whose block does something else is never changed.

`BertIntermediate` runs `act(dense(h))`; where `act` is transformers' exact GELU, `FusedGeluIntermediate` asks
`dense` for `gelu=True`, which our CUTLASS kernels apply in their epilogue (`kernels/cutlass_sm90.py`).
"""

from __future__ import annotations

import logging
from types import CodeType

import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


class FusedResidualOutput(nn.Module):
    """A BERT-style output block whose residual add runs inside its `dense` layer's 2:4 GEMM.

    It keeps the block's submodules under their names (`dense`, `dropout`, `LayerNorm`), so state dicts are
    unchanged. In training mode with a non-zero dropout it runs the original order (dense, dropout, add).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = block.dense, block.dropout, block.LayerNorm
        self.replaces = type(block).__name__
        self.training = block.training

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"

    def forward(self, hidden_states, input_tensor):
        if self.dropout.training and self.dropout.p > 0:  # the dropout's own mode: set by .train()/.eval()
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        return self.LayerNorm(self.dense(hidden_states, residual=input_tensor))


class FusedGeluIntermediate(nn.Module):
    """A BERT-style intermediate block (`gelu(dense(h))`) whose GELU may run in its `dense` layer's 2:4 GEMM.

    Submodule names (`dense`, `intermediate_act_fn`) are kept, so state dicts are unchanged.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense, self.intermediate_act_fn = block.dense, block.intermediate_act_fn
        self.replaces = type(block).__name__
        self.training = block.training

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}"

    def forward(self, hidden_states):
        return self.dense(hidden_states, gelu=True)


def is_exact_gelu(act: nn.Module) -> bool:
    """Whether `act` is transformers' `GELUActivation` running `F.gelu` (erf), unchanged on the instance."""
    from transformers.activations import GELUActivation

    return (
        type(act) is GELUActivation
        and getattr(act, "act", None) is F.gelu
        and "forward" not in act.__dict__
        and type(act).forward is GELUActivation.forward
    )


def is_bert_style_intermediate(module: nn.Module, dense_type: type | None = None) -> bool:
    """Whether `module` is a BERT intermediate block (BERT's `forward`) with exact GELU and a `dense` of
    `dense_type` (default `SemiSparseLinear`)."""
    from transformers.models.bert import modeling_bert

    from .linear import SemiSparseLinear

    if not (
        isinstance(getattr(module, "dense", None), dense_type or SemiSparseLinear)
        and is_exact_gelu(getattr(module, "intermediate_act_fn", None))
    ):
        return False
    code = getattr(type(module).forward, "__code__", None)
    if code is None or "forward" in module.__dict__:
        return False
    return _same_code(code, modeling_bert.BertIntermediate.forward.__code__)


def fuse_gelu(model: nn.Module) -> list[str]:
    """Replace every BERT-style intermediate block of `model` with exact GELU and a `SemiSparseLinear` dense by a
    `FusedGeluIntermediate`, in place. Returns the names of the blocks replaced."""
    fused = _replace_blocks(model, is_bert_style_intermediate, FusedGeluIntermediate)
    if fused:
        logger.info("hf_semisparse: GELU handed to the 2:4 GEMM of %d blocks", len(fused))
    return fused


def _replace_blocks(model: nn.Module, matches, wrap) -> list[str]:
    """Replace, in place, every submodule for which `matches(module)` holds by `wrap(module)`; their names."""
    replaced = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name and matches(module):
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, wrap(module))
            replaced.append(name)
    return replaced


def _reference_codes() -> list[CodeType]:
    from transformers.models.bert import modeling_bert

    return [modeling_bert.BertSelfOutput.forward.__code__, modeling_bert.BertOutput.forward.__code__]


def _same_code(a: CodeType, b: CodeType) -> bool:
    return (a.co_code, a.co_names, a.co_consts, a.co_varnames, a.co_argcount) == (
        b.co_code,
        b.co_names,
        b.co_consts,
        b.co_varnames,
        b.co_argcount,
    )


def is_bert_style_output(
    module: nn.Module, references: list[CodeType] | None = None, dense_type: type | None = None
) -> bool:
    """Whether `module` is a BERT output block (its `forward` is BERT's code) with a `dense` of `dense_type`
    (default `SemiSparseLinear`)."""
    from .linear import SemiSparseLinear

    if not (
        isinstance(getattr(module, "dense", None), dense_type or SemiSparseLinear)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
    ):
        return False
    code = getattr(type(module).forward, "__code__", None)
    if code is None or "forward" in module.__dict__:  # a forward patched on the instance is not BERT's
        return False
    return any(_same_code(code, ref) for ref in references or _reference_codes())


def fusion_targets(model: nn.Module, residual: bool = True, gelu: bool = True) -> set[str]:
    """Names of the `nn.Linear` layers whose output an epilogue would take once they run on 2:4 kernels: the
    `dense` of BERT-style output blocks (`residual`) and of BERT-style intermediate blocks with exact GELU
    (`gelu`). `accelerate_24(kernel="auto")` puts these on our CUTLASS kernels, whose epilogues do both."""
    references = _reference_codes()
    names = set()
    for name, module in model.named_modules():
        if (residual and is_bert_style_output(module, references, dense_type=nn.Linear)) or (
            gelu and is_bert_style_intermediate(module, dense_type=nn.Linear)
        ):
            names.add(f"{name}.dense" if name else "dense")
    return names


def fuse_residual_adds(model: nn.Module) -> list[str]:
    """Replace every BERT-style output block of `model` whose `dense` is a `SemiSparseLinear` by a
    `FusedResidualOutput`, in place. Returns the names of the blocks replaced."""
    references = _reference_codes()
    fused = _replace_blocks(
        model, lambda module: is_bert_style_output(module, references), FusedResidualOutput
    )
    if fused:
        logger.info("hf_semisparse: residual add fused into the 2:4 GEMM of %d blocks", len(fused))
    return fused

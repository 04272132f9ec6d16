"""The residual add of BERT-style output blocks, fused into the 2:4 GEMM that precedes it.

BERT's `BertSelfOutput` and `BertOutput` (and every transformers block copied from them: RoBERTa, ELECTRA,
XLM-R, ...) run `LayerNorm(dropout(dense(h)) + residual)`. In inference the dropout is the identity, so the add
can be the sparse GEMM's epilogue (`SemiSparseLinear(x, residual=r)`): one pass less over the activations per
block, two per transformer layer. A block is fused only when its `forward` is BERT's own code (compared as
bytecode), so a model whose block does something else is never changed.
"""

from __future__ import annotations

import logging
from types import CodeType

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


def is_bert_style_output(module: nn.Module, references: list[CodeType] | None = None) -> bool:
    """Whether `module` is a BERT output block (its `forward` is BERT's code) with a `SemiSparseLinear` dense."""
    from .linear import SemiSparseLinear

    if not (
        isinstance(getattr(module, "dense", None), SemiSparseLinear)
        and isinstance(getattr(module, "dropout", None), nn.Dropout)
        and isinstance(getattr(module, "LayerNorm", None), nn.LayerNorm)
    ):
        return False
    code = getattr(type(module).forward, "__code__", None)
    if code is None or "forward" in module.__dict__:  # a forward patched on the instance is not BERT's
        return False
    return any(_same_code(code, ref) for ref in references or _reference_codes())


def fuse_residual_adds(model: nn.Module) -> list[str]:
    """Replace every BERT-style output block of `model` whose `dense` is a `SemiSparseLinear` by a
    `FusedResidualOutput`, in place. Returns the names of the blocks replaced."""
    references = _reference_codes()
    fused = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name or not is_bert_style_output(module, references):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, FusedResidualOutput(module))
        fused.append(name)
    if fused:
        logger.info("hf_semisparse: residual add fused into the 2:4 GEMM of %d blocks", len(fused))
    return fused

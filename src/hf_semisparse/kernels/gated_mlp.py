"""SiLU-gated MLPs (LLaMA, Mistral, Qwen) whose gate/up projections run as one joined 2:4 GEMM: the SiLU product
in one pass over the joined output, at prefill sizes.

`LlamaMLP.forward` computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`. With gate/up joined
(`projections.py`), `gate_proj(x)` and `up_proj(x)` are column views of one `[tokens, 2 x intermediate]` output,
and torch runs SiLU and the product on such strided views with its generic elementwise kernel instead of the
vectorised one: on an H200 (fp16, Llama-3-8B shapes, 2,048 tokens, 2026-12-03,
`benchmarks/probes/probe_prefill_profile.py`) 83 and 84 us per block against dense's 31 and 39 us on contiguous
outputs; one pass takes 41 us, and a 32-block prefill went from 55.9 to 51.5 ms. `fuse_gated_mlps` gives such MLPs a forward that, in eager calls
of more than `DECODE_MAX` tokens, computes `silu(gate) * up` in one Triton kernel reading the joined output
(`silu_mul`); compiled calls (inductor fuses the same ops itself), decode sizes, CPU tensors, hooked projections
or activations, inputs that need a gradient and machines without Triton run the model's own forward, and where
Triton fails the MLPs go back to it for good (said once). `unfuse_gated_mlps` undoes it.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
import types

import torch
from torch import nn

from .buckets import DECODE_MAX

logger = logging.getLogger(__name__)

_is_compiling = torch.compiler.is_compiling
# transformers' gated MLP, as LLaMA, Mistral, Qwen2/3 and others write it: the whole body of its forward, with
# its argument called x, is `return <this>` or `down_proj = <this>` then `return down_proj`
GATED_MLP_EXPRESSION = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


try:  # Triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU builds, or a Triton that does not import: the model's own forward
    triton = None

if triton is not None:

    @triton.jit
    def _silu_mul_kernel(y_ptr, out_ptr, cols, y_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < cols
        gate = tl.load(y_ptr + row * y_stride + col, mask=mask)
        up = tl.load(y_ptr + row * y_stride + cols + col, mask=mask)
        g = gate.to(tl.float32)
        # rounded as torch rounds F.silu(gate) * up: SiLU in float32 to the dtype, then the product
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * out_stride + col, (silu * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """`F.silu(y[:, :n]) * y[:, n:]` for `y` of shape `[rows, 2n]` (fp16 or bf16, CUDA, unit column stride): one
    Triton kernel reading `y` once; returns a contiguous `[rows, n]` tensor of `y`'s dtype. The SiLU is rounded to
    the dtype before the product, as torch's two ops round it.

    Raises:
        ValueError: `y` is not 2-D with an even number of columns and unit column stride.
        RuntimeError: Triton is not installed.
    """
    if y.dim() != 2 or y.shape[1] % 2 or y.stride(1) != 1:
        raise ValueError(
            f"silu_mul takes [rows, 2n] with unit column stride, got {tuple(y.shape)} {y.stride()}"
        )
    if triton is None:
        raise RuntimeError("silu_mul needs Triton (it comes with CUDA builds of torch)")
    rows, cols = y.shape[0], y.shape[1] // 2
    out = torch.empty(rows, cols, dtype=y.dtype, device=y.device)
    if rows:
        block = 1024
        with torch.cuda.device(y.device):  # Triton launches on the current device (and its current stream)
            _silu_mul_kernel[(rows, triton.cdiv(cols, block))](
                y, out, cols, y.stride(0), out.stride(0), BLOCK=block
            )
    return out


def _is_silu(act: object) -> bool:
    """torch's `nn.SiLU` or transformers' `SiLUActivation` (`ACT2FN["silu"]`, `F.silu`)."""
    kind = type(act)
    return isinstance(act, nn.SiLU) or (
        kind.__name__ == "SiLUActivation" and kind.__module__.startswith("transformers.")
    )


def _returned_expression(body: list[ast.stmt]) -> ast.expr | None:
    """The expression a function body returns, where the body is `return <e>` or `<name> = <e>; return <name>`
    (docstrings dropped), else None."""
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value
    if len(body) != 2 or not isinstance(body[0], ast.Assign) or not isinstance(body[1], ast.Return):
        return None
    targets, returned = body[0].targets, body[1].value
    if len(targets) == 1 and isinstance(targets[0], ast.Name) and isinstance(returned, ast.Name):
        return body[0].value if returned.id == targets[0].id else None
    return None


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    """A transformers gated MLP with SiLU: its class's forward computes `GATED_MLP_EXPRESSION` and nothing else
    (read from its source), and `act_fn` is a SiLU."""
    if not _is_silu(getattr(module, "act_fn", None)):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return False
    if len(function.args.args) != 2 or function.args.vararg:
        return False
    if function.args.kwarg or function.args.kwonlyargs or function.args.defaults:
        return False
    name = function.args.args[1].arg
    expression = _returned_expression(
        [
            node
            for node in function.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
    )
    if expression is None:
        return False
    for node in ast.walk(expression):  # the argument's own name, whatever the class calls it
        if isinstance(node, ast.Name) and node.id == name:
            node.id = "x"
    return ast.unparse(expression) == GATED_MLP_EXPRESSION


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules) or bool(
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    )


def _runs_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's forward: `silu_mul` over the joined gate/up output in eager calls of more than
    `DECODE_MAX` tokens, the class's own forward otherwise (and from then on where `silu_mul` fails)."""
    if _is_compiling() or _GAVE_UP:  # compiled: inductor fuses the SiLU product itself
        return type(self).forward(self, x)
    gate, up = self.gate_proj, self.up_proj
    tokens = x.numel() // x.shape[-1] if x.dim() else 0
    if (
        tokens <= DECODE_MAX
        or gate.group.separate
        or not _runs_triton(x)
        or _hooked(gate, up, self.act_fn)
        or (torch.is_grad_enabled() and x.requires_grad)  # silu_mul has no backward
    ):
        return type(self).forward(self, x)
    y = gate.group.layer(x)
    try:
        h = silu_mul(y.reshape(tokens, y.shape[-1]))
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Triton could not compile or launch: the model's own forward
        _give_up(exc)
        return type(self).forward(self, x)
    return self.down_proj(h.view(*x.shape[:-1], h.shape[-1]))


def _give_up(exc: Exception) -> None:
    """Every fused gated MLP of the process back to its class's forward for good, said once."""
    if not _GAVE_UP:
        _GAVE_UP.append(repr(exc))
        logger.warning(
            "hf_semisparse: the one-pass SiLU product of gated MLPs failed (%r); they run their own forward, "
            "with torch's SiLU and product on the joined gate/up output (slower at prefill sizes)",
            exc,
        )


_GAVE_UP: list[str] = []  # not empty once silu_mul failed in this process


def _is_fused(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def unfuse_gated_mlps(model: nn.Module) -> list[str]:
    """Undo `fuse_gated_mlps`: every gated MLP of `model` runs its class's forward again. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if _is_fused(module):
            del module.__dict__["forward"]
            names.append(name)
    return names


def fuse_gated_mlps(model: nn.Module) -> list[str]:
    """Give every SiLU-gated MLP of `model` whose gate/up projections are one joined group (and nothing else)
    `_fused_forward`, in place, where Triton is installed. Returns the names of those MLPs."""
    from .projections import ProjectionSlice

    fused = []
    if triton is None or _GAVE_UP:
        return fused
    for name, module in model.named_modules():
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if not (isinstance(gate, ProjectionSlice) and isinstance(up, ProjectionSlice)):
            continue
        group = gate.group
        if (
            up.group is not group
            or group.names != ["gate_proj", "up_proj"]
            or (gate.index, up.index) != (0, 1)
        ):
            continue
        if group.bounds[0][1] != group.bounds[1][1] - group.bounds[1][0] or not _is_gated_silu_mlp(module):
            continue
        if "forward" in module.__dict__:  # patched by someone else (accelerate's hooks): left as it is
            continue
        module.forward = types.MethodType(_fused_forward, module)
        fused.append(name)
    if fused:
        logger.info(
            "hf_semisparse: %d gated MLPs compute SiLU(gate) * up in one pass at prefill sizes", len(fused)
        )
    return fused


def compile_silu_mul(model: nn.Module) -> int:
    """Run `silu_mul` once per dtype and device of `model`'s fused gated MLPs, so that Triton compiles it during a
    warm-up rather than in the first prefill (about a second, then cached on disk by Triton). Returns the number of
    (dtype, device) pairs run."""
    done = set()
    for module in model.modules():
        if not _is_fused(module):
            continue
        layer = module.gate_proj.group.layer
        key = (layer.compute_dtype, layer.compressed.device)
        if key in done or not _runs_triton(layer.compressed):
            continue
        try:
            silu_mul(torch.zeros(1, 2 * module.gate_proj.out_features, dtype=key[0], device=key[1]))
        except Exception as exc:  # noqa: BLE001 - Triton could not compile or launch: every MLP unfused
            _give_up(exc)
            unfuse_gated_mlps(model)
            return 0
        done.add(key)
    return len(done)

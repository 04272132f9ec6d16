"""Running 2:4 weights fast: backend choice, sparse GEMM dispatch, fallbacks.

`accelerate_24(model)` swaps every 2:4 `nn.Linear` of a CUDA fp16/bf16 model for a `SemiSparseLinear` (sibling
projections of one input, such as query/key/value, for slices of one joined `SemiSparseLinear`), on cuSPARSELt or,
for the layers whose output a fused epilogue takes, our CUTLASS kernels on Hopper (`cutlass_sm90.py`). Where that
cannot help (CPU, GPU older than compute capability 8.0, no cuSPARSELt, fp32) it changes nothing and says why,
once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import find_nm_violation
from ..peft_structure import is_peft_model, is_tuner_layer, peft_base_model
from ..utils import unwrap_model
from .fp8_linear import Fp8SemiSparseLinear
from .gated_mlp import fuse_gated_mlps
from .graphs import CUDAGraphedModel
from .model_dispatch import DispatchReport, tune_dispatch
from .projections import ProjectionSlice, semi_sparse_layers
from .projections import fuse_projections as fuse_projections_
from .residual import FusedGeluIntermediate, FusedResidualOutput, fuse_residual_adds
from .residual import fuse_gelu as fuse_gelu_
from .warmup import PrepareReport, prepare_generation, prepare_token_counts

logger = logging.getLogger(__name__)
_SAID: set[str] = set()

MIN_CAPABILITY = (8, 0)
WEIGHTS = ("native", "fp8")
FP8_KERNEL = "cutlass-sm90-fp8"
SHAPE_MULTIPLE = 16
KERNEL_DEVICE_TYPE = "cuda"  # where the 2:4 kernels run (CPU tests stand in for it)


@dataclass
class AccelerationReport:
    """What `accelerate_24` did: which layers run on 2:4 kernels, which not and why."""

    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fused_residual: list[str] = field(default_factory=list)  # blocks whose residual add is in the GEMM
    fused_projections: list[str] = field(default_factory=list)  # sibling projections run as one GEMM
    fused_gelu: list[str] = field(default_factory=list)  # intermediate blocks whose GELU may be in the GEMM
    fused_gated_mlps: list[str] = field(default_factory=list)  # SiLU(gate) * up in one pass (gated_mlp.py)
    kernels: dict[str, int] = field(default_factory=dict)  # kernel library -> number of 2:4 layers on it
    keep_dense: bool = True  # whether a dense copy of each 2:4 weight is kept beside the compressed one
    reason: str = ""  # set when nothing could be accelerated at all

    @property
    def ok(self) -> bool:
        return bool(self.accelerated)

    def __str__(self) -> str:
        if self.reason:
            return f"not accelerated: {self.reason}"
        lines = [
            f"{len(self.accelerated)} layers on 2:4 kernels "
            f"({'compressed and dense weights kept' if self.keep_dense else 'compressed weights only'})"
        ]
        if self.kernels:
            lines.append(
                "  kernels: " + ", ".join(f"{n} on {name}" for name, n in sorted(self.kernels.items()))
            )
        if self.fused_projections:
            lines.append(
                f"  {len(self.fused_projections)} groups of sibling projections joined into one GEMM each"
            )
        if self.fused_residual:
            lines.append(f"  residual add fused into the GEMM of {len(self.fused_residual)} blocks")
        if self.fused_gelu:
            lines.append(f"  GELU handed to the GEMM of {len(self.fused_gelu)} blocks")
        if self.fused_gated_mlps:
            lines.append(
                f"  SiLU(gate) * up in one pass at prefill sizes in {len(self.fused_gated_mlps)} MLPs"
            )
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning("hf_semisparse: %s", message)


def why_not_accelerated(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if 2:4 kernels can run for `device`/`dtype`, else the reason."""
    if device.type != "cuda":
        return f"the model is on {device.type}; 2:4 kernels need a CUDA GPU (weights stay dense with zeros)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
            "2:4 tensor cores need 8.0 or newer"
        )
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the weights are {dtype}; 2:4 kernels run fp16 or bf16 (load with dtype=torch.float16)"
    from .cusparselt import CusparseLtUnavailable, load_library

    try:
        load_library()
    except CusparseLtUnavailable as exc:
        return str(exc)
    return None


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    from ..targets import is_linear_module

    if not is_linear_module(module):
        return None
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def is_generative_decoder(model: nn.Module) -> bool:
    """Whether `model` is a decoder-only generative model (Llama, Qwen, Mistral, GPT-2...): its serving time is
    mostly decode steps, run by transformers' compiled static-cache generate."""
    root = unwrap_model(model)
    config = getattr(root, "config", None)
    can_generate = getattr(root, "can_generate", None)
    return bool(
        callable(can_generate) and can_generate() and not getattr(config, "is_encoder_decoder", False)
    )


def accelerate_24(
    model: nn.Module,
    keep_dense: bool | None = None,
    targets: list[str] | None = None,
    fuse_residual: bool = True,
    fuse_projections: bool = True,
    fuse_gelu: bool = True,
    kernel: str = "auto",
    weights: str = "native",
) -> AccelerationReport:
    """Run every 2:4 linear layer of `model` on 2:4 kernels (cuSPARSELt, or our CUTLASS kernels on Hopper), in
    place.

    Args:
        model: a model on a CUDA device in fp16 or bf16 whose pruned weights are exactly 2:4, or a PEFT model
            around one (unmerged LoRA serving): the base layers of its LoRA layers go onto the 2:4 kernels, the
            adapters stay as they are, and masked adapters (`lora.mask_lora`) keep their 2:4 masks as 1-bit
            buffers (`lora_serving.py`). From then on merging the adapters is refused; merge before
            accelerating instead (`lora.merge_sparse_lora`). Sibling projections under LoRA layers are not
            joined.
        keep_dense: keep dense weights too so shapes where sparse measured slower run dense (1.56x weight memory);
            False keeps only compressed weights (0.5625x the dense bytes) and always runs sparse. None (default):
            False for decoder-only generative models (`is_generative_decoder`: their decode GEMMs are bound by
            reading the weights, where 2:4 always wins), True otherwise. Move and cast the model before calling
            this: `.to()`/`.half()` afterwards are not supported; without a dense copy `state_dict()` has no
            weights of these layers (save the model before accelerating it).
        targets: names of the layers to convert. Default: `model.config.sparsity_config["targets"]` when the model
            records them (each must be 2:4, else `ValueError`), otherwise every linear layer that is exactly 2:4.
        fuse_residual: in BERT-style output blocks (`LayerNorm(dense(h) + residual)`, see `kernels/residual.py`),
            add the residual in the 2:4 GEMM's epilogue instead of in a pass of its own. Results differ from the
            unfused add by fp16 rounding only (the sum is rounded once instead of twice).
        fuse_projections: run sibling projections of one input (`query`/`key`/`value`, `q_proj`/`k_proj`/`v_proj`,
            `gate_proj`/`up_proj`) as one 2:4 GEMM over their joined weights (`kernels/projections.py`); their
            outputs become column views of the joined output (under `torch.compile` too, where the first sibling
            traced puts the joined GEMM into the graph). State dict keys do not change. SiLU-gated MLPs over
            joined gate/up projections (LLaMA, Mistral, Qwen) get a forward that computes `silu(gate) * up` in
            one Triton kernel at prefill sizes (`kernels/gated_mlp.py`, `report.fused_gated_mlps`;
            `gated_mlp.unfuse_gated_mlps` undoes it).
        fuse_gelu: in BERT-style intermediate blocks with exact GELU (`kernels/residual.py`), hand the GELU to the
            2:4 layer, which applies it in the GEMM's epilogue on our CUTLASS kernels where that measured faster
            (and as a separate `F.gelu` otherwise).
        kernel: "auto" runs on our CUTLASS kernels for Hopper, where they are built or can be (built on first use
            where nvcc is present; `kernels/cutlass_sm90.py`), the layers whose output an epilogue takes (a fused
            residual add or GELU) and every layer of a bf16 decoder (cuSPARSELt 0.8's bf16 kernels ran slower
            than dense at decode sizes on an H200, ours faster); every other layer runs on cuSPARSELt (plain fp16
            GEMMs ran faster there; docs/performance.md). "cutlass" or "cusparselt" puts every layer on one.
        weights: "native" runs the weights in the model's dtype. "fp8" runs every 2:4 layer the FP8 kernels can
            take (Hopper, `hf-semisparse build-kernels --fp8`, in_features % 256 == 0, out_features % 64 == 0) as
            an `Fp8SemiSparseLinear`: e4m3 weights with one scale per output channel (computed here from the
            2:4 weight), activations quantised per token at run time, scales and bias applied in the GEMM's
            epilogue (`kernels/cutlass_fp8.py`, docs/guides/fp8.md). Its dense weight is not kept. The layers
            it cannot take run on the native 2:4 path, and why is said once. Layers loaded from an FP8
            checkpoint (format version 4) run their stored codes and scales, unless their weight changed since.

    Returns:
        An `AccelerationReport` (layer names as in the plain model, also for a PEFT model). Where nothing can run
        on 2:4 kernels it says why, logs it once, and the model is left unchanged (correct dense weights with
        zeros).

    Raises:
        ValueError: bad `kernel`/`weights`, a recorded target that is not 2:4, or (PEFT models) a 2:4 layer whose
            adapter is not LoRA or has adapters merged into it. Nothing is changed then.

    Example:
        >>> model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float16).cuda()
        >>> print(accelerate_24(model))
    """
    from .linear import KERNELS

    if kernel not in KERNELS:
        raise ValueError(f"accelerate_24: kernel must be one of {KERNELS}, got {kernel!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"accelerate_24: weights must be one of {WEIGHTS}, got {weights!r}")
    root = unwrap_model(model)
    # a PeftModel, or a transformers model with adapters attached by its own PEFT integration (add_adapter)
    peft = is_peft_model(root) or any(is_tuner_layer(m) for m in root.modules())
    if peft:  # names and parents as in the plain model; a LoRA layer's name stands for its base layer
        from ..lora_serving import attach_kernel_bases, check_kernel_bases, kernel_slots

        root = peft_base_model(root)
        modules, slots = kernel_slots(root)
    else:
        modules = dict(root.named_modules())
        slots = {}
    decoder = is_generative_decoder(root)
    keep_dense = not decoder if keep_dense is None else keep_dense
    try:
        param = next(root.parameters())
    except StopIteration:
        return AccelerationReport(reason="the model has no parameters")
    reason = why_not_accelerated(param.device, param.dtype)
    if reason:
        _say_once(f"not accelerated: {reason}")
        return AccelerationReport(reason=reason)
    # bf16 decoders: at 16 tokens on an H200, cuSPARSELt 0.8's bf16 kernels ran 1.6-1.9x slower than dense, our
    # CUTLASS kernels' decode tile configurations 1.0-1.45x faster (benchmarks/probes/probe_decode_kernels.py)
    prefer_cutlass = kernel == "auto" and decoder and param.dtype == torch.bfloat16

    if targets is None:
        recorded = getattr(getattr(root, "config", None), "sparsity_config", None)
        if isinstance(recorded, dict) and recorded.get("targets"):
            targets = list(recorded["targets"])
    strict = targets is not None

    from .linear import SemiSparseLinear

    report = AccelerationReport(keep_dense=keep_dense)
    eligible: list[str] = []
    for name in targets if strict else list(modules):
        module = modules.get(name)
        if module is None:
            raise ValueError(f"accelerate_24: no module named {name!r} in the model")
        weight = _linear_weight(module)
        if weight is None:
            if strict:
                raise TypeError(f"accelerate_24: {name} is {type(module).__name__}, not a linear layer")
            continue
        out_f, in_f = weight.shape
        why = None
        if weight.dtype not in (torch.float16, torch.bfloat16):
            why = f"dtype {weight.dtype}"
        elif weight.device.type != KERNEL_DEVICE_TYPE:
            why = f"on {weight.device}"
        elif out_f % SHAPE_MULTIPLE or in_f % SHAPE_MULTIPLE:
            why = f"shape {out_f}x{in_f} is not a multiple of {SHAPE_MULTIPLE}"
        else:
            bad = find_nm_violation(weight)
            if bad is not None:
                if strict:
                    raise ValueError(
                        f"accelerate_24: {name}.weight is recorded as 2:4 but is not: the group at "
                        f"{bad.index} ([out, in] layout) has {bad.nonzeros} non-zeros"
                    )
                why = "not 2:4 sparse"
        if why:
            report.skipped[name] = why
            continue
        eligible.append(name)

    def slot(name: str) -> tuple[nn.Module, str]:
        if name in slots:
            return slots[name]
        parent_name, _, child = name.rpartition(".")
        return (modules[parent_name] if parent_name else root), child

    if peft and eligible:
        check_kernel_bases(eligible, slots)  # raises before anything changes
        attach_kernel_bases(root, eligible, slots)

    if weights == "fp8":
        fp8_names = _to_fp8(modules, eligible, slot)
        report.accelerated.extend(fp8_names)
        if fp8_names:
            report.kernels[FP8_KERNEL] = len(fp8_names)
        eligible = [name for name in eligible if name not in set(fp8_names)]

    from .linear import choose_kernel
    from .residual import fusion_targets

    epilogue_layers = fusion_targets(root, residual=fuse_residual, gelu=fuse_gelu)
    joined: set[str] = set()
    if fuse_projections:
        # plain GEMMs, no epilogue to fuse: cuSPARSELt, unless CUTLASS is preferred ("auto": where it can run)
        joined_kernel = "cutlass" if kernel == "cutlass" else "auto" if prefer_cutlass else "cusparselt"
        for parent_name, names in fuse_projections_(root, set(eligible), keep_dense, joined_kernel).items():
            prefix = f"{parent_name}." if parent_name else ""
            joined.update(prefix + n for n in names)
            report.fused_projections.append(prefix + "+".join(names))
        report.fused_gated_mlps = fuse_gated_mlps(root)
    for name in eligible:
        if name not in joined:
            parent, child = slot(name)
            layer_kernel = choose_kernel(
                kernel, _linear_weight(modules[name]), prefer_cutlass or name in epilogue_layers
            )
            setattr(
                parent, child, SemiSparseLinear(modules[name], keep_dense=keep_dense, kernel=layer_kernel)
            )
        report.accelerated.append(name)
    for layer in semi_sparse_layers(root):
        report.kernels[layer.kernel] = report.kernels.get(layer.kernel, 0) + 1
    if decoder and param.dtype == torch.bfloat16 and report.kernels.get("cusparselt"):
        _say_once(
            f"bf16 decoder: {report.kernels['cusparselt']} of its 2:4 GEMMs run on cuSPARSELt, whose bf16 kernels "
            "measured 1.3-2.3x slower than dense at decode sizes (16-64 tokens) on an H200 (cuSPARSELt 0.8, "
            "2026-12-01). On Hopper, kernel='auto' runs them on our CUTLASS kernels where those are built "
            "(hf-semisparse build-kernels) and the shape allows (in_features % 128, out_features % 64); elsewhere "
            "prefer fp16, or keep_dense=True to run dense where dense is faster (docs/guides/generation.md)"
        )
    if report.accelerated and fuse_residual:
        report.fused_residual = fuse_residual_adds(root)
    if report.accelerated and fuse_gelu:
        report.fused_gelu = fuse_gelu_(root)
    if not report.accelerated:
        report.reason = "no linear layer is exactly 2:4 (prune it first, e.g. with prune_24)"
        _say_once(f"not accelerated: {report.reason}")
    else:
        logger.info(
            "hf_semisparse: %d layers on 2:4 kernels (%d skipped)",
            len(report.accelerated),
            len(report.skipped),
        )
    return report


def _to_fp8(modules: dict[str, nn.Module], eligible: list[str], slot) -> list[str]:
    """Replace each of `eligible` (2:4 linear layers) that the FP8 kernels can take by an `Fp8SemiSparseLinear`;
    their names. The others are left for the native path, and the reasons said once. A layer loaded from an FP8
    checkpoint (format version 4) whose weight is still the dequantised stored one runs its stored codes and
    scales (`fp8_serialization.stored_codes`); every other layer is quantised from its weight."""
    from ..fp8_serialization import stored_codes
    from . import cutlass_fp8
    from .fp8_linear import Fp8SemiSparseLinear

    converted = []
    for name in eligible:
        module = modules[name]
        weight = _linear_weight(module)
        out_f, in_f = weight.shape
        why = cutlass_fp8.why_unavailable(weight.device, weight.dtype, out_f, in_f)
        if why is not None:
            _say_once(f"weights='fp8': layers run on the {weight.dtype} 2:4 path instead: {why}")
            continue
        parent, child = slot(name)
        stored = stored_codes(module, weight)
        if stored is not None:  # loaded from an FP8 checkpoint, weight unchanged: exactly its stored codes
            weight_fp8, scale = stored
            bias = None if module.bias is None else module.bias.detach()
            layer = Fp8SemiSparseLinear(
                weight_fp8=weight_fp8, weight_scale=scale, bias=bias, dtype=weight.dtype
            )
        else:
            layer = Fp8SemiSparseLinear(module)
        setattr(parent, child, layer)
        converted.append(name)
    if converted:
        logger.info("hf_semisparse: %d layers on FP8 2:4 kernels", len(converted))
    return converted


__all__ = [
    "AccelerationReport",
    "CUDAGraphedModel",
    "DispatchReport",
    "Fp8SemiSparseLinear",
    "FusedGeluIntermediate",
    "FusedResidualOutput",
    "PrepareReport",
    "ProjectionSlice",
    "accelerate_24",
    "fuse_residual_adds",
    "is_generative_decoder",
    "prepare_generation",
    "prepare_token_counts",
    "semi_sparse_layers",
    "tune_dispatch",
    "why_not_accelerated",
]

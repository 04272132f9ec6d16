"""`CUDAGraphedModel`: a model's inference forward replayed from CUDA graphs, one graph per input signature.

At small batches an eager forward is bound by host time (Python, module calls, kernel launches), not by the GPU,
so no kernel, 2:4 or dense, can make it faster. A CUDA graph replays all of a forward's kernels with one launch.

The captured forward must be the eager one. transformers' mask code treats CUDA stream capture as tracing: it
cannot look at the mask's values there, so it builds a full 4D attention mask even when eager would pass none,
and SDPA then leaves its fused kernels for the math path (2x to 4x slower at batch 16 and up on an H100). Eager
drops an attention mask of all ones; so does `CUDAGraphedModel`, before looking up or capturing a graph. Without a
mask, transformers 5.18 and later skip the mask under capture too; older versions do not (a warning says so).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

# the first transformers whose masks skip the stream-capture check when there is no padding mask
MASK_SKIP_UNDER_CAPTURE = Version("5.18.0")


def without_unpadded_attention_mask(kwargs: dict) -> dict:
    """`kwargs` without `attention_mask` when it is a 2D padding mask of all ones, as eager transformers treats it
    (one host sync, as in eager). A mask with padding, a 4D mask or a non-tensor is left in place."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all()):
        return {k: v for k, v in kwargs.items() if k != "attention_mask"}
    return kwargs


def input_signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a captured graph depends on: the call's structure and, per tensor, shape, dtype, device and strides;
    other values must be hashable and are part of the signature. None if one is not hashable (run eagerly)."""
    return _signature(*pytree.tree_flatten((args, kwargs)))


def _signature(leaves: list, spec) -> tuple | None:
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, tuple(leaf.stride())))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            parts.append(("value", type(leaf), leaf))
    return (str(spec), tuple(parts))


class _Graph:
    """One captured forward: its input buffers, its graph, its output buffers."""

    def __init__(self, module: nn.Module, leaves: list, spec, warmup: int) -> None:
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(self.inputs, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                module(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = module(*static_args, **static_kwargs)

    def time_ms(self) -> float:
        """Median time of replaying this graph on its captured inputs."""
        from .model_dispatch import eager_forward_ms

        return eager_forward_ms(self.graph.replay, budget_s=0.1)

    def replay(self, leaves: list) -> Any:
        for buffer, value in zip(self.inputs, leaves, strict=True):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)
        self.graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)


class CUDAGraphedModel(nn.Module):
    """Runs `model`'s forward for inference from CUDA graphs: one graph per input signature, captured on first
    use and replayed after, so a forward costs one launch of host time instead of one per kernel.

    Each new signature (the call's structure; each tensor's shape, dtype, device and strides; every other
    argument's value) is first run eagerly `warmup` times (where `SemiSparseLinear` layers search and time their
    kernels for the new token count), then captured. Later calls with that signature copy their tensors into
    the captured inputs and replay. Outputs are new tensors, not the graph's buffers. Everything runs under
    `torch.inference_mode()`: for inference only, no gradients.

    Args:
        model: the model (dense, or after `accelerate_24`), on a CUDA device, in eval mode, whose forward
            launches the same kernels for the same input signature (no data-dependent control flow on the host).
        max_graphs: signatures kept; the least recently used graph (and its memory) is dropped beyond this.
        warmup: eager runs before a capture.
        drop_unpadded_attention_mask: drop a 2D `attention_mask` of all ones before the look-up, so the captured
            forward runs attention without a mask, as eager does (see the module's docstring). A padded batch
            keeps its mask and gets its own graph.
        tune: for a model with `SemiSparseLinear` layers that keep their dense weights, choose sparse or dense per
            layer shape for each new signature from replayed graphs (`model_dispatch.choose_dispatch`): the
            per-GEMM choice, everything dense, and each shape flipped are captured and timed, and the fastest is
            kept if it beats everything dense. Costs about 5 to 8 captures per signature, once; at most four
            graphs are alive at a time. `reports` holds what was measured, per signature.

    A model not on CUDA runs eagerly, with one log line saying so. Every graph keeps the activation memory of
    its signature's forward: cap `max_graphs`, or use this for the small batches where host time dominates.

    Example:
        >>> model = AutoSparseModel.from_pretrained(path, dtype=torch.float16, device_map="cuda")
        >>> fast = CUDAGraphedModel(model)
        >>> out = fast(input_ids=ids, attention_mask=mask)  # first call per shape: warm-up and capture
    """

    def __init__(
        self,
        model: nn.Module,
        max_graphs: int = 8,
        warmup: int = 2,
        drop_unpadded_attention_mask: bool = True,
        tune: bool = True,
    ) -> None:
        super().__init__()
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1, got {max_graphs}, {warmup}")
        self.module = model
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.drop_unpadded_attention_mask = drop_unpadded_attention_mask
        self.tune = tune
        self.reports: dict[tuple, Any] = {}  # signature -> DispatchReport of the tuning at its capture
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = 0  # graphs captured so far (new signatures, tuning candidates, signatures seen again)
        self._said: set[str] = set()

    def _eager_reason(self, signature: tuple | None) -> str | None:
        try:
            device = next(self.module.parameters()).device
        except StopIteration:
            return "the model has no parameters"
        if device.type != "cuda":
            return f"the model is on {device.type}; CUDA graphs need a CUDA device"
        if signature is None:
            return "an argument is neither a tensor nor hashable, so its graph cannot be looked up"
        if self.module.training:
            return "the model is in training mode; CUDA graphs here are for inference (call .eval())"
        return None

    def forward(self, *args, **kwargs):
        if self.drop_unpadded_attention_mask:
            kwargs = without_unpadded_attention_mask(kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))  # once per call: signature and replay share it
        signature = _signature(leaves, spec)
        reason = self._eager_reason(signature)
        with torch.inference_mode():
            if reason is not None:
                if reason not in self._said:
                    self._said.add(reason)
                    logger.warning("CUDAGraphedModel runs eagerly: %s", reason)
                return self.module(*args, **kwargs)
            graph = self._graphs.get(signature)
            if graph is None:
                self._warn_about_capture_masks()
                graph = self._new_graph(signature, leaves, spec)
                self._graphs[signature] = graph
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(signature)
            return graph.replay(leaves)

    def _new_graph(self, signature: tuple, leaves: list, spec) -> _Graph:
        from .model_dispatch import choice_name, tune_model_dispatch

        args, kwargs = pytree.tree_unflatten(leaves, spec)
        graphs: dict[str, _Graph] = {}
        times: dict[str, float] = {}

        def measure(choice: dict) -> float:
            name = choice_name(choice)
            if name not in graphs:
                graphs[name] = _Graph(self.module, leaves, spec, warmup=1)
                self.captures += 1
            times[name] = graphs[name].time_ms()
            # keep only the all-dense graph, the fastest so far and the one just timed (memory: one forward each)
            dense = choice_name(dict.fromkeys(choice, False))
            fastest = min((n for n in times if n in graphs), key=times.get)
            for other in [n for n in graphs if n not in (dense, fastest, name)]:
                del graphs[other]
            return times[name]

        report = None
        if self.tune:  # None too when no SemiSparseLinear with a dense weight ran
            report = tune_model_dispatch(self.module, lambda: self.module(*args, **kwargs), measure=measure)
        if report is None:
            self.captures += 1
            return _Graph(self.module, leaves, spec, self.warmup)
        self.reports[signature] = report
        chosen = choice_name(report.choice)
        if chosen not in graphs:
            graphs[chosen] = _Graph(self.module, leaves, spec, warmup=1)
            self.captures += 1
        return graphs[chosen]

    def _warn_about_capture_masks(self) -> None:
        if Version(transformers.__version__) < MASK_SKIP_UNDER_CAPTURE and "masks" not in self._said:
            self._said.add("masks")
            logger.warning(
                "transformers %s builds a full attention mask while a CUDA graph is captured, even without padding: "
                "the replayed attention runs SDPA's math path and can be slower than eager. Upgrade to "
                "transformers>=%s.",
                transformers.__version__,
                MASK_SKIP_UNDER_CAPTURE,
            )

    def clear(self) -> None:
        """Drop every captured graph (e.g. after changing the model's weights in place)."""
        self._graphs.clear()
        self.reports.clear()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)  # config, device, ... of the wrapped model

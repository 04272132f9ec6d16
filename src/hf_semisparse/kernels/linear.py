"""`SemiSparseLinear`: an `nn.Linear` whose 2:4 weight runs on cuSPARSELt, or on our CUTLASS kernels on Hopper, with
cached plans.

Per call the host work is a dictionary look-up, one output allocation and one ctypes call: the matmul plan for
this (weight, token count) was built once, with the algorithm our search timed fastest for this shape, and
the shape was timed against dense once (`tuning.py`): where sparse lost, the dense weight is used instead.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import cutlass_sm90
from .buckets import DECODE_MAX, anchor_of, bucket_for, is_bucket, padded_tokens, split_into_buckets
from .cusparselt import ALIGNMENT, AlgConfig, Handle, MatmulPlan, persistent_empty
from .tuning import (
    Decision,
    ShapeKey,
    TuningCache,
    choose,
    compiled_call,
    default_cache_path,
    search_alg,
    search_generator,
)

logger = logging.getLogger(__name__)

_UNSET = object()
_is_compiling = torch.compiler.is_compiling
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # no Stream object per call


def _current_stream(device_index: int) -> int:
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


class SparseGemmBackend:
    """Process-wide state: one cuSPARSELt handle per (thread, device), workspaces, and shape decisions."""

    def __init__(self, cache: TuningCache | None = None, margin: float = 0.03) -> None:
        self.cache = cache if cache is not None else TuningCache(default_cache_path())
        self.margin = margin
        self._local = threading.local()
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []
        self.prepared = False  # set by prepare_token_counts: later searches are said once
        self._cutlass: dict[tuple[int, torch.dtype], cutlass_sm90.CutlassHandle] = {}
        self._lock = threading.Lock()

    def handle(self, device: torch.device) -> Handle:
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in handles:
            handles[index] = Handle(torch.device("cuda", index))
        return handles[index]

    def cutlass_handle(self, device: torch.device, dtype: torch.dtype) -> cutlass_sm90.CutlassHandle:
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = self._cutlass.get((index, dtype))
        if handle is None:
            with self._lock:
                handle = self._cutlass.setdefault(
                    (index, dtype), cutlass_sm90.CutlassHandle(torch.device("cuda", index), dtype)
                )
        return handle

    def workspace(self, device: torch.device, stream: int, size: int) -> torch.Tensor | None:
        """A workspace of at least `size` bytes for GEMMs on `stream`.

        Kept workspaces live outside every CUDA graph memory pool (`persistent_empty`): a tensor that outlives a
        call but was allocated in a graph's pool breaks inductor's CUDA graph trees ("tensors in the cudagraph
        pool not tracked as outputs"). A workspace a graph captured stays alive when a larger one replaces it.
        During a capture no workspace is kept: a too small one is replaced for this call only, from the capture's
        own pool."""
        if size == 0:
            return None
        key = (device.index, stream)
        ws = self._workspaces.get(key)
        if ws is not None and ws.numel() >= size:
            return ws
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(size, dtype=torch.uint8, device=device)
        with self._lock:
            if ws is not None:
                self._retired.append(ws)  # a captured graph may still read it
            ws = persistent_empty(size, device)
            self._workspaces[key] = ws
        return ws


_BACKEND: SparseGemmBackend | None = None


def get_backend() -> SparseGemmBackend:
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = SparseGemmBackend()
    return _BACKEND


_LAYERS: weakref.WeakValueDictionary[int, SemiSparseLinear] = weakref.WeakValueDictionary()
_IDS = itertools.count()
KERNELS = ("auto", "cutlass", "cusparselt")
_SAID: set[str] = set()


def choose_kernel(kernel: str, weight: torch.Tensor, prefer_cutlass: bool = True) -> str:
    """ "cutlass" or "cusparselt" for `weight`.

    "auto" takes our CUTLASS kernels where they can run (Hopper, built or buildable, shape and dtype supported)
    for a layer that prefers them (`prefer_cutlass`): one whose output an epilogue takes (a residual add or GELU
    follows it), or any layer of a bf16 decoder LLM (`accelerate_24`); cuSPARSELt otherwise. On an H100, CUTLASS
    with its fused epilogues beat cuSPARSELt on every BERT shape measured, but plain fp16 GEMMs (no bias, no
    epilogue) ran up to 22% slower on it (CHANGELOG.md, 0.1.0.dev8); on an H200, cuSPARSELt 0.8's bf16 kernels ran
    1.3-2.3x slower than dense at 16-64 tokens, ours mostly faster (docs/guides/generation.md).
    "cutlass" raises `CutlassUnavailable` where they cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "cusparselt" or (kernel == "auto" and not prefer_cutlass):
        return "cusparselt"
    n, k = weight.shape
    why = cutlass_sm90.why_unavailable(weight.device, weight.dtype, n, k)
    if why is None:
        return "cutlass"
    if kernel == "cutlass":
        raise cutlass_sm90.CutlassUnavailable(
            f"CUTLASS 2:4 kernels for a {n}x{k} {weight.dtype} weight: {why}"
        )
    if weight.device.type == "cuda" and torch.cuda.get_device_capability(weight.device) == (9, 0):
        message = f"hf_semisparse: 2:4 layers run on cuSPARSELt, not our CUTLASS kernels: {why}"
        if message not in _SAID:  # said once per reason: a model has many layers
            _SAID.add(message)
            logger.info(message)
    return "cusparselt"


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)


class ChunkedPlan:
    """A token count that is not a ladder size, run as 2:4 GEMMs over consecutive row blocks that are, each with
    its own plan (`buckets.split_into_buckets`). `run` as `MatmulPlan.run`."""

    def __init__(self, pieces: list[tuple[int, int, object]], n: int, k: int) -> None:
        self.pieces, self.n, self.k = pieces, n, k
        self.m = sum(size for _, size, _ in pieces)
        self.workspace_size = max(plan.workspace_size for _, _, plan in pieces)

    def run(self, compressed, x, out, workspace, stream: int, c: torch.Tensor | None = None) -> None:
        x2, out2 = x.view(self.m, self.k), out.view(self.m, self.n)
        c2 = None if c is None else c.view(self.m, self.n)
        for start, size, plan in self.pieces:
            end = start + size
            plan.run(
                compressed,
                x2[start:end],
                out2[start:end],
                workspace,
                stream,
                None if c2 is None else c2[start:end],
            )


class SemiSparseLinear(nn.Module):
    """Drop-in replacement of a 2:4 `nn.Linear` (or transformers `Conv1D`) for CUDA inference.

    `layer(x, residual=r)` returns `layer(x) + r`. Where the 2:4 kernel runs, the add can happen in its epilogue
    (cuSPARSELt's `C` operand with beta = 1), which saves the separate pass over the activations; it does where
    that measured faster, with an algorithm searched for it, once per token count (`set_residual_epilogue`
    overrides the choice). `layer(x, gelu=True)` returns `F.gelu(layer(x))` (exact, erf); on the CUTLASS kernels
    the GELU runs in the GEMM's epilogue where that measured faster.

    Args:
        linear: the module to replace; its weight must be exactly 2:4 along the input dimension, fp16 or bf16,
            on a CUDA device of compute capability 8.0+.
        keep_dense: keep the dense weight too, so token counts where sparse measured slower run dense (1.56x the
            weight memory). False: only the compressed weight is kept (about 0.56x the dense bytes) and every
            call runs sparse.
        kernel: "cusparselt" (default) or "cutlass", our kernels for Hopper (`kernels/cutlass_sm90.py`; raises
            `CutlassUnavailable` where they cannot run), or "auto": CUTLASS where it can run, else cuSPARSELt
            (`accelerate_24` chooses per layer, see `choose_kernel`).
    """

    def __init__(self, linear: nn.Module, keep_dense: bool = True, kernel: str = "cusparselt") -> None:
        super().__init__()
        # (device index, M, epilogue: "", "residual" or "gelu") -> plan
        self._plans: dict[tuple[int, int, str], MatmulPlan | cutlass_sm90.CutlassPlan] = {}
        # (device index, input numel) -> the plan to run, None = dense: the one look-up of a warm call
        self._fast: dict[tuple[int, int], MatmulPlan | None] = {}
        # the same key -> the plan that adds a residual in its epilogue, None = a separate add
        self._residual_fast: dict[tuple[int, int], MatmulPlan | None] = {}
        # the same key -> the plan that applies GELU in its epilogue, None = a separate F.gelu
        self._gelu_fast: dict[tuple[int, int], cutlass_sm90.CutlassPlan | None] = {}
        self._workspaces: dict[int, torch.Tensor] = {}  # stream -> workspace
        # padded token count -> a persistent input buffer that compiled graphs pad into (`add_pad_buffers`)
        self._pad_rows: dict[int, torch.Tensor] = {}
        weight = linear.weight.detach()
        if not isinstance(linear, nn.Linear):  # Conv1D stores [in, out]
            weight = weight.t()
        weight = weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.keep_dense = keep_dense
        self.compute_dtype = weight.dtype  # the compressed buffer itself is opaque bytes
        self.kernel = choose_kernel(kernel, weight)
        self.register_buffer("compressed", self._handle(weight.device).compress(weight), persistent=False)
        self.weight = nn.Parameter(weight, requires_grad=False) if keep_dense else None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._id = next(_IDS)
        _LAYERS[self._id] = self
        self._cache_tensors()
        self.register_load_state_dict_post_hook(_after_load)
        if not keep_dense:
            self.register_state_dict_post_hook(refuse_state_dict_without_weight)

    def _cache_tensors(self) -> None:
        # plain attributes for the hot path: `self.weight` is not one; it goes through nn.Module.__getattr__, a
        # Python call per look-up, which nn.Linear pays twice per call
        bias = self._parameters.get("bias")
        if "_b" in self.__dict__ and self.__dict__["_b"] is not bias:
            self._plans.clear()  # the plans hold the old bias's address (fused bias epilogue)
            self._fast.clear()
            self._residual_fast.clear()
            self._gelu_fast.clear()
        self.__dict__["_w"] = self._parameters.get("weight")
        self.__dict__["_b"] = bias
        self.__dict__["_c"] = self._buffers.get("compressed")

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("weight", "bias", "compressed") and "_parameters" in self.__dict__:
            self._cache_tensors()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"keep_dense={self.keep_dense}, kernel={self.kernel}"
        )

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, gelu: bool = False
    ) -> torch.Tensor:
        if _is_compiling():  # an opaque custom op: no graph break under torch.compile
            return _finish(self._traced_linear(x), residual, gelu)
        key = (x.get_device(), x.numel())  # device index -1: not on CUDA
        plan = self._fast.get(key, _UNSET)
        if plan is None and x.dtype is self.compute_dtype:
            # this token count runs dense: plain attributes, no Module.__getattr__ (about nn.Linear's host time)
            y = F.linear(x, self._w, self._b)
            return y if residual is None and not gelu else _finish(y, residual, gelu)
        return self._dispatch(x, key, plan, residual, gelu)

    def add_pad_buffers(self, sizes: list[int]) -> int:
        """Keep a persistent input buffer of each padded token count in `sizes` (ladder sizes up to `DECODE_MAX`)
        for compiled graphs to pad into (`_traced_linear`); returns the bytes added. Buffers are dropped by
        `.to()` and friends.

        Raises:
            ValueError: a size that is not a decode-sized ladder size.
        """
        bad = [m for m in sizes if not (is_bucket(m) and m <= DECODE_MAX)]
        if bad:
            raise ValueError(f"pad buffers are for ladder sizes up to {DECODE_MAX} tokens, got {bad}")
        added = 0
        for m in sizes:
            if m not in self._pad_rows:
                with torch.inference_mode(
                    False
                ):  # an inference tensor could not be written outside that mode
                    rows = torch.empty(
                        m, self.in_features, dtype=self.compute_dtype, device=self.compressed.device
                    )
                torch._dynamo.mark_static_address(rows)  # CUDA graph trees: a static input, mutated in place
                self._pad_rows[m] = rows
                added += rows.numel() * rows.element_size()
        return added

    def _traced_linear(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` while Dynamo traces: the custom op `hf_semisparse::linear_24`, opaque to the graph.

        Where the layer keeps a pad buffer of the padded size of `x`'s (static) token count (`add_pad_buffers`),
        the graph writes `x` into its first rows and the op reads the whole buffer, so its body pads nothing;
        inductor then computes `x` (RMSNorm, the MLP's activation product) straight into the buffer in the kernel
        that produces it, where the op's body would copy it in a kernel of its own. The buffer's other rows hold
        whatever was there: the GEMM's rows are independent and those outputs are never read.
        """
        k = self.in_features
        m = x.numel() // k if x.shape[-1] == k else None
        rows = None
        if type(m) is int and 0 < m <= DECODE_MAX and x.dtype == self.compute_dtype:  # a static token count
            rows = self._pad_rows.get(padded_tokens(m))
        if rows is None or rows.shape[0] == m or rows.device != x.device:
            return torch.ops.hf_semisparse.linear_24(
                x, self.compressed, self.weight, self.bias, self._id, self.out_features
            )
        rows[:m].copy_(x.reshape(m, k))
        y = torch.ops.hf_semisparse.linear_24(
            rows, self.compressed, self.weight, self.bias, self._id, self.out_features
        )
        return y[:m].view(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move the tensors the cached plans point at (the fused bias): rebuild them
        self._pad_rows.clear()
        self._plans.clear()
        self._fast.clear()
        self._residual_fast.clear()
        self._gelu_fast.clear()
        self._workspaces.clear()
        out = super()._apply(fn, recurse)
        self._cache_tensors()
        return out

    def run(self, x: torch.Tensor, residual: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        """`forward` without the module call (and without torch.compile's custom op)."""
        key = (x.get_device(), x.numel())
        return self._dispatch(x, key, self._fast.get(key, _UNSET), residual, gelu)

    def _dispatch(self, x: torch.Tensor, key: tuple[int, int], plan, residual, gelu=False) -> torch.Tensor:
        if residual is not None and gelu:
            raise ValueError("SemiSparseLinear adds a residual or applies GELU, not both")
        if plan is None and x.dtype is self.compute_dtype:
            y = F.linear(x, self._w, self._b)
        elif key[0] < 0:
            if self._w is None:
                raise RuntimeError("SemiSparseLinear without a dense weight runs on CUDA only")
            y = F.linear(x, self._w, self._b)
        else:
            return self._cuda_forward(x, key, plan, residual, gelu)
        return _finish(y, residual, gelu)

    # ---------------------------------------------------------------- the CUDA path
    def _handle(self, device: torch.device):
        """The library handle of this layer's kernel: cuSPARSELt's, or our CUTLASS kernels' for its dtype."""
        if self.kernel == "cutlass":
            return get_backend().cutlass_handle(device, self.compute_dtype)
        return get_backend().handle(device)

    def _search(self, *args, quick: bool = False, **kwargs):
        if self.kernel == "cutlass":  # a handful of tile configurations: always all of them
            return cutlass_sm90.search_config(*args, **kwargs)
        return search_alg(*args, quick=quick, **kwargs)

    def _shape_key(
        self, handle: Handle, m: int, dtype: torch.dtype, residual: bool = False, gelu: bool = False
    ) -> ShapeKey:
        return ShapeKey(
            handle.device_name,
            handle.version,
            self.out_features,
            self.in_features,
            m,
            str(dtype).split(".")[-1],
            self.bias is not None,
            gelu,  # cuSPARSELt has GELU epilogues for INT8 only: only our CUTLASS kernels fuse it
            residual,
            getattr(handle, "library_name", "cusparselt"),
        )

    def _plan(
        self,
        handle: Handle,
        m: int,
        dtype: torch.dtype,
        decision: Decision,
        residual: bool = False,
        gelu: bool = False,
    ) -> MatmulPlan:
        """The plan for `m` tokens with `decision`'s algorithm; `residual` / `gelu`: the one for calls that add a
        residual or apply GELU in the epilogue (searched on its own: the fastest algorithm can differ)."""
        key = (handle.device.index, m, "residual" if residual else "gelu" if gelu else "")
        plan = self._plans.get(key)
        if plan is None and self.kernel == "cutlass":
            plan = cutlass_sm90.CutlassPlan(
                handle, self.out_features, self.in_features, m, bias=self.bias, gelu=gelu, alg=decision.alg
            )
            self._plans[key] = plan
        elif plan is None:
            plan = MatmulPlan(
                handle,
                self.out_features,
                self.in_features,
                m,
                dtype,
                bias=self.bias,
                alg=decision.alg,
                selection=handle.selection(
                    self.out_features,
                    self.in_features,
                    m,
                    dtype,
                    self.bias is not None,
                    False,
                    decision.alg,
                ),
            )
            self._plans[key] = plan
        return plan

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w, self._b)

    def _decide(
        self,
        handle: Handle,
        m: int,
        dtype: torch.dtype,
        stream: int,
        x2: torch.Tensor | None = None,
        inherit: bool = False,
        quick: bool = False,
    ) -> Decision:
        """The decision (2:4 or dense, and the kernel) for `m` tokens, a ladder size (`buckets.py`).

        From the tuning cache if there; else searched on `x2` (`[m, K]`, or random inputs of that size), or, with
        `inherit`, for a size between two anchors, the decision of the anchor below (searched if needed). `quick`
        searches fewer candidates (`tuning.search_alg`). During a stream capture nothing is timed: dense where a
        dense weight is kept, else 2:4 with the library's default kernel, not remembered, said once.
        """
        backend = get_backend()
        key = self._shape_key(handle, m, dtype)
        decision = backend.cache.get(key)
        # a decision made without a dense weight ("sparse always") says nothing to a layer that keeps one
        compared = decision is not None and (decision.dense_us is not None or not self.keep_dense)
        if compared or (decision is not None and torch.cuda.is_current_stream_capturing()):
            return decision
        if torch.cuda.is_current_stream_capturing():
            _say_once(
                f"hf_semisparse: {key} was first met inside a CUDA graph capture, where nothing can be timed; it "
                f"runs {'dense' if self.keep_dense else 'with the default 2:4 kernel'} there. Prepare the token "
                "counts before capturing (prepare_token_counts / prepare_generation)."
            )
            return Decision(not self.keep_dense, AlgConfig(), None, None, "untuned during graph capture")
        anchor = anchor_of(m)
        if inherit and anchor != m:
            base = self._decide(handle, anchor, dtype, stream, inherit=True, quick=quick)
            decision = Decision(
                base.use_sparse,
                base.alg,
                base.sparse_us,
                base.dense_us,
                f"as the {anchor}-token search: {base.reason}",
            )
            backend.cache.put(key, decision)
            return decision
        if backend.prepared and not inherit:  # inherit: prepare_token_counts itself is deciding
            _say_once(f"hf_semisparse: searching kernels for {key} at first use (outside the prepared sizes)")
        if x2 is None or x2.shape[0] != m:
            generator = search_generator(handle.device)  # not the default one: see search_generator
            x2 = torch.randn(m, self.in_features, dtype=dtype, device=handle.device, generator=generator)
        alg, sparse_us, dense_us = self._search(
            handle,
            self.out_features,
            self.in_features,
            m,
            dtype,
            self.bias,
            False,
            self._c,
            x2,
            stream,
            dense=(lambda: self._dense(x2)) if self.keep_dense else None,
            quick=quick,
        )
        use_sparse, reason = choose(sparse_us, dense_us, backend.margin)
        decision = Decision(use_sparse, alg, sparse_us, dense_us, reason)
        backend.cache.put(key, decision)
        logger.info("%s: %s (alg %s)", key, reason, alg)
        return decision

    def _prepare(self, x2: torch.Tensor, stream: int):
        """First call for this token count (`x2`: `[padded M, K]`): the plan to run, or None to run dense."""
        handle = self._handle(x2.device)
        m = x2.shape[0]
        decision = self._decide(handle, bucket_for(m), x2.dtype, stream, x2 if is_bucket(m) else None)
        if not decision.use_sparse and self.weight is not None:
            return None
        return self._sparse_route(handle, m, x2.dtype, stream, x2)

    def _sparse_route(self, handle, m: int, dtype: torch.dtype, stream: int, x2=None, **search):
        """The 2:4 plan for `m` (a multiple of 16) tokens: one GEMM where `m` is a ladder size, else GEMMs over
        row blocks of ladder sizes (`ChunkedPlan`), so no new size is ever searched or planned."""
        if is_bucket(m):
            return self._plan(handle, m, dtype, self._decide(handle, m, dtype, stream, x2, **search))
        pieces, start = [], 0
        for size in split_into_buckets(m):
            part = None if x2 is None else x2[start : start + size]
            decision = self._decide(handle, size, dtype, stream, part, **search)
            pieces.append((start, size, self._plan(handle, size, dtype, decision)))
            start += size
        return ChunkedPlan(pieces, self.out_features, self.in_features)

    def decide(self, token_counts, quick: bool = True) -> list[Decision]:
        """The decision (2:4 or dense, and the kernel) for each ladder size in `token_counts` on this layer's
        device: from the tuning cache, or searched (anchor sizes) and inherited (the sizes between them)."""
        device = self._c.device
        handle = self._handle(device)
        stream = _current_stream(device.index)
        return [
            self._decide(handle, m, self.compute_dtype, stream, inherit=True, quick=quick)
            for m in token_counts
        ]

    def prepare(self, token_counts, quick: bool = True) -> None:
        """Decide and plan every ladder size in `token_counts` on this layer's device, ahead of serving: after
        it, any token count up to the largest one runs without a search or a new plan (`prepare_token_counts`)."""
        token_counts = list(token_counts)
        device = self._c.device
        handle = self._handle(device)
        stream = _current_stream(device.index)
        decisions = self.decide(token_counts, quick=quick)
        size = 0
        for m, decision in zip(token_counts, decisions, strict=True):
            # planned even where this size runs dense: it can be one block of a larger chunked call
            size = max(size, self._plan(handle, m, self.compute_dtype, decision).workspace_size)
        self._workspace(device, stream, size)

    # ---------------------------------------------------------------- dispatch, per token count
    def token_counts(self, device_index: int = 0) -> list[int]:
        """Token counts this layer has run on CUDA device `device_index` (each decided once)."""
        return sorted(numel // self.in_features for (index, numel) in self._fast if index == device_index)

    def runs_sparse(self, m: int, device_index: int = 0) -> bool | None:
        """Whether `m` tokens run on the 2:4 kernel; None if this token count has not run yet."""
        plan = self._fast.get((device_index, m * self.in_features), _UNSET)
        return None if plan is _UNSET else plan is not None

    def set_dispatch(self, m: int, use_sparse: bool, device_index: int = 0) -> None:
        """Run `m` tokens on the 2:4 kernel (`use_sparse`) or on the dense weight, overriding the per-GEMM decision.

        The token count must have run once (its kernel was searched then); dense needs `keep_dense=True`.
        """
        key = (device_index, m * self.in_features)
        if key not in self._fast:
            raise KeyError(
                f"{m} tokens have not run on cuda:{device_index} yet; run a forward with them first"
            )
        if not use_sparse:
            if self.weight is None:
                raise ValueError(
                    "this layer keeps no dense weight (keep_dense=False): it can only run sparse"
                )
            self._fast[key] = None
            return
        if self._fast[key] is not None:
            return
        handle = self._handle(torch.device("cuda", device_index))
        padded = padded_tokens(m)
        decision = get_backend().cache.get(self._shape_key(handle, bucket_for(padded), self.compute_dtype))
        if decision is None:
            raise KeyError(f"no tuned kernel for {padded} tokens (the tuning cache was cleared?)")
        self._fast[key] = self._sparse_route(
            handle, padded, self.compute_dtype, _current_stream(device_index)
        )

    def adds_residual_in_epilogue(self, m: int, device_index: int = 0) -> bool | None:
        """Whether calls with a residual for `m` tokens add it in the 2:4 kernel's epilogue; None if no such call
        has run yet."""
        plan = self._residual_fast.get((device_index, m * self.in_features), _UNSET)
        return None if plan is _UNSET else plan is not None

    def set_residual_epilogue(self, m: int, use: bool, device_index: int = 0) -> None:
        """Add residuals for `m` tokens in the 2:4 kernel's epilogue (`use`) or in a separate add, overriding the
        measured choice. A call with a residual for this token count must have run once (it searched then)."""
        key = (device_index, m * self.in_features)
        if key not in self._residual_fast:
            raise KeyError(f"no call with a residual for {m} tokens has run on cuda:{device_index} yet")
        if not use:
            self._residual_fast[key] = None
            return
        handle = self._handle(torch.device("cuda", device_index))
        decision = get_backend().cache.get(self._shape_key(handle, m, self.compute_dtype, residual=True))
        if decision is None:
            raise KeyError(f"no searched epilogue kernel for {m} tokens (the tuning cache was cleared?)")
        self._residual_fast[key] = self._plan(handle, m, self.compute_dtype, decision, residual=True)

    def _residual_plan(
        self, plan: MatmulPlan, x: torch.Tensor, residual: torch.Tensor, ws, key: tuple[int, int]
    ) -> MatmulPlan | None:
        """First call with a residual for this token count: the plan that adds it in its epilogue, or None where
        the GEMM plus a separate add measured faster. The epilogue's algorithm is searched with the residual as
        C: on an H100 with cuSPARSELt 0.8, with the plain search's algorithm the epilogue add cost 100 us more than
        a separate add at 768x3072 (M = 98304); searched for it, it saves 68 us there (CHANGELOG.md,
        0.1.0.dev6 and dev7)."""
        if torch.cuda.is_current_stream_capturing():
            return None  # no timing inside a capture; the separate add is always correct (not remembered)
        fused = self._epilogue_plan(plan, x, ws, key, residual=residual)
        self._residual_fast[key] = fused
        return fused

    def _epilogue_plan(self, plan, x: torch.Tensor, ws, key: tuple[int, int], residual=None, gelu=False):
        """The plan whose epilogue adds `residual` (or applies GELU), or None where `plan` plus a separate pass
        measured faster. Searched once per shape (the residual as C), and kept in the tuning cache."""
        m = key[1] // self.in_features  # not padded: only unpadded calls fuse an epilogue
        if not is_bucket(m):
            return None  # a chunked call: the blocks have no epilogue decisions of their own
        backend = get_backend()
        handle = self._handle(x.device)
        shape_key = self._shape_key(handle, m, x.dtype, residual=residual is not None, gelu=gelu)
        decision = backend.cache.get(shape_key)
        if decision is None:
            stream = _current_stream(key[0])
            out = torch.empty(m, self.out_features, dtype=x.dtype, device=x.device)
            if residual is not None:
                out = out.view(residual.shape)  # the separate add then runs as forward runs it

            def unfused():  # on the current stream: decode sizes are timed inside a capture of their own
                plan.run(self._c, x, out, ws, _current_stream(key[0]))
                if gelu:
                    F.gelu(out)
                else:
                    torch.add(out, residual)

            alg, fused_us, unfused_us = self._search(
                handle,
                self.out_features,
                self.in_features,
                m,
                x.dtype,
                self.bias,
                gelu,
                self._c,
                x,
                stream,
                dense=unfused,
                c=residual,
            )
            use = fused_us < unfused_us
            what = "GELU" if gelu else "add"
            reason = (
                f"epilogue {what} {fused_us:.1f} us {'<' if use else '>='} GEMM + {what} {unfused_us:.1f} us"
            )
            decision = Decision(use, alg, fused_us, unfused_us, reason)
            backend.cache.put(shape_key, decision)
            logger.info("%s: %s (alg %s)", shape_key, reason, alg)
        if not decision.use_sparse:
            return None
        return self._plan(handle, m, x.dtype, decision, residual=residual is not None, gelu=gelu)

    def _sparse_for_residual(self, x: torch.Tensor, key: tuple[int, int], residual, stream: int):
        """A token count whose plain GEMM runs faster dense, first called with a residual: the 2:4 plan if the
        GEMM with the residual in its epilogue beats the dense GEMM plus the separate add it would need, else None.
        (On an H100, bert-base's 768x768 projection at 24576 tokens: the plain GEMMs tie, but the fused one saves
        the add's pass; CHANGELOG.md, 0.1.0.dev8.)"""
        shape = (*x.shape[:-1], self.out_features)
        if torch.cuda.is_current_stream_capturing() or not _fusable(residual, shape, x):
            return None
        backend = get_backend()
        handle = self._handle(x.device)
        m = key[1] // self.in_features
        plain = backend.cache.get(self._shape_key(handle, m, x.dtype))
        if plain is None or plain.dense_us is None:
            return None
        sparse = self._plan(handle, m, x.dtype, plain)
        ws = self._workspace(x.device, stream, sparse.workspace_size)
        fused_plan = self._residual_plan(sparse, x, residual, ws, key)
        fused = backend.cache.get(self._shape_key(handle, m, x.dtype, residual=True))
        if fused_plan is None or not fused_beats_dense_with_add(plain, fused, backend.margin):
            self._residual_fast.pop(key, None)  # this token count runs dense: no epilogue add to report
            return None
        logger.info(
            "%s: 2:4 with the residual in the epilogue beats dense + add", self._shape_key(handle, m, x.dtype)
        )
        return sparse

    def applies_gelu_in_epilogue(self, m: int, device_index: int = 0) -> bool | None:
        """Whether calls with `gelu=True` for `m` tokens apply it in the 2:4 kernel's epilogue; None if no such
        call has run on the 2:4 kernel yet."""
        plan = self._gelu_fast.get((device_index, m * self.in_features), _UNSET)
        return None if plan is _UNSET else plan is not None

    def _gelu_plan(self, plan, x: torch.Tensor, ws, key: tuple[int, int]):
        """First 2:4 call with `gelu=True` for this token count: the CUTLASS plan that applies GELU in its
        epilogue, or None where the GEMM plus a separate `F.gelu` measured faster (and always on cuSPARSELt, whose
        GELU epilogue exists for INT8 only)."""
        if self.kernel != "cutlass":
            self._gelu_fast[key] = None
            return None
        if torch.cuda.is_current_stream_capturing():
            return None  # not remembered during a capture: decided on the first call outside one
        fused = self._epilogue_plan(plan, x, ws, key, gelu=True)
        self._gelu_fast[key] = fused
        return fused

    def _workspace(self, device: torch.device, stream: int, size: int) -> torch.Tensor | None:
        ws = self._workspaces.get(stream)
        if size and (ws is None or ws.numel() < size):
            ws = get_backend().workspace(device, stream, size)
            if not torch.cuda.is_current_stream_capturing():  # a capture's workspace serves that call only
                self._workspaces[stream] = ws
        return ws

    def _cuda_forward(
        self, x: torch.Tensor, key: tuple[int, int], plan, residual, gelu=False
    ) -> torch.Tensor:
        """`forward` on CUDA for what is not a dense-dispatched call: `plan` is `self._fast.get(key, _UNSET)`."""
        y, fused = self._cuda_linear(x, key, plan, residual, gelu)
        return y if fused else _finish(y, residual, gelu)

    def _cuda_linear(
        self, x: torch.Tensor, key: tuple[int, int], plan, residual, gelu=False
    ) -> tuple[torch.Tensor, bool]:
        """x @ W^T + b, and whether the 2:4 kernel's epilogue also added `residual` or applied GELU."""
        if x.dtype != self.compute_dtype:
            if self._w is None:
                raise TypeError(
                    f"SemiSparseLinear holds {self.compute_dtype} weights but got {x.dtype} input; "
                    "cast the input (or the model) to match"
                )
            return self._dense(x.to(self._w.dtype)).to(x.dtype), False
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        m = key[1] // self.in_features
        lead = x.shape[:-1]
        if m == 0:
            return x.new_empty(*lead, self.out_features), False
        # the kernel reads x through its pointer: a contiguous input needs no reshape (host time per call counts)
        padded = padded_tokens(m)
        if padded != m:  # the rows added are never read back: left uninitialised, no fill kernel
            rows = x.new_empty(padded, self.in_features)
            rows[:m].copy_(x.reshape(m, self.in_features))
            x = rows
        elif not x.is_contiguous():
            x = x.contiguous()
        stream = _current_stream(key[0])
        if plan is _UNSET:
            plan = self._prepare(x.view(padded, self.in_features), stream)
            if plan is None and residual is not None and padded == m:
                plan = self._sparse_for_residual(x, key, residual, stream)
            if not torch.cuda.is_current_stream_capturing():
                self._fast[key] = plan
            if plan is None:
                return self._dense(x[:m].view(*lead, self.in_features) if padded != m else x), False
        ws = self._workspace(x.device, stream, plan.workspace_size)
        if padded == m:
            shape = (*lead, self.out_features)
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
            if gelu:
                fused = self._gelu_fast.get(key, _UNSET)
                if fused is _UNSET:
                    fused = self._gelu_plan(plan, x, ws, key)
                if fused is not None:
                    if fused.workspace_size > plan.workspace_size:
                        ws = self._workspace(x.device, stream, fused.workspace_size)
                    fused.run(self._c, x, out, ws, stream)  # out = gelu(x @ W^T (+ bias))
                    return out, True
            elif residual is not None and _fusable(residual, shape, x):
                fused = self._residual_fast.get(key, _UNSET)
                if fused is _UNSET:
                    fused = self._residual_plan(plan, x, residual, ws, key)
                if fused is not None:
                    if fused.workspace_size > plan.workspace_size:
                        ws = self._workspace(x.device, stream, fused.workspace_size)
                    fused.run(self._c, x, out, ws, stream, c=residual)  # out = x @ W^T (+ bias) + residual
                    return out, True
            plan.run(self._c, x, out, ws, stream)
            return out, False
        out = torch.empty(padded, self.out_features, dtype=x.dtype, device=x.device)
        plan.run(self._c, x, out, ws, stream)
        return out[:m].view(*lead, self.out_features), False


def fused_beats_dense_with_add(plain: Decision, fused: Decision | None, margin: float) -> bool:
    """From a plain GEMM's decision (2:4 `sparse_us` against dense `dense_us`) and the residual epilogue's (fused
    `sparse_us` against 2:4 GEMM + add `dense_us`): whether the fused 2:4 call beats dense GEMM + add by `margin`.
    The add's time is what the separate add cost the 2:4 GEMM in the residual search."""
    if fused is None or not fused.use_sparse or None in (plain.sparse_us, plain.dense_us, fused.dense_us):
        return False
    add_us = max(fused.dense_us - plain.sparse_us, 0.0)
    return fused.sparse_us < (plain.dense_us + add_us) * (1.0 - margin)


def _finish(y: torch.Tensor, residual: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """What `forward` adds after a GEMM whose epilogue did not: the residual, or the exact GELU."""
    if gelu:
        if residual is not None:
            raise ValueError("SemiSparseLinear adds a residual or applies GELU, not both")
        return F.gelu(y)
    return y if residual is None else y + residual


def _fusable(residual: torch.Tensor, shape: tuple, x: torch.Tensor) -> bool:
    """Whether cuSPARSELt can read `residual` as its C operand: the output's shape, dtype and row-major layout."""
    return (
        residual.dtype is x.dtype
        and residual.shape == shape
        and residual.is_contiguous()
        and residual.data_ptr() % ALIGNMENT == 0
        and residual.device == x.device
    )


def refuse_state_dict_without_weight(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook of layers that keep only their compressed weight: a state dict (and so any save) would
    silently lack the weight, and loading it back would leave the layer random."""
    raise RuntimeError(
        f"{prefix.rstrip('.') or type(module).__name__} keeps only its compressed 2:4 weight (accelerate_24 with "
        "keep_dense=False, the default for decoder LLMs): its state dict would lack the weight and a save would "
        "lose it. Save the model before accelerate_24 (save_sparse_pretrained), or accelerate with keep_dense=True."
    )


def _after_load(module: SemiSparseLinear, incompatible_keys) -> None:
    """After `load_state_dict`: refresh the hot path's tensors, and compress the loaded dense weight again (the
    compressed copy is not part of the state dict; without this the 2:4 kernel would keep the old values)."""
    module._cache_tensors()
    weight = module._w
    if weight is None:
        return
    from ..masks import find_nm_violation

    bad = find_nm_violation(weight)
    if bad is not None:
        raise ValueError(
            f"the weight loaded into a SemiSparseLinear is not 2:4: the group at {bad.index} ([out, in] layout) "
            f"has {bad.nonzeros} non-zeros"
        )
    with torch.no_grad():
        fresh = module._handle(weight.device).compress(weight.contiguous())
        if module._c is not None and module._c.shape == fresh.shape and module._c.device == fresh.device:
            module._c.copy_(fresh)  # in place: captured CUDA graphs read this buffer's address
        else:
            module.compressed = fresh


@torch.library.custom_op("hf_semisparse::linear_24", mutates_args=())
def linear_24(
    x: torch.Tensor,
    compressed: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    layer_id: int,
    out_features: int,
) -> torch.Tensor:
    """y = x @ W^T + b for a 2:4 W, on cuSPARSELt (or dense where that measured faster)."""
    layer = _LAYERS.get(layer_id)
    if layer is None:
        raise RuntimeError(f"SemiSparseLinear {layer_id} no longer exists")
    with compiled_call():  # a search here (an unprepared size) times eager calls, captures nothing
        return layer.run(x)


@linear_24.register_fake
def _(x, compressed, weight, bias, layer_id, out_features):
    return x.new_empty(*x.shape[:-1], out_features)

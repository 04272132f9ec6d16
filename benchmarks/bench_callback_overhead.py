"""Training-step overhead of SparsityCallback: the same Trainer run with and without it, in one process.

Each run times its steps after the warm-up as one window (a sync at each end only), so the host time the
callback adds shows only where it is not hidden behind GPU work, as in real training. Prints a table and
writes JSON. Not a test: timings depend on the machine.

A dense baseline multiplies other numbers than a 2:4 model (half of its weights are not zero), and an H100's
clocks depend on the data it multiplies: `--pre-pruned --learning-rate 0` gives every variant the same pruned
weights at every step, so that only the callback's own work differs.

    python benchmarks/bench_callback_overhead.py --device cpu --json outputs/overhead_cpu.json
    python benchmarks/bench_callback_overhead.py --device cuda --hidden 768 --layers 12 --batch 32 --seq 128
    python benchmarks/bench_callback_overhead.py --device cuda --hidden 768 --layers 12 --batch 32 --seq 128 \
        --pre-pruned --learning-rate 0
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from unittest import mock

import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_semisparse import Sparsifier, SparsityCallback, SparsityConfig, SparsityTrainer, prune_24
from hf_semisparse.utils import write_json


class StepTimer(TrainerCallback):
    """Wall time of the steps after `warmup`, synchronizing only at the start and the end of that window, as
    a training run sees it (the GPU may run ahead of the host in between). On CUDA also the time between
    consecutive step starts on the GPU's clock (events, no sync), whose median is robust to a stray slow step.
    Optionally profiles the window."""

    def __init__(self, warmup: int, profile: bool = False) -> None:
        self.warmup = warmup
        self.seconds = 0.0
        self.steps = 0
        self._t0 = None
        self.profiler = None
        self.profile = profile
        self._events: list = []

    def _mark(self) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append(event)

    @property
    def step_ms(self) -> list[float]:
        """GPU-clock milliseconds of each timed step (CUDA only)."""
        return [a.elapsed_time(b) for a, b in zip(self._events, self._events[1:], strict=False)]

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self._mark()
        if state.global_step == self.warmup:
            self._sync()
            if self.profile:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
            self._t0 = time.perf_counter()
            self._mark()

    def on_train_end(self, args, state, control, **kwargs):
        self._mark()
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        self.steps = state.global_step - self.warmup
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": torch.tensor(int(self.ids[i, 0] % 2))}


VARIANTS = {
    "plain": "Trainer",
    "callback": "Trainer + SparsityCallback (hooks queue one fused mask)",
    "callback-per-weight": "Trainer + SparsityCallback (per-weight masking, as DDP/FSDP)",
    "trainer": "SparsityTrainer (one fused gradient mask before clipping)",
    "trainer-weight-pass": "SparsityTrainer, weight_pass='always' (weights re-masked every step)",
}


def build_model(a) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64),
        intermediate_size=4 * a.hidden,
        vocab_size=4096,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg)
    if a.pre_pruned:
        prune_24(model, show_progress=False)
    return model


def time_masking_ops(a, weights: bool, iterations: int = 50) -> float:
    """Milliseconds that the fused per-step work takes on its own: one gradient mask over every target (what
    SparsityTrainer adds to a step once the weight pass is skipped), plus one weight mask when `weights`; fp32
    weights and gradients on the device."""
    model = build_model(a).to(a.device)
    sp = Sparsifier(model, SparsityConfig())
    sp.update_masks(1.0)
    for t in sp.targets:
        t.weight.grad = torch.randn_like(t.weight)

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        sp.mask_gradients()
        if weights:
            sp.apply_masks()

    for _ in range(5):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync()
    return 1e3 * (time.perf_counter() - start) / iterations


def run(variant: str, a, skipped: dict, medians: dict, profile: bool = False) -> float:
    """Milliseconds per training step after the warm-up; counts the skipped weight passes into `skipped` and
    appends the run's median GPU-clock step time to `medians` (CUDA)."""
    model = build_model(a)
    timer = StepTimer(a.warmup, profile)
    callbacks = [timer]
    config = SparsityConfig()
    if variant.startswith("callback"):
        callbacks.append(SparsityCallback(config))
    args = TrainingArguments(
        "outputs/bench_overhead",
        max_steps=a.warmup + a.steps,
        learning_rate=a.learning_rate,
        per_device_train_batch_size=a.batch,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=a.device == "cpu",
        bf16=a.device == "cuda",
        disable_tqdm=True,
        seed=0,
    )
    data = RandomTokens(a.batch * (a.warmup + a.steps), a.seq, 4096)
    if variant.startswith("trainer"):
        trainer = SparsityTrainer(
            model=model, args=args, train_dataset=data, callbacks=callbacks, sparsity_config=config
        )
        if variant == "trainer-weight-pass":
            trainer.sparsity_callback.weight_pass = "always"
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if variant == "callback-per-weight":  # what a multi-process run uses; this run has one process
        with mock.patch("hf_semisparse.pruning.sparsifier._multi_process", return_value=True):
            trainer.train()
    else:
        trainer.train()
    sparsity = [c for c in trainer.callback_handler.callbacks if isinstance(c, SparsityCallback)]
    if sparsity:
        skipped[variant] = skipped.get(variant, 0) + sparsity[0].skipped_weight_passes
    if timer.step_ms:
        medians.setdefault(variant, []).append(statistics.median(timer.step_ms))
    if timer.profiler is not None:
        sort = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
        print(f"profile, {VARIANTS[variant]}, {timer.steps} steps:")
        print(timer.profiler.key_averages().table(sort_by=sort, row_limit=25))
    return 1e3 * timer.seconds / timer.steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="alternate plain/callback runs this many times")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument(
        "--pre-pruned",
        action="store_true",
        help="every variant starts from the same 2:4-pruned weights; with --learning-rate 0 all of them then "
        "multiply the same numbers at every step, so data-dependent GPU clocks cannot favour one",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["callback", "trainer", "trainer-weight-pass"],
        choices=list(VARIANTS)[1:],
    )
    p.add_argument(
        "--profile", action="store_true", help="then profile one run of each and print the top ops"
    )
    p.add_argument("--json", default=None)
    a = p.parse_args()

    variants = ["plain", *a.variants]
    runs: dict = {v: [] for v in variants}
    skipped: dict = {}
    medians: dict = {}
    for _ in range(a.repeats):  # alternate, so drift in machine load hits every variant
        for v in variants:
            runs[v].append(run(v, a, skipped, medians))
    if a.profile:
        for v in variants:
            run(v, a, {}, {}, profile=True)
    plain = statistics.median(runs["plain"])
    masking_ms = time_masking_ops(a, weights=True)
    gradient_masking_ms = time_masking_ops(a, weights=False)
    result = {
        "device": torch.cuda.get_device_name()
        if a.device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": vars(a),
        "method": "wall time of the steps after warm-up, one sync at each end, per step; median over repeats",
        "step_ms": {
            VARIANTS[v]: {"median": statistics.median(r), "min": min(r), "max": max(r), "runs": r}
            for v, r in runs.items()
        },
        "overhead": {VARIANTS[v]: statistics.median(runs[v]) / plain - 1 for v in a.variants},
        # each repeat against the plain run just before it: less exposed to drift over the whole run
        "paired_overhead": {
            VARIANTS[v]: statistics.median(x / p - 1 for x, p in zip(runs[v], runs["plain"], strict=True))
            for v in a.variants
        },
        "fused_masking_ms_per_step": masking_ms,
        "fused_gradient_masking_ms_per_step": gradient_masking_ms,
        "skipped_weight_passes": {VARIANTS[v]: n for v, n in skipped.items()},
    }
    if medians:
        result["median_step_ms_per_run"] = {VARIANTS[v]: m for v, m in medians.items()}
        result["median_step_paired_overhead"] = {
            VARIANTS[v]: statistics.median(
                x / p - 1 for x, p in zip(medians[v], medians["plain"], strict=True)
            )
            for v in a.variants
        }
    print(f"{'run':<62}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'overhead':>10}{'paired':>9}")
    for v in variants:
        r = result["step_ms"][VARIANTS[v]]
        extra = paired = ""
        if v != "plain":
            extra = f"{100 * result['overhead'][VARIANTS[v]]:+.1f}%"
            paired = f"{100 * result['paired_overhead'][VARIANTS[v]]:+.1f}%"
        print(
            f"{VARIANTS[v]:<62.62}{r['median']:>10.2f}{r['min']:>9.2f}{r['max']:>9.2f}{extra:>10}{paired:>9}"
        )
    print(f"({result['device']}, {a.repeats} runs of {a.steps} steps each)")
    for v, overhead in result.get("median_step_paired_overhead", {}).items():
        plain_median = statistics.median(medians["plain"])
        print(
            f"median GPU-clock step, {v}: {statistics.median(result['median_step_ms_per_run'][v]):.2f} ms "
            f"(plain {plain_median:.2f}), paired overhead {100 * overhead:+.1f}%"
        )
    for label, ms in (("gradients + weights", masking_ms), ("gradients only", gradient_masking_ms)):
        print(
            f"fused masking ops alone ({label}, every target): {ms:.3f} ms per step, "
            f"{100 * ms / plain:.1f}% of the plain step"
        )
    print(f"weight passes skipped (all runs): {result['skipped_weight_passes']}")
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()

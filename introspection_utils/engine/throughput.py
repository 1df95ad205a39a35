"""How fast work runs against what the device can do: the peak of the kernel a model's linears use, in the model's
dtype and with its weight shapes, and the fraction of it that a measured piece of work reached.

The peak is timed with ``torch.nn.functional.linear`` on random weights of the shapes of one decoder layer's linear
modules (q, k, v, o, gate, up, down, …), fed ``tokens`` rows at a time: the same kernel (oneDNN / cuBLAS GEMM) and
the same shapes the engine's forward and a training step's forward and backward run. An ``n × n`` ``a @ b`` can take
another kernel (on a CPU without bf16 instructions bfloat16 matmuls do, and it once read far above 100 % of peak).

    peak = linear_peak_gflops(handle)                          # GFLOP/s, the handle's dtype and device
    fraction = peak_fraction(handle, flops, seconds)           # the fraction of that peak reached (1.0: all)
    flops = linear_flops(handle, tokens, n_layers, passes=3)   # forward + full backward through n_layers
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from introspection_utils.models.handle import BF16_CPU_FLAGS, cpu_flags, fast_bfloat16

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

DEFAULT_TOKENS = {"cpu": 1024, "cuda": 8192}  # rows fed to the linears per call when timing the peak


def linear_shapes(handle: ModelHandle) -> list[tuple[int, int, bool]]:
    """``(out_features, in_features, has_bias)`` of every ``nn.Linear`` in the model's first decoder layer (all
    layers of the families here share them), in module order."""
    layer = handle.torch_model.get_decoder().layers[0]
    return [(m.out_features, m.in_features, m.bias is not None) for m in layer.modules()
            if isinstance(m, torch.nn.Linear)]


def layer_linear_params(handle: ModelHandle) -> int:
    """Weights of one decoder layer's linears (what ``2 × params × tokens`` counts as a layer's matmul FLOPs)."""
    return sum(out * inp for out, inp, _ in linear_shapes(handle))


def linear_flops(handle: ModelHandle, tokens: int, n_layers: int, *, passes: float = 1.0) -> float:
    """Matmul FLOPs of ``tokens`` tokens through ``n_layers`` decoder layers' linears: ``2 × params × tokens ×
    n_layers × passes``. ``passes``: 1 for a forward; 3 for forward + backward with weight gradients; 2 for forward +
    backward that needs only the input gradients (frozen weights, e.g. below low-rank adapters — the adapters' own
    matmuls are not counted). Attention's score and value products are not linears and are not counted."""
    if tokens < 0 or n_layers < 0 or passes <= 0:
        raise ValueError(f"tokens and n_layers must be >= 0 and passes > 0, got {tokens}, {n_layers}, {passes}")
    return 2.0 * layer_linear_params(handle) * tokens * n_layers * passes


def linear_peak_gflops(handle: ModelHandle, *, tokens: int | None = None, seconds: float = 0.5, rounds: int = 3,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> float:
    """The practical peak, in GFLOP/s, of ``F.linear`` on the shapes of one decoder layer's linears
    (:func:`linear_shapes`) with ``tokens`` input rows (default 1024 on a CPU, 8192 on CUDA), in ``dtype`` on
    ``device`` (default the handle's): the best of ``rounds`` rounds, each repeating the layer's linears for at least
    ``seconds`` (and at least once)."""
    dtype = dtype or handle.dtype
    device = torch.device(device) if device is not None else handle.device
    tokens = tokens or DEFAULT_TOKENS.get(device.type, 1024)
    shapes = linear_shapes(handle)
    if not shapes:
        raise ValueError(f"{handle.name}: its decoder layer has no nn.Linear modules to time")
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(out, inp, generator=generator).to(device, dtype),
                torch.randn(out, generator=generator).to(device, dtype) if bias else None) for out, inp, bias in shapes]
    inputs = {inp: torch.randn(tokens, inp, generator=generator).to(device, dtype) for _, inp, _ in shapes}
    flops = 2.0 * tokens * sum(out * inp for out, inp, _ in shapes)

    def layer() -> None:
        for (weight, bias), (_, inp, _) in zip(weights, shapes, strict=True):
            F.linear(inputs[inp], weight, bias)

    with torch.no_grad():
        layer()  # warm-up: kernel selection, allocations
        _sync(device)
        best = 0.0
        for _ in range(rounds):
            start, repeats = time.perf_counter(), 0
            while repeats == 0 or time.perf_counter() - start < seconds:
                layer()
                _sync(device)
                repeats += 1
            best = max(best, flops * repeats / (time.perf_counter() - start) / 1e9)
    return best


def peak_fraction(handle: ModelHandle, flops: float, seconds: float, *, peak: float | None = None,
                  tokens: int | None = None) -> float:
    """The fraction of the dtype's linear peak that ``flops`` FLOPs in ``seconds`` reached (``peak``: a peak in
    GFLOP/s measured already, else :func:`linear_peak_gflops` of the handle now, with ``tokens`` rows)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    peak = peak if peak is not None else linear_peak_gflops(handle, tokens=tokens)
    return flops / seconds / 1e9 / peak


def load_average() -> float | None:
    """The 1-minute load average (``os.getloadavg``), ``None`` where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def bf16_flags(flags: set[str] | None = None) -> str:
    """The CPU's bfloat16 instructions as a block says them: ``"amx_bf16, avx512_bf16"``, or ``"none (amx_bf16 /
    avx512_bf16 absent)"`` (``flags``: default :func:`~introspection_utils.models.handle.cpu_flags`)."""
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    return ", ".join(found) if found else f"none ({' / '.join(BF16_CPU_FLAGS)} absent)"


def auto_dtype(device: torch.device | str, flags: set[str] | None = None) -> str:
    """What ``load_model(dtype="auto")`` picks on ``device``, and why, in words: ``"bfloat16 (amx_bf16, avx512_bf16
    present)"`` or ``"float32 (no bf16 instructions: bfloat16 would run in a slow generic kernel)"``."""
    device = torch.device(device)
    if fast_bfloat16(device, flags):
        why = "native bf16" if device.type == "cuda" else f"{bf16_flags(flags)} present"
        return f"bfloat16 ({why})"
    if device.type == "cuda":
        return "float32 (no native bf16 on this GPU)"
    return "float32 (no bf16 instructions: bfloat16 would run in a slow generic kernel)"


def device_name(device: torch.device | str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The device in words: the GPU's name, or ``"2-core Intel(R) Xeon(R) Processor (x86_64)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {cpu_model(cpuinfo) or 'CPU'} ({platform.machine()})"


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name as ``cpuinfo`` gives it, or ``""`` where it gives none."""
    try:
        return next((line.partition(":")[2].strip() for line in Path(cpuinfo).read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        return ""


def machine() -> dict:
    """The machine a measurement (an organism's training) ran on, for its metadata: CPU model, bf16 instructions,
    threads, load average."""
    return {"cpu": cpu_model() or platform.processor(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "bf16_flags": sorted(set(BF16_CPU_FLAGS) & cpu_flags()),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def load_words(start: float | None, end: float | None) -> str:
    """The load averages of a measurement in words, saying whether the machine was shared: ``start`` is read before
    the run's own work (others' load), ``end`` after it (the run's own threads included)."""
    if start is None:
        return "load average unavailable"
    shared = ("shared: other processes were running when it started (a quiet machine may be faster)"
              if start >= 0.5 else "quiet when it started")
    after = f", {end:.2f} at the end (its own threads included)" if end is not None else ""
    return f"load average {start:.2f} at the start{after}; the machine was {shared}"


def measured_line(device: torch.device | str, *, load_start: float | None, load_end: float | None, command: str,
                  date: str | None = None) -> str:
    """A block's last line: when, on what (device, threads, the CPU's bf16 instructions and what ``dtype="auto"``
    picks there), under what load (:func:`load_words`), with which torch, and the command that wrote it."""
    date = date or datetime.date.today().isoformat()
    threads = torch.get_num_threads()
    return (f"Measured {date} on {device_name(device)}, {threads} thread{'s' * (threads != 1)}, bf16 CPU flags: "
            f"{bf16_flags()}; `dtype=\"auto\"` picks {auto_dtype(device)}; {load_words(load_start, load_end)}; "
            f"torch {torch.__version__}; written by `{command}`.")


@dataclass(frozen=True)
class Throughput:
    """One timed piece of work for a throughput table: ``examples`` (trials, training examples) and ``tokens`` done
    in ``seconds``, ``flops`` of useful work, against ``peak`` GFLOP/s (:func:`linear_peak_gflops` in its dtype)."""

    label: str
    seconds: float
    examples: int
    tokens: int
    flops: float
    peak: float

    @property
    def fraction(self) -> float:
        return self.flops / self.seconds / 1e9 / self.peak


def throughput_table(title: str, rows: Sequence[Throughput]) -> str:
    """A markdown table of ``rows`` (examples/s, tokens/s, wall, useful GFLOP/s with its fraction of the peak), the
    first header cell ``title`` (model, layer, what was run): the format of the benchmark's blocks, for training."""
    lines = [f"| {title} | examples/s | tokens/s | wall | useful GFLOP/s (of its linear peak) |",
             "|---|---|---|---|---|"]
    for r in rows:
        per_s = r.examples / r.seconds
        rate = f"{per_s:#.2g}" if per_s < 10 else f"{per_s:.1f}"  # 0.036, 8.0; 23.4
        lines.append(f"| {r.label} | {rate} | {r.tokens / r.seconds:.0f} | {r.seconds:.1f} s | "
                     f"{r.flops / r.seconds / 1e9:.0f} ({r.fraction:.0%} of {r.peak:.0f}) |")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

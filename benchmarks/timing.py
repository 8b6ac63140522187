"""How the benchmarks time a call: GPU time with a cold L2 and no host launch overhead.

The first H100 run timed each call with triton.testing.do_bench (events around each eager call):
a lowbit.linear call spends ~90 us in Python before its kernel starts (measured on this repo's
CPU machine with the launch stubbed out), more than a decode GEMV takes on the GPU, so the events
measured the host, not the kernel (M=1 times of 80-400 us for kernels that move 2-60 MB, and the
same config 80 us in one process and 220 us in another). `time_us` therefore replays a CUDA
graph of the call, so the GPU never waits for the host, and zeroes a buffer of twice the L2 size
before every call inside the graph, so the weights come from memory as in a model's forward (each
layer's weights are read once per token). The flush's own time is measured by a graph of flushes
alone and subtracted. `eager_time_us` keeps do_bench's eager time, host overhead included, which
is what a caller without CUDA graphs or torch.compile waits.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, NamedTuple

import torch

#: GPU time each timed graph replay should take (more repeats per graph for shorter calls)
TARGET_GRAPH_MS = 10.0
REPLAYS = 10  # timed replays; the median and 20 / 80 % quantiles are reported
_flush_buffers: dict = {}


class Timing(NamedTuple):
    """Microseconds per call: median and 20 / 80 % quantiles, and how they were taken:
    "cuda-graph" (GPU time, cold L2), "eager" (do_bench events, host overhead included) or
    "cpu" (wall clock)."""
    us: float
    p20: float
    p80: float
    method: str


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """int8 buffer of twice the GPU's L2 size (made once per device): zeroing it evicts every
    line the previous call left in L2."""
    if device not in _flush_buffers:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
        _flush_buffers[device] = torch.empty(2 * l2, dtype=torch.int8, device=device)
    return _flush_buffers[device]


def _capture(calls: list[Callable], repeats: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _quantiles(samples: list[float], method: str) -> Timing:
    samples = sorted(samples)
    at = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), at(0.2), at(0.8), method)


def gpu_time_us(fn: Callable, device: torch.device) -> Timing:
    """fn's GPU time per call with a cold L2, host overhead excluded (see the module docstring).
    fn must be capturable in a CUDA graph (no host synchronization); it runs once first, eagerly,
    so compilation and autotuning stay out of the capture."""
    flush = _flush_buffer(device).zero_
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        flush()
        fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - start) * 1e3 / 3  # an overestimate (host time): fewer repeats
    repeats = max(5, min(500, int(TARGET_GRAPH_MS / max(estimate_ms, 1e-3))))
    with_fn, flushes = _capture([flush, fn], repeats), _capture([flush], repeats)
    _replay_ms(with_fn), _replay_ms(flushes)  # first replays upload the graphs
    # replays alternate, so a drift of the clocks shifts both terms of each difference alike
    per_call = [(_replay_ms(with_fn) - _replay_ms(flushes)) * 1e3 / repeats for _ in range(REPLAYS)]
    del with_fn, flushes
    return _quantiles([max(us, 1e-3) for us in per_call], "cuda-graph")


def eager_time_us(fn: Callable, rep_ms: float | None = None) -> Timing:
    """do_bench's time of eager calls (L2 zeroed before each), host launch overhead included."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8], **({} if rep_ms is None else {"rep": rep_ms}))
    return Timing(med * 1e3, lo * 1e3, hi * 1e3, "eager")


def time_us(fn: Callable, device: torch.device, cpu_runs: int = 3) -> Timing:
    """On CUDA, `gpu_time_us`, or `eager_time_us` for a call that cannot be captured in a graph
    (its Timing says which); off CUDA, the median, lowest and highest wall time of cpu_runs calls."""
    if device.type == "cuda":
        try:
            return gpu_time_us(fn, device)
        except Exception:  # not capturable: a host synchronization inside, or another library's stream (cupy)
            torch.cuda.synchronize()
            return eager_time_us(fn)  # a call that fails eagerly too raises here
    samples = []
    for _ in range(cpu_runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return Timing(samples[len(samples) // 2], samples[0], samples[-1], "cpu")

"""Tuned launch configs for the dequant kernel family (and the LUT lookup kernel and dfloat11's
fused decode + GEMV), per GPU and per M bucket.

`benchmarks/tune.py` measures candidate paths (split-K GEMV or tensor-core GEMM) and tile sizes
for each kernel variant, weight shape and M bucket, keeps only candidates whose output passes
the correctness gate, and writes the fastest into `lowbit/kernels/tuned/<gpu>.json`. Launchers
read that file once per process (no autotuning at run time, so no cold start). Without an
entry, the launcher's defaults apply. LOWBIT_TUNED_CONFIGS=<file> points at another table.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

from .runtime import FP_FUSION

M_BUCKETS = (1, 4, 16, 64, 256, 4096)
#: launch options a config may set besides its path and tile sizes (upper-case constexprs); maxnreg:
#: a cap on registers per thread (ptxas spills past it), which lets more programs share an SM
LAUNCH_KEYS = ("num_warps", "num_stages", "maxnreg")
TUNED_DIR = Path(__file__).with_name("tuned")
ENV_VAR = "LOWBIT_TUNED_CONFIGS"
_log = logging.getLogger(__name__)
_forced: ContextVar[dict | None] = ContextVar("lowbit_forced_config", default=None)
_last_key: ContextVar[str | None] = ContextVar("lowbit_last_config_key", default=None)
_UNTUNED: dict = {}  # forced "config" meaning: no tuned entry, the launcher's defaults


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the largest bucket for bigger M)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


@functools.lru_cache(maxsize=None)  # read on every launch: ask the driver once per device
def device_key(device: torch.device) -> str:
    """File-name-safe GPU name, e.g. "NVIDIA_H100_80GB_HBM3"; "cpu" off CUDA."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def config_key(variant: str, n: int, kp: int, m: int) -> str:
    return f"{variant}/{n}x{kp}/m{m_bucket(m)}"


@functools.lru_cache(maxsize=None)
def _read_table(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        configs = json.loads(Path(path).read_text()).get("configs", {})
    except (OSError, ValueError, AttributeError) as exc:
        _log.warning("lowbit: ignoring unreadable tuned-config file %s (%s)", path, exc)
        return {}
    return configs if isinstance(configs, dict) else {}


def table_path(device: torch.device) -> str:
    return os.environ.get(ENV_VAR) or _packaged_table(device)


@functools.lru_cache(maxsize=None)  # read on every launch: build the path once per device
def _packaged_table(device: torch.device) -> str:
    return str(TUNED_DIR / f"{device_key(device)}.json")


def lookup(device: torch.device, variant: str, n: int, kp: int, m: int) -> dict | None:
    """The tuned config for this launch, or None (use the defaults). Records the key it
    looked up so benchmarks/tune.py can file its measurement under it."""
    key = config_key(variant, n, kp, m)
    _last_key.set(key)
    forced = _forced.get()
    if forced is _UNTUNED:
        return None
    if forced is not None:
        return dict(forced)
    entry = _read_table(table_path(device)).get(key)
    return ({k: v for k, v in entry.items() if k == "path" or k.isupper() or k in LAUNCH_KEYS}
            if isinstance(entry, dict) else None)


def launch_options(cfg: dict) -> dict:
    """The num_warps / num_stages / maxnreg of a config, as keyword arguments of a Triton launch
    (with fused multiply-adds on: `runtime.FP_FUSION`)."""
    return {**FP_FUSION, **{k: cfg[k] for k in LAUNCH_KEYS if cfg.get(k) is not None}}


def valid_launch_options(cfg: dict) -> bool:
    """num_warps a power of two in 1..16, num_stages in 1..8 and maxnreg in 32..255 (or None: no
    cap), where given."""
    warps, stages, registers = cfg.get("num_warps", 4), cfg.get("num_stages", 2), cfg.get("maxnreg")
    return (isinstance(warps, int) and warps in (1, 2, 4, 8, 16)
            and isinstance(stages, int) and 1 <= stages <= 8
            and (registers is None or isinstance(registers, int) and 32 <= registers <= 255))


def last_key() -> str | None:
    """The key of the most recent lookup in this context (for the tuner)."""
    return _last_key.get()


@contextmanager
def force(config: dict | None):
    """Every lookup inside returns `config` (the tuner's candidates); None: no lookup finds an
    entry, so the launchers' defaults apply (the tuner's baseline)."""
    token = _forced.set(_UNTUNED if config is None else dict(config))
    try:
        yield
    finally:
        _forced.reset(token)

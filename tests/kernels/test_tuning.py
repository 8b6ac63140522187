"""Tuned launch configs: the launchers take valid tuned entries (path, tiles, num_warps /
num_stages / maxnreg) and ignore invalid ones; the LUT launcher runs the path a measurement chose; the
tuner's coordinate descent finds the best point and skips pruned ones."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.kernels import tuning
from lowbit.kernels.dequant_gemm import pick_config

from ..conftest import kernel_devices, record_launches

DEVICES = kernel_devices()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tuned_table(tmp_path, monkeypatch):
    """write(configs) puts a tuned-config table in place for this test only."""
    path = tmp_path / "tuned.json"
    monkeypatch.setenv(tuning.ENV_VAR, str(path))

    def write(configs: dict) -> None:
        path.write_text(json.dumps({"configs": configs}))
        tuning._read_table.cache_clear()

    yield write
    tuning._read_table.cache_clear()


def _key_of(x, packed) -> str:
    tuning._last_key.set(None)
    lowbit.linear(x, packed, backend="triton")
    return tuning.last_key()


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
def test_launch_options_are_taken_and_checked(tuned_table):
    device = torch.device(DEVICES[0])
    gemv = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "COLUMN_K": 16, "SPLIT_K": 2, "num_warps": 2, "num_stages": 1}
    variant = "int4-asym-g128-float-torch.float32"
    tuned_table({f"{variant}/37x384/m1": {**gemv, "us": 1.0, "format": "int4"}})
    assert pick_config(1, 37, 384, 128, device, variant=variant) == gemv
    with tuning.force(None):  # the tuner's baseline: the defaults, whatever the table holds
        assert pick_config(1, 37, 384, 128, device, variant=variant) == pick_config(1, 37, 384, 128, device)
    tuned_table({f"{variant}/37x384/m1": {**gemv, "num_warps": 3}})  # not a power of two: ignored
    assert "num_warps" not in pick_config(1, 37, 384, 128, device, variant=variant)
    tuned_table({f"{variant}/37x384/m1": {**gemv, "num_stages": 0}})
    assert "num_stages" not in pick_config(1, 37, 384, 128, device, variant=variant)
    for registers in (168, None):  # a register cap, or none (the tuner's "no cap" candidate)
        tuned_table({f"{variant}/37x384/m1": {**gemv, "maxnreg": registers}})
        assert pick_config(1, 37, 384, 128, device, variant=variant) == {**gemv, "maxnreg": registers}
    for registers in (300, 16, "168"):  # past the hardware's 255, too few, not a number
        tuned_table({f"{variant}/37x384/m1": {**gemv, "maxnreg": registers}})
        assert "maxnreg" not in pick_config(1, 37, 384, 128, device, variant=variant)
    tuned_table({f"{variant}/37x384/m1": {**gemv, "PREFETCH": 1}})
    assert pick_config(1, 37, 384, 128, device, variant=variant) == {**gemv, "PREFETCH": 1}
    # not 0 / 1, or with a pipelined loop (num_stages 2, which loads ahead itself): the entry is ignored
    for entry in ({**gemv, "PREFETCH": 2}, {**gemv, "PREFETCH": "1"}, {**gemv, "PREFETCH": 1, "num_stages": 2}):
        tuned_table({f"{variant}/37x384/m1": entry})
        assert pick_config(1, 37, 384, 128, device, variant=variant) == pick_config(1, 37, 384, 128, device)
    assert "maxnreg" not in tuning.launch_options({**gemv, "maxnreg": None})
    assert tuning.launch_options({**gemv, "maxnreg": 128})["maxnreg"] == 128
    stale = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}  # the GEMV before COLUMN_K
    for entry in (stale, {**gemv, "COLUMN_K": 4}, {**gemv, "COLUMN_K": 256}):  # no column / too short / past a group
        tuned_table({f"{variant}/37x384/m1": entry})
        assert pick_config(1, 37, 384, 128, device, variant=variant) == pick_config(1, 37, 384, 128, device)
    w, x = torch.randn(37, 300, device=device) * 0.02, torch.randn(1, 300, device=device)
    packed = lowbit.get_format("int4").quantize(w)
    tuned_table({f"{variant}/37x384/m1": gemv})
    ref = F.linear(x, lowbit.get_format("int4").dequantize(packed))
    torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
def test_lut_launcher_follows_a_measured_path(tuned_table, monkeypatch):
    """The LUT launcher looks up its own key at every M and runs the path of a tuned entry: "gemv"
    and "gemm" the dequant kernels on the same bit planes (handed the whole entry, so they look
    up nothing of their own), "lut" the table-lookup kernel; no entry: the dequant defaults."""
    from lowbit.kernels import lut_gemm

    device = torch.device(DEVICES[0])
    w, x = torch.randn(40, 256, device=device) * 0.02, torch.randn(2, 256, device=device)
    fmt = lowbit.get_format("lut2")
    packed = fmt.quantize(w)
    ref = F.linear(x, fmt.dequantize(packed))
    dequant_configs = []  # the config of every call the launcher makes to the dequant kernels
    real_dequant = lut_gemm.dequant_matmul
    monkeypatch.setattr(lut_gemm, "dequant_matmul",
                        lambda *a, config, **kw: dequant_configs.append(config) or real_dequant(*a, config=config, **kw))
    tuned_table({})
    key = _key_of(x, packed)
    assert key == "lut2-g128-torch.float32/40x256/m4"
    assert [c["path"] for c in dequant_configs] == ["gemv"]  # the default at M=2
    for entry in ({"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
                  {"path": "gemv", "BLOCK_M": 2, "BLOCK_N": 4, "COLUMN_K": 32, "SPLIT_K": 2, "num_warps": 1},
                  {"path": "lut", "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 1}):
        tuned_table({key: entry})
        dequant_configs.clear()
        assert _key_of(x, packed) == key  # the only lookup
        assert dequant_configs == ([] if entry["path"] == "lut" else [entry])
        torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), ref, rtol=1e-5, atol=1e-5)
    tuned_table({key: {"path": "gemv", "BLOCK_M": 2, "BLOCK_N": 4, "COLUMN_K": 16, "SPLIT_K": 2}})
    dequant_configs.clear()
    lowbit.linear(x, packed, backend="triton")  # a column shorter than a plane's word: ignored
    assert dequant_configs[0]["COLUMN_K"] == 32


def test_descent_finds_the_best_point_and_skips_pruned_ones():
    sys.path.insert(0, str(REPO))
    from benchmarks.tune import descend

    cost = {"A": {1: 5.0, 2: 3.0, 4: 4.0}, "B": {1: 2.0, 2: 1.0, 8: 0.5}}

    def measure(cfg):
        if cfg["B"] == 8:  # e.g. a tile that fails the correctness gate
            return None
        return cost["A"][cfg["A"]] + cost["B"][cfg["B"]]

    best, us = descend(measure, {"A": 1, "B": 1}, {"A": (1, 2, 4), "B": (1, 2, 8)})
    assert best == {"A": 2, "B": 2} and us == 4.0
    assert descend(lambda cfg: None, {"A": 1}, {"A": (1, 2)}) == (None, None)
    # a pruned start point still lets the descent find a measurable neighbour
    best, us = descend(lambda cfg: None if cfg["A"] == 1 else float(cfg["A"]), {"A": 1}, {"A": (1, 2, 4)})
    assert best == {"A": 2} and us == 2.0


def test_a_path_far_slower_at_its_start_is_not_descended():
    """search_paths descends the first path, then measures each later path's start point and
    descends it only within ABANDON_RATIO of the best so far; a close path is descended and can win."""
    sys.path.insert(0, str(REPO))
    from benchmarks.tune import ABANDON_RATIO, search_paths

    measured = []

    def measure(cfg):
        measured.append(dict(cfg))
        return {"gemv": 10.0, "lut": 10.0 * ABANDON_RATIO + 1, "gemm": 9.0}[cfg["path"]] / cfg["X"]

    starts = [{"path": "gemv", "X": 1}, {"path": "lut", "X": 1}, {"path": "gemm", "X": 1}]
    space = {"X": (1, 2)}
    best, us, abandoned = search_paths(measure, starts, {"gemv": space, "lut": space, "gemm": space}, rounds=1)
    assert abandoned == ["lut"] and best == {"path": "gemm", "X": 2} and us == 4.5
    assert [c for c in measured if c["path"] == "lut"] == [{"path": "lut", "X": 1}]  # its start only
    # a start that fails to measure is abandoned too; with nothing found first, every path descends
    assert search_paths(lambda cfg: None if cfg["path"] == "gemm" else 1.0, starts[::2],
                        {"gemv": space, "gemm": space}, rounds=1)[2] == ["gemm"]
    assert search_paths(lambda cfg: None if cfg["path"] == "gemv" else 1.0, starts[::2],
                        {"gemv": space, "gemm": space}, rounds=1)[:2] == ({"path": "gemm", "X": 1}, 1.0)


def test_descent_prepares_each_coordinates_candidates_before_measuring_them():
    """The tuner's workers compile a coordinate's candidates before the descent measures them
    (`prepare`), and what they compile is what is then measured (the first better value found
    leaves the coordinate's other candidates unchanged)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.tune import descend

    events = []
    cost = {"A": {1: 5.0, 2: 3.0, 4: 4.0}, "B": {1: 2.0, 2: 1.0, 8: 0.5}}

    def measure(cfg):
        events.append(("measure", dict(cfg)))
        return cost["A"][cfg["A"]] + cost["B"][cfg["B"]]

    best, _ = descend(measure, {"A": 1, "B": 1}, {"A": (1, 2, 4), "B": (1, 2, 8)},
                      prepare=lambda candidates: events.append(("prepare", [dict(c) for c in candidates])))
    assert best == {"A": 2, "B": 8}
    assert events[:4] == [("measure", {"A": 1, "B": 1}), ("prepare", [{"A": 2, "B": 1}, {"A": 4, "B": 1}]),
                          ("measure", {"A": 2, "B": 1}), ("measure", {"A": 4, "B": 1})]
    prepared = []
    for kind, payload in events[1:]:
        if kind == "prepare":
            prepared += payload
        else:
            assert payload in prepared, payload  # every candidate after the start was compiled first


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
def test_tuner_goes_on_without_workers_when_one_dies():
    """A compiling worker process that dies (a launch that takes its process down) costs the
    tuner its workers, with a warning, not the run."""
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks.tune import Precompiler

    precompiler = Precompiler(1, argparse.Namespace(smoke=True, group_size=128, symmetric=False))
    case = ("int4", 8, 64, 1, DEVICES[0], torch.float32)
    try:
        precompiler.compile(case, [None])
        assert (precompiler.compiled, precompiler.failed) == (1, 0)
        for process in list(precompiler.pool._processes.values()):
            process.kill()
        with pytest.warns(UserWarning, match="a compiling worker died"):
            precompiler.compile(case, [None])
        assert precompiler.pool is None
        precompiler.compile(case, [None])  # nothing left to do it: a no-op
        assert precompiler.compiled == 1
    finally:
        precompiler.close()


def test_tuner_tries_the_lookup_kernel_for_lut_formats_up_to_lut_max_m():
    sys.path.insert(0, str(REPO))
    from benchmarks.tune import start_points
    from lowbit.kernels.lut_gemm import LUT_MAX_M

    assert [s["path"] for s in start_points(LUT_MAX_M, False, lut=True)] == ["gemv", "lut", "gemm"]
    assert [s["path"] for s in start_points(LUT_MAX_M + 1, False, lut=True)] == ["gemm"]
    assert [s["path"] for s in start_points(1, False)] == ["gemv", "gemm"]


@pytest.mark.parametrize("m", [1, 16, 64, 256, 4096])
def test_tuner_start_points_lie_in_the_search_space(m):
    """Every start value is one the descent can return to, and the GEMM splits K only up to
    M=256 (beyond, its output tiles fill the GPU)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.tune import space_for, start_points

    space = space_for(m)
    for start in start_points(m, False, lut=True) + start_points(m, False, fused=True):
        for key, values in space[start["path"]].items():
            if key in start:
                assert start[key] in values, (start["path"], key, start[key])
    assert (space["gemm"]["SPLIT_K"] == (1,)) == (m > 256)


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
@pytest.mark.parametrize("keyword, fmt, k, cases", [
    # num_stages: the stage count of the tile loop (STAGES; 1 without one), here over 4 tiles per
    # program (1024 K in columns of 8 over 32 threads), on a GPU through the cp.async pipeline
    ("STAGES", "int4", 1024, [({}, 1), ({"num_stages": 2}, 2), ({"num_stages": 3}, 3)]),
    # maxnreg: passed to the launch as it is (no keyword without one, or for None: no cap)
    ("maxnreg", "int8", 512, [({}, None), ({"maxnreg": None}, None), ({"maxnreg": 128}, 128)]),
    # PREFETCH: the next tile asked of L2 a tile ahead (the interpreter skips the hint itself)
    ("PREFETCH", "int4", 1024, [({}, False), ({"PREFETCH": 0}, False), ({"PREFETCH": 1}, True)]),
])
def test_gemv_launch_options_reach_the_kernel(monkeypatch, keyword, fmt, k, cases):
    """A GEMV config's num_stages, maxnreg and PREFETCH reach its launch, and the kernel so launched gives the
    reference's values (tests/kernels/test_compile_hopper.py checks the code each compiles to)."""
    launches = record_launches(monkeypatch, keyword)
    device = torch.device(DEVICES[0])
    w, x = torch.randn(24, k, device=device) * 0.02, torch.randn(1, k, device=device)
    packed = lowbit.get_format(fmt).quantize(w)
    ref = F.linear(x, lowbit.get_format(fmt).dequantize(packed))
    config = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 8, "COLUMN_K": 8, "SPLIT_K": 1, "num_warps": 1}
    for options, expected in cases:
        with tuning.force({**config, **options}):
            torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), ref, rtol=1e-5, atol=1e-5)
        assert [value for name, value in launches if name == "_gemv_kernel"][-1] == expected


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
def test_dfloat11_fused_gemv_takes_valid_tuned_entries(tuned_table, monkeypatch):
    """dfloat11's fused decode + GEMV looks up its own key (segment, x dtype, shape, M bucket) and
    launches a valid tuned entry's rows per program, chunk, stage, split count, warps and stages, giving
    the reference's values; entries it cannot take are ignored and the defaults launch."""
    from lowbit.kernels import dfloat11

    device = torch.device(DEVICES[0])
    fmt = lowbit.get_format("dfloat11")
    packed = fmt.quantize((torch.randn(40, 300, device=device) * 0.02).bfloat16(), segment=64)  # 5 segments a row
    x = torch.randn(2, 300, device=device)
    ref = F.linear(x, fmt.dequantize(packed).float())
    requested_splits = []
    real_buffers = dfloat11.split_k_buffers
    monkeypatch.setattr(dfloat11, "split_k_buffers",
                        lambda x, n, k_tiles, requested, tiles: requested_splits.append(requested)
                        or real_buffers(x, n, k_tiles, requested, tiles))
    launches = record_launches(monkeypatch, None)

    def launched() -> tuple:
        kwargs = [kw for name, kw in launches if name == "_decode_gemv_kernel"][-1]
        return (kwargs["BLOCK_N"], kwargs["CHUNK"], kwargs["STAGE"], requested_splits[-1], kwargs.get("num_warps"),
                kwargs.get("num_stages"))

    tuned_table({})
    key = _key_of(x, packed)
    assert key == "dfloat11-s64-torch.float32/40x300/m4"
    default = launched()
    assert default[:3] == (dfloat11.GEMV_BLOCK_N, dfloat11.GEMV_CHUNK, dfloat11.GEMV_STAGE) and default[4] == 4
    for entry in ({"path": "fused", "BLOCK_N": 32, "CHUNK": 8, "STAGE": 1, "SPLIT_K": 3, "num_warps": 1},
                  {"path": "fused", "BLOCK_N": 64, "CHUNK": 16, "STAGE": 4, "SPLIT_K": 1, "num_warps": 2,
                   "num_stages": 1}):
        tuned_table({key: entry})
        torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), ref, rtol=1e-5, atol=1e-6)
        assert launched() == (entry["BLOCK_N"], entry["CHUNK"], entry["STAGE"], entry["SPLIT_K"], entry["num_warps"],
                              entry.get("num_stages"))
    valid = {"path": "fused", "BLOCK_N": 32, "CHUNK": 8, "STAGE": 1, "SPLIT_K": 3, "num_warps": 1}
    for change in ({"CHUNK": 4}, {"CHUNK": "8"}, {"STAGE": 2}, {"STAGE": None}, {"BLOCK_N": 48}, {"BLOCK_N": 2048},
                   {"SPLIT_K": 0},
                   {"num_warps": 4},  # 32 lanes on 128 threads
                   {"num_warps": 3}, {"path": "gemv"}):
        tuned_table({key: {**valid, **change}})
        torch.testing.assert_close(lowbit.linear(x, packed, backend="triton"), ref, rtol=1e-5, atol=1e-6)
        assert launched() == default, change


@pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
def test_every_kernel_launch_asks_for_fused_multiply_adds(monkeypatch):
    """Every launch site passes enable_fp_fusion=True (Triton 3.9 warns, when a launch leaves it
    unset, that 3.10 will turn fusion off by default). Records the keyword arguments of each
    launch of the GEMV, GEMM, LUT lookup, dfloat11 decode and fused GEMV, and activation-
    quantization kernels."""
    launches = record_launches(monkeypatch, "enable_fp_fusion")
    device = torch.device(DEVICES[0])
    w = torch.randn(40, 256, device=device) * 0.02
    for fmt, options, rows, config in (
            ("int4", {}, 1, {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 8, "COLUMN_K": 32, "SPLIT_K": 1}),
            ("int4", {}, 3, {"path": "gemm", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
            ("int4", {"act": "int8"}, 32, None),  # W8A8 from M = W8A8_MIN_M: activation quantization
            ("lut2", {}, 1, {"path": "lut", "BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 64, "SPLIT_K": 1}),
            ("dfloat11", {}, 1, None), ("dfloat11", {}, 64, None)):
        packed = lowbit.get_format(fmt).quantize(w.bfloat16() if fmt == "dfloat11" else w, **options)
        x = torch.randn(rows, 256, device=device, dtype=packed.dtype)
        with tuning.force(config):
            lowbit.linear(x, packed, backend="triton")
    kernels = {name for name, _ in launches}
    assert {"_gemv_kernel", "_gemm_kernel", "_act_quant_kernel", "_lut_gemv_kernel", "_decode_gemv_kernel",
            "_decode_kernel"} <= kernels, kernels
    assert all(fusion is True for _, fusion in launches), launches

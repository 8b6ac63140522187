"""Issue 8's speed targets and the check of a benchmark run against them.

GEMM targets: at M=1, the median over the Llama-3-8B shapes of the speedup over bf16 F.linear
measured in the same run; and every lowbit format faster than the fastest competitor kernel
of the same format measured in that run (median over the same shapes). End to end: int4
decode tokens/s at batch 1 over bf16's. Targets are only met by GPU numbers: a run on any
other device reports them as "not a GPU run".
"""
from __future__ import annotations

import statistics

TARGET_SET = "llama3-8b"
TARGET_M = 1
#: format spec -> minimum speedup over bf16 at M=1 (median over the Llama-3-8B shapes); issue 8's,
#: plus mxint8's from the microscaling issue
GEMM_TARGETS = {"int4": 3.0, "int6": 2.2, "int8": 1.7, "fp8": 1.7, "mxfp4": 3.0, "nvfp4": 2.8, "lut2": 4.0,
                "dfloat11": 0.67, "mxint8": 1.7}
#: targets of the format issues that are not "M=1 vs bf16": (check, format, M range, baseline, minimum);
#: baseline None = bf16, else another format's time at the same shape and M
OTHER_TARGETS = [("fp8 W8A8 at M >= 1024 vs bf16", "fp8:act=fp8", (1024, None), None, 1.5),
                 ("lut2 vs int2 at M=1", "lut2", (1, 1), "int2", 1.0)]
E2E_TARGETS = {("int4", 1): 1.9}  # (format, batch) -> decode tokens/s over bf16's


def _verdict(value: float | None, target: float, on_gpu: bool) -> str:
    if value is None:
        return "not measured"
    if not on_gpu:
        return "not a GPU run"
    return "met" if value >= target else "MISSED"


def gemm_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    """One entry per format measured at M=1 on the target set: the median speedup over bf16,
    its target (None if the format has none) and the median lowbit-over-competitor speedup."""
    picked = [r for r in rows if r["M"] == TARGET_M and r["shape"].startswith(TARGET_SET + "/") and "error" not in r]
    out = []
    for fmt in sorted({r["format"] for r in picked}):
        mine = [r for r in picked if r["format"] == fmt]
        speedup = statistics.median(r["speedup"] for r in mine)
        versus = [r["competitor"]["lowbit_speedup"] for r in mine if r.get("competitor")]
        vs_competitor = statistics.median(versus) if versus else None
        target = GEMM_TARGETS.get(fmt)
        out.append({
            "format": fmt, "shapes": len(mine), "median_speedup": speedup, "target": target,
            "verdict": "no target" if target is None else _verdict(speedup, target, on_gpu),
            "competitor": ", ".join(sorted({r["competitor"]["name"] for r in mine if r.get("competitor")})) or None,
            "median_speedup_vs_competitor": vs_competitor,
            "competitor_verdict": None if vs_competitor is None else _verdict(vs_competitor, 1.0, on_gpu),
        })
    return out


def other_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    """The OTHER_TARGETS checks: median over the target set's shapes (and M in range) of the
    baseline's time over the format's."""
    ok = [r for r in rows if r["shape"].startswith(TARGET_SET + "/") and "error" not in r]
    out = []
    for check, fmt, (m_lo, m_hi), baseline, target in OTHER_TARGETS:
        ratios = []
        for r in ok:
            if r["format"] != fmt or r["M"] < m_lo or (m_hi is not None and r["M"] > m_hi):
                continue
            if baseline is None:
                ratios.append(r["speedup"])
            else:
                base = [b for b in ok if b["format"] == baseline and b["shape"] == r["shape"] and b["M"] == r["M"]]
                ratios += [base[0]["us"] / r["us"]] if base else []
        value = statistics.median(ratios) if ratios else None
        out.append({"check": check, "cases": len(ratios), "median_ratio": value, "target": target,
                    "verdict": _verdict(value, target, on_gpu)})
    return out


def e2e_summary(rows: list[dict], on_gpu: bool) -> list[dict]:
    """The E2E_TARGETS checks: a format's decode speedup over bf16 at that batch, compared only
    where both decoded the same way (e.g. both compiled and replayed as CUDA graphs)."""
    out = []
    for (fmt, batch), target in E2E_TARGETS.items():
        found = [r for r in rows if r["format"] == fmt and r["batch"] == batch]
        value = found[0]["decode_speedup"] if found else None
        verdict = _verdict(value, target, on_gpu)
        base = [r for r in rows if r["format"] == "bf16" and r["batch"] == batch]
        if found and base and found[0].get("decode_mode") != base[0].get("decode_mode"):
            verdict = f"not comparable: {fmt} decoded {found[0].get('decode_mode')}, bf16 {base[0].get('decode_mode')}"
        out.append({"format": fmt, "batch": batch, "decode_speedup": value, "target": target, "verdict": verdict})
    return out


def gemm_markdown(summary: list[dict], other: list[dict]) -> list[str]:
    lines = [f"## Targets (M={TARGET_M}, median over {TARGET_SET} shapes)", "",
             "| format | shapes | speedup vs bf16 | target | verdict | fastest competitor | lowbit vs it | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        target = "-" if s["target"] is None else f">= {s['target']}x"
        versus = "-" if s["median_speedup_vs_competitor"] is None else f"{s['median_speedup_vs_competitor']:.2f}x"
        lines.append(f"| {s['format']} | {s['shapes']} | {s['median_speedup']:.2f}x | {target} | {s['verdict']} | "
                     f"{s['competitor'] or '-'} | {versus} | {s['competitor_verdict'] or '-'} |")
    lines += ["", "| other target | cases | median ratio | target | verdict |", "|---|---|---|---|---|"]
    for o in other:
        value = "-" if o["median_ratio"] is None else f"{o['median_ratio']:.2f}x"
        lines.append(f"| {o['check']} | {o['cases']} | {value} | >= {o['target']}x | {o['verdict']} |")
    return lines

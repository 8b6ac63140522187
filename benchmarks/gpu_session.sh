#!/usr/bin/env bash
# One GPU session's measurements in parts that each fit a 10-minute command (30 device-minutes
# in all: fetch the results after each, see README.md, Benchmarks).
#
#   bash benchmarks/gpu_session.sh tests               # ~5.5 min: the `gpu` tests
#   bash benchmarks/gpu_session.sh gemm-m1             # ~4 min: the issue-8 formats at M=1 (the targets)
#   bash benchmarks/gpu_session.sh tune                # kernel tuning, M=1 first (~45 s per case on the H100)
#   bash benchmarks/gpu_session.sh e2e                 # ~4 min on the H100: end to end, bf16 and 7 formats
#   bash benchmarks/gpu_session.sh e2e-compiled        # ~3 min: bf16 and int4 at batch 1, decode step compiled
#   bash benchmarks/gpu_session.sh dfloat11            # the dfloat11 decoder and fused GEMV
#   bash benchmarks/gpu_session.sh gemm-targets        # ~9 min: the formats with issue-8 targets, every M
#                                                      # (the first H100 run reached 86 of its 264 cases)
#   bash benchmarks/gpu_session.sh gemm-rest           # the other formats
#   bash benchmarks/gpu_session.sh e2e-moe             # ~6 min: Mixtral-8x7B width (4 layers), quantized experts, eager
#   bash benchmarks/gpu_session.sh profile             # ~1 min: Nsight Compute on the at-risk GEMVs and the
#                                                      # dfloat11 block decoder, if installed
#   bash benchmarks/gpu_session.sh prefetch            # ~2 min: the GEMV with and without L2 prefetch (PREFETCH_AB)
#   bash benchmarks/gpu_session.sh profile-decode      # Nsight Compute: every kernel's time in one eager
#                                                      # decode step, bf16 and int4 (2 layers)
#
# The second H100 run (2026-11-25) ran `tune tests` (TUNE_ARGS="--m 1 --budget-s 170 ...",
# TUNE_LIMIT=225), `gemm-m1 e2e` (E2E_ARGS="--formats ...", E2E_LIMIT=320), `e2e-compiled dfloat11`
# and `profile`. Next: `gemm-m1` first (the new 8-row GEMV default, untuned formats, fp8's hardware
# E4M3 conversion), `prefetch`
# (the GEMV's L2 prefetch of its next tile, PREFETCH_AB: if it wins, tune with it), `tune` on
# the formats after int4 (TUNE_ARGS="--m 1 --formats nvfp4 mxfp4 int6 int8 fp8 lut2 mxint8 dfloat11"),
# `gemm-m1` again, then the `gpu` tests this run failed and the new ones
# (TESTS_K="ct_import or nf4 or fp8_gemm or prefetch or every_code or scale_decoders or real_shapes"),
# `profile-decode` and the rest. After the dfloat11 kernels' stream stages and 32-weight chunks
# (commits 600c83b, 6130d6a) and shorter default segments for weights with few (bacfe91), none yet
# on a GPU: `profile` (DRAM bytes with the new defaults and the old), `dfloat11` (the decoder at
# every chunk and stage; the fused GEMV at segments 256 / 128 / 64 per shape) and `tune` with
# TUNE_ARGS="--m 1 --formats dfloat11" decide them.
#
# Results go to $OUT (the device tool's return folder) or /tmp/lowbit-gpu: one log per part and
# results.tgz holding benchmarks/results/* and the tuned-config table. Competitor libraries the
# GPU image lacks (torchao, gemlite, dfloat11, dahuffman, bitsandbytes), transformers 5.23 (the image has
# 5.17, older than lowbit's minimum 5.20), peft 0.21.2 (the LoRA test's version) and compressed-tensors 0.20.0
# (the compressed-tensors import's test) come from .whl/ when it is carried
# (benchmarks/fetch_wheels.sh fills it); without them those competitors are recorded as errors
# and `import lowbit` warns about the old transformers (the MoE tests and e2e-moe would fail).
#
# TESTS_K selects tests by pytest -k expression (e.g. TESTS_K="ct_import or nf4"); TUNE_ARGS /
# E2E_ARGS replace the tune / e2e parts' default arguments, TUNE_LIMIT / E2E_LIMIT their
# time limits in seconds (a short session tunes `--m 1 --budget-s 170` and runs e2e on fewer formats).
# Each device call re-sends the checkout, which would drop the table a `tune` part wrote in an
# earlier call: the table is kept in /tmp/lowbit-tuned on the machine after every part and put back
# at the start of the next call on the same machine.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/lowbit-gpu}"
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
tuned_keep=/tmp/lowbit-tuned
if compgen -G "$tuned_keep/*.json" >/dev/null; then
  mkdir -p lowbit/kernels/tuned && cp "$tuned_keep"/*.json lowbit/kernels/tuned/
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, transformers.__file__)' >>"$out/gpu.txt" 2>&1

TARGET_FORMATS="int4 int6 int8 fp8 fp8:act=fp8 mxfp4 nvfp4 lut2 mxint8 int2 dfloat11"
OTHER_FORMATS="int3 int5 int7 fp8_e5m2 fp8:block=128,act=fp8 int8:act=int8,symmetric=true,group_size=-1 int4:act=int8
  int4:act=fp8,symmetric=true int4:permuted=true int6:group_size=16,symmetric=true int4:group_size=32
  mxfp8 mxfp6 lut1 lut3 lut4 nf4 bnb_fp4 iq4_nl dfloat11:segment=64"
# nvfp4, int6 and dfloat11 at M=1 on Llama-3-8B's gate_proj, each twice, dfloat11 again with the
# fused GEMV as it was before stream stages (STAGE 1, the 2026-11-25 default's tiles), then
# dfloat11's block decoder on a whole Llama-3-8B block's seven weights, twice with the defaults
# and twice as before (chunk 8, stage 1): the profile part's 12 launches
PROFILE_KERNELS='
import torch, lowbit
from lowbit.formats.dfloat11 import CODE_BITS
from lowbit.kernels import tuning
from lowbit.kernels.dfloat11 import decode_layers, layer_row
w = (torch.randn(14336, 4096, device="cuda") * 0.02).bfloat16()
x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
for fmt in ("nvfp4", "int6", "dfloat11"):
    packed = lowbit.get_format(fmt).quantize(w)
    for _ in range(2):
        lowbit.linear(x, packed, None)
with tuning.force({"path": "fused", "BLOCK_N": 128, "CHUNK": 16, "STAGE": 1, "SPLIT_K": 16, "num_warps": 4}):
    for _ in range(2):
        lowbit.linear(x, packed, None)
shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
block = [lowbit.get_format("dfloat11").quantize((torch.randn(s, device="cuda") * 0.02).bfloat16()) for s in shapes]
sizes = [n * k for n, k in shapes]
out = torch.empty(sum(sizes), dtype=torch.bfloat16, device="cuda")
rows = [layer_row(p.exponent_code, p.sign_mantissa, p.segment_offsets, p.decode_table, sum(sizes[:i]),
                  p.attrs["segment"], CODE_BITS) for i, p in enumerate(block)]
for chunk, stage in ((None, None), (8, 1)):
    variant = {} if chunk is None else {"chunk": chunk, "stage": stage}
    for _ in range(2):
        decode_layers(rows, out, CODE_BITS, **variant)
torch.cuda.synchronize()
'
# The GEMV's L2 prefetch of its next K tile (a config's PREFETCH, off by default, never yet on a GPU):
# int4 / nvfp4 / int8 at M=1 on the four Llama-3-8B shapes, the defaults against 8 rows per program,
# no K split, 1 / 2 / 4 warps (4 / 2 / 1 tiles per program at K=4096), each without and with it;
# every output checked against the defaults' (the correctness gate's tolerance). ~2 min.
PREFETCH_AB='
import torch, lowbit
from benchmarks.bench_gemm import REL_TOL, relative_error
from benchmarks.shapes import shapes
from benchmarks.timing import time_us
from lowbit.kernels import tuning
dev = torch.device("cuda")
torch.manual_seed(0)
print("| format | shape | warps | PREFETCH | us | default us | vs default |")
print("|---|---|---|---|---|---|---|")
for fmt in ("int4", "nvfp4", "int8"):
    for shape, n, k in shapes(["llama3-8b"]):
        w = (torch.randn(n, k, device=dev) * 0.02).bfloat16()
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        packed = lowbit.get_format(fmt).quantize(w)
        with tuning.force(None):
            ref = lowbit.linear(x, packed, None)
            base = time_us(lambda: lowbit.linear(x, packed, None), dev).us
        for warps in (1, 2, 4):
            for prefetch in (0, 1):
                cfg = {"path": "gemv", "BLOCK_M": 1, "BLOCK_N": 8, "COLUMN_K": 16 if fmt == "nvfp4" else 32,
                       "SPLIT_K": 1, "num_warps": warps, "PREFETCH": prefetch}
                with tuning.force(cfg):
                    err = relative_error(lowbit.linear(x, packed, None), ref)
                    us = time_us(lambda: lowbit.linear(x, packed, None), dev).us
                flag = "" if err <= REL_TOL[torch.bfloat16] else f" (WRONG: rel err {err:.2g})"
                print(f"| {fmt} | {shape} | {warps} | {prefetch} | {us:.1f}{flag} | {base:.1f} | {base / us:.2f}x |",
                      flush=True)
'
# one eager decode step (1 token, no KV cache) of a 2-layer Llama-3-8B-width model in bf16, then
# int4, under the profiler (cudaProfilerStart/Stop around the step alone): every kernel's duration.
# The second H100 run's int4 decode left ~0.6 ms per token (~2.7 us per quantized linear) that its
# GEMV times do not account for; this shows whether the step's other kernels differ from bf16's.
PROFILE_DECODE='
import torch, lowbit
from benchmarks.bench_e2e import build_model
ids = torch.tensor([[1]], device="cuda")
for fmt in ("bf16", "int4"):
    model = build_model("llama3-8b", 2, torch.device("cuda"))
    if fmt != "bf16":
        lowbit.quantize(model, fmt, skip=["lm_head"], progress=False)
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        model(ids, use_cache=False)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    del model
'

run_part() {  # name, time limit (s), command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $* (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start))s" | tee -a "$out/$name.log"
  if compgen -G "lowbit/kernels/tuned/*.json" >/dev/null; then
    mkdir -p "$tuned_keep" && cp lowbit/kernels/tuned/*.json "$tuned_keep/"
  fi
}

for part in "$@"; do
  case "$part" in
    # -v: one line per test as it finishes, so a run cut off by the limit still shows what passed;
    # -n 8: the machine's 16 cores compile the kernels in parallel (one GPU serves every worker)
    # LOWBIT_FAILURE_LOG: each failure's traceback written as it happens (tests/conftest.py)
    tests) LOWBIT_FAILURE_LOG="$out/failures.log" run_part tests 330 python3 -m pytest -v -n 8 --dist loadgroup -m gpu -p no:cacheprovider --durations=15 ${TESTS_K:+-k "$TESTS_K"} tests ;;
    tune) run_part tune "${TUNE_LIMIT:-300}" python3 benchmarks/tune.py ${TUNE_ARGS:---budget-s 240} ;;
    gemm-m1) run_part gemm-m1 240 python3 benchmarks/bench_gemm.py --formats $TARGET_FORMATS --m 1 \
               --out-dir "$out/results" ;;
    gemm-targets) run_part gemm-targets 540 python3 benchmarks/bench_gemm.py --formats $TARGET_FORMATS \
                    --out-dir "$out/results" ;;
    gemm-rest) run_part gemm-rest 540 python3 benchmarks/bench_gemm.py --formats $OTHER_FORMATS \
                 --out-dir "$out/results" ;;
    e2e) run_part e2e "${E2E_LIMIT:-420}" python3 benchmarks/bench_e2e.py ${E2E_ARGS:-} --out-dir "$out/results" ;;
    e2e-compiled) run_part e2e-compiled 420 python3 benchmarks/bench_e2e.py --compile --formats int4 --batch 1 \
                    --out-dir "$out/results" ;;
    e2e-moe) run_part e2e-moe 420 python3 benchmarks/bench_e2e.py --width mixtral-8x7b --layers 4 --no-graphs \
               --formats int4 int8 fp8 nvfp4 --out-dir "$out/results" ;;
    dfloat11) run_part dfloat11 300 python3 benchmarks/bench_dfloat11.py --segments 256 128 64 --m 1 4 16 \
                --out-dir "$out/results" ;;
    profile)  # what limits the GEMVs nearest their targets at M=1 (nvfp4, int6; dfloat11) and dfloat11's block
              # decoder, and the DRAM bytes dfloat11's kernels move with stream stages and without
      if command -v ncu >/dev/null; then
        run_part profile 300 ncu --kernel-name regex:"_decode_gemv_kernel|_gemv_kernel|_decode_kernel" --launch-count 12 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables --section ComputeWorkloadAnalysis \
          --section InstructionStats --section WarpStateStats --section LaunchStats --section Occupancy \
          --metrics dram__bytes_read.sum,dram__bytes_write.sum python3 -c "$PROFILE_KERNELS"
      else
        echo "== profile: ncu is not installed" | tee "$out/profile.log"
      fi ;;
    prefetch) run_part prefetch 240 python3 -c "$PREFETCH_AB" ;;  # see PREFETCH_AB
    profile-decode)  # every kernel of one eager decode step, bf16 then int4 (see PROFILE_DECODE)
      if command -v ncu >/dev/null; then
        run_part profile-decode 240 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \
          python3 -c "$PROFILE_DECODE"
      else
        echo "== profile-decode: ncu is not installed" | tee "$out/profile-decode.log"
      fi ;;
    *) echo "unknown part $part (tests tune gemm-m1 gemm-targets gemm-rest e2e e2e-compiled e2e-moe dfloat11 profile" \
            "prefetch profile-decode)" >&2; exit 2 ;;
  esac
done
cp lowbit/kernels/tuned/*.json "$out/results/" 2>/dev/null
tar czf "$out/results.tgz" -C "$out" results && rm -rf "$out/results"

#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the competitor libraries the GPU image lacks, as wheels for its
# Python 3.12 / x86-64, so a device call can carry them (benchmarks/gpu_session.sh installs them).
# Also transformers: the image's 5.17 is older than lowbit's minimum (5.20; its MoE experts
# interface differs), and 5.23's requirements (huggingface-hub >=1.31, tokenizers 0.23, regex,
# safetensors 0.8) are met by the image's own packages, as its pip list in the device notes shows.
# Also peft 0.21.2: the image has a peft of its own version, and lowbit.lora_config is tested with 0.21
# (the LoRA `gpu` test in tests/integrations/test_peft.py; accelerate, which peft needs, is in the image).
# Also compressed-tensors 0.20.0 with pydantic and loguru, which the image lacks: the compressed-tensors
# import's `gpu` test packs its folders with it.
# gemlite ships only a source archive: it is pure Python, so a wheel is built from it here.
# bitsandbytes (the nf4 competitor) ships one 43 MB wheel with a library per CUDA / ROCm / XPU
# version; it is rewritten here keeping the CPU library and the CUDA 13.0 one (the image's torch is
# cu130), so that everything carried stays well under the device tool's 64 MiB.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl torchao==0.18.0 dfloat11==0.5.0 dahuffman==0.4.2 transformers==5.23.0 peft==0.21.2 \
  compressed-tensors==0.20.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 loguru==0.7.3
python3 -m pip wheel -q --no-deps -w .whl gemlite==0.6.0.post2
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/full bitsandbytes==0.50.2
python3 - <<'PY'
import glob, os, re, zipfile

(full,) = glob.glob(".whl/full/bitsandbytes-*.whl")
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(full) as src, zipfile.ZipFile(f".whl/{os.path.basename(full)}", "w", zipfile.ZIP_DEFLATED) as dst:
    dropped = {n for n in src.namelist() if "/libbitsandbytes_" in n and not keep.search(n)}
    for item in src.infolist():
        if item.filename in dropped:
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the rows of the dropped libraries go too
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if line.split(",")[0] not in dropped).encode()
        dst.writestr(item, data)
PY
rm -rf .whl/full
ls -l .whl

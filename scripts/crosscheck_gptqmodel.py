"""Cross-check lowbit's GPTQ / AWQ import against GPTQModel's own code (not run by CI: GPTQModel
does not install next to torch 2.13, so its sdist is read from a folder).

    pip download --no-deps gptqmodel==7.7.0 -d /tmp/dl && tar xzf /tmp/dl/gptqmodel-7.7.0.tar.gz -C /tmp/dl
    PYTHONPATH=. python scripts/crosscheck_gptqmodel.py /tmp/dl/gptqmodel-7.7.0

GPTQ: GPTQModel's safetensors dequantizer (`utils/model_dequant.convert_gptq_file`) on the test
suite's GPTQ folders (2/3/4/8 bits x groups 32/64/128/-1 x v1/v2 x sym/asym, groups in K order
and in a random activation order), against the oracle weights and lowbit's import. Its v1 reading
adds 1 per field (wrapping), while its writer and its module loader subtract / add a constant per
packed word; the two differ on a v1 zero point of 0, so those cases are counted separately.
AWQ: GPTQModel's runtime packer and `dequantize_gemm` (quantization/awq/utils/packing_utils.py)
against the test suite's packer and lowbit's import. Only the pure-torch modules are loaded; the
package's __init__ files (which import its kernels) are stubbed.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import sys
import tempfile
import types
from pathlib import Path

import torch


def load_gptqmodel_modules(source: Path):
    """(model_dequant, awq packing_utils) modules from an unpacked GPTQModel sdist."""
    root = source / "gptqmodel"
    for package in ("gptqmodel", "gptqmodel.utils", "gptqmodel.quantization", "gptqmodel.quantization.awq",
                    "gptqmodel.quantization.awq.utils"):
        module = types.ModuleType(package)
        module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
        sys.modules[package] = module
    logger = types.ModuleType("gptqmodel.utils.logger")
    logger.setup_logger = lambda *args, **kwargs: logging.getLogger("gptqmodel")
    sys.modules["gptqmodel.utils.logger"] = logger
    torch_utils = types.ModuleType("gptqmodel.utils.torch")
    torch_utils.HAS_NPU = False
    sys.modules["gptqmodel.utils.torch"] = torch_utils
    return (importlib.import_module("gptqmodel.utils.model_dequant"),
            importlib.import_module("gptqmodel.quantization.awq.utils.packing_utils"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="unpacked gptqmodel sdist folder")
    args = parser.parse_args()
    model_dequant, packing = load_gptqmodel_modules(args.sdist)

    import lowbit
    from lowbit.integrations import gptq_awq_import
    from tests.integrations import test_gptq_awq_import as suite

    random_layer = suite._random_layer

    def zero_points_from_one(*args, **kwargs):  # where GPTQModel's two v1 readings agree
        codes, zeros, scales = random_layer(*args, **kwargs)
        return codes, zeros.clamp(min=1), scales

    counts = {}
    cases = itertools.product((random_layer, zero_points_from_one), (2, 3, 4, 8), (32, 64, 128, -1),
                              ("gptq", "gptq_v2"), (False, True), (False, True))
    for make_layer, bits, group_size, checkpoint_format, symmetric, desc_act in cases:
        suite._random_layer = make_layer
        with tempfile.TemporaryDirectory() as tmp:
            folder, oracle = suite._gptq_folder(Path(tmp) / "g", bits, group_size, checkpoint_format, symmetric,
                                                seed=bits * 7 + group_size, desc_act=desc_act)
            config = {"bits": bits, "checkpoint_format": checkpoint_format, "group_size": group_size}
            theirs = model_dequant.convert_gptq_file(folder / "model.safetensors", torch.float16, config, "cpu")
            ours = lowbit.load(folder)
        key = ("zero points from 0" if make_layer is random_layer else "zero points from 1",
               "v1 asymmetric" if checkpoint_format == "gptq" and not symmetric else "v2 or symmetric")
        for name in suite._linears(oracle):
            want = oracle.get_submodule(name).weight
            got = lowbit.get_format(f"int{bits}").dequantize(ours.get_submodule(name).packed)
            total, ok_ours, ok_theirs = counts.get(key, (0, 0, 0))
            counts[key] = (total + 1, ok_ours + torch.equal(got, want),
                           ok_theirs + torch.equal(theirs[f"{name}.weight"], want))
    suite._random_layer = random_layer
    for (zeros, kind), (total, ok_ours, ok_theirs) in sorted(counts.items()):
        print(f"GPTQ, {zeros}, {kind}: {total} layers; lowbit = oracle on {ok_ours}, "
              f"GPTQModel's dequantizer = oracle on {ok_theirs}")

    generator, same_words, same_weights, trials = torch.Generator().manual_seed(5), 0, 0, 20
    for trial in range(trials):
        k, n, group_size = 192, 64 * (1 + trial % 3), 64
        codes = torch.randint(0, 16, (k, n), generator=generator)
        zeros = torch.randint(0, 16, (k // group_size, n), generator=generator)
        scales = (torch.rand(k // group_size, n, generator=generator) * 0.01 + 0.001).half()
        qweight, qzeros = packing.pack_awq(codes, zeros, 4)
        same_words += torch.equal(qweight, suite._awq_pack(codes)) and torch.equal(qzeros, suite._awq_pack(zeros))
        theirs = packing.dequantize_gemm(qweight, qzeros, scales, 4, group_size)  # [K, N]
        packed, _ = gptq_awq_import.awq_layer({"m.qweight": qweight, "m.qzeros": qzeros, "m.scales": scales}, "m",
                                              gptq_awq_import.Scheme("awq", 4, group_size, False), torch.float16)
        same_weights += torch.equal(lowbit.get_format("int4").dequantize(packed), theirs.t().half())
    print(f"AWQ: {trials} layers; GPTQModel's pack_awq words = the suite's packer's on {same_words}, "
          f"its dequantize_gemm = lowbit's import on {same_weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

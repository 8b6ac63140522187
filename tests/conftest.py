"""Shared fixtures. Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors:
TRITON_INTERPRET must be set before lowbit's kernels are defined, so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_cores_between_workers():
    """Under pytest-xdist every worker is a process, and torch starts one intra-op thread per core
    in each: N workers then run N x cores threads that wait on each other (MiniLM forwards ran
    ~10x slower with 2 workers on 2 cores). Give each worker, and the scripts it starts, its share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        torch.set_num_threads(int(threads))
        os.environ["OMP_NUM_THREADS"] = threads


_share_cores_between_workers()

if os.environ.get("TRITON_INTERPRET") == "1":
    from .triton_interpreter import skip_repatching_in_helper_calls

    skip_repatching_in_helper_calls()

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same examples on every run ("ci"), so a change lands or fails on its own merits and
# not on the luck of the draw; `make fuzz` ("explore") draws fresh ones to look for new failures,
# each of which then gets a test of its own.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS_PROFILE", "ci"))


def pytest_runtest_logreport(report):
    """LOWBIT_FAILURE_LOG=<file>: append each failure's traceback to it as the failure happens.
    pytest prints tracebacks only when the whole run ends, so a run a time limit cuts short (the
    first GPU session's `gpu` tests) leaves none; benchmarks/gpu_session.sh sets this."""
    path = os.environ.get("LOWBIT_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


def kernel_devices():
    """Devices the Triton kernels can be tested on in this process."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class LaunchStopped(Exception):
    """Raised by `record_launches(stop=True)` in place of running a kernel."""


def record_launches(monkeypatch, keyword: str | None = None, stop: bool = False) -> list[tuple[str, object]]:
    """From now on, (kernel name, its `keyword` launch argument, or all its keyword arguments for
    None) of every Triton launch, in order; stop: raise LaunchStopped instead of running the
    kernel (a launch checked at full size, where the interpreter would take minutes).
    Compiled launches go through JITFunction.run, interpreted ones through GridExecutor
    (InterpretedFunction.run is an instance attribute before Triton 3.6, so it is not patched)."""
    from triton.runtime.interpreter import GridExecutor
    from triton.runtime.jit import JITFunction

    launches = []
    for cls, method in ((JITFunction, "run"), (GridExecutor, "__call__")):
        real_launch = getattr(cls, method)

        def recording_launch(self, *args, _real_launch=real_launch, **kwargs):
            launches.append((self.fn.__name__, kwargs if keyword is None else kwargs.get(keyword)))
            if stop:
                raise LaunchStopped
            return _real_launch(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, recording_launch)
    return launches
#: torch older than 2.13 (the GPU image has 2.11), for what its inductor does differently on CPU
TORCH_BEFORE_2_13 = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)
#: torch.export of a model's input_ids with a dynamic batch and length. AUTO, not named Dims:
#: torch 2.11 cannot prove a guard of transformers' grouped-query attention (repeat_kv) for a
#: named length, and refuses
DYNAMIC_BATCH_AND_LENGTH = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}, "use_cache": None}


@pytest.fixture
def block_decodes(monkeypatch):
    """The BlockDecompressor of every block decode, in call order; blocks decode with the torch
    reference decoder (these tests are about the hooks: the Triton decoder takes minutes in the
    interpreter for a whole model)."""
    from lowbit.block_decode import BlockDecompressor

    decoded, decode = [], BlockDecompressor.decode
    monkeypatch.setattr(BlockDecompressor, "decode", lambda self: decoded.append(self) or decode(self))
    monkeypatch.setattr("lowbit.block_decode.interpreting", lambda: False)
    return decoded


@pytest.fixture(scope="session")
def minilm_weights():
    """The real all-MiniLM-L6-v2 Linear weights {name: [N, K] float32}."""
    from safetensors.torch import load_file

    from lowbit.default_model import default_model_path

    state = load_file(str(default_model_path() / "model.safetensors"))
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the embedded MiniLM; tests must not modify the model."""
    from lowbit.default_model import load_default_model

    return load_default_model()


def make_tiny_llama(seed: int = 0, dtype=torch.float32):
    """A small random-weight LlamaForCausalLM (built in the test, nothing fetched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()


def nudge_norm_weights(model: torch.nn.Module, fraction: float = 0.2, seed: int = 1) -> torch.nn.Module:
    """`fraction` of every norm weight of a bf16 `model` one bf16 ulp larger in magnitude, in
    place: a change of the size by which two devices' bf16 roundings differ. Returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                bump = (torch.rand(weight.shape, generator=generator) < fraction).to(torch.int16)
                weight.copy_((weight.view(torch.int16) + bump).view(torch.bfloat16))
    return model


def make_tiny_moe(arch: str = "qwen3_moe", dtype=torch.float16):
    """A tiny random-weight Mixtral (experts w1 / w2 / w3 under block_sparse_moe in its checkpoints)
    or Qwen3-MoE (gate_proj / up_proj / down_proj under mlp.experts): 2 layers of 4 experts, top 2,
    hidden 128, for the imports of other libraries' MoE folders."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4, **common)).to(dtype).eval()
    config = Qwen3MoeConfig(intermediate_size=160, moe_intermediate_size=64, num_experts=4, **common)
    return Qwen3MoeForCausalLM(config).to(dtype).eval()


def bf16_llama_dir(path, hidden: int = 128):
    """A Hugging Face folder of a tiny bf16 Llama with tied embeddings, for the imports of other
    libraries' folders: every Linear's K is a multiple of 64 when `hidden` is (intermediate 192)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).bfloat16().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A local Hugging Face folder (config.json + model.safetensors) of a tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    return path

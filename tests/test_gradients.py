"""Gradients through lowbit layers: x and bias get them on every backend (ops.FrozenWeightLinear),
the packed weight is frozen. The expected gradient is autograd's through F.linear(x, W_hat), with
W_hat the format's dequantized weight: exact for weight-only formats, the straight-through estimator
where the format also quantizes x."""
import copy

import pytest
import torch

import lowbit
from lowbit.formats import get_format

from .conftest import make_tiny_llama, requires_gpu
from .test_io import EVERY_FORMAT


def _expected(x, weight, bias, grad_y):
    """(grad_x, grad_bias) of F.linear(x, weight, bias) for the upstream gradient grad_y, by autograd."""
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True)
    torch.nn.functional.linear(x, weight.to(x.dtype), bias).backward(grad_y)
    return x.grad, bias.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_x_and_bias_get_the_gradient_of_the_dequantized_product(fmt, options, backend):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if fmt == "dfloat11" else torch.float32
    fmt_obj = get_format(fmt)
    packed = fmt_obj.quantize((torch.randn(40, 96) * 0.05).to(dtype), **options)
    x = torch.randn(2, 3, 96, dtype=dtype, requires_grad=True)
    bias = torch.randn(40, dtype=dtype, requires_grad=True)
    y = lowbit.linear(x, packed, bias, backend=backend)
    with torch.no_grad():  # recording gradients leaves the forward values as they were
        assert torch.equal(y, lowbit.linear(x, packed, bias, backend=backend))
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    grad_x, grad_bias = _expected(x, fmt_obj.dequantize(packed), bias, grad_y)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(bias.grad, grad_bias)
    assert not any(t.requires_grad for t in packed.tensors.values())


def test_only_what_needs_a_gradient_gets_one():
    packed = get_format("int4").quantize(torch.randn(40, 96))
    x, bias = torch.randn(3, 96), torch.randn(40, requires_grad=True)
    lowbit.linear(x, packed, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((40,), 3.0))
    assert x.grad is None
    with torch.no_grad():
        assert not lowbit.linear(x.requires_grad_(True), packed, bias).requires_grad


def test_quantized_minilm_passes_the_dequantized_models_gradients_to_its_embeddings(minilm):
    """Fine-tuning what stays in full precision (here the word embeddings) on a quantized base:
    every gradient reaches it through the 36 quantized layers as through their dequantized copies."""
    model, tokenizer = minilm
    quantized = lowbit.quantize(copy.deepcopy(model), "int4", progress=False)
    dequantized = lowbit.dequantize(copy.deepcopy(quantized))
    batch = tokenizer(["a quantized base model", "still passes gradients"], return_tensors="pt", padding=True)
    grads = []
    for m in (quantized, dequantized):
        m.embeddings.word_embeddings.weight.requires_grad_(True)
        m(**batch).last_hidden_state.square().mean().backward()
        grads.append(m.embeddings.word_embeddings.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("embeddings_learn", [True, False])
def test_block_decompression_steps_aside_while_gradients_are_recorded(block_decodes, embeddings_learn):
    """The block-decoded weights are views of one buffer that the next block's decode overwrites, so
    autograd must not keep them: a block whose input records gradients skips the decode
    (embeddings_learn), and a layer whose input records them inside a decoded block (after the
    first norm, whose weight learns) runs its own path. An unrecorded call between the forward and
    the backward pass (which decodes every block) then leaves the gradients as the per-layer run's."""
    # segment=64: the reference decoder takes one step per weight of a segment
    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), "dfloat11", segment=64, skip=["lm_head"],
                            progress=False)
    model.model.embed_tokens.weight.requires_grad_(embeddings_learn)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    grads = []
    for blocks in (False, True):
        hooks = lowbit.enable_block_decompression(model, min_tokens=1) if blocks else []
        model.zero_grad()
        loss = model(ids).logits.float().square().mean()
        with torch.no_grad():
            model(ids)
        loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        for hook in hooks:
            hook.remove()
    # recorded: frozen embeddings leave the first block's input unrecorded, so it decodes; then 2 unrecorded
    assert len(block_decodes) == (0 if embeddings_learn else 1) + 2
    assert "model.layers.0.input_layernorm.weight" in grads[0]
    assert ("model.embed_tokens.weight" in grads[0]) == embeddings_learn
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("fmt,options,backend", [
    ("int4", {}, None), ("int4", {}, "triton"), ("fp8", {"act": "fp8"}, None), ("fp8", {"act": "fp8"}, "triton"),
    ("mxfp4", {"rotate": "hadamard"}, None), ("mxfp4", {"rotate": "hadamard"}, "triton"),
    ("dfloat11", {"segment": 64}, None), ("dfloat11", {"segment": 64}, "triton")], ids=lambda v: str(v))
def test_compiled_layer_gradients_without_graph_break(fmt, options, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40).bfloat16(), fmt, **options)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for forward in (torch.compile(lambda v: layer(v, backend=backend), fullgraph=True, backend="aot_eager"),
                    lambda v: layer(v, backend=backend)):
        x.grad = layer.bias.grad = None
        forward(x).float().square().sum().backward()
        grads.append((x.grad, layer.bias.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_gpu_triton_gradients_match_the_reference(fmt, options):
    torch.manual_seed(0)
    packed = get_format(fmt).quantize((torch.randn(1024, 4096, device="cuda") * 0.02).bfloat16(), **options)
    x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    grad_y = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    grads = []
    for backend in ("triton", "torch"):
        x.grad = None
        lowbit.linear(x, packed, backend=backend).backward(grad_y)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])

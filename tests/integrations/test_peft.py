"""LoRA adapters (peft) over lowbit layers: `lowbit.lora_config` registers LoraQuantLinear for
QuantLinear. The reference is the same adapter over the dequantized weights (lowbit.dequantize of a
copy: PEFT's own LoRA layer over nn.Linear), which a lowbit base must match in outputs and in the
adapter's gradients."""
import copy
import sys
import warnings

import pytest
import torch

import lowbit

from ..conftest import make_tiny_llama, requires_gpu

peft = pytest.importorskip("peft", reason="peft: a test dependency (pyproject [test]) and the `lora` extra")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowbit.integrations.peft_lora import LoraQuantLinear  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _with_nonzero_b(model):
    """`model` with every LoRA B drawn at random: a fresh adapter (B = 0) adds nothing, which would
    hide a missing term."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def _peft_llama(fmt="int4", dtype=torch.float32, **options):
    """A tiny quantized Llama (lm_head in full precision) with LoRA adapters whose B is not zero."""
    model = lowbit.quantize(make_tiny_llama(dtype=dtype), fmt, skip=["lm_head"], progress=False, **options)
    with warnings.catch_warnings():  # PEFT's "Unsupported layer type ..., proceed at your own risk" would be wrong
        warnings.filterwarnings("error", message="Unsupported layer type")
        model = get_peft_model(model, lowbit.lora_config(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))
    return _with_nonzero_b(model)


def _loss_and_adapter_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _with_the_dequantized_reference(model, ids):
    """(loss, adapter grads) of `model` (LoRA over lowbit layers) and of a copy whose lowbit layers are
    dequantized (PEFT's own LoRA layer over nn.Linear), after checking both have the same adapters."""
    reference = lowbit.dequantize(copy.deepcopy(model))
    assert not any(isinstance(m, lowbit.QuantLinear) for m in reference.modules())
    for name, parameter in reference.named_parameters():  # the restored nn.Linear weights learn by default
        parameter.requires_grad_("lora_" in name)
    (loss, grads), (reference_loss, reference_grads) = (_loss_and_adapter_grads(m, ids) for m in (model, reference))
    assert sorted(grads) == sorted(reference_grads) and all("lora_" in name for name in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    return loss, grads, reference_loss, reference_grads


def _assert_adapters_learn_as_over_the_dequantized_weights(model, ids, activations_rounded=False):
    loss, grads, reference_loss, reference_grads = _with_the_dequantized_reference(model, ids)
    if activations_rounded:
        # act= formats round x in the forward and pass the straight-through gradient, which the
        # reference does not: the loss differs by that rounding, the gradients agree less closely
        torch.testing.assert_close(grads, reference_grads, rtol=0.1, atol=2e-3)
    else:
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grads, reference_grads, rtol=1e-4, atol=1e-6)
    return grads


@pytest.mark.parametrize("fmt,options", [("int4", {}), ("nf4", {}), ("fp8", {"act": "fp8"}),
                                         ("mxfp4", {}), ("int8", {"act": "int8", "symmetric": True})],
                         ids=lambda v: str(v))
def test_adapters_over_a_quantized_llama_match_them_over_the_dequantized_one(fmt, options):
    model = _peft_llama(fmt, **options)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear) and isinstance(layer.base_layer, lowbit.QuantLinear)
    grads = _assert_adapters_learn_as_over_the_dequantized_weights(model, IDS, activations_rounded="act" in options)
    assert len(grads) == 12  # 3 targets x 2 layers x (A, B)


def test_adapters_on_the_attention_of_a_moe_model_with_quantized_experts():
    from .test_moe import IDS as MOE_IDS, _model

    model = lowbit.quantize(_model("mixtral"), "int4", group_size=32, skip=["lm_head"], progress=False)
    with pytest.raises(ValueError, match="is not supported"):  # PEFT's: the experts' container, not a layer
        get_peft_model(copy.deepcopy(model), lowbit.lora_config(LoraConfig(r=4, target_modules=["down_proj"])))
    model = get_peft_model(model, lowbit.lora_config(LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights="gaussian")))
    _with_nonzero_b(model)
    _assert_adapters_learn_as_over_the_dequantized_weights(model, MOE_IDS)


def test_a_lora_layer_runs_its_base_on_the_triton_backend():
    torch.manual_seed(0)
    base = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40), "int4", group_size=32)
    model = torch.nn.Sequential(base)
    model = peft.inject_adapter_in_model(lowbit.lora_config(LoraConfig(r=4, target_modules=["0"])), model)
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, 0, 0.1)
    x = torch.randn(3, 96, requires_grad=True)
    y = layer(x, backend="triton")
    adapter = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(y, lowbit.linear(x, base.packed, base.bias, backend="torch") + adapter,
                               rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and x.grad is not None


def test_training_moves_the_adapters_and_leaves_the_packed_weights_bit_equal():
    model = _peft_llama()
    packed_before = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss, _ = _loss_and_adapter_grads(model, IDS)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(b, packed_before[n]) for n, b in model.named_buffers())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")  # its new name is not in 5.20
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("fmt", ["int4", "dfloat11"])
def test_activation_checkpointing_gives_the_adapters_the_same_gradients(fmt, use_reentrant):
    """Checkpointing recomputes each decoder layer in the backward pass (the reentrant kind runs the
    first forward under no_grad); dfloat11 runs with block decompression on, whose hooks decode in
    that first pass and must step aside in the recomputation that autograd records."""
    model = _peft_llama(fmt, dtype=torch.bfloat16 if fmt == "dfloat11" else torch.float32)
    model.train()
    loss, grads = _loss_and_adapter_grads(model, IDS)
    if fmt == "dfloat11":
        assert len(lowbit.enable_block_decompression(model)) == 2
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # the reentrant kind needs an input that requires grad, as PEFT's QLoRA recipe sets up
        model.enable_input_require_grads()
    calls = []  # a checkpointed layer runs twice: in the forward pass and again in the backward
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda *_: calls.append(torch.is_grad_enabled()))
    checkpointed_loss, checkpointed_grads = _loss_and_adapter_grads(model, IDS)
    assert calls == [not use_reentrant, True] and len(grads) == 12
    assert torch.equal(checkpointed_loss, loss)
    assert all(torch.equal(checkpointed_grads[name], grad) for name, grad in grads.items())


def test_peft_prepare_model_for_kbit_training_leaves_the_packed_weights_alone():
    """PEFT's QLoRA preparation casts every bf16 / fp16 parameter to fp32 (norms, embeddings, the
    head, QuantLinear biases); lowbit's packed weights are buffers and keep their bits, and the model
    then trains its adapters. (PEFT enables checkpointing there only for the quantizers it knows,
    so the README says to call gradient_checkpointing_enable yourself.)"""
    from peft import prepare_model_for_kbit_training

    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), "int4", skip=["lm_head"], progress=False)
    def packed_buffers():
        return {f"{layer}.{field}": buffer for layer, module in model.named_modules()
                if isinstance(module, lowbit.QuantLinear) for field, buffer in module.named_buffers()}

    before = {name: buffer.clone() for name, buffer in packed_buffers().items()}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    after = packed_buffers()
    assert len(before) == 14 * 3 and sorted(after) == sorted(before)  # 14 layers x (codes, scales, zeros)
    assert all(after[name].dtype == buffer.dtype and torch.equal(after[name], buffer) for name, buffer in before.items())
    model = _with_nonzero_b(get_peft_model(model, lowbit.lora_config(LoraConfig(r=4, target_modules=TARGETS))))
    model.train()
    _, grads = _loss_and_adapter_grads(model, IDS)
    assert len(grads) == 12 and all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())


def test_an_adapter_saved_after_training_loads_onto_the_reloaded_base(tmp_path):
    base = lowbit.quantize(make_tiny_llama(), "int4", skip=["lm_head"], progress=False)
    base.save_pretrained(tmp_path / "base")
    model = _peft_llama()
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits

    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match="is not supported"):  # PEFT's own: the saved config cannot register
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    for load in (LlamaForCausalLM.from_pretrained, lowbit.load):
        config = lowbit.lora_config(LoraConfig.from_pretrained(tmp_path / "adapter"))
        reloaded = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter", config=config)
        with torch.no_grad():
            assert torch.equal(reloaded(IDS).logits, expected)


def _transformers_accepts_installed_peft():
    """transformers' own adapter API (`add_adapter`) needs a peft of at least its MIN_PEFT_VERSION
    (5.24 asks for 0.22, which lowbit's pin below 0.22 excludes and which is not released yet)."""
    from importlib.metadata import version as installed

    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    return Version(installed("peft")) >= Version(transformers_peft.MIN_PEFT_VERSION)


def _trainer_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)


def _train_moves_every_adapter(model, tmp_path):
    from transformers import Trainer

    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 256, (8, 12))]
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert len(adapters) == 6
    Trainer(model=model, args=_trainer_args(tmp_path), train_dataset=data).train()
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)


def test_trainer_takes_a_lowbit_model_with_peft_adapters_and_refuses_one_without(tmp_path):
    from transformers import Trainer

    bare = lowbit.quantize(make_tiny_llama(), "nf4", skip=["lm_head"], progress=False)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=bare, args=_trainer_args(tmp_path), train_dataset=[])
    model = lowbit.quantize(make_tiny_llama(), "nf4", skip=["lm_head"], progress=False)
    model = get_peft_model(model, lowbit.lora_config(LoraConfig(r=4, target_modules=TARGETS)))
    _train_moves_every_adapter(model, tmp_path)


def test_trainer_takes_adapters_added_with_transformers_add_adapter(tmp_path):
    if not _transformers_accepts_installed_peft():
        pytest.skip("this transformers' add_adapter needs a newer peft than the installed one")
    model = lowbit.quantize(make_tiny_llama(), "nf4", skip=["lm_head"], progress=False)
    model.add_adapter(lowbit.lora_config(LoraConfig(r=4, target_modules=TARGETS)))
    _train_moves_every_adapter(model, tmp_path)


def test_merging_needs_the_dequantized_base():
    model = _peft_llama()
    model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
    with pytest.raises(lowbit.LowbitError, match=r"into model.layers.0.self_attn.q_proj \(int4\) would quantize .* "
                                                 r"lowbit.dequantize\(model\) first"):
        model.merge_and_unload()
    merged = lowbit.dequantize(model).merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not merged.is_quantized and not hasattr(merged.config, "quantization_config")
    assert not any(isinstance(m, (lowbit.QuantLinear, LoraQuantLinear)) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])  # PEFT wants True for a Conv1D target; lowbit's base decides
def test_gpt2_conv1d_layers_take_adapters_and_merge_back_into_conv1d(fan_in_fan_out, tmp_path):
    """GPT-2's projections (transformers' Conv1D, weight stored [in, out]) quantize to QuantLinear;
    lowbit.dequantize of the PEFT model gives the Conv1D back, and the merge adds the adapter in
    that layout (c_proj is square: a transposed update would not fail, it would be wrong)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = lowbit.quantize(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).eval(),
                            "int4", group_size=32, progress=False)  # eval: no dropout, so both runs see the same
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(model, lowbit.lora_config(config))
    _with_nonzero_b(model)
    _assert_adapters_learn_as_over_the_dequantized_weights(model, IDS)
    with torch.no_grad():
        unmerged = model(IDS).logits
    merged = lowbit.dequantize(model).merge_and_unload()
    assert isinstance(merged.transformer.h[0].attn.c_proj, Conv1D) and isinstance(merged.transformer.h[0].mlp.c_fc, Conv1D)
    merged.save_pretrained(tmp_path / "merged")
    for candidate in (merged, AutoModelForCausalLM.from_pretrained(tmp_path / "merged")):
        with torch.no_grad():
            torch.testing.assert_close(candidate(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"init_lora_weights": "pissa"}, "on model.layers.0.self_attn.q_proj: init_lora_weights='pissa' starts from "
                                     "the full-precision weight"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"use_dora": True}, r"LoRA on model.layers.0.self_attn.q_proj: DoraLinearVariant .* use plain LoRA"),
])
def test_what_needs_the_full_precision_weight_is_refused(options, match):
    model = lowbit.quantize(make_tiny_llama(), "int4", skip=["lm_head"], progress=False)
    with pytest.raises(lowbit.LowbitError, match=match):
        get_peft_model(model, lowbit.lora_config(LoraConfig(r=4, target_modules=TARGETS, **options)))


def test_lora_config_without_peft_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    monkeypatch.delitem(sys.modules, "lowbit.integrations.peft_lora")
    with pytest.raises(lowbit.LowbitError, match=r"needs peft \(pip install 'lowbit\[lora\]'\)"):
        lowbit.lora_config


def test_lora_config_takes_a_lora_config():
    with pytest.raises(lowbit.LowbitError, match="takes a peft LoraConfig, got dict"):
        lowbit.lora_config({"r": 4})


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fmt,options", [("int4", {}), ("nvfp4", {}), ("fp8", {"act": "fp8"}), ("dfloat11", {})],
                         ids=lambda v: str(v))
def test_gpu_adapters_over_the_triton_kernels_match_them_over_the_dequantized_weights(fmt, options):
    """bf16 on CUDA: the lowbit layers run the Triton kernels forward and backward, the reference
    cuBLAS; both sum in other orders, so agreement is to a share of each gradient's largest entry."""
    model = _peft_llama(fmt, dtype=torch.bfloat16, **options).cuda()
    loss, grads, reference_loss, reference_grads = _with_the_dequantized_reference(model, IDS.cuda())
    share = 0.15 if "act" in options else 0.03
    torch.testing.assert_close(loss, reference_loss, rtol=share, atol=0)
    for name, grad in grads.items():
        error = (grad.float() - reference_grads[name].float()).abs().max()
        assert error <= share * reference_grads[name].float().abs().max(), name

"""MoE layers: transformers' fused 3-D expert weights quantized one QuantLinear per expert
(lowbit/experts.py), against the unquantized model holding the dequantized weights, and through
every save / load path bit for bit."""
import copy
import io
import json
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

import lowbit
from lowbit import experts
from lowbit.errors import CheckpointError, FormatError, InputError

from ..conftest import DYNAMIC_BATCH_AND_LENGTH, requires_gpu

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
#: Mixtral: [E, N, K] gate_up / down; Qwen3-MoE: the same layout, its own expert width
#: (moe_intermediate_size); GPT-OSS: transposed [E, K, N] weights, biases and an interleaved,
#: clamped gate
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_COMMON, moe_intermediate_size=32, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=16),
    "gpt_oss": lambda: transformers.GptOssConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def _model(arch, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=dtype).eval()
    with torch.no_grad():  # transformers initializes GPT-OSS's expert biases to zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("_proj_bias"):
                param.normal_(std=0.5)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _dequantized_reference(original, quantized):
    """`original` with every weight that `quantized` holds packed set to its dequantized value, run
    by transformers' own code (the experts' fused weights included)."""
    reference = copy.deepcopy(original)
    for name, layer in quantized.named_modules():
        if not isinstance(layer, lowbit.QuantLinear):
            continue
        weight = lowbit.get_format(layer.format).dequantize(layer.packed)
        slot = experts.parse_slot(name)
        with torch.no_grad():
            if slot is None:
                reference.get_submodule(name).weight.copy_(weight)
            else:
                module = reference.get_submodule(slot[0])
                module._parameters[slot[1]][slot[2]] = weight.t() if module.is_transposed else weight
    return reference


@pytest.mark.parametrize("arch", CONFIGS)
def test_quantized_experts_compute_what_transformers_computes_with_the_dequantized_weights(arch):
    original = _model(arch)
    quantized = lowbit.quantize(copy.deepcopy(original), "int4", progress=False)
    module = quantized.model.layers[0].mlp.experts
    assert type(module).__name__.startswith("Quantized")
    assert isinstance(module, type(original.model.layers[0].mlp.experts))
    assert set(experts.quantized_weights(module)) == {"gate_up_proj", "down_proj"}
    assert not experts.fused_weight_names(module)  # the full-precision 3-D weights are gone
    reference = _dequantized_reference(original, quantized)
    torch.testing.assert_close(_logits(quantized), _logits(reference), rtol=1e-5, atol=1e-5)
    # and it is a real quantization: the int4 model differs from the original
    assert (_logits(quantized) - _logits(original)).abs().max() > 1e-3
    expected_slots = {experts.slot_name(f"model.layers.{i}.mlp.experts", w, e)
                      for i in range(2) for w in ("gate_up_proj", "down_proj") for e in range(4)}
    assert expected_slots <= {n for n, m in quantized.named_modules() if isinstance(m, lowbit.QuantLinear)}


@pytest.mark.parametrize("arch", CONFIGS)
def test_gradients_pass_through_quantized_experts(arch):
    """Every parameter left in full precision (router, norms, attention biases, embeddings) gets the
    gradient transformers computes with the dequantized weights (tests/test_gradients.py: layers)."""
    original = _model(arch)
    quantized = lowbit.quantize(copy.deepcopy(original), "int4", skip=["*attn*", "lm_head"], progress=False)
    grads = []
    for model in (quantized, _dequantized_reference(original, quantized)):
        model(IDS).logits.square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    router = [name for name in grads[0] if ".mlp." in name and ".experts." not in name]  # gate / router
    assert router and "model.layers.0.mlp.experts.down_proj" not in grads[0]
    trained = {name: grads[1][name] for name in grads[0]}  # the reference also trains its dequantized weights
    torch.testing.assert_close(grads[0], trained, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tokens,routing", [(5, "one expert for all"), (1, "random"), (0, "random"), (40, "random")])
def test_routing_edge_cases_match_transformers(tokens, routing):
    original = _model("gpt_oss")
    quantized = lowbit.quantize(copy.deepcopy(original), "int8", progress=False)
    reference = _dequantized_reference(original, quantized).model.layers[0].mlp.experts
    module = quantized.model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 64, generator=generator)
    if routing == "one expert for all":
        top_k_index = torch.tensor([[3, 1]] * tokens)
    else:
        top_k_index = torch.rand(tokens, 4, generator=generator).argsort(dim=1)[:, :2]  # 2 distinct experts
    top_k_weights = torch.rand(tokens, 2, generator=generator)
    with torch.no_grad():
        out = module(hidden, top_k_index, top_k_weights)
        torch.testing.assert_close(out, reference(hidden, top_k_index, top_k_weights), rtol=1e-5, atol=1e-5)
    assert out.shape == (tokens, 64)
    with pytest.raises(InputError, match="expert index 4 routed to a module of 4 experts"):
        module(torch.randn(1, 64), torch.tensor([[4, 0]]), torch.ones(1, 2))


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("fmt", ["int4", "dfloat11"])
def test_every_save_and_load_path_gives_the_same_logits(arch, fmt, tmp_path):
    dtype = torch.bfloat16 if fmt == "dfloat11" else torch.float32
    _model(arch, dtype).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype).eval()
    lowbit.quantize(model, fmt, progress=False)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "hf")
    lowbit.save(model, tmp_path / "lowbit")
    loaders = {
        "from_pretrained(save_pretrained)": lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
        "lowbit.load(save_pretrained)": lambda: lowbit.load(tmp_path / "hf"),
        "lowbit.load(lowbit.save)": lambda: lowbit.load(tmp_path / "lowbit"),
        "from_pretrained(lowbit.save)": lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit"),
        "quantize while loading": lambda: AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", dtype=dtype, quantization_config=lowbit.HfQuantConfig(fmt)),
    }
    for label, load in loaders.items():
        loaded = load().eval()
        assert experts.quantized_weights(loaded.model.layers[1].mlp.experts), label
        assert torch.equal(_logits(loaded), expected), label


def test_skip_and_override_patterns_name_the_fused_weight(tmp_path):
    original = _model("mixtral")
    quantized = lowbit.quantize(copy.deepcopy(original), "int4", skip="*.experts.down_proj",
                                overrides={"model.layers.1.mlp.experts.*": "int8"}, progress=False)
    first, second = quantized.model.layers[0].mlp.experts, quantized.model.layers[1].mlp.experts
    assert experts.fused_weight_names(first) == ["down_proj"]  # left in full precision
    assert {layer.format for layer in experts.quantized_weights(first)["gate_up_proj"]} == {"int4"}
    assert {layer.format for layer in experts.quantized_weights(second)["gate_up_proj"]} == {"int8"}
    torch.testing.assert_close(_logits(quantized), _logits(_dequantized_reference(original, quantized)),
                               rtol=1e-5, atol=1e-5)
    lowbit.save(quantized, tmp_path / "mixed")
    assert torch.equal(_logits(lowbit.load(tmp_path / "mixed")), _logits(quantized))


def test_a_quantized_fused_weight_reads_as_a_stand_in():
    model = lowbit.quantize(_model("gpt_oss", torch.bfloat16), "int8", progress=False)
    module = model.model.layers[0].mlp.experts
    stand_in = module.gate_up_proj  # GPT-OSS stores it transposed: [E, K, 2 * I]
    assert (tuple(stand_in.shape), stand_in.dtype) == ((4, 64, 256), torch.bfloat16)
    assert getattr(stand_in, "_is_hf_initialized", False)  # transformers' init leaves it alone
    with pytest.raises(InputError, match="stands in for a packed weight"):
        stand_in.sum()
    assert module.gate_up_proj_bias.shape == (4, 256)  # biases stay in the experts module, in full precision


def test_dfloat11_experts_decode_per_block_to_the_original_bits(monkeypatch):
    # the block decoder's reference path (its Triton kernel is tested in tests/kernels, and takes
    # minutes in the interpreter for a whole model)
    monkeypatch.setattr("lowbit.block_decode.interpreting", lambda: False)
    original = _model("mixtral", torch.bfloat16)
    model = lowbit.quantize(copy.deepcopy(original), "dfloat11", progress=False)
    expected = _logits(original)
    assert torch.equal(_logits(model), expected)  # lossless: the experts' own bf16 weights
    hooks = lowbit.enable_block_decompression(model, min_tokens=1)
    assert len(hooks) == 2  # the decoder layers, not each expert's layer
    assert sum(len(hook.layers) for hook in hooks) == 2 * (4 + 2 * 4)  # attention + every expert's layers
    assert torch.equal(_logits(model), expected)


def test_inspect_shows_one_row_per_fused_weight(tmp_path, capsys):
    from lowbit.cli import main

    model = lowbit.quantize(_model("mixtral"), "int4", overrides={"*.down_proj": "int8"}, progress=False)
    model.save_pretrained(tmp_path / "hf")
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("model.")}
    codes, scale_and_zero = 256 * 64 // 2, 256 * 2 * 2  # int4 codes; an fp16 scale and zero per row
    assert rows["model.layers.0.mlp.experts.gate_up_proj"] == ["[4", "experts]", "int4", "4x256x64",
                                                                str(4 * (codes + scale_and_zero)), "4.500"]
    assert rows["model.layers.1.mlp.experts.down_proj"][:4] == ["[4", "experts]", "int8", "4x64x128"]
    assert not any("quantized." in name for name in rows)
    assert "25 quantized layer(s)" in out  # 2 x (4 attention + 2 x 4 experts) + lm_head


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_dequantize_gives_back_the_fused_weights_and_the_experts_class(arch):
    original = _model(arch, torch.bfloat16)
    model = lowbit.dequantize(lowbit.quantize(copy.deepcopy(original), "dfloat11", progress=False))  # lossless
    module = model.model.layers[0].mlp.experts
    assert type(module) is type(original.model.layers[0].mlp.experts) and not experts.quantized_weights(module)
    assert list(model.state_dict()) == list(original.state_dict())  # each weight before its bias again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert torch.equal(_logits(model), _logits(original))


def test_a_quantized_moe_model_deep_copies_and_pickles():
    model = lowbit.quantize(_model("mixtral"), "int4", progress=False)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the quantized experts class is made at run time: it pickles by the class it extends
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(copied.model.layers[0].mlp.experts) is type(model.model.layers[0].mlp.experts)
        assert torch.equal(_logits(copied), _logits(model))


#: int4 gate-up and W8A8 int8 down projections: two formats, one quantizing activations inside the op
_MIXED = lowbit.QuantConfig("int4", overrides={"*.experts.down_proj": {"format": "int8", "act": "int8"}},
                            skip=["lm_head"])


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_quantized_experts_compile_with_fullgraph_and_export_to_the_eager_logits(arch, tmp_path):
    """Each quantized fused weight is one `lowbit::grouped_linear` node, which reads the experts'
    row counts on the host inside itself: torch.compile(fullgraph=True) and torch.export (dynamic
    batch and length, .pt2 saved and loaded) give eager's logits bit for bit."""
    torch._dynamo.reset()
    model = lowbit.quantize(_model(arch), _MIXED, progress=False)
    program = torch.export.export(model, (), kwargs={"input_ids": IDS, "use_cache": False},
                                  dynamic_shapes=DYNAMIC_BATCH_AND_LENGTH)
    grouped = [node for node in program.graph.nodes if node.target is torch.ops.lowbit.grouped_linear.default]
    assert len(grouped) == 4  # 2 layers x (gate-up, down)
    torch.export.save(program, tmp_path / "model.pt2")
    other = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))  # another batch and length
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(IDS).logits, _logits(model))
        exported = torch.export.load(tmp_path / "model.pt2").module()(input_ids=other, use_cache=False).logits
        assert torch.equal(exported, model(other).logits)


def test_gradients_through_compiled_quantized_experts_are_eagers():
    """The op's backward (`lowbit::grouped_linear_input_grad`, each group times its expert's
    dequantized weight) gives every trainable parameter eager's gradient, bit for bit."""
    torch._dynamo.reset()
    model = lowbit.quantize(_model("gpt_oss"), _MIXED, progress=False)
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        run(IDS).logits.square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert any(".mlp.router." in name for name in grads[0])  # upstream of the experts
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_the_grouped_linear_op_passes_opcheck_and_matches_each_experts_layer():
    """Rows grouped by expert (one expert without rows) through each expert's own layer; torch's
    opcheck covers the schema, the fake implementation and the registered backward."""
    from lowbit.expert_ops import grouped_linear, op_arguments

    torch.manual_seed(0)
    layers = [lowbit.QuantLinear.from_linear(nn.Linear(64, 24, bias=False), fmt, **options)
              for fmt, options in [("int4", {}), ("lut2", {}), ("mxfp4", {}), ("int8", {"act": "int8"}), ("int3", {})]]
    counts = torch.tensor([3, 0, 2, 1, 3])

    def each_experts_layer(x):
        return torch.cat([layers[0](x[:3]), layers[2](x[3:5]), layers[3](x[5:6]), layers[4](x[6:])])

    x = torch.randn(9, 64, requires_grad=True)
    y = grouped_linear(x, counts, layers)
    assert torch.equal(y, each_experts_layer(x))
    y.backward(torch.ones_like(y))
    x_ = x.detach().requires_grad_()
    each_experts_layer(x_).backward(torch.ones_like(y))
    assert torch.equal(x.grad, x_.grad)
    torch.library.opcheck(torch.ops.lowbit.grouped_linear.default, (x, counts, *op_arguments(layers), 24))


def test_export_of_full_precision_experts_beside_quantized_ones_is_refused():
    """A fused weight left in full precision runs one expert at a time, reading the routing on the
    host: torch.export gets a LowbitError naming it instead of a data-dependent-shape error from
    deep inside torch (torch.compile breaks the graph there and gives the eager logits)."""
    torch._dynamo.reset()
    model = lowbit.quantize(_model("mixtral"), "int4", skip=["lm_head", "*.experts.down_proj"], progress=False)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="eager")(IDS).logits, _logits(model))
    with pytest.raises(lowbit.LowbitError, match=r"MixtralExperts.*torch.export cannot trace .*\(down_proj\)"):
        torch.export.export(model, (IDS,), kwargs={"use_cache": False})


def test_a_checkpoint_missing_an_expert_is_refused(tmp_path):
    model = lowbit.quantize(_model("mixtral"), "int4", progress=False)
    lowbit.save(model, tmp_path / "lowbit")
    model.save_pretrained(tmp_path / "hf")
    dropped = "model.layers.0.mlp.experts.quantized.down_proj.2"
    manifest_path = tmp_path / "lowbit" / "lowbit.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["layers"][dropped]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.down_proj has 4 experts, layers "
                                              r"declares experts \[0, 1, 3\]"):
        lowbit.load(tmp_path / "lowbit")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    del config["quantization_config"]["layers"][dropped]
    config_path.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"down_proj has 4 experts, quantization_config\.layers declares experts "
                                          r"\[0, 1, 3\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_an_expert_count_damaged_into_the_billions_is_refused_without_listing_the_experts(tmp_path):
    """A damage run found it: lowbit.load of such a folder built a list of 2^32 expert indices
    (MemoryError, or the machine out of memory) before comparing it with the layers."""
    model = lowbit.quantize(_model("mixtral"), "int8", progress=False)
    lowbit.save(model, tmp_path / "lowbit")
    model.save_pretrained(tmp_path / "hf")
    for path in [*(tmp_path / "lowbit").glob("*.json"), tmp_path / "hf" / "config.json"]:
        text = path.read_text()
        path.write_text(text.replace('"num_local_experts": 4', f'"num_local_experts": {2**32 - 1}'))
    declared = r"(gate_up|down)_proj has 4294967295 experts, (quantization_config\.)?layers declares experts \[0, 1, 2, 3\]"
    with pytest.raises(CheckpointError, match=r"lowbit\.json: .*" + declared):
        lowbit.load(tmp_path / "lowbit")
    with pytest.raises(FormatError, match=declared):
        lowbit.load(tmp_path / "hf")


@pytest.mark.parametrize("edit,match", [
    (lambda layers, slot: layers.__setitem__(slot + "7", layers[slot + "0"]), r"declares experts \[0, 1, 2, 3, 7\]"),
    (lambda layers, slot: layers.__setitem__(slot + "01", layers.pop(slot + "1")), r"down_proj\.01: no such module"),
    (lambda layers, slot: layers.__setitem__(slot + "2", {**layers[slot + "2"], "bias": True}), "bias-less"),
    (lambda layers, slot: layers.__setitem__(slot.replace("down", "up") + "0", layers[slot + "0"]),
     "no fused expert weight 'up_proj'"),
])
def test_malformed_expert_entries_are_refused(tmp_path, edit, match):
    lowbit.save(lowbit.quantize(_model("gpt_oss"), "int4", progress=False), tmp_path / "q")
    manifest_path = tmp_path / "q" / "lowbit.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest["layers"], "model.layers.0.mlp.experts.quantized.down_proj.")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load(tmp_path / "q")


def test_expert_weights_without_the_transformers_interface_stay_and_warn():
    class HandRolledExperts(nn.Module):  # 3-D expert weights, but none of transformers' experts flags
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16))
            self.proj = nn.Linear(16, 16)

    model = HandRolledExperts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.quantize(model, "int4", progress=False)
    assert any("3-D expert weights without transformers' experts interface" in str(w.message) for w in caught)
    assert isinstance(model.gate_up_proj, nn.Parameter) and isinstance(model.proj, lowbit.QuantLinear)


# --- method="gptq": one Hessian per expert, from the tokens routed to it -------------------------

def _experts_inputs(model, ids):
    """(experts module of layer 0, its (hidden_states [T, H], top_k_index [T, k], top_k_weights) on `ids`)."""
    module = model.model.layers[0].mlp.experts
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return module, seen[0]


@pytest.mark.parametrize("arch", CONFIGS)
def test_expert_hessians_come_from_the_tokens_routed_to_each_expert(arch):
    """Written out here with transformers' own gate: gate_up_proj's Hessian is X_e^T X_e / n_e over
    the rows routed to expert e; down_proj's is that of the gated activations of those rows."""
    from lowbit.calibration import collect_hessians

    model = _model(arch)
    module, (hidden, top_k_index, _) = _experts_inputs(model, IDS)
    name = "model.layers.0.mlp.experts"
    hessians = collect_hessians(model, {f"{name}.gate_up_proj": module, f"{name}.down_proj": module}, [IDS], False)
    for expert in range(module.num_experts):
        x = hidden[(top_k_index == expert).any(dim=-1)]
        weight = module.gate_up_proj[expert]
        up = x @ (weight if module.is_transposed else weight.t())
        if module.has_bias:
            up = up + module.gate_up_proj_bias[expert]
        h = module._apply_gate(up)
        assert len(x) > 0
        torch.testing.assert_close(hessians[f"{name}.gate_up_proj"][expert], x.t() @ x / len(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hessians[f"{name}.down_proj"][expert], h.t() @ h / len(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", CONFIGS)
def test_gptq_lowers_the_experts_output_error(arch):
    """On the calibration tokens, the experts module quantized with GPTQ is closer to the original
    than with mse (the ranges GPTQ starts from for int formats)."""
    original = _model(arch)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    module, inputs = _experts_inputs(original, ids)
    with torch.no_grad():
        reference = module(*inputs)
    errors = {}
    for method in ("mse", "gptq"):
        extra = {"calibration": [ids]} if method == "gptq" else {}
        quantized = lowbit.quantize(copy.deepcopy(original), "int4", group_size=32, method=method, progress=False,
                                    **extra)
        with torch.no_grad():
            errors[method] = float((quantized.model.layers[0].mlp.experts(*inputs) - reference).norm())
    assert errors["gptq"] < 0.8 * errors["mse"], errors


def test_gptq_passes_follow_the_model_order_experts_included(monkeypatch):
    """One Hessian per pass: each layer's pass runs after every layer before it in the model is
    quantized, a fused expert weight in its experts module's place (not after all Linears)."""
    from lowbit import calibration

    model = _model("mixtral")
    passes = []
    real_collect = calibration.collect_hessians

    def collect(model_, layers, batches, progress):
        passes.extend(layers)
        return real_collect(model_, layers, batches, progress)

    monkeypatch.setattr("lowbit.api.collect_hessians", collect)
    monkeypatch.setattr("lowbit.api.hessian_chunks", lambda layers: calibration.hessian_chunks(layers, budget=1))
    lowbit.quantize(model, "int4", group_size=32, method="gptq", calibration=[IDS], skip=["lm_head", "*.gate"],
                    progress=False)
    block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert passes == [f"model.layers.{layer}.{name}" for layer in range(2) for name in block]


def test_experts_no_calibration_token_reached_get_plain_rounding_and_a_warning():
    """One token reaches 2 of each layer's 4 experts: the other two are quantized as with no error
    feedback (for int4: mse's ranges and rounding), with a warning naming the weight."""
    original = _model("mixtral")
    ids = torch.tensor([[5]])
    _, (_, top_k_index, _) = _experts_inputs(original, ids)
    unreached = sorted(set(range(4)) - set(top_k_index.reshape(-1).tolist()))
    assert len(unreached) == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = lowbit.quantize(copy.deepcopy(original), "int4", group_size=32, method="gptq", calibration=[ids],
                                    progress=False)
    assert "model.layers.0.mlp.experts.gate_up_proj: 2 of 4 experts received no calibration token" in "\n".join(
        str(warning.message) for warning in caught)
    fmt = lowbit.get_format("int4")
    layers = experts.quantized_weights(quantized.model.layers[0].mlp.experts)["gate_up_proj"]
    for expert in range(4):
        weight = experts.expert_weight(original.model.layers[0].mlp.experts, "gate_up_proj", expert)
        plain = fmt.quantize(weight.detach(), group_size=32, method="mse").qweight
        assert torch.equal(layers[expert].qweight, plain) == (expert in unreached), expert


def _fixed_routing():
    """An experts module's inputs on the CPU, bf16: hidden states [24, 64], 2 distinct experts of 4
    per token and their weights."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 64, generator=generator).bfloat16()
    top_k_index = torch.rand(24, 4, generator=generator).argsort(dim=1)[:, :2]
    return hidden, top_k_index, torch.rand(24, 2, generator=generator).bfloat16()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_gpu_quantized_experts_match_the_cpu_result(arch):
    """The experts module alone, with the routing fixed (a whole model's routing may flip on
    rounding differences between the CPU reference and the GPU kernels)."""
    model = lowbit.quantize(_model(arch, torch.bfloat16), "int4", progress=False)
    module = model.model.layers[0].mlp.experts
    hidden, top_k_index, top_k_weights = _fixed_routing()
    with torch.no_grad():
        expected = module(hidden, top_k_index, top_k_weights).float()
        on_gpu = module.cuda()(hidden.cuda(), top_k_index.cuda(), top_k_weights.cuda()).float().cpu()
    assert (on_gpu - expected).norm() / expected.norm() < 1e-2


@requires_gpu
@pytest.mark.gpu
def test_gpu_compiled_quantized_experts_match_eager():
    """On CUDA the op's groups run lowbit's Triton kernels and inductor compiles the routing, gate
    and sums around them (the experts module alone, with the routing fixed, as above)."""
    torch._dynamo.reset()
    module = lowbit.quantize(_model("gpt_oss", torch.bfloat16), _MIXED, progress=False).model.layers[0].mlp.experts
    module = module.cuda()
    hidden, top_k_index, top_k_weights = (t.cuda() for t in _fixed_routing())
    with torch.no_grad():
        expected = module(hidden, top_k_index, top_k_weights).float()
        compiled = torch.compile(module, fullgraph=True)(hidden, top_k_index, top_k_weights).float()
    assert (compiled - expected).norm() / expected.norm() < 1e-2


@requires_gpu
@pytest.mark.gpu
def test_gpu_gptq_experts_on_cuda_match_the_cpu():
    """Routing, per-expert Hessians and GPTQ on the GPU give nearly the CPU's codes."""
    from ..test_api import check_quantizing_on_device_matches_the_cpu

    check_quantizing_on_device_matches_the_cpu("cuda", "int4", {"group_size": 32}, calibrate=True, agreement=0.97,
                                               make_model=lambda: _model("mixtral", torch.bfloat16))

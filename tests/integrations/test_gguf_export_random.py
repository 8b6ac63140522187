"""GGUF export of randomly drawn small models (lowbit/integrations/gguf_export.py): every
architecture the export writes, head counts, grouped-query ratios, head widths, tied embeddings,
dtypes and exportable formats. Each file must read back, by lowbit's GGUF import, with the model's
logits (exactly in bfloat16), and by transformers' GGUF reader too where it reads the architecture
(the dense ones, float32; it keeps Qwen3's head_dim at 128). A run of 100 such draws outside the
suite found Qwen3's head_dim unread (test_gguf_export.py::test_a_qwen3_whose_heads_are_not_128_wide_reads_back)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.integrations.gguf_export import export_gguf
from lowbit.integrations.gguf_import import load_gguf

from .test_gguf_export import IDS, _phi3_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "phi3": "Phi3Config", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
           "qwen3_moe": "Qwen3MoeConfig"}
#: the formats whose GGML types every drawn width (multiples of 64) holds
FORMATS = [("int4", {"symmetric": True, "group_size": 32}), ("int5", {"symmetric": True, "group_size": 32}),
           ("int8", {"symmetric": True, "group_size": 32}), ("iq4_nl", {}), ("mxfp4", {})]


@st.composite
def _models(draw):
    """(model type, config keyword arguments, format, its options, dtype)."""
    model_type = draw(st.sampled_from(sorted(CONFIGS)))
    heads = draw(st.sampled_from([2, 4, 8]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
    head_dim = draw(st.sampled_from([32, 64, 128] if model_type in ("qwen3", "qwen3_moe") else [32, 64]))
    config = dict(num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=draw(st.sampled_from([256, 512])), max_position_embeddings=128,
                  tie_word_embeddings=draw(st.booleans()), hidden_size=heads * head_dim)
    if model_type in ("qwen3", "qwen3_moe"):  # head_dim free of hidden_size
        config.update(head_dim=head_dim, hidden_size=draw(st.sampled_from([128, 256])))
    if model_type == "mistral":
        config["sliding_window"] = None
    if model_type == "phi3":
        config.update(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        config.update(num_experts=4, num_experts_per_tok=2, norm_topk_prob=model_type == "qwen3_moe")
    if model_type == "mixtral":
        config.update(num_local_experts=4, num_experts_per_tok=2)
    fmt, options = draw(st.sampled_from(FORMATS))
    return model_type, config, fmt, options, draw(st.sampled_from([torch.float32, torch.bfloat16]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_models())
def test_random_models_export_and_read_back(tmp_path_factory, drawn):
    model_type, config, fmt, options, dtype = drawn
    tokenizer = _phi3_tokenizer()  # its pad token serves every architecture
    torch.manual_seed(0)
    config_class = getattr(transformers, CONFIGS[model_type])
    model = transformers.AutoModelForCausalLM.from_config(config_class(vocab_size=len(tokenizer) + 4, **config),
                                                          dtype=dtype).eval()
    lowbit.quantize(model, fmt, progress=False, skip=["lm_head"], **options)
    folder = tmp_path_factory.mktemp("gguf")
    export_gguf(model, folder / "model.gguf", tokenizer)
    with torch.no_grad():
        want = model(IDS).logits.float()
        got = load_gguf(folder / "model.gguf", dtype=dtype)(IDS).logits.float()
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= (1e-5 * scale if dtype == torch.float32 else 0), drawn
    dense = model_type in ("llama", "mistral", "qwen2", "phi3") or model_type == "qwen3" and config["head_dim"] == 128
    if dense and dtype == torch.float32:
        oracle = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
        with torch.no_grad():
            assert float((oracle(IDS).logits - want).abs().max()) <= 1e-5 * scale, drawn

"""DFloat11 Triton kernels against the torch reference decoder: the bf16 decoder (single
layers and whole blocks in one launch) bit for bit, the fused decode + GEMV against F.linear
in fp32. Interpreter on CPU; `gpu` tests add real shapes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.block_decode import BlockDecompressor, enable_block_decompression
from lowbit.errors import InputError
from lowbit.formats.dfloat11 import CODE_BITS, STREAM_BLOCK_WORDS, join_bf16
from lowbit.kernels import dfloat11 as dfloat11_kernels
from lowbit.kernels.dfloat11 import FUSED_MAX_M, decode_weight
from lowbit.packed import PackedWeight

from ..conftest import kernel_devices, make_tiny_llama, requires_gpu

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot run here (no CUDA, no interpreter)")
FMT = lowbit.get_format("dfloat11")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _bits(t):
    return t.view(torch.int16).cpu()


def _decode(p):
    return decode_weight(p.exponent_code, p.sign_mantissa, p.segment_offsets, p.decode_table,
                         segment=p.attrs["segment"], code_bits=CODE_BITS)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_restores_every_bf16_pattern(device):
    w = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(128, 512)
    p = FMT.quantize(w, segment=512).to(device)
    assert torch.equal(_bits(_decode(p)), _bits(w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,segment", [((37, 300), 64), ((5, 1000), 256), ((64, 65), 128), ((1, 7), 64),
                                           ((20, 208), 64), ((130, 256), 128)])  # K % 8 == 0: vector stores
def test_decoder_matches_reference(device, shape, segment):
    gen = torch.Generator().manual_seed(shape[1])
    w = (torch.randn(shape, generator=gen) * torch.logspace(-4, 2, shape[1])).bfloat16()
    w.view(-1)[:: 97] = float("nan")
    p = FMT.quantize(w, segment=segment)
    assert torch.equal(_bits(_decode(p.to(device))), _bits(FMT.dequantize(p)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", dfloat11_kernels.DECODE_CHUNKS)
@pytest.mark.parametrize("stage", dfloat11_kernels.STAGES)
def test_decoder_every_chunk_and_stage_matches_reference(device, chunk, stage):
    """Each chunk length (sign bytes per vector load) and stage (stream words per load) the
    decoder takes, aligned (K a multiple of the chunk) and not, on runs of longest codes (a
    lane's refills as close together as its schedule allows, so it crosses stages fastest)."""
    for w, segment in ((_runs_of_longest_codes(8, 512), 128), (_runs_of_longest_codes(5, 300), 64)):
        p = FMT.quantize(w, segment=segment).to(device)
        out = decode_weight(p.exponent_code, p.sign_mantissa, p.segment_offsets, p.decode_table, segment=segment,
                            code_bits=CODE_BITS, chunk=chunk, stage=stage)
        assert torch.equal(_bits(out), _bits(w))


def _one_padding_word(p):
    """The packed weight with its stream cut to the layout written before streams were padded
    to whole blocks of STREAM_BLOCK_WORDS: the codes, then one zero word."""
    words = p.exponent_code
    last = int(torch.nonzero(words).max())
    return PackedWeight("dfloat11", p.shape, p.dtype, {**p.attrs, "code_words": last + 2},
                        {**p.tensors, "exponent_code": words[:last + 2].clone()})


@pytest.mark.parametrize("device", DEVICES)
def test_streams_with_one_padding_word_still_decode(device):
    """Files written before the block padding hold one zero word after the codes: their stream
    length is no multiple of a stage, so each stage's bounds check works word by word (and the
    decoder takes its unaligned path). Both kernels give the same values as from the padded stream."""
    w = (torch.randn(24, 320, generator=torch.Generator().manual_seed(3)) * 0.05).bfloat16()
    padded = FMT.quantize(w, segment=64)
    old = _one_padding_word(padded)
    assert old.attrs["code_words"] % STREAM_BLOCK_WORDS
    assert old.attrs["code_words"] < padded.attrs["code_words"]
    FMT.check_data(old)
    for stage in dfloat11_kernels.STAGES:
        out = decode_weight(old.exponent_code.to(device), old.sign_mantissa.to(device), old.segment_offsets.to(device),
                            old.decode_table.to(device), segment=64, code_bits=CODE_BITS, stage=stage)
        assert torch.equal(_bits(out), _bits(w))
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(4))
    assert torch.equal(lowbit.linear(x.to(device), old.to(device), None, backend="triton").cpu(),
                       lowbit.linear(x.to(device), padded.to(device), None, backend="triton").cpu())


def _runs_of_longest_codes(n: int, k: int) -> torch.Tensor:
    """bf16 [n, k] whose exponents have halving frequencies (120: 1/2, 121: 1/4, 119: 1/8, ...),
    so the rarest get codes of the length limit, CODE_BITS. Those are placed in three runs, at
    different bit alignments of the stream: a lane then decodes dozens of longest codes in a
    row, down to the fewest buffered bits its refill schedule allows."""
    gen = torch.Generator().manual_seed(k)
    symbols = torch.tensor([120, 121, 119, 122, 118, 123, 117, 124, 116, 125, 115, 126, 114])
    counts = [n * k >> (i + 1) for i in range(len(symbols))]
    counts[0] += n * k - sum(counts)
    rare = (torch.arange(len(symbols)) >= 9).repeat_interleave(torch.tensor(counts))
    exponent = symbols.repeat_interleave(torch.tensor(counts))
    common = exponent[~rare][torch.randperm(int((~rare).sum()), generator=gen)]
    runs = exponent[rare].tensor_split(3)
    cuts = sorted(torch.randint(0, common.numel(), (3,), generator=gen).tolist())
    pieces = [common[:cuts[0]], runs[0], common[cuts[0]:cuts[1]], runs[1], common[cuts[1]:cuts[2]], runs[2],
              common[cuts[2]:]]
    sign_mantissa = torch.randint(0, 256, (n * k,), generator=gen, dtype=torch.uint8)
    return join_bf16(torch.cat(pieces), sign_mantissa).reshape(n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_of_longest_codes_decode_exactly(device):
    w = _runs_of_longest_codes(16, 2048)
    p = FMT.quantize(w, segment=256)
    lengths = torch.zeros(256, dtype=torch.int32)
    for entry in p.decode_table.to(torch.int32).tolist():
        lengths[entry & 0xFF] = entry >> 8
    stream_lengths = lengths[(w.view(torch.int16).to(torch.int32) >> 7) & 0xFF].flatten()
    longest_run = max(len(run) for run in "".join("x" if l == CODE_BITS else " " for l in stream_lengths.tolist()).split())
    assert longest_run >= 15  # the premise: runs of longest codes (the generator makes three of 20)
    assert torch.equal(_bits(_decode(p.to(device))), _bits(w))
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1))
    y = lowbit.linear(x.to(device), p.to(device), None, backend="triton")
    ref = F.linear(x, w.float())
    assert (y.cpu() - ref).abs().max().item() <= TOL[torch.float32] * ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (3, torch.float32), (FUSED_MAX_M, torch.float16)])
@pytest.mark.parametrize("n,k,segment,lanes_per_sm", [
    (37, 300, 64, None),   # N odd; the last segment ends in a partial chunk (300 = 4*64 + 2*16 + 12)
    (200, 256, 128, None),  # two row tiles, the second partly past N; whole chunks only
    (37, 300, 64, 64),      # a lane budget so small that every program walks all 5 segments (no split)
    (200, 256, 64, 512),    # 2 segments per program, 2 splits
])
def test_fused_gemv_equals_f_linear(device, m, dtype, n, k, segment, lanes_per_sm, monkeypatch):
    if lanes_per_sm is not None:
        monkeypatch.setattr(dfloat11_kernels, "RESIDENT_LANES_PER_SM", lanes_per_sm)
    gen = torch.Generator().manual_seed(m)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    p = FMT.quantize(w, segment=segment)
    ref = F.linear(x.to(dtype).float(), w.float(), b.to(dtype).float())
    y = lowbit.linear(x.to(device, dtype), p.to(device), b.to(device, dtype), backend="triton")
    assert y.dtype == dtype and y.shape == (m, n)
    assert (y.float().cpu() - ref).abs().max().item() <= TOL[dtype] * ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_large_m_decodes_then_runs_bf16_linear_exactly(device):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(33, 130, generator=gen) * 0.05).bfloat16()
    x = torch.randn(17, 130, generator=gen).bfloat16()
    p = FMT.quantize(w, segment=64)
    y = lowbit.linear(x.to(device), p.to(device), None, backend="triton")
    assert torch.equal(y.cpu(), F.linear(x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_launches_nothing(device):
    """The fused GEMV reads x's rows clamped to M - 1, so M = 0 must not reach it."""
    p = FMT.quantize(torch.randn(33, 130).bfloat16(), segment=64).to(device)
    y = lowbit.linear(torch.empty(0, 130, dtype=torch.bfloat16, device=device), p, None, backend="triton")
    assert y.shape == (0, 33) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_a_table_of_another_code_width_is_refused(device):
    """The kernels index decode_table by code_bits stream bits: a mismatch would read past it."""
    p = FMT.quantize(torch.randn(33, 130).bfloat16(), segment=64).to(device)
    x = torch.randn(1, 130, device=device)
    with pytest.raises(InputError, match=rf"decode_table must have 2\^code_bits = {2**(CODE_BITS + 2)} entries"):
        dfloat11_kernels.dfloat11_matmul(x, p.exponent_code, p.sign_mantissa, p.segment_offsets, p.decode_table,
                                         None, segment=64, code_bits=CODE_BITS + 2)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    p = FMT.quantize((torch.randn(40, 70) * 0.1).bfloat16(), segment=64).to(device)
    x = torch.randn(2, 70, device=device)
    args = (x, p.sign_mantissa, p.exponent_code, p.segment_offsets, p.decode_table, None, 64, CODE_BITS)
    torch.library.opcheck(torch.ops.lowbit.dfloat11_linear.default, args, test_utils=("test_faketensor",))
    fields = (p.sign_mantissa, p.exponent_code, p.segment_offsets, p.decode_table, 64, CODE_BITS)
    for backend in ("torch", "triton"):
        torch.library.opcheck(torch.ops.lowbit.dfloat11_decode.default, (*fields, backend),
                              test_utils=("test_faketensor",))
    assert torch.equal(torch.ops.lowbit.dfloat11_decode(*fields, "triton").cpu(), FMT.dequantize(p.to("cpu")))


@pytest.mark.parametrize("backend", [None, "triton"])
def test_compiled_layer_has_no_graph_break(backend):
    device = DEVICES[0]
    layer = lowbit.QuantLinear.from_linear(nn.Linear(70, 40).bfloat16(), "dfloat11", segment=64).to(device)
    x = torch.randn(2, 70, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: layer(t, backend=backend), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x, backend=backend))


def _block(device):
    """A 'block' of three dfloat11 layers with different shapes and two segment sizes."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(70, 33), nn.Linear(33, 65, bias=False), nn.Linear(65, 70)).bfloat16()
    reference = [m.weight.detach().clone() for m in block]
    lowbit.quantize(block, "dfloat11", overrides={"1": {"format": "dfloat11", "segment": 128}}, segment=64,
                    progress=False)
    return block.to(device), reference


@pytest.mark.parametrize("device", DEVICES)
def test_block_decodes_several_layers_into_one_shared_buffer(device, monkeypatch):
    """In one launch, though the layers have different segment lengths (64 and 128)."""
    block, reference = _block(device)
    decompressor = BlockDecompressor(block)
    launches = []
    real_decode = dfloat11_kernels.decode_layers
    monkeypatch.setattr(dfloat11_kernels, "decode_layers",
                        lambda rows, *args, **kwargs: launches.append(rows) or real_decode(rows, *args, **kwargs))
    weights = decompressor.decode()
    assert len(launches) == 1
    assert [row[dfloat11_kernels.LAYER_FIELDS.index("segment")] for row in launches[0]] == [64, 128, 64]
    assert [tuple(w.shape) for w in weights] == [(33, 70), (65, 33), (70, 65)]
    for w, ref in zip(weights, reference):
        assert torch.equal(_bits(w), _bits(ref))
    # the views share one buffer, back to back
    base = weights[0].data_ptr()
    assert [w.data_ptr() - base for w in weights] == [0, 2 * 33 * 70, 2 * (33 * 70 + 65 * 33)]
    assert all(layer.decoded_weight is w for layer, w in zip(decompressor.layers, weights))
    decompressor.remove()
    assert all(layer.decoded_weight is None for layer in decompressor.layers)


@pytest.mark.parametrize("device", DEVICES)
def test_block_hooks_decode_for_many_tokens_only(device):
    block, reference = _block(device)
    decompressor = BlockDecompressor(block)
    seen = []
    block[1].register_forward_pre_hook(lambda mod, args: seen.append(mod.decoded_weight is not None))
    x = torch.randn(FUSED_MAX_M + 3, 70).bfloat16().to(device)
    with torch.no_grad():
        y = block(x)
        block(x[:1])
    expected = x.cpu()
    for layer, w in zip(block, reference):
        expected = F.linear(expected, w, None if layer.bias is None else layer.bias.cpu())
    assert seen == [True, False]  # decoded per block for 7 tokens; the fused path for 1
    assert torch.equal(y.cpu(), expected)
    assert all(layer.decoded_weight is None for layer in decompressor.layers)  # released after the block


def test_enable_block_decompression_finds_transformer_blocks():
    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16), "dfloat11", skip=["lm_head"], progress=False)
    decompressors = enable_block_decompression(model)
    assert len(decompressors) == 2 and all(len(d.layers) == 7 for d in decompressors)
    for d in decompressors:
        d.remove()


def test_nested_blocks_are_hooked_once_at_the_outermost(block_decodes):
    """A T5Block holds its sub-layers in another ModuleList: only the T5Blocks are hooked, so each
    weight is decoded once per call (the sub-layers' own hooks decoded them a second time)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = lowbit.quantize(T5ForConditionalGeneration(config).bfloat16().eval(), "dfloat11", skip=["lm_head"],
                            progress=False)
    ids = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
    decompressors = enable_block_decompression(model, min_tokens=1)
    assert [len(d.layers) for d in decompressors] == [6, 10]  # the encoder's and the decoder's T5Block
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, expected)
    decoded = [layer for decompressor in block_decodes for layer in decompressor.layers]
    assert len(decoded) == len({id(m) for m in decoded}) == 6 + 10  # the encoder / decoder block's layers


def test_block_decompression_steps_aside_under_torch_compile_and_export(block_decodes):
    """Traced, the hooks leave each layer to its own op (a traced decode into the shared buffer was
    an error under torch.compile): with min_tokens=1 every eager call decodes per block, a compiled
    (fullgraph) or exported one never does, and all give the logits of the unhooked model."""
    torch._dynamo.reset()
    model = lowbit.quantize(make_tiny_llama(dtype=torch.bfloat16).eval(), "dfloat11", skip=["lm_head"], progress=False)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    enable_block_decompression(model, min_tokens=1)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, expected)
        assert len(block_decodes) == 2
        assert torch.equal(compiled(ids, use_cache=False).logits, expected)
        program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
        assert torch.equal(program.module()(ids, use_cache=False).logits, expected)
    assert len(block_decodes) == 2


def test_enable_block_decompression_warns_when_there_is_nothing_to_hook():
    with pytest.warns(UserWarning, match="no block .* holds dfloat11 layers"):
        assert enable_block_decompression(make_tiny_llama()) == []


def test_block_decompressor_needs_dfloat11_layers():
    with pytest.raises(lowbit.LowbitError, match="no dfloat11 layers"):
        BlockDecompressor(nn.Sequential(nn.Linear(4, 4)))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336)])
def test_gpu_real_shapes(n, k):
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    p = FMT.quantize(w)
    assert torch.equal(_decode(p).view(torch.int16), w.view(torch.int16))
    for m in (1, FUSED_MAX_M, 64):
        x = torch.randn(m, k, device="cuda").bfloat16()
        ref = F.linear(x.float(), w.float())
        y = lowbit.linear(x, p)
        assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()

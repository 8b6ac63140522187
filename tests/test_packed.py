import pytest
import torch

from lowbit.errors import FormatError
from lowbit.formats import get_format
from lowbit.packed import PackedWeight

from .test_io import EVERY_FORMAT


def _packed(bits=4, symmetric=False, n=8, k=256):
    return get_format(f"int{bits}").quantize(torch.randn(n, k), symmetric=symmetric)


@pytest.mark.parametrize("bits,symmetric,expected", [(4, True, 4 + 16 / 128), (4, False, 4 + 32 / 128),
                                                     (8, True, 8 + 16 / 128), (3, False, 3 + 32 / 128)])
def test_bits_per_weight_counts_scales_and_zeros(bits, symmetric, expected):
    p = _packed(bits, symmetric)
    assert p.bits_per_weight == pytest.approx(expected)
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.tensors.values())


@pytest.mark.parametrize("fmt,options", EVERY_FORMAT, ids=lambda v: str(v))
def test_every_packed_field_owns_exactly_its_storage(fmt, options):
    """A field that is a view into a larger tensor holds memory bits_per_weight does not count, and
    torch.save / torch.export write the whole storage (nf4's double-quantized absmax once did)."""
    p = get_format(fmt).quantize(torch.randn(33, 130).bfloat16(), **options)
    for name, tensor in p.tensors.items():
        assert tensor.is_contiguous(), name
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_to_keeps_dtypes_and_values():
    p = _packed()
    q = p.to("cpu")
    assert q is not p and q.attrs == p.attrs and q.shape == p.shape
    for name in p.tensors:
        assert q.tensors[name].dtype == p.tensors[name].dtype
        assert torch.equal(q.tensors[name], p.tensors[name])


def test_state_dict_and_metadata():
    p = _packed()
    sd = p.state_dict("layer.")
    assert set(sd) == {"layer.qweight", "layer.scales", "layer.zeros"}
    assert p.metadata() == {"format": "int4", "shape": [8, 256], "dtype": "float32",
                            "attrs": {"group_size": 128, "symmetric": False}, "layout": 1}


def test_field_access_and_missing_field():
    p = _packed(symmetric=True)
    assert p.qweight is p.tensors["qweight"]
    with pytest.raises(AttributeError):
        p.zeros


@pytest.mark.parametrize("mutate", [
    lambda t: t.pop("scales"),
    lambda t: t.update(extra=torch.zeros(1)),
    lambda t: t.update(scales=t["scales"].float()),
    lambda t: t.update(qweight=t["qweight"][:, :-1]),
])
def test_construction_validates_declared_fields(mutate):
    p = _packed()
    tensors = dict(p.tensors)
    mutate(tensors)
    with pytest.raises(FormatError):
        PackedWeight(p.format, p.shape, p.dtype, p.attrs, tensors)


def test_from_state_dict_inverts_state_dict():
    p = _packed(bits=5)
    q = PackedWeight.from_state_dict(p.state_dict("blk."), p.metadata(), prefix="blk.")
    assert q.metadata() == p.metadata()
    assert all(torch.equal(q.tensors[k], p.tensors[k]) for k in p.tensors)


@pytest.mark.parametrize("edit", [
    lambda m, s: m.update(format="int42"),
    lambda m, s: m.update(shape=[8]),
    lambda m, s: m.update(dtype="int8"),
    lambda m, s: m["attrs"].update(group_size=7),
    lambda m, s: s.pop("blk.scales"),
    lambda m, s: m.pop("attrs"),
    lambda m, s: m.update(layout=2),
    lambda m, s: m.update(layout="1"),
    lambda m, s: m.update(layout=True),
    lambda m, s: m.update(dtype={}),
    lambda m, s: m.update(dtype=["float32"]),
])
def test_from_state_dict_validates(edit):
    p = _packed()
    meta, state = p.metadata(), p.state_dict("blk.")
    edit(meta, state)
    with pytest.raises(FormatError):
        PackedWeight.from_state_dict(state, meta, prefix="blk.")


@pytest.mark.parametrize("fmt,layout", [("int6", 2), ("int7", 2), ("mxfp6", 2), ("int4", 1), ("int3", 1),
                                        ("lut4", 1), ("mxfp4", 1), ("nf4", 1), ("dfloat11", 1)])
def test_metadata_records_the_packed_layout(fmt, layout):
    """Layout 2 is the nibble-aligned 2-bit plane (bitpack.py); entries without "layout" were
    written before layouts were recorded, in layout 1, so those formats' layers are refused."""
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    p = get_format(fmt).quantize(w)
    meta = p.metadata()
    assert meta["layout"] == layout
    del meta["layout"]
    if layout == 1:
        assert PackedWeight.from_state_dict(p.state_dict(), meta).metadata() == p.metadata()
    else:
        with pytest.raises(FormatError, match=rf"{fmt}: packed layout 1 is not the one this lowbit reads \(2\); "
                                              r"it was written by an older lowbit"):
            PackedWeight.from_state_dict(p.state_dict(), meta)


@pytest.mark.parametrize("fmt", ["int4", "lut2", "fp8", "mxfp4", "nvfp4", "nf4", "dfloat11"])
@pytest.mark.parametrize("value", [[], ["x"], {}, {"a": 1}])
def test_an_attribute_given_a_json_list_or_object_is_a_format_error(fmt, value):
    """No format attribute takes a list or an object: each is refused as such, naming the format,
    including where the check is a lookup in a set of names (a list is unhashable there)."""
    p = get_format(fmt).quantize(torch.randn(8, 64, dtype=torch.bfloat16))
    for attr in p.attrs:
        meta = p.metadata()
        meta["attrs"][attr] = value
        with pytest.raises(FormatError, match=fmt):
            PackedWeight.from_state_dict(p.state_dict(), meta)


@pytest.mark.parametrize("fmt", ["int2", "int4", "int8", "lut2", "fp8", "mxfp4", "mxint8", "nvfp4", "nf4", "dfloat11"])
def test_dequantize_refuses_another_formats_weight(fmt):
    """Format.dequantize of another format's PackedWeight (int2 reading int4 fields decoded a wrong
    answer silently; others crashed deep in the unpacking) or of a non-PackedWeight."""
    other = get_format("int4" if fmt != "int4" else "nf4").quantize(torch.randn(8, 64))
    with pytest.raises(FormatError, match=rf"{fmt}\.dequantize: expected a PackedWeight of format '{fmt}', "
                                          rf"got format '{other.format}'"):
        get_format(fmt).dequantize(other)
    with pytest.raises(FormatError, match=rf"{fmt}\.dequantize: .* got NoneType"):
        get_format(fmt).dequantize(None)
    own = get_format(fmt).quantize(torch.randn(8, 64, dtype=torch.bfloat16))
    assert get_format(fmt).dequantize(own).shape == (8, 64)

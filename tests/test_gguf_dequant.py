"""GGUF block dequantisation and the quantised Linear, against the `gguf` package's numpy reference.

Every type is checked on random valid blocks (random codes, packed scales, mins and mask bits;
finite fp16 scales) and, where the `gguf` package can quantise, on blocks it wrote from random
floats. Ours computes in fp32 in the reference's order, so fp32 results are bit-identical
(measured max |diff| 0.0 for all 13 types) and other dtypes are the reference rounded once.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import random_gguf_blocks
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize
from reference import rel_l2
from torch import nn

from wan22_core.quant import TYPES, GGUFLinear, GGUFWeight, UnsupportedQuantType, dequantize, swap_to_gguf


ALL = list(TYPES)
# What gguf 0.19's numpy `quantize` writes (no K-quants), with the rel. L2 error it leaves on
# N(0, 1) weights: about half of each bound (measured 0.0055, 0.086, 0.077, 0.042, 0.037, 0.0017).
QUANTISABLE = {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.15, "Q5_0": 0.08, "Q5_1": 0.08, "BF16": 0.004}


def reference(raw: np.ndarray, name: str, shape) -> torch.Tensor:
    """The gguf package's fp32 dequantisation of `raw` bytes, as a tensor of `shape`."""
    values = reference_dequantize(raw, GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def random_weight(name: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random valid bytes of a [rows, cols] weight, laid out as a file stores it, and their reference values."""
    kind = TYPES[name]
    raw = random_gguf_blocks(name, rows * cols // kind.block_size, seed).reshape(rows, -1)
    return raw, reference(raw, name, (rows, cols))


def test_type_table_matches_gguf():
    for name, kind in TYPES.items():
        stored = GGMLQuantizationType[name]
        assert (kind.id, kind.block_size, kind.type_size) == (stored.value, *GGML_QUANT_SIZES[stored]), name


@pytest.mark.parametrize("name", ALL)
def test_random_blocks_equal_the_reference_bit_for_bit(name):
    raw, expected = random_weight(name, rows=4, cols=512)  # 8 K-quant super-blocks, 64 legacy blocks
    ours = dequantize(torch.from_numpy(raw), name, (4, 512))
    assert ours.dtype == torch.float32 and torch.equal(ours, expected), (ours - expected).abs().max()
    for dtype in (torch.bfloat16, torch.float16):  # the fp32 values, rounded once
        assert torch.equal(dequantize(torch.from_numpy(raw), name, (4, 512), dtype), expected.to(dtype)), dtype


@pytest.mark.parametrize("name", QUANTISABLE)
def test_blocks_quantised_by_gguf_equal_the_reference(name):
    weights = np.random.default_rng(1).standard_normal((8, 256), dtype=np.float32)
    raw = reference_quantize(weights, GGMLQuantizationType[name])
    expected = reference(raw, name, (8, 256))
    ours = dequantize(torch.from_numpy(raw).view(torch.uint8), name, (8, 256))
    assert torch.equal(ours, expected)
    assert rel_l2(ours, torch.from_numpy(weights)) < QUANTISABLE[name]  # realistic blocks, not degenerate ones


def test_a_flattened_tensor_dequantises_to_its_real_shape():
    """ComfyUI-GGUF stores a tensor whose last dim is not a multiple of 256 as (n / 256, 256)
    rows, with the real shape in metadata: the blocks run through it in row-major order."""
    shape = (64, 16, 1, 2, 2)  # a patch-embedding conv: last dim 2
    raw = random_gguf_blocks("Q4_K", math.prod(shape) // 256, seed=2).reshape(math.prod(shape) // 256, -1)
    expected = reference(raw, "Q4_K", shape)
    assert torch.equal(dequantize(torch.from_numpy(raw), "Q4_K", shape), expected)
    with pytest.raises(ValueError, match="not whole 256-weight blocks"):
        GGUFWeight(torch.from_numpy(raw), "Q4_K", shape).rows(0, 1)


def test_unsupported_and_malformed_tensors_are_refused_with_the_type_named():
    with pytest.raises(UnsupportedQuantType, match=r"IQ4_XS \(23\) is not supported.*Q8_0"):
        dequantize(torch.zeros(136, dtype=torch.uint8), GGMLQuantizationType.IQ4_XS, (256,))
    with pytest.raises(UnsupportedQuantType, match="Q8_K is not supported"):
        dequantize(torch.zeros(292, dtype=torch.uint8), "Q8_K", (256,))
    with pytest.raises(ValueError, match=r"Q8_0 tensor of shape \(2, 32\) needs 68 bytes"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (2, 32))  # a truncated tensor
    with pytest.raises(ValueError, match="blocks of 32; 48 weights"):
        dequantize(torch.zeros(51, dtype=torch.uint8), "Q8_0", (48,))


def test_row_slices_stay_quantised_and_dequantise_to_the_rows():
    raw, expected = random_weight("Q6_K", rows=6, cols=512, seed=3)
    weight = GGUFWeight(torch.from_numpy(raw), "Q6_K", (6, 512))
    part = weight.rows(2, 5)
    assert part.nbytes == 3 * 2 * 210 and part.data.dtype == torch.uint8
    assert part.data.data_ptr() == weight.data.data_ptr() + 2 * 2 * 210  # a view: nothing copied
    assert torch.equal(part.dequantize(), expected[2:5])
    with pytest.raises(IndexError, match=r"rows \[4, 7\) out of range"):
        weight.rows(4, 7)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q3_K", "F16"])
def test_gguf_linear_equals_f_linear_with_the_reference_weight(name):
    raw, expected = random_weight(name, rows=48, cols=256, seed=4)
    layer = GGUFLinear(256, 48, name, bias_dtype=torch.float32)
    layer.weight.data.copy_(torch.from_numpy(raw))
    layer.bias.data.normal_()
    x = torch.randn(3, 5, 256)
    assert torch.equal(layer(x), F.linear(x, expected, layer.bias))
    xb = x.bfloat16()  # the compute dtype follows the input, as FP8Linear's does
    assert torch.equal(layer(xb), F.linear(xb, expected.bfloat16(), layer.bias.bfloat16()))


def test_gguf_linear_holds_the_quantised_bytes():
    model = nn.Sequential(nn.Linear(512, 64), nn.GELU(), nn.Linear(64, 512, bias=False))
    swap_to_gguf(model, {"0": "Q4_K", "2": "Q8_0"}, bias_dtype=torch.float32)
    first, second = model[0], model[2]
    assert isinstance(first, GGUFLinear) and isinstance(second, GGUFLinear) and second.bias is None
    assert first.weight.dtype == torch.uint8 and first.weight.shape == (64, 2 * 144)  # 0.5625 bytes per weight
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held == 64 * 512 * 144 // 256 + 64 * 4 + 512 * 64 * 34 // 32
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight"}
    raw, expected = random_weight("Q4_K", rows=64, cols=512, seed=5)
    model.load_state_dict({"0.weight": GGUFWeight(torch.from_numpy(raw), "Q4_K", (64, 512)).by_rows(),
                           "0.bias": torch.zeros(64), "2.weight": second.weight.detach().clone()})
    x = torch.randn(2, 512)
    assert torch.equal(first(x), F.linear(x, expected))
    with pytest.raises(TypeError, match="1 is a GELU, not an nn.Linear"):
        swap_to_gguf(model, {"1": "Q8_0"})


# ---------------------------------------------------------------------------------------------
# Our encoder (make-tiny --format gguf writes with it): every type it offers, decoded by the gguf
# package's numpy. Bounds on rel. L2 for N(0, 1) weights, about twice what each leaves (measured
# with torch.manual_seed(0), [8, 512]: Q2_K 0.33, Q3_K 0.16, Q4_K 0.080, Q5_K 0.039, Q6_K 0.019;
# the gguf package's own types as above; F16 2e-4, BF16 1.7e-3, F32 0). They track the bits:
# min-max uniform codes leave step / sqrt(12) per weight.
ENCODED = {"Q2_K": 0.5, "Q3_K": 0.3, "Q4_K": 0.15, "Q5_K": 0.08, "Q6_K": 0.04, **QUANTISABLE, "F16": 5e-4, "F32": 0.0}


@pytest.mark.parametrize("name", ALL)
def test_our_encoder_round_trips_through_the_references_decoder(name):
    from wan22_core.quant.gguf_quantize import QUANTISABLE as OFFERED, quantize

    assert set(OFFERED) == set(ALL) == set(ENCODED)
    torch.manual_seed(0)
    weights = torch.randn(8, 512)
    weights[0, :256] = 0.0  # an all-zero block: no division by a zero scale
    weights[1, :256] = 3.0  # a constant block
    weights[2, 7] = 40.0  # an outlier in a block
    weights[3, :256] = -torch.rand(256)  # negative only (K-quant mins)
    raw = quantize(weights, name)
    assert raw.dtype == torch.uint8 and raw.shape == (8, TYPES[name].nbytes(512))
    decoded = reference(raw.numpy(), name, (8, 512))
    assert torch.isfinite(decoded).all() and torch.equal(decoded[0, :256], torch.zeros(256))
    assert rel_l2(decoded[4:], weights[4:]) <= ENCODED[name]  # the random rows
    assert torch.equal(dequantize(raw, name, (8, 512)), decoded)  # and ours reads it the same


def test_the_encoder_refuses_rows_that_are_not_whole_blocks():
    from wan22_core.quant.gguf_quantize import quantize

    with pytest.raises(ValueError, match="Q4_K stores weights in blocks of 256; 64 weights"):
        quantize(torch.zeros(2, 64), "Q4_K")

"""fp8 rows (E4M3 values + UE8M0 scale per 32) against torch's float8 dtypes and hand-computed scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engram.row_format import (
    E4M3_VALUES,
    check_wire_format,
    decode_rows,
    dequantize_fp8,
    dequantize_fp8_numpy,
    e8m0_exponents,
    encode_e4m3,
    encode_rows,
    quantize_fp8,
    quantize_fp8_torch,
    row_nbytes,
)


def torch_e4m3(y: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(y, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def hand_exponent(amax: float) -> int:
    """The documented rule, written the slow way: smallest k with max(amax, 1e-4) / 2^k <= 448."""
    a = max(amax, 1e-4)
    k = -200
    while a / 2.0**k > 448:
        k += 1
    while a / 2.0 ** (k - 1) <= 448:
        k -= 1
    return k


def test_row_bytes() -> None:
    assert row_nbytes("fp8", 256) == 264
    assert row_nbytes("bf16", 256) == 512 and row_nbytes("fp16", 256) == 512 and row_nbytes("fp32", 256) == 1024
    assert row_nbytes("fp8", 256) / row_nbytes("bf16", 256) <= 0.53
    with pytest.raises(ValueError, match="multiple of the scale block 32"):
        row_nbytes("fp8", 80)
    with pytest.raises(ValueError, match="unknown 'int4'"):
        row_nbytes("int4", 256)


def test_wire_not_wider_than_storage() -> None:
    for storage, wire in [
        ("fp32", "fp32"),
        ("fp32", "bf16"),
        ("fp32", "fp8"),
        ("bf16", "fp16"),
        ("bf16", "fp8"),
        ("fp8", "fp8"),
    ]:
        check_wire_format(storage=storage, wire=wire, dim=256)
    for storage, wire in [("fp8", "bf16"), ("fp8", "fp32"), ("bf16", "fp32"), ("fp16", "fp32")]:
        with pytest.raises(ValueError, match=f"wire format {wire} .* wider than the table's storage format {storage}"):
            check_wire_format(storage=storage, wire=wire, dim=256)


def test_e4m3_table_matches_torch() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(torch.float8_e4m3fn).double().numpy()
    np.testing.assert_array_equal(np.isnan(E4M3_VALUES), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(E4M3_VALUES[ok], ref[ok])
    assert E4M3_VALUES[0x7E] == 448.0 and E4M3_VALUES[0x01] == 2.0**-9  # max normal, min subnormal


def test_e4m3_encoder_equals_torch_cast() -> None:
    rng = np.random.default_rng(0)
    y = np.concatenate(
        [
            rng.uniform(-448, 448, 20000),
            rng.normal(0, 1, 20000),
            rng.uniform(-(2.0**-5), 2.0**-5, 20000),  # subnormal range of E4M3 (below 2^-6) and around it
            (E4M3_VALUES[:0x7F][:-1] + E4M3_VALUES[1:0x7F]) / 2,  # exact ties between neighbours: to even
            [0.0, -0.0, 448.0, -448.0, 2.0**-10, 3 * 2.0**-10, 1e-30],
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(encode_e4m3(y), torch_e4m3(y))
    with pytest.raises(ValueError, match="within"):
        encode_e4m3(np.array([449.0]))


def test_e8m0_exponent_by_hand() -> None:
    cases = {
        448.0: 0,  # amax exactly 448 * 2^0: scale 1, amax lands on E4M3's max
        896.0: 1,  # 448 * 2^1
        448.0 * 2.0**-20: -20,
        449.0: 1,  # just above: next power
        1.0: -8,  # 1/448 = 2^-8.8 -> 2^-8 (256 <= 448)
        2.0: -7,  # amax a power of two: 2/448 -> 2^-7
        0.0: -22,  # floored at 1e-4: 1e-4/448 = 2^-22.09 -> 2^-22
        1e-30: -22,
        3.0e38: 120,
    }
    got = e8m0_exponents(np.array(list(cases), dtype=np.float32))
    assert got.tolist() == list(cases.values())
    rng = np.random.default_rng(1)
    amax = np.exp(rng.uniform(-30, 30, 2000)).astype(np.float32)
    assert e8m0_exponents(amax).tolist() == [hand_exponent(float(a)) for a in amax]
    # the byte is what torch's float8_e8m0fnu stores for 2^k
    k = np.array([0, -8, -22, 120, 1])
    ref = torch.from_numpy(np.ldexp(1.0, k).astype(np.float32)).to(torch.float8_e8m0fnu).view(torch.uint8).numpy()
    np.testing.assert_array_equal((k + 127).astype(np.uint8), ref)


def test_quantize_against_hand_scale_and_torch() -> None:
    rng = np.random.default_rng(2)
    x = (rng.normal(0, 1, (64, 256)) * np.exp(rng.uniform(-12, 12, (64, 1)))).astype(np.float32)
    x[3] = 0.0  # an all-zero row
    x[4, :32] = 448.0 * 2.0**-3  # amax exactly a power of two times 448
    x[5, 32:64] = 1e-40  # fp32 subnormals
    x[6, :] = 2.0**-5  # amax a power of two
    values, scales = quantize_fp8(x)
    assert values.shape == (64, 256) and scales.shape == (64, 8) and values.dtype == scales.dtype == np.uint8
    blocks = x.reshape(64, 8, 32)
    k = np.array([[hand_exponent(float(np.abs(b).max())) for b in row] for row in blocks])
    np.testing.assert_array_equal(scales.astype(int) - 127, k)
    assert scales[3].tolist() == [127 - 22] * 8 and not values[3].any()
    assert scales[4, 0] == 127 - 3 and (values[4, :32] == 0x7E).all()  # 448 * 2^-3 / 2^-3 = 448
    assert scales[6, 0] == 127 + math.ceil(math.log2(2.0**-5 / 448))
    ref = torch_e4m3((blocks / np.ldexp(1.0, k)[..., None]).reshape(64, 256))
    np.testing.assert_array_equal(values, ref)
    tv, ts = quantize_fp8_torch(torch.from_numpy(x))
    np.testing.assert_array_equal(tv.numpy(), values)
    np.testing.assert_array_equal(ts.numpy(), scales)


def test_dequantize_error_bound_and_paths_agree() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.02, (128, 256)).astype(np.float32)
    values, scales = quantize_fp8(x)
    back = dequantize_fp8_numpy(values, scales)
    ref = (
        torch.from_numpy(values).view(torch.float8_e4m3fn).double().numpy().reshape(128, 8, 32)
        * np.ldexp(1.0, scales.astype(int) - 127)[..., None]
    ).reshape(128, 256)
    np.testing.assert_array_equal(back, ref.astype(np.float32))
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormals within half a quantum
    scale = np.ldexp(1.0, scales.astype(int) - 127).repeat(32, axis=1)
    assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10) + 1e-12)
    bf16 = dequantize_fp8(torch.from_numpy(values), torch.from_numpy(scales))
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, torch.from_numpy(back).bfloat16(), rtol=0, atol=0)
    np.testing.assert_array_equal(decode_rows(encode_rows(x, "fp8"), "fp8", 256).numpy(), back)


def test_other_formats_round_trip() -> None:
    x = np.random.default_rng(4).normal(0, 1, (5, 64)).astype(np.float32)
    np.testing.assert_array_equal(decode_rows(encode_rows(x, "fp32"), "fp32", 64).numpy(), x)
    for fmt, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        buf = encode_rows(x, fmt)
        assert buf.shape == (5, row_nbytes(fmt, 64))
        torch.testing.assert_close(decode_rows(buf, fmt, 64), torch.from_numpy(x).to(dt).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected \\(R, 264\\) bytes of fp8"):
        decode_rows(np.zeros((2, 263), np.uint8), "fp8", 256)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(bad: float) -> None:
    x = np.zeros((4, 64), np.float32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="row 2 holds NaN or inf"):
        quantize_fp8(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8_torch(torch.from_numpy(x))

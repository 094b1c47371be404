"""Row formats of an Engram table: fp32, bf16, fp16, and fp8 (E4M3 values + UE8M0 block scales).

fp8 is DeepSeek-V4.1-Flash's checkpoint layout: each row of `dim` values is stored as `dim`
E4M3 bytes (`float8_e4m3fn`: 1 sign, 4 exponent, 3 mantissa bits, bias 7, no inf, max 448)
followed by `dim / 32` E8M0 bytes (`float8_e8m0fnu`: a bare exponent, value 2^(byte - 127),
255 is NaN), one per block of 32 values. A 256-dim row is 256 + 8 = 264 bytes.

The scale rule (DeepGEMM's `per_token_cast_to_fp8(..., use_ue8m0=True)`, the one DeepSeek's
inference code applies): for a block with absolute maximum `amax`,

    scale = 2^k,  k = ceil(log2(max(amax, 1e-4) / 448))

i.e. the smallest power of two that brings the block inside E4M3's range; the 1e-4 floor
gives an all-zero block the scale 2^-22 instead of 2^-inf. Values are then `x / scale`
rounded to the nearest E4M3 value, ties to even (what `tensor.to(torch.float8_e4m3fn)` does).
Dividing by a power of two is exact, so the only rounding is that last step.

Wire formats: a lookup may ask for any format whose row is not wider (in bytes) than the
table's storage format; dequantisation of fp8 happens on the client (`dequantize_fp8`, torch,
on whatever device the tensors are on).
"""

from __future__ import annotations

import numpy as np
import torch

FP8_BLOCK = 32
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepGEMM clamps a block's amax to this before choosing the scale
E8M0_BIAS = 127

# bytes per value; fp8's block scales add 1 byte per FP8_BLOCK values on top
_VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FORMATS = tuple(_VALUE_BYTES)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_format(fmt: str, *, what: str = "row format") -> str:
    if fmt not in _VALUE_BYTES:
        raise ValueError(f"{what}: unknown {fmt!r} (known: {', '.join(FORMATS)})")
    return fmt


def row_nbytes(fmt: str, dim: int) -> int:
    """Bytes of one row of `dim` values in `fmt` (fp8: values + block scales)."""
    check_format(fmt)
    if dim <= 0:
        raise ValueError(f"dim: must be positive, got {dim}")
    if fmt == "fp8":
        if dim % FP8_BLOCK:
            raise ValueError(f"row format fp8: dim {dim} is not a multiple of the scale block {FP8_BLOCK}")
        return dim + dim // FP8_BLOCK
    return _VALUE_BYTES[fmt] * dim


def check_wire_format(*, storage: str, wire: str, dim: int) -> None:
    """A lookup may ask for `wire` only when its row is not wider than a `storage` row."""
    check_format(storage, what="storage format")
    check_format(wire, what="wire format")
    if row_nbytes(wire, dim) > row_nbytes(storage, dim):
        raise ValueError(
            f"wire format {wire} ({row_nbytes(wire, dim)} bytes/row) is wider than the table's storage "
            f"format {storage} ({row_nbytes(storage, dim)} bytes/row); ask for {storage} or narrower"
        )


# ---------------------------------------------------------------------------------------------
# E4M3 and E8M0 codes (numpy reference; exact)


def _e4m3_values() -> np.ndarray:
    """(256,) float64: the value of every E4M3 code; NaN for 0x7F and 0xFF."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, mant = (codes >> 3) & 0xF, codes & 0x7
    mag = np.where(exp == 0, mant / 8 * 2.0**-6, (1 + mant / 8) * 2.0 ** (exp - 7))
    values = sign * mag
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values


E4M3_VALUES = _e4m3_values()
_E4M3_POSITIVE = E4M3_VALUES[:0x7F]  # codes 0x00..0x7E, ascending, 0 .. 448


def encode_e4m3(y: np.ndarray) -> np.ndarray:
    """float values with |y| <= 448 -> uint8 E4M3 codes, round to nearest, ties to even."""
    a = np.abs(np.asarray(y, dtype=np.float64))
    if not np.all(np.isfinite(a)) or (a.size and a.max() > E4M3_MAX):
        raise ValueError("encode_e4m3: values must be finite and within +-448")
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    exp = np.maximum(e - 1, -6)  # floor(log2 a), clamped to the smallest normal exponent
    quantum = np.ldexp(1.0, exp - 3)  # 3 mantissa bits
    r = np.rint(a / quantum) * quantum  # exact in float64; np.rint rounds half to even
    code = np.searchsorted(_E4M3_POSITIVE, r).astype(np.uint8)
    assert np.array_equal(_E4M3_POSITIVE[code], r), "E4M3 rounding left the code grid"
    return code | (np.signbit(np.asarray(y)).astype(np.uint8) << 7)


def e8m0_exponents(amax: np.ndarray) -> np.ndarray:
    """Block amax -> k of the scale 2^k = the smallest power of two with amax / 2^k <= 448."""
    a = np.maximum(np.asarray(amax, dtype=np.float64), AMAX_FLOOR)
    _, e = np.frexp(a / E4M3_MAX)
    k = e.astype(np.int64)  # a first guess within one of the answer; fixed exactly below
    k = np.where(a > E4M3_MAX * np.ldexp(1.0, k), k + 1, k)
    k = np.where(a <= E4M3_MAX * np.ldexp(1.0, k - 1), k - 1, k)
    return k


def _check_finite(x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"quantize_fp8: row {row} holds NaN or inf; fp8 rows must be finite")


def quantize_fp8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, dim) float rows -> (values (R, dim) uint8 E4M3, scales (R, dim/32) uint8 E8M0)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_fp8: expected rows (R, dim), got shape {x.shape}")
    R, dim = x.shape
    row_nbytes("fp8", dim)  # checks dim % 32
    _check_finite(x)
    blocks = x.reshape(R, dim // FP8_BLOCK, FP8_BLOCK).astype(np.float64)  # (R, nb, 32)
    k = e8m0_exponents(np.abs(blocks).max(axis=2))  # (R, nb)
    values = encode_e4m3(np.ldexp(blocks, -k[..., None])).reshape(R, dim)
    return values, (k + E8M0_BIAS).astype(np.uint8)


def dequantize_fp8_numpy(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(R, dim) E4M3 codes, (R, dim/32) E8M0 codes -> (R, dim) float32 (exact)."""
    R, dim = values.shape
    v = E4M3_VALUES[values].reshape(R, dim // FP8_BLOCK, FP8_BLOCK)
    k = scales.astype(np.int64) - E8M0_BIAS  # (R, nb)
    return np.ldexp(v, k[..., None]).reshape(R, dim).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# torch paths (any device): the client's dequantisation and a device-side quantiser


def quantize_fp8_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `quantize_fp8` on torch tensors: (R, dim) -> (uint8 (R, dim), uint8 (R, dim/32))."""
    if x.ndim != 2:
        raise ValueError(f"quantize_fp8_torch: expected rows (R, dim), got shape {tuple(x.shape)}")
    R, dim = x.shape
    row_nbytes("fp8", dim)
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("quantize_fp8_torch: rows hold NaN or inf; fp8 rows must be finite")
    blocks = x.reshape(R, dim // FP8_BLOCK, FP8_BLOCK)  # (R, nb, 32)
    amax = blocks.abs().amax(dim=2).double().clamp_min(AMAX_FLOOR)  # (R, nb)
    k = torch.frexp(amax / E4M3_MAX).exponent.long()
    k = torch.where(amax > E4M3_MAX * torch.ldexp(torch.ones_like(amax), k), k + 1, k)
    k = torch.where(amax <= E4M3_MAX * torch.ldexp(torch.ones_like(amax), k - 1), k - 1, k)
    scaled = torch.ldexp(blocks.double(), -k.unsqueeze(-1)).float()  # exact: power-of-two scale
    values = scaled.to(torch.float8_e4m3fn).view(torch.uint8).reshape(R, dim)
    return values, (k + E8M0_BIAS).to(torch.uint8)


_E4M3_BF16_BITS = torch.from_numpy(E4M3_VALUES.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(R, dim) uint8 E4M3, (R, dim/32) uint8 E8M0 -> (R, dim) `dtype`, on their device."""
    R, dim = values.shape
    if scales.shape != (R, dim // FP8_BLOCK):
        raise ValueError(f"dequantize_fp8: scales {tuple(scales.shape)} do not match values {tuple(values.shape)}")
    if values.device.type == "cpu" and dtype == torch.bfloat16:
        # CPU: every E4M3 value is exact in bf16, so a 256-entry table lookup replaces torch's slow
        # float8 conversion (3x faster); bf16 ops compute in fp32 and round once: the same result
        bits = _E4M3_BF16_BITS[values.contiguous().numpy()]  # (R, dim) int16 bf16 bit patterns
        v = torch.from_numpy(bits).view(torch.bfloat16).view(R, dim // FP8_BLOCK, FP8_BLOCK)
        s = torch.exp2(scales.float() - E8M0_BIAS).to(torch.bfloat16).unsqueeze(-1)  # (R, nb, 1), exact
        return (v * s).reshape(R, dim)
    v = values.contiguous().view(torch.float8_e4m3fn).float().reshape(R, dim // FP8_BLOCK, FP8_BLOCK)
    s = torch.exp2(scales.float() - E8M0_BIAS).unsqueeze(-1)  # (R, nb, 1)
    return (v * s).reshape(R, dim).to(dtype)


def pack_fp8(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Values and scales side by side: (R, dim + dim/32) uint8, the stored and wire row."""
    return np.concatenate([values, scales], axis=1)


def unpack_fp8(rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if rows.ndim != 2 or rows.shape[1] != row_nbytes("fp8", dim):
        raise ValueError(f"unpack_fp8: expected (R, {row_nbytes('fp8', dim)}) bytes for dim {dim}, got {rows.shape}")
    return rows[:, :dim], rows[:, dim:]


def encode_rows(x: np.ndarray, fmt: str) -> np.ndarray:
    """(R, dim) float32 rows -> (R, row_nbytes(fmt, dim)) uint8 in `fmt`."""
    check_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    if fmt == "fp8":
        return pack_fp8(*quantize_fp8(x))
    t = torch.from_numpy(np.ascontiguousarray(x)).to(TORCH_DTYPES[fmt])
    return t.view(torch.uint8).numpy().reshape(x.shape[0], -1)


def decode_rows(rows: np.ndarray, fmt: str, dim: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, row_nbytes(fmt, dim)) uint8 -> (R, dim) torch `dtype`."""
    check_format(fmt)
    if rows.ndim != 2 or rows.shape[1] != row_nbytes(fmt, dim):
        raise ValueError(f"decode_rows: expected (R, {row_nbytes(fmt, dim)}) bytes of {fmt}, got {rows.shape}")
    if fmt == "fp8":
        v, s = unpack_fp8(rows, dim)
        return dequantize_fp8(
            torch.from_numpy(np.ascontiguousarray(v)), torch.from_numpy(np.ascontiguousarray(s)), dtype
        )
    t = torch.from_numpy(np.ascontiguousarray(rows)).view(TORCH_DTYPES[fmt])
    return t.to(dtype)

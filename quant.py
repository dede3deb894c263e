"""
Quantizers: how a weight is stored in a few bits, and how it is rounded there.

A quantized tensor is a pair (codes, scale). The codes are low-bit numbers on a fixed grid; the
scale is one float32 per row (or per tensor) that stretches the grid to the data (block formats: below):

    scale = max|x| / rho            (symmetric "absmax" scaling, rho = the format's largest value)
    codes = round(x / scale)        (onto the format's grid, clamped to [-rho, rho])
    x_hat = codes * scale           (dequantize: what the next forward pass sees)

The formats (FORMATS below):
    fp8_e4m3  FP8 with 4 exponent and 3 mantissa bits, rho = 448, one scale per row. Its grid is not
              uniform: between 2^k and 2^(k+1) there are 8 points, spaced 2^(k-3); below 2^-6 the
              subnormals are spaced 2^-9. Stored as torch.float8_e4m3fn: 1 byte per value.
    fp8_e5m2  FP8 with 5 exponent and 2 mantissa bits, rho = 57344: coarser (4 points per binade) but a
              wider range (subnormals spaced 2^-16). Stored as torch.float8_e5m2 (eco.MOMENT_FP8 can
              store moments in it; E4M3 measured better).
    int8      integers in [-127, 127], one scale per row. Stored as torch.int8.
    int4      integers in [-7, 7], one scale per tensor (the paper's fine-tuning setting). Packed two per byte.
    nvfp4     FP4 E2M1 (2 exponent bits, 1 mantissa bit, rho = 6: the grid 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
              negatives; grid_step and round_to_grid treat it as FP8 with mantissa_bits=1, min_exponent=0) in
              blocks of 16 consecutive values of a row, one E4M3 scale per block (torch.float8_e4m3fn, 1 byte)
              times one float32 scale per tensor (NVIDIA's NVFP4). Packed two per byte.
    mxfp4     OCP Microscaling MXFP4: the same E2M1 values in blocks of 32, one E8M0 scale per block (a power
              of two 2^e, e in [-126, 127], stored as the byte e + 127), no tensor scale. Packed two per byte.
"Row" is the last dimension: a Linear weight [out, in] gets one scale per output channel, an expert
bank [E, out, in] one per expert row, activations [B, T, C] one per token.
Bytes per parameter, codes + scales: fp8/int8 1 + 4 / row length; int4 0.5 + 4 / numel; nvfp4
0.5 + 1/16 + 4 / numel; mxfp4 0.5 + 1/32 (rows that are multiples of the block; a partial block costs a scale).

Block scales (nvfp4, mxfp4). The scale of a (codes, scale) pair is a BlockScales(block, tensor): block scales
[..., ceil(n / block)] in the format's scale_dtype (the last block of a row may be partial: it is scaled as if
zero-padded) and, for nvfp4, a 0-dim float32 tensor scale. Each block's float32 scale s, and s's choice:
    nvfp4   tensor = max(max|x| / (6 * 448), float32 tiny)   (the largest block gets E4M3's largest scale)
            block  = amax(block) / (6 * tensor) rounded UP onto the E4M3 grid, clamped to [2^-9, 448]
            s      = block * tensor (float32)
    mxfp4   s = 2^ceil(log2(amax(block) / 6)), the smallest power of two with amax <= 6 s (computed exactly)
Both round the scale up, so no value of a block exceeds 6 s and none is clipped (nvfp4: up to the float32
rounding of s), and stochastic rounding stays unbiased everywhere: a clipped value always rounds down. The
common recipes do not: NVIDIA's rounds the E4M3 scale to nearest, which clips a block's largest values by up to
about 6% (half an E4M3 step), and the OCP spec's floor rule, s = 2^(floor(log2 amax) - 2), clips values in
[6, 8) x 2^k to 6 x 2^k. An all-zero block gets the smallest scale and zero codes.

Packing (int4, nvfp4, mxfp4) is storage only: the math works on float32 values on the grid; pack() is the last
step of quantize and unpack() the first of dequantize. Byte i holds element 2i in its low nibble and element
2i+1 in its high nibble (the layout of torch.float4_e2m1fn_x2 and NVIDIA's FP4), so codes are torch.uint8
[..., n / 2] and the last dimension must be even. An int4 nibble is a two's-complement integer (quantize writes
-7..7; the nibble 0x8 reads as -8); an E2M1 nibble is a sign bit (bit 3) and the index 0..7 of the magnitude in
0, 0.5, 1, 1.5, 2, 3, 4, 6, so -0.0 is kept. A QuantizedWeight's packed parameter carries its unpacked shape as
.logical_shape (every QuantizedWeight parameter has one): gradients, master copies and moments have that shape.

Rounding. Let lo < hi be the two grid points around y = x / scale.
    nearest     pick the closer one (ties to even, like the hardware cast). Smallest error, but
                biased: an update smaller than half a grid step is rounded away every time.
    stochastic  pick hi with probability (y - lo) / (hi - lo). Unbiased: E[q(y)] = y, so small updates
                survive on average. We compute lo, hi and the probability exactly on the real grid;
                "add noise proportional to |x|, then cast" is not exact (biased at binade edges).

The rest of the file is what training needs: QuantizedWeight / QLinear store a weight as codes + scale
(no high-precision copy), quantize activations to FP8 in the forward pass (straight-through in the
backward, as the paper does), and route the float32 weight gradient to `weight.main_grad`, where the
optimizer (eco.py) reads it. quantize_linears_ swaps a model's Linears for QLinear.

The FP8 matmul, two ways (QuantizedWeight.matmul per weight; set_matmul_ for a whole model):
    simulated  dequantize the codes to float32 and multiply in float32: y = q(x) @ (codes * scale)^T.
               Runs everywhere: the reference, and the fallback.
    scaled_mm  torch._scaled_mm multiplies the FP8 codes themselves, sums in float32 and applies both scales
               at the end: y[t, o] = x_scale[t] * w_scale[o] * sum_i x_codes[t, i] * w_codes[o, i]. One scale per
               token times one per weight row is exactly its "row-wise" scaling, so it reads the stored codes
               and no dequantized weight is made. A product of two E4M3 codes is exact in float32: the result
               differs from the simulated one only by the order and rounding of float32 sums (~1e-7 relative).
"auto", the default, is scaled_mm on a CUDA GPU whose torch._scaled_mm takes these operands (compute
capability 8.9 or higher), simulated elsewhere: a CPU run is unchanged unless scaled_mm is forced. (On the
CPU, torch._scaled_mm is an emulation that dequantizes and multiplies in float32: forcing it there tests the
path and saves nothing.) Both paths have the same backward, float32 matmuls with the dequantized operands:
dW = dy^T q(x) into main_grad and dx = dy W (straight-through the activation rounding). Only fp8_e4m3 has
an FP8 matmul (its activations are FP8 too); the other formats always run simulated. An MoE expert bank
[E, out, in] runs one matmul per expert.

Test: python -m pytest -q test_eco.py tests/test_quant.py -k "quant or qlinear or moe"
"""
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype  # how the codes are stored (packed formats: two 4-bit codes per torch.uint8 byte)
    max: float  # rho: the largest code
    per_row: bool  # one scale per row (last dim) if True, else one per tensor (or, if `block` is set, per block)
    mantissa_bits: int | None = None  # float formats only
    min_exponent: int | None = None  # float formats: exponent of the smallest normal (below: subnormals)
    block: int | None = None  # block formats: values per scale along a row (their scale is a BlockScales)
    scale_dtype: torch.dtype = torch.float32  # how the scales (block formats: the block scales) are stored
    tensor_scale: bool = False  # block formats: one float32 scale per tensor on top of the block scales
    packed: bool = False  # two 4-bit codes per byte along the last dimension (pack, unpack)


FORMATS = {
    "fp8_e4m3": Format("fp8_e4m3", torch.float8_e4m3fn, 448.0, True, mantissa_bits=3, min_exponent=-6),
    "fp8_e5m2": Format("fp8_e5m2", torch.float8_e5m2, 57344.0, True, mantissa_bits=2, min_exponent=-14),
    "int8": Format("int8", torch.int8, 127.0, True),
    "int4": Format("int4", torch.uint8, 7.0, False, packed=True),
    "nvfp4": Format("nvfp4", torch.uint8, 6.0, False, mantissa_bits=1, min_exponent=0, block=16,
                    scale_dtype=torch.float8_e4m3fn, tensor_scale=True, packed=True),
    "mxfp4": Format("mxfp4", torch.uint8, 6.0, False, mantissa_bits=1, min_exponent=0, block=32,
                    scale_dtype=torch.uint8, packed=True),
}
ROUNDINGS = ("nearest", "stochastic")
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # an E2M1 nibble's bits 0-2 index this
MXFP4_LIMIT = 3.0 * 2.0 ** 126  # mxfp4's largest |x|: above it the rounded-up power-of-two scale stores inf


class BlockScales(NamedTuple):
    """The scale of a block format's (codes, scale) pair: block scales [..., n_blocks] in the format's scale_dtype
    (nvfp4: E4M3 values; mxfp4: E8M0 biased exponents) and, for nvfp4, a 0-dim float32 tensor scale (else None)."""
    block: torch.Tensor
    tensor: torch.Tensor | None = None

    @property
    def nbytes(self):
        return self.block.nbytes + (0 if self.tensor is None else self.tensor.nbytes)


class NonFiniteError(ValueError):
    """A NaN or Inf reached a quantizer or the optimizer. Training loops catch this to report divergence."""


def get_format(fmt):
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {sorted(FORMATS)}")
    return FORMATS[fmt]


def check_rounding(rounding):
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {list(ROUNDINGS)}")


def check_shape(shape, f):
    """Packed formats store two values per byte along the last dimension: it must exist and be even."""
    if f.packed and (len(shape) == 0 or shape[-1] % 2):
        raise ValueError(f"shape {tuple(shape)} cannot be stored as {f.name}, which packs two 4-bit codes per byte "
                         f"along the last dimension; accepted: an even last dimension, or an unpacked format "
                         f"{[n for n, g in FORMATS.items() if not g.packed]}")


def check_finite(x, what):
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} contains NaN or Inf (shape {tuple(x.shape)}); refusing to quantize it")


# -----------------------------------------------------------------------------
# The grid and the two roundings, on already-scaled values y = x / scale

def grid_step(y, f):
    """Spacing of the format's grid around each y: the distance from lo to hi."""
    if f.mantissa_bits is None:
        return torch.ones_like(y)  # integers
    # floor(log2|y|) is the float32 exponent field of y (bits 23-30) minus its bias 127; for float32
    # zeros and subnormals it reads -127, and the clamp below covers them.
    exponent = ((y.view(torch.int32) >> 23) & 0xFF) - 127
    exponent = exponent.clamp_min(f.min_exponent)  # below the smallest normal the spacing stays fixed
    return ((exponent - f.mantissa_bits + 127) << 23).view(torch.float32)  # 2^(exponent - mantissa_bits)


def round_to_grid(y, f, rounding, generator=None):
    """Round y (float32, already divided by the scale) onto the grid of format f. Exact in float32."""
    y = y.clamp(-f.max, f.max)
    step = grid_step(y, f)
    t = y / step  # exact: step is a power of two. Grid points are the integers of t.
    if rounding == "nearest":
        return torch.round(t) * step  # torch.round breaks ties to even, like the FP8 cast
    lo = torch.floor(t)
    u = torch.rand(y.shape, generator=generator, device=y.device)  # uniform in [0, 1)
    return (lo + (u < t - lo)) * step  # up with probability (y - lo) / (hi - lo), exactly


# -----------------------------------------------------------------------------
# Two 4-bit codes per byte (int4, nvfp4, mxfp4): storage only, the math above works on float values

@functools.cache
def _e2m1_values(device):
    """The value of each E2M1 nibble 0..15: the magnitudes, then the same with the sign bit (0x8 is -0.0)."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES, device=device)
    return torch.cat([magnitudes, -magnitudes])


def _packed_format(fmt):
    f = get_format(fmt)
    if not f.packed:
        raise ValueError(f"fmt={fmt!r} is not packed; accepted: {[n for n, g in FORMATS.items() if g.packed]}")
    return f


def pack(values, fmt):
    """float32 grid values of a packed format, unscaled ([..., n], n even: integers -8..7 for int4, E2M1 values for
    nvfp4 and mxfp4) -> torch.uint8 codes [..., n / 2], element 2i in the low nibble of byte i, 2i+1 in the high
    one. Exact for values on the grid; others are not checked (quantize packs round_to_grid's output only)."""
    f = _packed_format(fmt)
    check_shape(values.shape, f)
    if f.mantissa_bits is None:  # int4: the low 4 bits of the two's-complement byte
        nibbles = values.to(torch.int8).view(torch.uint8) & 0xF
    else:  # E2M1: the index of |value| among the 8 magnitudes, and the sign bit (signbit: -0.0 keeps it)
        index = torch.searchsorted(_e2m1_values(values.device)[:8], values.abs().contiguous())
        nibbles = (index | (torch.signbit(values).long() << 3)).to(torch.uint8)
    nibbles = nibbles.reshape(*values.shape[:-1], -1, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4)


def unpack(codes, fmt):
    """pack backwards: torch.uint8 codes [..., n / 2] -> float32 grid values [..., n]. Every byte reads as two
    values, so pack(unpack(codes)) == codes for any bytes (int4's nibble 0x8, which quantize never writes, is -8)."""
    f = _packed_format(fmt)
    if codes.dtype != torch.uint8 or codes.dim() == 0:
        raise TypeError(f"packed {fmt} codes are a torch.uint8 tensor of at least one dimension, got {codes.dtype} "
                        f"of shape {tuple(codes.shape)}")
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(*codes.shape[:-1], -1)
    if f.mantissa_bits is None:  # int4: move the nibble to the top and shift back, extending the sign
        return ((nibbles << 4).view(torch.int8) >> 4).float()
    return _e2m1_values(codes.device)[nibbles.long()]


# -----------------------------------------------------------------------------
# Public quantizer functions

def compute_scale(x, f):
    """float32 absmax / rho per row (last dim) or per tensor; never 0, so an all-zero row stays 0/1 = 0."""
    amax = x.abs().amax(dim=-1, keepdim=True) if f.per_row else x.abs().amax().reshape([1] * x.dim())
    return (amax / f.max).clamp_min(torch.finfo(torch.float32).tiny)


def compute_block_scales(x, f):
    """The BlockScales of float32 x [..., n] in block format f (the module docstring): each block's scale rounded
    up, so that amax(block) <= 6 s and no value is clipped; the last block of a row zero-padded."""
    amax = _blocks(x.abs(), f.block).amax(dim=-1)  # [..., n_blocks]
    if f.tensor_scale:  # nvfp4: E4M3 block scales under a float32 tensor scale
        e4m3 = FORMATS["fp8_e4m3"]
        tensor = (amax.amax() / (f.max * e4m3.max)).clamp_min(torch.finfo(torch.float32).tiny)  # max|x|
        y = amax / (f.max * tensor)
        step = grid_step(y, e4m3)
        block = (torch.ceil(y / step) * step).clamp(2.0 ** (e4m3.min_exponent - e4m3.mantissa_bits), e4m3.max)
        return BlockScales(block.to(e4m3.dtype), tensor)  # exact: a value of the E4M3 grid
    # mxfp4: with amax = m 2^e (frexp, m in [0.5, 1)), 6 x 2^(e-3) = 0.75 x 2^e >= amax exactly when m <= 0.75,
    # and 6 x 2^(e-4) < 0.5 x 2^e <= amax: the smallest power of two is 2^(e-3) if m <= 0.75, else 2^(e-2)
    mantissa, exponent = torch.frexp(amax)
    exponent = exponent - 3 + (mantissa > 0.75).int()
    exponent = torch.where(amax > 0, exponent, -126).clamp(-126, 127)  # an all-zero block: the smallest scale
    return BlockScales((exponent + 127).to(torch.uint8))


def block_scale_values(scales, fmt):
    """The float32 scale s of every block [..., n_blocks] of a block format's BlockScales: block * tensor (nvfp4),
    2^(byte - 127) (mxfp4)."""
    f = get_format(fmt)
    if f.tensor_scale:
        return scales.block.float() * scales.tensor
    return (scales.block.to(torch.int32) << 23).view(torch.float32)  # E8M0's biased exponent is float32's


def _per_value(block_scales, block, n):
    """Block scales [..., n_blocks] -> one per value [..., n]: each repeated over its block."""
    return block_scales.repeat_interleave(block, dim=-1)[..., :n]


def quantize(x, fmt, rounding="nearest", generator=None, check=True):
    """x (any float dtype) -> (codes in the format's storage dtype, float32 scale broadcastable to codes), or for
    a block format (packed codes, BlockScales). check=False skips the NaN/Inf test, which costs a device-to-host
    sync on a GPU: only for activations, where a NaN reaches the loss (and train.py stops) before it could reach
    a stored weight."""
    f = get_format(fmt)
    check_rounding(rounding)
    check_shape(x.shape, f)
    x = x.float()  # first: a float64 1e39 is finite, its float32 value is not
    if check:
        check_finite(x, "quantize input")
        if f.block and not f.tensor_scale and x.numel() and x.abs().amax() > MXFP4_LIMIT:
            raise ValueError(f"{fmt} cannot hold |x| = {x.abs().amax().item():.4g}: its largest scale, 2^127, would "
                             f"store it as inf; accepted: |x| <= 3 x 2^126 = {MXFP4_LIMIT:.4g} (or nvfp4)")
    if f.block:
        scale = compute_block_scales(x, f)
        y = x / _per_value(block_scale_values(scale, fmt), f.block, x.shape[-1])
    else:
        scale = compute_scale(x, f)
        y = x / scale
    values = round_to_grid(y, f, rounding, generator)
    codes = pack(values, fmt) if f.packed else values.to(f.dtype)  # the grid value is exact in f.dtype
    return codes, scale


def dequantize(codes, scale, fmt):
    f = get_format(fmt)
    values = unpack(codes, fmt) if f.packed else codes.float()
    if f.block:
        return values * _per_value(block_scale_values(scale, fmt), f.block, values.shape[-1])
    return values * scale


def quantize_dequantize(x, fmt, rounding="nearest", generator=None):
    """The value on the grid, as float32: dequantize(*quantize(x, ...))."""
    return dequantize(*quantize(x, fmt, rounding, generator), fmt)


def store_(codes, scale, x, fmt, rounding="nearest", generator=None):
    """Quantize x into an existing (codes, scale) pair, in place; return the float32 grid value q(x).
    This is how an optimizer writes a new weight: the codes tensor is the model's parameter. A block format's
    scale is a BlockScales: its block scales and tensor scale are written in place."""
    if isinstance(scale, BlockScales) != bool(get_format(fmt).block):
        raise TypeError(f"fmt={fmt!r} takes {'a BlockScales' if get_format(fmt).block else 'a tensor'} as its scale, "
                        f"got {type(scale).__name__}")
    new_codes, new_scale = quantize(x, fmt, rounding, generator)
    codes.copy_(new_codes)
    if isinstance(scale, BlockScales):
        scale.block.copy_(new_scale.block)
        if scale.tensor is not None:
            scale.tensor.copy_(new_scale.tensor)
    else:
        scale.copy_(new_scale)
    return dequantize(new_codes, new_scale, fmt)


# -----------------------------------------------------------------------------
# Storage for an optimizer's moments: one scale per block of a row, and bfloat16 with stochastic rounding

def _blocks(x, block):
    """[..., n] -> [..., n_blocks, block], zero-padding the last block of each row (zeros leave absmax as is)."""
    n_blocks = -(-x.shape[-1] // block)
    return F.pad(x, (0, n_blocks * block - x.shape[-1])).view(*x.shape[:-1], n_blocks, block)


def quantize_blocks(x, fmt, block, rounding="nearest", generator=None):
    """One scale per block of `block` consecutive values in each row: exactly the per-row quantizer above
    applied to x reshaped to [..., n_blocks, block]. Returns codes shaped like x and float32 scales
    [..., n_blocks]. Smaller blocks follow the data more closely; each costs 4 bytes of scale."""
    f = get_format(fmt)
    if not f.per_row:
        raise ValueError(f"fmt={fmt!r} has one scale per tensor; block scales need a row-wise format: "
                         f"{[n for n, g in FORMATS.items() if g.per_row]}")
    codes, scale = quantize(_blocks(x.float(), block), fmt, rounding, generator)
    n = x.shape[-1]
    return codes.view(*x.shape[:-1], -1)[..., :n].contiguous(), scale.squeeze(-1)


def dequantize_blocks(codes, scale, fmt, block):
    n = codes.shape[-1]
    return (dequantize(_blocks(codes.float(), block), scale.unsqueeze(-1), fmt)).view(*codes.shape[:-1], -1)[..., :n]


def round_to_bfloat16(x, rounding="nearest", generator=None):
    """float32 -> bfloat16 (8 bits of mantissa: bfloat16 is float32 with the low 16 bits cut off).
    Stochastic rounding, exactly: add a uniform 16-bit integer to the float32 bit pattern and truncate. The
    carry reaches the kept bits with probability (the cut-off part) / 2^16, i.e. x rounds away from zero with
    probability proportional to its distance from the lower-magnitude neighbour; a carry into the exponent is
    the next binade's first value, as it should be. Unbiased for any finite x that does not overflow."""
    check_rounding(rounding)
    x = x.float()
    if rounding == "nearest":
        return x.to(torch.bfloat16)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: on the grid


def codes_moved(before, after, fmt):
    """How many values of a weight changed code between two copies of its codes. FP8 compares bytes (it has no
    != on every device); packed 4-bit formats compare values: two per byte, and E2M1's -0 equals +0 (round-to-
    nearest gives -0 to small negative values: a sign flip at zero moves nothing)."""
    if get_format(fmt).packed:
        return (unpack(before, fmt) != unpack(after, fmt)).sum()
    return (before.view(torch.uint8) != after.view(torch.uint8)).sum()


def quantize_activations(x, fmt="fp8_e4m3"):
    """Row-wise (per token) round-to-nearest in the forward pass; identity in the backward (straight-through).
    (x - x.detach()) is exactly zero, so the value is exactly the grid value and the gradient is exactly dy."""
    return dequantize(*quantize(x.detach(), fmt, check=False), fmt) + (x - x.detach())


# -----------------------------------------------------------------------------
# The FP8 matmul straight from the codes (torch._scaled_mm), and which path a layer takes

MATMUL_PATHS = ("auto", "scaled_mm", "simulated")


def check_matmul_path(path):
    if path not in MATMUL_PATHS:
        raise ValueError(f"unknown matmul path {path!r}; accepted: {list(MATMUL_PATHS)}")


@functools.cache
def scaled_mm_available(device):
    """Whether torch._scaled_mm multiplies our operands on this torch.device: E4M3 codes with float32 row-wise
    scales, into float32. Asked once per device with a 16 x 16 product rather than read from a table: the
    answer depends on the GPU (CUDA compute capability 8.9+), the CUDA version and the torch version."""
    try:
        codes = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(codes, codes.t(), scale_a=torch.ones(16, 1, device=device),
                             scale_b=torch.ones(1, 16, device=device), out_dtype=torch.float32)
    except Exception:  # no such op in this torch, no such device here, or not on this one: the answer is no
        return False
    return bool((y == 16).all())


def matmul_path(device, path="auto"):
    """The path an FP8 weight set to `path` runs on `device`: "auto" is "scaled_mm" on a CUDA GPU that has it
    and "simulated" everywhere else (the CPU included, so that CPU results do not change); the others as given."""
    check_matmul_path(path)
    if path != "auto":
        return path
    device = torch.device(device)
    return "scaled_mm" if device.type == "cuda" and scaled_mm_available(device) else "simulated"


def scaled_mm_takes(shape, device):
    """Whether torch._scaled_mm takes a weight [..., out, in] on this device: CUDA's kernels need in and out to be
    multiples of 16 (the codes are read in 16-byte rows); the CPU takes any shape. Others fall back to simulated."""
    return torch.device(device).type != "cuda" or (shape[-1] % 16 == 0 and shape[-2] % 16 == 0)


def fp8_matmul(x, codes, scale):
    """q(x) @ W^T on FP8 operands: x [..., in] rounded to E4M3 per token (round-to-nearest, the values
    quantize_activations gives), times the stored E4M3 codes [out, in] with their scales [out, 1]:
        y[t, o] = x_scale[t] * scale[o] * sum_i x_codes[t, i] * codes[o, i]      (summed in float32)
    Returns y [..., out] in float32, and the activation codes (N, in) and scales (N, 1) for the backward."""
    x_codes, x_scale = quantize(x.detach().reshape(-1, x.shape[-1]), "fp8_e4m3", check=False)  # (N, in), (N, 1)
    # codes.t() is [in, out] column-major, the layout _scaled_mm wants for its second operand: no copy
    y = torch._scaled_mm(x_codes, codes.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=torch.float32)
    return y.view(*x.shape[:-1], -1), x_codes, x_scale


class ScaledMatmul(torch.autograd.Function):
    """fp8_matmul forward; the simulated path's backward, from the saved codes (1 byte a value, no float copy):
    dW = dy^T q(x), handed to `accumulate` (main_grad), and dx = dy W, straight-through the activation rounding.
    `grad_trigger` is an empty tensor that requires grad: autograd calls backward only when an input does, and
    the weight gradient is needed even when x does not require grad (a first layer)."""

    @staticmethod
    def forward(ctx, x, codes, scale, accumulate, grad_trigger):
        y, x_codes, x_scale = fp8_matmul(x, codes, scale)
        ctx.save_for_backward(x_codes, x_scale, codes, scale)
        ctx.accumulate, ctx.x_shape = accumulate, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x_codes, x_scale, codes, scale = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])  # (N, out)
        ctx.accumulate(dy.t() @ dequantize(x_codes, x_scale, "fp8_e4m3"))  # (out, in)
        dx = (dy @ dequantize(codes, scale, "fp8_e4m3")).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None


# -----------------------------------------------------------------------------
# Modules that really store codes + scale

class QuantizedWeight(nn.Module):
    """A weight of any shape stored as codes (`weight`, 1 byte per value, or two per byte for the packed formats)
    and scales (`scale`: float32 per row or per tensor, or a block format's block scales, with its float32
    `tensor_scale` for nvfp4; None otherwise).

    There is no high-precision copy between steps. Calling the module multiplies: self(x) is x @ W^T, and
    self(x, e) uses expert e of a bank [E, out, in], on the path `matmul` picks. float_weight() is the
    simulated path's dequantized float32 weight for one forward pass. Either way the gradient is added (in
    float32) to `weight.main_grad`, which accumulates across micro-batches like `.grad` and is what eco.py's
    optimizers read. The codes parameter also carries `.fmt`, `.scale` (a BlockScales for block formats) and
    `.logical_shape` (the unpacked shape of the weight), so the optimizer can re-quantize it in place.
    """

    matmul = "auto"  # which FP8 matmul: "auto", "scaled_mm" or "simulated" (the file's docstring); see set_matmul_

    def __init__(self, shape, fmt="fp8_e4m3"):
        f = get_format(fmt)
        check_shape(shape, f)
        super().__init__()
        self.fmt, self.logical_shape = fmt, torch.Size(shape)
        codes_shape = (*shape[:-1], shape[-1] // 2) if f.packed else shape
        self.weight = nn.Parameter(torch.zeros(codes_shape, dtype=f.dtype), requires_grad=False)
        if f.block:  # the codes are zero: any scale gives the zero weight
            self.register_buffer("scale", torch.ones((*shape[:-1], -(-shape[-1] // f.block))).to(f.scale_dtype))
        else:
            self.register_buffer("scale", torch.ones((*shape[:-1], 1) if f.per_row else (1,) * len(shape)))
        self.register_buffer("tensor_scale", torch.ones(()) if f.tensor_scale else None)  # 0-dim: fits an expert too
        self._link()

    def _link(self):
        # The optimizer sees only the codes parameter: hang the format, the scales and the unpacked shape on it.
        # .to()/.cuda() replace buffers and deepcopy/pickle rebuild parameters without their attributes,
        # so _apply and __setstate__ below re-attach them.
        self.weight.fmt, self.weight.logical_shape = self.fmt, self.logical_shape
        self.weight.scale = BlockScales(self.scale, self.tensor_scale) if get_format(self.fmt).block else self.scale
        if not hasattr(self.weight, "main_grad"):
            self.weight.main_grad = None

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the codes and scales; a dtype conversion (.to(torch.bfloat16), .half(), .double())
        # must not touch them: bf16 "codes" would take 2 bytes and be no longer what the optimizer stores, and a
        # bf16 scale would round. So they keep their dtype, and the rest of a model converts as usual.
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)
        super()._apply(keep_dtype, *args, **kwargs)
        self._link()
        return self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._link()

    @torch.no_grad()
    def set_float_(self, w):
        """Store a float weight (round-to-nearest), e.g. when converting a trained model."""
        store_(self.weight, self.weight.scale, w, self.fmt, "nearest")
        return self

    def dequantized_weight(self):
        return dequantize(*self.codes_and_scale(), self.fmt)

    def codes_and_scale(self, expert=None):
        """The stored codes and scales: the whole weight's, or those of expert `expert` of a bank [E, out, in]
        (a scale per tensor, int4's or nvfp4's tensor scale, is the whole bank's)."""
        scale = self.weight.scale
        if expert is None:
            return self.weight, scale
        if isinstance(scale, BlockScales):
            return self.weight[expert], BlockScales(scale.block[expert], scale.tensor)
        return self.weight[expert], scale[expert] if get_format(self.fmt).per_row else scale[0]  # int4: [1, 1]

    def _accumulate_main_grad(self, grad, expert=None):
        if expert is not None:  # one expert of a bank: the others keep theirs (an idle expert's stays exactly 0)
            if self.weight.main_grad is None:
                self.weight.main_grad = torch.zeros(self.logical_shape, dtype=torch.float32, device=grad.device)
            self.weight.main_grad[expert].add_(grad)
        elif self.weight.main_grad is None:
            self.weight.main_grad = grad.float().clone()
        else:
            self.weight.main_grad.add_(grad)

    def float_weight(self, expert=None):
        # A fresh float32 leaf each forward: autograd computes its gradient even when the layer's input
        # does not require grad, and the hook moves that gradient to main_grad. The leaf is freed with
        # the graph after backward.
        w = dequantize(*self.codes_and_scale(expert), self.fmt).requires_grad_(True)
        if torch.is_grad_enabled():
            w.register_hook(functools.partial(self._accumulate_main_grad, expert=expert))
        return w

    def quantize_input(self, x):
        """The paper quantizes the activations entering an FP8 matmul too (per token, round-to-nearest)."""
        return quantize_activations(x, self.fmt) if self.fmt == "fp8_e4m3" else x

    def runs_scaled_mm(self):
        """Whether forward runs torch._scaled_mm on the codes: an fp8_e4m3 weight whose `matmul` resolves to
        scaled_mm on its device, in a shape that device takes. Otherwise it runs simulated."""
        return (self.fmt == "fp8_e4m3" and matmul_path(self.weight.device, self.matmul) == "scaled_mm"
                and scaled_mm_takes(self.weight.shape, self.weight.device))

    def forward(self, x, expert=None):
        """x @ W^T (W: the bank's expert `expert` if given), the activations rounded as the format asks."""
        if not self.runs_scaled_mm():
            return F.linear(self.quantize_input(x), self.float_weight(expert))
        accumulate = functools.partial(self._accumulate_main_grad, expert=expert)
        grad_trigger = torch.empty(0, device=x.device, requires_grad=True)
        return ScaledMatmul.apply(x, *self.codes_and_scale(expert), accumulate, grad_trigger)

    def extra_repr(self):
        return f"shape={tuple(self.logical_shape)}, fmt={self.fmt}"


class FloatWeight(nn.Module):
    """A plain float parameter behind the same call interface as QuantizedWeight, so that a layer using a
    raw weight tensor (the MoE's [E, out, in] expert banks) can be quantized by quantize_linears_."""

    def __init__(self, tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor)

    def forward(self, x, expert=None):
        return F.linear(x, self.weight if expert is None else self.weight[expert])


class QLinear(QuantizedWeight):
    """Drop-in for a bias-free nn.Linear(in_features, out_features) whose weight is stored quantized."""

    def __init__(self, in_features, out_features, fmt="fp8_e4m3"):
        super().__init__((out_features, in_features), fmt)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear, fmt="fp8_e4m3"):
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise TypeError(f"QLinear.from_linear needs a bias-free nn.Linear, got {linear!r}")
        q = cls(linear.in_features, linear.out_features, fmt).to(linear.weight.device)
        return q.set_float_(linear.weight.detach())


def quantize_linears_(model, fmt, include=None):
    """Swap, in place, every bias-free nn.Linear (or subclass that keeps Linear's forward) for a QLinear and
    every FloatWeight for a QuantizedWeight. include(name, module) -> bool picks which (e.g. only the
    transformer-block Linears). A module attached under several names is swapped at every name for one
    shared new module, and weights tied between swapped modules stay tied (one set of codes and scales).
    Everything is checked before the first swap. Returns the number of distinct weights quantized."""
    f = get_format(fmt)
    targets = {}  # id(module) -> (module, every name it is attached under)
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Linear, FloatWeight)) and (include is None or include(name, m)):
            targets.setdefault(id(m), (m, []))[1].append(name)
    for m, names in targets.values():
        if isinstance(m, nn.Linear) and m.bias is not None:
            raise ValueError(f"{names[0]}: a Linear with a bias; QLinear is bias-free (exclude it with include=)")
        if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
            raise TypeError(f"{names[0]}: {type(m).__name__} overrides nn.Linear.forward; QLinear would drop that "
                            "behaviour (exclude it with include=)")
        try:
            check_shape(m.weight.shape, f)
        except ValueError as err:
            raise ValueError(f"{names[0]}.weight: {err}") from None
    owners = {}  # id(weight) -> names of every module holding it, swapped or not
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    target_names = {n for _, names in targets.values() for n in names}
    for m, names in targets.values():
        outside = [n for n in owners[id(m.weight)] if n not in target_names]
        if outside:
            raise ValueError(f"{names[0]}.weight is shared with {outside}, which would stay in float: "
                             "quantize both or neither")
    swapped = {}  # id(old weight) -> new module, so tied weights stay tied
    for m, names in targets.values():
        if isinstance(m, nn.Linear):
            new = QLinear(m.in_features, m.out_features, fmt).to(m.weight.device)
        else:
            new = QuantizedWeight(tuple(m.weight.shape), fmt).to(m.weight.device)
        tied = swapped.get(id(m.weight))
        if tied is None:
            new.set_float_(m.weight.detach())
            swapped[id(m.weight)] = new
        else:  # share the codes parameter and the scale buffers with the first module that held this weight
            new.weight = tied.weight
            new.scale, new.tensor_scale = tied.scale, tied.tensor_scale
            new._link()
        for name in names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return len(swapped)


def matmul_paths(model):
    """How many quantized weights of the model run each matmul path where they are now, e.g. {"scaled_mm": 8}."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    paths = ["scaled_mm" if m.runs_scaled_mm() else "simulated" for m in weights]
    return {path: paths.count(path) for path in sorted(set(paths))}


def set_matmul_(model, path):
    """Set the matmul path ("auto", "scaled_mm" or "simulated") of every quantized weight of the model, in place.
    Returns matmul_paths(model): what runs on the model's device (set the path after moving the model)."""
    check_matmul_path(path)
    for m in model.modules():
        if isinstance(m, QuantizedWeight):
            m.matmul = path
    return matmul_paths(model)

"""
One fused Triton kernel for the ECO-AdamW step of one quantized weight: a single pass over memory.

The reference (ECOAdamW.step without the kernel: eco.load_moments, eco.eco_adamw_step with quant.store_,
eco.store_moments_) launches a few dozen PyTorch kernels per tensor, each reading and writing whole
float32 tensors. The step is element-wise except for the absmax reductions that set new scales (one per
row for the weight, one per block of 128 values for FP8 moments); if one program owns a whole row, they
happen in registers and every byte is touched once. Bytes per parameter, with bfloat16 gradients (a
float32 gradient, such as QuantizedWeight's main_grad, adds 2 B):

    moments  read                                      write                                 total
    fp32     codes 1 + grad 2 + m 4 + v 4       = 11   codes 1 + m 4 + v 4             =  9   20 B
    bf16     codes 1 + grad 2 + m 2 + v 2       =  7   codes 1 + m 2 + v 2             =  5   12 B
    fp8      codes 1 + grad 2 + m 1 + sqrt(v) 1 =  5   codes 1 + m 1 + sqrt(v) 1       =  3    8 B
             plus two float32 scales per 128 values, read and written: 16 B / 128 = 0.125 B
    (and 8 B per row for the weight's scale, negligible)
    fused AdamW on a float32 master copy (what quantized training runs today; float32 gradients, as
    torch's fused AdamW requires): read master 4 + grad 4 + m 4 + v 4 = 16, write 12    -> 28 B
    and then a re-quantization of the master for the next forward (read 4, write 1).
So at equal bandwidth the fused ECO step should take 20/28 = 0.71 of AdamW's time with float32 moments,
12/28 = 0.43 with bfloat16 moments and 8.1/28 = 0.29 with FP8 moments, given bfloat16 gradients; ECOAdamW
passes QuantizedWeight's float32 main_grad, which makes it 22/28 = 0.79, 14/28 = 0.50 and 10.1/28 = 0.36.

How the moments are stored (MOMENTS, as eco.load_moments / eco.store_moments_). The kernel loads them
to float32, runs the float32 step, ECO's injection included, and stores them back in the same pass:
    fp32  float32, as the paper.
    bf16  bfloat16, which is float32 with the low 16 bits cut off: loading is exact.
    fp8   E4M3 codes of m and of sqrt(v) (sqrt halves the range of exponents 8 bits must cover), each
          with one float32 scale per block of eco.MOMENT_BLOCK = 128 consecutive values of a row (the
          last block of a row may be shorter). m = code * scale, v = (code * scale)^2. One program holds
          a whole row as BLOCK values, a multiple of 128, and computes the block scales by reshaping it
          to [BLOCK / 128, 128]: quant.quantize_blocks's reshape, in registers.
Compressed moments are written with stochastic rounding, never to nearest. An EMA moves by (1 - beta) of
its distance to the new value each step; when that is less than half a storage step, round-to-nearest
puts the old value back every time, and the moment freezes: naive RTN's stall, one level down.
Stochastic rounding keeps every update in expectation. bfloat16: add a uniform 16-bit integer to the
float32 bit pattern and clear the low 16 bits (quant.round_to_bfloat16). FP8: exactly on the E4M3 grid
(round_to_grid). Each row draws from three independent random streams (uniform): 0 for the weight,
1 for exp_avg, 2 for exp_avg_sq, so no random number decides two roundings.

The kernel reads function by function against the reference: small @triton.jit helpers named after the
functions they mirror (load_codes and load_moments, adamw_update; compute_scale, grid_step, round_to_grid
with round_nearest_even or round_stochastic; store_codes and store_moments_ with round_to_bfloat16 or
quantize_blocks; decode_fp8 and encode_fp8 for FP8 bytes; uniform for the random numbers), and a kernel
that calls them in ECOAdamW.step's order with the same variable names. Some details make it agree with the
PyTorch reference bit for bit:
  * PyTorch's CPU lerp_ and addcmul_ are fused multiply-adds; we write the same tl.fma, use IEEE
    division and sqrt (div_rn, sqrt_rn), and compile without FMA contraction elsewhere. Every scalar
    (1 - lr * weight_decay, -lr / bc1, math.sqrt(bc2), ...) is computed on the host in float64 and
    rounded once to float32, as PyTorch rounds a Python number it applies to a float32 tensor. Against
    the CPU reference (CI, through the interpreter) codes, scales and float32 moments are identical,
    given a correctly rounded sqrt: sqrt_rn is one, and so is PyTorch's on CUDA, but not its float32
    sqrt on the CPU in every build (one result in five an ulp off), which moves denom, and through it
    exp_avg, by an ulp. PyTorch's CUDA kernels round a few operations differently (division by a
    scalar, where FMAs are contracted), so on a GPU theta can differ from the reference in its last
    bit; a code sitting exactly on a rounding boundary then differs by one grid step (rare: about one
    RTN code in a million).
  * Round-to-nearest keeps the sign of zero: a negative value that rounds to 0 gets the code -0 (0x80
    in E4M3), as torch.round and the cast to float8 give it.
  * All rounding is done in float32 arithmetic, and nothing is cast to float8: FP8 codes (the weights' and
    fp8 moments') travel as bytes, which the kernel decodes and encodes with integer operations (decode_fp8,
    encode_fp8; exact for every finite code and every grid value, -0.0 and subnormals included). So one
    kernel serves every GPU: Triton has float8e4nv only from compute capability 8.9, and its interpreter,
    which CI uses, rounds casts to float8e4nv wrongly when the rounding carries into the exponent (0.4856
    became 0.25 instead of 0.5). fusable says which GPUs (CAPABILITIES) it compiles for; tests/test_kernels.py
    compiles it for each of them, on the CPU.
Which weights: the row-wise formats (fp8_e4m3, fp8_e5m2, int8), the ones with one scale per row that one program
owns. int4's one scale per tensor needs a pass over every row before any code is written, and nvfp4 / mxfp4 keep
packed 4-bit codes under block scales (and nvfp4 a tensor scale too); fusable says no for them, and ECOAdamW steps
them on the reference path (as it steps ECOMuon's Muon matrices, whose Newton-Schulz is a matmul, not a map).
Stochastic rounding draws 24-bit uniforms from Philox keyed by a seed, with a counter per (row, element,
stream) so that no two rows, and no two streams, share a random number (see uniform); ECOAdamW derives a
fresh seed from (its seed, step, tensor), so runs are reproducible.

Run `python kernels.py`: on a GPU, a correctness check for every moments storage and a benchmark (time
per step and bandwidth of the fused kernel, the eager reference and the compiled reference for each
storage, each against a plain copy of the same bytes, and torch's fused AdamW on a float32 master copy).
Without a GPU, the correctness check runs in Triton's interpreter and the timings are skipped.
"""
import math
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton
import triton.language as tl

import quant

MAX_ROW = 16384  # longest row one program handles (rows are kept whole in registers)
MOMENTS = ("fp32", "bf16", "fp8")  # the moments' storages the kernel handles (eco.py's, all of them)
# The GPUs, by compute capability (major, minor), the kernel is sent to: Turing and newer, each compiled for in
# tests/test_kernels.py. The format and the moments' storage do not matter: FP8 travels as bytes, and before 8.0
# Triton emulates bfloat16's conversions. Measured by compiling: every GPU Triton 3.9's LLVM and ptxas know
# compiles, Maxwell to Blackwell, except 8.8 (Triton emits too old a PTX version for it) and 10.1 (Jetson Thor
# under CUDA 12; CUDA 13 calls it 11.0). Those, GPUs before Turing (which Triton and torch.compile no longer
# support) and any not listed take the reference path.
CAPABILITIES = ((7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0),  # Turing (T4), Ampere (A100, A10, RTX 30xx), Ada, Hopper
                (10, 0), (10, 3), (10, 7), (11, 0), (12, 0), (12, 1))  # Blackwell (B200, B300, Thor, RTX 50xx)


# -----------------------------------------------------------------------------
# The reference's functions (eco.py, quant.py), one @triton.jit helper each, on blocks held in registers

@triton.jit
def adamw_update(weight, grad, exp_avg, exp_avg_sq, decay, lerp_weight, beta2, sq_weight, sqrt_bc2, eps, step_size):
    """eco.adamw_update, operation for operation. Its scalar expressions arrive computed by the wrapper:
    decay = 1 - lr * weight_decay, lerp_weight = 1 - beta1, sq_weight = 1 - beta2, sqrt_bc2 = math.sqrt(bc2),
    step_size = -lr / bc1. Returns (theta, denom, exp_avg, exp_avg_sq)."""
    theta = weight * decay
    exp_avg = tl.fma(lerp_weight, grad - exp_avg, exp_avg)  # exp_avg.lerp_(grad, 1 - beta1), for beta1 > 0.5
    exp_avg_sq = tl.fma(sq_weight * grad, grad, exp_avg_sq * beta2)  # .mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), sqrt_bc2) + eps  # (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    theta = theta + tl.div_rn(step_size * exp_avg, denom)  # theta.addcdiv_(exp_avg, denom, value=-lr / bc1)
    return theta, denom, exp_avg, exp_avg_sq


@triton.jit
def compute_scale(x, mask, RHO: tl.constexpr):
    """quant.compute_scale: absmax / rho over the last axis (a row, or blocks of one after a reshape),
    never below float32's smallest normal; entries outside `mask` do not count."""
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=-1)
    return tl.maximum(tl.div_rn(amax, RHO), 1.1754943508222875e-38)  # clamp_min(float32 tiny)


@triton.jit
def grid_step(y, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """quant.grid_step: the grid's spacing around y, 2^(max(floor(log2|y|), MIN_EXPONENT) - MANTISSA_BITS),
    read off y's float32 exponent bits; 1 for integer formats (MANTISSA_BITS None)."""
    if MANTISSA_BITS is None:
        step = tl.full(y.shape, 1.0, tl.float32)
    else:
        tl.static_assert(MIN_EXPONENT - MANTISSA_BITS >= -126, "the spacing must be a normal float32")
        exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, MIN_EXPONENT)  # below the smallest normal the spacing stays fixed
        step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    return step


@triton.jit
def round_nearest_even(t):
    """torch.round: the nearest integer, ties to the even one (like the hardware cast to FP8), and a zero
    keeps t's sign: -0.3 rounds to -0.0, which becomes the FP8 code 0x80 as in the reference."""
    lo = tl.floor(t)
    frac = t - lo
    odd = (lo - 2.0 * tl.floor(lo * 0.5)) == 1.0
    k = lo + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)
    return tl.where(k == 0.0, t * 0.0, k)  # t * 0.0: a zero with t's sign


@triton.jit
def round_stochastic(t, u):
    """floor(t) + 1 with probability t - floor(t), given u uniform in [0, 1): unbiased, E = t."""
    lo = tl.floor(t)
    return lo + (u < t - lo).to(tl.float32)


@triton.jit
def round_to_grid(y, u, RHO: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """quant.round_to_grid for any tensor y already divided by its scale: stochastic with the uniforms u,
    or to nearest when u is None. Exact in float32; the result is a grid value, so storing it is exact
    (store_codes)."""
    y = tl.minimum(tl.maximum(y, -RHO), RHO)
    step = grid_step(y, MANTISSA_BITS, MIN_EXPONENT)
    t = y / step  # exact: step is a power of two. Grid points are the integers of t.
    if u is None:
        k = round_nearest_even(t)
    else:
        k = round_stochastic(t, u)
    return k * step


@triton.jit
def decode_fp8(byte, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """The float32 value of FP8 codes read as bytes (torch's .float() of a finite float8 code), with integer
    operations, so that no GPU needs a float8 type. A byte is sign | exponent field | MANTISSA_BITS mantissa
    bits, the exponent biased by 1 - MIN_EXPONENT (7 for E4M3, 15 for E5M2). A normal code keeps its
    exponent and mantissa bits, moved to float32's places and rebiased to 127; exponent field 0 is a
    subnormal, mantissa * 2^(MIN_EXPONENT - MANTISSA_BITS). The sign bit goes last: 0x80 is -0.0."""
    code = byte.to(tl.int32)
    magnitude = code & 0x7F
    normal = ((magnitude << (23 - MANTISSA_BITS)) + ((126 + MIN_EXPONENT) << 23)).to(tl.float32, bitcast=True)
    subnormal = magnitude.to(tl.float32) * 2.0 ** (MIN_EXPONENT - MANTISSA_BITS)  # exact: times a power of two
    x = tl.where(magnitude >= (1 << MANTISSA_BITS), normal, subnormal)  # exponent field > 0: normal
    return (x.to(tl.int32, bitcast=True) | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def encode_fp8(x, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """decode_fp8 backwards: the FP8 byte of float32 values x already on the format's grid (round_to_grid's
    output: within +-max, -0.0 and subnormals included), the byte that casting x to float8 gives. A normal x
    has only its top MANTISSA_BITS mantissa bits set, so its bits shifted right by 23 - MANTISSA_BITS, then
    rebiased, are exponent field | mantissa; a subnormal x is its mantissa times
    2^(MIN_EXPONENT - MANTISSA_BITS)."""
    bits = x.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF  # the bits of |x|
    normal = (magnitude >> (23 - MANTISSA_BITS)) - ((126 + MIN_EXPONENT) << MANTISSA_BITS)
    small = tl.minimum(tl.abs(x), 2.0 ** MIN_EXPONENT)  # normals capped, so the product below fits an int32
    subnormal = (small * 2.0 ** (MANTISSA_BITS - MIN_EXPONENT)).to(tl.int32)  # exact: an integer <= 2^M
    code = tl.where(magnitude >= ((127 + MIN_EXPONENT) << 23), normal, subnormal)  # |x| >= 2^MIN_EXPONENT: normal
    return (code | ((bits >> 24) & 0x80)).to(tl.uint8)  # the sign: bit 31 to bit 7


@triton.jit
def load_codes(ptrs, mask, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """codes.float() for the codes at ptrs: FP8 codes arrive as bytes (decode_fp8), integer codes
    (MANTISSA_BITS None) as themselves."""
    codes = tl.load(ptrs, mask=mask)
    if MANTISSA_BITS is None:
        x = codes.to(tl.float32)
    else:
        x = decode_fp8(codes, MANTISSA_BITS, MIN_EXPONENT)
    return x


@triton.jit
def store_codes(ptrs, x, mask, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """quant.quantize's x.to(f.dtype) for float32 grid values x, written to ptrs: exact, as bytes for FP8
    (encode_fp8), as a cast to the integer type otherwise (MANTISSA_BITS None)."""
    if MANTISSA_BITS is None:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, encode_fp8(x, MANTISSA_BITS, MIN_EXPONENT), mask=mask)


@triton.jit
def uniform(seed, row, stream, BLOCK: tl.constexpr):
    """BLOCK uniforms in [0, 1) for one row, 24 bits each like torch.rand, from Philox keyed by `seed`.

    Philox maps a 128-bit counter (c0, c1, c2, c3) to four 32-bit random numbers, a different four for
    every counter. Elements 4i ... 4i + 3 of row `row` take the four numbers of the counter
        (c0, c1) = row * (BLOCK / 4) + i as one 64-bit integer,   c2 = stream,   c3 = 0,
    with 0 <= i < BLOCK / 4, so every (row, element, stream) of a launch has its own counter: rows never
    share random numbers, and neither do streams (0 for the weights, 1 for exp_avg, 2 for exp_avg_sq: a
    moment rounded in the same kernel draws independently of the weights). With stream 0 this is
    tl.randint4x(seed, row * (BLOCK / 4) + i). A launch's numbers change with its seed only, which the
    optimizer derives from (its seed, step, tensor)."""
    group = row.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # (BLOCK/4,) one counter per 4 elements
    c0 = group.to(tl.uint32)  # low and high 32 bits
    c1 = (group >> 32).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + stream, zero)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])  # (BLOCK,) call i fills 4i..4i+3
    return (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)  # the top 24 bits, as torch.rand


@triton.jit
def round_to_bfloat16(x, u):
    """quant.round_to_bfloat16(x, "stochastic"): add a uniform 16-bit integer to x's float32 bit pattern and
    clear the low 16 bits. The carry reaches the kept bits with probability (the cut-off part) / 2^16, so x
    rounds away from zero with probability proportional to its distance from the lower-magnitude neighbour.
    The integer is the top 16 of u's 24 random bits (u * 2^16 is exact). Returns float32 values on the
    bfloat16 grid: the cast to bfloat16 is exact."""
    noise = (u * 65536.0).to(tl.int32)  # uniform in [0, 2^16)
    return ((x.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def dequantize_blocks(codes, scale, BLOCK: tl.constexpr, MOMENT_BLOCK: tl.constexpr):
    """quant.dequantize_blocks: codes (BLOCK,) as float32 times their block's scale, scale (BLOCK / MOMENT_BLOCK,)."""
    x = tl.reshape(codes, [BLOCK // MOMENT_BLOCK, MOMENT_BLOCK]) * scale[:, None]  # (blocks, MOMENT_BLOCK)
    return tl.reshape(x, [BLOCK])


@triton.jit
def quantize_blocks(x, mask, u, RHO: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                    BLOCK: tl.constexpr, MOMENT_BLOCK: tl.constexpr):
    """quant.quantize_blocks(x, fmt, MOMENT_BLOCK, "stochastic"): each block of MOMENT_BLOCK values of the row
    quantized like a row of its own, with the uniforms u; entries outside `mask` (the zero padding of the
    last block) do not count. Returns the codes as float32 grid values (BLOCK,) and the scales (blocks,)."""
    tl.static_assert(BLOCK % MOMENT_BLOCK == 0, "a row must split into whole blocks")
    x = tl.reshape(x, [BLOCK // MOMENT_BLOCK, MOMENT_BLOCK])  # (blocks, MOMENT_BLOCK)
    scale = compute_scale(x, tl.reshape(mask, [BLOCK // MOMENT_BLOCK, MOMENT_BLOCK]), RHO)  # (blocks,)
    codes = round_to_grid(tl.div_rn(x, scale[:, None]), tl.reshape(u, [BLOCK // MOMENT_BLOCK, MOMENT_BLOCK]),
                          RHO, MANTISSA_BITS, MIN_EXPONENT)
    return tl.reshape(codes, [BLOCK]), scale


@triton.jit
def load_moments(exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr, offs, mask, row, n_blocks,
                 MOMENTS: tl.constexpr, M_MANTISSA_BITS: tl.constexpr, M_MIN_EXPONENT: tl.constexpr,
                 V_MANTISSA_BITS: tl.constexpr, V_MIN_EXPONENT: tl.constexpr, BLOCK: tl.constexpr,
                 MOMENT_BLOCK: tl.constexpr):
    """eco.load_moments: (exp_avg, exp_avg_sq) of one row as float32, from their storage. M_* is exp_avg's
    FP8 format, V_* sqrt(exp_avg_sq)'s."""
    if MOMENTS == "fp8":  # codes of m and of sqrt(v), as bytes: times their block's scale
        blocks = tl.arange(0, BLOCK // MOMENT_BLOCK)
        block_offs, block_mask = row.to(tl.int64) * n_blocks + blocks, blocks < n_blocks
        exp_avg = dequantize_blocks(load_codes(exp_avg_ptr + offs, mask, M_MANTISSA_BITS, M_MIN_EXPONENT),
                                    tl.load(exp_avg_scale_ptr + block_offs, mask=block_mask, other=0),
                                    BLOCK, MOMENT_BLOCK)
        sqrt_v = dequantize_blocks(load_codes(exp_avg_sq_ptr + offs, mask, V_MANTISSA_BITS, V_MIN_EXPONENT),
                                   tl.load(exp_avg_sq_scale_ptr + block_offs, mask=block_mask, other=0),
                                   BLOCK, MOMENT_BLOCK)
        exp_avg_sq = sqrt_v * sqrt_v
    else:
        exp_avg = tl.load(exp_avg_ptr + offs, mask=mask).to(tl.float32)  # fp32, or an exact cast from bf16
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask).to(tl.float32)
    return exp_avg, exp_avg_sq


@triton.jit
def store_moments_(exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr, exp_avg, exp_avg_sq,
                   offs, mask, row, n_blocks, seed, MOMENTS: tl.constexpr,
                   M_RHO: tl.constexpr, M_MANTISSA_BITS: tl.constexpr, M_MIN_EXPONENT: tl.constexpr,
                   V_RHO: tl.constexpr, V_MANTISSA_BITS: tl.constexpr, V_MIN_EXPONENT: tl.constexpr,
                   BLOCK: tl.constexpr, MOMENT_BLOCK: tl.constexpr):
    """eco.store_moments_: write one row's float32 moments into their storage, with stochastic rounding from
    the streams 1 (exp_avg) and 2 (exp_avg_sq). M_* is exp_avg's FP8 format, V_* sqrt(exp_avg_sq)'s."""
    if MOMENTS == "bf16":
        exp_avg = round_to_bfloat16(exp_avg, uniform(seed, row, 1, BLOCK))
        exp_avg_sq = round_to_bfloat16(exp_avg_sq, uniform(seed, row, 2, BLOCK))
    if MOMENTS == "fp8":
        exp_avg, exp_avg_scale = quantize_blocks(exp_avg, mask, uniform(seed, row, 1, BLOCK),
                                                 M_RHO, M_MANTISSA_BITS, M_MIN_EXPONENT, BLOCK, MOMENT_BLOCK)
        sqrt_v = tl.sqrt_rn(exp_avg_sq)
        exp_avg_sq, exp_avg_sq_scale = quantize_blocks(sqrt_v, mask, uniform(seed, row, 2, BLOCK),
                                                       V_RHO, V_MANTISSA_BITS, V_MIN_EXPONENT, BLOCK, MOMENT_BLOCK)
        smallest = grid_step(sqrt_v * 0.0, V_MANTISSA_BITS, V_MIN_EXPONENT)  # the smallest positive code
        exp_avg_sq = tl.where((exp_avg_sq == 0) & (sqrt_v > 0), smallest, exp_avg_sq)  # never a positive as 0
        blocks = tl.arange(0, BLOCK // MOMENT_BLOCK)
        block_offs, block_mask = row.to(tl.int64) * n_blocks + blocks, blocks < n_blocks
        tl.store(exp_avg_scale_ptr + block_offs, exp_avg_scale, mask=block_mask)
        tl.store(exp_avg_sq_scale_ptr + block_offs, exp_avg_sq_scale, mask=block_mask)
        store_codes(exp_avg_ptr + offs, exp_avg, mask, M_MANTISSA_BITS, M_MIN_EXPONENT)  # as bytes
        store_codes(exp_avg_sq_ptr + offs, exp_avg_sq, mask, V_MANTISSA_BITS, V_MIN_EXPONENT)
    else:  # float32, or float32 values on the bfloat16 grid: the cast is exact
        tl.store(exp_avg_ptr + offs, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


# -----------------------------------------------------------------------------
# The kernel: one program per row, reading like ECOAdamW.step (load_moments, eco_adamw_step, store_moments_)

@triton.jit
def _eco_adamw_kernel(codes_ptr, scale_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr,
                      exp_avg_sq_scale_ptr, n_cols, n_blocks,
                      decay, lerp_weight, beta2, sq_weight, sqrt_bc2, eps, step_size, alpha, seed,
                      RHO: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                      STOCHASTIC: tl.constexpr, INJECT: tl.constexpr, MOMENTS: tl.constexpr,
                      M_RHO: tl.constexpr, M_MANTISSA_BITS: tl.constexpr, M_MIN_EXPONENT: tl.constexpr,
                      V_RHO: tl.constexpr, V_MANTISSA_BITS: tl.constexpr, V_MIN_EXPONENT: tl.constexpr,
                      MOMENT_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    # load: the stored weight (dequantized), the gradient, the two moments, all as float32
    weight = load_codes(codes_ptr + offs, mask, MANTISSA_BITS, MIN_EXPONENT) * tl.load(scale_ptr + row)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0).to(tl.float32)
    exp_avg, exp_avg_sq = load_moments(exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
                                       offs, mask, row, n_blocks, MOMENTS, M_MANTISSA_BITS, M_MIN_EXPONENT,
                                       V_MANTISSA_BITS, V_MIN_EXPONENT, BLOCK, MOMENT_BLOCK)

    theta, denom, exp_avg, exp_avg_sq = adamw_update(weight, grad, exp_avg, exp_avg_sq,
                                                     decay, lerp_weight, beta2, sq_weight, sqrt_bc2, eps, step_size)
    # quant.quantize: a new scale from this row's absmax, then onto the grid
    scale = compute_scale(theta, mask, RHO)
    u = uniform(seed, row, 0, BLOCK) if STOCHASTIC else None  # stream 0: the weights; None: to nearest
    codes = round_to_grid(tl.div_rn(theta, scale), u, RHO, MANTISSA_BITS, MIN_EXPONENT)
    new_weight = codes * scale

    if INJECT:  # eco.eco_adamw_step: the rounding error goes into the momentum
        error = theta - new_weight
        exp_avg = tl.fma(alpha * error, denom, exp_avg)  # exp_avg.addcmul_(error, denom, value=alpha)

    store_codes(codes_ptr + offs, codes, mask, MANTISSA_BITS, MIN_EXPONENT)
    tl.store(scale_ptr + row, scale)
    store_moments_(exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr, exp_avg, exp_avg_sq,
                   offs, mask, row, n_blocks, seed, MOMENTS, M_RHO, M_MANTISSA_BITS, M_MIN_EXPONENT,
                   V_RHO, V_MANTISSA_BITS, V_MIN_EXPONENT, BLOCK, MOMENT_BLOCK)


def fusable(fmt, moments, capability):
    """Whether this kernel can step a weight of format `fmt` (a quant.FORMATS name) whose moments are stored as
    `moments` ('fp32', 'bf16', 'fp8') on a GPU of compute `capability` (major, minor), or in Triton's interpreter
    (None: CPU tensors, no architecture). ECOAdamW asks for each tensor and sends a False down the reference
    path. Needs no GPU."""
    return (quant.get_format(fmt).per_row and moments in MOMENTS
            and (capability is None or tuple(capability) in CAPABILITIES))


def eco_adamw_fused_(codes, scale, grad, exp_avg, exp_avg_sq, exp_avg_scale=None, exp_avg_sq_scale=None, *,
                     moments="fp32", fmt, step, lr, beta1, beta2, eps, weight_decay, rounding, seed, next_lr=None):
    """One ECO-AdamW step on one quantized tensor, in place: codes, scale and the moments in their storage.
    The moment tensors are eco.MOMENT_KEYS[moments], in that order: exp_avg, exp_avg_sq (fp32 or bf16), or
    for fp8 the codes of m and of sqrt(v) and their float32 block scales [..., n_blocks]. rounding is the
    weights' ('nearest' or 'stochastic'); compressed moments are always rounded stochastically. next_lr: see
    eco.injection_coefficient. Row-wise formats only (fp8_e4m3, fp8_e5m2, int8): a per-tensor scale (int4, and
    nvfp4's tensor scale) needs a pass over all rows first, and packed or block-scaled codes are not what it
    loads (nvfp4, mxfp4); on CUDA, the GPUs in CAPABILITIES. Every check runs before the launch."""
    import eco  # here, not at the top of the file: eco imports kernels
    f = quant.get_format(fmt)
    quant.check_rounding(rounding)
    if moments not in MOMENTS:
        raise ValueError(f"unknown moments {moments!r}; accepted: {list(MOMENTS)}")
    if not f.per_row:
        scaling = f"one scale per block of {f.block} values" if f.block else "one scale per tensor"
        raise ValueError(f"fmt={fmt!r} has {scaling}; the fused kernel accepts row-wise formats: "
                         f"{[n for n, g in quant.FORMATS.items() if g.per_row]}")
    capability = torch.cuda.get_device_capability(codes.device) if codes.is_cuda else None  # None: the interpreter
    if not fusable(fmt, moments, capability):  # format and moments are accepted: the GPU is not
        raise ValueError(f"the fused kernel does not compile for this GPU, compute capability {capability}; "
                         f"accepted: {list(CAPABILITIES)}")
    n_cols = codes.shape[-1]
    if n_cols > MAX_ROW:
        raise ValueError(f"row length {n_cols} exceeds the fused kernel's limit of {MAX_ROW}")
    n_rows = codes.numel() // n_cols  # [E, out, in] expert banks count as E*out rows
    m_fmt, v_fmt = (quant.FORMATS[eco.MOMENT_FP8[key]] for key in ("exp_avg", "exp_avg_sq_sqrt"))
    moment_dtypes = dict(fp32=(torch.float32,) * 2, bf16=(torch.bfloat16,) * 2, fp8=(m_fmt.dtype, v_fmt.dtype))[moments]
    if codes.dtype != f.dtype or scale.dtype != torch.float32 or scale.numel() != n_rows:
        raise TypeError(f"expected codes {f.dtype} and one float32 scale per row ({n_rows}), got {codes.dtype} and "
                        f"{scale.dtype} {tuple(scale.shape)}")
    if (exp_avg.dtype, exp_avg_sq.dtype) != moment_dtypes:
        raise TypeError(f"moments={moments!r} stores exp_avg, exp_avg_sq as {moment_dtypes}, got {exp_avg.dtype}, "
                        f"{exp_avg_sq.dtype}")
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grad must be float32/bfloat16/float16, got {grad.dtype}")
    for name, t in dict(grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq).items():
        if t.shape != codes.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected the codes' {tuple(codes.shape)}")
    n_blocks = -(-n_cols // eco.MOMENT_BLOCK)  # fp8: scales per row
    scales = dict(exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale)
    for name, t in scales.items():
        if moments != "fp8" and t is not None:
            raise ValueError(f"{name} given with moments={moments!r}; block scales belong to moments='fp8'")
        if moments == "fp8" and t is None:
            raise ValueError(f"moments='fp8' needs {name}: one float32 scale per block of {eco.MOMENT_BLOCK} values "
                             f"of a row, shape {(*codes.shape[:-1], n_blocks)}")
        if moments == "fp8" and (t.dtype != torch.float32 or t.shape != (*codes.shape[:-1], n_blocks)):
            raise TypeError(f"{name} must be float32 of shape {(*codes.shape[:-1], n_blocks)}, got {t.dtype} "
                            f"{tuple(t.shape)}")
    for name, t in dict(codes=codes, scale=scale, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, **scales).items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")

    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    alpha = eco.injection_coefficient(lr, weight_decay, beta1, bc1, next_lr, 1 - beta1 ** (step + 1))
    BLOCK = max(eco.MOMENT_BLOCK if moments == "fp8" else 4, triton.next_power_of_2(n_cols))  # fp8: whole blocks
    # FP8 codes travel as bytes, which every GPU loads and stores (Triton's float8e4nv needs sm_89); the kernel
    # decodes and encodes them itself (decode_fp8, encode_fp8).
    fp8_dtypes = {g.dtype for g in quant.FORMATS.values() if g.dtype.is_floating_point}  # (FP4 codes are uint8)
    as_bytes = lambda t: t.view(torch.uint8) if t.dtype in fp8_dtypes else t
    # The scalars as eco.adamw_update writes them, here in float64; the kernel gets each rounded once to float32.
    _eco_adamw_kernel[(n_rows,)](
        as_bytes(codes), scale, grad, as_bytes(exp_avg), as_bytes(exp_avg_sq), exp_avg_scale, exp_avg_sq_scale,
        n_cols, n_blocks,
        1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, math.sqrt(bc2), eps, -lr / bc1, alpha, seed,
        RHO=f.max, MANTISSA_BITS=f.mantissa_bits, MIN_EXPONENT=f.min_exponent,
        STOCHASTIC=rounding == "stochastic", INJECT=alpha != 0.0, MOMENTS=moments,
        M_RHO=m_fmt.max, M_MANTISSA_BITS=m_fmt.mantissa_bits, M_MIN_EXPONENT=m_fmt.min_exponent,
        V_RHO=v_fmt.max, V_MANTISSA_BITS=v_fmt.mantissa_bits, V_MIN_EXPONENT=v_fmt.min_exponent,
        MOMENT_BLOCK=eco.MOMENT_BLOCK, BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)), enable_fp_fusion=False)


# -----------------------------------------------------------------------------
# Correctness check and benchmark (python kernels.py)

def reference_step_(codes, scale, grad, exp_avg, exp_avg_sq, exp_avg_scale=None, exp_avg_sq_scale=None, *,
                    moments="fp32", fmt, rounding="nearest", generator=None, next_lr=None, **hyper):
    """The PyTorch reference with the fused kernel's interface: the optimizer's own code path (ECOAdamW.step
    without the kernel). Random numbers come from `generator`, not from a seed."""
    import eco  # kernels never imports eco at module level: eco imports kernels
    tensors = (exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale)
    state = dict(zip(eco.MOMENT_KEYS[moments], tensors))  # the optimizer state these tensors would be
    m, v = eco.load_moments(state)  # float32
    store = lambda theta: quant.store_(codes, scale, theta, fmt, rounding, generator)
    eco.eco_adamw_step(quant.dequantize(codes, scale, fmt), grad, m, v, **hyper, next_lr=next_lr, quantize=store)
    eco.store_moments_(state, m, v, generator)


def make_inputs(shape, fmt, device, grad_dtype=torch.float32, seed=0, moments="fp32"):
    """Random kernel inputs: codes, scale, grad, and the moments as eco.MOMENT_KEYS[moments] (stored from
    float32 moments with stochastic rounding, as the optimizer would have written them)."""
    import eco
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(shape, generator=g, device=device) * 0.02
    codes, scale = quant.quantize(w, fmt)
    grad = (torch.randn(shape, generator=g, device=device) * 1e-3).to(grad_dtype)
    exp_avg = torch.randn(shape, generator=g, device=device) * 1e-3
    exp_avg_sq = torch.rand(shape, generator=g, device=device) * 1e-6
    state = dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq) if moments == "fp32" else eco.init_moments(exp_avg, moments)
    eco.store_moments_(state, exp_avg, exp_avg_sq, g)  # fp32: nothing to do
    return [codes, scale, grad, *(state[key] for key in eco.MOMENT_KEYS[moments])]


HYPER = dict(step=10, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.1)


def check(device, shape=(64, 1000)):
    """The kernel against the reference for every weight format, moments storage and rounding. Round-to-nearest:
    the share of codes identical to the reference's, whether the scales are equal, and how far each one's stored
    moments are from the float32 moments of the same step (compressed moments: kernel and reference draw different
    random numbers, so the two distances should be alike, not equal). Stochastic rounding: the share of codes that
    are one of the two grid neighbours of theta / scale, and their mean error in grid steps (unbiased: about 0,
    within a few times 0.29 / sqrt(number of values))."""
    import eco
    rel = lambda x, y: ((x - y).norm() / y.norm()).item()
    for fmt in ("fp8_e4m3", "fp8_e5m2", "int8"):
        f = quant.FORMATS[fmt]
        for moments in MOMENTS:
            load = lambda t: eco.load_moments(dict(zip(eco.MOMENT_KEYS[moments], t[3:])))  # float32 (m, v)
            a = make_inputs(shape, fmt, device, moments=moments)
            b, sr = [t.clone() for t in a], [t.clone() for t in a]
            exact = [t.clone() for t in (*a[:3], *load(a))]
            eco_adamw_fused_(*a, moments=moments, fmt=fmt, **HYPER, rounding="nearest", seed=0)
            reference_step_(*b, moments=moments, fmt=fmt, **HYPER)
            theta, _ = eco.adamw_update(quant.dequantize(*exact[:2], fmt), exact[2], *(t.clone() for t in exact[3:]),
                                        **HYPER)  # this step's float32 weight, before rounding
            reference_step_(*exact, fmt=fmt, **HYPER)  # the same step with float32 moments
            same = (a[0].float() == b[0].float()).float().mean().item()
            (m_a, v_a), (m_b, v_b) = load(a), load(b)
            print(f"check {fmt:9s} moments={moments:4s} {tuple(shape)} on {device}: RTN codes identical {same:.6%}, "
                  f"scales equal {torch.equal(a[1], b[1])}; m, v vs float32: kernel {rel(m_a, exact[3]):.1e} "
                  f"{rel(v_a, exact[4]):.1e}, reference {rel(m_b, exact[3]):.1e} {rel(v_b, exact[4]):.1e}")
            eco_adamw_fused_(*sr, moments=moments, fmt=fmt, **HYPER, rounding="stochastic", seed=1)
            y = (theta / sr[1]).clamp(-f.max, f.max)  # in grid units of the new scale (the same as RTN's)
            step = quant.grid_step(y, f)
            lo, hi = torch.floor(y / step) * step, torch.ceil(y / step) * step
            codes = sr[0].float()
            print(f"      {'':9s} {'':12s} {'':{len(str(tuple(shape))) + len(device) + 4}s}  SR codes on a neighbour "
                  f"{((codes == lo) | (codes == hi)).float().mean().item():.6%}, mean error "
                  f"{((codes - y) / step).mean().item():+.4f} grid steps (n = {y.numel()})")


def benchmark():
    print(f"benchmark on {torch.cuda.get_device_name()}: fp8_e4m3 weights in rows of 4096, bfloat16 gradients "
          f"(AdamW: float32), median times")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms

    def copy_ms(nbytes):  # a plain copy that reads and writes nbytes in all: the bandwidth limit
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return bench(lambda: dst.copy_(src))

    print(f"{'params':>7} {'moments':<12} {'what':<34} {'ms/step':>8} {'GB/s':>7} {'BW/copy':>8} {'time/AdamW':>10}")
    for n in (1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28):
        shape = (n // 4096, 4096)
        master = torch.nn.Parameter(torch.randn(shape, device="cuda") * 0.02)
        master.grad = torch.randn_like(master) * 1e-3
        adamw = torch.optim.AdamW([master], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, fused=True)
        adamw_ms = bench(adamw.step)
        groups = [("fp32 master", n * 28, [("torch AdamW(fused=True)", adamw_ms)])]  # (moments, bytes, rows)
        del master, adamw
        for moments in MOMENTS:
            codes, scale, grad, *state = make_inputs(shape, "fp8_e4m3", "cuda", torch.bfloat16, moments=moments)
            tensors = (codes, scale, grad, *state)
            nbytes = 2 * sum(t.nbytes for t in tensors) - grad.nbytes  # each read and written, but grad only read
            args = dict(moments=moments, fmt="fp8_e4m3", **HYPER)
            rows = [(f"fused ECO kernel, {r}", bench(lambda: eco_adamw_fused_(*tensors, **args, rounding=r, seed=1)))
                    for r in quant.ROUNDINGS]
            rows.append(("eager PyTorch reference, nearest", bench(lambda: reference_step_(*tensors, **args))))
            torch._dynamo.reset()  # compile afresh for each storage: no recompilation limit reached
            compiled = torch.compile(reference_step_, dynamic=False)  # static shapes: torch.rand fails on symbolic ones
            rows.append(("torch.compile(reference), nearest", bench(lambda: compiled(*tensors, **args))))
            groups.append((moments, nbytes, rows))
            del codes, scale, grad, state, tensors
        torch.cuda.empty_cache()
        for moments, nbytes, rows in groups:
            copy = copy_ms(nbytes)
            for what, ms in [(f"copy of the same {nbytes / n:.2f} B/param", copy)] + rows:
                print(f"{n / 2**20:>6.0f}M {moments:<12} {what:<34} {ms:>8.3f} {nbytes / ms / 1e6:>7.0f} "
                      f"{copy / ms:>8.2f} {ms / adamw_ms:>10.2f}")
    print("GB/s counts each method's own bytes (see the docstring: 20, 12 or 8.1 B/param for the ECO step, 28 for\n"
          "AdamW on a master copy); BW/copy = that bandwidth / a copy's of the same bytes; time/AdamW = time per\n"
          "step / fused AdamW's (< 1: faster).")


if __name__ == "__main__":
    if torch.cuda.is_available():
        check("cuda", (1024, 4096))
        check("cuda", (300, 1000))
        benchmark()
    else:
        check("cpu")
        print("no GPU: the check above ran in Triton's interpreter; timings need a GPU")
        sys.exit(0)

"""
One fused Triton kernel for the ECO-AdamW step of one quantized weight: a single pass over memory.

The reference (eco.eco_adamw_step with quant.quantize) launches a dozen PyTorch kernels per tensor, each
reading and writing whole float32 tensors. The step is element-wise except for one reduction, the row
absmax that sets the new scale; if one program owns a whole row, that reduction happens in registers and
every byte is touched once. Per parameter (grad in float32; bf16 saves 2 bytes):

    fused ECO step:  read  codes 1 + grad 4 + exp_avg 4 + exp_avg_sq 4      = 13 B
                     write codes 1 + exp_avg 4 + exp_avg_sq 4               =  9 B   -> 22 B / param
                     (+ 8 B per row for the scale, negligible)
    fused AdamW on a float32 master copy (what quantized training runs today):
                     read  master 4 + grad 4 + exp_avg 4 + exp_avg_sq 4    = 16 B
                     write master 4 + exp_avg 4 + exp_avg_sq 4              = 12 B   -> 28 B / param
                     and then a re-quantization of the master for the next forward (read 4, write 1).
So at equal bandwidth the fused ECO step should take about 22/28 = 0.79 of AdamW's time, or less.

The kernel follows eco.adamw_update / eco.eco_adamw_step / quant.round_to_grid line by line, with the
same names. Two details make it agree with the PyTorch reference exactly:
  * PyTorch's CPU lerp_ and addcmul_ are fused multiply-adds; we write the same tl.fma, use IEEE
    division and sqrt (div_rn, sqrt_rn), and compile without FMA contraction elsewhere. Against the CPU
    reference (CI, through the interpreter) codes and scales are identical. PyTorch's CUDA kernels round
    a few of these operations differently (addcdiv, division by a scalar, where FMAs are contracted), so
    on a GPU theta can differ from the reference in its last bit: about one RTN code in a million, sitting
    exactly on a rounding boundary, then differs by one grid step (measured on an H100; see README).
  * All rounding is done in float32 arithmetic, and only values already on the FP8 grid are cast to
    float8. (Triton's interpreter, which CI uses, rounds casts to float8e4nv wrongly when the rounding
    carries into the exponent: 0.4856 became 0.25 instead of 0.5.)
Stochastic rounding draws 24-bit uniforms from Philox (tl.randint4x: four per call) keyed by (seed, element);
ECOAdamW derives a fresh seed from (its seed, step, tensor) so runs are reproducible.

Run `python kernels.py`: on a GPU, a correctness check and a benchmark (time per step and bandwidth
for the fused kernel, the eager reference, the compiled reference, torch's fused AdamW on a float32
master copy, and a plain copy of the same bytes). Without a GPU, the correctness check runs in
Triton's interpreter and the timings are skipped.
"""
import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton
import triton.language as tl

import quant

MAX_ROW = 16384  # longest row one program handles (rows are kept whole in registers)


@triton.jit
def _eco_adamw_kernel(codes_ptr, scale_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, n_cols,
                      lr, beta1, beta2, eps, weight_decay, bc1, bc2, alpha, seed,
                      RHO: tl.constexpr, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr,
                      IS_FLOAT: tl.constexpr, STOCHASTIC: tl.constexpr, INJECT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    # load: the stored weight (dequantized), the gradient, the two moments, all as float32
    weight = tl.load(codes_ptr + offs, mask=mask).to(tl.float32) * tl.load(scale_ptr + row)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0)

    # eco.adamw_update
    theta = weight * (1 - lr * weight_decay)
    exp_avg = tl.fma(1 - beta1, grad - exp_avg, exp_avg)  # exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq = tl.fma((1 - beta2) * grad, grad, exp_avg_sq * beta2)  # .mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), tl.sqrt_rn(bc2)) + eps
    theta = theta + tl.div_rn((-lr / bc1) * exp_avg, denom)  # theta.addcdiv_(exp_avg, denom, value=-lr / bc1)

    # quant.quantize: a new scale from this row's absmax, then onto the grid
    amax = tl.max(tl.where(mask, tl.abs(theta), 0.0), axis=0)
    scale = tl.maximum(tl.div_rn(amax, RHO), 1.1754943508222875e-38)  # clamp_min(float32 tiny)
    y = tl.minimum(tl.maximum(tl.div_rn(theta, scale), -RHO), RHO)
    # quant.grid_step: 2^(max(floor(log2|y|), MIN_EXPONENT) - MANTISSA_BITS), read off y's exponent bits
    if IS_FLOAT:
        exponent = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, MIN_EXPONENT)
        step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
    else:
        step = tl.full(y.shape, 1.0, tl.float32)
    t = y / step  # exact: step is a power of two
    lo = tl.floor(t)
    if STOCHASTIC:
        # One Philox call gives four 32-bit numbers: draw BLOCK/4 of them and lay the four out in column order.
        r0, r1, r2, r3 = tl.randint4x(seed, row * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
        bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])  # element 4i+j comes from r_j[i]
        u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24-bit uniform in [0, 1), like torch.rand
        k = lo + (u < t - lo).to(tl.float32)
    else:  # nearest, ties to even (torch.round)
        frac = t - lo
        odd = (lo - 2.0 * tl.floor(lo * 0.5)) == 1.0
        k = lo + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)
    q = k * step  # on the grid: exactly representable in the storage dtype
    new_weight = q * scale

    # eco.eco_adamw_step: the injection
    if INJECT:
        error = theta - new_weight
        exp_avg = tl.fma(alpha * error, denom, exp_avg)  # exp_avg.addcmul_(error, denom, value=alpha)

    tl.store(codes_ptr + offs, q.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(exp_avg_ptr + offs, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, exp_avg_sq, mask=mask)


def eco_adamw_fused_(codes, scale, grad, exp_avg, exp_avg_sq, *, fmt, step, lr, beta1, beta2, eps,
                     weight_decay, rounding, seed):
    """One ECO-AdamW step on one quantized tensor, in place: codes, scale, exp_avg, exp_avg_sq.
    Row-wise formats only (fp8_e4m3, int8): a per-tensor scale (int4) needs a pass over all rows first."""
    f = quant.get_format(fmt)
    quant.check_rounding(rounding)
    if not f.per_row:
        raise ValueError(f"fmt={fmt!r} has one scale per tensor; the fused kernel accepts row-wise formats: "
                         f"{[n for n, g in quant.FORMATS.items() if g.per_row]}")
    n_cols = codes.shape[-1]
    if n_cols > MAX_ROW:
        raise ValueError(f"row length {n_cols} exceeds the fused kernel's limit of {MAX_ROW}")
    for name, t in dict(codes=codes, scale=scale, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq).items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if codes.dtype != f.dtype or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise TypeError(f"expected codes {f.dtype} and float32 moments, got {codes.dtype}, {exp_avg.dtype}, {exp_avg_sq.dtype}")
    if grad.shape != codes.shape or grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grad must be float32/bfloat16/float16 of shape {tuple(codes.shape)}, got {grad.dtype} {tuple(grad.shape)}")
    n_rows = codes.numel() // n_cols  # [E, out, in] expert banks count as E*out rows
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    alpha = (1 - lr * weight_decay) * (bc1 / lr) * (1 - 1 / beta1) if lr > 0 else 0.0
    BLOCK = max(4, triton.next_power_of_2(n_cols))
    _eco_adamw_kernel[(n_rows,)](
        codes, scale, grad, exp_avg, exp_avg_sq, n_cols, lr, beta1, beta2, eps, weight_decay, bc1, bc2, alpha,
        seed, RHO=f.max, MANTISSA_BITS=f.mantissa_bits or 0, MIN_EXPONENT=f.min_exponent or 0,
        IS_FLOAT=f.mantissa_bits is not None, STOCHASTIC=rounding == "stochastic", INJECT=lr > 0, BLOCK=BLOCK,
        num_warps=min(16, max(1, BLOCK // 256)), enable_fp_fusion=False)


# -----------------------------------------------------------------------------
# Correctness check and benchmark (python kernels.py)

def reference_step_(codes, scale, grad, exp_avg, exp_avg_sq, *, fmt, rounding="nearest", generator=None, **hyper):
    """The PyTorch reference with the fused kernel's interface: eco.eco_adamw_step on the dequantized weight."""
    import eco  # kernels never imports eco at module level: eco imports kernels

    def store(theta):
        new_codes, new_scale = quant.quantize(theta, fmt, rounding, generator)
        codes.copy_(new_codes)
        scale.copy_(new_scale)
        return quant.dequantize(new_codes, new_scale, fmt)
    eco.eco_adamw_step(quant.dequantize(codes, scale, fmt), grad, exp_avg, exp_avg_sq, **hyper, quantize=store)


def make_inputs(shape, fmt, device, grad_dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(shape, generator=g, device=device) * 0.02
    codes, scale = quant.quantize(w, fmt)
    grad = (torch.randn(shape, generator=g, device=device) * 1e-3).to(grad_dtype)
    exp_avg = torch.randn(shape, generator=g, device=device) * 1e-3
    exp_avg_sq = torch.rand(shape, generator=g, device=device) * 1e-6
    return codes, scale, grad, exp_avg, exp_avg_sq


HYPER = dict(step=10, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.1)


def check(device, shape=(64, 1000)):
    for fmt in ("fp8_e4m3", "int8"):
        a = make_inputs(shape, fmt, device)
        b = [t.clone() for t in a]
        eco_adamw_fused_(*a, fmt=fmt, **HYPER, rounding="nearest", seed=0)
        reference_step_(*b, fmt=fmt, **HYPER)
        same = (a[0].float() == b[0].float()).float().mean().item()
        err = ((a[3] - b[3]).norm() / b[3].norm()).item()
        print(f"check {fmt:9s} {tuple(shape)} RTN on {device}: codes identical {same:.6%}, scales equal "
              f"{torch.equal(a[1], b[1])}, exp_avg rel. diff {err:.1e}")


def benchmark():
    print(f"benchmark on {torch.cuda.get_device_name()}: rows of 4096, fp8_e4m3, grad float32, median times")
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms
    print(f"{'params':>7} {'what':<38} {'ms/step':>8} {'GB/s':>7} {'BW/copy':>8} {'time/AdamW':>10}")
    for n in (1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28):
        shape = (n // 4096, 4096)
        codes, scale, grad, m, v = make_inputs(shape, "fp8_e4m3", "cuda")
        fused_bytes = n * 22  # see the docstring
        src = torch.empty(fused_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        rows = [("copy of the same 22 B/param (the limit)", bench(lambda: dst.copy_(src)), fused_bytes)]
        for rounding in ("nearest", "stochastic"):
            rows.append((f"fused ECO kernel, {rounding}", bench(lambda: eco_adamw_fused_(
                codes, scale, grad, m, v, fmt="fp8_e4m3", **HYPER, rounding=rounding, seed=1)), fused_bytes))
        rows.append(("eager PyTorch reference, nearest",
                     bench(lambda: reference_step_(codes, scale, grad, m, v, fmt="fp8_e4m3", **HYPER)), fused_bytes))
        compiled = torch.compile(reference_step_)
        rows.append(("torch.compile(reference), nearest",
                     bench(lambda: compiled(codes, scale, grad, m, v, fmt="fp8_e4m3", **HYPER)), fused_bytes))
        del codes, grad, m, v, src, dst
        master = torch.nn.Parameter(torch.randn(shape, device="cuda") * 0.02)
        master.grad = torch.randn_like(master) * 1e-3
        adamw = torch.optim.AdamW([master], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, fused=True)
        rows.append(("torch AdamW(fused=True), fp32 master", bench(adamw.step), n * 28))
        del master, adamw
        torch.cuda.empty_cache()
        copy_bw, adamw_ms = rows[0][2] / rows[0][1], rows[-1][1]
        for what, ms, nbytes in rows:
            print(f"{n / 2**20:>6.0f}M {what:<38} {ms:>8.3f} {nbytes / ms / 1e6:>7.0f} {nbytes / ms / copy_bw:>8.2f} "
                  f"{ms / adamw_ms:>10.2f}")
    print("GB/s counts each method's own bytes (22 B/param for the ECO step, 28 for AdamW on a master copy);\n"
          "BW/copy = that bandwidth / the copy's; time/AdamW = time per step / fused AdamW's (< 1: faster).")


if __name__ == "__main__":
    if torch.cuda.is_available():
        check("cuda", (1024, 4096))
        check("cuda", (300, 1000))
        benchmark()
    else:
        check("cpu")
        print("no GPU: the check above ran in Triton's interpreter; timings need a GPU")
        sys.exit(0)

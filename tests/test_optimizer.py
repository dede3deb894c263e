"""
eco.py's optimizers, ECOAdamW and ECOSGD, in every mode: float parameters as torch's, master mode as an exact
float32 baseline, each step of every mode against a reference written outside eco.py, param groups, the
rounding and seed of the stored weight, the injection under a learning-rate schedule, checkpoints, and the
gradients in main_grad. (The tests that prove the method are in test_eco.py; refusals in test_resilience.py.)
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eco
import quant
from reference import (DECOY_ADAMW, GRID, adamw_args, codes, grid_weight, make_optimizer, quantized_weight, set_grad,
                       stored, tiny_model, train_steps)


# -----------------------------------------------------------------------------
# eco.py: the optimizer classes

def test_eco_adamw_unquantized_params_are_exactly_torch_adamw():
    """On float parameters ECOAdamW is torch.optim.AdamW bit for bit: the modes change quantized weights only."""
    w0, grads = adamw_args(1)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = eco.ECOAdamW([a], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode="eco")
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, foreach=False)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", eco.MODES)
def test_every_mode_trains_the_tiny_model(mode):
    """Every mode halves the tiny model's loss, the weight stays FP8, and only master mode keeps a master."""
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1, mode=mode)
    first = train_steps(model, opt, 1, seed=0)
    last = train_steps(model, opt, 150, seed=1)
    assert last < 0.5 * first
    assert model[1].weight.dtype == torch.float8_e4m3fn
    assert ("master" in opt.state[model[1].weight]) == (mode == "master")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_checkpoint_resume_is_bit_identical(optimizer, tmp_path):
    """Saved and resumed midway, ECOAdamW and ECOSGD (stochastic rounding) end bit-identical to an unbroken run."""
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


@pytest.mark.parametrize("make, match", [
    (lambda p: eco.ECOAdamW(p, mode="ema"), "'ema'.*accepted.*master.*naive.*eco"),
    (lambda p: eco.ECOAdamW(p, rounding="floor"), "'floor'.*accepted"),
    (lambda p: eco.ECOAdamW(p, lr=-0.1), "lr=-0.1"),
    (lambda p: eco.ECOAdamW(p, betas=(0.0, 0.99), mode="eco"), "beta1=0.0.*\\(0.0, 1.0\\)"),
    (lambda p: eco.ECOSGD(p, lr=0.1, momentum=1.0), "momentum=1.0"),
    (lambda p: eco.ECOAdamW(p, moments="int8"), "'int8'.*accepted.*fp32.*bf16.*fp8"),
    (lambda p: eco.ECOAdamW(p, injection="next"), "'next'.*accepted.*paper.*next_lr"),
    (lambda p: eco.ECOAdamW(p, eps=0.0), "eps=0.*\\(0.0, inf\\)"),
])
def test_bad_optimizer_arguments_raise_clear_errors(make, match):
    """A bad mode, rounding, lr, beta1, momentum, moments, injection or eps fails at construction, naming the value
    and what is accepted."""
    with pytest.raises(ValueError, match=match):
        make(list(tiny_model().parameters()))


def test_parameters_on_several_devices_are_refused():
    """Parameters on several devices are refused when the optimizer is built."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        eco.ECOAdamW([a, b])


def test_zero_learning_rate_skips_the_injection():
    """lr = 0 skips ECO's injection (its coefficient divides by lr): the momentum stays finite."""
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=0.0, mode="eco", rounding="nearest")
    train_steps(model, opt, 3, seed=0)
    state = opt.state[model[1].weight]
    assert torch.isfinite(state["exp_avg"]).all() and state["exp_avg"].abs().sum() > 0


# -----------------------------------------------------------------------------
# eco.py: master mode is an exact float32 baseline

# The references here and in the next section are computed outside eco.py (torch.optim.AdamW, or EMA-SGD
# written out), as an independent float32 run or one step at a time from the optimizer's own state, and
# compared bit for bit where the math is exact. (ECOAdamW's master mode: test_eco.py.)

# As DECOY_ADAMW: constructor defaults that no param group below uses.
DECOY_SGD = dict(lr=0.5, momentum=0.5, weight_decay=0.7)


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
# eco.py: the injection coefficient under a schedule (injection="next_lr")

def test_exact_two_term_rule_reproduces_master_weight_sgdm_under_a_schedule():
    """eco.py's derivation (its docstring): m_t = m~_t + (1 - lr_t wd) e_{t-1}/lr_t - (1 - lr_{t+1} wd) e_t/(lr_{t+1} beta)
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
    """At a constant lr the next_lr rule is the paper's coefficient, and the two injections give the same weights."""
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
    """When lr changes the next_lr coefficient differs from the paper's: weaker in warm-up, stronger in decay."""
    paper = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5)
    warmup = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5, next_lr=1.05e-3, next_bc=0.5)
    decay = eco.injection_coefficient(1e-3, 0.1, 0.9, bc=0.5, next_lr=0.95e-3, next_bc=0.5)
    assert decay < paper < warmup < 0, "a rising lr needs less momentum to carry the same error, a falling one more"
    assert eco.injection_coefficient(1e-3, 0.0, 0.9, next_lr=2e-3, next_bc=1.0) > 0, "lr growing faster than 1/beta"


def test_next_lr_zero_skips_the_injection_and_a_missing_next_lr_is_an_error():
    """injection='next_lr' without a next_lr fails loudly; next_lr = 0 skips the injection: naive's step exactly."""
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
# eco.py: clipping and zeroing reach main_grad

def test_clip_and_zero_grad_include_main_grad():
    """clip_grad_norm_ and zero_grad_ treat main_grad as .grad; an infinite norm fails loudly and scales nothing."""
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
    """opt.zero_grad() clears main_grad: the next backward gives the same gradient, not twice it."""
    model = tiny_model()
    opt = make_optimizer(optimizer, model.parameters(), "eco")
    idx = torch.arange(8)
    F.cross_entropy(model(idx), idx).backward()
    once = model[1].weight.main_grad.clone()
    opt.zero_grad()
    assert model[1].weight.main_grad is None or (model[1].weight.main_grad == 0).all()
    F.cross_entropy(model(idx), idx).backward()
    assert torch.equal(model[1].weight.main_grad, once)

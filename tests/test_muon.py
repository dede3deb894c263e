"""
eco.ECOMuon: Newton-Schulz against the exact polar factor, master mode against a reference Muon on a float32 copy,
naive without a copy, the ECO injection's stuck-weight identity, the momentum's storage, AdamW groups as ECOAdamW,
checkpoints bit for bit, and the refusals.
"""
import copy

import pytest
import torch

import eco
import quant


def polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


def qlinear(out_features, in_features, fmt="fp8_e4m3", seed=0):
    g = torch.Generator().manual_seed(seed)
    return quant.QLinear(in_features, out_features, fmt).set_float_(0.1 * torch.randn(out_features, in_features, generator=g))


def grads(shape, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (3, 16, 48)])
def test_newton_schulz_keeps_the_singular_vectors_and_steps_0_is_the_polar_factor(shape):
    """NS(G) = U f(S) V^T with every f(sigma) in Muon's band [0.6, 1.2]; ns_steps=0 is U V^T itself."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(eco.newton_schulz(G, 0), polar(G), atol=1e-5)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    inner = U.mT @ eco.newton_schulz(G, 5).double() @ Vh.mT  # diagonal if the singular vectors are kept
    diag = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert (inner - torch.diag_embed(diag)).abs().max() < 1e-5
    assert diag.min() > 0.6 and diag.max() < 1.2
    for c in (3.0, 1e30, 1e-30):  # scale-free, also where |G|_F itself would overflow or underflow float32
        assert torch.allclose(eco.newton_schulz(c * G), eco.newton_schulz(G), atol=1e-6), c
    for steps in (0, 5):  # a zero momentum (an idle expert) moves nothing
        assert torch.equal(eco.newton_schulz(torch.zeros(shape), steps), torch.zeros(shape))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_master_mode_is_a_reference_muon_on_a_float32_copy_and_stores_its_rounding(rounding):
    """Master: the copy follows Muon written out here exactly; with round-to-nearest the stored codes are q(master)."""
    w = qlinear(32, 64)
    w0 = w.dequantized_weight()
    opt = eco.ECOMuon([w.weight], lr=0.02, momentum=0.95, weight_decay=0.1, mode="master", rounding=rounding)
    ref, m = w0.clone(), torch.zeros(32, 64)
    for g in grads((32, 64), 4):
        w.weight.main_grad = g.clone()
        opt.step()
        m = m.lerp(g, 1 - 0.95)
        ref = ref * (1 - 0.02 * 0.1) - 0.02 * 1.0 * eco.newton_schulz(m)  # s = sqrt(max(1, 32/64)) = 1
        assert torch.equal(opt.state[w.weight]["master"], ref)
        assert torch.equal(opt.state[w.weight]["momentum_buffer"], m)
    if rounding == "nearest":
        c, s = quant.quantize(ref, "fp8_e4m3", "nearest")
        assert torch.equal(w.weight.view(torch.uint8), c.view(torch.uint8)) and torch.equal(w.scale, s)


def test_naive_keeps_no_copy_and_steps_from_the_stored_weight():
    """Naive: one momentum buffer only, and each step is Muon on the dequantized weight, rounded."""
    w = qlinear(64, 32)
    opt = eco.ECOMuon([w.weight], lr=0.02, weight_decay=0.1, mode="naive", rounding="nearest")
    m = torch.zeros(64, 32)
    for g in grads((64, 32), 3):
        before = w.dequantized_weight()
        w.weight.main_grad = g.clone()
        opt.step()
        m = m.lerp(g, 1 - 0.95)
        theta = before * (1 - 0.02 * 0.1) - 0.02 * 2 ** 0.5 * eco.newton_schulz(m)  # s = sqrt(64/32)
        assert torch.equal(w.dequantized_weight(), quant.quantize_dequantize(theta, "fp8_e4m3", "nearest"))
    assert set(opt.state[w.weight]) == {"step", "momentum_buffer"}


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (2, 24, 40)])
@pytest.mark.parametrize("rule", ["paper", "next_lr"])
def test_a_stuck_weight_makes_the_momentum_stop_decaying_with_the_exact_polar_factor(shape, rule):
    """No code moves, wd = 0, O exact: e = -lr s O and m' = m~ + (1/(lr s))(1 - 1/beta) e O^T m~ = m~ / beta."""
    gen = torch.Generator().manual_seed(3)
    m0, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    weight = torch.zeros(shape)  # q(theta) = weight: nothing moved; from 0, theta - weight is exact in float32
    m = m0.clone()
    next_lr = 1e-3 if rule == "next_lr" else None  # next_lr = lr: the paper's coefficient
    eco.eco_muon_step(weight, g, m, lr=1e-3, momentum=0.9, weight_decay=0.0, ns_steps=0,
                      quantize=lambda theta: weight.clone(), next_lr=next_lr)
    m_tilde = 0.9 * m0 + 0.1 * g
    assert torch.allclose(m, m_tilde / 0.9, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (2, 24, 40)])
def test_the_injection_maps_any_error_back_through_the_preconditioner(shape):
    """With the exact polar factor O = m~ H (out >= in) or L m~ (out < in), the injected d = m' - m~ satisfies
    alpha/s e = d H, or L d: all of e enters the momentum, also for a wide matrix, whose H does not exist."""
    gen = torch.Generator().manual_seed(4)
    m0, g, e = (torch.randn(shape, generator=gen) for _ in range(3))
    m = m0.clone()
    lr, beta = 1e-2, 0.9
    eco.eco_muon_step(torch.zeros(shape), g, m, lr=lr, momentum=beta, weight_decay=0.0, ns_steps=0,
                      quantize=lambda theta: (theta.double() - e.double()).float())  # the error is e
    m_tilde = (beta * m0 + (1 - beta) * g).double()
    s = max(1.0, shape[-2] / shape[-1]) ** 0.5
    d = (m.double() - m_tilde) / (eco.injection_coefficient(lr, 0.0, beta) / s)  # the error as the momentum sees it
    U, S, Vh = torch.linalg.svd(m_tilde, full_matrices=False)
    if shape[-2] >= shape[-1]:
        back = d @ (Vh.mT * (1 / S).unsqueeze(-2)) @ Vh  # d H, H = V S^-1 V^T
    else:
        back = (U * (1 / S).unsqueeze(-2)) @ U.mT @ d  # L d, L = U S^-1 U^T
    assert torch.allclose(back, e.double(), atol=2e-3), (back - e).abs().max()


def test_eco_momentum_grows_while_codes_are_stuck_and_naive_momentum_does_not():
    """Steps far below the int8 grid under a constant gradient: ECO's m_k = k (1 - beta) g / beta, naive's
    (1 - beta^k) g. (Column 0 pins each row's scale: its weights are the row maxima and its gradient is 0, so with
    the exact polar factor it never moves; every other weight is 0, so theta - q(theta) is exact in float32.)"""
    g = grads((16, 32), 1)[0]
    g[:, 0] = 0
    for mode, expected in (("eco", 5 * 0.1 * g / 0.9), ("naive", (1 - 0.9 ** 5) * g)):
        w = quant.QLinear(32, 16, "int8").set_float_(torch.nn.functional.one_hot(torch.zeros(16, dtype=torch.long), 32).float())
        codes, scale = w.weight.clone(), w.scale.clone()
        opt = eco.ECOMuon([w.weight], lr=1e-4, momentum=0.9, ns_steps=0, mode=mode, rounding="nearest")
        for _ in range(5):
            w.weight.main_grad = g.clone()
            opt.step()
        assert torch.equal(w.weight, codes) and torch.equal(w.scale, scale), "nothing moved"
        assert torch.allclose(opt.state[w.weight]["momentum_buffer"], expected, rtol=1e-4, atol=1e-6), mode


@pytest.mark.parametrize("moments,dtype,nbytes,step", [("fp32", torch.float32, 4.0, 0.0),
                                                       ("bf16", torch.bfloat16, 2.0, 2 ** -7),
                                                       ("fp8", torch.float8_e4m3fn, 1 + 4 / 128, 2 ** -3)])
def test_the_momentum_is_stored_as_asked_in_bytes_per_parameter(moments, dtype, nbytes, step):
    """fp32, bf16, or fp8 with one float32 scale per block of 128; small tensors keep float32, as for AdamW."""
    w = qlinear(64, 128)
    opt = eco.ECOMuon([w.weight], moments=moments, mode="naive")  # naive: m~ is the stored momentum
    w.weight.main_grad = grads((64, 128), 1)[0]
    opt.step()
    state = opt.state[w.weight]
    assert state["momentum_buffer"].dtype == dtype
    total = sum(t.nbytes for k, t in state.items() if torch.is_tensor(t) and k != "step")
    assert total / w.weight.numel() == nbytes
    m = 0.05 * w.weight.main_grad  # (1 - beta) g, stored within one grid step (relative `step`) by stochastic rounding
    assert ((eco.load_momentum(state) - m).abs() <= step * m.abs() + 1e-6).all()
    small = qlinear(8, 16)
    opt = eco.ECOMuon([small.weight], moments=moments)
    small.weight.main_grad = grads((8, 16), 1)[0]
    opt.step()
    assert opt.state[small.weight]["momentum_buffer"].dtype == torch.float32


def test_use_muon_false_groups_are_ecoadamw_bit_for_bit():
    """The AdamW groups of ECOMuon step exactly as ECOAdamW with the same seed (quantized and float parameters)."""
    def build(cls):
        w, b = qlinear(32, 64), torch.nn.Parameter(torch.zeros(64))
        kw = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, mode="eco", rounding="stochastic", seed=5)
        if cls is eco.ECOMuon:
            return w, b, eco.ECOMuon([dict(params=[w.weight, b], use_muon=False)], **kw)
        return w, b, eco.ECOAdamW([w.weight, b], **kw)
    (w1, b1, o1), (w2, b2, o2) = build(eco.ECOMuon), build(eco.ECOAdamW)
    for g in grads((32, 64), 3):
        w1.weight.main_grad, w2.weight.main_grad = g.clone(), g.clone()
        b1.grad, b2.grad = g[0].clone(), g[0].clone()
        o1.step(), o2.step()
    assert torch.equal(w1.weight.view(torch.uint8), w2.weight.view(torch.uint8)) and torch.equal(b1, b2)


@pytest.mark.parametrize("mode", ["master", "naive", "eco"])
def test_a_checkpoint_restores_the_next_steps_bit_for_bit(mode):
    """state_dict round trip with stochastic rounding and an fp8 momentum: the loaded copy takes the same steps."""
    w = qlinear(64, 128)
    opt = eco.ECOMuon([w.weight], lr=0.02, mode=mode, rounding="stochastic", moments="fp8", seed=7)
    gs = grads((64, 128), 5)
    for g in gs[:3]:
        w.weight.main_grad = g.clone()
        opt.step()
    w2 = copy.deepcopy(w)
    opt2 = eco.ECOMuon([w2.weight], lr=0.02, mode=mode, rounding="stochastic", moments="fp8", seed=0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in gs[3:]:
        for p, o in ((w.weight, opt), (w2.weight, opt2)):
            p.main_grad = g.clone()
            o.step()
    assert torch.equal(w.weight.view(torch.uint8), w2.weight.view(torch.uint8)) and torch.equal(w.scale, w2.scale)
    for k, v in opt.state[w.weight].items():
        v2 = opt2.state[w2.weight][k]
        assert torch.equal(v.view(torch.uint8), v2.view(torch.uint8)) if torch.is_tensor(v) else v == v2


def test_bad_groups_and_options_are_refused_naming_them():
    """A vector in a Muon group, bad ns_steps or use_muon, and a momentum storage changed after the first step."""
    w, b = qlinear(64, 128), torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(ValueError, match=r"Muon steps matrices.*\(64,\).*use_muon=False"):
        eco.ECOMuon([w.weight, b])
    for steps in (-1, 2.5, True):
        with pytest.raises(ValueError, match="ns_steps"):
            eco.ECOMuon([w.weight], ns_steps=steps)
    with pytest.raises(ValueError, match="use_muon"):
        eco.ECOMuon([dict(params=[w.weight], use_muon="yes")])
    with pytest.raises(ValueError, match="momentum"):
        eco.ECOMuon([w.weight], momentum=0.0)  # eco divides by beta
    opt = eco.ECOMuon([w.weight], moments="fp8")
    w.weight.main_grad = grads((64, 128), 1)[0]
    opt.step()
    with pytest.raises(ValueError, match="keeps its momentum as 'fp8'"):
        opt.param_groups[0]["moments"] = "bf16"
    assert opt.param_groups[0]["moments"] == "fp8"
    with pytest.raises(ValueError, match="stepped by Muon.*use_muon=False"):  # AdamW would find no exp_avg
        opt.param_groups[0]["use_muon"] = False
    with pytest.raises(ValueError, match="use_muon=1"):
        eco.ECOMuon([dict(params=[w.weight], use_muon=1)])
    assert opt.param_groups[0]["use_muon"] is True
    opt.step()

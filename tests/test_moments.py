"""
Compressed moments (moments="bf16" | "fp8"): the storage grids (bfloat16 by stochastic rounding, FP8 in blocks
of 128 values per row with a float32 scale each), and ECOAdamW keeping exp_avg and exp_avg_sq in 2 or 1 bytes:
a storage-grid neighbour of the float32 moment, unbiased, every mode training and resuming bit for bit.
moments="fp32", the default, is the paper's optimizer.
"""
import pytest
import torch
import torch.nn as nn

import eco
import quant
from reference import bfloat16_neighbours, storage_neighbours


# -----------------------------------------------------------------------------
# quant.py: the storage grids of the moments

def test_bfloat16_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    """bfloat16 stochastic rounding picks a neighbour with the exact probability (unbiased); nearest is the cast."""
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
    """Block-wise FP8 is the per-row quantizer on each block of 128 (a ragged last block, an all-zero block)."""
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


# -----------------------------------------------------------------------------
# eco.py: the optimizer with compressed moments

def compressed_model_and_opt(moments, mode="eco", seed=5):
    """A model with a quantized Linear (model[1]) and an embedding big enough for compressed moments (>= 4096
    values), a LayerNorm too small for them, and its ECOAdamW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 128, bias=False), nn.ReLU(), nn.LayerNorm(128),
                          nn.Linear(128, 64, bias=False))
    quant.quantize_linears_(model, "fp8_e4m3", include=lambda name, m: name == "1")
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, mode=mode, moments=moments, seed=seed)
    return model, opt


def train_compressed(model, opt, steps, seed):
    """`steps` steps of a seeded 64-token task (predict 7 x + 3 mod 64); returns the last loss."""
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
    """bf16 and fp8 moments take 2 and 1 bytes a value (plus block scales); tensors under 4096 values stay float32."""
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
    """With bf16 or fp8 moments every mode trains, and a resumed run ends bit-identical to an unbroken one."""
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


def test_load_state_dict_refuses_another_mode_class_moments_or_shape():
    """load_state_dict refuses a state of another mode, class, moments layout or shape, naming what differs."""
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

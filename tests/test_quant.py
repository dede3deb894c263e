"""
quant.py: the quantizers (rounding to the grid, to nearest or stochastically, and the scales), QLinear and
quantize_linears_, then the two FP8 matmul paths. (That rounding to nearest is PyTorch's FP8 cast, and that
stochastic rounding is unbiased, is in test_eco.py.)

The two FP8 matmul paths of quant.py: torch._scaled_mm straight from the stored codes, and the simulated
reference (dequantize, float32 matmul). torch._scaled_mm runs on the CPU too (there as an emulation that
dequantizes and multiplies in float32), so these tests run the scaled_mm path itself here: its operand layouts
and scales, its autograd Function, its gradient routing. The one that needs a CUDA GPU with FP8 matmuls is
skipped elsewhere.

Tolerance, everywhere the paths are compared: a product a @ b with n terms per entry, rounded in float32
(unit roundoff u = 2^-24), is within about (n + 1) u * (|a| @ |b|) of the exact value on either path, so the
two may differ by (n + 1) * 2^-23 * (|a| @ |b|) entrywise: the float32 summation order, and nothing more.
"""
import copy

import pytest
import torch
import torch.nn as nn

import eco
import quant
from model import GPT, GPTConfig
from moe import MoE


# -----------------------------------------------------------------------------
# quant.py: rounding, scales, QLinear and quantize_linears_

def test_stochastic_rounding_is_reproducible_from_a_generator():
    """Stochastic rounding is deterministic given its generator: the same seed, the same codes; another, others."""
    x = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    a = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(7))
    b = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(7))
    c = quant.quantize(x, "fp8_e4m3", "stochastic", torch.Generator().manual_seed(8))
    assert torch.equal(a[0].float(), b[0].float()) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0].float(), c[0].float())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4"])
def test_quantize_dequantize_is_idempotent_on_grid_values(fmt):
    """A value on the grid stays put: quantize_dequantize twice equals once, with either rounding."""
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
    """FP8 and int8 scale per row (an expert bank [E, out, in] per expert's row), int4 per tensor as absmax / 7."""
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0))  # an expert bank [E, out, in]
    assert quant.quantize(x, "fp8_e4m3")[1].shape == (4, 6, 1)
    assert quant.quantize(x, "int8")[1].shape == (4, 6, 1)
    codes, scale = quant.quantize(x, "int4")
    assert scale.shape == (1, 1, 1) and codes.abs().max() == 7 and codes.dtype == torch.int8
    assert torch.allclose(scale, x.abs().max() / 7)


def test_all_zero_rows_get_a_finite_scale():
    """An all-zero row gets a finite positive scale and stays exactly zero, in every format."""
    torch.manual_seed(0)
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    for fmt in quant.FORMATS:
        codes, scale = quant.quantize(x, fmt, "stochastic")
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (codes[0].float() == 0).all() and (quant.dequantize(codes, scale, fmt)[2] == 0).all()


def test_quantize_casts_to_float32_before_its_finiteness_check():
    """A float64 value beyond float32's range is refused as Inf, not stored as one."""
    with pytest.raises(ValueError, match="NaN or Inf"):
        quant.quantize(torch.tensor([1.0, 1e39], dtype=torch.float64), "fp8_e4m3")


def test_quantizer_bad_inputs_raise_clear_errors():
    """A bad format, rounding, NaN or Inf, or a Linear with a bias fails loudly, naming what is accepted."""
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
    """QLinear holds 1-byte codes and no float copy; output and gradients equal nn.Linear's on q(W) and q(x)."""
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
    """A first layer (its input needs no gradient) still gets its weight's gradient in main_grad."""
    torch.manual_seed(0)
    q = quant.QLinear.from_linear(nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 8)  # does not require grad
    q(x).sum().backward()
    assert q.weight.main_grad is not None and q.weight.main_grad.shape == (4, 8)
    expected = quant.quantize_dequantize(x, "fp8_e4m3").sum(0).expand(4, 8)
    assert torch.allclose(q.weight.main_grad, expected)


def test_quantize_linears_swaps_only_included_modules_and_survives_copies():
    """quantize_linears_ swaps only what include() picks; deepcopy and .to() keep each weight's scale and format."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8, bias=False), nn.Linear(8, 10, bias=False))
    n = quant.quantize_linears_(model, "fp8_e4m3", include=lambda name, m: name == "1")
    assert n == 1 and isinstance(model[1], quant.QLinear) and type(model[2]) is nn.Linear
    for clone in (copy.deepcopy(model), model.to("cpu")):
        assert clone[1].weight.scale is clone[1].scale and clone[1].weight.fmt == "fp8_e4m3"


def test_quantize_linears_keeps_tied_and_shared_weights_and_checks_everything_first():
    """Tied and shared weights stay one weight; a bias, a new forward or a tie to an Embedding is refused first."""
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
# The two FP8 matmul paths: torch._scaled_mm from the stored codes, and the simulated reference

needs_cpu_scaled_mm = pytest.mark.skipif(not quant.scaled_mm_available(torch.device("cpu")),
                                         reason="this torch has no torch._scaled_mm on the CPU")


def assert_equal_up_to_summation(actual, expected, a, b):
    """actual and expected are two float32 evaluations of a @ b (any leading dims flattened into a's rows)."""
    bound = (a.shape[-1] + 1) * 2.0**-23 * (a.abs() @ b.abs())
    assert ((actual.reshape(bound.shape) - expected.reshape(bound.shape)).abs() <= bound).all()


def two_paths(weight_shape, seed=0):
    """The same stored weight twice (a QLinear if 2-D, else a bank): on the default path (simulated on the CPU)
    and forced to scaled_mm."""
    g = torch.Generator().manual_seed(seed)
    w = quant.QLinear(*weight_shape[::-1]) if len(weight_shape) == 2 else quant.QuantizedWeight(weight_shape)
    w.set_float_(torch.randn(weight_shape, generator=g))
    fast = copy.deepcopy(w)
    quant.set_matmul_(fast, "scaled_mm")
    return w, fast


@needs_cpu_scaled_mm
@pytest.mark.parametrize("x_shape, out_features", [((5, 32), 16), ((2, 7, 48), 80), ((3, 4, 24), 8), ((1, 16), 40)])
def test_scaled_mm_forward_and_both_gradients_equal_the_simulated_path(x_shape, out_features):
    """QLinear on scaled_mm: output, input gradient and main_grad equal the simulated path's up to summation order."""
    sim, fast = two_paths((out_features, x_shape[-1]))
    assert not sim.runs_scaled_mm() and fast.runs_scaled_mm()
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    x_sim, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_sim, y_fast = sim(x_sim), fast(x_fast)
    assert y_fast.shape == y_sim.shape == (*x_shape[:-1], out_features) and y_fast.dtype == torch.float32
    x_q = quant.quantize_dequantize(x, "fp8_e4m3").reshape(-1, x_shape[-1])  # (N, in)
    w = sim.dequantized_weight()  # (out, in)
    assert_equal_up_to_summation(y_fast, y_sim, x_q, w.t())
    dy = torch.randn(y_sim.shape, generator=torch.Generator().manual_seed(2))
    y_sim.backward(dy)
    y_fast.backward(dy)
    dy = dy.reshape(-1, out_features)  # (N, out)
    assert_equal_up_to_summation(x_fast.grad, x_sim.grad, dy, w)  # dx = dy W, straight-through the rounding
    assert_equal_up_to_summation(fast.weight.main_grad, sim.weight.main_grad, dy.t(), x_q)  # dW = dy^T q(x)


@needs_cpu_scaled_mm
def test_scaled_mm_main_grad_accumulates_and_needs_no_input_grad():
    """On scaled_mm, a first layer (input without grad) gets main_grad, and two backward calls add up exactly."""
    sim, fast = two_paths((16, 32))
    x = torch.randn(6, 32)  # does not require grad
    dy = torch.randn(6, 16)
    sim(x).backward(dy)
    fast(x).backward(dy)
    once = fast.weight.main_grad.clone()
    assert_equal_up_to_summation(once, sim.weight.main_grad, dy.t(), quant.quantize_dequantize(x, "fp8_e4m3"))
    fast(x).backward(dy)
    assert torch.equal(fast.weight.main_grad, 2 * once)


@needs_cpu_scaled_mm
def test_scaled_mm_saves_codes_for_backward_not_a_dequantized_weight():
    """The scaled_mm path keeps 1-byte codes for the backward (the weight's own, the activations'); the simulated
    path keeps a float32 weight [out, in], which is what this check would catch."""
    def saved_by(module, x):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x)
        return saved

    sim, fast = two_paths((16, 32))
    x = torch.randn(4, 32, requires_grad=True)
    assert any(t.dtype == torch.float32 and t.numel() == 16 * 32 for t in saved_by(sim, x))  # W^T, a view
    saved = saved_by(fast, x)
    assert not any(t.dtype == torch.float32 and t.numel() >= 16 * 32 for t in saved)
    assert any(t.data_ptr() == fast.weight.data_ptr() for t in saved), "the stored codes themselves, no copy"
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}  # codes, and the float32 scales
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32) == 4 * (16 + 4)


@needs_cpu_scaled_mm
def test_bank_experts_on_either_path_equal_the_products_written_out_and_idle_experts_stay_zero():
    """An expert bank [E, out, in] called per expert, on either path: expert e's output, input gradient and
    main_grad[e] equal q(x) @ W[e]^T, dy @ W[e] and dy^T q(x) computed here, up to summation order, and the
    main_grad of the experts that did not run stays exactly 0."""
    x = torch.randn(5, 32)
    x_q = quant.quantize_dequantize(x, "fp8_e4m3")  # (5, in)
    dy = torch.randn(5, 16)
    for bank in two_paths((4, 16, 32)):
        for e in (2, 0):
            w = bank.dequantized_weight()[e]  # (out, in)
            x_e = x.clone().requires_grad_()
            y = bank(x_e, e)
            assert_equal_up_to_summation(y, x_q @ w.t(), x_q, w.t())
            y.backward(dy)
            assert_equal_up_to_summation(x_e.grad, dy @ w, dy, w)
            assert_equal_up_to_summation(bank.weight.main_grad[e], dy.t() @ x_q, dy.t(), x_q)
        assert (bank.weight.main_grad[[1, 3]] == 0).all()


@needs_cpu_scaled_mm
def test_moe_on_scaled_mm_matches_the_simulated_moe():
    """A quantized MoE with every bank on scaled_mm: output, input gradient and all three banks' main_grads
    match the simulated MoE to 1e-5 of their largest value. (Looser than the bound above: the expert hidden
    activations are rounded to FP8 again before the down bank, and a hidden value within float32 rounding of
    an FP8 rounding boundary would round differently on the two paths; at this seed none does.)"""
    torch.manual_seed(0)
    sim = MoE(n_embd=32, hidden=64, n_experts=4, top_k=2)
    for w in (sim.gate, sim.up, sim.down):
        nn.init.normal_(w.weight, std=0.2)
    nn.init.normal_(sim.router.weight, std=0.5)
    quant.quantize_linears_(sim, "fp8_e4m3", include=lambda name, m: name != "router")  # as GPT.quantize_
    fast = copy.deepcopy(sim)
    assert quant.set_matmul_(fast, "scaled_mm") == {"scaled_mm": 3} and quant.matmul_paths(sim) == {"simulated": 3}
    x = torch.randn(2, 16, 32)
    x_sim, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_sim, y_fast = sim(x_sim), fast(x_fast)
    dy = torch.randn_like(y_sim)
    y_sim.backward(dy)
    y_fast.backward(dy)
    pairs = [(y_fast, y_sim), (x_fast.grad, x_sim.grad)]
    pairs += [(getattr(fast, n).weight.main_grad, getattr(sim, n).weight.main_grad) for n in ("gate", "up", "down")]
    for actual, expected in pairs:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_formats_without_an_fp8_matmul_ignore_the_switch():
    """int8, int4 and fp8_e5m2 weights run the simulated path even when scaled_mm is forced: same bits."""
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(3, 32)
    for fmt in ("int8", "int4", "fp8_e5m2"):
        q = quant.QLinear.from_linear(lin, fmt)
        before = q(x)
        assert quant.set_matmul_(q, "scaled_mm") == {"simulated": 1} and not q.runs_scaled_mm()
        assert torch.equal(q(x), before)


def test_a_bad_matmul_path_is_refused_before_anything_changes():
    """An unknown path is a ValueError naming it and the accepted ones, and no weight's setting changes."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    quant.quantize_linears_(model, "fp8_e4m3")
    for call in (lambda: quant.set_matmul_(model, "fast"), lambda: quant.matmul_path("cpu", "fast")):
        with pytest.raises(ValueError, match=r"'fast'.*\['auto', 'scaled_mm', 'simulated'\]"):
            call()
    assert model[0].matmul == "auto"


def test_the_default_on_the_cpu_is_the_simulated_path_bit_for_bit():
    """Nothing changes a CPU result: "auto" is the default and resolves to simulated on the CPU, and a QLinear's
    output is exactly today's q(x) @ W^T in float32 with the dequantized weight."""
    assert quant.QuantizedWeight.matmul == "auto" and quant.matmul_path("cpu") == "simulated"
    model = GPT(GPTConfig(n_layer=1))
    model.quantize_("fp8_e4m3")
    assert quant.matmul_paths(model) == {"simulated": 5}  # qkv, proj, gate, up, down
    q = model.blocks[0].attn.qkv
    x = torch.randn(2, 3, 64)
    assert torch.equal(q(x), quant.quantize_dequantize(x, "fp8_e4m3") @ q.dequantized_weight().t())


def test_cuda_shapes_that_scaled_mm_cannot_take_fall_back():
    """CUDA's FP8 kernels need in and out to be multiples of 16; the CPU takes any shape."""
    assert quant.scaled_mm_takes((16, 32), "cuda") and quant.scaled_mm_takes((8, 48, 64), "cuda:0")
    assert not quant.scaled_mm_takes((24, 32), "cuda") and not quant.scaled_mm_takes((16, 40), "cuda")
    assert quant.scaled_mm_takes((24, 40), "cpu")


@pytest.mark.skipif(not (torch.cuda.is_available() and quant.scaled_mm_available(torch.device("cuda"))),
                    reason="needs a CUDA GPU with FP8 matmuls (compute capability 8.9+)")
def test_auto_is_scaled_mm_on_an_fp8_gpu_and_matches_the_simulated_path():
    """On an FP8 GPU "auto" runs scaled_mm (an unfit shape falls back), equal to simulated up to summation order."""
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.Linear(32, 24, bias=False)).cuda()
    quant.quantize_linears_(model, "fp8_e4m3")
    assert quant.matmul_path("cuda") == "scaled_mm" and quant.matmul_paths(model) == {"scaled_mm": 1, "simulated": 1}
    fast = model[0]
    sim = copy.deepcopy(fast)
    quant.set_matmul_(sim, "simulated")
    x = torch.randn(40, 64, device="cuda")
    x_q = quant.quantize_dequantize(x, "fp8_e4m3")
    y_fast, y_sim = fast(x), sim(x)
    assert_equal_up_to_summation(y_fast, y_sim, x_q, fast.dequantized_weight().t())
    dy = torch.randn_like(y_sim)
    y_fast.backward(dy)
    y_sim.backward(dy)
    assert_equal_up_to_summation(fast.weight.main_grad, sim.weight.main_grad, dy.t(), x_q)

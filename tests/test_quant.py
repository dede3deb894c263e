"""The two FP8 matmul paths of quant.py: torch._scaled_mm straight from the stored codes, and the simulated
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

import quant
from model import GPT, GPTConfig
from moe import MoE

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

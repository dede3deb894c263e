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
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import FP8_GRID, neighbours

import eco
import quant
import train
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
    """FP8 and int8 scale per row (an expert bank [E, out, in] per expert's row), int4 per tensor as absmax / 7,
    nvfp4 and mxfp4 per block of a row (nvfp4 with one tensor scale more)."""
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0))  # an expert bank [E, out, in]
    assert quant.quantize(x, "fp8_e4m3")[1].shape == (4, 6, 1)
    assert quant.quantize(x, "int8")[1].shape == (4, 6, 1)
    codes, scale = quant.quantize(x, "int4")
    assert codes.shape == (4, 6, 5) and codes.dtype == torch.uint8, "two codes per byte"
    assert scale.shape == (1, 1, 1) and quant.unpack(codes, "int4").abs().max() == 7
    assert torch.allclose(scale, x.abs().max() / 7)
    for fmt in ("nvfp4", "mxfp4"):
        codes, scale = quant.quantize(x, fmt)
        assert codes.shape == (4, 6, 5) and scale.block.shape == (4, 6, 1)
        assert (scale.tensor.shape == () and scale.tensor.dtype == torch.float32) if fmt == "nvfp4" else scale.tensor is None


def test_all_zero_rows_get_a_finite_scale():
    """An all-zero row gets a finite positive scale and stays exactly zero, in every format."""
    torch.manual_seed(0)
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    for fmt in quant.FORMATS:
        codes, scale = quant.quantize(x, fmt, "stochastic")
        s = quant.block_scale_values(scale, fmt) if quant.FORMATS[fmt].block else scale  # float32, per block or row
        assert torch.isfinite(s).all() and (s > 0).all()
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
# 4-bit formats: nvfp4 and mxfp4 (E2M1 values, block scales) and int4, all packed two codes per byte

FP4 = ["int4", "nvfp4", "mxfp4"]
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # the magnitudes, by nibble index
E2M1_GRID = torch.cat([-E2M1.flip(0)[:-1], E2M1])  # the 15 signed values, sorted


def e2m1_nearest(v):
    """Brute force, without quant.py: the nearest of the 15 values, a tie to the one of even magnitude index."""
    distance = (v[:, None] - E2M1_GRID[None]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values  # one or two candidates
    even = torch.searchsorted(E2M1, E2M1_GRID.abs()) % 2 == 0
    return E2M1_GRID[(nearest * (1 + even)).argmax(dim=1)]  # an even candidate wins a tie


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_e2m1_round_to_nearest_through_quantize_equals_a_brute_force_reference(fmt):
    """RTN onto E2M1 through quantize(), on blocks whose scale is exactly 1, equals the brute-force nearest value
    (ties to the even magnitude index) on every midpoint, its float32 neighbours and random values; the sign of a
    zero is kept."""
    mid = (E2M1_GRID[:-1] + E2M1_GRID[1:]) / 2
    v = torch.cat([E2M1_GRID, mid, mid.nextafter(torch.tensor(-9.0)), mid.nextafter(torch.tensor(9.0)),
                   torch.tensor([-0.0, 1e-30, -1e-30]), torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 12 - 6])
    block = quant.FORMATS[fmt].block
    v = torch.cat([v, torch.zeros(-len(v) % (block - 1))]).view(-1, block - 1)
    x = torch.cat([torch.full((len(v), 1), 6.0), v], dim=1)  # each row is one block, of absmax 6: scale 1
    if fmt == "nvfp4":  # and a first block of absmax 6 x 448 makes the tensor scale exactly 1
        x = torch.cat([F.pad(torch.tensor([[6.0 * 448]]), (0, block - 1)), x])
    codes, scale = quant.quantize(x, fmt)
    assert (quant.block_scale_values(scale, fmt)[-len(v):] == 1).all(), "the construction must give scale 1"
    got = quant.unpack(codes, fmt)[-len(v):, 1:].flatten()
    assert torch.equal(got, e2m1_nearest(v.flatten()))
    assert torch.equal(got.signbit(), v.flatten().signbit()), "-0.0 stays -0.0, +0.0 stays +0.0"


def test_e2m1_stochastic_rounding_is_unbiased_and_exact_on_the_grid():
    """SR onto the E2M1 grid (nvfp4's and mxfp4's) picks one of the two neighbours, is unbiased within 5 sd, and
    never moves a grid value."""
    f = quant.FORMATS["nvfp4"]
    assert (f.mantissa_bits, f.min_exponent, f.max) == (1, 0, 6.0) and quant.FORMATS["mxfp4"].max == 6.0
    y = torch.cat([E2M1_GRID, torch.linspace(-6, 6, 97), torch.rand(100, generator=torch.Generator().manual_seed(0)) * 12 - 6])
    n = 4000
    samples = quant.round_to_grid(y.expand(n, -1).contiguous(), f, "stochastic", torch.Generator().manual_seed(1))
    lo, hi = neighbours(y, E2M1_GRID)
    assert ((samples == lo) | (samples == hi)).all(), "SR must pick one of the two neighbours"
    p = torch.where(hi > lo, (y - lo) / (hi - lo), torch.zeros_like(y))
    sd = (hi - lo) * torch.sqrt(p * (1 - p) / n)
    assert ((samples.mean(0) - y).abs() <= 5 * sd + 1e-6).all(), "SR must be unbiased"
    assert (samples[:, lo == hi] == y[lo == hi]).all() and (lo == hi).sum() >= len(E2M1_GRID), "grid values stay"


def test_pack_and_unpack_are_lossless_for_every_nibble_and_byte():
    """Every nibble unpacks to its value (low nibble first; E2M1 0x8 is -0.0, int4 0x8 is -8), and
    pack(unpack(b)) == b for all 256 bytes in every packed format; quantize never writes int4's -8."""
    nibbles = torch.arange(16, dtype=torch.uint8)
    codes = nibbles | (nibbles.flip(0) << 4)  # byte i: low nibble i, high nibble 15 - i
    signed_e2m1 = torch.where(nibbles >= 8, -E2M1[nibbles.long() % 8], E2M1[nibbles.long() % 8])  # -0.0 at 8
    expected = dict(int4=torch.where(nibbles >= 8, nibbles.float() - 16, nibbles.float()),
                    nvfp4=signed_e2m1, mxfp4=signed_e2m1)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    for fmt in FP4:
        values = quant.unpack(codes, fmt)
        assert values.shape == (32,) and values.dtype == torch.float32
        assert torch.equal(values[0::2], expected[fmt]) and torch.equal(values[1::2], expected[fmt].flip(0))
        assert torch.equal(values.signbit(), torch.stack([expected[fmt], expected[fmt].flip(0)], 1).flatten().signbit())
        assert torch.equal(quant.pack(values, fmt), codes)
        assert torch.equal(quant.pack(quant.unpack(every_byte, fmt), fmt), every_byte)
    x = torch.tensor([[-3.0, 1.0, 0.5, -0.1]])  # the absmax at -7 x scale
    assert quant.unpack(quant.quantize(x, "int4")[0], "int4").tolist() == [[-7.0, 2.0, 1.0, -0.0]]


def test_nvfp4_scales_are_the_smallest_e4m3_values_that_clip_nothing():
    """nvfp4: the tensor scale is max(amax / (6 x 448), tiny); each block's E4M3 scale is the smallest E4M3 value
    >= amax(block) / (6 x tensor) (within [2^-9, 448]), so |x| <= 6 s up to float32 rounding; an all-zero block
    gets zero codes and the smallest scale; an all-zero tensor a finite one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 3, 8)[:, None]
    x[2, 16:32] = 0  # an all-zero block
    codes, scale = quant.quantize(x, "nvfp4")
    tensor = x.abs().max() / (6 * 448)
    assert scale.tensor.dtype == torch.float32 and scale.tensor.shape == () and torch.equal(scale.tensor, tensor)
    y = x.abs().view(8, 4, 16).amax(-1) / (6 * tensor)
    smallest_above = FP8_GRID[torch.searchsorted(FP8_GRID, y).clamp(max=len(FP8_GRID) - 1)].clamp(min=2.0 ** -9)
    assert scale.block.dtype == torch.float8_e4m3fn and torch.equal(scale.block.float(), smallest_above)
    assert (scale.block.float() < 448).any() and (y < 2.0 ** -9).any(), "the test must span the E4M3 range"
    s = quant.block_scale_values(scale, "nvfp4").repeat_interleave(16, dim=-1)
    assert (x.abs() <= 6 * s * (1 + 2.0 ** -22)).all(), "no value of a block needs more than 6 s"
    assert (codes[2, 8:16] == 0).all() and scale.block[2, 1].float() == 2.0 ** -9
    zeros = quant.quantize(torch.zeros(2, 16), "nvfp4")[1]
    assert zeros.tensor == torch.finfo(torch.float32).tiny and (quant.block_scale_values(zeros, "nvfp4") > 0).all()


def test_mxfp4_scales_are_the_smallest_powers_of_two_that_clip_nothing():
    """mxfp4: each block's scale is a power of two, the smallest with amax(block) <= 6 x scale (exactly, also at
    6 x 2^k and one float32 step above it); an all-zero block gets 2^-126 and zero codes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-30, 30, 8)[:, None]
    edges = torch.tensor([6.0, 3.0, 6.0 * 2.0 ** -20, 6.0 * 2.0 ** 40])
    x[:, 32:] = 0
    x[:, 32] = torch.cat([edges, edges.nextafter(torch.tensor(1e38))])  # second blocks: 6 x 2^k, one step above
    x[1, :32] = 0  # an all-zero block
    codes, scale = quant.quantize(x, "mxfp4")
    assert scale.tensor is None and scale.block.dtype == torch.uint8 and scale.block.shape == (8, 2)
    s, amax = quant.block_scale_values(scale, "mxfp4").double(), x.abs().view(8, 2, 32).amax(-1).double()
    assert torch.equal(s, 2.0 ** (scale.block.double() - 127)) and (torch.frexp(s).mantissa == 0.5).all()
    assert (amax <= 6 * s).all() and ((amax > 3 * s) | (amax == 0)).all(), "the smallest power of two"
    assert s[:, 1].tolist() == [1, 0.5, 2.0 ** -20, 2.0 ** 40, 2, 1, 2.0 ** -19, 2.0 ** 41], "6 x 2^k: 2^k; above: 2^(k+1)"
    assert s[1, 0] == 2.0 ** -126 and (codes[1, :16] == 0).all()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_a_partial_last_block_is_quantized_as_if_zero_padded(fmt):
    """A row of 40 values: ceil(40 / block) scales, and codes, scales and values equal those of the zero-padded row."""
    block = quant.FORMATS[fmt].block
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0))
    x[:, 32:] *= 100  # the partial block holds the largest values
    codes, scale = quant.quantize(x, fmt)
    padded_codes, padded_scale = quant.quantize(F.pad(x, (0, -40 % block)), fmt)
    assert codes.shape == (4, 20) and scale.block.shape == (4, -(-40 // block))
    assert torch.equal(codes, padded_codes[:, :20])
    assert torch.equal(scale.block.view(torch.uint8), padded_scale.block.view(torch.uint8))
    assert torch.equal(quant.dequantize(codes, scale, fmt), quant.dequantize(padded_codes, padded_scale, fmt)[:, :40])


@pytest.mark.parametrize("fmt", FP4)
def test_4bit_qlinear_packs_two_codes_a_byte_and_multiplies_like_f_linear(fmt):
    """A 4-bit QLinear [64, 256] holds uint8 codes [64, 128] (bytes per parameter: int4 0.5 + 4/numel, nvfp4
    0.5 + 1/16 + 4/numel, mxfp4 0.5 + 1/32, as train.memory_bytes counts them); its output and gradients are
    F.linear's with the dequantized weight, and main_grad has the weight's logical shape."""
    q = quant.QLinear(256, 64, fmt).set_float_(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)))
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 128) and q.weight.logical_shape == (64, 256)
    expected = {"int4": 0.5 + 4 / 16384, "nvfp4": 0.5 + 1 / 16 + 4 / 16384, "mxfp4": 0.5 + 1 / 32}[fmt]
    memory = train.memory_bytes(nn.Sequential(q), eco.ECOAdamW(q.parameters()))
    assert memory["quantized_params"] == 16384 and memory["bytes_per_quantized_param"] == expected
    w = q.dequantized_weight().requires_grad_()
    x = torch.randn(3, 5, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), F.linear(x_ref, w)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert q.weight.main_grad.shape == (64, 256) and torch.equal(q.weight.main_grad, w.grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("fmt", FP4)
def test_4bit_weights_survive_dtype_conversions_copies_and_a_state_dict(fmt):
    """.to(torch.float64) keeps the codes' and scales' dtypes; deepcopy and torch.save keep .fmt, .scale (linked to
    the buffers) and .logical_shape; a state_dict loaded into a fresh QLinear gives the same weight."""
    f = quant.FORMATS[fmt]
    q = quant.QLinear(32, 8, fmt).set_float_(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
    q.to(torch.float64)
    assert (q.weight.dtype, q.scale.dtype) == (torch.uint8, f.scale_dtype)
    assert (q.tensor_scale.dtype == torch.float32) if f.tensor_scale else q.tensor_scale is None
    buffer = io.BytesIO()
    torch.save(q, buffer)  # pickled (plain pickle fails on any float8 tensor in torch 2.13: the E4M3 block scales)
    buffer.seek(0)
    for clone in (copy.deepcopy(q), torch.load(buffer, weights_only=False)):
        assert clone.weight.fmt == fmt and clone.weight.logical_shape == (8, 32)
        scale = clone.weight.scale
        assert (scale.block is clone.scale and scale.tensor is clone.tensor_scale) if f.block else scale is clone.scale
        assert torch.equal(clone.dequantized_weight(), q.dequantized_weight())
    fresh = quant.QLinear(32, 8, fmt)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantized_weight(), q.dequantized_weight())
    assert quant.dequantize(fresh.weight, fresh.weight.scale, fmt).equal(q.dequantized_weight()), "still linked"


@pytest.mark.parametrize("fmt", FP4)
def test_a_4bit_moe_bank_runs_forward_and_backward_like_its_dequantized_float_bank(fmt):
    """An MoE with 4-bit expert banks [E, out, in] (nvfp4: block scales per expert row, one tensor scale per bank;
    int4: one scale per bank): output and main_grads equal those of the float MoE holding the dequantized banks,
    main_grad in the logical shape."""
    torch.manual_seed(0)
    moe = MoE(n_embd=32, hidden=64, n_experts=4, top_k=2)
    for w in (moe.gate, moe.up, moe.down):
        nn.init.normal_(w.weight, std=0.2)
    ref = copy.deepcopy(moe)
    quant.quantize_linears_(moe, fmt, include=lambda name, m: name != "router")
    assert moe.gate.weight.shape == (4, 64, 16) and moe.gate.weight.logical_shape == (4, 64, 32)
    if fmt == "nvfp4":
        assert moe.gate.scale.shape == (4, 64, 2) and moe.gate.tensor_scale.shape == ()
    for name in ("gate", "up", "down"):
        getattr(ref, name).weight.data = getattr(moe, name).dequantized_weight()
    x = torch.randn(2, 8, 32)
    y, y_ref = moe(x), ref(x)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for name in ("gate", "up", "down"):
        bank, bank_ref = getattr(moe, name).weight, getattr(ref, name).weight
        assert bank.main_grad.shape == bank.logical_shape == bank_ref.shape
        assert torch.equal(bank.main_grad, bank_ref.grad)


@pytest.mark.parametrize("rounding", quant.ROUNDINGS)
@pytest.mark.parametrize("mode", eco.MODES)
def test_ecoadamw_steps_nvfp4_weights_in_every_mode_and_resumes_from_a_state_dict(mode, rounding):
    """ECOAdamW on an nvfp4 QLinear (the reference path): codes move; state in the weight's logical shape (4096
    values: bf16 moments, as asked); master mode stores q(master) (RTN: exactly), naive and eco hold no copy; an
    optimizer loaded from its state_dict takes the same next step."""
    q = quant.QLinear(128, 32, "nvfp4").set_float_(0.05 * torch.randn(32, 128, generator=torch.Generator().manual_seed(0)))
    opt = eco.ECOAdamW([q.weight], lr=1e-2, mode=mode, rounding=rounding, moments="bf16", seed=3)
    start, g = q.weight.clone(), torch.Generator().manual_seed(1)
    for _ in range(4):
        q.weight.main_grad = torch.randn(32, 128, generator=g)
        opt.step()
        state = opt.state[q.weight]
        assert state["exp_avg"].shape == (32, 128) and state["exp_avg"].dtype == torch.bfloat16
        assert ("master" in state) == (mode == "master")
        if mode == "master":  # the scales do not depend on the rounding
            codes, scale = quant.quantize(state["master"], "nvfp4", "nearest")
            assert torch.equal(q.tensor_scale, scale.tensor)
            assert torch.equal(q.scale.view(torch.uint8), scale.block.view(torch.uint8))
            if rounding == "nearest":
                assert torch.equal(q.weight, codes), "stored = RTN(master)"
            else:
                y = state["master"] / quant.block_scale_values(scale, "nvfp4").repeat_interleave(16, dim=-1)
                lo, hi = neighbours(y.clamp(-6, 6), E2M1_GRID)
                got = quant.unpack(q.weight, "nvfp4")
                assert ((got == lo) | (got == hi)).all(), "stored = SR(master): a neighbour"
    assert (q.weight != start).any(), "codes moved: not vacuous"
    other = copy.deepcopy(q)
    resumed = eco.ECOAdamW([other.weight], lr=1e-2, mode=mode, rounding=rounding, moments="bf16", seed=0)
    resumed.load_state_dict(opt.state_dict())
    grad = torch.randn(32, 128, generator=g)
    for w, o in ((q, opt), (other, resumed)):
        w.weight.main_grad = grad.clone()
        o.step()
    assert torch.equal(q.weight, other.weight) and torch.equal(q.scale.view(torch.uint8), other.scale.view(torch.uint8))


def test_packed_formats_refuse_an_odd_last_dimension_before_anything_changes():
    """An odd last dimension is a ValueError naming the shape and the format, raised before any tensor or module
    changes: a QLinear, quantize, store_ and quantize_linears_ (which swaps nothing)."""
    with pytest.raises(ValueError, match=r"\(4, 7\).*nvfp4.*even"):
        quant.QLinear(7, 4, "nvfp4")
    with pytest.raises(ValueError, match=r"\(3, 5\).*int4"):
        quant.quantize(torch.ones(3, 5), "int4")
    w = quant.QuantizedWeight((4, 8), "int4").set_float_(torch.randn(4, 8))
    before = w.weight.clone(), w.scale.clone()
    with pytest.raises(ValueError, match=r"\(4, 7\).*int4"):
        quant.store_(w.weight, w.scale, torch.ones(4, 7), "int4")
    assert torch.equal(w.weight, before[0]) and torch.equal(w.scale, before[1])
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(7, 8, bias=False))
    with pytest.raises(ValueError, match=r"1\.weight.*\(8, 7\).*mxfp4"):
        quant.quantize_linears_(model, "mxfp4")
    assert type(model[0]) is nn.Linear, "nothing was swapped before the error"


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


def test_mxfp4_refuses_values_its_largest_scale_would_store_as_inf():
    """Above 3 x 2^126 the rounded-up power-of-two scale is 2^127 and a code of 4 or 6 is inf: refused, naming the
    limit; the limit itself is stored exactly."""
    row = torch.zeros(1, 32)
    row[0, 0] = quant.MXFP4_LIMIT
    assert quant.quantize_dequantize(row, "mxfp4")[0, 0] == quant.MXFP4_LIMIT
    row[0, 0] = 3e38
    with pytest.raises(ValueError, match=r"mxfp4 cannot hold \|x\| = 3e\+38.*3 x 2\^126"):
        quant.quantize(row, "mxfp4")

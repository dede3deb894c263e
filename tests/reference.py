"""
What the tests compare with, and the small set-ups several test files share (test_eco.py imports it too).

The references are computed independently of the code under test: the FP8 grid by enumerating all 256 codes
through PyTorch's own float8 dtype, bfloat16 neighbours from bit patterns, a torch.optim.AdamW step. The rest
builds inputs: a tiny model and its training loop, quantized weights on a known grid, the kernel's inputs,
and a small data set prepared offline from the repository's own source files.

Importing this module puts the repository's modules and data/prepare.py on sys.path.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "data")):  # the flat repository's modules and data/prepare.py
    if path not in sys.path:
        sys.path.insert(0, path)

import eco  # noqa: E402
import prepare  # noqa: E402  data/prepare.py
import quant  # noqa: E402

# -----------------------------------------------------------------------------
# Grids, enumerated without quant.py

ALL_FP8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
FP8_GRID = torch.unique(ALL_FP8[torch.isfinite(ALL_FP8)])  # the 253 distinct finite E4M3 values, sorted


def neighbours(y, grid):
    """Independent of quant.py: the grid points just below-or-at and just above-or-at y."""
    hi = grid[torch.searchsorted(grid, y, right=False).clamp(max=len(grid) - 1)]
    lo = grid[(torch.searchsorted(grid, y, right=True) - 1).clamp(min=0)]
    return lo, hi


def bfloat16_neighbours(x):
    """Independent of quant.py: the bfloat16 values just nearer to and just farther from zero than x (equal if exact)."""
    lo = (x.view(torch.int32) & -65536).view(torch.float32)  # truncation
    return lo, torch.where(lo == x, x, (lo.view(torch.int32) + 65536).view(torch.float32))


def storage_neighbours(exact, moments):
    """The two values of the moments' storage grid around each exact float32 moment (independent enumeration)."""
    if moments == "bf16":
        return bfloat16_neighbours(exact)
    scale = quant.quantize_blocks(exact, "fp8_e4m3", eco.MOMENT_BLOCK)[1]  # the scale does not depend on rounding
    s = scale.repeat_interleave(eco.MOMENT_BLOCK, dim=-1)[..., :exact.shape[-1]]
    lo, hi = neighbours(exact / s, FP8_GRID)
    return lo * s, hi * s


# -----------------------------------------------------------------------------
# The optimizer: inputs, a tiny model, quantized weights on a known grid

def adamw_args(seed, shape=(7, 33)):
    """A seeded random weight and 60 gradients for it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(60)]


def tiny_model(fmt="fp8_e4m3"):
    """Embedding, a quantized 24 x 24 Linear (model[1]), ReLU, float head: a task of 16 tokens, learnt in seconds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 24), nn.Linear(24, 24, bias=False), nn.ReLU(), nn.Linear(24, 16, bias=False))
    quant.quantize_linears_(model, fmt, include=lambda name, m: name == "1")
    return model


def train_steps(model, opt, steps, seed):
    """`steps` steps of predicting the next token mod 16 on seeded random batches; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 16, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(idx), (idx + 1) % 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def make_optimizer(name, params, mode, **kw):
    """ECOAdamW ("adamw") or ECOSGD ("sgd") in `mode`, with the tests' learning rates and weight decay."""
    if name == "adamw":
        return eco.ECOAdamW(params, lr=1e-2, weight_decay=0.1, mode=mode, **kw)
    return eco.ECOSGD(params, lr=0.1, weight_decay=0.1, mode=mode, **kw)


# Constructor defaults that no param group uses: a step that reads them instead of its group's fails.
DECOY_ADAMW = dict(lr=0.5, betas=(0.5, 0.6), eps=0.1, weight_decay=0.7)
GRID = 2.0 ** -7  # the scale of grid_weight(): one int8 grid step


def quantized_weight(shape, fmt, seed):
    """A QuantizedWeight holding the round-to-nearest codes of a seeded random float weight."""
    g = torch.Generator().manual_seed(seed)
    return quant.QuantizedWeight(shape, fmt).set_float_(0.1 * torch.randn(shape, generator=g))


def grid_weight(rows=8, cols=64, seed=0):
    """int8 codes in [-100, 100] with scale 2^-7, and code 127 in column 0 of every row. Column 0 gets a zero
    gradient in the tests, so each row's absmax (127 * 2^-7, exact) and hence its scale stay exactly put."""
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
    """A quantized parameter's codes, as float32."""
    return p.detach().float()  # every code of every format is exact in float32


def set_grad(p, grad):
    """Quantized weights hand their gradient to the optimizer in main_grad, float ones in .grad."""
    if eco.is_quantized(p):
        p.main_grad = grad.clone()
    else:
        p.grad = grad.clone()


# -----------------------------------------------------------------------------
# The fused kernel, through Triton's interpreter on the CPU (compiled on a GPU when there is one)

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


# -----------------------------------------------------------------------------
# data/prepare.py and train.py, through their real entry points, on a small local text

def repo_text(*names):
    """Text for small data sets: the repository's own source files."""
    return "".join(open(os.path.join(ROOT, name)).read() for name in names)


def prepare_small_data(root):
    """A data folder prepared offline in root from the repository's own code (a 300-token BPE: fast): its path.
    The text it was prepared from is root / "input.txt"."""
    (root / "input.txt").write_text(repo_text("eco.py", "quant.py", "model.py"))
    prepare.prepare(str(root / "tiny"), str(root / "input.txt"), vocab_size=300)
    return root / "tiny"


def tiny_args(data_dir, out_dir, *extra):
    """train.py options for a run of seconds: a one-layer model of width 32, 6 steps, evaluated at 3 and 6."""
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--max_steps=6", "--eval_interval=3", "--eval_batches=2",
            "--log_interval=3", "--sample_tokens=0", *extra]


def json_load(path):
    """The JSON document in the file at path (results.json, meta.json)."""
    with open(path) as f:
        return json.load(f)

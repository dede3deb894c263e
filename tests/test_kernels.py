"""kernels.py on every GPU, checked without one: the FP8 bytes the kernel encodes and decodes itself (through
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
import os
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script, without conftest.py

import quant  # noqa: E402

triton = pytest.importorskip("triton")  # every test here needs triton (Linux)
tl = triton.language
import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
FP8 = [name for name, f in quant.FORMATS.items() if f.mantissa_bits is not None]
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
    codes, values = codes[values.isfinite()].to(DEVICE), values[values.isfinite()].to(DEVICE)  # E4M3: 254, E5M2: 248
    assert (values.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).sum() == 1  # the code 0x80
    decoded, encoded = torch.empty_like(values), torch.empty_like(codes)
    _decode_and_encode[(1,)](codes, values, decoded, encoded, len(codes), f.mantissa_bits, f.min_exponent, BLOCK=256)
    assert torch.equal(decoded.view(torch.int32), values.view(torch.int32))
    assert torch.equal(encoded, values.to(f.dtype).view(torch.uint8))


def test_fusable_accepts_the_row_wise_formats_every_storage_and_the_gpus_that_compile():
    """fusable accepts the row-wise formats with every storage, in the interpreter and on CAPABILITIES, nothing else."""
    for capability in (None, (7, 5), (8, 0), (9, 0), (12, 0)):
        assert all(kernels.fusable(fmt, moments, capability) for fmt in ROW_FORMATS for moments in kernels.MOMENTS)
    assert not any(kernels.fusable("int4", moments, None) for moments in kernels.MOMENTS)
    assert not kernels.fusable("fp8_e4m3", "fp16", (9, 0))
    assert not any(kernels.fusable("fp8_e4m3", "fp32", c) for c in [*REFUSED_GPUS, (3, 7), (13, 0)])
    with pytest.raises(ValueError, match="'fp4'.*accepted"):
        kernels.fusable("fp4", "fp32", (9, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ecoadamw_on_a_gpu_fusable_refuses_takes_the_reference_path(monkeypatch):
    """On a GPU fusable refuses (claimed: 10.1), fused=True is a ValueError; the default steps without the kernel."""
    import eco
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
    import eco
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

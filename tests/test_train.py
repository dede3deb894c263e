"""
train.py through its real entry point, on a small local text, in runs of seconds: every method and variant
runs, resumes and fine-tunes; options are checked before anything is created, naming the value and what is
accepted; the learning-rate schedule; gradient clipping; batches and seeds; torchrun and --grad_accum, bit for
bit where the arithmetic allows; the options for the GPUs people have (the BF16 baseline, bfloat16 float parts,
the FP8 matmul path) and several seeds with paired intervals. (That every method sees the same weights and
batches is in test_eco.py; refusals, crashes and SIGKILL in test_resilience.py.)
"""
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import eco
import quant
import runs
import train
from model import GPT, GPTConfig
from reference import ROOT, json_load, tiny_args


# -----------------------------------------------------------------------------
# train.py: every method and variant runs, resumes, fine-tunes, and refuses bad options

def tiny_train_args(data_dir, out_dir, *extra):
    """tiny_args, with a sample of 4 tokens from each trained model."""
    return tiny_args(data_dir, out_dir, "--sample_tokens=4", *extra)


def test_train_runs_every_method_and_writes_results(small_data, tmp_path, capsys):
    """train.py trains all six methods and writes results.json: losses, curves, bytes per parameter, codes moved;
    and curves.png, or without matplotlib no figure at all: an older one would show another run's curves."""
    (tmp_path / "curves.png").write_bytes(b"an older figure")
    results = train.main(tiny_train_args(small_data, tmp_path))
    out, figure = capsys.readouterr().out, tmp_path / "curves.png"
    if runs.pyplot() is None:
        assert "(no curves.png: no matplotlib" in out and not figure.exists()
    else:
        assert "results.json and curves.png" in out and figure.read_bytes().startswith(b"\x89PNG")
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
    """At lr = 0 no method moves a code: the moved fraction counts changes, not roundings."""
    # lr = 0: theta is exactly the stored grid value, so every rounding gives back the same code
    results = train.main(tiny_train_args(small_data, tmp_path, "--lr=0", "--methods=naive_rtn,eco_sr,master_rtn"))
    assert [r["moved"] for r in results.values()] == [0.0, 0.0, 0.0]


def test_a_4bit_zero_that_flips_its_sign_is_not_a_moved_code(small_data, tmp_path, monkeypatch):
    """E2M1 keeps -0 (round-to-nearest gives it to small negative values), and -0 = +0: counting changed bits would
    report a stuck naive RTN run as moving. Updates of 1e-9 move no NVFP4 value, whatever their sign."""
    flips = []
    real_step = eco.ECOAdamW.step

    def step(self, closure=None):
        before = [p.clone() for p in self._params() if eco.is_quantized(p)]
        real_step(self, closure)
        after = [p for p in self._params() if eco.is_quantized(p)]
        flips.append(sum(((a ^ b) != 0).sum().item() for a, b in zip(before, after)))

    monkeypatch.setattr(eco.ECOAdamW, "step", step)
    results = train.main(tiny_train_args(small_data, tmp_path, "--lr=1e-9", "--fmt=nvfp4", "--methods=naive_rtn"))
    assert sum(flips) > 0, "bytes changed (zeros flipped sign) ..."
    assert results["nvfp4_naive_rtn"]["moved"] == 0.0, "... but no value moved"


@pytest.mark.parametrize("extra", [["--model=moe", "--methods=eco_sr"], ["--fmt=int4", "--methods=master_rtn,eco_rtn"],
                                   ["--optimizer=muon", "--model=moe", "--moments=fp8", "--methods=fp32,naive_sr,eco_sr"],
                                   ["--fmt=nvfp4", "--model=moe", "--methods=master_rtn,eco_sr"]])
def test_train_moe_int4_muon_and_nvfp4_variants(small_data, tmp_path, extra):
    """The MoE model, int4 weights, Muon (with an fp8 momentum, on the MoE's expert banks too) and NVFP4 expert banks
    train to finite losses."""
    results = train.main(tiny_train_args(small_data, tmp_path, *extra))
    assert all(math.isfinite(r["val_loss"]) for r in results.values())


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_muon_steps_the_block_matrices_and_adamw_the_rest_with_each_its_peak_lr(model):
    """--optimizer=muon: one Muon group of every matrix inside the blocks (quantized or not, router included), the
    embeddings and norm gains on AdamW, each group scheduled from its own peak."""
    c = dict(train.DEFAULTS, optimizer="muon", model=model, muon_lr=0.05)
    for quantized in (False, True):
        net = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=32, mlp=model))
        if quantized:
            net.quantize_("fp8_e4m3")
        opt = train.make_optimizer(net, c, "eco", "stochastic")
        muon = [g for g in opt.param_groups if g["use_muon"]]
        blocks = {id(p) for n, p in net.named_parameters() if n.startswith("blocks.") and p.dim() >= 2}
        assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == blocks
        assert [g["peak_lr"] for g in opt.param_groups] == [0.05, c["lr"], c["lr"]]
        assert train.get_lr(c["max_steps"], c, 0.05) == pytest.approx(0.05 * c["final_lr_frac"])


def test_train_resume_continues_identically(small_data, tmp_path):
    """A run stopped at step 3 and resumed logs the same curve as a run straight through."""
    args = tiny_train_args(small_data, tmp_path, "--methods=eco_sr,master_rtn", "--save_checkpoint=True")
    straight = train.main(args)
    train.main(args + ["--stop_at=3"])
    resumed = train.main(args + ["--resume=True"])
    for name in straight:
        assert resumed[name]["curve"] == straight[name]["curve"]


def test_resume_without_a_checkpoint_starts_that_method_from_step_0(small_data, tmp_path, capsys):
    """--resume=True without a checkpoint says so and trains that method from step 0."""
    results = train.main(tiny_args(small_data, tmp_path, "--methods=eco_sr", "--resume=True"))
    assert f"no checkpoint at {tmp_path / 'ckpt_fp8_eco_sr.pt'} yet, starting from step 0" in capsys.readouterr().out
    assert [s for s, _ in results["fp8_eco_sr"]["curve"]] == [3, 6]


def test_train_finetunes_from_a_full_precision_checkpoint(small_data, tmp_path):
    """--init_from fine-tunes a full-precision checkpoint (its architecture from it); an FP8 one is refused."""
    train.main(tiny_train_args(small_data, tmp_path / "pre", "--methods=fp32", "--save_checkpoint=True"))
    ckpt = tmp_path / "pre" / "ckpt_fp32.pt"
    results = train.main(tiny_train_args(small_data, tmp_path / "ft", "--fmt=int4", "--methods=eco_sr",
                                         f"--init_from={ckpt}", "--n_embd=64"))  # architecture comes from ckpt
    assert math.isfinite(results["int4_eco_sr"]["val_loss"])
    assert [s for s, _ in results["int4_eco_sr"]["curve"]] == [0, 3, 6], "fine-tuning logs the quantized start"
    train.main(tiny_train_args(small_data, tmp_path / "ft2", "--methods=eco_sr", "--save_checkpoint=True"))
    with pytest.raises(ValueError, match="full-precision"):  # an FP8 checkpoint is not a starting point
        train.main(tiny_train_args(small_data, tmp_path / "ft3", f"--init_from={tmp_path / 'ft2' / 'ckpt_fp8_eco_sr.pt'}"))


def test_train_rejects_bad_options():
    """An unknown option, a mistyped value, method, format or preset fails loudly, listing what is valid."""
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
    """get_lr warms up linearly to the peak, reached exactly, then decays to final_lr_frac; off by one step fails."""
    c = train.parse_args(extra)
    check_schedule_corners(train.get_lr, c)
    for shift in (-1, 1):  # the check sees a warm-up that is one step too short or too long
        with pytest.raises(AssertionError):
            check_schedule_corners(lambda step, c: train.get_lr(step + shift, c), c)


# -----------------------------------------------------------------------------
# train.py: gradient clipping, through the training loop

@pytest.mark.parametrize("grad_clip", ["1e-3", "0"])
def test_clipping_scales_main_grads_like_float_grads_and_zero_disables_it(small_data, tmp_path, monkeypatch, grad_clip):
    """--grad_clip scales main_grads and float grads by one factor; --grad_clip=0 leaves every gradient alone."""
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
    train.main(tiny_args(small_data, tmp_path, "--methods=eco_sr", "--max_steps=2", "--eval_interval=2",
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
    """An infinite gradient norm ends the method as diverged, like a NaN loss, and says so."""
    real_clip = eco.clip_grad_norm_

    def infinite_gradient(params, max_norm):
        params = list(params)
        eco.grad_of(params[0]).fill_(math.inf)
        return real_clip(params, max_norm)

    monkeypatch.setattr(eco, "clip_grad_norm_", infinite_gradient)
    results = train.main(tiny_args(small_data, tmp_path, "--methods=fp32,eco_sr"))
    assert all(r["diverged"] and math.isnan(r["val_loss"]) and r["curve"] == [] for r in results.values())
    assert capsys.readouterr().out.count("diverged at step 0 (the global gradient norm is inf") == 2


# -----------------------------------------------------------------------------
# train.py: option checks, before anything is created, naming the value and what is accepted

BAD_OPTIONS = [  # (arguments, what the error must say): options that only train.py checks
    *[([f"--{k}=0"], f"--{k}=0 ") for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
                                            "eval_interval", "eval_batches", "log_interval", "n_experts")],
    (["--stop_at=-1"], "--stop_at=-1 "), (["--max_steps=10", "--stop_at=11"], "--stop_at=11 .*max_steps=10"),
    (["--warmup_frac=1.5"], "--warmup_frac=1.5 .*\\[0, 1\\]"), (["--warmup_start=-0.5"], "--warmup_start=-0.5 "),
    (["--final_lr_frac=-0.1"], "--final_lr_frac=-0.1 "), (["--grad_clip=-1"], "--grad_clip=-1.0 .*0: no clipping"),
    (["--device=gpu"], "--device='gpu' .*cuda:N"), (["--sample_tokens=-1"], "--sample_tokens=-1 "),
    (["--seed=-1"], "--seed=-1 "), (["--seeds=0"], "--seeds=0 "), (["--seeds=2", "--jobs=3"], "--jobs=3 .*seeds=2"),
    (["--model=sparse"], "--model='sparse' .*dense, moe"), (["--methods=eco_sr,eco_sr"], "--methods='eco_sr,eco_sr' "),
    (["--optimizer=sgd"], "--optimizer='sgd' .*adamw, muon"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_parse_args_rejects_each_out_of_range_option_naming_it(argv, message):
    """Each out-of-range option is refused by parse_args, naming it and what is accepted."""
    with pytest.raises(ValueError, match=message) as error:
        train.parse_args(argv)
    assert "accepted: " in str(error.value)


BUILD_ERRORS = [  # options checked once, by the constructor that uses them (the optimizer, GPT, MoE)
    (["--lr=-1"], "invalid lr=-1.0; accepted"), (["--lr=inf"], "invalid lr=inf"), (["--lr=nan"], "invalid lr=nan"),
    (["--beta1=0"], "invalid beta1=0.0; accepted: a finite number in \\(0.0, 1.0\\)"), (["--beta1=1"], "invalid beta1=1.0"),
    (["--beta2=1"], "invalid beta2=1.0; accepted: a finite number in \\[0.0, 1.0\\)"), (["--eps=0"], "invalid eps=0.0"),
    (["--weight_decay=-0.1"], "invalid weight_decay=-0.1"), (["--moments=int8"], "unknown moments 'int8'; accepted"),
    (["--injection=exact"], "unknown injection 'exact'; accepted: \\['paper', 'next_lr'\\]"),
    (["--model=moe", "--top_k=9"], "top_k=9; accepted: 1 to n_experts=8"), (["--model=moe", "--top_k=0"], "top_k=0"),
    (["--n_head=3"], "n_embd=32 must split into n_head=3"), (["--n_embd=34"], "n_embd=34 must split into n_head=2"),
    (["--optimizer=muon", "--muon_lr=-1"], "invalid lr=-1.0"), (["--optimizer=muon", "--muon_momentum=1"],
                                                                "invalid momentum=1.0"),
]


@pytest.mark.parametrize("argv, message", BUILD_ERRORS, ids=[" ".join(a) for a, _ in BUILD_ERRORS])
def test_options_checked_by_constructors_are_refused_before_out_dir_is_created(small_data, tmp_path, argv, message):
    """The model and an optimizer are built over the initial weights before out_dir is touched: same clear errors."""
    with pytest.raises(ValueError, match=message):
        train.main(tiny_args(small_data, tmp_path / "out", *argv))
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_or_too_long_blocks_are_refused_before_anything_is_created(small_data, tmp_path):
    """A missing data folder or a block longer than the split is refused before any folder is created."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nowhere"):
        train.main(tiny_args(tmp_path / "nowhere", out))
    assert not (tmp_path / "nowhere").exists() and not out.exists(), "a typo must not create a data set"
    with pytest.raises(ValueError, match="--block_size=100000 is too long for the train split"):
        train.main(tiny_args(small_data, out, "--block_size=100000"))
    assert not out.exists()


# -----------------------------------------------------------------------------
# train.py: batches and seeds

def test_micro_batch_0_is_the_batch_of_a_plain_run_and_every_micro_batch_is_its_own(small_data):
    """get_batch is the formula below: numpy's generator keyed by (seed, stream, step, micro) for training and by
    (stream, step) alone for validation; every (step, micro) of a run, however large, gets a batch of its own."""
    c = train.parse_args(tiny_train_args(small_data, "unused"))
    data = np.memmap(os.path.join(small_data, "train.bin"), dtype=np.uint16, mode="r")

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
    data = np.memmap(os.path.join(small_data, "train.bin"), dtype=np.uint16, mode="r")
    c1, c2 = (train.parse_args(tiny_train_args(small_data, "unused", f"--seed={s}")) for s in (1, 2))
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


# -----------------------------------------------------------------------------
# train.py under torchrun (gloo on the CPU) and --grad_accum: N ranks x K micro-batches = one process x N*K

def run_train(ranks, data_dir, out_dir, *extra):
    """train.py in fresh processes: torchrun with that many ranks, or plain python for ranks=0. One thread per
    process, so that the runs compared below differ only in how the micro-batches are split."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else []
    args = tiny_args(data_dir, out_dir, *extra)
    run = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def two_ranks(small_data, tmp_path_factory):
    """Every method trained by 2 ranks of 1 micro-batch each: (out_dir, log). A clean exit means that the ranks
    held the same state_hash at every evaluation (train.py checks it there)."""
    out = tmp_path_factory.mktemp("two_ranks")
    code, log = run_train(2, small_data, out)
    assert code == 0, log
    return out, log


def test_two_ranks_train_the_run_of_one_process_with_two_micro_batches_bit_for_bit(small_data, two_ranks, tmp_path):
    """Two ranks of one micro-batch train the run of one process of two, bit for bit; rank 1 prints nothing."""
    # One process adds g0/2 + g1/2, two ranks (g0 + g1)/2: halving is exact and a sum of two float32 terms does
    # not depend on their order, so every gradient, hence every weight, moment, code and draw, is bit-identical
    out, log = two_ranks
    code, plain_log = run_train(0, small_data, tmp_path, "--grad_accum=2")
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
    """Two ranks of two micro-batches match one process of four, to float32 rounding."""
    # Four float32 terms: (g0 + g1) + (g2 + g3) over ranks, ((g0 + g1) + g2) + g3 in one process. The two orders
    # round differently in the last bits, so masters and moments drift by float32 rounding (their state_hashes
    # differ) and a code at a rounding boundary may go the other way: close, not bit for bit
    code, log = run_train(2, small_data, tmp_path / "ranks", "--grad_accum=2", "--methods=master_rtn,eco_sr")
    assert code == 0, log
    code, log = run_train(0, small_data, tmp_path / "plain", "--grad_accum=4", "--methods=master_rtn,eco_sr")
    assert code == 0, log
    ranks, plain = json_load(tmp_path / "ranks" / "results.json"), json_load(tmp_path / "plain" / "results.json")
    assert ranks["config"]["micro_batches"] == plain["config"]["micro_batches"] == 4
    for name in ("fp8_master_rtn", "fp8_eco_sr"):
        a, b = ranks["methods"][name], plain["methods"][name]
        assert [s for s, _ in a["curve"]] == [s for s, _ in b["curve"]] == [3, 6]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4), name
        for (_, x), (_, y) in zip(a["moved_curve"], b["moved_curve"]):
            assert x == pytest.approx(y, abs=1e-3), name


def test_a_run_that_changes_the_micro_batches_is_refused_on_every_rank(small_data, two_ranks):
    """A run with other micro-batches or another lr is refused, on every rank, before out_dir changes."""
    out, _ = two_ranks
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def check(*extra):
        c = train.parse_args(tiny_train_args(small_data, out, *extra))
        return runs.check_out_dir(c, [train.method_name(m, c) for m in train.method_list(c)])

    # 1 process x 2 micro-batches is the same run: its results are those of the two ranks
    assert list(check("--grad_accum=2")) == ["fp32", "fp8_master_rtn", "fp8_naive_rtn", "fp8_naive_sr",
                                             "fp8_eco_rtn", "fp8_eco_sr"]
    with pytest.raises(ValueError, match="results.json comes from a run with other settings: micro_batches=2 there, 1 now"):
        check()
    # Under torchrun every rank reads out_dir and refuses before the ranks connect: the launcher stops the others
    # at the first failure and returns (the timeout would catch a hang); out_dir is left as it was
    code, log = run_train(2, small_data, out, "--lr=0.001")
    assert code != 0
    assert "ValueError: " in log and "comes from a run with other settings: lr=0.003 there, 0.001 now" in log, log
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("mode", ["eco", "master"])
def test_state_hash_sees_every_byte_of_weights_scales_moments_and_the_rounding_generator(mode):
    """state_hash changes with any bit of codes, scales, weights, moments or master, the step or the generator."""
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
    """Replicas whose hashes differ fail loudly, naming the method, the step, the odd ranks and every hash."""
    with pytest.raises(RuntimeError, match=r"^fp8_eco_sr step 6: the replicas drifted apart: ranks \[1, 3\] ") as error:
        runs.check_replicas(["aa", "bb", "aa", "cc"], 6, "fp8_eco_sr")
    assert "['aa', 'bb', 'aa', 'cc']" in str(error.value)  # every rank's hash, for the bug report
    assert runs.check_replicas(["aa"] * 4, 6, "fp8_eco_sr") is None
    assert runs.check_replicas(["aa"], 6, "fp8_eco_sr") is None  # one process: nothing to compare


# -----------------------------------------------------------------------------
# train.py's options for the GPUs people have, and several seeds with paired intervals

def test_the_bf16_baseline_and_dtype_bfloat16_run_under_autocast_and_are_recorded(small_data, tmp_path):
    """bf16 is the float model under bfloat16 autocast (float32 master weights, so 12 B/param like fp32); the
    quantized methods follow --dtype; fp32 stays float32 whatever --dtype says."""
    rows = train.main(tiny_args(small_data, tmp_path / "a", "--methods=fp32,bf16,eco_sr"))
    assert [rows[m]["dtype"] for m in ("fp32", "bf16", "fp8_eco_sr")] == ["float32", "bfloat16", "float32"]
    assert rows["bf16"]["bytes_per_param"] == rows["fp32"]["bytes_per_param"] == 12.0
    assert rows["bf16"]["val_loss"] != rows["fp32"]["val_loss"] and abs(rows["bf16"]["val_loss"] -
                                                                        rows["fp32"]["val_loss"]) < 0.05
    bf16 = train.main(tiny_args(small_data, tmp_path / "b", "--methods=fp32,eco_sr", "--dtype=bfloat16"))
    assert bf16["fp32"]["val_loss"] == rows["fp32"]["val_loss"] and bf16["fp8_eco_sr"]["dtype"] == "bfloat16"
    assert bf16["fp8_eco_sr"]["val_loss"] != rows["fp8_eco_sr"]["val_loss"]
    assert all(math.isfinite(r["val_loss"]) for r in (*rows.values(), *bf16.values()))


def test_the_fp8_matmul_path_and_the_fused_kernel_are_recorded_per_method(small_data, tmp_path):
    """On the CPU auto means simulated (results unchanged); scaled_mm can be forced and is then what ran."""
    auto = train.main(tiny_args(small_data, tmp_path / "auto", "--methods=fp32,eco_sr"))
    assert auto["fp32"]["matmul"] == {} and auto["fp8_eco_sr"]["matmul"] == {"simulated": 5}
    assert auto["fp8_eco_sr"]["fused"] is False and auto["fp8_eco_sr"]["peak_memory"] is None
    forced = train.main(tiny_args(small_data, tmp_path / "forced", "--methods=eco_sr", "--fp8_matmul=scaled_mm"))
    assert forced["fp8_eco_sr"]["matmul"] == {"scaled_mm": 5}
    assert abs(forced["fp8_eco_sr"]["val_loss"] - auto["fp8_eco_sr"]["val_loss"]) < 1e-3
    int8 = train.main(tiny_args(small_data, tmp_path / "int8", "--methods=eco_sr", "--fmt=int8",
                                "--fp8_matmul=scaled_mm"))
    assert int8["int8_eco_sr"]["matmul"] == {"simulated": 5}, "only fp8_e4m3 has an FP8 matmul"


@pytest.mark.parametrize("argv, message", [(["--dtype=float16"], "--dtype='float16' is out of range; accepted: "
                                            "float32, bfloat16"),
                                           (["--fp8_matmul=fast"], f"accepted: {', '.join(quant.MATMUL_PATHS)}")])
def test_bad_dtype_and_matmul_path_are_refused(argv, message):
    """A bad --dtype or --fp8_matmul is refused by parse_args, naming what is accepted."""
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)


def test_t_quantiles_and_a_paired_interval():
    """Student's t quantiles to 4 decimals (tables: 12.7062, 4.3027, 2.7764, 2.2622) and the interval's arithmetic."""
    assert [round(runs.t_quantile(df), 4) for df in (1, 2, 4, 9)] == [12.7062, 4.3027, 2.7764, 2.2622]
    mean, half = runs.paired_interval([0.01, 0.02, -0.005, 0.015, 0.0])
    sd = (sum((d - 0.008) ** 2 for d in [0.01, 0.02, -0.005, 0.015, 0.0]) / 4) ** 0.5
    assert math.isclose(mean, 0.008) and math.isclose(half, 2.7764451 * sd / 5 ** 0.5, rel_tol=1e-6)
    assert math.isnan(runs.paired_interval([0.01])[1])


def test_an_interval_reads_resolved_only_when_it_excludes_zero(tmp_path, capsys):
    """verdict: nan (one seed, a diverged run) is no interval, never "resolved"; a method that diverged in a seed
    gets no mean and no interval, and if master weights diverged no method gets an interval."""
    assert runs.verdict(-0.01, 0.02) == "contains 0: unresolved" and runs.verdict(0.0, 0.1) == "contains 0: unresolved"
    assert runs.verdict(0.01, 0.02) == "resolved: higher" and runs.verdict(-0.02, -0.01) == "resolved: lower"
    assert runs.verdict(math.nan, math.nan).startswith("no interval")
    nan, c = math.nan, dict(seed=1, seeds=2, out_dir=str(tmp_path))
    rows = {"1": dict(fp8_master_rtn=dict(val_loss=4.0), eco=dict(val_loss=nan, diverged=True), sr=dict(val_loss=4.2)),
            "2": dict(fp8_master_rtn=dict(val_loss=4.1), eco=dict(val_loss=4.3), sr=dict(val_loss=4.3))}
    summary = runs.summarize(rows, "fp8_master_rtn")
    assert summary["eco"]["diverged"] == ["1"] and math.isnan(summary["eco"]["mean"]) and summary["sr"]["diverged"] == []
    runs.report_seeds(summary, c)
    out = capsys.readouterr().out
    assert re.search(r"\neco +diverged +- +in seeds 1 of 2: no mean, no interval\n", out)
    assert re.search(r"\nsr +4\.2500 +0\.0707 +\+0\.2000 \[\+0\.2000, \+0\.2000\]  resolved: higher\n", out)
    (tmp_path / "intervals.png").write_bytes(b"an older figure")  # e.g. an earlier --seeds=2 into this out_dir
    rows["2"]["fp8_master_rtn"] = dict(val_loss=nan, diverged=True)
    runs.report_seeds(runs.summarize(rows, "fp8_master_rtn"), c)
    out = capsys.readouterr().out
    assert re.search(r"\nsr +4\.2500 +0\.0707 +no interval: master weights diverged in seeds 2\n", out)
    assert "no intervals.png" in out and not (tmp_path / "intervals.png").exists()  # not left to show other numbers


def test_a_method_that_diverged_in_a_seed_is_kept_as_diverged_and_not_trained_again(small_data, tmp_path, capsys):
    """--seeds: a seed whose run diverged has finished (the same seed diverges again): a rerun does not train it,
    and the summary names the method as diverged instead of dropping it or averaging the other seeds."""
    args = tiny_args(small_data, tmp_path, "--methods=master_rtn,eco_sr", "--seeds=2")
    train.main(args)
    path = tmp_path / "seed_1338" / "results.json"
    saved = json.loads(path.read_text())  # as train.py writes a method that diverged before its last evaluation
    saved["methods"]["fp8_eco_sr"].update(diverged=True, val_loss=math.nan,
                                          curve=saved["methods"]["fp8_eco_sr"]["curve"][:-1])
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    summary = train.main(args)
    out = capsys.readouterr().out
    assert "seed 1338: finished in" in out and "training in" not in out
    assert list(map(str, summary["fp8_eco_sr"]["diverged"])) == ["1338"] and math.isnan(summary["fp8_eco_sr"]["mean"])
    assert re.search(r"fp8_eco_sr +diverged +- +in seeds 1338 of 2: no mean, no interval", out)


def test_several_seeds_train_in_sub_folders_as_single_runs_and_report_paired_intervals(small_data, tmp_path, capsys):
    """--seeds=2: seed s's rows are exactly those of a plain run with --seed=s; results.json keeps every seed's
    rows and each method's mean, sd and paired interval to master weights; a second call trains nothing."""
    args = tiny_args(small_data, tmp_path / "two", "--methods=master_rtn,naive_rtn,eco_sr", "--seeds=2")
    summary = train.main(args)
    single = train.main(tiny_args(small_data, tmp_path / "one", "--methods=master_rtn,naive_rtn,eco_sr",
                                  "--seed=1338"))
    saved = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(saved["seeds"]) == ["1337", "1338"] and saved["methods"] == json.loads(json.dumps(summary))
    for name, row in single.items():
        assert saved["seeds"]["1338"][name]["val_loss"] == row["val_loss"], name
        assert saved["seeds"]["1338"][name]["state_hash"] == row["state_hash"], name
        losses = [saved["seeds"][s][name]["val_loss"] for s in ("1337", "1338")]
        assert summary[name]["val_losses"] == losses and math.isclose(summary[name]["mean"], sum(losses) / 2)
        diffs = [saved["seeds"][s][name]["val_loss"] - saved["seeds"][s]["fp8_master_rtn"]["val_loss"]
                 for s in ("1337", "1338")]
        lo, hi = summary[name]["interval"]
        assert math.isclose((lo + hi) / 2, sum(diffs) / 2) and (hi - lo) / 2 >= abs(diffs[0] - diffs[1]) / 2
    assert summary["fp8_master_rtn"]["interval"] == [0.0, 0.0]
    out = capsys.readouterr().out
    assert re.search(r"fp8_eco_sr +\d\.\d{4} +\d\.\d{4} +[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]  "
                     r"(contains 0: unresolved|resolved: (lower|higher))", out)
    assert (tmp_path / "two" / "seed_1337" / "log.txt").exists()
    train.main(args)
    assert "seed 1337: finished in" in capsys.readouterr().out
    # python runs.py A:method B:method pairs two --seeds runs by seed: here one run with itself
    mean, interval, common = runs.compare(f"{tmp_path / 'two'}:fp8_eco_sr", f"{tmp_path / 'two'}:fp8_master_rtn")
    assert common == ["1337", "1338"] and math.isclose(mean, summary["fp8_eco_sr"]["difference"])
    assert all(math.isclose(x, y) for x, y in zip(interval, summary["fp8_eco_sr"]["interval"]))
    # a later --seeds command with other methods into the same out_dir adds them: the summary keeps every method
    # (the master weights of the first command included, so the new method gets its interval) ...
    more = train.main(tiny_args(small_data, tmp_path / "two", "--methods=naive_sr", "--seeds=2"))
    assert list(more) == ["fp8_master_rtn", "fp8_naive_rtn", "fp8_eco_sr", "fp8_naive_sr"]
    assert more["fp8_eco_sr"] == summary["fp8_eco_sr"] and "interval" in more["fp8_naive_sr"]
    assert list(json.loads((tmp_path / "two" / "results.json").read_text())["methods"]) == list(more)
    # ... and a comparison with no seed in common is refused, naming both
    with pytest.raises(ValueError, match="no seed has both .*fp8_eco_sr and .*fp8_nope"):
        runs.compare(f"{tmp_path / 'two'}:fp8_eco_sr", f"{tmp_path / 'two'}:fp8_nope")

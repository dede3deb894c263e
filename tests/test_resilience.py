"""
A run is its settings and its data, one writer per out_dir, every rank agrees, a step is all or nothing, and a
crash or a SIGKILL loses nothing: each test tries one way a user can get a silently wrong result, lose one, or
half-take a step, and shows that it is refused (with a message naming the bad value) or handled, before
anything changes.
"""
import copy
import json
import io
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import eco
import prepare
import quant
import runs
import train
from model import GPT, GPTConfig
from reference import ROOT, json_load, repo_text, tiny_args, tiny_model, train_steps


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


# -----------------------------------------------------------------------------
# A run's identity: its data, not the path of its data folder

def test_resume_and_kept_rows_refuse_a_data_folder_re_prepared_from_another_corpus(tmp_path):
    """The same folder, the same vocabulary size, another corpus: a resume and a kept row are refused, naming
    data_sha256; the same data under another path is the same run."""
    data, out = tmp_path / "data", tmp_path / "out"
    (tmp_path / "a.txt").write_text(repo_text("eco.py", "quant.py"))
    (tmp_path / "b.txt").write_text(repo_text("model.py", "kernels.py"))
    prepare.prepare(str(data), str(tmp_path / "a.txt"), vocab_size=300)
    train.main(tiny_args(data, out, "--methods=eco_sr", "--save_checkpoint=True", "--stop_at=3"))
    os.rename(data, tmp_path / "moved")  # the same data elsewhere: resumed
    train.main(tiny_args(tmp_path / "moved", out, "--methods=eco_sr", "--save_checkpoint=True", "--resume=True"))
    prepare.prepare(str(data), str(tmp_path / "b.txt"), vocab_size=300)
    before = files(out)
    for extra in (["--methods=eco_sr", "--resume=True"], ["--methods=master_rtn"]):
        with pytest.raises(ValueError, match="comes from a run with other settings: data_sha256="):
            train.main(tiny_args(data, out, *extra))
    assert files(out) == before


def test_init_from_a_checkpoint_with_another_tokenizer_is_refused_before_out_dir_exists(small_data, tmp_path):
    """Another vocabulary size, or the same size from another corpus (token ids that mean other things)."""
    train.main(tiny_args(small_data, tmp_path / "pre", "--methods=fp32", "--save_checkpoint=True"))
    ckpt = tmp_path / "pre" / "ckpt_fp32.pt"
    (tmp_path / "other.txt").write_text(repo_text("model.py", "kernels.py"))
    for name, vocab_size in (("bigger", 320), ("same_size", 300)):
        prepare.prepare(str(tmp_path / name), str(tmp_path / "other.txt"), vocab_size=vocab_size)
        with pytest.raises(ValueError, match="was trained with another tokenizer"):
            train.main(tiny_args(tmp_path / name, tmp_path / "out", f"--init_from={ckpt}", "--methods=eco_sr"))
        assert not (tmp_path / "out").exists()
    train.main(tiny_args(small_data, tmp_path / "out", f"--init_from={ckpt}", "--methods=eco_sr"))  # its own data


# -----------------------------------------------------------------------------
# One writer per out_dir

def test_a_second_run_into_an_out_dir_in_use_is_refused_naming_the_first_and_a_kill_frees_it(small_data, tmp_path):
    """The lock is held for the whole run and released by the kernel when its holder dies, even by SIGKILL."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs\nwith runs.out_dir_lock(sys.argv[1]):\n"
                               "    print('locked', flush=True)\n    time.sleep(120)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files(out)
        with pytest.raises(ValueError, match=f"{re.escape(str(out))} is in use by process {holder.pid}"):
            train.main(tiny_args(small_data, out, "--methods=eco_sr"))
        assert files(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train.main(tiny_args(small_data, out, "--methods=eco_sr"))
    assert (out / "results.json").exists() and (out / ".lock").read_text() == ""


def test_a_refused_run_leaves_no_new_out_dir_behind(small_data, tmp_path, monkeypatch):
    """A run refused once it holds the lock leaves an existing out_dir as it was (but for the empty lock file),
    and removes an out_dir it created."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("not json")
    with pytest.raises(ValueError, match="is not a results file of train.py"):
        train.main(tiny_args(small_data, out, "--methods=eco_sr"))
    assert sorted(files(out)) == [".lock", "results.json"]

    def refuse(*args):
        raise ValueError("refused")

    monkeypatch.setattr(runs, "check_out_dir", refuse)
    with pytest.raises(ValueError, match="refused"):
        train.main(tiny_args(small_data, tmp_path / "new", "--methods=eco_sr"))
    assert not (tmp_path / "new").exists()


# -----------------------------------------------------------------------------
# Every rank agrees

def test_differing_settings_names_each_option_and_every_ranks_value():
    """Settings that differ between ranks are named option by option, with every rank's value."""
    configs = [dict(lr=0.1, stop_at=0, seed=1), dict(lr=0.1, stop_at=3, seed=1), dict(lr=0.2, stop_at=0, seed=1)]
    assert runs.differing_settings(configs) == ["--lr: rank 0 0.1, rank 1 0.1, rank 2 0.2",
                                                "--stop_at: rank 0 0, rank 1 3, rank 2 0"]
    assert runs.differing_settings(configs[:1]) == []


@pytest.mark.parametrize("option", ["--stop_at=3", "--grad_accum=2"])
def test_ranks_started_with_other_options_all_stop_naming_it_before_anything_is_written(small_data, tmp_path, option):
    """One rank with another --stop_at used to hang the other in an all-reduce; another --grad_accum trained a run
    that was never asked for. Now every rank stops at once, naming the option and each rank's value."""
    script = tmp_path / "one_rank_differs.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport train\n"
                      f"train.main(sys.argv[1:] + ([{option!r}] if os.environ['RANK'] == '1' else []))\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *tiny_args(small_data, out)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    key, value = option[2:].split("=")
    default = train.DEFAULTS[key]
    assert run.returncode != 0
    assert f"the ranks were started with other settings" in run.stderr and \
        f"--{key}: rank 0 {default}, rank 1 {value}" in run.stderr, run.stderr[-3000:]
    assert not out.exists()


# -----------------------------------------------------------------------------
# Low-bit storage keeps its dtype; the gradient limit follows the storage of v

@pytest.mark.parametrize("convert", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()])
def test_a_dtype_conversion_of_a_quantized_model_leaves_codes_and_scales_as_they_are(convert):
    """model.to(bfloat16), .half() or .double() converts the float parts and leaves codes and scales bit for bit."""
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=32))
    model.quantize_("fp8_e4m3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model)
    for name, t in model.state_dict().items():
        if name.endswith("weight") and before[name].dtype == torch.float8_e4m3fn or name.endswith("scale"):
            assert t.dtype == before[name].dtype and torch.equal(t.view(torch.uint8), before[name].view(torch.uint8))
        else:
            assert t.dtype != torch.float32, f"{name}: the float parts convert as usual"
    q = next(m for m in model.modules() if isinstance(m, quant.QuantizedWeight))
    assert q.weight.scale is q.scale and q.weight.fmt == "fp8_e4m3", "the optimizer still finds the scale"


def test_bf16_moments_refuse_a_gradient_whose_square_overflows_bfloat16_and_accept_one_below():
    """float32 takes |g| up to 1.84e19, bfloat16's v (stochastically rounded) less: such a gradient used to
    store v = inf, and the weight never moved again."""
    limit = eco.GRAD_LIMITS["bf16"]
    assert limit < eco.GRAD_LIMIT
    for moments in ("fp32", "bf16"):
        p = nn.Parameter(torch.zeros(64, 64))
        opt = eco.ECOAdamW([p], lr=1e-3, betas=(0.9, 0.0), moments=moments)
        p.grad = torch.full((64, 64), (limit + eco.GRAD_LIMIT) / 2)
        if moments == "bf16":
            with pytest.raises(quant.NonFiniteError, match="64, 64"):
                opt.step()
            assert not opt.state.get(p) and (p == 0).all(), "nothing was updated"
            p.grad = torch.full((64, 64), limit)
        opt.step()
        assert all(torch.isfinite(t.float()).all() for t in opt.state[p].values() if torch.is_tensor(t))


# -----------------------------------------------------------------------------
# A step is all or nothing; a state_dict restores everything that decides the next step

def two_weights(moments="fp32", **kw):
    g = torch.Generator().manual_seed(0)
    weights = [quant.QuantizedWeight((16, 300), "fp8_e4m3").set_float_(torch.randn(16, 300, generator=g) * 0.02)
               for _ in range(2)]
    opt = eco.ECOAdamW([w.weight for w in weights], lr=1e-3, betas=(0.9, 0.98), eps=1e-9, moments=moments, **kw)
    for w in weights:
        w.weight.main_grad = torch.randn(16, 300, generator=g) * 1e-3
    return weights, opt


def snapshot(weights, opt):
    return [t.clone() for w in weights for t in (w.weight.view(torch.uint8), w.scale)], \
        {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("group_change", [dict(lr=1e-40), dict(next_lr=1e-40), dict(moments="bf16")])
def test_a_step_that_would_fail_half_way_is_refused_before_the_first_tensor_changes(group_change):
    """An lr or next_lr whose injection coefficient overflows float32, and moments changed after the first step
    (the storage is set once: it used to be ignored, and the optimizer then refused its own state_dict). Refused
    where the value is set, by item or by update; the group keeps its values and the next step is as before."""
    weights, opt = two_weights(injection="next_lr")
    opt.param_groups[0]["next_lr"] = 1e-3
    opt.step()
    for w in weights:
        w.weight.main_grad = torch.ones(16, 300) * 1e-3
    before = snapshot(weights, opt)
    group = dict(opt.param_groups[0])
    key, value = next(iter(group_change.items()))
    for change in (lambda: opt.param_groups[0].update(group_change), lambda: opt.param_groups[0].__setitem__(key, value)):
        with pytest.raises(ValueError, match="overflows float32|keeps its moments as 'fp32'"):
            change()
        assert opt.param_groups[0] == group
    after = snapshot(weights, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1].keys() == after[1].keys() and all(
        torch.equal(a, b) if torch.is_tensor(a) else a == b
        for k in before[1] for a, b in zip(before[1][k].values(), after[1][k].values()))
    opt.load_state_dict(opt.state_dict())  # the optimizer takes back its own state
    assert isinstance(opt.param_groups[0], eco._CheckedGroup) and opt.param_groups[0] == group
    opt.step()


def test_a_gradient_of_another_shape_is_refused_before_anything_changes():
    """A gradient of another shape is refused, naming both shapes, before any weight or state changes."""
    weights, opt = two_weights()
    weights[1].weight.main_grad = torch.zeros(300, 16)
    before = snapshot(weights, opt)
    with pytest.raises(ValueError, match=r"gradient of shape \(300, 16\).*parameter of shape \(16, 300\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], snapshot(weights, opt)[0])) and not opt.state


def test_a_torch_adamw_state_dict_is_refused_with_a_clear_error():
    """A torch.optim.AdamW state_dict is refused with a clear error naming the optimizer it needs."""
    weights, opt = two_weights()
    with pytest.raises(ValueError, match="not a state_dict of eco.ECOAdamW"):
        opt.load_state_dict(torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).state_dict())


def test_a_state_dict_restores_the_seed_and_refuses_another_rounding_or_injection():
    """The fused kernel draws its random numbers from the optimizer's seed: loaded into an optimizer built
    with another seed, a state continues with the saved one."""
    weights, opt = two_weights(seed=1)
    opt.step()
    saved = opt.state_dict()
    assert saved["eco"] == dict(optimizer="ECOAdamW", mode="eco", rounding="stochastic", injection="paper", seed=1)
    _, other = two_weights(seed=2)
    other.load_state_dict(saved)
    assert other.seed == 1
    for kw in (dict(rounding="nearest"), dict(injection="next_lr")):
        with pytest.raises(ValueError, match="this state was saved by"):
            two_weights(seed=1, **kw)[1].load_state_dict(saved)


# -----------------------------------------------------------------------------
# Clear errors, before anything is created or built

def test_unavailable_device_and_an_out_dir_that_is_a_file_are_refused_by_parse_args(tmp_path):
    """A device this machine lacks, or an out_dir that is a file, is refused by parse_args, naming what is accepted."""
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device='cuda' is out of range; accepted: a device this machine has"):
            train.parse_args(["--device=cuda"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--out_dir=.*file.* accepted: a folder"):
        train.parse_args([f"--out_dir={tmp_path / 'file'}"])


def test_without_master_rtn_the_table_shows_no_difference_instead_of_nan(small_data, tmp_path, capsys):
    """Without master_rtn to compare with, the table shows no difference instead of nan."""
    train.main(tiny_args(small_data, tmp_path, "--methods=fp32,eco_sr"))
    table = capsys.readouterr().out.split("method ")[-1]
    assert "nan" not in table and re.search(r"fp8_eco_sr +\d\.\d{4} +- ", table)


def test_prepare_refuses_an_out_dir_that_is_a_file_and_a_bad_vocab_size_before_training_a_bpe(tmp_path, capsys):
    """An out_dir that is a file, or a vocab_size out of range, is refused before a BPE is trained or a folder made."""
    (tmp_path / "input.txt").write_text(repo_text("quant.py"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        prepare.prepare(str(tmp_path / "file"), str(tmp_path / "input.txt"), vocab_size=300)
    for bad in (0, 255, 65536):
        with pytest.raises(ValueError, match=f"vocab_size={bad}; accepted: 256 to 65535"):
            prepare.prepare(str(tmp_path / "out"), str(tmp_path / "input.txt"), vocab_size=bad)
    assert "training a byte-level BPE" not in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_a_damaged_folder_is_rebuilt_with_its_own_vocabulary_size_and_the_repair_command_says_it(tmp_path):
    """A damaged folder's error gives the repair command with its vocab_size, and prepare rebuilds it with that size."""
    (tmp_path / "input.txt").write_text(repo_text("quant.py"))
    out = tmp_path / "out"
    prepare.prepare(str(out), str(tmp_path / "input.txt"), vocab_size=300)
    (out / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match=r"prepare it again: python data/prepare.py --input \S+ --out_dir \S+ "
                                         r"--vocab_size 300"):
        prepare.load_meta(str(out))
    assert prepare.prepare(str(out), str(tmp_path / "input.txt"))["bpe_size"] == 300


def test_a_gradient_the_kernel_cannot_take_sends_that_tensor_down_the_reference_path():
    """A float64, strided main_grad on the second of two weights: the kernel's own checks used to refuse it after the
    first weight had stepped. Now the first steps in the kernel (Triton's interpreter here), the second on the
    reference path, exactly as an optimizer without the kernel steps it."""
    kernels = pytest.importorskip("kernels")
    steps = {}
    for fused in (True, False):
        weights, opt = two_weights(rounding="nearest")
        if fused:
            opt.kernels = kernels  # what ECOAdamW sets up on CUDA
        weights[1].weight.main_grad = weights[1].weight.main_grad.double().t().contiguous().t()
        assert not weights[1].weight.main_grad.is_contiguous()
        before = weights[0].weight.view(torch.uint8).clone()
        opt.step()
        assert [opt.state[w.weight]["step"] for w in weights] == [1, 1]
        assert not torch.equal(weights[0].weight.view(torch.uint8), before)
        steps[fused] = [t.clone() for t in (weights[1].weight.view(torch.uint8), weights[1].scale,
                                            *opt.state[weights[1].weight].values()) if torch.is_tensor(t)]
    assert all(torch.equal(a, b) for a, b in zip(steps[True], steps[False]))


# -----------------------------------------------------------------------------
# The optimizer: nothing is touched unless every check passes

def test_non_finite_gradient_raises_before_touching_anything():
    """A NaN gradient in the last parameter is refused before any weight or moment changes."""
    model = tiny_model()
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode="eco")
    train_steps(model, opt, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: v.clone() for k, v in opt.state[model[1].weight].items() if torch.is_tensor(v)}
    model(torch.arange(4)).sum().backward()
    model[3].weight.grad[0, 0] = float("nan")  # a plain parameter, visited after the quantized one
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), before[k].float()), k
    for k, v in state_before.items():
        assert torch.equal(opt.state[model[1].weight][k], v)


def test_a_bad_param_group_or_huge_gradient_raises_before_any_parameter_changes():
    """A bad lr in a later group, an overflowing square or a stray .grad is refused before anything changes."""
    model = tiny_model()
    opt = eco.ECOAdamW([dict(params=[model[0].weight, model[1].weight]), dict(params=[model[3].weight])], lr=1e-2)
    train_steps(model, opt, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model[1].weight].items() if torch.is_tensor(v)}

    def unchanged():
        return (all(torch.equal(v.float(), before[k].float()) for k, v in model.state_dict().items())
                and all(torch.equal(opt.state[model[1].weight][k], v) for k, v in moments.items()))
    model(torch.arange(4)).sum().backward()
    with pytest.raises(ValueError, match="lr=-0.01"):  # refused where it is set: no step can take it
        opt.param_groups[1]["lr"] = -1e-2  # the second group: the first would be stepped before it is reached
    assert opt.param_groups[1]["lr"] == 1e-2 and unchanged()
    model[3].weight.grad[0, 0] = 1e22  # finite, but its square is not: v would become inf and poison m
    with pytest.raises(ValueError, match="overflows"):
        opt.step()
    assert unchanged()
    model[3].weight.grad[0, 0] = 0.0
    model[1].weight.grad = torch.zeros_like(model[1].weight)  # a gradient where the optimizer never looks
    with pytest.raises(ValueError, match="main_grad"):
        opt.step()
    assert unchanged()


# -----------------------------------------------------------------------------
# train.py: checkpoints and results.json: refused mismatches, atomic writes, nothing lost in a crash

@pytest.fixture(scope="module")
def stopped_run(small_data, tmp_path_factory):
    """A run stopped at step 3 of 6 with checkpoints: the tests below try to resume it (read-only)."""
    out = tmp_path_factory.mktemp("stopped")
    train.main(tiny_args(small_data, out, "--methods=eco_sr", "--save_checkpoint=True", "--stop_at=3"))
    return out


@pytest.mark.parametrize("change, message", [("--lr=0.001", "lr=0.003 there, 0.001 now"),
                                             ("--seed=1", "seed=1337 there, 1 now"),
                                             ("--batch_size=2", "batch_size=4 there, 2 now")])
def test_resume_with_settings_that_change_the_run_is_refused_naming_them(small_data, stopped_run, change, message):
    """Resuming with settings that change the run is refused, naming each, before anything changes."""
    before = {p: p.read_bytes() for p in stopped_run.iterdir()}
    with pytest.raises(ValueError, match=f"ckpt_fp8_eco_sr.pt comes from a run with other settings: {message}"):
        train.main(tiny_args(small_data, stopped_run, "--methods=eco_sr", "--resume=True", change))
    assert {p: p.read_bytes() for p in stopped_run.iterdir()} == before


def test_a_truncated_checkpoint_is_refused_with_its_path(small_data, stopped_run, tmp_path):
    """A truncated checkpoint is refused, naming its path."""
    out = tmp_path / "copy"
    out.mkdir()
    for p in stopped_run.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    ckpt = out / "ckpt_fp8_eco_sr.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a write cut short, the old non-atomic way
    with pytest.raises(ValueError, match=re.escape(str(ckpt)) + " is damaged"):
        train.main(tiny_args(small_data, out, "--methods=eco_sr", "--resume=True"))


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_loadable(stopped_run, tmp_path):
    """A write killed midway leaves the previous checkpoint loadable, and nothing behind in the next one's way."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes((stopped_run / "ckpt_fp8_eco_sr.pt").read_bytes())
    old = path.read_bytes()

    def killed_while_writing(f):
        f.write(old[: len(old) // 3])
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        prepare.write_atomic(str(path), killed_while_writing)
    assert path.read_bytes() == old and runs.read_checkpoint(str(path))["step"] == 3
    prepare.write_atomic(str(path), lambda f: f.write(b"new"))  # and nothing is left behind to get in the way
    assert path.read_bytes() == b"new" and not os.path.exists(str(path) + ".tmp")


def test_results_json_keeps_finished_methods_through_crashes_and_refused_runs(small_data, tmp_path, monkeypatch):
    """results.json keeps finished methods through a crash and refused runs, and adds a method run later."""
    args = tiny_args(small_data, tmp_path, "--methods=eco_sr,master_rtn")
    real_train_method = train.train_method

    def crash_in_the_second_method(short, *rest):
        if short == "master_rtn":
            raise RuntimeError("out of memory")
        return real_train_method(short, *rest)

    monkeypatch.setattr(train, "train_method", crash_in_the_second_method)
    with pytest.raises(RuntimeError, match="out of memory"):
        train.main(args)
    monkeypatch.undo()
    saved = (tmp_path / "results.json").read_bytes()
    assert list(json_load(tmp_path / "results.json")["methods"]) == ["fp8_eco_sr"]
    for refused in (["--max_steps=0"], ["--lr=0.001"], ["--eval_batches=1"]):  # invalid, or another run's settings
        with pytest.raises(ValueError, match="max_steps=0 is out of range|lr=0.003 there|eval_batches=2 there"):
            train.main(args + refused)
        assert (tmp_path / "results.json").read_bytes() == saved
    train.main(args + ["--methods=master_rtn", "--log_interval=1"])  # same settings, another method: added
    merged = json_load(tmp_path / "results.json")["methods"]
    assert list(merged) == ["fp8_eco_sr", "fp8_master_rtn"]
    assert merged["fp8_eco_sr"] == json.loads(saved)["methods"]["fp8_eco_sr"]


# -----------------------------------------------------------------------------
# train.py: fault injection, SIGKILL at random moments, then --resume=True until done

def checkpoint_steps(out_dir):
    """{method: step} of every checkpoint on disk; read_checkpoint raises if one is not complete."""
    return {p.name[len("ckpt_"):-len(".pt")]: runs.read_checkpoint(str(p))["step"] for p in out_dir.glob("ckpt_*.pt")}


def test_killed_at_random_moments_and_resumed_ends_bit_identical_to_an_uninterrupted_run(small_data, tmp_path):
    """SIGKILLed at random moments and resumed until done, a run ends bit-identical to an uninterrupted one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def start(out_dir, *extra):
        args = tiny_args(small_data, out_dir, "--methods=eco_sr,master_rtn", "--max_steps=24", "--eval_interval=2",
                          "--eval_batches=1", "--log_interval=24", "--save_checkpoint=True", *extra)
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for_training(run):  # every check passed, the first method's optimizer is built: training starts
        lines = []
        for line in run.stdout:
            lines.append(line)
            if ": mode=" in line:
                break
        return lines

    straight, stamps = start(tmp_path / "straight"), []
    for line in straight.stdout:
        stamps.append((time.perf_counter(), line))
    log = "".join(line for _, line in stamps) + straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, log
    evals = [t for t, line in stamps if "val loss" in line]
    training_s = evals[-1] - next(t for t, line in stamps if ": mode=" in line)  # kills come within half of it
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while True:
        expected = checkpoint_steps(out) if out.exists() else {}  # the last complete checkpoints
        run = start(out, "--resume=True")
        if kills < 4:
            lines = wait_for_training(run)
            time.sleep(rng.uniform(0.0, 0.5) * training_s)
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
            log = "".join(lines) + run.communicate(timeout=300)[0]
        else:
            log = run.communicate(timeout=300)[0]
        for name, step in re.findall(r"^(\S+): resuming from .* at step (\d+)$", log, re.M):
            assert int(step) == expected[name], log
        for name in re.findall(r"^(\S+): no checkpoint at ", log, re.M):
            assert name not in expected, log
        if run.returncode != -signal.SIGKILL:
            assert run.returncode == 0, log
            break
        kills += 1
        if (out / "results.json").exists():
            json_load(out / "results.json")  # complete, whenever the kill came
    assert kills >= 2, "the kills came after the runs had finished: shorten the delays"
    got, want = json_load(out / "results.json")["methods"], json_load(tmp_path / "straight" / "results.json")["methods"]
    assert list(got) == list(want) == ["fp8_eco_sr", "fp8_master_rtn"]
    for name in want:
        for key in ("val_loss", "curve", "moved_curve", "diverged"):
            assert got[name][key] == want[name][key], (name, key)


def test_param_groups_check_themselves_after_a_load_a_copy_and_a_pickle():
    """Groups come back from torch's load_state_dict, copy.deepcopy and torch.save as plain dicts: the optimizer wraps
    them again, so a bad value set afterwards is still refused; the copies keep mode, seed and rounding generator."""
    weights, opt = two_weights()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt, buffer)  # the whole optimizer, pickled
    for other in (copy.deepcopy(opt), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert all(isinstance(g, eco._CheckedGroup) for g in other.param_groups)
        with pytest.raises(ValueError, match="invalid eps=0"):
            other.param_groups[0]["eps"] = 0.0
        hyper = lambda g: {k: v for k, v in g.items() if k != "params"}
        assert hyper(other.param_groups[0]) == hyper(opt.param_groups[0]) and other.mode == "eco"
        assert torch.equal(other.generator.get_state(), opt.generator.get_state()) and other.seed == opt.seed

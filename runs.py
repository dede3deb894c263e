"""
A run's bookkeeping, kept beside train.py so that train.py reads as the experiment: what makes a run safe
to kill, resume, repeat into the same folder and spread over processes, and the tables and figures it prints.
Nothing here changes what is trained.

Identity. A run is its settings and its data. train.py records, in the config of results.json and of every
checkpoint, every option and the data folder's identity (data_sha256: the checksum of its meta.json, which
holds the sha256 of each data file and of the source; tokenizer_sha256 for fine-tuning). Where the folder
lives is not part of it: a moved folder is the same data, a folder re-prepared from another corpus is not.

The out_dir rule. An out_dir holds one run: a run is refused, naming the options, if one that changes training
(all but NOT_THE_RUN) differs from the settings of the results.json or checkpoints already there; with the same
settings it replaces the results of the methods it trains and keeps the others. One writer at a time: a run
holds an exclusive lock on <out_dir>/.lock (released by the kernel when the process ends, however it ends), and
a second run into the same out_dir is refused, naming the process that holds it. Every file is written under a
temporary name, flushed to disk and renamed over the old one (data/prepare.py's write_atomic): a crash at any
moment leaves the previous complete file.

Data parallel (torchrun). Every process (rank) runs train.py with the same options. After the processes
connect, each rank's settings (data identity included) are compared, and every rank stops, naming the option
that differs, before anything is written. Gradients are averaged over the ranks (average_over_ranks_), and the
replicas, which take the same step on the same gradient, are compared by hash at every evaluation.
"""
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import prepare  # noqa: E402  data/prepare.py: write_atomic

try:
    import fcntl  # POSIX: Linux and macOS
except ImportError:  # Windows: no lock, the rest holds
    fcntl = None

# Options that leave the training trajectory alone (how far it goes, what is logged, where the files are, on
# what device): the runs of one out_dir, a --resume included, may differ in these
NOT_THE_RUN = ("out_dir", "data_dir", "resume", "stop_at", "log_interval", "sample_tokens", "device", "compile",
               "save_checkpoint", "methods", "grad_accum", "world_size", "seeds", "jobs")
# grad_accum and world_size change the run only through their product, the config's micro_batches: the same
# micro-batches make up each step however they are split over ranks, so a run may move to more processes


def parse_options(argv, defaults, presets):
    """--key=value overrides of `defaults`, each converted to its default's type; an unknown key lists the valid
    ones. A --preset's values come first, so explicit overrides still win. Returns the full settings."""
    overrides = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"bad argument {arg!r}; use --key=value")
        if key not in defaults:
            raise ValueError(f"unknown option --{key}; valid: {', '.join('--' + k for k in defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key}={value}: expected true or false")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                raise ValueError(f"--{key}={value}: expected {kind.__name__}") from None
    config = dict(defaults)
    if overrides.get("preset", ""):
        if overrides["preset"] not in presets:
            raise ValueError(f"unknown preset {overrides['preset']!r}; accepted: {list(presets)}")
        config.update(presets[overrides["preset"]])
    config.update(overrides)
    return config


def check_device_and_out_dir(c):
    """--device must be one this machine has, --out_dir a folder (or nothing yet)."""
    here = ["auto", "cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    here += ["mps"] * torch.backends.mps.is_available()
    if c["device"] not in here:
        raise ValueError(f"--device={c['device']!r} is out of range; accepted: a device this machine has: "
                         f"{', '.join(here)} (of auto, cpu, cuda, cuda:N, mps)")
    if os.path.exists(c["out_dir"]) and not os.path.isdir(c["out_dir"]):
        raise ValueError(f"--out_dir={c['out_dir']!r} is out of range; accepted: a folder (this is a file)")


def open_data(c, prepare_default=True):
    """The data folder's meta, checked by data/prepare.py's load_meta (the default Shakespeare folder is prepared
    on first use), and its identity recorded in c: data_sha256 (meta.json's checksum, which covers every file's
    sha256 and the source) and tokenizer_sha256."""
    if prepare_default and os.path.realpath(c["data_dir"]) == os.path.realpath(prepare.DEFAULT_DIR):
        meta = prepare.prepare(prepare.DEFAULT_DIR)  # downloads and tokenizes Shakespeare once
    else:
        meta = prepare.load_meta(c["data_dir"])  # refuses a missing, incomplete or damaged folder
    c.update(data_sha256=meta["meta_sha256"], tokenizer_sha256=meta["files"][meta["tokenizer"]]["sha256"])
    return meta


# -----------------------------------------------------------------------------
# One out_dir, one run: the lock, the settings of what is already there, checkpoints

@contextlib.contextmanager
def out_dir_lock(out_dir):
    """Hold an exclusive lock on <out_dir>/.lock for the block, creating out_dir if needed; refuse if another
    process holds it, naming that process. A kill releases the lock with the process. An out_dir created here
    for a run that is then refused (an error in the block) is removed again if nothing else was put in it."""
    created = not os.path.exists(out_dir)  # (a file there was refused by check_device_and_out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    f = open(path, "a+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise ValueError(f"{out_dir} is in use by {holder} (it holds {path}); one run writes to an out_dir at "
                                 "a time: wait for it, or choose another --out_dir") from None
        f.truncate(0)
        f.write(f"process {os.getpid()}")  # for the message above; cleared when the run ends
        f.flush()
        try:
            yield
        except BaseException:
            if created and os.listdir(out_dir) == [".lock"]:
                os.remove(path)
                os.rmdir(out_dir)
            raise
        finally:
            f.truncate(0)
    finally:
        f.close()  # releases the lock


def claim_out_dir(stack, c, names, rank):
    """One writer per out_dir (rank 0 writes: it holds the lock, for as long as `stack` is open) and the out_dir
    rule; returns the results of earlier runs with these settings. Refused on every rank together."""
    def claim():
        if rank == 0:
            stack.enter_context(out_dir_lock(c["out_dir"]))
        return check_out_dir(c, names)
    earlier = refuse_together(claim)
    kept = [name for name in earlier if name not in names]
    if kept:
        print(f"keeping the results of {', '.join(kept)} from an earlier run with these settings")
    return earlier


def load_init_checkpoint(c, meta, model_keys):
    """--init_from: the weights of a full-precision checkpoint, which must come with the data's tokenizer, and the
    architecture that comes with them (written into c). Returns the model's state_dict."""
    ckpt = read_checkpoint(c["init_from"])
    if any(t.dtype != torch.float32 for t in ckpt["model"].values()):
        raise ValueError(f"--init_from={c['init_from']}: expected a full-precision (fp32 method) checkpoint")
    vocab, tokenizer = ckpt["model"]["embed.weight"].shape[0], ckpt["config"].get("tokenizer_sha256")
    if vocab != meta["vocab_size"] or tokenizer != c["tokenizer_sha256"]:
        raise ValueError(f"--init_from={c['init_from']} was trained with another tokenizer ({vocab} tokens, "
                         f"tokenizer sha256 {tokenizer}) than {c['data_dir']} has ({meta['vocab_size']} tokens, "
                         f"{c['tokenizer_sha256']}): its token ids would mean other things; fine-tune on data "
                         "prepared with its tokenizer")
    changed = [f"{k}={ckpt['config'][k]!r} (not {c[k]!r})" for k in model_keys if ckpt["config"][k] != c[k]]
    if changed:
        print(f"--init_from: the architecture comes with the weights: {', '.join(changed)}")
    c.update({k: ckpt["config"][k] for k in model_keys})
    return ckpt["model"]


def resume_(c, name, model, opt, dev):
    """--resume=True: load a method's checkpoint into model and opt (its settings were checked by check_out_dir).
    Returns what the training loop carries on from: (step, curve, moved_curve, train_time)."""
    path = os.path.join(c["out_dir"], f"ckpt_{name}.pt")
    if not (c["resume"] and os.path.exists(path)):
        if c["resume"]:
            print(f"{name}: no checkpoint at {path} yet, starting from step 0")
        return 0, [], [], 0.0
    ckpt = read_checkpoint(path, map_location=dev)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    print(f"{name}: resuming from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["curve"], ckpt["moved_curve"], ckpt["train_time"]


def save_checkpoint(c, name, model, opt, **progress):
    """ckpt_<name>.pt: weights, optimizer state, the run's settings and how far it got (step, curves, clock)."""
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=c, method=name, **progress)
    prepare.write_atomic(os.path.join(c["out_dir"], f"ckpt_{name}.pt"), lambda f: torch.save(state, f))


def read_checkpoint(path, map_location="cpu"):
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location)
        if not {"model", "config"} <= set(ckpt):
            raise KeyError("it has no 'model' and 'config' entries")
    except Exception as err:  # a truncated zip archive, a foreign file, ...: say which file
        raise ValueError(f"{path} is damaged or not a checkpoint of train.py ({type(err).__name__}: {err})") from None
    return ckpt


def check_out_dir(c, names):
    """The out_dir rule of the module docstring, checked before anything is written: refuse a run whose
    settings differ from those of the checkpoints it would continue or overwrite, or of results.json.
    Returns the results of earlier runs with these settings (kept in results.json)."""
    settings = {}  # file in out_dir -> the settings of the run that wrote it
    if c["resume"] or c["save_checkpoint"]:
        for name in names:
            path = os.path.join(c["out_dir"], f"ckpt_{name}.pt")
            if os.path.exists(path):
                settings[path] = read_checkpoint(path)["config"]
    path, earlier = os.path.join(c["out_dir"], "results.json"), {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            settings[path], earlier = saved["config"], saved["methods"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a results file of train.py ({err}); move it away, or use another "
                             "--out_dir") from None
    for path, saved in settings.items():
        diff = [f"{k}={saved.get(k)!r} there, {c[k]!r} now" for k in c if k not in NOT_THE_RUN and saved.get(k) != c[k]]
        if diff:
            raise ValueError(f"{path} comes from a run with other settings: {'; '.join(diff)}. "
                             "Use that run's settings, or another --out_dir")
    return earlier


def write_results(c, methods, **more):
    """results.json: every method's row (with several seeds: their summary, and each seed's rows) and the settings."""
    text = json.dumps(dict(methods=methods, config=c, **more), indent=1)
    prepare.write_atomic(os.path.join(c["out_dir"], "results.json"), lambda f: f.write(text.encode()))


# -----------------------------------------------------------------------------
# Data parallel (torchrun): where the ranks talk to each other; without torchrun none of this runs

def start_device(dev, local_rank=None):
    """The device to train on ("auto": cuda, then mps, then cpu). Under torchrun (local_rank given) join the other
    processes first: one GPU each over NCCL, or CPU processes over gloo."""
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if local_rank is None:
        return dev
    dev = f"cuda:{local_rank}" if dev.startswith("cuda") else "cpu"
    if dev != "cpu":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="gloo" if dev == "cpu" else "nccl")
    return dev


def stop_ranks():
    """Leave together (a rank that tears down its connections while another still works can abort it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_over_ranks(value):
    """A float summed over the ranks in float64 (itself without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    total = torch.tensor(value, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)  # NCCL reduces GPU tensors only, gloo CPU ones
    return float(total)


def differing_settings(configs):
    """configs: every rank's settings, in rank order. Returns one line per option on which some rank differs."""
    keys = sorted(set().union(*configs))
    return [f"--{k}: " + ", ".join(f"rank {r} {cfg.get(k)!r}" for r, cfg in enumerate(configs))
            for k in keys if any(cfg.get(k) != configs[0].get(k) for cfg in configs)]


def check_ranks_agree(c):
    """Every rank must run the same run: gather every rank's settings and stop on every rank if any differs."""
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, c)
    differ = differing_settings(configs)
    if differ:
        raise ValueError("the ranks were started with other settings (every rank must get the same options and "
                         f"data): {'; '.join(differ)}")


def refuse_together(check):
    """Run check() on this rank; if it raised a ValueError on any rank, raise it on every rank. Without torchrun,
    just check()."""
    if not (dist.is_available() and dist.is_initialized()):
        return check()
    result, error = None, None
    try:
        result = check()
    except ValueError as err:
        error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {e}" for r, e in failed))
    return result


def average_over_ranks_(tensors):
    """Replace each float32 tensor by its mean over the ranks: one all-reduce of one flat buffer, not one each.
    train.py averages every gradient this way, .grad and main_grad, not with DistributedDataParallel: DDP averages
    the .grad of parameters that require grad, and the FP8/int8 codes do not (their gradient is main_grad), so
    each rank would silently train them on its own batches. With the average, every rank takes the same step on
    the same gradient, and stochastic rounding draws from the optimizer's generator, seeded alike on every rank:
    codes, scales and moments stay bit-identical without sending any weights."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)  # a sum: gloo has no average
    flat /= dist.get_world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def state_hash(model, opt):
    """sha256 of every byte of the weights (codes, scales, float parameters) and of the optimizer state
    (moments, master copies, step counts, the rounding generator): equal hashes, bit-identical replicas."""
    sd, h = opt.state_dict(), hashlib.sha256()
    optimizer_state = [v for i in sorted(sd["state"]) for v in sd["state"][i].values()]
    for t in [*model.state_dict().values(), *optimizer_state, sd["generator"]]:
        h.update(torch.as_tensor(t).detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas_agree(model, opt, step, name):
    """Under torchrun: are the replicas still bit-identical? (every rank's state_hash, compared on every rank)"""
    if dist.is_available() and dist.is_initialized():
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, state_hash(model, opt))
        check_replicas(hashes, step, name)


def check_replicas(hashes, step, name):
    """hashes: every rank's state_hash, in rank order. The ranks took the same steps on the same gradients: any
    difference is a bug or faulty hardware, and every rank, seeing the same hashes, stops with the same error."""
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise RuntimeError(f"{name} step {step}: the replicas drifted apart: ranks {differ} hold other weights or "
                           f"optimizer state than rank 0 (state hashes by rank: {hashes})")


# -----------------------------------------------------------------------------
# The tables; several seeds: a difference between two methods is a claim only with its interval

def t_quantile(df, p=0.975):
    """The p-quantile of Student's t distribution with df degrees of freedom (2.776 for df = 4): bisection on
    its CDF, integrated with Simpson's rule (no scipy needed; accurate to about 1e-7 for the df used here)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x, n=2000):  # 1/2 + the integral of the pdf from 0 to x (n even)
        h = x / n
        return 0.5 + h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * pdf(i * h) for i in range(n + 1))
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def seed_dirs(c):
    """{seed: its sub-folder of out_dir} for seeds seed .. seed+seeds-1."""
    return {s: os.path.join(c["out_dir"], f"seed_{s}") for s in range(c["seed"], c["seed"] + c["seeds"])}


def finished(c, names):
    """The rows of a sub-folder whose results.json has these settings and every method of `names` finished (at the
    last step, or diverged), else None. The rows are those of every finished method there, earlier commands' too
    (a subset of methods run later into the same out_dir adds to them)."""
    path = os.path.join(c["out_dir"], "results.json")
    try:
        rows = check_out_dir(dict(c, resume=False, save_checkpoint=False), names)
    except ValueError:
        return None  # another run's, or damaged: train it again (which refuses, naming why)
    rows = finished_rows(rows, c["max_steps"])
    return rows if all(n in rows for n in names) and os.path.exists(path) else None


def finished_rows(rows, max_steps):
    """The rows {method: row} of the methods that ended: reached max_steps, or diverged (an outcome, reported as
    such; the same seed would diverge again)."""
    return {n: r for n, r in rows.items() if r.get("diverged") or (r["curve"] and r["curve"][-1][0] == max_steps)}


def train_seeds(c, names, script, defaults):
    """--seeds=N: train seed s in out_dir/seed_<s> with `python train.py --seed=s --out_dir=...` and every other
    option as given, `jobs` processes at a time (one thread each when jobs > 1, so they do not fight over cores);
    each logs to its folder's log.txt. A seed whose folder already holds finished results with these settings is
    not trained again, so the command resumes after a kill (with --resume=True, from the checkpoints too).
    Returns {seed: {method: row}}."""
    passed = [f"--{k}={c[k]}" for k in defaults if k not in ("seed", "seeds", "jobs", "out_dir", "preset")]
    todo, rows = [], {}
    for seed, sub in seed_dirs(c).items():
        sub_c = dict(c, seed=seed, seeds=1, jobs=1, out_dir=sub)
        rows[seed] = finished(sub_c, names)
        if rows[seed] is None:
            todo.append((seed, sub))
        else:
            print(f"seed {seed}: finished in {sub}")
    env = dict(os.environ, OMP_NUM_THREADS="1") if c["jobs"] > 1 else dict(os.environ)
    running, failed = [], []
    while todo or running:
        while todo and len(running) < c["jobs"]:
            seed, sub = todo.pop(0)
            os.makedirs(sub, exist_ok=True)
            log = open(os.path.join(sub, "log.txt"), "a")
            cmd = [sys.executable, script, *passed, f"--seed={seed}", "--seeds=1", "--jobs=1", f"--out_dir={sub}"]
            print(f"seed {seed}: training in {sub} (log: {log.name})", flush=True)
            running.append((seed, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            seed, proc, log = item
            log.close()
            if proc.returncode:
                failed.append(f"seed {seed} (exit {proc.returncode}, see {log.name})")
            else:
                with open(os.path.join(seed_dirs(c)[seed], "results.json")) as f:
                    rows[seed] = finished_rows(json.load(f)["methods"], c["max_steps"])  # earlier methods' too
    if failed:
        raise RuntimeError(f"some seeds failed: {', '.join(failed)}; the others are kept, rerun to finish")
    return rows


def run_seeds(c, names, script, defaults, baseline):
    """--seeds=N, the whole of it: train the seeds (train_seeds), then write and print every method's summary."""
    with out_dir_lock(c["out_dir"]):
        rows = train_seeds(c, names, script, defaults)
        summary = summarize(rows, baseline)
        write_results(c, summary, seeds=rows)
        report_seeds(summary, c)
    return summary


def report(results, c):
    """One run's table (train.py): every method's final validation loss, bytes, speed and codes moved."""
    baseline = next((n for n in results if n.endswith("master_rtn")), None)
    last_step = lambda r: r["curve"][-1][0] if r["curve"] else None  # rows kept from a run stopped elsewhere
    peak = any(r.get("peak_memory") is not None for r in results.values())  # CUDA only
    print(f"\n{'method':<17}{'val loss':>9}{'vs master':>11}{'B/param':>9}{'B/qparam':>10}{'B/other':>9}{'tok/s':>9}"
          f"{'moved':>8}" + (f"{'peak MiB':>10}" if peak else ""))
    for name, r in results.items():
        same_step = baseline and last_step(r) == last_step(results[baseline])  # else: no difference to show
        delta = f"{r['val_loss'] - results[baseline]['val_loss']:+.4f}" if same_step else "-"
        loss = "diverged" if r["diverged"] else f"{r['val_loss']:.4f}"
        moved = "-" if r["moved"] is None else f"{r['moved']:.1%}"
        print(f"{name:<17}{loss:>9}{delta:>11}{r['bytes_per_param']:>9.2f}{r['bytes_per_quantized_param']:>10.2f}"
              f"{r['bytes_per_other_param']:>9.2f}{r['tokens_per_s']:>9,.0f}{moved:>8}"
              + (f"{(r.get('peak_memory') or float('nan')) / 2**20:>10,.0f}" if peak else ""))
    elsewhere = [f"{n} (step {last_step(r)})" for n, r in results.items() if last_step(r) != (c["stop_at"] or c["max_steps"])]
    if elsewhere:
        print(f"note: stopped at another step than {c['stop_at'] or c['max_steps']}: {', '.join(elsewhere)}")
    print("B/param: weights + scales + master copy + optimizer moments per parameter (all, quantized, the rest)\n"
          "moved: quantized weights whose stored code changed, per step, mean over the last evaluation interval"
          + ("\npeak MiB: torch.cuda.max_memory_allocated during the method (all it allocated)" if peak else "")
          + f"\nwrote {os.path.join(c['out_dir'], 'results.json')}", end="")
    figure = plot(results, os.path.join(c["out_dir"], "curves.png"))
    print(" and curves.png" if figure else " (no curves.png: no matplotlib, or no curve to draw)")


def report_seeds(summary, c):
    seeds = f"seeds {c['seed']} .. {c['seed'] + c['seeds'] - 1}"
    print(f"\n{'method':<17}{'mean val loss':>14}{'sd':>8}   vs master: mean paired difference [95% interval] ({seeds})")
    baseline_diverged = next((r["diverged"] for n, r in summary.items() if n.endswith("master_rtn")), [])
    for name, r in summary.items():
        if r["diverged"]:  # no mean over the seeds that happened to finish: that would hide the failure
            print(f"{name:<17}{'diverged':>14}{'-':>8}   in seeds {', '.join(map(str, r['diverged']))} of "
                  f"{len(r['val_losses'])}: no mean, no interval")
            continue
        line = f"{name:<17}{r['mean']:>14.4f}{r['sd']:>8.4f}"
        if "interval" in r and not name.endswith("master_rtn"):
            lo, hi = r["interval"]
            if baseline_diverged:
                line += f"   no interval: master weights diverged in seeds {', '.join(map(str, baseline_diverged))}"
            else:
                line += f"   {r['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {verdict(lo, hi)}"
        print(line)
    print("sd: over seeds; the interval: Student's t over the per-seed differences to master weights (same seed: the "
          "same initial weights, batches and rounding streams)")
    figure = plot_intervals(summary, os.path.join(c["out_dir"], "intervals.png"))
    print(f"wrote {os.path.join(c['out_dir'], 'results.json')} (every seed's rows)"
          + (" and intervals.png" if figure else " (no intervals.png: no matplotlib, or no interval to draw)"))


def summarize(rows, baseline):
    """rows: {seed: {method: row}}. Per method: the final validation losses, their mean and standard deviation,
    and the paired differences to `baseline` (same seed) with the mean and its 95% t-interval."""
    seeds = sorted(rows)
    summary = {}
    for name in [n for n in rows[seeds[0]] if all(n in rows[s] for s in seeds)]:  # the methods every seed has
        losses = [rows[s][name]["val_loss"] for s in seeds]
        mean = sum(losses) / len(losses)
        sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1)) if len(losses) > 1 else float("nan")
        diverged = [s for s in seeds if rows[s][name].get("diverged")]  # their val_loss is nan
        summary[name] = dict(val_losses=losses, mean=mean, sd=sd, diverged=diverged)
        if baseline in rows[seeds[0]]:
            diffs = [rows[s][name]["val_loss"] - rows[s][baseline]["val_loss"] for s in seeds]
            diff, half = paired_interval(diffs)
            summary[name].update(differences=diffs, difference=diff, interval=[diff - half, diff + half])
    return summary


def verdict(lo, hi):
    """How an interval of a difference reads: resolved only if it excludes 0. nan (one seed, or a run that
    diverged: its loss is nan) is no interval at all, never "resolved"."""
    if math.isnan(lo) or math.isnan(hi):
        return "no interval: one seed, or a run that diverged (nan)"
    return "contains 0: unresolved" if lo <= 0 <= hi else "resolved: " + ("lower" if hi < 0 else "higher")


def paired_interval(differences, level=0.95):
    """(mean, half-width) of the level confidence interval of the mean of paired differences (one per seed),
    from the t distribution with n - 1 degrees of freedom; half-width nan for a single seed."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return mean, t_quantile(n - 1, 1 - (1 - level) / 2) * sd / math.sqrt(n)


# -----------------------------------------------------------------------------
# The figure (optional matplotlib)

def plot(results, path):
    """Validation loss, and beside it the fraction of codes moved per step, of every method with a curve. Returns
    whether it wrote the figure (see write_figure)."""
    plt = pyplot()
    if plt is None or not any(r["curve"] for r in results.values()):  # no matplotlib, or all diverged at once
        return write_figure(path, None)
    fig, (ax_loss, ax_moved) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in results.items():  # left: validation loss; right: the stall diagnostic of the quantized methods
        if r["curve"]:
            ax_loss.plot(*zip(*r["curve"]), label=name, marker=".")
        if r["moved_curve"]:
            ax_moved.plot(*zip(*r["moved_curve"]), label=name, marker=".")
        else:
            ax_moved.plot([], [])  # keep each method's colour the same in both panels
    ax_loss.set(xlabel="step", ylabel="validation loss")
    ax_loss.set_ylim(top=min(r["curve"][0][1] for r in results.values() if r["curve"]) + 0.2)  # skip the start-up
    ax_moved.set(xlabel="step", ylabel="codes moved per step")
    if any(moved > 0 for r in results.values() for _, moved in r["moved_curve"]):
        ax_moved.set_yscale("log")  # the stalled methods sit an order of magnitude below the others
    ax_loss.legend()
    return write_figure(path, fig)


def plot_intervals(summary, path):
    """Each method's mean paired difference to master weights with its 95% interval, one row per method. Returns
    whether it wrote the figure (see write_figure)."""
    rows = [(name, r) for name, r in summary.items()  # a nan interval (a diverged seed) has nothing to draw
            if "interval" in r and not name.endswith("master_rtn") and not any(map(math.isnan, r["interval"]))]
    plt = pyplot()
    if plt is None or not rows:
        return write_figure(path, None)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    for y, (name, r) in enumerate(rows):
        lo, hi = r["interval"]
        ax.errorbar(r["difference"], y, xerr=[[r["difference"] - lo], [hi - r["difference"]]], fmt="o", capsize=4)
        ax.plot(r["differences"], [y] * len(r["differences"]), "k.", alpha=0.3)  # one dot per seed
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set(yticks=range(len(rows)), yticklabels=[n for n, _ in rows], xlabel="validation loss minus master weights' "
           "(same seed): mean and 95% interval")
    ax.invert_yaxis()
    return write_figure(path, fig)


def pyplot():
    """matplotlib.pyplot drawing to files only, or None without matplotlib: the figures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_figure(path, fig):
    """Write fig to path (a temporary name, then moved into place); with no figure (None), remove an older one
    at path instead: a figure beside results.json always shows its numbers. Returns whether it wrote one."""
    if fig is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return False
    fig.tight_layout()
    prepare.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    pyplot().close(fig)  # pyplot keeps every figure until it is closed
    return True


def compare(a, b):
    """Paired comparison of two methods across two --seeds runs (e.g. another moments storage against the default):
    a and b are "out_dir:method"; seeds present in both are paired. Returns (mean difference a - b, interval, seeds)."""
    rows = []
    for spec in (a, b):
        out_dir, _, method = spec.rpartition(":")
        with open(os.path.join(out_dir, "results.json")) as f:
            seeds = json.load(f).get("seeds")
        if not seeds:
            raise ValueError(f"{out_dir}/results.json holds no seeds: give the out_dir of a --seeds run")
        rows.append({s: r[method]["val_loss"] for s, r in seeds.items() if method in r})
    common = sorted(set(rows[0]) & set(rows[1]), key=int)
    if not common:
        raise ValueError(f"no seed has both {a} and {b} (seeds with each: {sorted(rows[0], key=int)}, "
                         f"{sorted(rows[1], key=int)}); accepted: two --seeds runs that share seeds, with those methods")
    diffs = [rows[0][s] - rows[1][s] for s in common]
    mean, half = paired_interval(diffs)
    return mean, [mean - half, mean + half], common


if __name__ == "__main__":  # python runs.py OUT_A:METHOD OUT_B:METHOD
    if len(sys.argv) != 3:
        sys.exit("usage: python runs.py OUT_A:METHOD OUT_B:METHOD   (two --seeds runs; paired by seed)")
    mean, (lo, hi), common = compare(*sys.argv[1:])
    print(f"{sys.argv[1]} - {sys.argv[2]}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] (95% interval, seeds "
          f"{', '.join(common)})  {verdict(lo, hi)}")

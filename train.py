"""
Train the same tiny GPT with each method side by side (full precision, FP8 master weights, naive
removal of the master copy, ECO) on Shakespeare, and report validation loss, memory and speed.

    python train.py                                        # all six methods, about 7 minutes on a 2-core CPU
    python train.py --methods=master_rtn,eco_sr            # a subset (into the same out/: same settings)
    python train.py --preset=gpu --out_dir=out-gpu         # ~30M non-embedding parameters, for one GPU
    python train.py --model=moe --out_dir=out-moe          # the sparse mixture-of-experts variant
    python train.py --moments=fp8 --out_dir=out-fp8        # AdamW's moments in FP8 (eco.py)
    python train.py --methods=fp32 --save_checkpoint=True --out_dir=out-pre     # pre-train in FP32, then
    python train.py --fmt=int4 --init_from=out-pre/ckpt_fp32.pt --lr=3e-4 --out_dir=out-int4  # INT4 fine-tuning
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpu               # data parallel, one process per GPU

Every method starts from the same initial weights, sees the same batches in the same order and follows
the same learning-rate schedule; only the optimizer's handling of the quantized weights differs (eco.py).
Options are --key=value overrides of the defaults below, all range-checked before anything is written.

Files in out_dir: results.json (rewritten after each method), ckpt_<method>.pt (--save_checkpoint=True, at every
evaluation) and curves.png. A run's bookkeeping lives in runs.py: the run's identity (its settings and its data),
one writer per out_dir, the rule that an out_dir holds one run's settings (a differing run is refused, naming
the options), --resume=True from each method's checkpoint (a method without one starts from step 0), atomic
writes that survive a kill at any moment, and torchrun's agreement between ranks.

Data parallel (torchrun): every process (rank) holds the whole model and optimizer and reads grad_accum
micro-batches of each step; gradients are averaged over the ranks and every rank takes the same step, so the
replicas stay bit-identical (checked at each evaluation). N ranks with --grad_accum=K train the run of one
process with --grad_accum=N*K, up to the order of float32 sums. Rank 0 prints and writes; prepare the default
data first (python data/prepare.py): under torchrun it is only read.
"""
import contextlib
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import eco
import quant
import runs
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
import prepare  # data/prepare.py

# -----------------------------------------------------------------------------
# Defaults: every one can be overridden on the command line as --key=value
out_dir = "out"
data_dir = prepare.DEFAULT_DIR  # data/shakespeare beside this file; any other: data/prepare.py --input --out_dir
methods = "fp32,master_rtn,naive_rtn,naive_sr,eco_rtn,eco_sr"  # which to train, in this order
fmt = "fp8_e4m3"  # weight format of the quantized methods: fp8_e4m3, int8 or int4
preset = ""  # "gpu": a model about the size of the paper's smallest (~30M non-embedding parameters)
init_from = ""  # a checkpoint of a full-precision run to fine-tune from (the paper's INT4 setting)
# model: the defaults of model.py's GPTConfig, set there only (2 layers, 2 heads, width 64, 64 tokens of context)
model = GPTConfig.mlp  # "dense" or "moe"
n_layer = GPTConfig.n_layer
n_head = GPTConfig.n_head
n_embd = GPTConfig.n_embd
block_size = GPTConfig.block_size
n_experts = GPTConfig.n_experts  # moe
top_k = GPTConfig.top_k  # moe
# optimisation: the paper's AdamW settings, scaled down
batch_size = 8
grad_accum = 1  # micro-batches per step on each rank: a step sees batch_size x grad_accum x world_size sequences
max_steps = 3000  # many small steps: sub-grid updates are what ECO is about (see README)
lr = 3e-3  # peak learning rate
warmup_frac = 0.1  # warm up over the first 10% of steps ...
warmup_start = 0.01  # ... from 0.01 x peak ...
final_lr_frac = 0.1  # ... then cosine decay to 0.1 x peak
beta1 = 0.9
beta2 = 0.98
eps = 1e-9
weight_decay = 0.1
grad_clip = 1.0  # clip the global gradient norm to this (0: no clipping)
dtype = "float32"  # the float parts of the quantized methods: float32, or bfloat16 under autocast (the GPU's)
fp8_matmul = "auto"  # FP8 matmuls: scaled_mm (torch._scaled_mm from the codes), simulated, or auto (quant.py)
moments = "fp32"  # how the AdamW moments are stored: fp32 (the paper), bf16 or fp8 (eco.py)
injection = "paper"  # ECO's coefficient: "paper" (constant lr) or "next_lr" (follows the schedule; eco.py)
# evaluation, logging, checkpoints
eval_interval = 500
eval_batches = 16  # a fixed set of validation batches, the same for every method
log_interval = 250
save_checkpoint = False  # write <out_dir>/ckpt_<method>.pt at every evaluation
resume = False  # continue each method from its checkpoint in out_dir
stop_at = 0  # stop early at this step (0: run to max_steps); the schedule still spans max_steps
sample_tokens = 64  # generate this many tokens from each trained model (0: skip)
seed = 1337  # the initial weights, the batch order and the rounding draws, each from its own stream
seeds = 1  # train seeds seed .. seed+seeds-1, each in out_dir/seed_<s>, and report their mean and intervals
jobs = 1  # with seeds > 1: how many seeds train at once, one process (and one thread) each
device = "auto"  # auto: cuda, then mps, then cpu
compile = False  # torch.compile the model (opt-in)
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

PRESETS = {  # applied before the command line, so explicit overrides still win
    "gpu": dict(n_layer=8, n_head=8, n_embd=576, block_size=512, batch_size=32, max_steps=4000, lr=1.5e-3,
                eval_interval=250, eval_batches=40, log_interval=50, dtype="bfloat16",
                methods="fp32,bf16,master_rtn,naive_rtn,naive_sr,eco_rtn,eco_sr"),
}
ALL_METHODS = {  # short name -> (optimizer mode, rounding); fp32 and bf16 train without quantization
    "fp32": (None, None), "bf16": (None, None), "master_rtn": ("master", "nearest"), "naive_rtn": ("naive", "nearest"),
    "naive_sr": ("naive", "stochastic"), "eco_rtn": ("eco", "nearest"), "eco_sr": ("eco", "stochastic"),
}
MODEL_KEYS = ("model", "n_layer", "n_head", "n_embd", "block_size", "n_experts", "top_k")
# Data parallel: torchrun starts one process per device and tells each its place; `python train.py` is rank 0 of 1
TORCHRUN = "RANK" in os.environ
RANK = int(os.environ.get("RANK", 0))  # this process among all of them
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))  # ... among those on this machine: its GPU
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))  # how many processes

# -----------------------------------------------------------------------------
# Options

def parse_args(argv):
    """--key=value overrides, checked against each default's type; unknown keys list the valid ones."""
    overrides = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ValueError(f"bad argument {arg!r}; use --key=value")
        if key not in DEFAULTS:
            raise ValueError(f"unknown option --{key}; valid: {', '.join('--' + k for k in DEFAULTS)}")
        kind = type(DEFAULTS[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key}={value}: expected true or false")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                raise ValueError(f"--{key}={value}: expected {kind.__name__}") from None
    config = dict(DEFAULTS)
    if overrides.get("preset", ""):
        if overrides["preset"] not in PRESETS:
            raise ValueError(f"unknown preset {overrides['preset']!r}; accepted: {list(PRESETS)}")
        config.update(PRESETS[overrides["preset"]])
    config.update(overrides)
    config["world_size"] = WORLD_SIZE  # recorded, not an option
    config["micro_batches"] = config["grad_accum"] * WORLD_SIZE  # per step, over all ranks
    check_ranges(config)
    for key in ("data_dir", "init_from"):  # one spelling per folder, whatever the working directory
        config[key] = config[key] and os.path.abspath(config[key])
    return config


def check_ranges(c):
    """Every option's accepted values; each error names the option, its value and what is accepted."""
    def need(ok, key, accepted):
        if not ok:
            raise ValueError(f"--{key}={c[key]!r} is out of range; accepted: {accepted}")
    names = method_list(c)
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise ValueError(f"--methods={c['methods']}: unknown {bad}; accepted: {','.join(ALL_METHODS)}")
    need(len(set(names)) == len(names), "methods", "each method at most once")
    for key, accepted in (("fmt", quant.FORMATS), ("model", ("dense", "moe")), ("moments", eco.MOMENTS),
                          ("injection", eco.INJECTIONS), ("dtype", ("float32", "bfloat16")),
                          ("fp8_matmul", quant.MATMUL_PATHS)):
        need(c[key] in accepted, key, ", ".join(accepted))
    for key in ("n_layer", "n_head", "n_embd", "block_size", "n_experts", "batch_size", "max_steps",
                "eval_interval", "eval_batches", "log_interval"):
        need(c[key] >= 1, key, "an integer >= 1")
    need(c["n_embd"] % (2 * c["n_head"]) == 0, "n_embd", f"a multiple of 2 x n_head={c['n_head']} (rotary "
         "embeddings rotate pairs of channels, so each head's size must be even)")
    need(1 <= c["top_k"] <= c["n_experts"], "top_k", f"1 to n_experts={c['n_experts']}")
    need(0 <= c["stop_at"] <= c["max_steps"], "stop_at", f"0 (run to max_steps) to max_steps={c['max_steps']}")
    need(0 <= c["lr"] < math.inf, "lr", "a finite number >= 0")
    for key in ("warmup_frac", "warmup_start", "final_lr_frac"):
        need(0 <= c[key] <= 1, key, "a number in [0, 1]")
    need(0 < c["beta1"] < 1, "beta1", "a number in (0, 1)")
    need(0 <= c["beta2"] < 1, "beta2", "a number in [0, 1)")
    need(0 < c["eps"] < math.inf, "eps", "a finite number > 0")
    need(0 <= c["weight_decay"] < math.inf, "weight_decay", "a finite number >= 0")
    need(0 <= c["grad_clip"] < math.inf, "grad_clip", "a finite number >= 0 (0: no clipping)")
    need(c["sample_tokens"] >= 0, "sample_tokens", "an integer >= 0")
    need(c["seed"] >= 0, "seed", "an integer >= 0")
    need(c["seeds"] >= 1, "seeds", "an integer >= 1")
    need(1 <= c["jobs"] <= c["seeds"], "jobs", f"1 to seeds={c['seeds']}")
    need(c["seeds"] == 1 or not TORCHRUN, "seeds", "1 under torchrun (run the seeds one after another)")
    need(c["micro_batches"] >= 1, "grad_accum", "an integer >= 1")
    need(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", c["device"]), "device", "auto, cpu, cuda, cuda:N or mps")
    here = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] + \
        ["mps"] * torch.backends.mps.is_available()
    need(c["device"] in here or c["device"] == "cuda" and torch.cuda.is_available(), "device",
         f"a device this machine has: {', '.join(here)}")
    need(not os.path.exists(c["out_dir"]) or os.path.isdir(c["out_dir"]), "out_dir", "a folder (this is a file)")


def method_list(c):
    return [m for m in c["methods"].split(",") if m]


def method_name(short, c):
    """The name in logs, results and checkpoints: the weight format comes first for quantized methods."""
    return short if ALL_METHODS[short][0] is None else f"{c['fmt'].split('_')[0]}_{short}"


# -----------------------------------------------------------------------------
# Schedule and batches: pure functions of the step, the same for every method

def get_lr(step, c):
    """Linear warmup from warmup_start x peak, then cosine down to final_lr_frac x peak. step is 0-based;
    get_lr(max_steps) = final_lr_frac x peak is the rate after the last step (what next_lr needs there)."""
    warmup = max(1, int(c["warmup_frac"] * c["max_steps"]))
    if step < warmup:
        return c["lr"] * (c["warmup_start"] + (1 - c["warmup_start"]) * step / warmup)
    progress = (step - warmup) / max(1, c["max_steps"] - warmup)
    return c["lr"] * (c["final_lr_frac"] + (1 - c["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * progress)))


TRAIN, VAL, INIT, ROUNDING, SAMPLE = range(5)  # the random streams of a seed


def stream_seed(c, stream):
    """A seed for one use of --seed (initial weights, rounding draws, the sample), from its own stream: two uses,
    and two --seed values, never share random numbers by accident."""
    return int(np.random.default_rng([c["seed"], stream]).integers(2**31))


def get_batch(data, step, c, dev, stream, micro=0):
    """Micro-batch `micro` of a step (rank r reads micro = r x grad_accum + k, k < grad_accum): a function of
    (seed, step, micro) only, so identical for every method and however a step's micro-batches are split over
    ranks. Validation batch `step` does not depend on the seed: every run is scored on the same held-out set."""
    key = [c["seed"], TRAIN, step, micro] if stream == TRAIN else [VAL, step]
    ix = np.random.default_rng(key).integers(len(data) - c["block_size"] - 1, size=c["batch_size"]).tolist()
    x = torch.from_numpy(np.stack([data[i:i + c["block_size"]] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + c["block_size"]] for i in ix]).astype(np.int64))
    return x.to(dev), y.to(dev)


# -----------------------------------------------------------------------------
# Measurements

def memory_bytes(model, opt):
    """Static memory actually allocated: weights (codes, scales, float params) and optimizer state."""
    parts = dict(q_weights=0, q_state=0, other_weights=0, other_state=0, q_params=0, other_params=0)
    for p in model.parameters():
        kind = "q" if eco.is_quantized(p) else "other"
        parts[f"{kind}_params"] += p.numel()
        parts[f"{kind}_weights"] += p.nbytes + (p.scale.nbytes if kind == "q" else 0)
        parts[f"{kind}_state"] += sum(t.nbytes for t in opt.state.get(p, {}).values() if torch.is_tensor(t))
    return parts


@torch.no_grad()
def evaluate(model, val_data, c, dev, amp=contextlib.nullcontext()):
    """The mean loss of the fixed validation batches. Rank r of N evaluates batches r, r + N, ... and the sums are
    added up: one process's result up to the order of a float64 sum."""
    model.eval()
    with amp:
        total = sum(model(*get_batch(val_data, i, c, dev, stream=VAL))[1].item()
                    for i in range(RANK, c["eval_batches"], WORLD_SIZE))
    model.train()
    if TORCHRUN:
        total = torch.tensor(total, dtype=torch.float64, device=dev)
        dist.all_reduce(total)
    return float(total) / c["eval_batches"]


def load_data(c):
    """The data folder, checked (prepared first if it is the default one), recorded in c as the run's data
    identity; and the fine-tuning checkpoint's weights, which must come with the same tokenizer. Returns
    (meta, train and val tokens, initial weights or None). Nothing is written but the default data set."""
    if os.path.realpath(c["data_dir"]) == os.path.realpath(prepare.DEFAULT_DIR) and not TORCHRUN:
        meta = prepare.prepare(prepare.DEFAULT_DIR)  # downloads and tokenizes Shakespeare once
    else:  # (under torchrun every rank only reads files)
        meta = prepare.load_meta(c["data_dir"])  # refuses a missing, incomplete or damaged folder
    c.update(runs.data_identity(meta))
    init_state = None
    if c["init_from"]:  # fine-tuning: the weights, and the architecture that comes with them
        ckpt = runs.read_checkpoint(c["init_from"])
        if any(t.dtype != torch.float32 for t in ckpt["model"].values()):
            raise ValueError(f"--init_from={c['init_from']}: expected a full-precision (fp32 method) checkpoint")
        vocab = ckpt["model"]["embed.weight"].shape[0]
        tokenizer = ckpt["config"].get("tokenizer_sha256")
        if vocab != meta["vocab_size"] or tokenizer != c["tokenizer_sha256"]:
            raise ValueError(f"--init_from={c['init_from']} was trained with another tokenizer ({vocab} tokens, "
                             f"tokenizer sha256 {tokenizer}) than {c['data_dir']} has ({meta['vocab_size']} tokens, "
                             f"{c['tokenizer_sha256']}): its token ids would mean other things; fine-tune on data "
                             "prepared with its tokenizer")
        changed = [f"{k}={ckpt['config'][k]!r} (not {c[k]!r})" for k in MODEL_KEYS if ckpt["config"][k] != c[k]]
        if changed:
            print(f"--init_from: the architecture comes with the weights: {', '.join(changed)}")
        c.update({k: ckpt["config"][k] for k in MODEL_KEYS})
        init_state = ckpt["model"]
    train_data = np.memmap(os.path.join(c["data_dir"], "train.bin"), dtype=np.uint16, mode="r")
    val_data = np.memmap(os.path.join(c["data_dir"], "val.bin"), dtype=np.uint16, mode="r")
    for split, data in (("train", train_data), ("val", val_data)):  # get_batch needs block_size + 2 tokens or more
        if len(data) < c["block_size"] + 2:
            raise ValueError(f"--block_size={c['block_size']} is too long for the {split} split of {c['data_dir']} "
                             f"({len(data)} tokens); accepted: at most {len(data) - 2}")
    return meta, train_data, val_data, init_state


def main(argv=None):
    c = parse_args(sys.argv[1:] if argv is None else argv)
    if RANK > 0:  # every rank computes the same numbers: rank 0 alone prints them
        sys.stdout = open(os.devnull, "w")
    dev = c["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if TORCHRUN:  # data parallel: one process per GPU talking over NCCL, or CPU processes over gloo
        dev = f"cuda:{LOCAL_RANK}" if dev.startswith("cuda") else "cpu"
        if dev != "cpu":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="gloo" if dev == "cpu" else "nccl")
    # -------------------------------------------------------------------------
    # Everything that can refuse the run, on every rank together, before out_dir is touched
    meta, train_data, val_data, init_state = runs.refuse_together(lambda: load_data(c))
    if TORCHRUN:
        runs.check_ranks_agree(c)  # the same options and data on every rank, or every rank stops
    names = [method_name(short, c) for short in method_list(c)]
    if c["seeds"] > 1:  # each seed trains as a run of its own in a sub-folder; then every method's interval
        with runs.out_dir_lock(c["out_dir"]):
            rows = runs.train_seeds(c, names, os.path.abspath(__file__), DEFAULTS)
            summary = runs.summarize(rows, method_name("master_rtn", c))
            runs.write_results(c, summary, seeds=rows)
            report_seeds(summary, c)
        return summary
    with contextlib.ExitStack() as stack:
        def claim_out_dir():  # one run at a time writes to an out_dir (rank 0 writes), with the same settings
            if RANK == 0:
                stack.enter_context(runs.out_dir_lock(c["out_dir"]))
            return runs.check_out_dir(c, names)
        earlier = runs.refuse_together(claim_out_dir)  # the results of earlier runs with these settings

        # ---------------------------------------------------------------------
        # One set of initial weights for every method (fresh from the seed, or the fine-tuning checkpoint)
        cfg = GPTConfig(vocab_size=meta["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
                        n_head=c["n_head"], n_embd=c["n_embd"], mlp=c["model"], n_experts=c["n_experts"],
                        top_k=c["top_k"])
        torch.manual_seed(stream_seed(c, INIT))
        init_model = GPT(cfg)
        if init_state is None:
            init_state = init_model.state_dict()
        split = f" ({c['world_size']} ranks x {c['grad_accum']} micro-batches)" if c["micro_batches"] > 1 else ""
        print(f"device {dev} | {init_model.num_params():,} non-embedding parameters | {c['max_steps']} steps of "
              f"{c['batch_size'] * c['block_size'] * c['micro_batches']:,} tokens{split} | methods {', '.join(names)}")
        kept = [name for name in earlier if name not in names]
        if kept:
            print(f"keeping the results of {', '.join(kept)} from an earlier run with these settings")

        # ---------------------------------------------------------------------
        # Train each method from those weights; results.json after each, so a crash keeps the finished ones
        results = {}
        for short in method_list(c):
            results[method_name(short, c)] = train_method(short, c, cfg, init_state, train_data, val_data, meta, dev)
            if RANK == 0:  # the one rank that writes files
                runs.write_results(c, {**earlier, **results})

        # ---------------------------------------------------------------------
        # Report
        if RANK == 0:
            report({**earlier, **results}, c)
    if TORCHRUN:
        dist.barrier()  # leave together: a rank that tears down its connections while another works can abort
        dist.destroy_process_group()
    return results


def train_method(short, c, cfg, init_state, train_data, val_data, meta, dev):
    """Train one method from init_state on the shared batches and schedule; returns its row of results."""
    # -------------------------------------------------------------------------
    # Build this method's model and optimizer: only the optimizer's mode and rounding differ
    mode, rounding = ALL_METHODS[short]
    name = method_name(short, c)
    if dev.startswith("cuda"):  # this method's peak: weights, optimizer state, activations and temporaries
        torch.cuda.reset_peak_memory_stats(dev)
    model = GPT(cfg)
    model.load_state_dict(init_state)
    if mode is not None:
        model.quantize_(c["fmt"])
    model.to(dev)
    matmul = quant.set_matmul_(model, c["fp8_matmul"])  # {path: how many weights run it}
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices, expert banks, embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    assert len(decay) + len(no_decay) == len(list(model.parameters())) == len({id(p) for p in decay + no_decay})
    opt = eco.ECOAdamW([dict(params=decay, weight_decay=c["weight_decay"]), dict(params=no_decay, weight_decay=0.0)],
                       lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"], mode=mode or "master",
                       rounding=rounding or "nearest", seed=stream_seed(c, ROUNDING), moments=c["moments"], injection=c["injection"])
    forward = torch.compile(model) if c["compile"] else model
    # bf16: the float model in bfloat16 with float32 master weights (the GPU baseline); --dtype=bfloat16: the float
    # parts of the quantized methods too. Autocast runs matmuls (forward and backward) in bfloat16, norms in float32.
    dtype = "bfloat16" if short == "bf16" or (mode is not None and c["dtype"] == "bfloat16") else "float32"
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")  # a context
    ckpt_path = os.path.join(c["out_dir"], f"ckpt_{name}.pt")
    start, curve, moved_curve, train_time, diverged = 0, [], [], 0.0, False
    if c["resume"] and os.path.exists(ckpt_path):
        ckpt = runs.read_checkpoint(ckpt_path, map_location=dev)  # its settings were checked by check_out_dir
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, curve, moved_curve, train_time = ckpt["step"], ckpt["curve"], ckpt["moved_curve"], ckpt["train_time"]
    end, done = c["stop_at"] or c["max_steps"], start
    tokens_per_step = c["batch_size"] * c["block_size"] * c["micro_batches"]  # every rank's micro-batches
    # The fraction of quantized weights whose stored code changes in a step. Without a master copy,
    # updates below half a grid step are lost: naive training stalls when it drops towards zero.
    qparams = [p for p in model.parameters() if eco.is_quantized(p)]
    n_quantized = sum(p.numel() for p in qparams)
    moved, moved_steps = torch.zeros((), device=dev), 0
    print(f"\n{name}: mode={mode or 'plain AdamW, no quantization'} rounding={rounding or '-'} {dtype}"
          + (f" | FP8 matmuls: {matmul} | fused ECO kernel: {opt.fused}" if qparams else ""))
    if c["resume"]:
        print(f"{name}: resuming from {ckpt_path} at step {start}" if start else
              f"{name}: no checkpoint at {ckpt_path} yet, starting from step 0")
    if c["init_from"] and start == 0:  # fine-tuning: the loss of the freshly quantized checkpoint
        curve.append([0, evaluate(forward, val_data, c, dev, amp)])
        print(f"{name} step 0: val loss {curve[-1][1]:.4f}")

    # -------------------------------------------------------------------------
    # Training loop
    for step in range(start, end):
        t0 = time.perf_counter()
        for group in opt.param_groups:  # next_lr: the rate of the step after this one (injection="next_lr")
            group["lr"], group["next_lr"] = get_lr(step, c), get_lr(step + 1, c)
        try:
            loss_value = 0.0  # the mean loss of this step's micro-batches
            for k in range(c["grad_accum"]):
                with amp:
                    _, loss = forward(*get_batch(train_data, step, c, dev, TRAIN, micro=RANK * c["grad_accum"] + k))
                loss_value += loss.item() / c["grad_accum"]
                (loss / c["grad_accum"]).backward()  # .grad and main_grad add up: the mean over micro-batches
            if TORCHRUN:
                # Average the gradients over the ranks; the loss rides along, so the log shows the global mean.
                # Not DistributedDataParallel: it averages the .grad of parameters that require grad, and the
                # FP8/int8 codes do not (their gradient is main_grad): each rank would silently train them on its
                # own batches. Now every rank takes the same step on the same gradient (clipped by the global norm),
                # and stochastic rounding draws from the optimizer's generator, seeded alike on every rank: codes,
                # scales and moments stay bit-identical without sending any weights.
                mean_loss = torch.tensor([loss_value], device=dev)
                runs.average_over_ranks_([eco.grad_of(p) for p in model.parameters()] + [mean_loss])
                loss_value = mean_loss.item()
            if not math.isfinite(loss_value):
                raise quant.NonFiniteError(f"loss is {loss_value}")
            eco.clip_grad_norm_(model.parameters(), c["grad_clip"])  # main_grads of quantized weights included
            codes_before = [p.detach().clone() for p in qparams]
            opt.step()
            eco.zero_grad_(model.parameters())
            for before, p in zip(codes_before, qparams):  # compare bytes: FP8 has no != on every device
                moved += (before.view(torch.uint8) != p.detach().view(torch.uint8)).sum() / n_quantized
            moved_steps += 1
        except quant.NonFiniteError as err:  # a NaN/Inf loss, gradient norm or gradient
            print(f"{name}: diverged at step {step} ({err})")
            diverged = True
            break
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0  # the clock runs only for training steps
        done = step + 1
        if done % c["log_interval"] == 0 or done == end:
            tok_s = done * tokens_per_step / max(train_time, 1e-9)  # train_time spans resumes
            eta = (end - done) * train_time / done
            print(f"{name} step {done}/{end} | loss {loss_value:.4f} | lr {get_lr(step, c):.2e} | "
                  f"{tok_s:,.0f} tok/s | ETA {eta:.0f}s")
        if done % c["eval_interval"] == 0 or done == end:
            curve.append([done, evaluate(forward, val_data, c, dev, amp)])
            if TORCHRUN:  # are the replicas still bit-identical?
                hashes = [None] * WORLD_SIZE
                dist.all_gather_object(hashes, runs.state_hash(model, opt))
                runs.check_replicas(hashes, done, name)
            if qparams:  # the mean fraction of codes moved per step since the last evaluation
                moved_curve.append([done, moved.item() / max(moved_steps, 1)])
                moved.zero_()
                moved_steps = 0
            print(f"{name} step {done}: val loss {curve[-1][1]:.4f}"
                  + (f" | codes moved per step {moved_curve[-1][1]:.2%}" if qparams else ""))
            if c["save_checkpoint"] and RANK == 0:
                state = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=done, curve=curve,
                             moved_curve=moved_curve, train_time=train_time, config=c, method=name)
                runs.write_checkpoint(ckpt_path, state)

    # -------------------------------------------------------------------------
    # This method's results
    mem = memory_bytes(model, opt)
    n_params = mem["q_params"] + mem["other_params"]
    row = dict(
        val_loss=float("nan") if diverged or not curve else curve[-1][1], diverged=diverged,
        bytes_per_param=sum(mem[k] for k in ("q_weights", "q_state", "other_weights", "other_state")) / n_params,
        bytes_per_quantized_param=(mem["q_weights"] + mem["q_state"]) / max(mem["q_params"], 1),
        bytes_per_other_param=(mem["other_weights"] + mem["other_state"]) / max(mem["other_params"], 1),
        quantized_params=mem["q_params"], other_params=mem["other_params"],
        tokens_per_s=done * tokens_per_step / max(train_time, 1e-9), state_hash=runs.state_hash(model, opt),
        curve=curve, moved_curve=moved_curve, moved=moved_curve[-1][1] if moved_curve else None,
        peak_memory=torch.cuda.max_memory_allocated(dev) if dev.startswith("cuda") else None, fused=opt.fused,
        dtype=dtype, matmul=matmul)
    if c["sample_tokens"] and not diverged and RANK == 0:
        enc = prepare.load_tokenizer(os.path.join(c["data_dir"], meta["tokenizer"]))
        start_ids = torch.tensor([enc.encode_ordinary("\n")], device=dev)
        ids = model.generate(start_ids, c["sample_tokens"], top_k=50,
                             generator=torch.Generator(device=dev).manual_seed(stream_seed(c, SAMPLE)))
        row["sample"] = enc.decode(ids[0].tolist())
        print(f"{name} sample: {row['sample']!r}")
    return row


def report(results, c):
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
    print("B/param: weights + scales + master copy + optimizer moments per parameter (all, quantized, the rest)")
    print("moved: quantized weights whose stored code changed, per step, mean over the last evaluation interval")
    if peak:
        print("peak MiB: torch.cuda.max_memory_allocated during the method (weights, state, activations, temporaries)")
    print(f"wrote {os.path.join(c['out_dir'], 'results.json')}")
    runs.plot(results, os.path.join(c["out_dir"], "curves.png"))


def report_seeds(summary, c):
    seeds = f"seeds {c['seed']} .. {c['seed'] + c['seeds'] - 1}"
    print(f"\n{'method':<17}{'mean val loss':>14}{'sd':>8}   vs master: mean paired difference [95% interval] ({seeds})")
    for name, r in summary.items():
        line = f"{name:<17}{r['mean']:>14.4f}{r['sd']:>8.4f}"
        if "interval" in r and not name.endswith("master_rtn"):
            lo, hi = r["interval"]
            verdict = "contains 0: unresolved" if lo <= 0 <= hi else "resolved: " + ("lower" if hi < 0 else "higher")
            line += f"   {r['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]  {verdict}"
        print(line)
    print("sd: over seeds; the interval: Student's t over the per-seed differences to master weights (same seed: the same "
          "initial weights, batches and rounding streams)")
    runs.plot_intervals(summary, os.path.join(c["out_dir"], "intervals.png"))
    print(f"wrote {os.path.join(c['out_dir'], 'results.json')} (every seed's rows) and intervals.png")

if __name__ == "__main__":
    main()

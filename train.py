"""
Train the same tiny GPT with each method side by side (full precision, FP8 master weights, naive
removal of the master copy, ECO) on Shakespeare, and report validation loss, memory and speed.

    python train.py                                        # all six methods, about 7 minutes on a 2-core CPU
    python train.py --seeds=5 --jobs=2 --out_dir=out-5     # five seeds, two at a time: means and intervals
    python train.py --methods=master_rtn,eco_sr            # a subset (into the same out/: same settings)
    python train.py --preset=gpu --out_dir=out-gpu         # ~30M non-embedding parameters and bf16, for one GPU
    python train.py --model=moe --out_dir=out-moe          # the sparse mixture-of-experts variant
    python train.py --moments=fp8 --fmt=nvfp4 --out_dir=out-4  # NVFP4 weights, FP8 moments (--optimizer=muon: Muon)
    python train.py --methods=fp32 --save_checkpoint=True --out_dir=out-pre     # pre-train in FP32, then
    python train.py --fmt=int4 --init_from=out-pre/ckpt_fp32.pt --lr=3e-4 --out_dir=out-int4  # INT4 fine-tuning
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpu               # data parallel, one process per GPU

Every method starts from the same initial weights, sees the same batches in the same order and follows the same
schedule; only the optimizer's handling of the quantized weights differs (eco.py). Options: --key=value overrides
of the defaults below. What keeps a run safe to kill, resume, repeat and spread over ranks is runs.py's.
"""
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch

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
fmt = "fp8_e4m3"  # weight format of the quantized methods: fp8_e4m3, int8, int4, nvfp4 or mxfp4
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
optimizer = "adamw"  # "adamw", or "muon": Muon for the block matrices, AdamW for the rest (eco.ECOMuon)
muon_lr = 0.005  # Muon's peak lr (warm-up and decay as --lr): the best of a sweep of master weights (RESULTS.md)
muon_momentum = 0.95
moments = "fp32"  # how the optimizer's moments are stored: fp32 (the paper), bf16 or fp8 (eco.py)
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
    """--key=value overrides of the defaults above (runs.parse_options), plus what the run derives from them."""
    config = runs.parse_options(argv, DEFAULTS, PRESETS)
    config["world_size"] = WORLD_SIZE  # recorded, not an option
    config["micro_batches"] = config["grad_accum"] * WORLD_SIZE  # per step, over all ranks
    check_ranges(config)
    for key in ("data_dir", "init_from"):  # one spelling per folder, whatever the working directory
        config[key] = config[key] and os.path.abspath(config[key])
    return config


def check_ranges(c):
    """What no constructor checks (GPT, MoE, ECOAdamW check the rest); each error names the option and its range."""
    def need(ok, key, accepted):
        if not ok:
            raise ValueError(f"--{key}={c[key]!r} is out of range; accepted: {accepted}")
    names = method_list(c)
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise ValueError(f"--methods={c['methods']}: unknown {bad}; accepted: {','.join(ALL_METHODS)}")
    need(len(set(names)) == len(names), "methods", "each method at most once")
    for key, accepted in (("fmt", quant.FORMATS), ("model", ("dense", "moe")), ("dtype", ("float32", "bfloat16")),
                          ("fp8_matmul", quant.MATMUL_PATHS), ("optimizer", ("adamw", "muon"))):  # model: GPTConfig's mlp
        need(c[key] in accepted, key, ", ".join(accepted))
    for key in ("n_layer", "n_head", "n_embd", "block_size", "n_experts", "batch_size", "max_steps",
                "eval_interval", "eval_batches", "log_interval", "micro_batches", "seeds"):
        need(c[key] >= 1, "grad_accum" if key == "micro_batches" else key, "an integer >= 1")
    need(0 <= c["stop_at"] <= c["max_steps"], "stop_at", f"0 (run to max_steps) to max_steps={c['max_steps']}")
    for key in ("warmup_frac", "warmup_start", "final_lr_frac"):
        need(0 <= c[key] <= 1, key, "a number in [0, 1]")
    need(0 <= c["grad_clip"] < math.inf, "grad_clip", "a finite number >= 0 (0: no clipping)")
    need(c["sample_tokens"] >= 0, "sample_tokens", "an integer >= 0")
    need(c["seed"] >= 0, "seed", "an integer >= 0")
    need(1 <= c["jobs"] <= c["seeds"], "jobs", f"1 to seeds={c['seeds']}")
    need(c["seeds"] == 1 or not TORCHRUN, "seeds", "1 under torchrun (run the seeds one after another)")
    runs.check_device_and_out_dir(c)


def method_list(c):
    return [m for m in c["methods"].split(",") if m]


def method_name(short, c):
    """The name in logs, results and checkpoints: the weight format comes first for quantized methods."""
    return short if ALL_METHODS[short][0] is None else f"{c['fmt'].split('_')[0]}_{short}"


def make_optimizer(model, c, mode, rounding):
    """AdamW (or Muon for the block matrices) with the run's hyper-parameters for every method: only (mode, rounding)
    differs between them. Each group's peak_lr is what the schedule scales."""
    muon = c["optimizer"] == "muon"
    matrices = [p for n, p in model.named_parameters() if muon and n.startswith("blocks.") and p.dim() >= 2]
    decay = [p for p in model.parameters() if p.dim() >= 2 and not any(p is q for q in matrices)]  # embeddings ...
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    assert len(matrices) + len(decay) + len(no_decay) == len(list(model.parameters())), "every parameter in one group"
    adamw = dict(peak_lr=c["lr"], **(dict(use_muon=False) if muon else {}))
    groups = [dict(params=decay, weight_decay=c["weight_decay"], **adamw), dict(params=no_decay, weight_decay=0.0, **adamw)]
    hyper = dict(lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"], mode=mode, rounding=rounding,
                 seed=stream_seed(c, ROUNDING), moments=c["moments"], injection=c["injection"])
    if not muon:
        return eco.ECOAdamW(groups, **hyper)
    matrices = dict(params=matrices, lr=c["muon_lr"], peak_lr=c["muon_lr"], weight_decay=c["weight_decay"])
    return eco.ECOMuon([matrices] + groups, momentum=c["muon_momentum"], **hyper)


# -----------------------------------------------------------------------------
# Data, schedule and batches: the same for every method

def data_and_initial_weights(c, dev):
    """The data (checked, and recorded in c as the run's data identity) and the one set of initial weights every
    method starts from (fresh from the seed, or the fine-tuning checkpoint), whose model and an optimizer built
    here check the options parse_args leaves to them. Returns (model config, train, val tokens, initial weights)."""
    meta = runs.open_data(c, prepare_default=not TORCHRUN)  # under torchrun every rank only reads files
    init_state = runs.load_init_checkpoint(c, meta, MODEL_KEYS) if c["init_from"] else None
    train_data, val_data = (np.memmap(os.path.join(c["data_dir"], f"{split}.bin"), dtype=np.uint16, mode="r")
                            for split in ("train", "val"))
    for split, data in (("train", train_data), ("val", val_data)):  # get_batch needs block_size + 2 tokens or more
        if len(data) < c["block_size"] + 2:
            raise ValueError(f"--block_size={c['block_size']} is too long for the {split} split of {c['data_dir']} "
                             f"({len(data)} tokens); accepted: at most {len(data) - 2}")
    cfg = GPTConfig(vocab_size=meta["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
                    n_head=c["n_head"], n_embd=c["n_embd"], mlp=c["model"], n_experts=c["n_experts"], top_k=c["top_k"])
    torch.manual_seed(stream_seed(c, INIT))
    init_model = GPT(cfg)
    make_optimizer(init_model, c, "eco", "stochastic")  # checks lr, betas, eps, weight_decay, moments, injection
    step_tokens = c["batch_size"] * c["block_size"] * c["micro_batches"]  # every rank's micro-batches
    print(f"device {dev} | {init_model.num_params():,} non-embedding parameters | {c['max_steps']} steps of "
          f"{step_tokens:,} tokens ({c['world_size']} ranks x {c['grad_accum']} micro-batches) | methods {c['methods']}")
    return cfg, train_data, val_data, init_state or init_model.state_dict()


def get_lr(step, c, peak=None):
    """Linear warmup from warmup_start x peak, then cosine down to final_lr_frac x peak (peak: --lr unless given). step
    is 0-based; get_lr(max_steps) = final_lr_frac x peak is the rate after the last step (what next_lr needs there)."""
    peak = c["lr"] if peak is None else peak
    warmup = max(1, int(c["warmup_frac"] * c["max_steps"]))
    if step < warmup:
        return peak * (c["warmup_start"] + (1 - c["warmup_start"]) * step / warmup)
    progress = (step - warmup) / max(1, c["max_steps"] - warmup)
    return peak * (c["final_lr_frac"] + (1 - c["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    """Static memory allocated per parameter (weights, scales, master copies, moments): over all parameters, over
    the quantized block weights and over the rest (embeddings, head, norms)."""
    nbytes, count = {True: 0, False: 0}, {True: 0, False: 0}  # by quantized or not
    for p in model.parameters():
        q = eco.is_quantized(p)
        count[q] += math.prod(eco.shape_of(p))  # values: a packed 4-bit weight holds two per byte
        nbytes[q] += p.nbytes + (p.scale.nbytes if q else 0) + sum(t.nbytes for t in opt.state.get(p, {}).values()
                                                                   if torch.is_tensor(t))
    return dict(bytes_per_param=sum(nbytes.values()) / sum(count.values()), quantized_params=count[True],
                bytes_per_quantized_param=nbytes[True] / max(count[True], 1), other_params=count[False],
                bytes_per_other_param=nbytes[False] / max(count[False], 1))


@torch.no_grad()
def evaluate(model, val_data, c, dev, amp=contextlib.nullcontext()):
    """The mean loss of the fixed validation batches (rank r of N evaluates batches r, r + N, ...)."""
    model.eval()
    with amp:
        total = sum(model(*get_batch(val_data, i, c, dev, stream=VAL))[1].item()
                    for i in range(RANK, c["eval_batches"], WORLD_SIZE))
    model.train()
    return runs.sum_over_ranks(total) / c["eval_batches"]


# -----------------------------------------------------------------------------
# The run

def main(argv=None):
    c = parse_args(sys.argv[1:] if argv is None else argv)
    if RANK > 0:  # every rank computes the same numbers: rank 0 alone prints them
        sys.stdout = open(os.devnull, "w")
    dev = runs.start_device(c["device"], LOCAL_RANK if TORCHRUN else None)  # torchrun: this rank's GPU, or gloo
    # Everything that can refuse the run, on every rank together, before out_dir is touched
    cfg, train_data, val_data, init_state = runs.refuse_together(lambda: data_and_initial_weights(c, dev))
    if TORCHRUN:
        runs.check_ranks_agree(c)  # the same options and data on every rank, or every rank stops
    names = [method_name(short, c) for short in method_list(c)]
    if c["seeds"] > 1:  # each seed trains as a run of its own in a sub-folder, then every method's interval
        return runs.run_seeds(c, names, os.path.abspath(__file__), DEFAULTS, method_name("master_rtn", c))
    with contextlib.ExitStack() as stack:  # holds out_dir's lock until the run ends
        earlier = runs.claim_out_dir(stack, c, names, RANK)  # the results of earlier runs with these settings
        results = {}  # train each method from the same weights; results.json after each: a crash keeps the others
        for short in method_list(c):
            results[method_name(short, c)] = train_method(short, c, cfg, init_state, train_data, val_data, dev)
            if RANK == 0:  # the one rank that writes files
                runs.write_results(c, {**earlier, **results})
        if RANK == 0:
            runs.report({**earlier, **results}, c)
    runs.stop_ranks()  # torchrun: leave together
    return results


def train_method(short, c, cfg, init_state, train_data, val_data, dev):
    """Train one method from init_state on the shared batches and schedule; returns its row of results."""
    # -------------------------------------------------------------------------
    # Build this method's model and optimizer: only the optimizer's mode and rounding differ
    (mode, rounding), name = ALL_METHODS[short], method_name(short, c)
    if dev.startswith("cuda"):  # this method's peak: weights, optimizer state, activations and temporaries
        torch.cuda.reset_peak_memory_stats(dev)
    model = GPT(cfg)
    model.load_state_dict(init_state)
    if mode is not None:
        model.quantize_(c["fmt"])
    model.to(dev)
    matmul = quant.set_matmul_(model, c["fp8_matmul"])  # {path: how many weights run it}
    opt = make_optimizer(model, c, mode or "master", rounding or "nearest")
    forward = torch.compile(model) if c["compile"] else model
    # bf16, and --dtype=bfloat16's quantized methods: matmuls in bfloat16 under autocast, weights kept in float32
    dtype = "bfloat16" if short == "bf16" or (mode is not None and c["dtype"] == "bfloat16") else "float32"
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")  # a context
    # The fraction of quantized weights whose stored code changes in a step. Without a master copy,
    # updates below half a grid step are lost: naive training stalls when it drops towards zero.
    qparams = [p for p in model.parameters() if eco.is_quantized(p)]
    n_quantized = sum(math.prod(eco.shape_of(p)) for p in qparams)  # values, not bytes
    moved, moved_steps = torch.zeros((), device=dev), 0
    print(f"\n{name}: mode={mode or 'plain AdamW, no quantization'} rounding={rounding or '-'} {dtype}"
          + (f" | matmuls: {matmul} | fused ECO kernel: {opt.fused}" if qparams else ""))
    start, curve, moved_curve, train_time = runs.resume_(c, name, model, opt, dev)
    end, done, diverged = c["stop_at"] or c["max_steps"], start, False
    tokens_per_step = c["batch_size"] * c["block_size"] * c["micro_batches"]  # every rank's micro-batches
    if c["init_from"] and start == 0:  # fine-tuning: the loss of the freshly quantized checkpoint
        curve.append([0, evaluate(forward, val_data, c, dev, amp)])
        print(f"{name} step 0: val loss {curve[-1][1]:.4f}")

    # -------------------------------------------------------------------------
    # Training loop
    for step in range(start, end):
        t0 = time.perf_counter()
        for group in opt.param_groups:  # next_lr: the rate of the step after this one (injection="next_lr")
            group["lr"], group["next_lr"] = get_lr(step, c, group["peak_lr"]), get_lr(step + 1, c, group["peak_lr"])
        try:
            loss_value = 0.0  # the mean loss of this step's micro-batches
            for k in range(c["grad_accum"]):
                with amp:
                    _, loss = forward(*get_batch(train_data, step, c, dev, TRAIN, micro=RANK * c["grad_accum"] + k))
                loss_value += loss.item() / c["grad_accum"]
                (loss / c["grad_accum"]).backward()  # .grad and main_grad add up: the mean over micro-batches
            if TORCHRUN:  # the mean gradient over the ranks (runs.py: why not DDP); the loss rides along for the log
                mean_loss = torch.tensor([loss_value], device=dev)
                runs.average_over_ranks_([eco.grad_of(p) for p in model.parameters()] + [mean_loss])
                loss_value = mean_loss.item()
            if not math.isfinite(loss_value):
                raise quant.NonFiniteError(f"loss is {loss_value}")
            eco.clip_grad_norm_(model.parameters(), c["grad_clip"])  # main_grads of quantized weights included
            codes_before = [p.detach().clone() for p in qparams]
            opt.step()
            eco.zero_grad_(model.parameters())
            moved += sum(quant.codes_moved(b, p.detach(), p.fmt) for b, p in zip(codes_before, qparams)) / max(n_quantized, 1)
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
            print(f"{name} step {done}/{end} | loss {loss_value:.4f} | lr {get_lr(step, c):.2e} | "
                  f"{tok_s:,.0f} tok/s | ETA {(end - done) * train_time / done:.0f}s")
        if done % c["eval_interval"] == 0 or done == end:
            curve.append([done, evaluate(forward, val_data, c, dev, amp)])
            runs.check_replicas_agree(model, opt, done, name)  # torchrun: still bit-identical?
            if qparams:  # the mean fraction of codes moved per step since the last evaluation
                moved_curve.append([done, moved.item() / max(moved_steps, 1)])
                moved, moved_steps = moved.zero_(), 0
            print(f"{name} step {done}: val loss {curve[-1][1]:.4f}"
                  + (f" | codes moved per step {moved_curve[-1][1]:.2%}" if qparams else ""))
            if c["save_checkpoint"] and RANK == 0:
                runs.save_checkpoint(c, name, model, opt, step=done, curve=curve, moved_curve=moved_curve,
                                     train_time=train_time)

    # -------------------------------------------------------------------------
    # This method's results
    row = dict(
        val_loss=float("nan") if diverged or not curve else curve[-1][1], diverged=diverged, **memory_bytes(model, opt),
        tokens_per_s=done * tokens_per_step / max(train_time, 1e-9), state_hash=runs.state_hash(model, opt),
        curve=curve, moved_curve=moved_curve, moved=moved_curve[-1][1] if moved_curve else None,
        peak_memory=torch.cuda.max_memory_allocated(dev) if dev.startswith("cuda") else None, fused=opt.fused,
        dtype=dtype, matmul=matmul)
    if c["sample_tokens"] and not diverged and RANK == 0:
        enc = prepare.load_tokenizer(os.path.join(c["data_dir"], "tokenizer.tiktoken"))
        ids = model.generate(torch.tensor([enc.encode_ordinary("\n")], device=dev), c["sample_tokens"], top_k=50,
                             generator=torch.Generator(device=dev).manual_seed(stream_seed(c, SAMPLE)))
        row["sample"] = enc.decode(ids[0].tolist())
        print(f"{name} sample: {row['sample']!r}")
    return row


if __name__ == "__main__":
    main()

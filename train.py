"""
Train the same tiny GPT with each method side by side (full precision, FP8 master weights, naive
removal of the master copy, ECO) on Shakespeare, and report validation loss, memory and speed.

    python train.py                              # all six methods, about 7 minutes on a 2-core CPU
    python train.py --methods=master_rtn,eco_sr  # a subset
    python train.py --preset=gpu                 # ~30M non-embedding parameters, for one GPU
    python train.py --model=moe                  # the sparse mixture-of-experts variant
    python train.py --methods=fp32 --save_checkpoint=True --out_dir=out-pre     # pre-train in FP32, then
    python train.py --fmt=int4 --init_from=out-pre/ckpt_fp32.pt --lr=3e-4       # INT4 fine-tuning, as the paper

Every method starts from the same initial weights, sees the same batches in the same order and follows
the same learning-rate schedule; only the optimizer's handling of the quantized weights differs (eco.py).
Options are --key=value overrides of the defaults below. Results go to <out_dir>/results.json (and
<out_dir>/curves.png when matplotlib is installed).
"""
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

import eco
import quant
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
from prepare import load_tokenizer, prepare  # data/prepare.py

# -----------------------------------------------------------------------------
# Defaults: every one can be overridden on the command line as --key=value
out_dir = "out"
data_dir = "data/shakespeare"  # prepared by data/prepare.py (run automatically if missing)
methods = "fp32,master_rtn,naive_rtn,naive_sr,eco_rtn,eco_sr"  # which to train, in this order
fmt = "fp8_e4m3"  # weight format of the quantized methods: fp8_e4m3, int8 or int4
preset = ""  # "gpu": a model about the size of the paper's smallest (~30M non-embedding parameters)
init_from = ""  # a checkpoint of a full-precision run to fine-tune from (the paper's INT4 setting)
# model
model = "dense"  # "dense" or "moe"
n_layer = 2
n_head = 2
n_embd = 64
block_size = 64
n_experts = 8  # moe
top_k = 2  # moe
# optimisation: the paper's AdamW settings, scaled down
batch_size = 8
max_steps = 3000  # many small steps: sub-grid updates are what ECO is about (see README)
lr = 3e-3  # peak learning rate
warmup_frac = 0.1  # warm up over the first 10% of steps ...
warmup_start = 0.01  # ... from 0.01 x peak ...
final_lr_frac = 0.1  # ... then cosine decay to 0.1 x peak
beta1 = 0.9
beta2 = 0.98
eps = 1e-9
weight_decay = 0.1
grad_clip = 1.0
# evaluation, logging, checkpoints
eval_interval = 500
eval_batches = 16  # a fixed set of validation batches, the same for every method
log_interval = 250
save_checkpoint = False  # write <out_dir>/ckpt_<method>.pt at every evaluation
resume = False  # continue each method from its checkpoint in out_dir
stop_at = 0  # stop early at this step (0: run to max_steps); the schedule still spans max_steps
sample_tokens = 64  # generate this many tokens from each trained model (0: skip)
seed = 1337
device = "auto"  # auto: cuda, then mps, then cpu
compile = False  # torch.compile the model (opt-in)
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

PRESETS = {  # applied before the command line, so explicit overrides still win
    "gpu": dict(n_layer=8, n_head=8, n_embd=576, block_size=512, batch_size=32, max_steps=4000, lr=1.5e-3,
                eval_interval=250, eval_batches=40, log_interval=50),
}
ALL_METHODS = {  # short name -> (optimizer mode, rounding); fp32 trains without quantization
    "fp32": (None, None), "master_rtn": ("master", "nearest"), "naive_rtn": ("naive", "nearest"),
    "naive_sr": ("naive", "stochastic"), "eco_rtn": ("eco", "nearest"), "eco_sr": ("eco", "stochastic"),
}


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
    names = [m for m in config["methods"].split(",") if m]
    bad = [m for m in names if m not in ALL_METHODS]
    if bad or not names:
        raise ValueError(f"--methods={config['methods']}: unknown {bad}; accepted: {','.join(ALL_METHODS)}")
    quant.get_format(config["fmt"])
    return config


def get_lr(step, c):
    """Linear warmup from warmup_start x peak, then cosine down to final_lr_frac x peak (step is 0-based)."""
    warmup = max(1, int(c["warmup_frac"] * c["max_steps"]))
    if step < warmup:
        return c["lr"] * (c["warmup_start"] + (1 - c["warmup_start"]) * step / warmup)
    progress = (step - warmup) / max(1, c["max_steps"] - warmup)
    return c["lr"] * (c["final_lr_frac"] + (1 - c["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * progress)))


TRAIN, VAL = 0, 1  # random streams for get_batch


def get_batch(data, step, c, dev, stream):
    """The batch for one step is a function of (seed, stream, step) only: identical for every method."""
    g = torch.Generator().manual_seed((c["seed"] * 2 + stream) * 2**32 + step)
    ix = torch.randint(len(data) - c["block_size"] - 1, (c["batch_size"],), generator=g).tolist()
    x = torch.from_numpy(np.stack([data[i:i + c["block_size"]] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + c["block_size"]] for i in ix]).astype(np.int64))
    return x.to(dev), y.to(dev)


def memory_bytes(model, opt):
    """Static memory actually allocated: weights (codes, scales, float params) and optimizer state."""
    quantized = {id(p) for p in model.parameters() if eco.is_quantized(p)}
    parts = dict(q_weights=0, q_state=0, other_weights=0, other_state=0, q_params=0, other_params=0)
    for p in model.parameters():
        kind = "q" if id(p) in quantized else "other"
        parts[f"{kind}_params"] += p.numel()
        parts[f"{kind}_weights"] += p.nbytes + (p.scale.nbytes if kind == "q" else 0)
        parts[f"{kind}_state"] += sum(t.nbytes for t in opt.state.get(p, {}).values() if torch.is_tensor(t))
    return parts


def weights_hash(state_dict):
    return hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in state_dict.values())).hexdigest()


@torch.no_grad()
def evaluate(model, val_data, c, dev):
    model.eval()
    losses = [model(*get_batch(val_data, i, c, dev, stream=VAL))[1].item() for i in range(c["eval_batches"])]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    c = parse_args(sys.argv[1:] if argv is None else argv)
    # -------------------------------------------------------------------------
    # Device, data
    dev = c["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    meta = prepare(c["data_dir"])  # downloads and tokenizes Shakespeare once; later runs find it complete
    train_data = np.memmap(os.path.join(c["data_dir"], "train.bin"), dtype=np.uint16, mode="r")
    val_data = np.memmap(os.path.join(c["data_dir"], "val.bin"), dtype=np.uint16, mode="r")
    os.makedirs(c["out_dir"], exist_ok=True)

    # -------------------------------------------------------------------------
    # One set of initial weights for every method (fresh, or a full-precision checkpoint to fine-tune)
    model_keys = ("model", "n_layer", "n_head", "n_embd", "block_size", "n_experts", "top_k")
    init_state = None
    if c["init_from"]:
        ckpt = torch.load(c["init_from"], map_location="cpu")
        if any(t.dtype != torch.float32 for t in ckpt["model"].values()):
            raise ValueError(f"--init_from={c['init_from']}: expected a full-precision (fp32 method) checkpoint")
        c.update({k: ckpt["config"][k] for k in model_keys})  # the architecture comes with the weights
        init_state = ckpt["model"]
    cfg = GPTConfig(vocab_size=meta["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
                    n_head=c["n_head"], n_embd=c["n_embd"], mlp=c["model"], n_experts=c["n_experts"], top_k=c["top_k"])
    torch.manual_seed(c["seed"])
    if init_state is None:
        init_state = GPT(cfg).state_dict()
    init_hash = weights_hash(init_state)
    names = [m for m in c["methods"].split(",") if m]
    print(f"device {dev} | {GPT(cfg).num_params():,} non-embedding parameters | {c['max_steps']} steps of "
          f"{c['batch_size'] * c['block_size']:,} tokens | methods {', '.join(names)}")

    results = {}
    for short in names:
        # ---------------------------------------------------------------------
        # Build this method's model and optimizer: only the optimizer's mode and rounding differ
        mode, rounding = ALL_METHODS[short]
        name = short if mode is None else f"{c['fmt'].split('_')[0]}_{short}"
        torch.manual_seed(c["seed"])
        model = GPT(cfg)
        model.load_state_dict(init_state)
        assert weights_hash(model.state_dict()) == init_hash  # every method starts from the same weights
        if mode is not None:
            model.quantize_(c["fmt"])
        model.to(dev)
        decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices, expert banks, embeddings
        no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
        assert len(decay) + len(no_decay) == len(list(model.parameters())) == len({id(p) for p in decay + no_decay})
        opt = eco.ECOAdamW([dict(params=decay, weight_decay=c["weight_decay"]), dict(params=no_decay, weight_decay=0.0)],
                           lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                           mode=mode or "master", rounding=rounding or "nearest", seed=c["seed"])
        forward = torch.compile(model) if c["compile"] else model
        ckpt_path = os.path.join(c["out_dir"], f"ckpt_{name}.pt")
        start, curve, moved_curve, train_time, diverged = 0, [], [], 0.0, False
        if c["resume"]:
            ckpt = torch.load(ckpt_path, map_location=dev)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            start, curve, moved_curve, train_time = ckpt["step"], ckpt["curve"], ckpt["moved_curve"], ckpt["train_time"]
        end, done = c["stop_at"] or c["max_steps"], start
        # Diagnostic (the brief's): the fraction of quantized weights whose stored code changes in a step.
        # Without a master copy, updates below half a grid step are lost: naive training stalls when it drops.
        qparams = [p for p in model.parameters() if eco.is_quantized(p)]
        n_quantized = sum(p.numel() for p in qparams)
        moved, moved_steps = torch.zeros((), device=dev), 0
        print(f"\n{name}: mode={mode or 'plain AdamW, no quantization'} rounding={rounding or '-'}")
        if c["init_from"] and start == 0:  # fine-tuning: the loss of the freshly quantized checkpoint
            curve.append([0, evaluate(forward, val_data, c, dev)])
            print(f"{name} step 0: val loss {curve[-1][1]:.4f}")

        # ---------------------------------------------------------------------
        # Training loop
        for step in range(start, end):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = get_lr(step, c)
            x, y = get_batch(train_data, step, c, dev, stream=TRAIN)
            try:
                _, loss = forward(x, y)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise quant.NonFiniteError(f"loss is {loss_value}")
                loss.backward()
                grads = [g for p in model.parameters() if (g := eco.grad_of(p)) is not None]
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                for g in grads:  # clip the global gradient norm, main_grads of quantized weights included
                    g.mul_((c["grad_clip"] / (norm + 1e-6)).clamp(max=1.0))
                codes_before = [p.detach().clone() for p in qparams]
                opt.step()
                opt.zero_grad(set_to_none=True)
                for before, p in zip(codes_before, qparams):  # compare bytes: FP8 has no != on every device
                    moved += (before.view(torch.uint8) != p.detach().view(torch.uint8)).sum() / n_quantized
                moved_steps += 1
            except quant.NonFiniteError as err:
                print(f"{name}: diverged at step {step} ({err})")
                diverged = True
                break
            if dev == "cuda":
                torch.cuda.synchronize()
            train_time += time.perf_counter() - t0  # the clock runs only for training steps
            done = step + 1
            if done % c["log_interval"] == 0 or done == end:
                tok_s = done * c["batch_size"] * c["block_size"] / max(train_time, 1e-9)  # train_time spans resumes
                eta = (end - done) * train_time / done
                print(f"{name} step {done}/{end} | loss {loss_value:.4f} | lr {get_lr(step, c):.2e} | "
                      f"{tok_s:,.0f} tok/s | ETA {eta:.0f}s")
            if done % c["eval_interval"] == 0 or done == end:
                curve.append([done, evaluate(forward, val_data, c, dev)])
                if qparams:  # the mean fraction of codes moved per step since the last evaluation
                    moved_curve.append([done, moved.item() / max(moved_steps, 1)])
                    moved.zero_()
                    moved_steps = 0
                print(f"{name} step {done}: val loss {curve[-1][1]:.4f}"
                      + (f" | codes moved per step {moved_curve[-1][1]:.2%}" if qparams else ""))
                if c["save_checkpoint"]:
                    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=done, curve=curve,
                                    moved_curve=moved_curve, train_time=train_time, config=c, method=name), ckpt_path)

        # ---------------------------------------------------------------------
        # This method's results
        mem = memory_bytes(model, opt)
        n_params = mem["q_params"] + mem["other_params"]
        results[name] = dict(
            val_loss=float("nan") if diverged or not curve else curve[-1][1], diverged=diverged,
            bytes_per_param=sum(mem[k] for k in ("q_weights", "q_state", "other_weights", "other_state")) / n_params,
            bytes_per_quantized_param=(mem["q_weights"] + mem["q_state"]) / max(mem["q_params"], 1),
            bytes_per_other_param=(mem["other_weights"] + mem["other_state"]) / max(mem["other_params"], 1),
            quantized_params=mem["q_params"], other_params=mem["other_params"],
            tokens_per_s=done * c["batch_size"] * c["block_size"] / max(train_time, 1e-9),
            curve=curve, moved_curve=moved_curve, moved=moved_curve[-1][1] if moved_curve else None)
        if c["sample_tokens"] and not diverged:
            enc = load_tokenizer(os.path.join(c["data_dir"], meta["tokenizer"]))
            start_ids = torch.tensor([enc.encode_ordinary("\n")], device=dev)
            ids = model.generate(start_ids, c["sample_tokens"], top_k=50,
                                 generator=torch.Generator(device=dev).manual_seed(c["seed"]))
            results[name]["sample"] = enc.decode(ids[0].tolist())
            print(f"{name} sample: {results[name]['sample']!r}")

    # -------------------------------------------------------------------------
    # Report
    report(results, c, meta)
    return results


def report(results, c, meta):
    baseline = next((n for n in results if n.endswith("master_rtn")), None)
    print(f"\n{'method':<17}{'val loss':>9}{'vs master':>11}{'B/param':>9}{'B/qparam':>10}{'B/other':>9}{'tok/s':>9}"
          f"{'moved':>8}")
    for name, r in results.items():
        delta = r["val_loss"] - results[baseline]["val_loss"] if baseline else float("nan")
        loss = "diverged" if r["diverged"] else f"{r['val_loss']:.4f}"
        moved = "-" if r["moved"] is None else f"{r['moved']:.1%}"
        print(f"{name:<17}{loss:>9}{delta:>+11.4f}{r['bytes_per_param']:>9.2f}{r['bytes_per_quantized_param']:>10.2f}"
              f"{r['bytes_per_other_param']:>9.2f}{r['tokens_per_s']:>9,.0f}{moved:>8}")
    print("B/param: weights + scales + master copy + optimizer moments per parameter (all, quantized, the rest)")
    print("moved: quantized weights whose stored code changed, per step, mean over the last evaluation interval")
    with open(os.path.join(c["out_dir"], "results.json"), "w") as f:
        json.dump(dict(methods=results, config=c), f, indent=1)
    print(f"wrote {os.path.join(c['out_dir'], 'results.json')}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional
    for name, r in results.items():
        if r["curve"]:
            plt.plot(*zip(*r["curve"]), label=name, marker=".")
    plt.xlabel("step")
    plt.ylabel("validation loss")
    plt.legend()
    plt.savefig(os.path.join(c["out_dir"], "curves.png"), dpi=120)
    plt.close()


if __name__ == "__main__":
    main()

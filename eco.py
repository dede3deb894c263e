"""
ECO, the Error-Compensating Optimizer: quantized training without full-precision master weights.

Quantized training usually keeps a float32 *master* copy of every weight: the optimizer updates the
master and re-quantizes it for the next forward. Drop the master and update the quantized weight
directly ("naive"), and every update smaller than half a grid step rounds away: training stalls.
ECO drops the master but keeps the rounding error, in the optimizer's momentum. One step of ECO-AdamW:

    theta = AdamW step on the dequantized weight, in float32       (transient, never stored)
    w'    = q(theta)                                               (the new stored weight)
    e     = theta - w'                                             (what rounding just lost)
    m    <- m + alpha * (sqrt(v / bc2) + eps) * e                   (v unchanged)
    alpha = (1 - lr*wd) * (bc1 / lr) * (1 - 1/beta1)                (negative)

Why that coefficient: momentum injected now reaches the weights over all later steps, beta1 + beta1^2
+ ... = beta1 / (1 - beta1) times Adam's per-element step size lr / (bc1 * (sqrt(v/bc2) + eps)).
Choosing the injection so that this sum equals e puts the lost error back into the weights later.
If no weight moved, e = -(step) and the momentum stops decaying, so sub-step updates pile up until they
cross a grid point. The factor (1 - lr*wd) comes from decoupled weight decay shrinking the weights each
step (the paper omits it; at its settings it is within 1.2e-4 of 1). With lr = 0 (end of a schedule)
there is nothing to compensate and the injection is skipped.

For SGD with EMA momentum (the form the paper's theory is about) the same rule reads
    m~ = beta m + (1 - beta) g,  theta = (1 - lr*wd) w - lr m~,  w' = q(theta),
    m' = m~ + (1 - lr*wd) (1/lr) (1 - 1/beta) e.

Three modes, one optimizer class each for AdamW, SGD and (below) Muon:
    master  float32 master copy in the optimizer state; AdamW updates it; the stored weight is q(master)
    naive   no master: AdamW updates the dequantized weight, which is re-quantized; the error is lost
    eco     no master: as naive, plus the one injection line above
Parameters that are not quantized (embeddings, norms, LM head) get plain AdamW / SGD in every mode.

Beyond the paper, each derived beside its code: injection="next_lr" sizes the injection for the next step's
learning rate (injection_coefficient); moments="bf16" or "fp8" keep AdamW's moments in 2 or 1 bytes instead of 8
(section "How the AdamW moments are stored"); and ECOMuon, ECO for the Muon optimizer, whose one momentum takes
the error through the inverse of Muon's orthogonalization (section "ECO for Muon").

Reading order: the math (eco_adamw_step, the line marked <- ECO), then ECOAdamW.step (the three modes);
after them how the moments are stored, main_grad, and the checks both optimizers share. eco_adamw_step is
also the oracle of kernels.py's fused step. `python eco.py` shows the theory on a quadratic and the schedule
rules on least squares (about two minutes on a CPU). Test: python -m pytest -q test_eco.py
"""
import functools
import importlib
import math
import os

import torch

import quant

MODES = ("master", "naive", "eco")
INJECTIONS = ("paper", "next_lr")
MOMENTS = ("fp32", "bf16", "fp8")


# -----------------------------------------------------------------------------
# The math, as pure functions of tensors

def adamw_update(weight, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in float32 with exactly torch.optim.AdamW's operations (decoupled weight decay,
    bias correction, eps outside the sqrt). Updates the moments in place; returns (theta, denom) with
    theta the new high-precision weight and denom = sqrt(v / bc2) + eps. `weight` itself is not changed."""
    grad = grad.float()
    theta = weight.float() * (1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-lr / bc1)
    return theta, denom


def eco_adamw_step(weight, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, quantize,
                   next_lr=None):
    """One ECO-AdamW step for one tensor. `weight` is the float32 dequantized weight; `quantize` maps
    float32 theta to its float32 grid value q(theta). Updates exp_avg / exp_avg_sq in place, returns q(theta).
    With quantize = identity this is exactly torch.optim.AdamW. next_lr: see injection_coefficient."""
    theta, denom = adamw_update(weight, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                                beta2=beta2, eps=eps, weight_decay=weight_decay)
    new_weight = quantize(theta)
    alpha = injection_coefficient(lr, weight_decay, beta1, 1 - beta1 ** step, next_lr, 1 - beta1 ** (step + 1))
    if alpha != 0.0:
        error = theta - new_weight  # ideal minus stored: the sign matters
        exp_avg.addcmul_(error, denom, value=alpha)  # <- ECO: the error goes into the momentum
    return new_weight


def sgdm_update(weight, grad, momentum_buffer, *, lr, momentum, weight_decay):
    """SGD with EMA momentum: m = beta m + (1 - beta) g, theta = (1 - lr wd) w - lr m. Returns theta."""
    momentum_buffer.lerp_(grad.float(), 1 - momentum)
    return weight.float() * (1 - lr * weight_decay) - lr * momentum_buffer


def eco_sgd_step(weight, grad, momentum_buffer, *, lr, momentum, weight_decay, quantize, next_lr=None):
    """ECO for SGD-momentum: m' = m~ + alpha e (alpha from injection_coefficient). Returns q(theta)."""
    theta = sgdm_update(weight, grad, momentum_buffer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    new_weight = quantize(theta)
    alpha = injection_coefficient(lr, weight_decay, momentum, next_lr=next_lr, next_bc=1.0)
    if alpha != 0.0:
        momentum_buffer.add_(theta - new_weight, alpha=alpha)  # <- ECO
    return new_weight


def injection_coefficient(lr, weight_decay, beta, bc=1.0, next_lr=None, next_bc=None):
    """alpha in m <- m + alpha * (step-size denominator) * e; 0.0 means: skip the injection.
    bc is Adam's bias correction 1 - beta1^t (1 for SGD). The paper's rule when next_lr is None (module
    docstring); otherwise the next-step rule, with next_bc = 1 - beta1^(t+1), derived here.

    Under a learning-rate schedule (beyond the paper; injection="next_lr"). Write lr_t for step t's lr and let
    master-weight SGDM produce theta_t from m_t. Stored weights w_t = theta_t - e_t follow the master exactly
    if the momentum carries the error in the form the NEXT step will apply it:
        m_t = m_master_t - (1 - lr_{t+1} wd) e_t / (lr_{t+1} beta)
    (step t+1 computes (1 - lr_{t+1} wd) w_t - lr_{t+1} beta m_t + ..., and the two error terms cancel).
    Since m~_t = beta m_{t-1} + (1 - beta) g_t already carries -(1 - lr_t wd) e_{t-1} / lr_t, the exact
    update is the two-term rule (the paper's appendix, with a schedule)
        m_t = m~_t + (1 - lr_t wd) e_{t-1} / lr_t - (1 - lr_{t+1} wd) e_t / (lr_{t+1} beta),
    which needs e_{t-1} stored. Taking e_{t-1} ~ e_t, as the paper does, leaves one coefficient:
        c_t = (1 - lr_t wd) / lr_t - (1 - lr_{t+1} wd) / (lr_{t+1} beta).
    With lr_{t+1} = lr_t this is the paper's (1 - lr wd)(1/lr)(1 - 1/beta). During a warm-up lr_{t+1} > lr_t
    and the paper's rule injects too much; during a decay, too little. For AdamW, lr is replaced by the
    per-element step size lr_t / (bc1_t d_t), d_t = sqrt(v_t/bc2_t) + eps, taking d_{t+1} ~ d_t:
        alpha_t = (1 - lr_t wd) bc1_t / lr_t - (1 - lr_{t+1} wd) bc1_{t+1} / (lr_{t+1} beta1).
    At a constant lr this is (1 - lr wd)(1 - 1/beta1) / lr, since bc1_t - bc1_{t+1}/beta1 = 1 - 1/beta1: the
    paper's coefficient without its factor bc1_t, which differs only in the first tens of steps (10x at step 1
    with beta1 = 0.9, 4% at step 30), where the next step's bias correction is the one that applies.
    The training loop passes lr_{t+1} in each param group's "next_lr". This function is the one place
    either rule is written; the reference, the fused kernel and the tests all call it.
    """
    if lr == 0 or next_lr == 0:  # nothing was stepped, or nothing will be: nothing to compensate
        return 0.0
    if next_lr is None:
        return (1 - lr * weight_decay) * (bc / lr) * (1 - 1 / beta)  # negative
    return (1 - lr * weight_decay) * bc / lr - (1 - next_lr * weight_decay) * next_bc / (next_lr * beta)


# -----------------------------------------------------------------------------
# Optimizer classes: the three modes are in step(); what both classes share comes first

class _QuantizedOptimizer(torch.optim.Optimizer):
    """What ECOAdamW, ECOSGD and ECOMuon share: argument checks, the rounding generator, main_grad handling,
    and a state_dict that survives FP8 parameters and compressed moments. A param group's hyper-parameters are
    checked when the group is created or a value is set (_CheckedGroup), the gradients at each step."""

    def __init__(self, params, defaults, mode, rounding, seed, injection):
        _check_choice("mode", mode, MODES)
        quant.check_rounding(rounding)
        _check_choice("injection", injection, INJECTIONS)
        self.mode, self.rounding, self.seed, self.injection = mode, rounding, seed, injection
        super().__init__(params, defaults)  # add_param_group below checks each group
        devices = {p.device for p in self._params()}
        if len(devices) > 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}; accepted: one device "
                             "(one stochastic-rounding generator draws for all of them)")
        device = devices.pop() if devices else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)  # stochastic rounding

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _closure_loss(closure):  # torch.optim's convention: step(closure) re-evaluates the loss first
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self.param_groups[-1] = _CheckedGroup(self.param_groups[-1], self._check_param_group)

    def __getstate__(self):  # pickling and copies: torch's keeps defaults, state and param_groups only
        state = dict(super().__getstate__(), fused=getattr(self, "kernels", None) is not None)
        return state | {k: getattr(self, k) for k in ("mode", "rounding", "seed", "injection", "generator")}

    def __setstate__(self, state):  # torch's load_state_dict, unpickling and copies: groups come back plain dicts
        state = dict(state)
        fused = state.pop("fused", None)
        super().__setstate__(state)
        if fused is not None:  # a copy: the kernels module itself is not copied
            self.kernels = importlib.import_module("kernels") if fused else None
        self.param_groups = [_CheckedGroup(g, self._check_param_group, check_now=False) for g in self.param_groups]

    def _check_param_group(self, group, changed=None):
        """Everything about one group that a step could fail on: its hyper-parameters (and an lr so small that
        ECO's coefficient overflows float32), and a moments storage that would differ from its parameters'
        (looked at when the group is checked whole, or its "moments" is what changed)."""
        self._check_group(group, self.mode)
        if self.injection == "next_lr" and "next_lr" in group:  # (set by the training loop before each step)
            _check_number("next_lr", group["next_lr"], 0.0, math.inf)
        if self.mode == "eco" and (self.injection == "paper" or "next_lr" in group):
            _check_injection(group, self._beta(group), self.injection)
        for p in group["params"] if changed is None or {"moments", "use_muon"} & set(changed) else ():
            if self.state.get(p):
                self._check_state(p, group, self.state[p])

    def _check_group(self, group, mode):  # per class: the hyper-parameters of one param group
        raise NotImplementedError

    def _beta(self, group):  # the momentum ECO's coefficient divides by (1 - 1/beta): beta1, or SGD's momentum
        return group["betas"][0] if "betas" in group else group["momentum"]

    def _check_state(self, p, group, state):  # per class: what a step would find wrong in p's existing state
        pass

    def _grad_limit(self, p, group):  # per class: the largest |g| whose step stays finite in p's state
        return GRAD_LIMIT

    def _work(self):
        """Every check that can fail at a step, before any tensor is touched (the groups were checked when they were
        set); then the (group, index, p, grad) to step."""
        for group in self.param_groups:
            if self.injection == "next_lr" and "next_lr" not in group:
                raise ValueError("injection='next_lr' needs each param group's 'next_lr' (the lr of the next "
                                 "step), set by the training loop before step() like 'lr'")
        work, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if is_quantized(p) and p.grad is not None:
                    raise ValueError(f"a quantized weight of shape {tuple(shape_of(p))} has a gradient in .grad; its "
                                     "gradient belongs in .main_grad (quant.QuantizedWeight puts it there)")
                grad = grad_of(p)
                if grad is not None:
                    if grad.shape != shape_of(p) or not grad.is_floating_point():
                        raise ValueError(f"a gradient of shape {tuple(grad.shape)} and dtype {grad.dtype} for a "
                                         f"parameter of shape {tuple(shape_of(p))}; accepted: a float tensor of its shape")
                    work.append((group, index, p, grad))
                index += 1
        checked = [(p, g, self._grad_limit(p, group)) for group, _, p, g in work if g.numel()]
        if checked:  # one reduction per tensor, one host sync: NaN/Inf, or |g| so large that g*g overflows
            bad = torch.stack([~(g.abs().amax() <= limit) for _, g, limit in checked])  # NaN compares False
            if bad.any():
                found = [f"{tuple(shape_of(p))} (|g| <= {limit:.3g})" for (p, _, limit), b in zip(checked, bad.tolist()) if b]
                raise quant.NonFiniteError(f"non-finite gradient, or one whose square overflows how v is stored, in "
                                           f"parameters of shapes {', '.join(found)}; nothing was updated")
        return work

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for p in self._params():
            if is_quantized(p):
                p.main_grad = None

    def _identity(self):
        """What decides the next step besides the state tensors and the param groups: saved in state_dict."""
        return dict(optimizer=type(self).__name__, mode=self.mode, rounding=self.rounding, injection=self.injection)

    def state_dict(self):
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()  # the reference path's stochastic rounding
        sd["eco"] = dict(self._identity(), seed=self.seed)  # the seed: the fused kernel's random numbers
        return sd

    def _expected_state(self, p, group):  # per class: {key: (dtype, shape)} of p's state
        raise NotImplementedError

    def _shapes(self, p, tensors):
        """{key: (dtype, shape)} of p's state tensors, with the master copy that mode="master" adds to a quantized p."""
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        if is_quantized(p) and self.mode == "master":
            shapes["master"] = (torch.float32, tuple(shape_of(p)))
        return shapes

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, checked first (class, mode, rounding, injection, every tensor's key, dtype and
        shape), and without torch's cast of floating-point state to the parameter's dtype, which would turn
        float32 moments and master copies into FP8 codes. Restores the seed and the rounding generator: a loaded
        optimizer takes the next step the saved one would have taken, on either path."""
        state_dict = dict(state_dict)
        saved_by, mine = state_dict.pop("eco", None), self._identity()
        if not isinstance(saved_by, dict) or "generator" not in state_dict:
            raise ValueError(f"not a state_dict of eco.{type(self).__name__} (it has no 'eco' and 'generator' "
                             f"entries, only {sorted(state_dict)}): it cannot say how the saved weights were stored")
        saved_by = dict(saved_by)
        seed = saved_by.pop("seed", None)
        if saved_by != mine or not isinstance(seed, int):
            raise ValueError(f"this state was saved by {dict(saved_by, seed=seed)}; this optimizer is {mine} "
                             "(an older eco.py saved no rounding, injection and seed)")
        generator_state = state_dict.pop("generator")
        for group in state_dict["param_groups"]:  # the saved hyper-parameters this optimizer will take on
            self._check_group(dict(group), self.mode)
        params = self._params()
        groups = [g for g in self.param_groups for _ in g["params"]]
        for index, saved in state_dict["state"].items():
            if not 0 <= index < len(params):
                raise ValueError(f"saved state for parameter {index}; this optimizer has {len(params)} parameters")
            expected = self._expected_state(params[index], groups[index])
            got = {k: (v.dtype, tuple(v.shape)) for k, v in saved.items() if torch.is_tensor(v) and k != "step"}
            if got != expected:
                raise ValueError(f"parameter {index} (shape {tuple(shape_of(params[index]))}): saved state {got} does not "
                                 f"match this optimizer's {expected} (another mode, moments or model?)")
        super().load_state_dict(state_dict)
        for index, saved in state_dict["state"].items():
            p = params[index]
            self.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}
        self.generator.set_state(generator_state.cpu())  # a checkpoint loaded with map_location="cuda" moved it
        self.seed = seed
        for group in self.param_groups:  # the saved groups against the restored state
            self._check_param_group(group)


class ECOAdamW(_QuantizedOptimizer):
    """AdamW for models with quantized weights (quant.QuantizedWeight / QLinear), in one of three modes:
    'master', 'naive' or 'eco' (see the module docstring). rounding: 'stochastic' or 'nearest' (weights).
    moments: 'fp32', 'bf16' or 'fp8' (also a per-group key). injection: 'paper' or 'next_lr'."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 mode="eco", rounding="stochastic", seed=0, moments="fp32", injection="paper", fused=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, moments=moments)
        super().__init__(params, defaults, mode, rounding, seed, injection)
        self._use_kernels(fused)  # the fused Triton kernel, where it applies

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group, index, p, grad in self._work():  # every check first, then one tensor at a time
            self._step(group, index, p, grad)
        return loss

    def _step(self, group, index, p, grad):
        state, hyper = self._state(p, group), self._hyper(p, group)
        next_lr = group["next_lr"] if self.injection == "next_lr" else None
        if is_quantized(p) and self._fusable(p, state, grad):
            self._fused_step(p, grad, state, hyper, next_lr, index)  # eco as one GPU kernel, moments included
            return
        m, v = load_moments(state)  # float32
        if not is_quantized(p):  # embeddings, norms, head: plain AdamW
            p.copy_(adamw_update(p, grad, m, v, **hyper)[0])
        else:
            # store(theta) rounds theta onto p's grid, writes codes + scale into p, returns q(theta)
            store = functools.partial(quant.store_, p, p.scale, fmt=p.fmt, rounding=self.rounding,
                                      generator=self.generator)
            if self.mode == "master":  # AdamW on the float32 master; the stored weight is q(master)
                theta, _ = adamw_update(state["master"], grad, m, v, **hyper)
                state["master"].copy_(theta)
                store(theta)
            elif self.mode == "naive":  # AdamW on the stored weight; the rounding error is lost
                store(adamw_update(quant.dequantize(p, p.scale, p.fmt), grad, m, v, **hyper)[0])
            else:  # eco: as naive, and the rounding error is injected into m
                eco_adamw_step(quant.dequantize(p, p.scale, p.fmt), grad, m, v, **hyper, next_lr=next_lr,
                               quantize=store)
        store_moments_(state, m, v, self.generator)

    def _use_kernels(self, fused):
        # fused: the ECO step of row-scaled weights runs as one Triton kernel (kernels.py) on CUDA, for the formats,
        # moments and GPUs kernels.fusable accepts; every other tensor takes the reference path
        self.kernels = None
        quantized = [(p, moments_format(p, group["moments"])) for group in self.param_groups for p in group["params"]
                     if is_quantized(p) and not group.get("use_muon")]  # (ECOMuon's Muon groups never fuse)
        if fused is not False and torch.cuda.is_available() and all(p.is_cuda for p, _ in quantized):
            try:
                import kernels  # imports triton
                self.kernels = kernels
            except ImportError:
                pass
        if fused is None and self.kernels is not None and not any(  # none it would step: off, and reported so
                self.kernels.fusable(p.fmt, m, torch.cuda.get_device_capability(p.device)) for p, m in quantized):
            self.kernels = None
        if fused and self.kernels is None:
            raise ValueError("fused=True needs the quantized parameters on CUDA and triton installed; use fused=False")
        if fused and quantized:
            capability = torch.cuda.get_device_capability(quantized[0][0].device)  # the one device (checked above)
            refused = sorted({(p.fmt, m) for p, m in quantized if not self.kernels.fusable(p.fmt, m, capability)})
            if refused:
                raise ValueError(
                    f"fused=True, but the fused kernel cannot step (format, moments) {refused} on this GPU, compute "
                    f"capability {capability}; accepted: formats {[n for n, f in quant.FORMATS.items() if f.per_row]}, "
                    f"moments {list(self.kernels.MOMENTS)}, compute capabilities {list(self.kernels.CAPABILITIES)}; "
                    "fused=None lets them take the reference path")

    @property
    def fused(self):
        return self.kernels is not None

    def _check_group(self, group, mode):
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"invalid betas={betas!r}; accepted: a pair (beta1, beta2)")
        _check_number("lr", group["lr"], 0.0, math.inf)
        _check_number("beta1", betas[0], 0.0, 1.0, low_open=(mode == "eco"))  # eco divides by beta1
        _check_number("beta2", betas[1], 0.0, 1.0)
        _check_number("eps", group["eps"], 0.0, math.inf, low_open=True)  # eps = 0 divides 0 by 0 where v = 0
        _check_number("weight_decay", group["weight_decay"], 0.0, math.inf)
        _check_choice("moments", group["moments"], MOMENTS)

    def _check_state(self, p, group, state):
        stored, wanted = stored_moments(state), moments_format(p, group["moments"])
        if stored != wanted:
            raise ValueError(f"a parameter of shape {tuple(shape_of(p))} keeps its moments as {stored!r} since its first "
                             f"step; its group now asks for moments={group['moments']!r}: the storage is set once "
                             f"(accepted here: {stored!r})")

    def _grad_limit(self, p, group):
        return GRAD_LIMITS[moments_format(p, group["moments"])]

    def _expected_state(self, p, group):
        return self._shapes(p, init_moments(p, moments_format(p, group["moments"])))

    def _state(self, p, group):  # p's state, created at its first step; counts the step
        state = self.state[p]
        if not state:
            state["step"] = 0
            state.update(init_moments(p, moments_format(p, group["moments"])))
            if is_quantized(p) and self.mode == "master":
                state["master"] = quant.dequantize(p, p.scale, p.fmt)  # starts at the stored weight
        state["step"] += 1
        return state

    def _hyper(self, p, group):  # this step's hyper-parameters, as adamw_update takes them
        beta1, beta2 = group["betas"]
        return dict(step=self.state[p]["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"])

    def _fused_step(self, p, grad, state, hyper, next_lr, index):  # kernels.py: load, step, store in one pass
        kind = stored_moments(state)
        self.kernels.eco_adamw_fused_(p, p.scale, grad, *(state[k] for k in MOMENT_KEYS[kind]), moments=kind, **hyper,
                                      next_lr=next_lr, fmt=p.fmt, rounding=self.rounding,
                                      seed=kernel_seed(self.seed, state["step"], index))

    def _fusable(self, p, state, grad):  # what the kernel takes on this GPU; anything else takes the reference path
        if not (self.fused and self.mode == "eco" and p.shape[-1] <= self.kernels.MAX_ROW and grad.is_contiguous()
                and grad.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return False  # (a user's float64 or strided main_grad, say: the reference path takes any)
        capability = torch.cuda.get_device_capability(p.device) if p.is_cuda else None  # None: Triton's interpreter
        return self.kernels.fusable(p.fmt, stored_moments(state), capability)


class ECOSGD(_QuantizedOptimizer):
    """SGD with EMA momentum (m = beta m + (1 - beta) g) for quantized weights, modes as ECOAdamW."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, *, mode="eco", rounding="stochastic", seed=0,
                 injection="paper"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, mode, rounding, seed, injection)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._closure_loss(closure)
        for group, _, p, grad in self._work():
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros(shape_of(p), dtype=torch.float32, device=p.device)
                if is_quantized(p) and self.mode == "master":
                    state["master"] = quant.dequantize(p, p.scale, p.fmt)
            hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
            next_lr = group["next_lr"] if self.injection == "next_lr" else None
            m = state["momentum_buffer"]
            if not is_quantized(p):  # plain SGD-momentum
                p.copy_(sgdm_update(p, grad, m, **hyper))
            else:
                store = functools.partial(quant.store_, p, p.scale, fmt=p.fmt, rounding=self.rounding,
                                          generator=self.generator)
                if self.mode == "master":
                    theta = sgdm_update(state["master"], grad, m, **hyper)
                    state["master"].copy_(theta)
                    store(theta)
                elif self.mode == "naive":
                    store(sgdm_update(quant.dequantize(p, p.scale, p.fmt), grad, m, **hyper))
                else:
                    eco_sgd_step(quant.dequantize(p, p.scale, p.fmt), grad, m, **hyper, next_lr=next_lr,
                                 quantize=store)
        return loss

    def _check_group(self, group, mode):
        _check_number("lr", group["lr"], 0.0, math.inf)
        _check_number("momentum", group["momentum"], 0.0, 1.0, low_open=(mode == "eco"))
        _check_number("weight_decay", group["weight_decay"], 0.0, math.inf)

    def _expected_state(self, p, group):
        return self._shapes(p, dict(momentum_buffer=torch.zeros(shape_of(p))))


# -----------------------------------------------------------------------------
# ECO for Muon (beyond the paper): one momentum buffer, orthogonalized
#
# Muon (used to train small GPTs fast, e.g. modded-nanogpt) steps each weight matrix along the orthogonalized
# momentum: with m~ = beta m + (1 - beta) g (EMA; no Nesterov here),
#     theta = (1 - lr wd) w - lr s O,    O = NS(m~) ~ U V^T for m~ = U S V^T,    s = sqrt(max(1, out / in))
# where NS is a few Newton-Schulz iterations towards the polar factor. It keeps one buffer per weight instead of
# AdamW's two: with FP4 weights and an FP8 momentum that is under 2 bytes per parameter.
#
# The injection. For a tall or square m~ (out >= in) the polar factor is O = m~ H with H = (m~^T m~)^(-1/2).
# Holding H fixed over the next few steps (as ECO-AdamW holds Adam's denominator), Muon is SGD-momentum whose step
# lr s m H carries a right preconditioner. ECO-SGDM puts the error e back as m' = m~ + (1 - lr wd)(1/lr)(1 - 1/beta) e;
# here e must first be mapped from weight space to momentum space, through (s H)^-1, and H^-1 = (m~^T m~)^(1/2) =
# O^T m~ exactly (for O = U V^T: O^T m~ = V U^T U S V^T = V S V^T). One extra matmul, no new state:
#     m' = m~ + (1 - lr wd) / (lr s) * (1 - 1/beta) * e (O^T m~)                  (out >= in)
# A wide m~ (out < in: an MLP's down projection) has a singular m~^T m~ of rank out, and e (O^T m~) would keep only
# the part of e in m~'s row space (a quarter of it for [C, 4C]). Its polar factor is O = L m~ with the left
# preconditioner L = (m~ m~^T)^(-1/2), full rank, and the same derivation gives L^-1 e = (m~ O^T) e:
#     m' = m~ + (1 - lr wd) / (lr s) * (1 - 1/beta) * (m~ O^T) e                  (out < in)
# Check: if no code moved and wd = 0, e = -lr s O, and the injection is -(1 - 1/beta) O O^T m~ (or m~ O^T O)
# = -(1 - 1/beta) m~, so m' = m~ / beta: the momentum stops decaying, exactly as in ECO-SGDM. Unlike SGD, Muon's step
# does not grow with the momentum (O is scale-free: NS(c m) = NS(m)); what a momentum that keeps the lost updates
# changes is their weight against the next gradients, direction by direction. With Newton-Schulz's approximate O
# the identity holds approximately; with the exact polar factor (ns_steps=0) up to float32 rounding.
# The coefficient is injection_coefficient's (either rule) divided by s.
# Where the first-order view fails: the injection is proportional to m~ (H^-1 grows with the momentum), so it is
# small against m~ only while the rounding error is small against the step, |e| << lr s. With FP8 weights it stays
# under a fifth of |m~| on the default run; with NVFP4 weights and stochastic rounding it is a third to a half,
# compounds, and the momentum overflowed in the cosine decay (RESULTS.md: measured, not solved). With NVFP4 weights,
# round-to-nearest and the fp8 momentum, where next to no code moves, it overflowed too, earlier: a stuck weight
# leaves the momentum exactly at the edge (beta x 1/beta = 1, the check above), the injection measured 0.09 of |m~|
# instead of 1/beta - 1 = 0.05 (0.055 to 0.059 with a float32 momentum, which did not diverge), and the momentum grew
# by beta x 1.09 per step (RESULTS.md). ECO-SGDM's step grows with such a momentum until the weight moves; Muon's
# does not, so nothing pulls it back. Bounding it keeps
# the momentum finite but does not bring the loss near master weights (RESULTS.md): whatever the momentum holds,
# Muon's step has the fixed size lr s (all singular values of O are about 1), so a rounding error larger than one
# step cannot be put back in one step, and stochastic rounding on a 4-bit grid makes a new one every step.

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic: pushes singular values towards [0.7, 1.2] fast


def newton_schulz(G, steps=5):
    """Muon's orthogonalization of G [..., rows, cols] in float32: `steps` iterations X <- a X + (b A + c A^2) X
    with A = X X^T, from X = G / |G|_F; each maps every singular value sigma to a sigma + b sigma^3 + c sigma^5 and
    keeps the singular vectors, so X tends to about U V^T. steps=0: the exact polar factor U V^T (by SVD; slow)."""
    G = G.float()
    if steps == 0:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        return (U * (S > 0).unsqueeze(-2)) @ Vh  # a zero singular value stays 0, as Newton-Schulz keeps it
    a, b, c = NS_COEFFICIENTS
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT  # iterate on the wide side: A is the smaller Gram matrix
    X = X / X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # |G|_F may overflow
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)  # ... this may not: singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


def muon_update(weight, grad, momentum_buffer, *, lr, momentum, weight_decay, ns_steps):
    """Muon: m = beta m + (1 - beta) g (in place), theta = (1 - lr wd) w - lr s NS(m). Returns (theta, NS(m), s)."""
    momentum_buffer.lerp_(grad.float(), 1 - momentum)
    O = newton_schulz(momentum_buffer, ns_steps)
    s = max(1.0, weight.shape[-2] / weight.shape[-1]) ** 0.5  # out / in of each matrix (of each expert in a bank)
    return weight.float() * (1 - lr * weight_decay) - lr * s * O, O, s


def eco_muon_step(weight, grad, momentum_buffer, *, lr, momentum, weight_decay, ns_steps, quantize, next_lr=None):
    """ECO for Muon: m' = m~ + alpha / s * e (O^T m~), or alpha / s * (m~ O^T) e for a wide matrix (out < in), alpha
    from injection_coefficient. Returns q(theta)."""
    theta, O, s = muon_update(weight, grad, momentum_buffer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                              ns_steps=ns_steps)
    new_weight = quantize(theta)
    alpha = injection_coefficient(lr, weight_decay, momentum, next_lr=next_lr, next_bc=1.0) / s
    if alpha != 0.0:
        error = theta - new_weight
        if weight.shape[-2] >= weight.shape[-1]:  # <- ECO: the error into the momentum, through H^-1 = O^T m~ ...
            momentum_buffer.add_(error @ (O.mT @ momentum_buffer), alpha=alpha)
        else:  # ... or, for a wide matrix, through L^-1 = m~ O^T
            momentum_buffer.add_((momentum_buffer @ O.mT) @ error, alpha=alpha)
    return new_weight


class ECOMuon(ECOAdamW):
    """Muon for weight matrices, AdamW for the rest, in one optimizer; modes, roundings and injections as ECOAdamW.
    A param group with use_muon=True (the default) takes Muon: every parameter a matrix or a bank of them [..., out,
    in], stepped one matrix at a time, its momentum stored as `moments` says (fp32, bf16, or fp8 with one scale per
    block of 128, both written with stochastic rounding). A group with use_muon=False takes ECOAdamW's step (betas,
    eps; the fused kernel where it applies): embeddings, head and norm gains, as Muon is used.
        ECOMuon([dict(params=matrices), dict(params=others, use_muon=False, lr=3e-3)], lr=0.02, momentum=0.95)"""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5, *, betas=(0.9, 0.999), eps=1e-8,
                 mode="eco", rounding="stochastic", seed=0, moments="fp32", injection="paper", fused=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, use_muon=True,
                        betas=betas, eps=eps, moments=moments)
        _QuantizedOptimizer.__init__(self, params, defaults, mode, rounding, seed, injection)
        self._use_kernels(fused)  # for the AdamW groups

    def _step(self, group, index, p, grad):
        if not group["use_muon"]:
            return super()._step(group, index, p, grad)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state.update(init_momentum(p, moments_format(p, group["moments"])))
            if is_quantized(p) and self.mode == "master":
                state["master"] = quant.dequantize(p, p.scale, p.fmt)
        state["step"] += 1
        hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                     ns_steps=group["ns_steps"])
        next_lr = group["next_lr"] if self.injection == "next_lr" else None
        m = load_momentum(state)  # float32
        if not is_quantized(p):  # plain Muon
            p.copy_(muon_update(p, grad, m, **hyper)[0])
        else:
            store = functools.partial(quant.store_, p, p.scale, fmt=p.fmt, rounding=self.rounding,
                                      generator=self.generator)
            if self.mode == "master":  # Muon on the float32 master; the stored weight is q(master)
                theta = muon_update(state["master"], grad, m, **hyper)[0]
                state["master"].copy_(theta)
                store(theta)
            elif self.mode == "naive":  # Muon on the stored weight; the rounding error is lost
                store(muon_update(quant.dequantize(p, p.scale, p.fmt), grad, m, **hyper)[0])
            else:  # eco: the error goes into the momentum
                eco_muon_step(quant.dequantize(p, p.scale, p.fmt), grad, m, **hyper, next_lr=next_lr, quantize=store)
        store_momentum_(state, m, self.generator)

    def _check_group(self, group, mode):
        if not isinstance(group["use_muon"], bool):
            raise ValueError(f"invalid use_muon={group['use_muon']!r}; accepted: True (Muon) or False (AdamW)")
        if not group["use_muon"]:
            return super()._check_group(group, mode)
        _check_number("lr", group["lr"], 0.0, math.inf)
        _check_number("momentum", group["momentum"], 0.0, 1.0, low_open=(mode == "eco"))
        _check_number("weight_decay", group["weight_decay"], 0.0, math.inf)
        steps = group["ns_steps"]
        if not (isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps <= 100):
            raise ValueError(f"invalid ns_steps={steps!r}; accepted: an integer in [0, 100] (0: exact polar factor)")
        _check_choice("moments", group["moments"], MOMENTS)
        vectors = [tuple(shape_of(p)) for p in group["params"] if torch.is_tensor(p) and len(shape_of(p)) < 2]
        if vectors:
            raise ValueError(f"Muon steps matrices; parameters of shapes {vectors} are not: put them in a group with "
                             "use_muon=False (AdamW)")

    def _beta(self, group):
        return group["momentum"] if group["use_muon"] else super()._beta(group)

    def _check_state(self, p, group, state):
        if ("momentum_buffer" in state) != group["use_muon"]:
            raise ValueError(f"a parameter of shape {tuple(shape_of(p))} was stepped by "
                             f"{'Muon' if 'momentum_buffer' in state else 'AdamW'} and keeps that state; its group now "
                             f"asks for use_muon={group['use_muon']!r} (accepted here: {'momentum_buffer' in state})")
        if not group["use_muon"]:
            return super()._check_state(p, group, state)
        stored, wanted = stored_momentum(state), moments_format(p, group["moments"])
        if stored != wanted:
            raise ValueError(f"a parameter of shape {tuple(shape_of(p))} keeps its momentum as {stored!r} since its "
                             f"first step; its group now asks for moments={group['moments']!r}: the storage is set "
                             f"once (accepted here: {stored!r})")

    def _expected_state(self, p, group):
        if not group["use_muon"]:
            return super()._expected_state(p, group)
        return self._shapes(p, init_momentum(p, moments_format(p, group["moments"])))


# -----------------------------------------------------------------------------
# How the AdamW moments are stored between steps (moments="fp32" | "bf16" | "fp8")
#
# Compressed moments (beyond the paper, which keeps m and v in float32: 8 of ECO's 9 bytes per weight).
# ECOAdamW(moments=...) stores them between steps as
#     fp32  float32 (the paper; 8 bytes per parameter)
#     bf16  bfloat16, written back with stochastic rounding (4 bytes)
#     fp8   FP8 E4M3 codes with one float32 scale per block of 128 values of a row; v is stored as sqrt(v),
#           which halves the range of exponents 8 bits must cover (2 bytes, plus 8 bytes of scales per
#           block: 0.0625 B per parameter for rows that are multiples of 128, more for shorter rows); a
#           positive sqrt(v) is never stored as 0, which would leave m / eps as the next step
# Each step loads them to float32, runs the unchanged float32 math above (injection included) and stores
# them back. Round-to-nearest would be wrong there: an EMA moves by (1 - beta) of the gap each step, and a
# change smaller than half a storage step would be rounded away every time; the moment would freeze, which
# is naive RTN's stall again, one level down. Stochastic rounding keeps every update in expectation.
# Tensors with fewer than 4096 elements (norm gains) keep float32 moments, as 8-bit optimizers do.

MOMENT_BLOCK = 128  # fp8: values per scale; a row of the fused kernel splits into whole blocks
MOMENT_FP8 = dict(exp_avg="fp8_e4m3", exp_avg_sq_sqrt="fp8_e4m3")  # E4M3 for both: measured in RESULTS.md
MIN_COMPRESSED_NUMEL = 4096  # smaller tensors (norm gains) keep float32 moments
MOMENT_KEYS = dict(fp32=("exp_avg", "exp_avg_sq"), bf16=("exp_avg", "exp_avg_sq"),  # state entries, in kernel order
                   fp8=("exp_avg", "exp_avg_sq_sqrt", "exp_avg_scale", "exp_avg_sq_sqrt_scale"))


def moments_format(p, moments):
    """The storage actually used for p's moments: the requested one, or fp32 for small tensors."""
    return moments if math.prod(shape_of(p)) >= MIN_COMPRESSED_NUMEL else "fp32"


def init_moments(p, moments):
    """Zero moments for parameter p in the given storage, as a dict of optimizer-state entries."""
    zeros = torch.zeros(shape_of(p), dtype=torch.float32, device=p.device)
    if moments == "fp32":
        return dict(exp_avg=zeros, exp_avg_sq=zeros.clone())
    if moments == "bf16":
        return dict(exp_avg=zeros.bfloat16(), exp_avg_sq=zeros.bfloat16())
    state = {}
    for key, fmt in MOMENT_FP8.items():
        state[key], state[key + "_scale"] = quant.quantize_blocks(zeros, fmt, MOMENT_BLOCK)
    return state


def stored_moments(state):
    """Which storage a state dict holds: 'fp32', 'bf16' or 'fp8' (read off its keys and dtypes)."""
    if "exp_avg_sq_sqrt" in state:
        return "fp8"
    return "bf16" if state["exp_avg"].dtype == torch.bfloat16 else "fp32"


def load_moments(state):
    """(exp_avg, exp_avg_sq) as float32 tensors to update in place. For fp32 storage these ARE the state."""
    kind = stored_moments(state)
    if kind == "fp32":
        return state["exp_avg"], state["exp_avg_sq"]
    if kind == "bf16":
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    m, sqrt_v = (quant.dequantize_blocks(state[k], state[k + "_scale"], fmt, MOMENT_BLOCK) for k, fmt in MOMENT_FP8.items())
    return m, sqrt_v * sqrt_v


def store_moments_(state, exp_avg, exp_avg_sq, generator):
    """Write updated float32 moments back into their storage, with stochastic rounding (see docstring)."""
    kind = stored_moments(state)
    if kind == "bf16":
        state["exp_avg"].copy_(quant.round_to_bfloat16(exp_avg, "stochastic", generator))
        state["exp_avg_sq"].copy_(quant.round_to_bfloat16(exp_avg_sq, "stochastic", generator))
    elif kind == "fp8":
        for key, x in (("exp_avg", exp_avg), ("exp_avg_sq_sqrt", exp_avg_sq.sqrt())):
            codes, scale = quant.quantize_blocks(x, MOMENT_FP8[key], MOMENT_BLOCK, "stochastic", generator)
            if key == "exp_avg_sq_sqrt":  # a positive sqrt(v) stored as 0 would leave m / eps as the next step
                smallest = quant.grid_step(torch.zeros((), device=x.device), quant.FORMATS[MOMENT_FP8[key]])
                codes = torch.where((codes.float() == 0) & (x > 0), smallest.to(codes.dtype), codes)
            state[key].copy_(codes)
            state[key + "_scale"].copy_(scale)


# Muon's one momentum, stored the same three ways (fp8: the format and blocks of AdamW's m)

def init_momentum(p, moments):
    """A zero Muon momentum for parameter p in the given storage, as a dict of optimizer-state entries."""
    zeros = torch.zeros(shape_of(p), dtype=torch.float32, device=p.device)
    if moments == "fp32":
        return dict(momentum_buffer=zeros)
    if moments == "bf16":
        return dict(momentum_buffer=zeros.bfloat16())
    codes, scale = quant.quantize_blocks(zeros, MOMENT_FP8["exp_avg"], MOMENT_BLOCK)
    return dict(momentum_buffer=codes, momentum_buffer_scale=scale)


def stored_momentum(state):
    if "momentum_buffer_scale" in state:
        return "fp8"
    return "bf16" if state["momentum_buffer"].dtype == torch.bfloat16 else "fp32"


def load_momentum(state):
    """The momentum as float32 to update in place (for fp32 storage: the state tensor itself)."""
    kind, m = stored_momentum(state), state["momentum_buffer"]
    if kind == "fp8":
        return quant.dequantize_blocks(m, state["momentum_buffer_scale"], MOMENT_FP8["exp_avg"], MOMENT_BLOCK)
    return m if kind == "fp32" else m.float()


def store_momentum_(state, m, generator):
    """Write the updated float32 momentum back into its storage, with stochastic rounding (see above)."""
    kind = stored_momentum(state)
    if kind == "bf16":
        state["momentum_buffer"].copy_(quant.round_to_bfloat16(m, "stochastic", generator))
    elif kind == "fp8":
        codes, scale = quant.quantize_blocks(m, MOMENT_FP8["exp_avg"], MOMENT_BLOCK, "stochastic", generator)
        state["momentum_buffer"].copy_(codes)
        state["momentum_buffer_scale"].copy_(scale)


# -----------------------------------------------------------------------------
# Gradients of models with quantized weights: they live in weight.main_grad

def is_quantized(p):
    return getattr(p, "fmt", None) is not None


def shape_of(p):
    """The shape of the values p holds: a packed 4-bit weight stores two per byte in a tensor half as wide."""
    return getattr(p, "logical_shape", p.shape)


def grad_of(p):
    """The float32 gradient the optimizer will use: main_grad for quantized weights, else .grad."""
    return p.main_grad if is_quantized(p) else p.grad


def zero_grad_(params):
    """model.zero_grad() for models with quantized weights: it does not know main_grad."""
    for p in params:
        p.grad = None
        if is_quantized(p):
            p.main_grad = None


@torch.no_grad()
def clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ for models with quantized weights (it would skip main_grad): scales
    every gradient by min(1, max_norm / (norm + 1e-6)) with norm the global L2 norm; max_norm = 0 only
    measures. A non-finite norm raises NonFiniteError before any gradient is changed. Returns the norm."""
    if not (isinstance(max_norm, (int, float)) and max_norm >= 0):
        raise ValueError(f"max_norm={max_norm!r}; accepted: a number >= 0 (0: no clipping)")
    grads = [g for p in params if (g := grad_of(p)) is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if not torch.isfinite(norm):
        raise quant.NonFiniteError(f"the global gradient norm is {norm.item()}; no gradient was changed")
    if max_norm > 0:
        for g in grads:
            g.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


# -----------------------------------------------------------------------------
# The checks and seeds the optimizers share

def kernel_seed(seed, step, index):
    """One Philox seed per kernel launch. Triton draws random numbers from (seed, element index), so every
    (optimizer seed, step, tensor) needs its own seed: the same seed twice would reuse the same numbers.
    Distinct for every step and for up to 65,537 tensors (Philox takes 64-bit seeds; modulo 2^31, tensor i+k
    at step t + 65,535 k would repeat tensor i at step t)."""
    return (seed * 1_000_003 + step * 65_537 + index) % 2**63


def _check_number(name, value, low, high, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value < high if low_open else low <= value < high):
        interval = f"({low}, {high})" if low_open else f"[{low}, {high})"
        raise ValueError(f"invalid {name}={value!r}; accepted: a finite number in {interval}")


def _check_choice(name, value, accepted):
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {list(accepted)}")


GRAD_LIMIT = math.sqrt(torch.finfo(torch.float32).max)  # |g| above this overflows g*g, hence v, in float32
# ... and by how v is stored: bfloat16 tops out below float32, and stochastic rounding may round a v just under
# float32's limit up to inf. Half the largest bfloat16 leaves room for the float32 roundings of v's update.
GRAD_LIMITS = dict(fp32=GRAD_LIMIT, bf16=math.sqrt(torch.finfo(torch.bfloat16).max / 2), fp8=GRAD_LIMIT)


class _CheckedGroup(dict):
    """A param group that checks itself whenever a value is set (group["lr"] = x, group.update(...), torch's LR
    schedulers): a bad value is refused where it is supplied, and the group keeps its last good values, so step()
    need not check the hyper-parameters again. Pickled and copied as a plain dict (the optimizer wraps it again)."""

    def __init__(self, group, check, check_now=True):
        super().__init__(group)
        self.check = check
        if check_now:
            check(self)

    def __setitem__(self, key, value):
        self.update({key: value})

    def update(self, *args, **kwargs):
        changes = dict(*args, **kwargs)
        old = {k: self[k] for k in changes if k in self}
        super().update(changes)
        try:
            self.check(self, changes)  # (lr is set every step: parameters' state is looked at only for moments)
        except Exception:
            for k in changes:  # put the group back as it was
                if k in old:
                    super().__setitem__(k, old[k])
                else:
                    super().__delitem__(k)
            raise

    def __reduce__(self):
        return dict, (dict(self),)


def _check_injection(group, beta, injection):
    """ECO's coefficient is about 1/lr: an lr so small that it overflows float32 (the precision it is applied in)
    would turn the momentum into inf in the middle of a step. Bounds |alpha| of injection_coefficient over every
    bias correction in (0, 1]."""
    lr = group["lr"]
    next_lr = group["next_lr"] if injection == "next_lr" else lr
    if lr == 0 or next_lr == 0:
        return  # no injection
    decay = lambda rate: abs(1 - rate * group["weight_decay"])
    bound = decay(lr) / (lr * beta) if injection == "paper" else decay(lr) / lr + decay(next_lr) / (next_lr * beta)
    if not bound < torch.finfo(torch.float32).max:
        raise ValueError(f"lr={lr!r}, next_lr={next_lr!r}: ECO's injection coefficient (about 1 / (lr x beta) = "
                         f"{bound:.3g}) overflows float32; accepted: lr = 0 (no injection) or lr, next_lr above about "
                         f"{2 / (beta * torch.finfo(torch.float32).max):.1e}")


# -----------------------------------------------------------------------------
# The theory in miniature (python eco.py): minimise 0.5 |w - target|^2 with SGD-momentum on quantized weights

def quadratic_error(mode, lr, rounding="nearest", steps=None, n=256, seed=0):
    """ECOSGD (momentum 0.9) on one int8 row (grid step about 1/127) pulled towards a fixed target, for
    300 + 10/lr steps (enough to settle). Returns the mean squared distance of the stored weight to the optimum
    over the last 300 steps. The paper's theory (Section 4): as lr shrinks, master weights and ECO stay at a floor
    set by the grid, while naive removal's error grows like 1/lr: with round-to-nearest every update below half a
    grid step is lost. (With stochastic rounding and exact gradients, as here, the rounding noise itself shrinks
    with lr, so naive SR stays close: the theory's 1/lr assumes noise of a fixed variance.)"""
    steps = steps or 300 + int(10 / lr)
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(1, n, generator=g) * 2 - 1
    target[0, 0] = 1.0  # pins the row scale near 1/127
    w = quant.QuantizedWeight((1, n), "int8").set_float_(target + 0.5 * torch.randn(1, n, generator=g))
    opt = ECOSGD([w.weight], lr=lr, momentum=0.9, mode=mode, rounding=rounding, seed=seed)
    errors = []
    for _ in range(steps):
        w.weight.main_grad = w.dequantized_weight() - target  # the exact gradient at the stored weight
        opt.step()
        errors.append(((w.dequantized_weight() - target) ** 2).mean().item())
    return sum(errors[-300:]) / 300


def schedule_gap(rule, schedule, rounding="nearest", seed=0, steps=2000, peak_lr=1e-3):
    """ECO under a learning-rate schedule, on least squares: one FP8 weight [32, 64] fitting a noisy linear map
    with AdamW (betas 0.9, 0.98, weight decay 0.1) for `steps` steps of 64 samples. schedule: "const", "warmup"
    (10% linear from 0.01x) or "cosine" (that warm-up, then cosine to 0.1x). rule: "master", "paper" or
    "next_lr" (ECOAdamW), or "two_term": the two-term rule of the module docstring (exact for SGD-momentum;
    with Adam's per-element step size exact up to d_{t+1} ~ d_t), which keeps last step's error e_{t-1}:
    4 bytes per weight, the memory ECO exists to save. Returns the mean training loss of the stored weight
    over the last 200 steps."""
    def lr_at(t):
        warm = int(0.1 * steps)
        if schedule == "const":
            return peak_lr
        if t < warm:
            return peak_lr * (0.01 + 0.99 * t / warm)
        progress = 0.0 if schedule == "warmup" else (t - warm) / (steps - warm)
        return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    y = x @ (0.5 * torch.randn(32, 64, generator=g)).T + 0.1 * torch.randn(512, 32, generator=g)
    w = quant.QuantizedWeight((32, 64), "fp8_e4m3").set_float_(0.5 * torch.randn(32, 64, generator=g))
    opt = ECOAdamW([w.weight], lr=peak_lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1,
                   mode="master" if rule == "master" else "eco", rounding=rounding,
                   injection="next_lr" if rule == "next_lr" else "paper", seed=seed)
    m, v, generator = torch.zeros(32, 64), torch.zeros(32, 64), torch.Generator().manual_seed(seed)  # two_term's
    e_prev = d_prev = None
    losses = []
    for t in range(steps):
        lr, next_lr = lr_at(t), lr_at(t + 1)
        stored = w.dequantized_weight()
        idx = torch.randint(0, 512, (64,), generator=g)
        grad = 2 * (x[idx] @ stored.T - y[idx]).T @ x[idx] / (64 * 32)  # of the mean squared error
        if rule != "two_term":
            opt.param_groups[0].update(lr=lr, next_lr=next_lr)
            w.weight.main_grad = grad
            opt.step()
        else:  # AdamW, then pay back last step's error at the scale it was carried with, and carry this one
            theta, d = adamw_update(stored, grad, m, v, step=t + 1, lr=lr, beta1=0.9, beta2=0.98, eps=1e-9,
                                    weight_decay=0.1)
            e = theta - quant.store_(w.weight, w.scale, theta, "fp8_e4m3", rounding, generator)
            if e_prev is not None:
                m += (1 - lr * 0.1) * (1 - 0.9 ** (t + 1)) / lr * d_prev * e_prev
            m -= (1 - next_lr * 0.1) * (1 - 0.9 ** (t + 2)) / (next_lr * 0.9) * d * e
            e_prev, d_prev = e, d
        losses.append(((x @ w.dequantized_weight().T - y) ** 2).mean().item())
    return sum(losses[-200:]) / 200


if __name__ == "__main__":
    lrs = (0.1, 0.03, 0.01, 0.003, 0.001)
    print("mean squared distance to the optimum over the last 300 steps, int8 grid, SGD-momentum 0.9")
    print(f"{'rounding':<11}{'mode':<8}" + "".join(f"{'lr=' + str(lr):>11}" for lr in lrs))
    table = {}
    for rounding in quant.ROUNDINGS:
        for mode in MODES:
            table[rounding, mode] = [quadratic_error(mode, lr, rounding) for lr in lrs]
            print(f"{rounding:<11}{mode:<8}" + "".join(f"{e:>11.2e}" for e in table[rounding, mode]))
    print("\nAdamW under a schedule, least squares on one FP8 weight (schedule_gap): final loss minus master's")
    print(f"{'rounding':<11}{'schedule':<9}{'seed':>5}{'master':>9}" + "".join(f"{r:>10}" for r in ("paper", "next_lr", "two_term")))
    for rounding in quant.ROUNDINGS:
        for schedule in ("const", "warmup", "cosine"):
            for seed in (0, 1):
                master = schedule_gap("master", schedule, rounding, seed)
                gaps = [schedule_gap(rule, schedule, rounding, seed) - master for rule in ("paper", "next_lr", "two_term")]
                print(f"{rounding:<11}{schedule:<9}{seed:>5}{master:>9.4f}" + "".join(f"{x:>+10.4f}" for x in gaps))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(0)  # the figure is optional
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, rounding in zip(axes, quant.ROUNDINGS):
        for mode, style in zip(MODES, ("k-o", "r-s", "b-^")):
            ax.loglog(lrs, table[rounding, mode], style, label=mode)
        ax.set(title=f"rounding: {rounding}", xlabel="learning rate")
        ax.legend()
    axes[0].set_ylabel("squared distance to optimum")
    fig.tight_layout()
    fig.savefig("eco_quadratic.png.tmp", dpi=110, format="png")
    os.replace("eco_quadratic.png.tmp", "eco_quadratic.png")
    print("wrote eco_quadratic.png")

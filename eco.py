"""
ECO, the Error-Compensating Optimizer: quantized training without full-precision master weights.

Quantized training usually keeps a float32 *master* copy of every weight: the optimizer updates the
master and re-quantizes it for the next forward. Drop the master and update the quantized weight
directly ("naive"), and every update smaller than half a grid step rounds away: training stalls.
ECO drops the master but keeps the rounding error, in the optimizer's momentum. One step of ECO-AdamW:

    theta = AdamW step on the dequantized weight, in float32       (transient, never stored)
    w'    = q(theta)                                               (the new stored weight)
    e     = theta - w'                                             (what rounding just lost)
    m    <- m + (1 - lr*wd) * (bc1 / lr) * (1 - 1/beta1) * (sqrt(v / bc2) + eps) * e      (v unchanged)

Why that coefficient: momentum injected now reaches the weights over all later steps, beta1 + beta1^2
+ ... = beta1 / (1 - beta1) times Adam's per-element step size lr / (bc1 * (sqrt(v/bc2) + eps)).
Choosing the injection so that this sum equals e puts the lost error back into the weights later.
The coefficient is negative (1 - 1/beta1 < 0): if no weight moved, e = -(step) and the momentum stops
decaying, so sub-step updates pile up until they cross a grid point. The factor (1 - lr*wd) comes from
decoupled weight decay shrinking the weights each step (the paper omits it; at its settings it is
within 1.2e-4 of 1). With lr = 0 (end of a schedule) there is nothing to compensate and we skip it.

For SGD with EMA momentum (the form the paper's theory is about) the same rule reads
    m~ = beta m + (1 - beta) g,  theta = (1 - lr*wd) w - lr m~,  w' = q(theta),
    m' = m~ + (1 - lr*wd) (1/lr) (1 - 1/beta) e.

Three modes, one optimizer class each for AdamW and SGD:
    master  float32 master copy in the optimizer state; AdamW updates it; the stored weight is q(master)
    naive   no master: AdamW updates the dequantized weight, which is re-quantized; the error is lost
    eco     no master: as naive, plus the one injection line above
Parameters that are not quantized (embeddings, norms, LM head) get plain AdamW / SGD in every mode.

eco_adamw_step is the math for one tensor (and the oracle for kernels.py); ECOAdamW is bookkeeping
around it. Test: python -m pytest -q test_eco.py
"""
import math

import torch

import quant

MODES = ("master", "naive", "eco")


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


def eco_adamw_step(weight, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay, quantize):
    """One ECO-AdamW step for one tensor. `weight` is the float32 dequantized weight; `quantize` maps
    float32 theta to its float32 grid value q(theta). Updates exp_avg / exp_avg_sq in place, returns q(theta).
    With quantize = identity this is exactly torch.optim.AdamW."""
    theta, denom = adamw_update(weight, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                                beta2=beta2, eps=eps, weight_decay=weight_decay)
    new_weight = quantize(theta)
    if lr > 0:
        error = theta - new_weight  # ideal minus stored: the sign matters
        alpha = (1 - lr * weight_decay) * ((1 - beta1 ** step) / lr) * (1 - 1 / beta1)  # negative
        exp_avg.addcmul_(error, denom, value=alpha)  # <- ECO: the error goes into the momentum
    return new_weight


def sgdm_update(weight, grad, momentum_buffer, *, lr, momentum, weight_decay):
    """SGD with EMA momentum: m = beta m + (1 - beta) g, theta = (1 - lr wd) w - lr m. Returns theta."""
    momentum_buffer.lerp_(grad.float(), 1 - momentum)
    return weight.float() * (1 - lr * weight_decay) - lr * momentum_buffer


def eco_sgd_step(weight, grad, momentum_buffer, *, lr, momentum, weight_decay, quantize):
    """ECO for SGD-momentum: m' = m~ + (1 - lr wd)(1/lr)(1 - 1/beta) e. Returns q(theta)."""
    theta = sgdm_update(weight, grad, momentum_buffer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    new_weight = quantize(theta)
    if lr > 0:
        alpha = (1 - lr * weight_decay) / lr * (1 - 1 / momentum)
        momentum_buffer.add_(theta - new_weight, alpha=alpha)  # <- ECO
    return new_weight


# -----------------------------------------------------------------------------
# Optimizer classes: bookkeeping around the functions above

def is_quantized(p):
    return getattr(p, "fmt", None) is not None


def grad_of(p):
    """The float32 gradient the optimizer will use: main_grad for quantized weights, else .grad."""
    return p.main_grad if is_quantized(p) else p.grad


class _QuantizedOptimizer(torch.optim.Optimizer):
    """What ECOAdamW and ECOSGD share: argument checks, the rounding generator, main_grad handling,
    and a state_dict that survives FP8 parameters."""

    def __init__(self, params, defaults, mode, rounding, seed):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; accepted: {list(MODES)}")
        quant.check_rounding(rounding)
        super().__init__(params, defaults)
        self.mode, self.rounding, self.seed = mode, rounding, seed
        qparams = [p for p in self._params() if is_quantized(p)]
        device = qparams[0].device if qparams else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)  # stochastic rounding

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _check_hyper(self, name, value, low, high, low_open=False):
        if not isinstance(value, (int, float)) or not (low < value < high if low_open else low <= value < high):
            interval = f"({low}, {high})" if low_open else f"[{low}, {high})"
            raise ValueError(f"invalid {name}={value!r}; accepted: a number in {interval}")

    def _grads_or_raise(self):
        """Collect (param, grad) pairs and refuse NaN/Inf before any weight or state is touched."""
        pairs = [(p, g) for p in self._params() if (g := grad_of(p)) is not None]
        if pairs and not torch.stack([torch.isfinite(g).all() for _, g in pairs]).all():
            bad = [tuple(p.shape) for p, g in pairs if not torch.isfinite(g).all()]
            raise quant.NonFiniteError(f"non-finite gradient in parameters of shapes {bad}; nothing was updated")
        return pairs

    @staticmethod
    def _dequantized(p):
        return quant.dequantize(p, p.scale, p.fmt)

    def _store(self, p):
        """quantize(theta): round theta onto p's grid, write codes + scale into p, return the grid value."""
        def store(theta):
            codes, scale = quant.quantize(theta, p.fmt, self.rounding, self.generator)
            p.copy_(codes)
            p.scale.copy_(scale)
            return quant.dequantize(codes, scale, p.fmt)
        return store

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for p in self._params():
            if is_quantized(p):
                p.main_grad = None

    def state_dict(self):
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator")
        super().load_state_dict(state_dict)
        # torch casts floating-point state to the parameter's dtype: for an FP8 parameter that would turn
        # the float32 moments and master copy into FP8. Reload them as saved, float32, on the param's device.
        params = self._params()
        for index, saved in state_dict["state"].items():
            p = params[index]
            self.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()}
        self.generator.set_state(generator_state.cpu())  # a checkpoint loaded with map_location="cuda" moved it


class ECOAdamW(_QuantizedOptimizer):
    """AdamW for models with quantized weights (quant.QuantizedWeight / QLinear), in one of three modes:
    'master', 'naive' or 'eco' (see the module docstring). rounding: 'stochastic' or 'nearest'."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 mode="eco", rounding="stochastic", seed=0, fused=None):
        self._check_hyper("lr", lr, 0.0, math.inf)
        self._check_hyper("beta1", betas[0], 0.0, 1.0, low_open=(mode == "eco"))  # eco divides by beta1
        self._check_hyper("beta2", betas[1], 0.0, 1.0)
        self._check_hyper("eps", eps, 0.0, math.inf)
        self._check_hyper("weight_decay", weight_decay, 0.0, math.inf)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, mode, rounding, seed)
        # fused: the ECO step of row-scaled weights runs as one Triton kernel (kernels.py) on CUDA
        self.fused_step = None
        if fused is not False and torch.cuda.is_available() and all(p.is_cuda for p in self._params() if is_quantized(p)):
            try:
                import kernels  # imports triton
                self.fused_step = kernels.eco_adamw_fused_
            except ImportError:
                pass
        if fused and self.fused_step is None:
            raise ValueError("fused=True needs the quantized parameters on CUDA and triton installed; use fused=False")
        self.fused = self.fused_step is not None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {id(p): g for p, g in self._grads_or_raise()}
        for index, (group, p) in enumerate((g, p) for g in self.param_groups for p in g["params"]):
            beta1, beta2 = group["betas"]
            if id(p) not in grads:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                if is_quantized(p) and self.mode == "master":
                    state["master"] = self._dequantized(p)  # starts at the stored weight
            state["step"] += 1
            hyper = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            args = (grads[id(p)], state["exp_avg"], state["exp_avg_sq"])
            if not is_quantized(p):  # embeddings, norms, head: plain AdamW
                p.copy_(adamw_update(p, *args, **hyper)[0])
            elif self.mode == "master":  # AdamW on the float32 master, stored weight = q(master)
                theta, _ = adamw_update(state["master"], *args, **hyper)
                state["master"].copy_(theta)
                self._store(p)(theta)
            elif self.mode == "naive":  # AdamW on the stored weight; the rounding error is lost
                theta, _ = adamw_update(self._dequantized(p), *args, **hyper)
                self._store(p)(theta)
            elif self.fused and quant.FORMATS[p.fmt].per_row:  # eco, the same math as one GPU kernel
                self.fused_step(p, p.scale, *args, **hyper, fmt=p.fmt, rounding=self.rounding,
                                seed=(self.seed * 1_000_003 + state["step"] * 65_537 + index) % 2**31)
            else:  # eco: as naive, and the rounding error is injected into exp_avg
                eco_adamw_step(self._dequantized(p), *args, **hyper, quantize=self._store(p))
        return loss


class ECOSGD(_QuantizedOptimizer):
    """SGD with EMA momentum (m = beta m + (1 - beta) g) for quantized weights, modes as ECOAdamW."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, *, mode="eco", rounding="stochastic", seed=0):
        self._check_hyper("lr", lr, 0.0, math.inf)
        self._check_hyper("momentum", momentum, 0.0, 1.0, low_open=(mode == "eco"))
        self._check_hyper("weight_decay", weight_decay, 0.0, math.inf)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), mode, rounding, seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {id(p): g for p, g in self._grads_or_raise()}
        for group in self.param_groups:
            hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
            for p in group["params"]:
                if id(p) not in grads:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    if is_quantized(p) and self.mode == "master":
                        state["master"] = self._dequantized(p)
                args = (grads[id(p)], state["momentum_buffer"])
                if not is_quantized(p):
                    p.copy_(sgdm_update(p, *args, **hyper))
                elif self.mode == "master":
                    theta = sgdm_update(state["master"], *args, **hyper)
                    state["master"].copy_(theta)
                    self._store(p)(theta)
                elif self.mode == "naive":
                    self._store(p)(sgdm_update(self._dequantized(p), *args, **hyper))
                else:
                    eco_sgd_step(self._dequantized(p), *args, **hyper, quantize=self._store(p))
        return loss

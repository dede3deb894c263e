"""
A sparse mixture-of-experts MLP: each token is processed by k of E small SwiGLU MLPs ("experts").

    probs     = softmax(x @ W_router^T)                       (N, E)  one distribution per token
    top-k     keep the k largest probabilities, renormalise them to sum to 1
    y(token)  = sum over its k experts e of  p_e * down_e( silu(gate_e x) * up_e x )

Dispatch is "dropless": every token reaches its k experts, none is dropped for capacity. We sort the
N*k (token, expert) assignments by expert so that each expert's tokens are contiguous, run one matmul
per expert on its slice (a loop over E experts, never over tokens), and scatter-add the weighted results
back to their tokens.

Load balancing (Switch Transformer): aux = E * sum_e f_e * P_e, with f_e the fraction of assignments
that went to expert e and P_e the mean router probability of e. It equals 1 when the router is uniform
and grows when routing concentrates on a few experts; the GPT adds aux_loss_coef * aux to its loss.

The expert weights are 3-D tensors [E, out, in], held in quant.FloatWeight so that quant.quantize_linears_
can swap them for quant.QuantizedWeight (one FP8 scale per expert row): as in the paper, the expert
Linears are what gets quantized; the router stays in high precision. A bank is called per expert,
bank(xe, e) = xe @ W[e]^T, so a quantized bank runs each expert's matmul on its own path (quant.py: FP8
activations times the stored codes by torch._scaled_mm, or simulated in float32), one launch per expert
that receives tokens (a grouped FP8 matmul would be one launch for all). Experts that receive no token in
a step get an exactly zero gradient.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import quant


class MoE(nn.Module):
    def __init__(self, n_embd, hidden, n_experts=8, top_k=2):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k}; accepted: 1 to n_experts={n_experts}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.gate = quant.FloatWeight(torch.empty(n_experts, hidden, n_embd))  # [E, out, in]
        self.up = quant.FloatWeight(torch.empty(n_experts, hidden, n_embd))
        self.down = quant.FloatWeight(torch.empty(n_experts, n_embd, hidden))
        self.aux_loss = None  # set by each forward

    def route(self, x):
        """x (N, C) -> top-k expert ids (N, k), their renormalised weights (N, k), and the aux loss."""
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)  # (E,)
        f = counts.float() / experts.numel()
        aux = self.n_experts * (f * probs.mean(dim=0)).sum()
        return experts, weights, aux

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        experts, weights, self.aux_loss = self.route(x)
        # sort the N*k assignments by expert: each expert's tokens become one contiguous slice
        flat_experts = experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)
        token = order // self.top_k  # which token each sorted assignment belongs to
        counts = torch.bincount(flat_experts, minlength=self.n_experts).tolist()
        outs = []
        for e, xe in enumerate(x[token].split(counts)):  # (n_e, C): the tokens routed to expert e
            if xe.shape[0] == 0:
                continue  # an idle expert: its weights get an exactly zero gradient
            h = F.silu(self.gate(xe, e)) * self.up(xe, e)  # (n_e, H); bank(xe, e) is xe @ W[e]^T
            outs.append(self.down(h, e))  # (n_e, C)
        y = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, C) weighted by the router
        out = torch.zeros_like(x).index_add_(0, token, y)  # sum each token's k expert outputs
        return out.view(B, T, C)

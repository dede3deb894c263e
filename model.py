"""
A tiny Llama-style GPT, like the paper's models at a smaller scale: RMSNorm, rotary position embeddings,
a SwiGLU MLP (dense, or moe.MoE), no biases, an untied LM head, weights initialised with std 0.02.

    idx (B, T) -> token embedding -> n_layer x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> head -> logits

Precision: everything here is float32. GPT.quantize_(fmt) swaps the Linears inside the transformer blocks
(attention and MLP projections, or the MoE's expert banks) for quant.QLinear / quant.QuantizedWeight,
which store FP8 or INT codes and quantize the activations entering an FP8 matmul. The embedding, the
norms, the MoE router and the LM head stay float32, as in the paper.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from moe import MoE


@dataclass
class GPTConfig:
    """The defaults are the model of train.py's default run: train.py reads its model options from here."""
    vocab_size: int = 2049  # data/prepare.py's 2048 BPE tokens + <|endoftext|>
    block_size: int = 64  # longest context
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    mlp: str = "dense"  # "dense" (SwiGLU) or "moe"
    n_experts: int = 8  # moe only
    top_k: int = 2  # moe only
    aux_loss_coef: float = 0.01  # moe only: weight of the load-balancing loss in the training loss

    @property
    def hidden(self):
        """SwiGLU hidden size: 8/3 of the width (same parameters as a 4x GELU MLP), a multiple of 32."""
        return 32 * math.ceil(8 * self.n_embd / 3 / 32)


def rotary_tables(head_dim, block_size, base=10000.0):
    """cos and sin of position * frequency, each (block_size, head_dim / 2)."""
    freqs = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(block_size).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x1, x2) of channels by its position's angle. x (B, nh, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f"n_embd={cfg.n_embd} must split into n_head={cfg.n_head} heads of even size")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.n_embd), nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = MoE(cfg.n_embd, cfg.hidden, cfg.n_experts, cfg.top_k) if cfg.mlp == "moe" else SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.mlp not in ("dense", "moe"):
            raise ValueError(f"mlp={cfg.mlp!r}; accepted: 'dense', 'moe'")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # every matrix; residual outputs scaled down with depth, as in GPT-2
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def quantize_(self, fmt):
        """Store the transformer-block Linears (not the router) as fmt codes; returns how many were swapped."""
        return quant.quantize_linears_(self, fmt, include=lambda name, m: name.startswith("blocks.") and "router" not in name)

    def num_params(self, non_embedding=True):
        n = sum(math.prod(getattr(p, "logical_shape", p.shape)) for p in self.parameters())  # packed 4-bit: 2 a byte
        return n - (self.embed.weight.numel() + self.head.weight.numel() if non_embedding else 0)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.head(self.norm(x)).float()  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        if self.cfg.mlp == "moe" and self.training:  # the load-balancing term is for training only
            loss = loss + self.cfg.aux_loss_coef * sum(b.mlp.aux_loss for b in self.blocks) / len(self.blocks)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after idx (B, T), feeding each prediction back in."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            logits = logits[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx

"""
model.py and moe.py: a GPT whose block weights are stored in FP8 trains with ECO; it is causal; rotary
embeddings make attention see relative positions only; blocks are residual; the MoE layer equals a per-token
loop, balances its experts through a term in the training loss only, and leaves an idle expert alone.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eco
import quant
from model import GPT, Attention, GPTConfig, apply_rotary, rotary_tables
from moe import MoE


# -----------------------------------------------------------------------------
# model.py

@pytest.mark.parametrize("mlp", ["dense", "moe"])
def test_gpt_trains_with_quantized_block_linears(mlp):
    """GPT with FP8 block weights (dense or MoE) trains with ECO; router, embedding and head stay high precision."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, mlp=mlp, n_experts=4))
    swapped = model.quantize_("fp8_e4m3")
    assert swapped == 2 * (2 + 3)  # per block: qkv, proj + three MLP weights (Linears or expert banks)
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    if mlp == "moe":
        assert type(model.blocks[0].mlp.router) is nn.Linear, "the router stays high precision"
        assert model.blocks[0].mlp.gate.weight.shape == (4, model.cfg.hidden, 32)
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and torch.isfinite(loss)
    loss.backward()
    for p in model.parameters():
        assert (p.main_grad if eco.is_quantized(p) else p.grad) is not None
    opt = eco.ECOAdamW(model.parameters(), lr=1e-2, mode="eco")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(idx, idx)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert model.generate(idx[:1, :4], 5).shape == (1, 9)


def test_gpt_is_causal():
    """Changing the tokens after position t changes no logit at or before t."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(12))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 40
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])


def test_rotary_embedding_is_a_rotation_that_sees_only_relative_position():
    """Norms are kept, and q.k after rotation depends on the offset between the two positions alone."""
    g = torch.Generator().manual_seed(13)
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    at = lambda x, pos: apply_rotary(x.view(1, 1, 1, 8), cos[pos:pos + 1], sin[pos:pos + 1]).view(8)
    assert torch.allclose(at(q, 5).norm(), q.norm(), rtol=1e-5)
    dots = [at(q, m) @ at(k, m + 3) for m in range(10)]
    assert all(torch.allclose(d, dots[0], rtol=1e-4, atol=1e-5) for d in dots)
    assert not torch.allclose(at(q, 0) @ at(k, 3), at(q, 0) @ at(k, 4), rtol=1e-3)


def test_attention_sees_relative_positions_only():
    """Rotating q and k by the same extra angle (every position shifted by 5) leaves attention unchanged;
    no rotation at all changes it: positions reach attention through q.k, and only as offsets."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, n_head=2, n_embd=16)
    attn = Attention(cfg)
    cos, sin = rotary_tables(8, 16)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        y = attn(x, cos, sin)
        assert torch.allclose(attn(x, cos[5:], sin[5:]), y, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(attn(x, torch.ones_like(cos), torch.zeros_like(sin)), y, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mlp", ["dense", "moe"])
def test_blocks_are_residual_so_zero_output_projections_make_the_model_embed_norm_head(mlp):
    """x + attn(norm(x)) and x + mlp(norm(x)): with every block's output projections at zero each block passes
    its input through unchanged, and the logits are exactly head(norm(embed(idx)))."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp=mlp, n_experts=4))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.mlp.down.weight.zero_()
        idx = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(16))
        assert torch.equal(model(idx)[0], model.head(model.norm(model.embed(idx))))


# -----------------------------------------------------------------------------
# moe.py

def test_moe_matches_a_per_token_loop_and_routes_each_token_to_k_experts():
    """The batched MoE equals a per-token loop over each token's top-k experts, whose weights sum to 1."""
    torch.manual_seed(0)
    moe = MoE(n_embd=12, hidden=20, n_experts=5, top_k=2)
    for w in (moe.gate, moe.up, moe.down):
        nn.init.normal_(w.weight, std=0.2)
    x = torch.randn(2, 7, 12)
    out = moe(x)
    experts, weights, _ = moe.route(x.view(-1, 12))
    assert experts.shape == (14, 2) and (experts[:, 0] != experts[:, 1]).all()
    assert torch.allclose(weights.sum(-1), torch.ones(14))
    expected = torch.zeros(14, 12)
    for n, token in enumerate(x.view(-1, 12)):  # the slow, obvious way
        for e, p in zip(experts[n].tolist(), weights[n]):
            h = nn.functional.silu(moe.gate.weight[e] @ token) * (moe.up.weight[e] @ token)
            expected[n] += p * (moe.down.weight[e] @ h)
    assert torch.allclose(out.view(-1, 12), expected, atol=1e-5)


def test_moe_aux_loss_is_minimal_for_a_uniform_router():
    """The load-balancing loss is 1 for a uniform router and grows when the router prefers some experts."""
    torch.manual_seed(0)
    moe = MoE(n_embd=8, hidden=16, n_experts=4, top_k=2)
    x = torch.rand(64, 8)
    nn.init.zeros_(moe.router.weight)
    assert moe.route(x)[2].item() == pytest.approx(1.0)
    with torch.no_grad():  # skewed: every token prefers experts 0 and 1
        moe.router.weight.copy_(torch.tensor([[2.0] * 8, [1.0] * 8, [0.0] * 8, [0.0] * 8]))
    assert moe.route(x)[2].item() > 1.5


def test_moe_idle_expert_gets_zero_gradient_and_does_not_drift_apart():
    """An expert that gets no token gets a zero gradient, and ECO keeps it within a grid step of master's."""
    torch.manual_seed(0)
    moes = {}
    for mode in eco.MODES:
        torch.manual_seed(0)
        moe = MoE(n_embd=8, hidden=16, n_experts=4, top_k=1)
        for w in (moe.gate, moe.up, moe.down):
            nn.init.normal_(w.weight, std=0.2)
        with torch.no_grad():
            moe.router.weight.copy_(torch.tensor([[1.0] * 8, [0.5] * 8, [0.2] * 8, [-5.0] * 8]))  # expert 3: never
        quant.quantize_linears_(moe, "fp8_e4m3")
        opt = eco.ECOAdamW(moe.parameters(), lr=1e-2, weight_decay=0.1, mode=mode, rounding="nearest")
        for step in range(20):
            x = torch.rand(2, 5, 8)  # positive inputs: expert 3's logit is always the lowest
            opt.zero_grad()
            moe(x).pow(2).sum().backward()
            assert (moe.gate.weight.main_grad[3] == 0).all() and (moe.down.weight.main_grad[3] == 0).all()
            assert moe.gate.weight.main_grad[0].abs().sum() > 0
            opt.step()
        moes[mode] = moe
    idle = {mode: m.gate.dequantized_weight()[3] for mode, m in moes.items()}
    grid = moes["master"].gate.scale[3] * 32  # FP8 spacing at the row's largest values (2^5 at 448)
    assert ((idle["eco"] - idle["master"]).abs() <= grid).all()


@pytest.mark.parametrize("quantized", [False, True])
def test_moe_load_balancing_term_is_in_the_training_loss_only(quantized):
    """Training: loss = CE + aux_loss_coef * mean over blocks of aux. Evaluation (model.eval()): loss = CE exactly,
    so validation losses compare across dense, MoE and every optimizer."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16, mlp="moe", n_experts=4,
                    aux_loss_coef=0.5)
    model = GPT(cfg)
    if quantized:
        model.quantize_("fp8_e4m3")
    g = torch.Generator().manual_seed(11)
    idx, targets = torch.randint(0, 40, (3, 8), generator=g), torch.randint(0, 40, (3, 8), generator=g)
    logits, loss = model(idx, targets)
    ce = F.cross_entropy(logits.view(-1, 40), targets.view(-1))
    aux = sum(b.mlp.aux_loss for b in model.blocks) / len(model.blocks)
    assert aux > 0.5, "the term is not negligible: aux is 1 for a uniform router"
    assert torch.allclose(loss, ce + 0.5 * aux, rtol=1e-6, atol=0)
    router = model.blocks[0].mlp.router.weight
    assert torch.autograd.grad(aux, router)[0].abs().sum() > 0, "the balancing term trains the router"
    model.eval()
    with torch.no_grad():
        eval_logits, eval_loss = model(idx, targets)
    assert torch.equal(eval_logits, logits.detach())
    assert torch.equal(eval_loss, F.cross_entropy(eval_logits.view(-1, 40), targets.view(-1)))
    dense = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    logits, loss = dense(idx, targets)
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, 40), targets.view(-1))), "no aux term without MoE"

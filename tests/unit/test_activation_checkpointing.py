"""Activation checkpointing: the same outputs, gradients and router statistics as without, with
much less saved for the backward pass."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig
from moe.router_state import StepStatefulRouter
from train.model import GPT, ModelConfig

VOCAB = 96
ROUTERS = {
    # Jitter draws random numbers in the forward pass: the recomputation must draw the same ones.
    "token-choice-jitter-bias": dict(top_k=2, capacity_factor=1.0, jitter_eps=0.1, bias_update_rate=0.01),
    "token-choice-dropless": dict(top_k=2, capacity_factor=None),
    "expert-choice": dict(router="expert_choice", capacity_factor=2.0),
}


def _model(checkpoint_blocks: bool, **moe_overrides) -> GPT:
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "every": 1, "min_capacity": 0, **moe_overrides})
    cfg = ModelConfig(seq_len=24, num_layers=3, hidden_size=32, num_heads=4, ffn_hidden=48)
    model = GPT(cfg, moe, vocab_size=VOCAB, seed=0).train()
    model.checkpoint_blocks = checkpoint_blocks
    return model


def _step(model: GPT, tokens: torch.Tensor):
    torch.manual_seed(1)  # the jitter's random stream, identical for both models
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()) + out.aux_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    statistics = [m.pending_statistics().clone() for m in model.modules() if isinstance(m, StepStatefulRouter)]
    return out, grads, statistics


@pytest.mark.parametrize("moe", ROUTERS.values(), ids=ROUTERS.keys())
def test_checkpointed_blocks_give_the_same_outputs_gradients_and_statistics(moe):
    tokens = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    plain_out, plain_grads, plain_stats = _step(_model(False, **moe), tokens)
    ckpt_out, ckpt_grads, ckpt_stats = _step(_model(True, **moe), tokens)

    assert torch.equal(ckpt_out.logits, plain_out.logits)
    assert torch.equal(ckpt_out.aux_loss, plain_out.aux_loss)
    for plain_aux, ckpt_aux in zip(plain_out.moe_aux, ckpt_out.moe_aux, strict=True):
        assert torch.equal(ckpt_aux.routed_E, plain_aux.routed_E) and torch.equal(ckpt_aux.kept_E, plain_aux.kept_E)
    assert ckpt_grads.keys() == plain_grads.keys() and any("experts" in name for name in plain_grads)
    for name, grad in plain_grads.items():
        # The recomputed activations are bitwise those of the first pass on the CPU.
        assert torch.equal(ckpt_grads[name], grad), name
    # Counted once: the recomputation in the backward pass leaves the routers' statistics alone.
    assert len(plain_stats) == 3 and all(s.abs().sum() > 0 for s in plain_stats)
    for plain, ckpt in zip(plain_stats, ckpt_stats, strict=True):
        assert torch.equal(ckpt, plain)


def _bytes_saved_by_autograd(model: GPT, tokens: torch.Tensor) -> int:
    """What autograd keeps for the backward pass of one forward, through the saved-tensor hooks. Inside
    a checkpointed block the checkpoint's own hooks take precedence (the innermost pair wins) and
    keep placeholders only; what it keeps of the block is its inputs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
    out.logits.sum().backward()
    return total


def _deep_model(checkpoint_blocks: bool, num_layers: int) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=24, num_layers=num_layers, hidden_size=32, num_heads=4, ffn_hidden=48)
    model = GPT(cfg, MoEConfig(num_experts=4, top_k=2, every=1), vocab_size=VOCAB, seed=0).train()
    model.checkpoint_blocks = checkpoint_blocks
    return model


def test_a_checkpointed_block_keeps_only_its_inputs():
    """Each further layer adds all of its activations to what the backward pass keeps without
    checkpointing, and exactly its inputs with it: x [B, S, D] and the rotary tables [S, head_dim / 2]."""
    batch, seq, dim, head_dim = 8, 24, 32, 32 // 4
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))
    plain = [_bytes_saved_by_autograd(_deep_model(False, n), tokens) for n in (2, 6)]
    checkpointed = [_bytes_saved_by_autograd(_deep_model(True, n), tokens) for n in (2, 6)]
    inputs_per_block = 4 * (batch * seq * dim + 2 * seq * head_dim // 2)  # fp32
    assert checkpointed[1] - checkpointed[0] == 4 * inputs_per_block
    assert plain[1] - plain[0] > 10 * (checkpointed[1] - checkpointed[0])


def test_no_checkpointing_without_gradients():
    """Evaluation and generation run the blocks directly (nothing to recompute)."""
    model = _model(True, top_k=2).eval()
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        checkpointed = model(tokens).logits
    model.checkpoint_blocks = False
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, checkpointed)


def test_first_forward_of_the_process_probing_the_grouped_gemm_can_be_checkpointed():
    """The grouped-GEMM probe runs once per process, inside whichever forward comes first; its own
    tensors must not count as the checkpointed block's (the recomputation, with the answer cached,
    would save fewer and torch's checkpoint would refuse it)."""
    from moe.grouped_experts import _PROBED

    _PROBED.clear()
    model = _model(True, top_k=2, capacity_factor=1.25)
    out = model(torch.randint(0, VOCAB, (2, 24)))
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())

"""GPT shapes, causality, parameter accounting."""

from __future__ import annotations

import torch

from moe import MoEConfig, MoELayer
from train.model import GPT, ModelConfig

VOCAB = 96


def _model(**moe_overrides) -> GPT:
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "every": 2, **moe_overrides})
    cfg = ModelConfig(seq_len=24, num_layers=4, hidden_size=32, num_heads=4, ffn_hidden=48)
    return GPT(cfg, moe, vocab_size=VOCAB, seed=0)


def test_shapes_and_moe_placement():
    model = _model()
    out = model(torch.randint(0, VOCAB, (3, 24)))
    assert out.logits.shape == (3, 24, VOCAB)
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks] == [False, True, False, True]
    assert len(out.moe_aux) == 2
    assert out.aux_loss.ndim == 0 and out.aux_loss > 0
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dense_model_has_no_moe_layer():
    model = _model(every=0)
    out = model(torch.randint(0, VOCAB, (1, 8)))
    assert out.moe_aux == [] and float(out.aux_loss) == 0.0


def test_causal_with_dropless_routing():
    """Changing tokens after position t never changes the logits at t (dropless routing: with a
    capacity limit, later tokens compete for slots and causality does not hold by design)."""
    model = _model(capacity_factor=None, eval_capacity_factor=None).double()
    for mode in (model.train, model.eval):
        mode()
        tokens = torch.randint(0, VOCAB, (2, 24))
        base = model(tokens).logits
        for t in (0, 7, 22):
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, changed[:, t + 1 :].shape)
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, : t + 1], base[:, : t + 1], rtol=1e-10, atol=1e-10)
            assert not torch.allclose(logits[:, t + 1 :], base[:, t + 1 :])


def test_parameter_counts():
    model = _model()
    counts = model.parameter_counts()
    one_expert = 3 * 32 * 48
    assert counts["expert_one"] == one_expert
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["active"] == 2 * (4 - 2) * one_expert
    assert counts["active_matmul"] == counts["active"]  # tied: the embedding is the output matmul


def test_expert_choice_counts_the_experts_its_capacity_gives():
    """E * C / S experts per token: the capacity factor for large groups, more where min_capacity (or
    rounding up) gives each expert more than S * cf / E of the group's tokens."""
    from moe import MoEConfig as _MoEConfig
    from train.model import expert_choice_group, experts_per_token

    moe = _MoEConfig(num_experts=4, router="expert_choice", capacity_factor=1.0, min_capacity=4, aux_loss_coef=0.0)
    assert experts_per_token(moe) == 1.0 and experts_per_token(moe, 4096) == 1.0
    assert experts_per_token(moe, 8) == 2.0  # C = 4 (min_capacity) of 8 tokens, for each of 4 experts
    assert experts_per_token(moe, 10) == 4 * 4 / 10  # ceil(2.5) = 3 < 4
    assert expert_choice_group(moe, 4, 16) == 64
    assert expert_choice_group(_MoEConfig(router="expert_choice", capacity_factor=2.0, ec_group="sequence",
                                          aux_loss_coef=0.0), 4, 16) == 16
    model = GPT(ModelConfig(seq_len=8, num_layers=1, hidden_size=16, num_heads=2, ffn_hidden=24), moe, 64)
    one_expert = model.parameter_counts()["expert_one"]
    assert model.parameter_counts(8)["active"] - model.parameter_counts()["active"] == one_expert
    assert experts_per_token(_MoEConfig(num_experts=4, top_k=2), 8) == 2  # token choice: K, whatever the group


def test_model_init_std_reaches_the_router():
    from moe import MoEConfig as _MoEConfig

    model = GPT(ModelConfig(seq_len=8, num_layers=1, hidden_size=256, num_heads=4, ffn_hidden=64, init_std=0.2),
                _MoEConfig(num_experts=64, top_k=1, capacity_factor=None), 32)
    router_std = float(model.blocks[0].ffn.router.weight.std())
    assert 0.18 < router_std < 0.22, router_std

"""The dry run: a parallel plan for big layouts, without GPUs or a process group."""

from __future__ import annotations

import pytest

from train.config import ConfigError, to_run_config
from train.loop import train

BIG = ["experiment=h100_350m", "moe.num_experts=64", "moe.top_k=8", "model.ffn_hidden=704", "dry_run=true"]


@pytest.mark.parametrize("world, ep", [(64, 8), (512, 64)])
def test_plans_64_and_512_rank_layouts(compose_run, capsys, world, ep):
    cfg = compose_run([*BIG, f"world_size={world}", f"moe.ep_size={ep}"])
    plan = train(cfg)
    out = capsys.readouterr().out
    assert f"dry run: {world} ranks, expert parallel {ep} x expert-data parallel {world // ep}" in out
    assert plan["experts_per_rank"] == 64 // ep
    # Every expert exists exactly once across an expert-parallel group.
    one_expert = 3 * 1024 * 704
    assert plan["params_expert_per_rank"] == 24 * (64 // ep) * one_expert
    assert plan["params_total"] == plan["params_dense_per_rank"] + 24 * 64 * one_expert
    trainer = cfg.trainer
    assert plan["global_batch_sequences"] == trainer.micro_batch_size * trainer.grad_accum * world
    assert plan["all_to_all_gib_per_step"] > 0 and plan["memory_activations_gib"] > 0


def test_more_expert_parallelism_means_less_memory_and_no_all_to_all_at_ep1(compose_run):
    small = train(compose_run([*BIG, "world_size=64", "moe.ep_size=64"]))
    large = train(compose_run([*BIG, "world_size=64", "moe.ep_size=8"]))
    assert small["memory_weights_optimizer_gib"] < large["memory_weights_optimizer_gib"]
    none = train(compose_run([*BIG, "world_size=64", "moe.ep_size=1"]))
    assert none["all_to_all_gib_per_step"] == 0


def test_tensor_parallelism_splits_the_activations_inside_each_block(compose_run):
    from train.model import padded_vocab_size

    plans = {tp: train(compose_run([*BIG, "world_size=16", "moe.ep_size=8", f"model.tensor_parallel={tp}"]))
             for tp in (1, 2)}
    cfg = compose_run(BIG)
    b, s, d, layers = cfg.trainer.micro_batch_size, cfg.model.seq_len, cfg.model.hidden_size, cfg.model.num_layers
    k, f, vocab = 8, 704, padded_vocab_size(cfg.data.vocab_size)
    gib = 2**30

    def expected(tp: int) -> float:  # bf16: (10 + 24 / tp) bytes per b*s*d per layer, routed copies, logits
        per_layer = (10 + 24 / tp) * b * s * d + b * s * k * (2 * d + 3 * f / tp) * 2
        return (layers * per_layer + b * s * vocab * 6) / gib

    for tp, plan in plans.items():
        assert plan["memory_activations_gib"] == pytest.approx(expected(tp), rel=1e-12)
    assert plans[2]["memory_activations_gib"] < plans[1]["memory_activations_gib"]


def test_activation_checkpointing_keeps_one_input_per_block_plus_one_block(compose_run):
    plain = train(compose_run([*BIG, "world_size=8", "moe.ep_size=8"]))
    checkpointed = train(compose_run([*BIG, "world_size=8", "moe.ep_size=8", "trainer.activation_checkpointing=true"]))
    # 24 layers: all their activations against their inputs and one recomputed block (same logits).
    assert checkpointed["memory_activations_gib"] < plain["memory_activations_gib"] / 5
    assert checkpointed["memory_weights_optimizer_gib"] == plain["memory_weights_optimizer_gib"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["world_size=512", "moe.ep_size=3"], "moe.num_experts=64 must be divisible by moe.ep_size=3"),
        (["world_size=100", "moe.ep_size=64"], "moe.ep_size=64 must divide the world size 100"),
        (["moe.ep_size=8"], "dry_run=true needs world_size=N"),
        (["world_size=8", "moe.ep_size=1", "dry_run_device_gib=10"], "more than dry_run_device_gib=10"),
        (["world_size=8", "moe.ep_size=1", "dry_run_device_gib=-1"], "dry_run_device_gib must be a positive size"),
        (["world_size=0"], "world_size must be a positive number of ranks"),
    ],
)
def test_impossible_layouts_are_rejected(compose_run, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(to_run_config(compose_run([*BIG, *overrides])))


def test_small_plans_read_in_their_own_units(compose_run, capsys):
    train(to_run_config(compose_run(["model=gpt_tiny", "dry_run=true", "world_size=1"])))
    out = capsys.readouterr().out
    assert out.startswith("dry run: 1 rank, ")
    assert "each rank holds all 8 experts of every MoE layer" in out and "r*" not in out
    assert "0.0 GiB" not in out and "0.000B" not in out and " MiB per save" in out
    assert "all-to-all   nothing sent" in out


def test_parameter_counts_keep_their_scale():
    from train.dry_run import _count

    assert [_count(n) for n in (950, 1500, 999.96e6, 13.4e9, 1.2e12)] == ["950", "1.5K", "1.00B", "13.40B", "1.20T"]

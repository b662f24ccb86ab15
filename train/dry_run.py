"""`dry_run=true world_size=N`: the parallel plan of a big job, built without a GPU or a process group.

The model is built on PyTorch's meta device (shapes, no memory), so a 512-rank, 64-expert plan
takes seconds on a laptop. Figures per rank:

- parameters: dense (replicated on every rank) and expert (E / ep_size experts per rank);
- memory (estimate): weights + gradients + AdamW state under ZeRO-1/2 (Rajbhandari et al. 2020:
  bf16 mixed precision = 2 bytes weights + 2 bytes gradients + 12 bytes fp32 master, momentum,
  variance per parameter; fp32 = 4 + 4 + 8). Optimizer state (ZeRO-1) and gradients (ZeRO-2) are
  partitioned over the data-parallel group: all ranks for dense parameters, world / ep_size for
  expert parameters. Activations: (10 + 24 / tp) x b x s x d bytes per layer for bf16 (Korthikanti
  et al. 2022 with tensor parallelism and no sequence parallelism, no recomputation, flash attention
  so no s^2 term: 34 at tp 1), plus each MoE layer's routed copies b x s x K x (2d + 3F / tp) x 2
  bytes (the hidden units split over the tensor-parallel ranks), plus the logits b x s x V x 6 bytes
  (the output projection is whole on every rank);
- all-to-all bytes per optimizer step: per MoE layer and micro-batch, the dispatch and the combine
  each move b x s x K (x cf in capacity mode) rows of d elements, of which (ep-1)/ep leave the
  rank, and the backward pass repeats both.
"""

from __future__ import annotations

import torch

from train.config import ConfigError, RunConfig
from train.model import GPT, expert_choice_group, experts_per_token
from train.tp_layout import split_kind

GIB = 2**30


def parallel_plan(run: RunConfig, world_size: int, vocab_size: int) -> dict:
    """Figures for one rank of a `world_size`-rank job (every rank holds the same amounts)."""
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    run.check_world_size(world_size, "given by world_size")
    moe, model_cfg, trainer = run.moe, run.model, run.trainer
    ep, tp = moe.ep_size, model_cfg.tensor_parallel
    data_parallel = world_size // tp
    with torch.device("meta"):
        model = GPT(model_cfg, moe, vocab_size=vocab_size, seed=0)
    routing_group = expert_choice_group(moe, trainer.micro_batch_size, model_cfg.seq_len)
    counts = model.parameter_counts(routing_group)
    # A tensor-parallel rank holds 1/tp of every split weight (train/tp_layout.py) and the rest whole.
    local_expert = sum(
        p.numel() // (tp if split_kind(name) else 1) for name, p in model.named_parameters() if "deepspeed_experts" in name
    )
    dense = sum(
        p.numel() // (tp if split_kind(name) else 1) for name, p in model.named_parameters() if "deepspeed_experts" not in name
    )

    bf16 = run.deepspeed.precision != "fp32"
    weight_bytes, grad_bytes, optimizer_bytes = (2, 2, 12) if bf16 else (4, 4, 8)
    zero = run.deepspeed.zero_stage
    # Expert-parallel groups are formed among the ranks of one tensor-parallel rank (DeepSpeed's
    # layout with an mpu), so an expert's replicas are the data-parallel ranks over ep.
    expert_dp = data_parallel // ep

    def state_bytes(params: int, dp: int) -> float:
        grads = grad_bytes * params / (dp if zero >= 2 else 1)
        return weight_bytes * params + grads + optimizer_bytes * params / dp

    b, s, d = trainer.micro_batch_size, model_cfg.seq_len, model_cfg.hidden_size
    expert_hidden = moe.expert_hidden or model_cfg.ffn_hidden
    per_token = experts_per_token(moe, routing_group)
    act_elem = 2 if bf16 else 4
    # Per layer, in bytes at 2 per element: norms, block inputs and the like are whole on every
    # tensor-parallel rank (10), attention and FFN internals split (24); Korthikanti et al. 2022, eq. 2.
    block_dense = (10 + 24 / tp) * b * s * d * act_elem / 2
    block_moe = b * s * per_token * (2 * d + 3 * expert_hidden / tp) * act_elem
    logits = b * s * vocab_size * (act_elem + 4)
    if trainer.activation_checkpointing:
        # Every block's input, plus one block's activations at a time while it is recomputed.
        one_block = block_dense + (block_moe if counts["moe_layers"] else 0)
        activations = model_cfg.num_layers * b * s * d * act_elem + one_block + logits
    else:
        activations = model_cfg.num_layers * block_dense + counts["moe_layers"] * block_moe + logits
    padding = moe.capacity_factor if (moe.capacity_factor and moe.router == "token_choice") else 1.0
    rows = b * s * per_token * padding
    all_to_all = 4 * rows * d * act_elem * (ep - 1) / ep * counts["moe_layers"] * trainer.grad_accum
    # Every parameter once across the ranks' files: module weights, fp32 master + AdamW moments in
    # ZeRO's partitions (12 B), and the layout-free copy of those (12 B) unless turned off. DeepSpeed
    # clones each tensor before saving the module, so a tied embedding is written twice.
    checkpoint_bytes = counts["total"] * (weight_bytes + 12)
    if model_cfg.tie_embeddings:
        checkpoint_bytes += weight_bytes * vocab_size * d
    portable_bytes = counts["total"] * 12 if trainer.portable_checkpoint != "never" else 0
    # trainer.portable_checkpoint=final: only the save a run ends on carries the copy.
    periodic_portable_bytes = portable_bytes if trainer.portable_checkpoint == "always" else 0
    return {
        "world_size": world_size,
        "ep_size": ep,
        "tensor_parallel": tp,
        "data_parallel": data_parallel,
        "expert_data_parallel": expert_dp,
        "experts_per_rank": moe.num_experts // ep if counts["moe_layers"] else 0,
        "global_batch_sequences": b * trainer.grad_accum * data_parallel,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_dense_per_rank": dense,
        "params_expert_per_rank": local_expert,
        "memory_weights_optimizer_gib": (state_bytes(dense, data_parallel) + state_bytes(local_expert, expert_dp)) / GIB,
        "memory_activations_gib": activations / GIB,
        "all_to_all_gib_per_step": all_to_all / GIB,
        "checkpoint_gib_per_save": (checkpoint_bytes + periodic_portable_bytes) / GIB,
        "checkpoint_gib_final_save": (checkpoint_bytes + portable_bytes) / GIB,
        "precision": "bf16" if bf16 else "fp32",
        "zero_stage": zero,
    }


def _size(gib: float) -> str:
    """A memory or file size a reader can compare: MiB below 1 GiB (0.0 GiB says nothing)."""
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _count(n: float) -> str:
    """A parameter count at its own scale (0.000B says nothing)."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if round(n / scale, 1) >= 1:  # 999.96M prints as 1.0B, not 1000.0M
            return f"{n / scale:.2f}{unit}" if scale >= 1e9 else f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def print_plan(plan: dict) -> None:
    ep, world = plan["ep_size"], plan["world_size"]
    memory = plan["memory_weights_optimizer_gib"] + plan["memory_activations_gib"]
    tp = plan["tensor_parallel"]
    layout = f"tensor parallel {tp} x " if tp > 1 else ""
    print(f"dry run: {_plural(world, 'rank')}, {layout}expert parallel {ep} x expert-data parallel "
          f"{plan['expert_data_parallel']}, "
          f"ZeRO-{plan['zero_stage']}, {plan['precision']}, global batch {plan['global_batch_sequences']} sequences")
    print(f"model: {_count(plan['params_total'])} parameters, {_count(plan['params_active'])} active per token")
    groups = min(world // ep, 4)
    for g in range(groups):
        # Ranks of one tensor-parallel rank, taken ep at a time (DeepSpeed's layout).
        first = (g // tp) * ep * tp + g % tp
        ranks = list(range(first, first + ep * tp, tp))
        listed = f"{ranks[0]}-{ranks[-1]}" if tp == 1 else ", ".join(map(str, ranks))
        print(f"  expert-parallel group {g}: ranks {listed}" if ep > 1 else f"  rank {ranks[0]}")
    if world // ep > groups:
        print(f"  ... {world // ep} expert-parallel groups in all")
    if tp > 1:
        print(f"  tensor-parallel groups: ranks 0-{tp - 1}, {tp}-{2 * tp - 1}, ... (consecutive, megatron-core's layout)")
    e = plan["experts_per_rank"]
    if ep == 1:
        holding = f"each rank holds all {_plural(e, 'expert')} of every MoE layer"
    elif e == 1:
        holding = "expert-parallel rank r holds expert r of every MoE layer"
    else:
        holding = f"expert-parallel rank r holds the {e} experts r*{e} to r*{e}+{e - 1} of every MoE layer"
    print(f"per rank (every rank holds the same amounts; {holding}):")
    print(f"  parameters   dense {_count(plan['params_dense_per_rank'])}, expert {_count(plan['params_expert_per_rank'])}")
    print(f"  memory       {_size(plan['memory_weights_optimizer_gib'])} weights+grads+optimizer, "
          f"{_size(plan['memory_activations_gib'])} activations (estimate), {_size(memory)} in all")
    sent = plan["all_to_all_gib_per_step"]
    print(f"  all-to-all   {_size(sent) if sent else 'nothing'} sent per optimizer step")
    per_save, final_save = plan["checkpoint_gib_per_save"], plan["checkpoint_gib_final_save"]
    last = f", {_size(final_save)} the save a run ends on (with the layout-free copy)" if final_save != per_save else ""
    print(f"checkpoint: {_size(per_save)} per save{last}, all ranks together "
          "(trainer.keep_checkpoints bounds how many stay, not those a resume sets aside)")


def check_fits(plan: dict, device_gib: float | None) -> None:
    if device_gib is not None and plan["memory_weights_optimizer_gib"] + plan["memory_activations_gib"] > device_gib:
        total = plan["memory_weights_optimizer_gib"] + plan["memory_activations_gib"]
        raise ConfigError(
            f"the plan needs about {total:.1f} GiB per rank, more than dry_run_device_gib={device_gib:g}: "
            "raise moe.ep_size or world_size, or lower trainer.micro_batch_size"
        )


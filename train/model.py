"""A GPT decoder: pre-norm RMSNorm, rotary positions, causal SDPA, SwiGLU FFN or MoE FFN.

Legend: B batch, S sequence, D model dim, H heads, V vocabulary.
Readable in one sitting on purpose (nanoGPT): every block is a few lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from deepspeed.moe.layer import MoE
from torch import nn
from torch.nn import functional as F

from moe import MoEAux, MoEConfig, MoELayer, SwiGLUExpert
from moe.expert_choice import choice_group_size, group_capacity
from moe.experts import default_out_std
from moe.stock import StockDeepSpeedMoE
from train.activation_checkpointing import checkpointed_block

if TYPE_CHECKING:
    from train.kv_cache import KVCache, LayerKVCache


@dataclass
class ModelConfig:
    """Shape of the GPT decoder (the `model` config group)."""

    seq_len: int = 256
    """Context length in tokens."""
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    ffn_hidden: int = 704
    """Hidden size of the dense SwiGLU FFN (and of each expert unless moe.expert_hidden is set)."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (GPT-2 style)."""
    init_std: float = 0.02
    tensor_parallel: int = 1
    """Ranks that split attention heads and dense-FFN units (megatron-core layers, train/tensor_parallel.py).
    Experts are spread over moe.ep_size ranks, and each expert's hidden units over these ranks too
    (moe/expert_sharding.py); the world size must be a multiple of tensor_parallel * ep_size."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        if self.tensor_parallel < 1 or self.num_heads % self.tensor_parallel or self.ffn_hidden % self.tensor_parallel:
            raise ValueError(
                f"model.tensor_parallel={self.tensor_parallel} must be >= 1 and divide model.num_heads={self.num_heads} "
                f"and model.ffn_hidden={self.ffn_hidden}"
            )
        if (self.hidden_size // self.num_heads) % 2 != 0:
            raise ValueError("model.hidden_size / model.num_heads must be even (rotary embeddings rotate pairs)")
        # NaN fails every comparison, so `not value > 0` refuses it too.
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"model.{name} must be a positive finite number, got {value}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares underflows/overflows easily in bf16.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHSd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of channels by the position's angle (RoFormer)."""
    x1, x2 = x_BHSd[..., 0::2].float(), x_BHSd[..., 1::2].float()
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x_BHSd.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        """Heads on this rank: all of them, or a tensor-parallel share (train/tensor_parallel.py)."""
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """`cache` (generation only): keys and values of earlier positions; this call's are appended
        and the queries attend to all of them (train/kv_cache.py)."""
        batch, seq, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = cache.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = ffn

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache | None = None
    ) -> tuple[torch.Tensor, MoEAux | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(h)
            return x + y, aux
        return x + self.ffn(h), None


@dataclass
class GPTOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    """Sum of every MoE layer's weighted auxiliary losses (0 for a dense model)."""
    moe_aux: list[MoEAux]
    """Per MoE layer, in depth order."""


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """Embedding rows rounded up to a multiple of 64: faster matmuls; the unused rows are harmless."""
    return -(-tokenizer_vocab // 64) * 64


def experts_per_token(moe: MoEConfig, routing_group: int | None = None) -> float:
    """Average experts a token runs through: K for token choice; for expert choice E * C / S, the
    capacity C each expert fills from a group of S = `routing_group` tokens: the capacity factor,
    unless moe.min_capacity (or rounding up) gives more. Without the group size, the capacity factor."""
    if moe.router == "token_choice":
        return moe.top_k
    if routing_group is None:
        return float(moe.capacity_factor)
    capacity = group_capacity(routing_group, moe.num_experts, moe.capacity_factor, moe.min_capacity)
    return moe.num_experts * capacity / routing_group


def expert_choice_group(moe: MoEConfig, micro_batch_size: int, seq_len: int) -> int:
    """Tokens an expert chooses from in training: from a rank's micro-batch, as the layer groups them."""
    return choice_group_size(moe.ec_group, micro_batch_size * seq_len, seq_len)


def expert_choice_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.config.router == "expert_choice"]


def is_moe_block(block_index: int, moe: MoEConfig) -> bool:
    """Blocks every-1, 2*every-1, ... carry an MoE FFN (all of them for every=1)."""
    return moe.every > 0 and (block_index + 1) % moe.every == 0


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.moe_config = moe
        out_std = default_out_std(cfg.init_std, cfg.num_layers)
        expert_hidden = moe.expert_hidden or cfg.ffn_hidden
        blocks = []
        for i in range(cfg.num_layers):
            if is_moe_block(i, moe):
                common = dict(layer_index=i, seed=seed, init_std=cfg.init_std, out_std=out_std)
                if moe.implementation == "deepspeed":
                    ffn: nn.Module = StockDeepSpeedMoE(cfg.hidden_size, expert_hidden, moe, **common)
                else:
                    ffn = MoELayer(cfg.hidden_size, expert_hidden, moe, tensor_parallel_size=cfg.tensor_parallel, **common)
            else:
                ffn = SwiGLUExpert(cfg.hidden_size, cfg.ffn_hidden)
                ffn.init_weights(cfg.init_std, out_std)
            blocks.append(Block(cfg, ffn))
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=cfg.init_std)
            nn.init.normal_(block.attn.proj.weight, std=out_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        # Rotary tables stay fp32 in a plain attribute, not a buffer: DeepSpeed casts buffers to
        # bf16 along with the weights, which would round the angles of late positions.
        self._rotary_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.checkpoint_blocks = False
        """Recompute every block's activations in the backward pass (train/activation_checkpointing.py)."""

    def rotary(self, seq: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Angles of positions start .. start + seq - 1."""
        if device not in self._rotary_cache:
            cos, sin = rotary_tables(self.cfg.seq_len, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rope_theta)
            self._rotary_cache[device] = (cos.to(device), sin.to(device))
        cos, sin = self._rotary_cache[device]
        return cos[start : start + seq], sin[start : start + seq]

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> GPTOutput:
        """Logits of every position. With a `cache` (generation), `tokens_BS` continue the tokens the
        cache already holds: their positions start at `cache.length`, and the cache grows by them."""
        seq = tokens_BS.shape[1]
        start = 0 if cache is None else cache.length
        if start + seq > self.cfg.seq_len:
            raise ValueError(f"input has {start + seq} tokens, more than model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rotary(seq, tokens_BS.device, start)
        x = self.embed(tokens_BS)
        moe_aux: list[MoEAux] = []
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if recompute:
                x, aux = checkpointed_block(block, x, cos, sin)
            else:
                x, aux = block(x, cos, sin) if cache is None else block(x, cos, sin, cache.layer(index))
            if aux is not None:
                moe_aux.append(aux)
        if cache is not None:
            cache.advance(seq)
        logits = self.lm_head(self.norm(x))
        aux_loss = sum((a.loss for a in moe_aux), start=logits.new_zeros((), dtype=torch.float32))
        return GPTOutput(logits, aux_loss, moe_aux)

    def parameter_counts(self, routing_group: int | None = None) -> dict[str, int]:
        """Total and active (per token) parameters across all ranks, for FLOPs and reports.

        Active counts K of E experts per MoE layer (expert choice: the experts a token runs through on
        average, `experts_per_token` for groups of `routing_group` tokens); embeddings are excluded from
        the FLOPs count (a lookup, not a matmul) but the tied output projection is included.
        """
        def whole(p: torch.Tensor) -> int:
            # Once sharded (train/tensor_parallel.py), a rank holds 1/tp of each split weight.
            return p.numel() * (self.cfg.tensor_parallel if getattr(p, "tensor_model_parallel", False) else 1)

        expert_per_layer = 0
        total_experts = 0
        active_experts = 0
        num_moe_layers = 0
        for module in self.modules():
            if isinstance(module, MoE):
                num_moe_layers += 1
                one_expert = sum(whole(p) for p in module.deepspeed_moe.experts.deepspeed_experts[0].parameters())
                expert_per_layer = one_expert
                total_experts += one_expert * module.num_experts
                active_experts += round(one_expert * experts_per_token(module.config, routing_group))
        local_expert_params = sum(
            whole(p) for m in self.modules() if isinstance(m, MoE) for p in m.deepspeed_moe.experts.parameters()
        )
        dense = sum(whole(p) for p in self.parameters()) - local_expert_params
        embedding = self.embed.weight.numel()
        matmul_dense = dense - embedding + (embedding if self.cfg.tie_embeddings else 0)
        return {
            "total": dense + total_experts,
            "active": dense + active_experts,
            "active_matmul": matmul_dense + active_experts,
            "expert_one": expert_per_layer,
            "moe_layers": num_moe_layers,
        }

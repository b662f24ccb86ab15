"""Tensor parallelism with megatron-core: attention and the dense FFN split over a tensor-parallel group.

The model is always built whole (the same weights as at TP=1, whatever the layout) and then
sharded in place: each rank keeps its heads of the fused qkv projection and its slice of the
FFN hidden units, in megatron-core's `ColumnParallelLinear` / `RowParallelLinear` (which bring
the forward all-reduce and the backward gradient all-reduce). Parameter names do not change,
so a TP=2 state dict is the TP=1 one cut along `partition_dim`.

Experts: every routed expert's hidden units are split the same way inside the MoE layer
(moe/expert_sharding.py: expert tensor parallelism), since the tensor-parallel ranks hold the
same tokens; DeepSpeed builds the expert-parallel groups among ranks of one tensor-parallel rank
(its layout when given an mpu and `enable_expert_tensor_parallelism`), so ep and tp compose.
Embeddings, norms, the output projection and routers are whole on every tensor-parallel rank and
see identical inputs, so their gradients are identical there; DeepSpeed counts them once in the
gradient norm (split weights are marked `tensor_model_parallel`; the others are added only on
tensor-parallel rank 0).

Rank order is megatron-core's: tensor-parallel ranks are consecutive ([0, 1], [2, 3], ...), and
the data-parallel rank of global rank r is r // tp.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moe import MoELayer
from train import tp_layout
from train.model import CausalSelfAttention

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns at import that Apex / Transformer Engine are absent
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes


def initialize(tensor_parallel: int) -> None:
    """megatron-core's parallel_state over the already-initialised default process group."""
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)


class MegatronMPU:
    """The `mpu` DeepSpeed expects, over megatron-core's parallel_state.

    DeepSpeed asks for get_model_parallel_* and get_data_parallel_*; megatron-core names the
    first ones get_tensor_model_parallel_*. Both names are provided (DeepSpeed's backward-
    compatible helpers look for either)."""

    def __init__(self) -> None:
        self._state = parallel_state

    def get_model_parallel_rank(self) -> int:
        return self._state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._state.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self._state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._state.get_data_parallel_group()


class _OutputAlone:
    """Returns the output alone, as the nn.Linear it replaces does (megatron's layers return
    (output, bias))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class ColumnParallel(_OutputAlone, ColumnParallelLinear):
    """Output features split over the tensor-parallel ranks."""


class RowParallel(_OutputAlone, RowParallelLinear):
    """Input features split; the partial outputs are all-reduced over the tensor-parallel group."""


def _megatron_config() -> ModelParallelConfig:
    # CPU initialisation and none of megatron's own: the weights are copied in from the whole
    # model right after construction.
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
    )


def _parallel_linear(linear: nn.Linear, shard: torch.Tensor, kind: str) -> ColumnParallel | RowParallel:
    """The megatron-core layer that replaces the whole `linear`, holding `shard`, this rank's part
    of its [out, in] weight, cut as train/tp_layout.py's split kind `kind` says."""
    if kind == "columns":
        # Input columns split: RowParallelLinear, fed the split output of the layer before it.
        layer_class, split_dim, own_args = RowParallel, 1, {"input_is_parallel": True}
    else:
        # Output rows split ('rows', and 'qkv' whose heads are groups of rows): ColumnParallelLinear,
        # its output left split for the row-parallel layer after it.
        layer_class, split_dim, own_args = ColumnParallel, 0, {"gather_output": False}
    # Both take the whole layer's sizes (input_size, output_size); each rank allocates its part.
    layer = layer_class(linear.in_features, linear.out_features, config=_megatron_config(),
                        init_method=nn.init.zeros_, bias=False, skip_bias_add=False, **own_args)
    with torch.no_grad():
        layer.weight.copy_(shard)
    # megatron marks split weights only inside its own initialisation, which is skipped here;
    # DeepSpeed's gradient norm needs the mark to count each shard (and replicated weights once).
    set_tensor_model_parallel_attributes(layer.weight, is_parallel=True, dim=split_dim, stride=1)
    return layer


def shard_model(model: nn.Module, tp_rank: int, tp_size: int) -> None:
    """Replace the split weights' linears (train/tp_layout.py says which) by megatron-core's
    parallel layers holding this rank's shard; the attention then runs its share of the heads."""
    num_heads = model.cfg.num_heads
    group = parallel_state.get_tensor_model_parallel_group()
    for name, module in list(model.named_modules()):
        if isinstance(module, MoELayer):
            module.shard_experts_for_tensor_parallel(group, tp_rank, tp_size)
        if name.endswith("deepspeed_experts") or ".deepspeed_experts." in name:
            continue  # routed experts: stacked per forward by the MoE layer, sharded above
        for child_name, child in list(module.named_children()):
            weight_name = f"{name}.{child_name}.weight" if name else f"{child_name}.weight"
            kind = tp_layout.split_kind(weight_name)
            if kind is None or not isinstance(child, nn.Linear):
                continue
            piece = tp_layout.shard(weight_name, child.weight.detach(), tp_rank, tp_size, num_heads)
            setattr(module, child_name, _parallel_linear(child, piece, kind))
        if isinstance(module, CausalSelfAttention):
            module.num_heads = num_heads // tp_size

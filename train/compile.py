"""`trainer.compile=true`: torch.compile every block's parts in place, the MoE layers included.

Compiled:
- the attention sub-block (QKV projection, rotary embedding, SDPA, output projection), the RMSNorms
  and dense FFNs, where inductor fuses the elementwise work around the matmuls (rotary,
  normalisation, SiLU x gate);
- our MoE layers (`trainer.compile_moe_layers`, on by default), from the stacked expert weights on:
  the router's softmax, top-k and losses, the slot assignment and sort, the SiLU x gate between the
  grouped GEMMs and the weighted combine (`MoELayer.compile_forward`). Nothing there waits for the
  device at one expert-parallel rank, so on a GPU in bf16 each layer is one graph; collectives and
  the host-sized all-to-all-v of dropless routing across ranks stay eager, dynamo breaking the graph
  around them.

Not compiled: stock DeepSpeed MoE layers (`moe.implementation=deepspeed`), whose gate reads values to
the host; our MoE layers whose experts are split by tensor parallelism, whose collectives sit inside
autograd functions. Attention and dense FFNs split by tensor parallelism (megatron-core's parallel
layers) are compiled, and follow the eager run (tests/distributed/test_tensor_parallel.py).

`nn.Module.compile()` keeps the module and its parameter names, so DeepSpeed, checkpoints and
tensor parallelism see the same model; the first steps are slower while inductor compiles.
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE

from moe import MoELayer
from train.model import GPT


def compile_model(model: GPT, moe_layers: bool = True) -> list[str]:
    """Compile the parts of `model` in place (the MoE layers of ours too, when `moe_layers`);
    returns their names (for the log)."""
    compiled: list[str] = []
    for index, block in enumerate(model.blocks):
        parts = {"attn_norm": block.attn_norm, "attn": block.attn, "ffn_norm": block.ffn_norm}
        if not isinstance(block.ffn, MoE):
            parts["ffn"] = block.ffn
        for name, module in parts.items():
            module.compile()
            compiled.append(f"blocks.{index}.{name}")
        if moe_layers and isinstance(block.ffn, MoELayer) and block.ffn.tensor_parallel_group is None:
            block.ffn.compile_forward()
            compiled.append(f"blocks.{index}.ffn")
    model.norm.compile()
    compiled.append("norm")
    return compiled

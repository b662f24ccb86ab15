"""`trainer.compile=true`: torch.compile the dense parts of every block, in place.

Compiled: the attention sub-block (QKV projection, rotary embedding, SDPA, output projection), the
RMSNorms and dense FFNs, where inductor fuses the elementwise work around the matmuls (rotary,
normalisation, SiLU x gate). Not compiled: the MoE layers, whose routing has data-dependent shapes
(a sort, counts read on the host for the all-to-all-v) that would break the graph every call, and
whose expert-parallel collectives belong to DeepSpeed.

`nn.Module.compile()` keeps the module and its parameter names, so DeepSpeed, checkpoints and
tensor parallelism see the same model; the first steps are slower while inductor compiles.
"""

from __future__ import annotations

from deepspeed.moe.layer import MoE

from train.model import GPT


def compile_dense_parts(model: GPT) -> list[str]:
    """Compile the dense submodules of `model` in place; returns their names (for the log)."""
    compiled: list[str] = []
    for index, block in enumerate(model.blocks):
        parts = {"attn_norm": block.attn_norm, "attn": block.attn, "ffn_norm": block.ffn_norm}
        if not isinstance(block.ffn, MoE):
            parts["ffn"] = block.ffn
        for name, module in parts.items():
            module.compile()
            compiled.append(f"blocks.{index}.{name}")
    model.norm.compile()
    compiled.append("norm")
    return compiled


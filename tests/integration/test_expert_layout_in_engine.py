"""Inside the DeepSpeed engine (ZeRO-1 and -2), every MoE layer's expert weights sit evenly apart in
ZeRO's flat buffer, so stacking them each forward is a view, not a copy (moe/expert_storage.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from moe.expert_storage import evenly_spaced
from moe.grouped_experts import stack_expert_weights
from moe.layer import MoELayer
from train.config import to_run_config
from train.distributed import init_world
from train.loop import build_trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_engine_lays_experts_out_for_a_copy_free_stack(compose_run, zero_stage):
    run = to_run_config(compose_run([
        "model=gpt_tiny", f"deepspeed.zero_stage={zero_stage}", "logging.progress_bar=false",
        f"data.cache_dir={ROOT / '.cache' / 'data'}",
    ]))  # fmt: skip
    world = init_world(run.trainer.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(run, world, lambda: Path(tmp))
        layers = [m for m in trainer.model.modules() if isinstance(m, MoELayer)]
        assert layers
        for layer in layers:
            experts = layer.local_experts
            expert_numel = sum(p.numel() for p in experts[0].parameters())
            for name in ("w1", "w3", "w2"):
                assert evenly_spaced([getattr(e, name).weight for e in experts]) == expert_numel
            w1_eDF, _, _ = stack_expert_weights(experts)
            assert w1_eDF.data_ptr() == experts[0].w1.weight.data_ptr()
        trainer.train_step(0)  # and a step runs through it

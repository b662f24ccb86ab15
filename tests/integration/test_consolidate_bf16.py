"""Consolidating a bf16 run writes ZeRO's fp32 master weights, not the bf16 module weights, and
loading its run directory gives the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bf16_run_consolidates_to_its_fp32_masters(compose_run, tmp_path):
    from safetensors.torch import load_file

    from train.consolidate import consolidate

    run_dir = tmp_path / "run"
    train(compose_run([
        "model=gpt_tiny", "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
        "trainer.eval_batches=1", "logging.progress_bar=false", "logging.plots=off", "deepspeed.precision=bf16",
        "deepspeed.warmup_steps=1", "deepspeed.lr=1e-3", f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}",
    ]))  # fmt: skip
    out = tmp_path / "model.safetensors"
    header = consolidate(run_dir, out, with_tokenizer=False)
    assert header["weights"] == "fp32 master weights"
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "fp32 master weights"

    written = load_file(str(out))
    tag = run_dir / "checkpoints" / "step_00000004" / "portable"
    masters = {}
    for file in tag.glob("rank_*.pt"):
        masters.update(torch.load(file, weights_only=True))
    assert masters and set(masters) <= set(written) | {"lm_head.weight"}
    for name, saved in masters.items():
        if name in written:
            assert written[name].dtype == torch.float32 and torch.equal(written[name], saved["fp32"]), name
    # The masters carry precision the bf16 module weights do not: the file is not a bf16 cast.
    expert = "blocks.0.ffn.deepspeed_moe.experts.deepspeed_experts.3.w1.weight"
    assert not torch.equal(written[expert], written[expert].bfloat16().float())

    # Eval, generate and export read the run directory as the same model as its consolidated file.
    from train.load import load_model

    for source in (run_dir, out):
        loaded = load_model(source)
        assert loaded.weights == "fp32 master weights"
        state = loaded.model.state_dict()
        for name, tensor in written.items():
            assert torch.equal(state[name], tensor), (source, name)
        assert torch.equal(state["lm_head.weight"], state["embed.weight"])  # tied: one master for both

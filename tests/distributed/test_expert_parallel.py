"""Expert parallelism on 2 CPU processes (gloo): the layer against an oracle, and the real
DeepSpeed launcher + engine (ZeRO-2) training with ep_size=2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed.processes import ROOT, deepspeed_launch, launch_ranks

pytestmark = pytest.mark.distributed


ORACLE_CASES = [
    ("none", 2, "token_choice", "float64"),  # dropless: all-to-all-v
    ("1.0", 2, "token_choice", "float64"),  # capacity: fixed-shape all-to-all, some drops; filled slots only
    ("1.0", 2, "token_choice", "float32"),  # the same through torch._grouped_mm (float64 takes the loop)
    ("0.5", 1, "token_choice", "float64"),
    ("2.0", 2, "expert_choice", "float64"),  # fixed-shape all-to-all, index_add combine
    ("2.0", 2, "expert_choice_causal", "float64"),  # thresholds: all-to-all-v
]


@pytest.fixture(scope="module")
def oracle_outputs() -> list[str]:
    """Both ranks' output of every case, run in one launch (each case on fresh layers)."""
    worker = ROOT / "tests" / "distributed" / "expert_parallel_worker.py"
    cases = [":".join(map(str, case)) for case in ORACLE_CASES]
    return launch_ranks(2, [sys.executable, str(worker), *cases], timeout=300)


@pytest.mark.parametrize("capacity_factor, top_k, router, dtype", ORACLE_CASES)
def test_ep2_layer_equals_single_process_oracle(oracle_outputs, capacity_factor, top_k, router, dtype):
    for rank, out in enumerate(oracle_outputs):
        assert f"rank {rank}: ok {capacity_factor}:{top_k}:{router}:{dtype}\n" in out, out


def test_deepspeed_launcher_trains_with_ep2_zero2(tmp_path):
    run_dir = tmp_path / "run"
    deepspeed_launch(2, tmp_path, [
        "model=gpt_tiny", "moe.ep_size=2", "deepspeed=zero2", "trainer.max_steps=4", "trainer.micro_batch_size=4",
        "trainer.checkpoint_every=2", "trainer.eval_every=2", "trainer.eval_batches=2", "logging.log_every=1",
        "logging.progress_bar=false", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ])  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 2 * 4 * 32
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train_records)

    # One checkpoint file per (layer, global expert): rank 0 wrote experts 0-3, rank 1 experts 4-7.
    tag = run_dir / "checkpoints" / "step_00000004"
    files = sorted(tag.glob("layer_0_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 8
    first_weights = []
    for expert in (0, 4):
        state = torch.load(tag / f"layer_0_expert_{expert}_mp_rank_00_model_states.pt", weights_only=False)
        (key,) = [k for k in state if k.endswith(f"deepspeed_experts.{expert}.w1.weight")]
        first_weights.append(state[key])
    assert not torch.equal(*first_weights), "experts on the two ranks must not start (or end) identical"


def _train_two_ranks(cwd: Path, overrides: list[str]) -> None:
    """`python -m train` on 2 gloo ranks, as the launcher starts them (the launcher itself: the test above),
    without plots, which rank 0 would draw while the other waits."""
    launch_ranks(2, [sys.executable, "-m", "train", *overrides, "logging.plots=off"], cwd=cwd)


def test_ep2_checkpoint_loads_at_ep1_with_identical_weights(tmp_path, compose_run):
    """Weights saved by 2 ranks at ep_size=2 load into 1 rank at ep_size=1 (DeepSpeed's per-expert
    files are renumbered from global ids). With optimizer state: test_layout_resume.py."""
    from train.config import to_run_config
    from train.distributed import init_world
    from train.engine import build_engine
    from train.model import GPT

    run_dir = tmp_path / "run"
    common = ["model=gpt_tiny", "trainer.micro_batch_size=4", f"data.cache_dir={ROOT / '.cache' / 'data'}"]
    _train_two_ranks(tmp_path, [*common, "moe.ep_size=2", "trainer.max_steps=2", "trainer.eval_every=0",
                                 "logging.progress_bar=false", f"trainer.run_dir={run_dir}"])

    run = to_run_config(compose_run([*common, "moe.ep_size=1"]))
    world = init_world("cpu")
    torch.manual_seed(123)  # different from the run's seed: every loaded weight must come from the files
    model = GPT(run.model, run.moe, vocab_size=4096, seed=123)
    engine, _ = build_engine(model, run, world.device)
    engine.load_checkpoint(str(run_dir / "checkpoints"), tag="step_00000002", load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    tag = run_dir / "checkpoints" / "step_00000002"
    for layer_index, block_index in enumerate(i for i, b in enumerate(model.blocks) if hasattr(b.ffn, "local_experts")):
        experts = model.blocks[block_index].ffn.local_experts
        for expert in range(8):
            state = torch.load(tag / f"layer_{layer_index}_expert_{expert}_mp_rank_00_model_states.pt", weights_only=False)
            (key,) = [k for k in state if k.endswith(f"deepspeed_experts.{expert}.w2.weight")]
            assert torch.equal(experts[expert].w2.weight.detach(), state[key])
    dense = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.equal(model.embed.weight.detach(), dense["embed.weight"])


@pytest.mark.parametrize("eval_batches", [2, 3])
def test_consolidate_ep2_checkpoint_equals_the_model_loaded_at_ep1(tmp_path, compose_run, eval_batches):
    """moe-consolidate reads a checkpoint written by 2 ranks at ep_size=2 (without DeepSpeed's engine)
    and writes the very weights DeepSpeed's own loader puts into the same model at ep_size=1; the
    file then evaluates, in one process, to the run's own final validation loss, which the 2 ranks
    computed sharing the batches out (3: the third, which does not fill a round, computed by both
    and counted once), in capacity mode (eval_capacity_factor 2.0)."""
    from safetensors.torch import load_file

    from train.config import to_run_config
    from train.consolidate import consolidate
    from train.distributed import init_world
    from train.engine import build_engine
    from train.evaluate import mean_token_loss, validation_windows
    from train.load import load_model
    from train.model import GPT

    run_dir = tmp_path / "run"
    common = ["model=gpt_tiny", "moe=top2_shared", "moe.eval_capacity_factor=2.0", "trainer.micro_batch_size=4",
              f"trainer.eval_batches={eval_batches}",
              f"data.cache_dir={ROOT / '.cache' / 'data'}"]
    _train_two_ranks(tmp_path, [*common, "moe.ep_size=2", "trainer.max_steps=2", "trainer.eval_every=0",
                                 "logging.progress_bar=false", f"trainer.run_dir={run_dir}"])
    out = tmp_path / "whole.safetensors"
    header = consolidate(run_dir, out)
    assert header["moe"]["ep_size"] == 1 and header["step"] == 2
    consolidated = load_file(str(out))

    run = to_run_config(compose_run([*common, "moe.ep_size=1"]))
    world = init_world("cpu")
    torch.manual_seed(123)  # different from the run's seed: every compared weight must come from the files
    model = GPT(run.model, run.moe, vocab_size=4096, seed=123)
    engine, _ = build_engine(model, run, world.device)
    engine.load_checkpoint(str(run_dir / "checkpoints"), tag="step_00000002", load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)
    expected = model.state_dict()
    assert set(consolidated) == set(expected) - {"lm_head.weight"}  # tied: stored once, as embed.weight
    assert any(".deepspeed_experts.7." in key for key in consolidated) and any("shared_mlp" in key for key in consolidated)
    for key, value in consolidated.items():
        assert torch.equal(value, expected[key].detach().float()), key

    loaded = load_model(out)
    windows = validation_windows(loaded.validation_data_dir(), run.model.seq_len, eval_batches * 4)
    loss, _ = mean_token_loss(loaded.model, [np.stack(windows[i:i + 4]) for i in range(0, eval_batches * 4, 4)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert loss == pytest.approx(summary["final_val_loss"], rel=1e-6)

"""logging=wandb for real: a 2-rank run (DeepSpeed launcher, ep_size=2) logs offline, and wandb's own
reader (`wandb leet inspect --json`) must give back every number of metrics.jsonl under the
documented key (docs/dashboard.md), from one W&B run only (rank 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import free_port, subprocess_env

from train.wandb_dashboard import build_workspace, dashboard_spec

ROOT = Path(__file__).resolve().parents[2]
WANDB_CLI = Path(sys.executable).parent / "wandb"
pytestmark = pytest.mark.slow


def _expected_keys(record: dict) -> dict[str, float]:
    """The mapping of docs/dashboard.md, written out independently of train/wandb_sink.py."""
    expected = {}
    for field, value in record.items():
        if field in ("event", "step", "experts") or value is None:
            continue
        expected[f"{record['event']}/{field}"] = value
    for layer, figures in record.get("experts", {}).items():
        for name, value in figures.items():
            if isinstance(value, list):
                width = len(str(len(value) - 1))
                expected.update({f"experts/{layer}/{name}/{i:0{width}d}": v for i, v in enumerate(value)})
            else:
                expected[f"experts/{layer}/{name}"] = value
    return expected


def _inspect(path: Path, *flags: str) -> str:
    result = subprocess.run([str(WANDB_CLI), "leet", "inspect", "--json", *flags, str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_offline_wandb_run_holds_every_metrics_value(tmp_path):
    run_dir, wandb_root = tmp_path / "run", tmp_path / "wandb_root"
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank",
        "--master_port", str(free_port()), "--module", "train",
        "model=gpt_tiny", "moe.ep_size=2", "logging=wandb", "logging.plots=eval", "logging.log_every=2",
        "logging.progress_bar=false", "trainer.max_steps=6", "trainer.micro_batch_size=4", "trainer.eval_every=3",
        "trainer.eval_batches=2", "trainer.checkpoint_every=0", f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}",
    ]
    env = subprocess_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                         WANDB_MODE="offline", WANDB_DIR=str(wandb_root), WANDB_API_KEY="")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    offline_runs = list((wandb_root / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, f"exactly one W&B run (rank 0 only), found {offline_runs}"
    assert "wandb       offline run" in result.stdout

    history: dict[int, dict] = defaultdict(dict)  # W&B rows by step; a step's train and eval share one row
    for line in _inspect(offline_runs[0]).splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            item = record["history"]["item"]
            history[int(item["_step"])].update(item)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 2), ("eval", 3), ("train", 4), ("train", 6), ("eval", 6)]
    expected_by_step: dict[int, dict] = defaultdict(dict)
    for record in records:
        expected_by_step[record["step"]].update(_expected_keys(record))
    # Per layer routed, kept, load (8 each), experts per token (0..8) and 6 scalars; the train figures.
    assert sum(key.startswith("experts/") for key in expected_by_step[2]) == 2 * (3 * 8 + 9 + 6)
    assert {f"train/{k}" for k in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens")} <= set(
        expected_by_step[2])
    assert sorted(history) == sorted(expected_by_step)
    for step, expected in expected_by_step.items():
        logged = {k: v for k, v in history[step].items() if not k.startswith(("_", "plots/"))}
        assert logged == expected, f"step {step}: W&B and metrics.jsonl differ"

    # The PNG heatmaps went to W&B as images at each evaluation after training started.
    for step in (3, 6):
        for layer in (0, 1):
            assert history[step][f"plots/expert_load_moe_layer_{layer}._type"] == "image-file"
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "expert_load_moe_layer_0.png", "expert_load_moe_layer_1.png"]

    # summary.json -> the run summary under run/<key>, nested keys joined with "/".
    inspected = json.loads(_inspect(offline_runs[0], "--summary"))
    assert inspected["state"] == "finished" and inspected["config"]["moe"]["ep_size"] == 2
    summary_json = json.loads((run_dir / "summary.json").read_text())
    expected_summary = {f"run/{k}": v for k, v in summary_json.items() if not isinstance(v, dict)}
    expected_summary.update({f"run/parameters/{k}": v for k, v in summary_json["parameters"].items()})
    for layer, figures in summary_json["experts"].items():
        expected_summary.update({f"run/experts/{layer}/{k}": v for k, v in figures.items() if not isinstance(v, list)})
        expected_summary.update({f"run/experts/{layer}/load/{i}": v for i, v in enumerate(figures["load"])})
    missing_or_different = {k: v for k, v in expected_summary.items() if inspected["summary"].get(k) != v}
    assert not missing_or_different

    # The shipped dashboard names only keys this run logged (expert choice's keys aside) and
    # covers every scalar expert figure; the workspace builds (saving it needs the network).
    spec = dashboard_spec(["moe_layer_0", "moe_layer_1"], 8)
    named = {key for s in spec["sections"] for p in s["panels"] for key in p.get("y", [])}
    logged_keys = set().union(*(set(row) for row in history.values()))
    assert named - logged_keys == {"eval/val_loss_batch", "eval/val_loss_causal"}
    scalar_figures = {k for k in expected_by_step[2] if k.startswith("experts/") and k.count("/") == 2}
    assert scalar_figures <= named
    assert build_workspace(spec, "entity", "project").name == "MoE expert utilisation"

"""Short training runs at several parallel layouts (gloo processes on CPU), each run once per test
session and shared by the parity and layout-resume tests.

Every run trains gpt_tiny for STEPS steps on the same global batch of GLOBAL_BATCH sequences
(micro_batch_size x grad_accum x data-parallel ranks), fp32 on CPU, one metrics.jsonl line per
step, a checkpoint every CHECKPOINT_EVERY steps. The data of step s depends only on (seed, s) and
every rank slices the same global batch, so runs at different layouts see the same tokens.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from distributed.processes import ROOT, launch_ranks

STEPS, CHECKPOINT_EVERY, GLOBAL_BATCH = 6, 3, 8
GRAD_CLIP = 1.4
"""Between the gradient norms of these runs' steps (0.96 to 1.96): some steps are clipped, others
not. A wrong norm would then change the relative size of the updates, which Adam does not cancel
(it does cancel one constant factor on every step)."""
WEIGHT_TOLERANCE = 3e-5
"""On every weight after the runs' last step: absolute, 1% of one step's lr (3e-3). AdamW divides each
update by the gradient's own running scale, so for weights whose gradients are near zero (the embedding
rows of rare tokens) a rounding difference in the gradient moves the update by a part of lr from the
first step on: 1 x 8 against 8 x 1 micro-batches measured 1.3e-5 on one machine, in the tied embedding,
with losses within 5e-7. Inductor's fused kernels (compiled against eager) and a resume at another
layout round differently again. A real difference in the update (a wrong scale, a skipped or doubled
gradient) moves the gradient norm, checked to 1e-5, and the weights it touches by a sizeable part of lr."""
COMMON = [
    "model=gpt_tiny", f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={CHECKPOINT_EVERY}",
    "trainer.eval_every=0", "trainer.eval_batches=1", "logging.log_every=1", "logging.progress_bar=false",
    "deepspeed.precision=fp32", "deepspeed.warmup_steps=1", f"deepspeed.grad_clip={GRAD_CLIP}", "logging.plots=off",
    f"data.cache_dir={ROOT / '.cache' / 'data'}",
]
TOKEN_CHOICE = ["moe=top2_dropless", "moe.aux_loss_scope=global"]
"""Dropless top-2 with the split-invariant balancing loss (README, "Routing"): the per-micro-batch
form is a product of two batch means, so its value and gradient depend on how the batch is split."""
EXPERT_CHOICE = ["moe=expert_choice", "moe.ec_group=sequence"]
"""Expert choice over each sequence: with `ec_group: batch` an expert picks from each rank's
micro-batch, which depends on the split by definition."""


def launch(ranks: int, run_dir: Path, overrides: list[str], script: Path | None = None, timeout: float = 600) -> str:
    """`ranks` gloo processes of `python -m train <overrides>` (or of `script`) training into
    `run_dir` (see processes.launch_ranks). Returns every rank's output."""
    target = [str(script)] if script else ["-m", "train"]
    command = [sys.executable, *target, *COMMON, *overrides, f"trainer.run_dir={run_dir}"]
    return "\n".join(launch_ranks(ranks, command, cwd=run_dir.parent, timeout=timeout))


class _Runs:
    """Runs by name, each launched at its first request (a session-wide cache)."""

    def __init__(self) -> None:
        self._directory: Path | None = None
        self._done: dict[str, Path] = {}

    def get(self, name: str, ranks: int, overrides: list[str]) -> Path:
        if name not in self._done:
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="layout-runs-"))
                atexit.register(shutil.rmtree, self._directory, True)
            launch(ranks, self._directory / name, overrides)
            self._done[name] = self._directory / name
        return self._done[name]


RUNS = _Runs()


def layout(ranks: int, ep_size: int, micro_batch_size: int | None = None, grad_accum: int = 1) -> list[str]:
    """Overrides for `ranks` processes at `ep_size`, micro-batches sized so the global batch stays GLOBAL_BATCH."""
    micro = micro_batch_size or GLOBAL_BATCH // (ranks * grad_accum)
    assert micro * grad_accum * ranks == GLOBAL_BATCH
    return [f"moe.ep_size={ep_size}", f"trainer.micro_batch_size={micro}", f"trainer.grad_accum={grad_accum}"]


def token_choice_ep2() -> Path:
    """The reference 2-rank run at ep_size=2 (also the source of the layout-resume checkpoint)."""
    return RUNS.get("token_choice_ep2", 2, [*TOKEN_CHOICE, *layout(2, 2)])


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == "train"]


def saved_weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint by name, experts under their global index (DeepSpeed's own files)."""
    directory = run_dir / "checkpoints" / tag
    weights = dict(torch.load(directory / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for path in sorted(directory.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        weights.update(torch.load(path, weights_only=False))
    return weights


def max_differences(reference: list[dict], other: list[dict]) -> tuple[float, float]:
    """Largest |loss difference| and |grad-norm difference| over the steps of two runs."""
    assert [r["step"] for r in reference] == [r["step"] for r in other]
    loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(reference, other))
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(reference, other))
    return loss, norm

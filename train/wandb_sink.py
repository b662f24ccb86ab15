"""Weights & Biases sink: every metrics.jsonl record, under W&B keys that map 1:1 to its fields.

Mapping (docs/dashboard.md has the full table; `wandb_items` is the one place that applies it):
- W&B's step is the record's `step`; the record's `event` names the section.
- a number `f` at the top of a record -> `<event>/<f>` (`train/loss`, `train/lr`, `train/grad_norm`,
  `train/tokens_per_s`, `train/mfu`, `train/tokens`, `eval/val_loss`, `eval/val_ppl`, ...);
- expert figures `experts.<layer>.<figure>` -> `experts/<layer>/<figure>` (cv, max_violation,
  drop_fraction, dead_experts, router_entropy, no_expert_fraction), and each list entry
  `experts.<layer>.<figure>[i]` -> `experts/<layer>/<figure>/<i>` (load, routed, kept per expert;
  experts_per_token per count 0..E), `i` zero-padded to the width of the list's last index so that
  W&B sorts the experts in order;
- `null` (a non-finite grad norm or MFU) is not logged: the key is absent at that step;
- summary.json at the end -> the run summary under `run/<key>` (nested keys joined with `/`), so
  the whole-run expert figures do not overwrite the last window's values;
- the PNG heatmaps of train/plots.py -> images `plots/expert_load_<layer>` at each evaluation.

Only rank 0 creates one (train/sinks.py). `moe/` never imports wandb.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import wandb
from omegaconf import OmegaConf

from train.durable import write_text_atomically
from train.wandb_mode import ONLINE_MODES, falls_back_offline, resolve_mode

RUN_ID_FILE = "wandb_run_id"
"""In the run directory: a resumed run continues the same W&B run."""


def wandb_items(record: Mapping[str, Any]) -> dict[str, float]:
    """The W&B keys and values of one metrics.jsonl record (see the module docstring)."""
    event = record.get("event", "train")
    items: dict[str, float] = {}
    for key, value in record.items():
        if key in ("event", "step"):
            continue
        _flatten("experts" if key == "experts" else f"{event}/{key}", value, items)
    return items


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, int | float):
        out[prefix] = value
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(f"{prefix}/{key}", inner, out)
    elif isinstance(value, list | tuple):
        width = len(str(max(len(value) - 1, 0)))
        for index, inner in enumerate(value):
            _flatten(f"{prefix}/{index:0{width}d}", inner, out)


class WandbSink:
    """One W&B run per run directory (resumed runs continue it), fed by Trainer._log."""

    def __init__(self, run, run_dir: Path) -> None:
        settings = run.logging
        self.mode = resolve_mode(settings.wandb_mode)
        wandb_dir = Path(settings.wandb_dir or os.environ.get("WANDB_DIR") or run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        # A resume continues the run's W&B run. A run that starts over in its directory (auto_resume
        # after an attempt killed before its first checkpoint) gets a new one: W&B drops the steps
        # a resumed W&B run logs below its last, so the new attempt's would go missing there.
        resuming = run.trainer.resume and id_file.exists()
        run_id = (id_file.read_text(encoding="utf-8").strip() if resuming else "") or uuid.uuid4().hex[:12]
        def open_run(mode: str):
            return wandb.init(
                project=settings.wandb_project,
                entity=settings.wandb_entity,
                name=settings.wandb_run_name or str(run_dir),
                group=settings.wandb_group,
                tags=list(settings.wandb_tags) or None,
                config=OmegaConf.to_container(OmegaConf.structured(run), resolve=True),
                dir=str(wandb_dir),
                mode=mode,
                id=run_id,
                resume="allow",
                # quiet: no history/summary dump on the console at the end (metrics.jsonl has it all).
                settings=wandb.Settings(quiet=True),
            )

        try:
            self.run = open_run(self.mode)
        except (wandb.errors.CommError, TimeoutError, ConnectionError) as error:
            # The network, not the settings: a wrong entity or project still stops the run.
            if not falls_back_offline(settings.wandb_mode):
                raise
            first_line = (str(error).strip().splitlines() or [""])[0][:160]
            print(f"warning     W&B could not be reached ({type(error).__name__}: {first_line}); logging offline "
                  f"instead (upload later with wandb sync; logging.wandb_mode=online makes this an error)",
                  file=sys.stderr, flush=True)
            self.mode = "offline"
            self.run = open_run(self.mode)
        write_text_atomically(id_file, run_id)  # a kill mid-write must not leave an empty id
        # The expert view's best-of figures in the runs table.
        self.run.define_metric("eval/val_loss", summary="min")
        self.step = 0

    def write(self, record: dict[str, Any]) -> None:
        self.step = int(record.get("step", self.step))
        items = wandb_items(record)
        if items:
            self.run.log(items, step=self.step)

    def log_images(self, step: int, paths: list[Path]) -> None:
        """The PNG heatmaps (train/plots.py) as W&B images, at the evaluation step that drew them."""
        self.run.log({f"plots/{path.stem}": wandb.Image(str(path)) for path in paths}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        flat: dict[str, Any] = {}
        _flatten("run", {k: v for k, v in summary.items() if not isinstance(v, str)}, flat)
        flat.update({f"run/{k}": v for k, v in summary.items() if isinstance(v, str)})
        self.run.summary.update(flat)
        # quiet=True silenced W&B's own closing lines; say where the run went.
        if self.mode == "offline":
            local = Path(self.run.dir).parent
            print(f"wandb       offline run {local} (upload: wandb sync {local})", flush=True)
        elif self.mode in ONLINE_MODES:
            print(f"wandb       {self.run.url}", flush=True)
        self.run.finish()

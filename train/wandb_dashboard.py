"""The expert-utilisation dashboard: a W&B workspace built from a plain panel spec.

    python -m train.wandb_dashboard --entity E --project P --from-run runs/smoke/<stamp>   # save the workspace
    python -m train.wandb_dashboard --layers 4 --experts 8 --spec-only docs/dashboard.json # the spec, no network

The spec (sections of panels naming W&B keys, docs/dashboard.md) is data, so it can be checked
against what the W&B sink logs without a W&B account; `build_workspace` turns it into a
`wandb_workspaces` Workspace; saving it needs the network and an API key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TRAINING_PANELS = [
    {"title": "loss (train and validation)", "y": ["train/loss", "eval/val_loss"]},
    {"title": "balancing losses (aux + z)", "y": ["train/aux_loss"]},
    {"title": "learning rate", "y": ["train/lr"]},
    {"title": "gradient norm (before clipping)", "y": ["train/grad_norm"]},
    {"title": "tokens/s", "y": ["train/tokens_per_s"]},
    {"title": "MFU", "y": ["train/mfu"]},
    {"title": "validation perplexity", "y": ["eval/val_ppl"]},
    {"title": "expert choice: validation loss by routing mode", "y": ["eval/val_loss_batch", "eval/val_loss_causal"]},
]


def dashboard_spec(layers: list[str], num_experts: int) -> dict[str, Any]:
    """Sections of panels: one for training, one per MoE layer, one with every layer side by side."""
    width = len(str(num_experts - 1))
    sections = [{"name": "Training", "panels": [{"type": "line", **p} for p in TRAINING_PANELS]}]
    for layer in layers:
        key = f"experts/{layer}"
        sections.append({"name": f"Experts: {layer}", "panels": [
            # The heatmap over time, live: each band is one expert's share of the kept tokens.
            {"type": "line", "title": f"{layer}: share of kept tokens per expert", "plot_type": "pct-area",
             "y": [f"{key}/kept/{e:0{width}d}" for e in range(num_experts)]},
            {"type": "media", "title": f"{layer}: load heatmap (PNG from train/plots.py)",
             "media_keys": [f"plots/expert_load_{layer}"]},
            {"type": "line", "title": f"{layer}: imbalance (CV, max violation)", "y": [f"{key}/cv", f"{key}/max_violation"]},
            {"type": "line", "title": f"{layer}: dropped assignments and tokens with no expert",
             "y": [f"{key}/drop_fraction", f"{key}/no_expert_fraction"]},
            {"type": "line", "title": f"{layer}: dead experts", "y": [f"{key}/dead_experts"]},
            {"type": "line", "title": f"{layer}: router entropy (nats; ln E = undecided)", "y": [f"{key}/router_entropy"]},
            {"type": "line", "title": f"{layer}: experts per token (share of tokens with 0..E)", "plot_type": "pct-area",
             "y": [f"{key}/experts_per_token/{n:0{len(str(num_experts))}d}" for n in range(num_experts + 1)]},
            {"type": "line", "title": f"{layer}: routed (before dropping) per expert",
             "y": [f"{key}/routed/{e:0{width}d}" for e in range(num_experts)]},
        ]})
    sections.append({"name": "Experts: all layers", "panels": [
        {"type": "line", "title": f"all layers: {figure}", "y": [f"experts/{layer}/{figure}" for layer in layers]}
        for figure in ("drop_fraction", "cv", "max_violation", "dead_experts", "router_entropy", "no_expert_fraction")
    ]})
    return {"name": "MoE expert utilisation", "sections": sections}


def layers_of_run(run_dir: Path) -> tuple[list[str], int]:
    """MoE layer names and expert count from a run's first train record with expert figures."""
    from train.metrics import read_metrics
    from train.plots import layer_order

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"--from-run: {metrics} does not exist (expected a run directory holding metrics.jsonl)")
    for record in read_metrics(metrics):
        experts = record.get("experts") or {}
        if record.get("event") == "train" and experts:
            layers = layer_order(experts)
            return layers, len(experts[layers[0]]["load"])
    raise ValueError(f"--from-run: {metrics} has no train record with expert figures (a dense model?)")


def build_workspace(spec: dict[str, Any], entity: str, project: str):
    """The spec as a `wandb_workspaces` Workspace (built and type-checked locally, not yet saved)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(p: dict[str, Any]):
        if p["type"] == "media":
            return wr.MediaBrowser(title=p["title"], media_keys=p["media_keys"], mode="gallery", gallery_axis="step")
        return wr.LinePlot(title=p["title"], x="Step", y=p["y"], plot_type=p.get("plot_type", "line"))

    return ws.Workspace(
        entity=entity, project=project, name=spec["name"],
        sections=[ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=i < 2)
                  for i, s in enumerate(spec["sections"])],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.wandb_dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--entity", help="W&B team or user")
    parser.add_argument("--project", default="moe-gpt", help="W&B project (logging.wandb_project)")
    parser.add_argument("--from-run", type=Path, help="take the MoE layers and expert count from this run directory")
    parser.add_argument("--layers", type=int, help="number of MoE layers (without --from-run)")
    parser.add_argument("--experts", type=int, help="experts per layer (without --from-run)")
    parser.add_argument("--spec-only", type=Path, help="write the panel spec as JSON here and create nothing")
    args = parser.parse_args(argv)
    try:
        if args.from_run is not None:
            layers, num_experts = layers_of_run(args.from_run)
        elif args.layers and args.experts:
            layers, num_experts = [f"moe_layer_{i}" for i in range(args.layers)], args.experts
        else:
            raise ValueError("give --from-run RUN_DIR, or both --layers N and --experts E (positive)")
        if args.spec_only is None and not args.entity:
            raise ValueError("--entity is needed to save a workspace (or --spec-only FILE to write the spec)")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spec = dashboard_spec(layers, num_experts)
    if args.spec_only is not None:
        args.spec_only.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        print(f"{args.spec_only}: {sum(len(s['panels']) for s in spec['sections'])} panels in {len(spec['sections'])} sections")
        return 0
    workspace = build_workspace(spec, args.entity, args.project)
    workspace.save()  # needs the network and an API key (WANDB_API_KEY or `wandb login`)
    print(workspace.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

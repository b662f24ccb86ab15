"""Routing comparison: the same model and token budget under each routing scheme.

    python -m bench.routing_compare [--steps N] [--json PATH] [extra hydra overrides ...]

Each variant is a separate `python -m train experiment=smoke ...` process (a fresh DeepSpeed
engine each time) with the same seed, data order, steps and batch, so the runs differ only in
routing. Expert figures are over the whole run, averaged over MoE layers: drop % (assignments
that found no capacity), CV of the per-expert load, max violation (max load / mean - 1).
Expert choice is evaluated both batch-wise (as trained; peeks at later tokens) and causally
(per-expert thresholds; what generation can use). The dense baseline has the FFN width of two
experts, so its active compute equals top-2's and expert choice's (cf 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.output import json_destination
from train.durable import write_text_atomically
from train.one_line_arguments import positive_int

VARIANTS: dict[str, list[str]] = {
    "top-1 (Switch)": ["moe=top1"],
    "top-2": ["moe=top2"],
    "top-2, split-invariant balancing loss": ["moe=top2", "moe.aux_loss_scope=global"],
    "top-2 dropless": ["moe=top2_dropless"],
    "top-2 aux-loss-free": ["moe=top2_auxfree"],
    "expert choice c=2": ["moe=expert_choice"],
    "dense, equal active compute": ["moe=dense", "model.ffn_hidden=1024"],
}
# What --only takes (the table's names work too, but need quoting).
SHORT_NAMES: dict[str, str] = dict(zip(
    ["top1", "top2", "top2-global", "top2-dropless", "top2-auxfree", "expert-choice", "dense"], VARIANTS, strict=True))


def chosen_variants(only: list[str] | None) -> list[str]:
    """The table names of the variants to run, in table order; ValueError naming an unknown one."""
    if not only:
        return list(VARIANTS)
    # A table name may itself hold a comma, so an item is split only when it is not one.
    names = [part.strip() for item in only for part in ([item] if item in VARIANTS else item.split(","))]
    wanted = {SHORT_NAMES.get(name, name) for name in names if name}
    unknown = sorted(wanted - set(VARIANTS))
    if unknown or not wanted:
        raise ValueError(f"--only: unknown {', '.join(unknown) or 'nothing given'}; expected some of {', '.join(SHORT_NAMES)}")
    return [name for name in VARIANTS if name in wanted]


def run_variant(name: str, overrides: list[str], steps: int, extra: list[str], workdir: Path) -> dict:
    # Only characters Hydra's override grammar takes unquoted.
    run_dir = workdir / "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    command = [
        sys.executable, "-m", "train", "experiment=smoke", *overrides, f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}", f"trainer.checkpoint_every={steps}", "logging.progress_bar=false",
        f"trainer.run_dir={run_dir}", *extra,
    ]
    print(f"--- {name}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def row(name: str, summary: dict) -> dict:
    layers = list(summary["experts"].values())

    def mean(key: str) -> float | None:
        return statistics.fmean(layer[key] for layer in layers) if layers else None

    return {
        "variant": name,
        "val_loss": summary["final_val_loss"],
        "val_loss_batch": summary.get("final_val_loss_batch"),
        "val_loss_causal": summary.get("final_val_loss_causal"),
        "drop_pct": None if mean("drop_fraction") is None else 100 * mean("drop_fraction"),
        "cv": mean("cv"),
        "max_violation": mean("max_violation"),
        "no_expert_pct": None if mean("no_expert_fraction") is None else 100 * mean("no_expert_fraction"),
        "tokens_per_s": summary.get("training_tokens_per_s") or summary["tokens_per_s"],  # (no window logged)
        "active_params_M": summary["parameters"]["active"] / 1e6,
        "tokens": summary["tokens"],
    }


def markdown(rows: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| routing | val loss | EC batch / causal | drop % | CV | max violation | tokens with no expert % | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ec = "-" if r["val_loss_batch"] is None else f"{fmt(r['val_loss_batch'], '.3f')} / {fmt(r['val_loss_causal'], '.3f')}"
        lines.append(
            f"| {r['variant']} | {r['val_loss']:.3f} | {ec} | {fmt(r['drop_pct'], '.1f')} | {fmt(r['cv'], '.3f')} | "
            f"{fmt(r['max_violation'], '.3f')} | {fmt(r['no_expert_pct'], '.1f')} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=150)
    parser.add_argument("--json", type=Path, default=None, help="default: runs/bench/routing_compare-<time>.json")
    parser.add_argument("--only", action="append", default=None,
                        help=f"run only these variants (comma-separated or repeated): {', '.join(SHORT_NAMES)}")
    args, extra = parser.parse_known_args()
    try:
        names = chosen_variants(args.only)
        json_path = json_destination(args.json, "routing_compare")
    except ValueError as error:
        parser.error(str(error))
    rows = []
    with tempfile.TemporaryDirectory(prefix="routing-compare-") as tmp:
        for name in names:
            rows.append(row(name, run_variant(name, VARIANTS[name], args.steps, extra, Path(tmp))))
    table = markdown(rows)
    print(table)
    write_text_atomically(json_path, json.dumps(rows, indent=2) + "\n")
    print(f"json: {json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()

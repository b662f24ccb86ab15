"""moe-eval: loss and perplexity of a checkpoint under every routing mode and several batch sizes.

    moe-eval [CHECKPOINT] [--text FILE] [--modes trained,dropless,...] [--capacity-factor 1.0]
             [--batch-sizes 1,16,64] [--windows N | --all-windows] [--json results.json]

CHECKPOINT: a run directory, a checkpoint directory or a consolidated .safetensors file (default:
the newest run under runs/). Data: the run's own validation split (its prepared dataset, found
from config.yaml), by default the same windows the training loop validates on (trainer.eval_batches
x trainer.micro_batch_size consecutive windows of model.seq_len + 1 tokens), or a text file of
yours (one document, cut into the same kind of windows).

Routing modes (train/routing_modes.py): token choice `trained`, `dropless`, `cf=X`; expert choice
`batch`, `causal`, `batch cf=X`. Each mode runs at every batch size: capacity modes and expert
choice's batch mode change with the batch (tokens compete for slots), causal modes must not.
The mode and batch size the training loop used give exactly its `val_loss` in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from train.commands import inference_device, quiet_deepspeed, run_command
from train.durable import write_text_atomically
from train.metrics import finite_or_none, perplexity
from train.one_line_arguments import ArgumentParser, positive_float, positive_int
from train.output_path import output_problem


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, batches: Iterator[np.ndarray] | list[np.ndarray],
                    device: torch.device | None = None) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, predicted tokens) over batches of [B, S+1] windows:
    the training loop's validation and `moe-eval` both call this. `device`: where the model runs
    (default: its embedding's device; a DeepSpeed engine passes it)."""
    device = model.embed.weight.device if device is None else device
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, predicted = token_loss_sum(model, batch, device)
        total += loss_sum
        count += predicted
    return total / count, count


def token_loss_sum(model: torch.nn.Module, batch: np.ndarray, device: torch.device) -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, predicted tokens) of one [B, S+1] batch of windows."""
    tokens = torch.from_numpy(batch).to(device)
    logits = model(tokens[:, :-1]).logits.float()
    return float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")), tokens[:, 1:].numel()


def in_batches(windows: list[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Windows of equal length stacked batch_size at a time; a shorter (tail) window goes alone."""
    pending: list[np.ndarray] = []
    for window in windows:
        if pending and (len(pending) == batch_size or len(window) != len(pending[0])):
            yield np.stack(pending)
            pending = []
        pending.append(window)
    if pending:
        yield np.stack(pending)


def validation_windows(data_dir: Path, seq_len: int, count: int | None) -> list[np.ndarray]:
    """The first `count` (None: all) consecutive non-overlapping seq_len + 1 windows of the validation
    split: the windows TokenDataset.eval_batches gives the training loop, in the same order."""
    from train.config import ConfigError
    from train.data import TokenDataset

    try:
        return [batch[0] for batch in TokenDataset(data_dir, "val").eval_batches(1, seq_len, count)]
    except ValueError as error:  # too short for one window
        raise ConfigError(str(error)) from None


def text_windows(path: Path, tokenizer, eot: int, seq_len: int) -> list[np.ndarray]:
    """One document (end-of-text first, as documents start in training) cut into seq_len + 1 windows
    that do not overlap; a shorter tail of at least 2 tokens is a window of its own."""
    from train.config import ConfigError
    from train.data.corpus import TextFile
    from train.data.tokenizer import encode_pieces, streamed_pieces

    # Read and encoded a piece at a time, as training data is (train/data/tokenizer.py): the encoder's
    # own bookkeeping would cost some 100 bytes a token of a file encoded whole.
    pieces = ((0, piece) for piece in streamed_pieces(TextFile(path).chunks()))
    try:
        ids = np.concatenate([np.array([eot], dtype=np.int64), *(ids for _, ids in encode_pieces(tokenizer, pieces, np.int64))])
    except ValueError as error:  # TextFile's one line: the path, and what is wrong with it
        raise ConfigError(f"--text {error}") from None
    if len(ids) < 2:
        raise ConfigError(f"--text {path}: holds no text to predict")
    window = seq_len + 1
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    return [w for w in windows if len(w) >= 2]


def _parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except Exception as error:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r} ({error})") from None
    if not values:
        raise ValueError(f"{what}: expected at least one value")
    return values


def format_table(results: list[dict], batch_sizes: list[int], marker: tuple[str, int] | None) -> str:
    header = f"{'routing':<16}" + "".join(f"{f'batch {b}':>22}" for b in batch_sizes)
    lines = [header]
    for mode in dict.fromkeys(r["mode"] for r in results):
        cells = []
        for b in batch_sizes:
            (r,) = [r for r in results if r["mode"] == mode and r["batch_size"] == b]
            star = "*" if marker == (mode, b) else " "
            cells.append(f"{r['loss']:.4f} (ppl {r['perplexity']:.1f}){star}")
        lines.append((f"{mode:<16}" + "".join(f"{c:>22}" for c in cells)).rstrip())  # the star's column, when blank
    return "\n".join(lines)


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="moe-eval", description="Loss and perplexity of a checkpoint under every routing mode.")
    parser.add_argument("checkpoint", nargs="?", help="run directory, checkpoint directory or consolidated .safetensors "
                        "(default: the newest run under runs/)")
    parser.add_argument("--text", type=Path, help="evaluate on this text file instead of the run's validation split")
    parser.add_argument("--modes", help="comma-separated routing modes (default: all that apply to the model)")
    parser.add_argument("--capacity-factor", type=positive_float, action="append", default=None,
                        help="add the mode 'cf=X' (token choice) / 'batch cf=X' (expert choice); repeatable (default 1.0)")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 1, the run's micro-batch size, 64)")
    how_many = parser.add_mutually_exclusive_group()
    how_many.add_argument("--windows", type=positive_int, help="validation windows (default: what training validates on)")
    how_many.add_argument("--all-windows", action="store_true", help="the whole validation split")
    parser.add_argument("--json", type=Path, help="write the results here "
                        "(default: <run dir>/eval.json; beside a tag copied out of its run)")
    parser.add_argument("--device", type=inference_device, default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args(argv)
    try:
        batch_sizes = _parse_list(args.batch_sizes, int, "--batch-sizes") if args.batch_sizes else None
        wanted = _parse_list(args.modes, str.strip, "--modes") if args.modes else None
    except ValueError as error:
        parser.error(str(error))
    named_factors = []  # a capacity mode named in --modes (`cf=2`, `batch cf=0.5`) is as if given by --capacity-factor
    for i, name in enumerate(wanted or []):
        prefix, is_capacity_mode, text = name.rpartition("cf=")
        if is_capacity_mode and prefix in ("", "batch "):
            try:
                factor = positive_float(text)
            except argparse.ArgumentTypeError as error:
                parser.error(f"--modes {name!r}: {error}")
            wanted[i] = f"{prefix}cf={factor:g}"  # as the mode is named (`cf=2.0` is `cf=2`)
            named_factors.append(factor)
    if batch_sizes is not None and min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    if batch_sizes is not None:
        batch_sizes = list(dict.fromkeys(batch_sizes))  # a size given twice is one column of the table
    if args.text is not None and (args.windows or args.all_windows):
        parser.error("--windows and --all-windows choose validation windows; --text evaluates the whole file")
    if args.json is not None and (problem := output_problem(args.json, "--json")):
        parser.error(problem)  # before the model is loaded and evaluated
    quiet_deepspeed()
    from train.config import ConfigError
    from train.load import load_model
    from train.routing_modes import KEEP, available_modes, routing, trained_mode_name

    loaded = load_model(args.checkpoint, args.device)
    run, model = loaded.run, loaded.model
    seq_len = run.model.seq_len
    # Checked before any data is read or prepared.
    modes = available_modes(model, (args.capacity_factor or []) + named_factors or [1.0])
    if args.capacity_factor and not any(mode.eval_capacity_factor not in (KEEP, None) for mode in modes):
        raise ConfigError("--capacity-factor: this model has no capacity to set (a dense model, or stock DeepSpeed "
                          "layers, whose gate keeps its own)")
    if wanted is not None:
        unknown = [name for name in wanted if name not in {m.name for m in modes}]
        if unknown:
            raise ConfigError(f"--modes: {', '.join(unknown)} does not apply to this model; "
                              f"choose from {', '.join(m.name for m in modes)}")
        modes = [m for m in modes if m.name in wanted]
    if args.text is not None:
        if not args.text.is_file():
            raise ConfigError(f"--text {args.text}: no such file")
        tokenizer, eot = loaded.tokenizer()
        windows = text_windows(args.text, tokenizer, eot, seq_len)
        data_description = f"text file {args.text}"
    else:
        count = None if args.all_windows else (args.windows or run.trainer.eval_batches * run.trainer.micro_batch_size)
        windows = validation_windows(loaded.validation_data_dir(), seq_len, count)
        data_description = "validation split"
        if count is not None and len(windows) < count:
            print(f"note: the validation split holds {len(windows)} windows of {seq_len + 1} tokens, fewer than the "
                  f"{count} asked for: all of them are evaluated", file=sys.stderr, flush=True)
    batch_sizes = batch_sizes or sorted({1, run.trainer.micro_batch_size, 64})

    predicted = sum(len(w) - 1 for w in windows)
    print(f"checkpoint  {loaded.source} (step {loaded.step})")
    print(f"data        {data_description}: {len(windows)} windows of up to {seq_len + 1} tokens, {predicted:,} predicted tokens")
    results = []
    for mode in modes:
        for batch_size in batch_sizes:
            with routing(model, mode):
                loss, tokens = mean_token_loss(model, in_batches(windows, batch_size))
            results.append({"mode": mode.name, "batch_size": batch_size, "loss": loss, "perplexity": perplexity(loss),
                            "tokens": tokens, "batch_dependent": mode.batch_dependent})
    trained = trained_mode_name(model)
    as_in_training = args.text is None and args.windows is None and not args.all_windows
    marker = (trained, run.trainer.micro_batch_size) if as_in_training else None
    print(format_table(results, batch_sizes, marker))
    if marker is not None and marker[0] in {m.name for m in modes} and marker[1] in batch_sizes:
        print(f"* = the training loop's validation (routing {trained}, micro-batch {marker[1]}): its val_loss in metrics.jsonl")
    report = {
        "checkpoint": str(loaded.source), "step": loaded.step, "data": data_description, "windows": len(windows),
        "predicted_tokens": predicted, "trained_mode": trained, "training_micro_batch_size": run.trainer.micro_batch_size,
        "router": run.moe.router if run.moe.every else "dense",
        # A diverged model's NaN (or a perplexity past float range) as null: JSON has neither.
        "results": [{**r, "loss": finite_or_none(r["loss"]), "perplexity": finite_or_none(r["perplexity"])} for r in results],
    }
    out = args.json or _default_json(loaded.source, args.text)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Atomically: an earlier eval.json is never left half-replaced.
    write_text_atomically(out, json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"json        {out}")
    return 0


def _default_json(source: Path, text: Path | None = None) -> Path:
    """Beside the run (or the consolidated file): eval.json for its validation split, and
    eval.<file>.json for a --text file, so that one never replaces the other."""
    name = "eval.json" if text is None else f"eval.{text.stem}.json"
    if source.suffix == ".safetensors":
        return source.with_name(f"{source.stem}.{name}")
    from train.checkpoint import outputs_beside

    return outputs_beside(source) / name


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(_main, argv))


if __name__ == "__main__":
    main()

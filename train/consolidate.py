"""moe-consolidate: one framework-free safetensors file of a whole model from a DeepSpeed MoE checkpoint.

    moe-consolidate RUN_DIR|CHECKPOINT_DIR [--out FILE.safetensors]

Reads a checkpoint of any expert-parallel layout (ep_size 1, 2, 4 ... on any number of ranks;
see train/load.py for the file layout), and writes:

- FILE.safetensors: every weight and router buffer under the names of `train.model.GPT`'s state
  dict, experts by global id, fp32 (the tied output projection is stored once, as embed.weight);
  its metadata key `moe_gpt` holds the JSON header below, so the file alone rebuilds the model;
- FILE.json: the same header, for people and tools: the run config, model and moe config,
  vocabulary rows, the source checkpoint and its step;
- FILE.tokenizer.json: the run's tokenizer, when its prepared dataset is found.

Optimizer state is not carried (this is for inference and export). In a bf16 run the weights
are ZeRO's fp32 master copy, read from the checkpoint's layout-free optimizer state
(train/portable_state.py); without it (trainer.portable_checkpoint=never, a periodic save under
=final, tensor parallelism) they are the module's bf16 weights cast to fp32, and the header says
which (`weights`).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from train.commands import quiet_deepspeed, run_command
from train.durable import replace_durably, save_safetensors, temporary_sibling, write_text_atomically
from train.one_line_arguments import ArgumentParser
from train.output_path import output_problem


def consolidate(source: str | Path | None, out: Path, with_tokenizer: bool = True) -> dict:
    """Write `out` (+ .json, + .tokenizer.json when available); returns the header. The tokenizer is
    the run's prepared dataset's (prepared again if it is not in the cache)."""
    from train.config import ConfigError
    from train.load import header_for, load_model, resolve_checkpoint

    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: expected a file name ending in .safetensors")
    if problem := output_problem(out, "--out"):
        raise ConfigError(problem)  # before the checkpoint is read
    checkpoint = resolve_checkpoint(source)
    if checkpoint.suffix == ".safetensors":  # refused before reading any weights
        raise ConfigError(f"{checkpoint}: already a consolidated file")
    # `source`, not the tag it names now: a tag pruned while it is read is then followed to the newer one.
    loaded = load_model(source, pack_experts=False)  # saved below: no tensors sharing one storage
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    if loaded.run.model.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed.weight; safetensors stores no aliases
    tokenizer = None
    try:
        tokenizer = loaded.tokenizer_path() if with_tokenizer else None
    except ConfigError as error:
        print(f"note: tokenizer not copied ({error})", file=sys.stderr)
    header = {**header_for(loaded), "weights": loaded.weights}
    out.parent.mkdir(parents=True, exist_ok=True)
    # A previous file's tokenizer goes first, so that at no moment (a kill included) does a new
    # weights file sit beside another model's tokenizer: without one, readers take the run data's.
    tokenizer_out = out.with_name(out.stem + ".tokenizer.json")
    tokenizer_out.unlink(missing_ok=True)
    # Written beside and renamed into place: an interrupted run never leaves a truncated file under
    # the name eval and generate would load.
    # (Names of this process's own: two consolidations to one --out never share a partial file.)
    partial = temporary_sibling(out, ".partial")
    try:
        save_safetensors(state, partial, metadata={"moe_gpt": json.dumps(header)})
        replace_durably(partial, out)
    finally:
        partial.unlink(missing_ok=True)  # (gone already when renamed)
    write_text_atomically(out.with_suffix(".json"), json.dumps(header, indent=2) + "\n")
    if tokenizer is not None and tokenizer.is_file():
        copied = temporary_sibling(tokenizer_out, ".partial")
        try:
            shutil.copyfile(tokenizer, copied)
            replace_durably(copied, tokenizer_out)
        finally:
            copied.unlink(missing_ok=True)
    return header


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="moe-consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="run directory, checkpoints/ directory or one checkpoint tag "
                        "(default: the newest run under runs/)")
    parser.add_argument("--out", type=Path, help="output .safetensors file (default: <run dir>/consolidated.safetensors; "
                        "beside a tag copied out of its run)")
    args = parser.parse_args(argv)
    quiet_deepspeed()
    from train.checkpoint import outputs_beside
    from train.load import resolve_checkpoint

    tag_dir = resolve_checkpoint(args.checkpoint)
    out = args.out or (outputs_beside(tag_dir) / "consolidated.safetensors")
    header = consolidate(args.checkpoint, out)
    moe = header["moe"]
    source = Path(header["source"])  # the tag read: a newer one than `tag_dir` if that was pruned meanwhile
    if source.is_relative_to(Path.cwd()):
        source = source.relative_to(Path.cwd())
    print(f"consolidated {source} (step {header['step']}, {moe['num_experts']} experts per MoE layer) -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(_main, argv))


if __name__ == "__main__":
    main()

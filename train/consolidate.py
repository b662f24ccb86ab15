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
are the module's bf16 weights cast to fp32, not ZeRO's fp32 master copy.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from train.commands import ArgumentParser, quiet_deepspeed, run_command


def consolidate(source: str | Path | None, out: Path, with_tokenizer: bool = True) -> dict:
    """Write `out` (+ .json, + .tokenizer.json when available); returns the header. The tokenizer is
    the run's prepared dataset's (prepared again if it is not in the cache)."""
    from safetensors.torch import save_file

    from train.config import ConfigError
    from train.load import header_for, load_model

    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: expected a file name ending in .safetensors")
    loaded = load_model(source)
    if loaded.source.suffix == ".safetensors":
        raise ConfigError(f"{loaded.source}: already a consolidated file")
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    if loaded.run.model.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed.weight; safetensors stores no aliases
    tokenizer = None
    try:
        tokenizer = loaded.tokenizer_path() if with_tokenizer else None
    except ConfigError as error:
        print(f"note: tokenizer not copied ({error})", file=sys.stderr)
    header = header_for(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"moe_gpt": json.dumps(header)})
    out.with_suffix(".json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, out.with_name(out.stem + ".tokenizer.json"))
    return header


def _main(argv: Sequence[str] | None) -> int:
    parser = ArgumentParser(prog="moe-consolidate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="run directory, checkpoints/ directory or one checkpoint tag "
                        "(default: the newest run under runs/)")
    parser.add_argument("--out", type=Path, help="output .safetensors file (default: <run dir>/consolidated.safetensors)")
    args = parser.parse_args(argv)
    quiet_deepspeed()
    from train.load import resolve_checkpoint

    tag_dir = resolve_checkpoint(args.checkpoint)
    out = args.out or (tag_dir.parent.parent / "consolidated.safetensors")
    header = consolidate(tag_dir, out)
    moe = header["moe"]
    print(f"consolidated {tag_dir} (step {header['step']}, {moe['num_experts']} experts per MoE layer) -> {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_command(_main, argv))


if __name__ == "__main__":
    main()

"""Loading a trained model for inference in one process, without DeepSpeed's engine or a process group.

A path may name a run directory (its `checkpoints/latest`), a `checkpoints/` directory, one
checkpoint tag directory, or a consolidated `.safetensors` file (train/consolidate.py). A
DeepSpeed MoE checkpoint of any expert-parallel layout is read file by file:

- `mp_rank_00_model_states.pt['module']`: every non-expert weight and buffer (routers included);
- `layer_{L}_expert_{E}_mp_rank_00_model_states.pt`: expert E of the L-th MoE layer (in module
  order), its keys already numbered by the GLOBAL expert id (DeepSpeed's `_save_moe_checkpoint`
  renames local ids to global ones; `load_moe_state_dict` renames them back for the loading rank).

With every expert in one process (ep_size 1), local id = global id, so the union of those
files is exactly the state dict of `train.model.GPT` built from the run's config.yaml with
`moe.ep_size=1`, whatever ep_size the run trained with. A tensor-parallel run wrote those files
once per tensor-parallel rank (`mp_rank_01`, ...), each with its shard of the split weights: the
shards are joined into whole weights (train/tp_layout.py). The result is loaded strictly: a
missing or unexpected key is an error, not a silently random weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from train.config import ConfigError, RunConfig, to_run_config

CONSOLIDATED_FORMAT = "moe-gpt-consolidated-v1"
NON_EXPERT_FILE = "mp_rank_00_model_states.pt"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    """A train.model.GPT holding every expert (ep_size 1), in eval mode."""
    run: RunConfig
    """The run's configuration, with moe.ep_size=1 (the layout of `model`)."""
    source: Path
    """The checkpoint tag directory or consolidated file the weights came from."""
    step: int | None
    """Training step of the checkpoint, when known."""
    data_dir: Path | None = None
    """The run's prepared dataset, when it is known to exist (see `validation_data_dir`)."""
    tokenizer_file: Path | None = None
    """The model's tokenizer when stored beside it (a run's own copy, a consolidated file's); else the dataset's."""
    weights: str = ""
    """Which weights these are: "fp32 master weights" of a bf16 run where its checkpoint holds them."""

    def validation_data_dir(self) -> Path:
        """The run's own prepared dataset (found in the cache, or prepared again from data config);
        ConfigError when the data prepared now is not what the model was trained on (its files
        changed since: another tokenizer was trained, so the same ids would be other text)."""
        if self.data_dir is None or not (self.data_dir / "meta.json").is_file():
            self.data_dir = prepare_run_data(self.run)
        assert self.data_dir is not None
        own = self.tokenizer_file
        if own is not None and own.is_file() and own.read_bytes() != (self.data_dir / "tokenizer.json").read_bytes():
            raise ConfigError(f"the run's data, prepared now ({self.data_dir}), has another tokenizer than the model's "
                              f"({own}): data.files changed since training, so its validation split is not the run's; "
                              "evaluate with --text FILE")
        return self.data_dir

    def tokenizer_path(self) -> Path:
        """The run's own tokenizer.json, else the one of its prepared dataset (prepared again from
        the data config when not in the cache); ConfigError naming both when neither can be had."""
        if self.tokenizer_file is not None and self.tokenizer_file.is_file():
            return self.tokenizer_file
        try:
            return self.validation_data_dir() / "tokenizer.json"
        except ConfigError as error:
            if self.tokenizer_file is None:
                raise
            raise ConfigError(f"no tokenizer: {self.tokenizer_file} is missing, and {error}") from None

    def tokenizer(self):
        """(the run's tokenizer, its end-of-text id); ConfigError when it cannot be found or does not suit the model."""
        return read_tokenizer(self.tokenizer_path(), self.model)


def read_tokenizer(path: Path, model: torch.nn.Module):
    """(the tokenizer in `path`, its end-of-text id), checked to suit `model`: ConfigError naming the
    file when it is unreadable, has no end-of-text or has ids the model's embedding has no row for
    (another run's tokenizer would otherwise fail deep inside the embedding lookup)."""
    from train.data import load_tokenizer
    from train.data.tokenizer import eot_id

    try:
        tokenizer = load_tokenizer(path)
        end_of_text = eot_id(tokenizer)
    except ValueError as error:
        raise ConfigError(str(error) if str(error).startswith(str(path)) else f"{path}: {error}") from None
    rows = int(model.embed.weight.shape[0])
    if tokenizer.get_vocab_size() > rows:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                          f"{rows} embedding rows (the tokenizer of another run?)")
    return tokenizer, end_of_text


# ---------------------------------------------------------------------- finding checkpoints
RUN_SEARCH_DEPTH = 4
"""How deep under runs/ (or a folder given in place of a run) a run directory is looked for:
runs/<name>/<time> is 2 deep; the bound keeps a wrong path (a home directory) from a full scan."""


def newest_run(root: Path) -> Path | None:
    """The run directory under `root` (at most RUN_SEARCH_DEPTH deep) whose latest checkpoint was
    written last, if any: runs/<name>/<time> as runs are named by default, and any
    trainer.run_dir=runs/... of the user's."""
    patterns = ["/".join(["*"] * depth + ["checkpoints", "latest"]) for depth in range(RUN_SEARCH_DEPTH + 1)]
    candidates = [p.parent.parent for pattern in patterns for p in root.glob(pattern) if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda run_dir: (run_dir / "checkpoints" / "latest").stat().st_mtime)


def default_checkpoint(runs_root: Path = Path("runs")) -> Path:
    """The run under runs/ (at any depth) whose latest checkpoint is newest (what `make train` just wrote)."""
    run_dir = newest_run(runs_root)
    if run_dir is None:
        raise ConfigError(
            f"no checkpoint given and no run with a checkpoint under {runs_root}/: pass a run directory, "
            "a checkpoint directory or a consolidated .safetensors file"
        )
    return run_dir


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint tag directory or consolidated file that `path` names."""
    if path is None:
        path = default_checkpoint()
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConfigError(f"{path}: expected a run directory, a checkpoint directory or a consolidated .safetensors file")
        return path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint (expected a run directory, a checkpoint directory or a .safetensors file)")
    if (path / NON_EXPERT_FILE).is_file():
        from train.checkpoint import latest_tag, run_dir_of, step_of

        # Beside a `latest` (a tag copied elsewhere has none), a newer tag is a save that did not finish.
        latest = latest_tag(path.parent)
        if latest is not None and (step_of(path.name) or -1) > (step_of(latest) or -1):
            raise ConfigError(f"{path}: a save that did not finish (newer than latest, {latest}); "
                              "pass the run directory or the tag latest names")
        # In a run with no `latest` (a first save killed, or `latest` deleted), the tag's config.yaml,
        # written after every other file, is what says it finished (checkpoint.saved_tags_without_latest).
        if latest is None and run_dir_of(path) is not None and not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: a save that did not finish (no config.yaml, which a save writes last, and "
                              f"no latest beside it); pass a complete checkpoint")
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = checkpoints / "latest"
        if latest.is_file():
            from train.checkpoint import latest_tag

            tag_dir = checkpoints / latest_tag(checkpoints)  # (an unreadable one: one line)
            if not (tag_dir / NON_EXPERT_FILE).is_file():
                raise ConfigError(f"{latest} names {tag_dir.name}, which holds no {NON_EXPERT_FILE}")
            return tag_dir
    run_dir = newest_run(path)  # runs/<name>, or runs/ itself: its newest run
    if run_dir is not None:
        return resolve_checkpoint(run_dir)
    raise ConfigError(f"{path}: holds no checkpoint (no checkpoints/latest, no latest, no {NON_EXPERT_FILE})")


# ---------------------------------------------------------------------- configuration
def run_config_from_dict(values: dict[str, Any], where: str) -> RunConfig:
    """A validated RunConfig from a config.yaml's values (fields added since then take their defaults)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), values)
    except Exception as error:  # unknown key or wrong type
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None
    try:
        return to_run_config(merged)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def read_run_config(tag_dir: Path) -> RunConfig:
    """The settings a checkpoint tag was trained with: its own config.yaml, or (tags written before
    they held one) its run directory's."""
    from train.checkpoint import tag_or_run_file

    path = tag_or_run_file(tag_dir, "config.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a checkpoint is read with the config.yaml of its run directory")
    try:
        values = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: not valid YAML ({reason}); it holds the settings the checkpoint was trained with") from None
    if not isinstance(values, dict) or not values:
        # (Empty, it would read as the defaults, and the checkpoint's files be blamed for not fitting them.)
        raise ConfigError(f"{path}: holds no settings; expected the run's config.yaml, as training wrote it")
    return run_config_from_dict(values, str(path))


def single_process_layout(run: RunConfig) -> RunConfig:
    """The same model whole in one process: every expert (laid out by global id), every head."""
    run.moe = replace(run.moe, ep_size=1)
    run.model = replace(run.model, tensor_parallel=1)
    return run


def prepare_run_data(run: RunConfig, only_cached: bool = False) -> Path | None:
    """The run's prepared dataset: found in its cache (same fingerprint), or prepared again
    (`only_cached`: None instead)."""
    from train.data import prepare_dataset

    source: str | list[str] = list(run.data.files) or "embedded"
    try:
        return prepare_dataset(source, cache_dir=run.data.cache_dir, vocab_size=run.data.vocab_size,
                               val_fraction=run.data.val_fraction, text_field=run.data.text_field,
                               only_cached=only_cached)
    except ValueError as error:
        raise ConfigError(f"the run's data: {error}") from None


# ---------------------------------------------------------------------- reading weights
def build_model(run: RunConfig, vocab_rows: int) -> torch.nn.Module:
    """A GPT on the CPU, one process, no process group: ep_size must be 1 (MoE layers then need no
    expert-parallel group; `test_model.py` and the dry run build models the same way)."""
    from train.model import GPT

    assert run.moe.ep_size == 1
    return GPT(run.model, run.moe, vocab_size=vocab_rows, seed=run.trainer.seed)


def moe_layer_prefixes(model: torch.nn.Module) -> list[str]:
    """Module names of the MoE layers, in the order DeepSpeed numbers them (`layer_{L}` in file names)."""
    from deepspeed.moe.layer import MoE

    return [name for name, module in model.named_modules() if isinstance(module, MoE)]


def read_deepspeed_weights(
    tag_dir: Path, model: torch.nn.Module, tensor_parallel: int = 1, rank0: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Whole-model state dict (global expert ids, fp32) from one DeepSpeed checkpoint tag, and the
    client state saved with it (step, tokens, ...). A tensor-parallel run wrote one set of files per
    tensor-parallel rank (`mp_rank_{r}`), each holding its shard of the split weights; they are
    joined by train/tp_layout.py's rules. `rank0`: the contents of mp_rank_00_model_states.pt when
    the caller has read it already (`read_non_expert_file`), so that it is not read twice."""
    found = len(list(tag_dir.glob("mp_rank_*_model_states.pt")))
    if found != tensor_parallel:
        raise ConfigError(f"{tag_dir}: {found} mp_rank_*_model_states.pt files, but the run's "
                          f"model.tensor_parallel={tensor_parallel}")
    shards = [_read_tensor_parallel_rank(tag_dir, model, rank, rank0 if rank == 0 else None)
              for rank in range(tensor_parallel)]
    if tensor_parallel == 1:
        state = shards[0][0]
    else:
        from train.tp_layout import merge

        heads = model.cfg.num_heads
        state = {key: merge(key, [shard[key] for shard, _ in shards], heads) for key in shards[0][0]}
    return to_fp32(state), shards[0][1]


def read_non_expert_file(path: Path) -> dict:
    """The contents of one `mp_rank_{r}_model_states.pt`, checked to be DeepSpeed's model states."""
    non_expert = _read_torch_file(path)
    if not isinstance(non_expert, dict) or "module" not in non_expert:
        raise ConfigError(f"{path}: not a DeepSpeed model-states file (no 'module')")
    return non_expert


def _read_torch_file(path: Path):
    """torch.load of a checkpoint file; ConfigError naming it when it is damaged (truncated by a full
    disk or a partial copy). A missing file stays FileNotFoundError: a tag pruned while read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises OSError, RuntimeError or pickle's errors for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: not a readable checkpoint file ({reason})") from None


def _read_tensor_parallel_rank(
    tag_dir: Path, model: torch.nn.Module, rank: int, non_expert: dict | None = None
) -> tuple[dict, dict]:
    non_expert_file = tag_dir / f"mp_rank_{rank:02d}_model_states.pt"
    if non_expert is None:
        non_expert = read_non_expert_file(non_expert_file)
    state = dict(non_expert["module"])  # a copy: the caller's `non_expert` keeps its keys
    for key in [k for k in state if k.endswith("._extra_state")]:
        # megatron-core's tensor-parallel layers carry an empty slot for Transformer Engine's fp8 metadata.
        if state[key] is not None:
            raise ConfigError(f"{non_expert_file}: {key} holds extra state (fp8 metadata?) that cannot be consolidated")
        del state[key]
    num_experts = model.moe_config.num_experts
    for layer_index, prefix in enumerate(moe_layer_prefixes(model)):
        for expert in range(num_experts):
            path = tag_dir / f"layer_{layer_index}_expert_{expert}_mp_rank_{rank:02d}_model_states.pt"
            if not path.is_file():
                raise ConfigError(f"{path}: missing; the config says MoE layer {prefix} has {num_experts} experts")
            for key, value in _read_torch_file(path).items():
                if not key.startswith(prefix + ".deepspeed_moe.experts.deepspeed_experts."):
                    raise ConfigError(f"{path}: holds {key!r}, not a weight of expert {expert} of {prefix}")
                state[key] = value
    extra = sorted(tag_dir.glob(f"layer_{len(moe_layer_prefixes(model))}_expert_*_model_states.pt"))
    if extra:
        raise ConfigError(f"{extra[0]}: more MoE layers in the checkpoint than in the model its config.yaml describes")
    client = {k: v for k, v in non_expert.items() if k in ("step", "tokens", "initial_val_loss")}
    return state, client


def to_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def load_state_strictly(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    state = dict(state)
    if model.cfg.tie_embeddings:
        # Tied: one tensor, stored once in a consolidated file.
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{where}: does not match the model its config describes "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{where}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def read_consolidated(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, header) of a consolidated file; the header is the JSON train/consolidate.py wrote."""
    from safetensors import safe_open

    try:
        # One open for header and tensors (what safetensors' load_file does inside): the file can be GBs.
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None
    header_text = metadata.get("moe_gpt")
    if header_text is None:
        raise ConfigError(f"{path}: not a consolidated moe-gpt file (no 'moe_gpt' metadata); make one with moe-consolidate")
    try:
        header = json.loads(header_text)
    except ValueError as error:
        raise ConfigError(f"{path}: its 'moe_gpt' metadata is not JSON ({error}); "
                          "make the file again with moe-consolidate") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: its 'moe_gpt' metadata is not a JSON object; make the file again with moe-consolidate")
    if header.get("format") != CONSOLIDATED_FORMAT:
        raise ConfigError(f"{path}: format {header.get('format')!r}, expected {CONSOLIDATED_FORMAT}")
    return state, header


def load_model(path: str | Path | None, device: str | torch.device = "cpu", pack_experts: bool = True) -> LoadedModel:
    """The model of a run directory, checkpoint directory or consolidated file, ready for inference.
    `pack_experts`: lay each MoE layer's experts out in one buffer (a view per forward instead of a
    copy); False for callers that save the weights, whose tensors must then not share storage."""
    source = resolve_checkpoint(path)
    if source.suffix == ".safetensors":
        state, header = read_consolidated(source)
        run = single_process_layout(run_config_from_dict(header["run"], f"{source} (run config)"))
        model = build_model(run, vocab_rows=int(header["vocab_rows"]))
        load_state_strictly(model, state, str(source))
        data_dir = Path(header["data_dir"]) if header.get("data_dir") else None
        tokenizer = source.with_name(source.stem + ".tokenizer.json")
        loaded = LoadedModel(model, run, source, header.get("step"), data_dir, tokenizer if tokenizer.is_file() else None,
                             header.get("weights", ""))
    else:
        try:
            loaded = _load_tag(source)
        except (FileNotFoundError, ConfigError):
            if source.is_dir():
                raise
            # A training run with trainer.keep_checkpoints pruned the tag while it was read: its
            # newer `latest` is read instead, unless the tag itself was asked for.
            try:
                newer = resolve_checkpoint(path)
            except ConfigError:
                newer = source
            if newer == source:
                raise ConfigError(f"{source}: removed while it was read (a run still training with "
                                  "trainer.keep_checkpoints prunes older tags); pass its run directory") from None
            loaded = _load_tag(newer)
    if loaded.run.moe.implementation == "deepspeed" and loaded.run.moe.capacity_factor is None:
        _world_of_one()
    loaded.model.to(device).eval()
    from moe import MoELayer

    for layer in loaded.model.modules():
        if pack_experts and isinstance(layer, MoELayer):
            layer.pack_expert_weights()  # stacking the experts per token generated is then a view, not a copy
    return loaded


def _load_tag(source: Path) -> LoadedModel:
    """The model of one DeepSpeed checkpoint tag, every expert and head in this process."""
    run = read_run_config(source)
    tensor_parallel = run.model.tensor_parallel
    run = single_process_layout(run)
    # Read once, for the vocabulary size and then the weights: the file can be GBs.
    non_expert = read_non_expert_file(source / NON_EXPERT_FILE)
    vocab_rows = int(non_expert["module"]["embed.weight"].shape[0])
    model = build_model(run, vocab_rows)
    state, client = read_deepspeed_weights(source, model, tensor_parallel, rank0=non_expert)
    del non_expert  # bf16 weights: their fp32 copies are in `state`, these need not stay alive
    weights = _use_fp32_masters(state, source, tied=run.model.tie_embeddings)
    load_state_strictly(model, state, str(source))
    # Tags keep the tokenizer their weights go with, runs a copy of theirs (train/loop.py); older
    # ones find it in the data cache.
    from train.checkpoint import tag_or_run_file

    return LoadedModel(model, run, source, client.get("step"), tokenizer_file=tag_or_run_file(source, "tokenizer.json"),
                       weights=weights)


def _use_fp32_masters(state: dict, tag_dir: Path, tied: bool) -> str:
    """In a bf16 run, replace the module weights in `state` by ZeRO's fp32 masters where the tag's
    layout-free state holds them (so a run directory and its consolidated file are the same model);
    returns which weights `state` holds."""
    from train import portable_state

    index = portable_state.read_index(tag_dir)
    if index is None:
        return "module weights, cast to fp32 (the checkpoint has no layout-free state to say more)"
    if not index["layout"]["bf16"]:
        return "fp32 weights"
    if not index.get("tensors", True):
        return "module weights, bf16 cast to fp32 (the checkpoint has no fp32 masters)"
    names = [name for name in state if name in index["files"]]
    masters = portable_state.read_tensors(tag_dir, index, names)
    for name in names:
        state[name] = masters[name]["fp32"].float().contiguous()
    if tied:  # one tensor under two names, saved under one: both must load the master
        master = state["embed.weight"] if "embed.weight" in names else state["lm_head.weight"]
        state["embed.weight"] = state["lm_head.weight"] = master
    return "fp32 master weights"


def _world_of_one() -> None:
    """Stock DeepSpeed's dropless gate all-reduces its capacity even on one rank: it needs a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        from train.distributed import init_world

        init_world("cpu")


def header_for(loaded: LoadedModel) -> dict[str, Any]:
    """What a consolidated file records besides the weights: enough to rebuild the model and find its
    data (its prepared dataset, when known or in the cache: eval then reads it from any directory)."""
    model = loaded.model
    data_dir = loaded.data_dir
    if data_dir is None:
        try:
            data_dir = prepare_run_data(loaded.run, only_cached=True)
        except ConfigError:  # its files are gone: the file is still the model
            data_dir = None
    return {
        "format": CONSOLIDATED_FORMAT,
        "source": str(loaded.source.resolve()),
        "step": loaded.step,
        "vocab_rows": int(model.embed.weight.shape[0]),
        "data_dir": str(data_dir.resolve()) if data_dir is not None else None,
        "run": OmegaConf.to_container(OmegaConf.structured(loaded.run)),
        "model": asdict(loaded.run.model),
        "moe": asdict(loaded.run.moe),
    }

"""Reading DeepSpeed MoE checkpoints without the engine: files laid out as DeepSpeed writes them
(experts by global id, one set per tensor-parallel rank) give back the whole model exactly.

The real files of real multi-process runs are covered in tests/distributed (ep_size 2) and
tests/integration; these build the layout by hand to cover tensor-parallel shards and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe import MoEConfig
from train.config import ConfigError, RunConfig
from train.consolidate import consolidate
from train.load import load_model, moe_layer_prefixes
from train.model import GPT, ModelConfig

EXPERTS, HEADS = 4, 4


def _whole_model(tensor_parallel: int) -> tuple[RunConfig, GPT]:
    run = RunConfig(
        model=ModelConfig(seq_len=16, num_layers=2, hidden_size=32, num_heads=HEADS, ffn_hidden=48,
                          tensor_parallel=tensor_parallel),
        moe=MoEConfig(num_experts=EXPERTS, top_k=2, shared_expert_hidden=16),
    )
    torch.manual_seed(0)
    whole = GPT(ModelConfig(seq_len=16, num_layers=2, hidden_size=32, num_heads=HEADS, ffn_hidden=48), run.moe, 64, seed=5)
    with torch.no_grad():
        for name, buffer in whole.named_buffers():
            if name.endswith("selection_bias"):
                buffer.normal_()  # a router buffer, not only parameters, must come back
    return run, whole


def _write_checkpoint(run_dir: Path, run: RunConfig, whole: GPT, tensor_parallel: int, drop: str | None = None) -> None:
    """Files named and keyed as DeepSpeed's _save_moe_checkpoint writes them."""
    from train.tp_layout import shard

    tag = run_dir / "checkpoints" / "step_00000007"
    tag.mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000007")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(run)))
    state = whole.state_dict()
    prefixes = moe_layer_prefixes(whole)
    for rank in range(tensor_parallel):
        part = {k: shard(k, v, rank, tensor_parallel, HEADS).clone() for k, v in state.items()}
        non_expert = {k: v for k, v in part.items() if ".deepspeed_experts." not in k}
        if tensor_parallel > 1:
            non_expert["blocks.0.attn.qkv._extra_state"] = None  # megatron-core's empty fp8 slot
        torch.save({"module": non_expert, "step": 7}, tag / f"mp_rank_{rank:02d}_model_states.pt")
        for layer, prefix in enumerate(prefixes):
            for expert in range(EXPERTS):
                name = f"layer_{layer}_expert_{expert}_mp_rank_{rank:02d}_model_states.pt"
                if name == drop:
                    continue
                marker = f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{expert}."
                torch.save({k: v for k, v in part.items() if k.startswith(marker)}, tag / name)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_checkpoint_files_give_back_the_whole_model(tmp_path, tensor_parallel):
    run, whole = _whole_model(tensor_parallel)
    _write_checkpoint(tmp_path / "run", run, whole, tensor_parallel)
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 7 and loaded.run.moe.ep_size == 1 and loaded.run.model.tensor_parallel == 1
    expected = whole.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # Consolidated once, the file loads to the same model (no tokenizer: that would prepare the dataset).
    # Another model's tokenizer left under the name (an earlier file's) is not paired with it.
    (tmp_path / "whole.tokenizer.json").write_text('{"another": "model"}')
    consolidate(tmp_path / "run", tmp_path / "whole.safetensors", with_tokenizer=False)
    assert not (tmp_path / "whole.tokenizer.json").exists()
    again = load_model(tmp_path / "whole.safetensors")
    assert again.tokenizer_file is None
    for key in expected:
        assert torch.equal(again.model.state_dict()[key], expected[key]), key


def test_a_run_without_its_tokenizer_or_its_data_names_both(tmp_path):
    run, whole = _whole_model(1)
    run.data.files = [str(tmp_path / "gone.jsonl")]
    _write_checkpoint(tmp_path / "run", run, whole, 1)
    loaded = load_model(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^no tokenizer: .*run/tokenizer.json is missing, and the run's data: "
                                          r".*gone.jsonl: no such file"):
        loaded.tokenizer_path()


def test_a_missing_expert_file_is_named(tmp_path):
    run, whole = _whole_model(1)
    _write_checkpoint(tmp_path / "run", run, whole, 1, drop="layer_1_expert_2_mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="layer_1_expert_2_mp_rank_00_model_states.pt: missing"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("asked_for", ["run", "tag"])
def test_a_tag_pruned_while_it_is_read(tmp_path, monkeypatch, asked_for):
    # A run still training with trainer.keep_checkpoints=1 saves step 8 and removes step 7 while an
    # eval reads step 7: given the run, the eval reads step 8; given the tag, it says what happened.
    import shutil

    import train.load

    run, whole = _whole_model(1)
    _write_checkpoint(tmp_path / "run", run, whole, 1)
    checkpoints = tmp_path / "run" / "checkpoints"
    real_read = train.load.read_deepspeed_weights

    def read_while_pruned(tag_dir, *args, **kwargs):
        if tag_dir.name == "step_00000007":
            shutil.copytree(tag_dir, checkpoints / "step_00000008")
            (checkpoints / "latest").write_text("step_00000008")
            shutil.rmtree(tag_dir)
        return real_read(tag_dir, *args, **kwargs)

    monkeypatch.setattr(train.load, "read_deepspeed_weights", read_while_pruned)
    if asked_for == "run":
        loaded = load_model(tmp_path / "run")
        assert loaded.source == checkpoints / "step_00000008"
        for key, value in whole.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], value), key
    else:
        with pytest.raises(ConfigError, match=r"step_00000007: removed while it was read \(a run still training with "
                                              r"trainer.keep_checkpoints prunes older tags\); pass its run directory$"):
            load_model(checkpoints / "step_00000007")


@pytest.mark.parametrize("damaged", ["mp_rank_00_model_states.pt", "layer_1_expert_2_mp_rank_00_model_states.pt"])
def test_a_truncated_checkpoint_file_is_named(tmp_path, damaged):
    run, whole = _whole_model(1)
    _write_checkpoint(tmp_path / "run", run, whole, 1)
    path = tmp_path / "run" / "checkpoints" / "step_00000007" / damaged
    path.write_bytes(path.read_bytes()[:300])  # a copy cut short, a disk that filled up
    with pytest.raises(ConfigError, match=rf"^{path}: not a readable checkpoint file \(.+\)$"):
        load_model(tmp_path / "run")


def test_tensor_parallel_files_must_match_the_config(tmp_path):
    run, whole = _whole_model(2)
    _write_checkpoint(tmp_path / "run", run, whole, 1)
    with pytest.raises(ConfigError, match="model.tensor_parallel=2"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("name, message", [("nothing-here", "no such checkpoint"), ("notes.txt", "expected a run directory")])
def test_paths_that_are_not_checkpoints(tmp_path, name, message):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path / name)


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_each_file_is_read_once(tmp_path, monkeypatch, tensor_parallel):
    """Checkpoint files can be GBs: loading reads each one once (mp_rank_00 serves both the vocabulary
    size and the weights; a consolidated file's header and tensors come from one open)."""
    import safetensors
    import safetensors.torch

    run, whole = _whole_model(tensor_parallel)
    _write_checkpoint(tmp_path / "run", run, whole, tensor_parallel)
    consolidate(tmp_path / "run", tmp_path / "whole.safetensors", with_tokenizer=False)

    reads: dict[str, int] = {}

    def counted(real):
        def read(path, *args, **kwargs):
            reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
            return real(path, *args, **kwargs)
        return read

    monkeypatch.setattr(torch, "load", counted(torch.load))
    # Both names: train/load.py imports safe_open from safetensors, load_file uses safetensors.torch's.
    monkeypatch.setattr(safetensors, "safe_open", counted(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "safe_open", counted(safetensors.torch.safe_open))

    load_model(tmp_path / "run")
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000007").glob("*.pt"))
    assert reads == dict.fromkeys(files, 1)

    reads.clear()
    load_model(tmp_path / "whole.safetensors")
    assert reads == {"whole.safetensors": 1}


def test_the_default_is_the_newest_run_at_any_depth_under_runs(tmp_path):
    import os

    from train.load import default_checkpoint, resolve_checkpoint

    def make_run(relative: str, mtime: int) -> Path:
        run_dir = tmp_path / "runs" / relative
        tag = run_dir / "checkpoints" / "step_00000001"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
        latest = run_dir / "checkpoints" / "latest"
        latest.write_text("step_00000001")
        os.utime(latest, (mtime, mtime))
        return run_dir

    make_run("smoke/20261201-000000", 1_000)  # named by default: runs/<name>/<time>
    moved = make_run("moved", 2_000)  # a trainer.run_dir=runs/moved
    deep = make_run("sweeps/lr/3e-4", 3_000)
    make_run("a/b/c/d/e", 9_000)  # deeper than RUN_SEARCH_DEPTH: not searched
    assert default_checkpoint(tmp_path / "runs") == deep
    os.utime(moved / "checkpoints" / "latest", (4_000, 4_000))
    assert default_checkpoint(tmp_path / "runs") == moved
    # runs/ named explicitly resolves to the same newest run.
    assert resolve_checkpoint(tmp_path / "runs") == moved / "checkpoints" / "step_00000001"
    with pytest.raises(ConfigError, match="no run with a checkpoint under"):
        default_checkpoint(tmp_path / "empty")


def test_a_tokenizer_that_does_not_suit_the_model_is_named(tmp_path):
    # Another run's tokenizer, with more tokens than the model has rows, failed inside the embedding.
    from tokenizers import Tokenizer, models

    from train.load import read_tokenizer

    def save(name: str, tokens: list[str]) -> Path:
        path = tmp_path / name
        Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=tokens[0])).save(str(path))
        return path

    _, whole = _whole_model(1)  # 64 embedding rows
    words = [f"w{i}" for i in range(99)]
    tokenizer, eot = read_tokenizer(save("fits.json", ["<|endoftext|>", *words[:63]]), whole)
    assert eot == 0 and tokenizer.get_vocab_size() == 64
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/larger.json: the tokenizer has 100 tokens, more than the "
                                          r"model's 64 embedding rows \(the tokenizer of another run\?\)$"):
        read_tokenizer(save("larger.json", ["<|endoftext|>", *words]), whole)
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/plain.json: tokenizer has no <\|endoftext\|> token"):
        read_tokenizer(save("plain.json", words[:8]), whole)


@pytest.mark.parametrize("text, message", [
    ("model: [oops\n", r"config.yaml: not valid YAML \(while parsing a flow sequence\); it holds the settings"),
    ("", r"config.yaml: holds no settings; expected the run's config.yaml, as training wrote it$"),
])
def test_a_damaged_config_yaml_is_one_line_naming_it(tmp_path, text, message):
    run, whole = _whole_model(1)
    _write_checkpoint(tmp_path / "run", run, whole, 1)
    (tmp_path / "run" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("metadata, message", [
    ("{not json", r"its 'moe_gpt' metadata is not JSON \(Expecting property name"),
    ("[1, 2]", r"its 'moe_gpt' metadata is not a JSON object"),
])
def test_a_consolidated_file_with_damaged_metadata_is_one_line(tmp_path, metadata, message):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"moe_gpt": metadata})
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_model(path)

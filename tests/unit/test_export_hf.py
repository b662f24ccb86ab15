"""The Mixtral export: Hugging Face transformers loads it offline and its logits equal ours."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from moe import MoEConfig
from moe.losses import load_balancing_loss
from train.config import ConfigError
from train.export_hf import export_mixtral, mixtral_aux_loss_coef, rotary_rows_to_halves
from train.model import GPT, ModelConfig, apply_rotary, rotary_tables
from train.routing_modes import RoutingMode, moe_layers, routing

VOCAB = 300  # not a multiple of 64 on purpose: rows padded as training pads them


def _model(tie: bool = True, **moe_overrides) -> GPT:
    torch.manual_seed(0)
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "eval_capacity_factor": 1.0, **moe_overrides})
    cfg = ModelConfig(seq_len=24, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden=48, tie_embeddings=tie)
    model = GPT(cfg, moe, vocab_size=-(-VOCAB // 64) * 64, seed=0)
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 1.0)  # decisive routing: no top-k near-ties between implementations
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)  # norms and all weights away from their initial values
    return model.eval()


def test_rotary_permutation_turns_interleaved_pairs_into_halves():
    heads, head_dim, dim = 2, 8, 16
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(heads * head_dim, dim, generator=generator)
    x = torch.randn(5, dim, generator=generator)
    cos, sin = rotary_tables(5, head_dim, 10000.0)
    ours = apply_rotary((x @ weight.T).view(5, heads, head_dim).transpose(0, 1), cos, sin)  # fp32 inside
    permuted = (x @ rotary_rows_to_halves(weight, heads).T).view(5, heads, head_dim).transpose(0, 1)
    rotate_half = torch.cat([-permuted[..., head_dim // 2:], permuted[..., : head_dim // 2]], -1)
    theirs = permuted * torch.cat([cos, cos], -1) + rotate_half * torch.cat([sin, sin], -1)
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    torch.testing.assert_close(theirs, ours[..., order], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k", [2, 3])
def test_the_exported_aux_loss_weight_gives_transformers_our_balancing_loss(top_k):
    """Every layer routing alike (there pooled over layers equals per layer): coef_hf x Mixtral's
    loss equals ours, coef x the per-layer losses summed."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers, experts, coef = 4, 8, 0.01
    logits_TE = torch.randn(64, experts) * 2  # unbalanced: the loss well above its minimum
    probs_TE = logits_TE.softmax(-1)
    ours = coef * layers * load_balancing_loss(probs_TE, probs_TE.topk(top_k, dim=-1).indices)
    theirs = mixtral_aux_loss_coef(coef, layers, top_k) * load_balancing_loss_func((logits_TE,) * layers, experts, top_k)
    assert ours > coef * layers * 1.05
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)


def test_the_export_writes_the_converted_aux_loss_weight(tmp_path):
    export_mixtral(_model(top_k=3, aux_loss_coef=0.03), tmp_path / "hf")
    # Two MoE layers, top-3: 0.03 x 2 / 3.
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(0.02)


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_the_export_and_logits_equal_ours(tmp_path, monkeypatch, tie):
    import transformers  # here, not at import: the GPU machine's kit lacks it, and collects this file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from train.data import train_bpe_tokenizer

    model = _model(tie=tie)
    tokenizer = train_bpe_tokenizer(["def add(a, b):\n    return a + b\n", "Ünïcode text, and more text."] * 20, VOCAB)
    tokenizer.save(str(tmp_path / "tok.json"))
    export_mixtral(model, tmp_path / "hf", tmp_path / "tok.json")

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routing(model, RoutingMode("dropless", None)):
        ours = model(tokens).logits
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert theirs.shape == ours.shape
    # fp32, different attention kernels and summation orders: agreement to 1e-5 on logits of size ~1.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # generation_config.json: the padded rows (ids the tokenizer has no token for) are never generated.
    vocab = tokenizer.get_vocab_size()
    assert vocab < ours.shape[-1]
    generated = hf.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    assert all(torch.isneginf(scores[:, vocab:]).all() and torch.isfinite(scores[:, :vocab]).any()
               for scores in generated.scores)
    assert generated.sequences[0, 4:].max() < vocab

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def add(a, b):  # Ünïcode"
    eot = tokenizer.token_to_id("<|endoftext|>")
    # A prompt starts a document, as in training and in moe-generate: after the end-of-text token.
    assert hf_tokenizer(text)["input_ids"] == [eot, *tokenizer.encode(text).ids]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.bos_token_id == eot == hf.generation_config.eos_token_id
    assert hf_tokenizer.decode(tokenizer.encode(text).ids) == text
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "overrides, feature",
    [
        ({"router": "expert_choice", "capacity_factor": 2.0}, "moe.router=expert_choice"),
        ({"shared_expert_hidden": 16}, "moe.shared_expert_hidden"),
        ({"score_func": "sigmoid"}, "moe.score_func=sigmoid"),
        ({"normalize_topk": False}, "moe.normalize_topk=false"),
        ({"top_k": 1}, "moe.top_k=1"),
        ({"every": 2}, "moe.every=2"),
        ({"every": 0}, "moe.every=0"),
        ({"bias_update_rate": 0.001}, "moe.bias_update_rate"),
    ],
)
def test_what_mixtral_lacks_is_refused_by_name(tmp_path, overrides, feature):
    with pytest.raises(ConfigError, match="cannot export to Mixtral") as error:
        export_mixtral(_model(**overrides), tmp_path / "hf")
    assert feature in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_a_missing_checkpoint(capsys):
    from train.export_hf import main

    with pytest.raises(SystemExit) as exit_info:
        main(["/nonexistent/run", "--out", "/tmp/unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0]


def _boom(*args, **kwargs):
    raise OSError("disk full (injected)")


@pytest.mark.parametrize("writer", ["safetensors.torch.save_file", "train.export_hf.mixtral_config"])
def test_a_failure_while_writing_leaves_nothing_under_the_name(tmp_path, monkeypatch, writer):
    # mixtral_config fails after the weights are on disk: the middle of writing, not the start.
    model = _model()
    with monkeypatch.context() as patch:
        patch.setattr(writer, _boom)
        with pytest.raises(OSError, match="injected"):
            export_mixtral(model, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    export_mixtral(model, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_a_killed_exports_leftovers_do_not_stop_the_next(tmp_path):
    # A kill skips every clean-up: a half-written .partial, and an old export renamed away.
    for leftover in ("hf.partial", "hf.replaced"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_bytes(b"truncated")
    export_mixtral(_model(), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > len(b"truncated")


@pytest.mark.parametrize("name", ["hf.partial", "hf.replaced"])
def test_a_folder_of_the_users_under_a_leftovers_name_is_not_deleted(tmp_path, name):
    (tmp_path / "hf").mkdir()  # an earlier export, so that the old one is renamed away too
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / name}: in the way of the export, and not what an earlier export"):
        export_mixtral(_model(), tmp_path / "hf")
    assert (tmp_path / name / "notes.md").read_text() == "mine"
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"


def test_an_existing_export_is_replaced_as_a_whole(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text("old")
    export_mixtral(_model(), out)
    # The old tokenizer went with the rest: this export has none, and a stale one would be loaded.
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert '"model_type": "mixtral"' in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_without_a_tokenizer_the_padded_rows_are_still_never_generated(tmp_path):
    import transformers  # here, not at import: the GPU machine's kit lacks it, and collects this file
    model = _model()
    export_mixtral(model, tmp_path / "hf", vocab_size=VOCAB)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.generation_config.eos_token_id is None  # no tokenizer names the end-of-text id: none is made up
    tokens = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(1))
    generated = hf.generate(tokens, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert model.embed.weight.shape[0] > VOCAB
    assert all(torch.isneginf(scores[:, VOCAB:]).all() and torch.isfinite(scores[:, :VOCAB]).any()
               for scores in generated.scores)


def _assert_a_failed_export_changes_nothing(out: Path, monkeypatch) -> None:
    """An export that fails midway leaves `out` byte for byte as it was, and nothing beside it."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("train.export_hf.mixtral_config", _boom)
    with pytest.raises(OSError, match="injected"):
        export_mixtral(_model(tie=False), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_an_existing_export_survives_a_failed_replacement(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export_mixtral(_model(), out)
    _assert_a_failed_export_changes_nothing(out, monkeypatch)


def test_an_output_holding_other_files_is_refused_not_deleted(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match="notes.md") as error:
        export_mixtral(_model(), out)
    assert str(out) in str(error.value) and "\n" not in str(error.value)
    assert (out / "notes.md").read_text() == "mine" and (out / "config.json").read_text() == "old"

    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="not a directory"):
        export_mixtral(_model(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf"]


def test_an_output_that_must_stay_in_place_gets_its_files_replaced_one_by_one(tmp_path, monkeypatch):
    """A mount point (a container volume) cannot be renamed away: the files are staged inside it and
    renamed into it, a stale file of the earlier export goes, and a failure leaves the earlier export."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("stale")
    (out / "config.json").write_text("old")
    monkeypatch.setattr("train.export_hf._must_stay_in_place", lambda path: path == out)
    monkeypatch.setattr("train.export_hf.os.replace", _refusing_to_move(out, os.replace))

    export_mixtral(_model(), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    _assert_a_failed_export_changes_nothing(out, monkeypatch)


def _refusing_to_move(mount: Path, replace):
    """os.replace as on a mount point: the directory itself cannot be renamed."""
    def guarded(src, dst):
        if Path(src) == mount or Path(dst) == mount:
            raise OSError(errno.EBUSY, "Device or resource busy", str(mount))
        return replace(src, dst)

    return guarded

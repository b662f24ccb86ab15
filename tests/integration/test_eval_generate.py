"""Trained runs through the inference commands: moe-eval equals the training loop's validation,
a consolidated file equals its checkpoint, generation is reproducible, exports load, bad input exits 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

MICRO_BATCH = 4


def _train(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from hydra import compose, initialize_config_dir

    from train.cli import CONF_DIR
    from train.loop import train

    run_dir = tmp_path_factory.mktemp(name) / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=gpt_tiny", *overrides, "trainer.max_steps=4", f"trainer.micro_batch_size={MICRO_BATCH}",
            "trainer.eval_every=2", "trainer.eval_batches=2", "trainer.checkpoint_every=4", "logging.log_every=2",
            "logging.progress_bar=false", "deepspeed.warmup_steps=1", f"data.cache_dir={ROOT / '.cache' / 'data'}",
            f"trainer.run_dir={run_dir}",
        ])
    train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def token_choice_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "token_choice", [])


@pytest.fixture(scope="module")
def expert_choice_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "expert_choice", ["moe=expert_choice"])


def _run_cli(main, argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def _eval(source: Path, json_path: Path, *extra: str) -> dict[tuple[str, int], float]:
    from train.evaluate import main

    assert _run_cli(main, [str(source), "--batch-sizes", f"1,{MICRO_BATCH}", "--json", str(json_path), *extra]) == 0
    report = json.loads(json_path.read_text())
    return {(r["mode"], r["batch_size"]): r["loss"] for r in report["results"]}


def _last_validation(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "eval"][-1]


def test_token_choice_eval_equals_training_validation_and_consolidated_file(token_choice_run, tmp_path):
    from train.consolidate import main as consolidate

    losses = _eval(token_choice_run, tmp_path / "eval.json")
    validation = _last_validation(token_choice_run)
    assert losses[("trained", MICRO_BATCH)] == pytest.approx(validation["val_loss"], rel=1e-9, abs=1e-9)
    assert {mode for mode, _ in losses} == {"trained", "dropless", "cf=1"}
    # Dropless routing does not depend on the batch; the capacity modes may.
    assert losses[("dropless", 1)] == pytest.approx(losses[("dropless", MICRO_BATCH)], abs=1e-5)

    out = tmp_path / "whole.safetensors"
    assert _run_cli(consolidate, [str(token_choice_run), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file() and (tmp_path / "whole.tokenizer.json").is_file()
    # The header finds the run's prepared dataset (eval of the file then reads it from any directory).
    from train.load import load_model

    data_dir = load_model(token_choice_run).validation_data_dir()
    assert json.loads(out.with_suffix(".json").read_text())["data_dir"] == str(data_dir.resolve())
    assert _eval(out, tmp_path / "eval_file.json") == losses


def test_expert_choice_eval_equals_training_validation_in_both_modes(expert_choice_run, tmp_path):
    losses = _eval(expert_choice_run, tmp_path / "eval.json")
    validation = _last_validation(expert_choice_run)
    assert losses[("batch", MICRO_BATCH)] == pytest.approx(validation["val_loss_batch"], rel=1e-9, abs=1e-9)
    assert losses[("causal", MICRO_BATCH)] == pytest.approx(validation["val_loss_causal"], rel=1e-9, abs=1e-9)
    # Causal routing looks at each token alone: the batch size cannot change it.
    assert losses[("causal", 1)] == pytest.approx(losses[("causal", MICRO_BATCH)], abs=1e-5)


def test_eval_on_a_text_file(token_choice_run, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("def greet(name):\n    return f'hello {name}'\n" * 20, encoding="utf-8")
    losses = _eval(token_choice_run, tmp_path / "eval.json", "--text", str(text), "--modes", "dropless")
    assert set(losses) == {("dropless", 1), ("dropless", MICRO_BATCH)}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    # A batch size or capacity factor given twice is one entry (1 and 1.0000001 are both `cf=1`).
    again = _eval(token_choice_run, tmp_path / "again.json", "--text", str(text), "--modes", "dropless,cf=1",
                  "--batch-sizes", f"{MICRO_BATCH},1,{MICRO_BATCH}", "--capacity-factor", "1", "--capacity-factor", "1.0000001")
    assert sorted(again) == sorted((mode, b) for mode in ("dropless", "cf=1") for b in (1, MICRO_BATCH))
    assert again[("dropless", 1)] == losses[("dropless", 1)]
    # A capacity mode named in --modes needs no --capacity-factor beside it.
    named = _eval(token_choice_run, tmp_path / "named.json", "--text", str(text), "--modes", "cf=2.0", "--batch-sizes", "1")
    assert set(named) == {("cf=2", 1)} and math.isfinite(named[("cf=2", 1)])


def test_a_diverged_models_eval_json_holds_null_not_nan(token_choice_run, tmp_path, monkeypatch):
    # JSON has no NaN: strict readers (a browser's JSON.parse) refuse a bare NaN.
    from train.evaluate import main

    monkeypatch.setattr("train.evaluate.mean_token_loss", lambda model, batches: (float("nan"), 10))
    out = tmp_path / "eval.json"
    assert _run_cli(main, [str(token_choice_run), "--modes", "dropless", "--batch-sizes", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))
    assert [(r["loss"], r["perplexity"]) for r in report["results"]] == [(None, None)]


def test_eval_of_a_text_file_keeps_the_runs_eval_json_and_a_short_split_is_noted(token_choice_run, tmp_path, capsys):
    from train.evaluate import main
    from train.load import resolve_checkpoint

    text = tmp_path / "notes.txt"
    text.write_text("a short note to evaluate on, twice over. " * 40, encoding="utf-8")
    checkpoint = resolve_checkpoint(token_choice_run)  # the tag: its run directory gets the default files
    run_json = checkpoint.parent.parent / "eval.json"
    before = run_json.read_bytes() if run_json.exists() else None
    assert _run_cli(main, [str(checkpoint), "--text", str(text), "--modes", "dropless", "--batch-sizes", "1"]) == 0
    assert (checkpoint.parent.parent / "eval.notes.json").is_file()
    assert (run_json.read_bytes() if run_json.exists() else None) == before  # the validation split's, untouched
    capsys.readouterr()
    assert _run_cli(main, [str(token_choice_run), "--windows", "1000000", "--modes", "dropless", "--batch-sizes", "64",
                           "--json", str(tmp_path / "all.json")]) == 0
    assert "fewer than the 1000000 asked for: all of them are evaluated" in capsys.readouterr().err


def test_generation_is_reproducible_from_checkpoint_and_consolidated_file(token_choice_run, tmp_path, capsys):
    from train.consolidate import consolidate
    from train.generate import main as generate

    consolidate(token_choice_run, tmp_path / "m.safetensors")

    def text(source, seed: int, *extra: str) -> str:
        argv = [str(source), "--prompt", "def", "--max-new-tokens", "40", "--temperature", "1.0", "--top-p", "0.95",
                "--seed", str(seed), *extra]
        assert _run_cli(generate, argv) == 0
        return capsys.readouterr().out

    first = text(token_choice_run, 3)
    assert first.startswith("def")
    assert text(token_choice_run, 3) == first
    assert text(tmp_path / "m.safetensors", 3) == first
    assert text(token_choice_run, 3, "--no-cache") == first
    # Other seeds, other texts (any one of them may stop early at end-of-text, so several).
    assert len({first, *(text(token_choice_run, seed) for seed in (4, 5, 6))}) > 1
    # A prompt longer than the context is cut to its end, and the user is told.
    assert _run_cli(generate, [str(token_choice_run), "--prompt", "def f(x): return x\n" * 200, "--max-new-tokens", "1"]) == 0
    assert "tokens, the context 32: only its last 32 are seen" in capsys.readouterr().err


def test_a_run_reads_its_own_tokenizer_without_the_data_cache(token_choice_run, tmp_path, monkeypatch, capsys):
    from train.data import load_tokenizer
    from train.generate import main as generate
    from train.load import load_model

    kept = token_choice_run / "tokenizer.json"
    data_dir = load_model(token_choice_run).validation_data_dir()
    assert kept.read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert load_tokenizer(kept).get_vocab_size() > 0

    def no_cache(run):
        raise AssertionError("the data cache was consulted for the tokenizer")

    monkeypatch.setattr("train.load.prepare_run_data", no_cache)
    monkeypatch.chdir(tmp_path)  # another working directory: relative data paths would not resolve
    assert _run_cli(generate, [str(token_choice_run), "--prompt", "def", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")


def test_export_of_a_trained_run_loads_in_transformers(token_choice_run, tmp_path, monkeypatch):
    import torch
    import transformers  # a dev dependency: missing, the test fails rather than skips

    from train.export_hf import main as export
    from train.load import load_model
    from train.routing_modes import RoutingMode, routing

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _run_cli(export, [str(token_choice_run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    model = load_model(token_choice_run).model
    tokens = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routing(model, RoutingMode("dropless", None)):
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("evaluate", ["{tc}", "--modes", "causal"], "does not apply"),
        ("evaluate", ["{tc}", "--modes", "dropless,cf=0"], "--modes 'cf=0': expected a finite number > 0, got '0'"),
        ("evaluate", ["{tc}", "--text", "/nonexistent.txt"], "no such file"),
        ("evaluate", ["{tc}", "--batch-sizes", "0"], "--batch-sizes"),
        ("evaluate", ["{tc}", "--windows", "5", "--all-windows"], "not allowed with argument --windows"),
        ("export_hf", ["{ec}", "--out", "{tmp}/hf"], "moe.router=expert_choice"),
        ("consolidate", ["{tmp}"], "holds no checkpoint"),
        # Outputs that cannot be written, refused before the model is loaded (not after the work).
        ("evaluate", ["{tc}", "--json", "{tmp}"], "--json {tmp}: a folder; expected a file path"),
        ("consolidate", ["{tc}", "--out", "/etc/passwd/model.safetensors"], "/etc/passwd is not a folder"),
        ("export_hf", ["{tc}", "--out", "/etc/passwd"], "--out /etc/passwd: a file; expected a folder path"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(command, argv, message, token_choice_run, expert_choice_run, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"train.{command}").main
    argv = [a.format(tc=token_choice_run, ec=expert_choice_run, tmp=tmp_path) for a in argv]
    assert _run_cli(main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[prepare]")]
    assert len(err) == 1 and err[0].startswith("error:") and message.format(tmp=tmp_path) in err[0], err

"""Benchmark command lines: where the JSON goes (checked before anything runs) and --only's names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.output import json_destination
from bench.routing_compare import VARIANTS, chosen_variants


def test_default_json_goes_under_runs_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = json_destination(None, "end_to_end")
    assert path.parent == Path("runs/bench") and path.parent.is_dir()
    assert path.name.startswith("end_to_end-") and path.suffix == ".json"


def test_a_requested_json_path_is_checked_before_the_run(tmp_path):
    assert json_destination(tmp_path / "out.json", "x") == tmp_path / "out.json"
    with pytest.raises(ValueError, match="a folder; expected a file path"):
        json_destination(tmp_path, "x")
    with pytest.raises(ValueError, match="not a regular file"):
        json_destination(Path("/dev/null"), "x")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is not a folder"):
        json_destination(tmp_path / "a_file" / "out.json", "x")
    # Folders still to be made are made (before the run, so a failure there costs nothing).
    assert json_destination(tmp_path / "new" / "out.json", "x") == tmp_path / "new" / "out.json"
    assert (tmp_path / "new").is_dir()


def test_a_json_symlink_is_written_through_not_replaced(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "out.json")
    assert json_destination(tmp_path / "link.json", "x") == tmp_path / "real" / "out.json"


def test_an_unwritable_json_folder_is_refused(tmp_path, monkeypatch):
    # As root every folder is writable, so the permission answer is what is faked here.
    monkeypatch.setattr("train.output_path.os.access", lambda path, mode: False)
    with pytest.raises(ValueError, match="not writable"):
        json_destination(tmp_path / "out.json", "x")


def test_only_takes_short_names_table_names_and_lists():
    assert chosen_variants(None) == list(VARIANTS)
    assert chosen_variants(["dense,top1"]) == ["top-1 (Switch)", "dense, equal active compute"]
    assert chosen_variants(["top-2, split-invariant balancing loss", "expert-choice"]) == [
        "top-2, split-invariant balancing loss", "expert choice c=2"]
    with pytest.raises(ValueError, match="unknown top3"):
        chosen_variants(["top3"])


def test_end_to_end_refuses_a_mistyped_option_before_anything_runs(capsys):
    from bench import end_to_end

    with pytest.raises(SystemExit) as exit_info:
        end_to_end.parse_args(["--stpes", "3", "model=gpt_tiny"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown option --stpes; options are --steps, --warmup, --json, --compile, --variants")


def _fake_figures(implementation: str) -> dict:
    return {"implementation": implementation, "step_s_median": 0.5, "step_s_min": 0.4, "tokens_per_s": 1000.0,
            "mfu": 0.3, "peak_tflops": 2.0, "active_params": 1e6, "total_params": 2e6, "flops_per_token": 6e6,
            "tokens_per_step": 500, "max_memory_gib": None}


def test_end_to_end_writes_each_variant_as_it_finishes(tmp_path, monkeypatch):
    """A variant killed at the device's time limit (simulated: the second one never returns) leaves the
    first one's figures on disk, with what they were measured on and where the peak came from."""

    from bench import end_to_end

    out = tmp_path / "e2e.json"

    def measure(overrides, implementation, steps, warmup, compiled=False):
        if implementation == "deepspeed":
            saved = json.loads(out.read_text())
            assert [r["implementation"] for r in saved["results"]] == ["ours"] and not saved["finished"]
            raise KeyboardInterrupt  # stands in for the kill: not caught as a variant's failure
        return _fake_figures(implementation)

    monkeypatch.setattr(end_to_end, "measure", measure)
    monkeypatch.setattr("sys.argv", ["end_to_end", "--json", str(out), "model=gpt_tiny"])
    with pytest.raises(KeyboardInterrupt):
        end_to_end.main()
    saved = json.loads(out.read_text())
    assert saved["results"] == [_fake_figures("ours")]
    meta = saved["meta"]
    assert meta["peak_source"] == "measured fp32 matmul on this CPU" and meta["peak_tflops"] > 0
    assert "threads" in meta["device"] and meta["torch"] and meta["deepspeed"] and meta["date"].startswith("20")


def test_end_to_end_keeps_a_configured_peak_and_says_so(tmp_path, monkeypatch, capsys):

    from bench import end_to_end

    out = tmp_path / "e2e.json"
    monkeypatch.setattr(end_to_end, "measure", lambda overrides, implementation, *a, **k: _fake_figures(implementation))
    monkeypatch.setattr("sys.argv", ["end_to_end", "--json", str(out), "model=gpt_tiny", "trainer.peak_tflops=123"])
    end_to_end.main()
    saved = json.loads(out.read_text())
    assert saved["finished"] and [r["implementation"] for r in saved["results"]] == ["ours", "deepspeed"]
    assert saved["meta"]["peak_tflops"] == 123.0 and saved["meta"]["peak_source"] == "trainer.peak_tflops"
    assert "| ours | 500.0 | 1000 | 30.0% | 1.00x |" in capsys.readouterr().out


def test_end_to_end_rows_compare_with_stock_deepspeed_compiled_alike():
    # Compiling the attention and norms speeds both models: a compiled row's ratio is against the
    # compiled stock model, and says so when only the eager one ran.
    from bench.end_to_end import format_row

    def row(name, tokens_per_s):
        return {"implementation": name, "tokens_per_s": tokens_per_s, "step_s_median": 0.1, "mfu": 0.3}

    results = [row("ours+compile", 300.0), row("deepspeed+compile", 100.0), row("deepspeed", 50.0), row("ours", 100.0)]
    ratios = [format_row(r, results).split("|")[-2].strip() for r in results]
    assert ratios == ["3.00x", "1.00x", "1.00x", "2.00x"]
    assert format_row(results[0], [results[0], results[2]]).split("|")[-2].strip() == "6.00x (vs eager stock)"
    assert format_row(results[0], results[:1]).split("|")[-2].strip() == "n/a"

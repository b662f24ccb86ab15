"""bench/moe_layer.py's timing schedule: variants interleaved round by round, ratios paired per round.

Stand-in variants (no MoE layer is built) record the order they run in, so these tests check the
schedule itself: what the layer benchmark's "vs dense" column is computed from.
"""

from __future__ import annotations

import pytest
import torch

from bench import moe_layer
from bench.moe_layer import Result, Shape, Step, paired_ratio, run_shape, vs_dense

SHAPE = Shape(8, 4, 8, 2, 1, torch.float32)


def _recording_builders(calls: list[str], fail_in_round: dict[str, int] | None = None) -> dict:
    """Builders whose steps append their name to `calls`; `fail_in_round[name] = n` makes that variant
    raise on its n-th timed step (counting warm-up steps separately)."""
    fail_in_round = fail_in_round or {}

    def builder(name: str, warmup: int):
        def build(s, x_TD, grad_TD):
            if name == "broken-build":
                raise RuntimeError("cannot build this one\nsecond line")
            ran = {"n": 0}

            def run() -> None:
                ran["n"] += 1
                if name in fail_in_round and ran["n"] == warmup + fail_in_round[name]:
                    raise RuntimeError("out of memory")
                calls.append(name)

            return Step(run, [], lambda: f"note of {name}")

        return build

    return builder


def test_rounds_interleave_the_variants_and_rotate_their_order(monkeypatch):
    calls: list[str] = []
    make = _recording_builders(calls)
    names = ["dense", "a", "b"]
    monkeypatch.setattr(moe_layer, "BUILDERS", {n: make(n, warmup=1) for n in names})
    results = run_shape(SHAPE, names, torch.device("cpu"), warmup=1, repeats=4)
    warm, timed = calls[:3], calls[3:]
    assert warm == names
    # One step of each variant per round, each round starting one variant later.
    assert timed == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a", "dense", "a", "b"]
    assert [len(r.times_ms) for r in results] == [4, 4, 4]
    assert [r.note for r in results] == ["note of dense", "note of a", "note of b"]


def test_a_failing_variant_keeps_its_error_and_leaves_the_others_running(monkeypatch):
    calls: list[str] = []
    make = _recording_builders(calls, fail_in_round={"a": 2})
    names = ["dense", "broken-build", "a", "b"]
    monkeypatch.setattr(moe_layer, "BUILDERS", {n: make(n, warmup=0) for n in names})
    results = {r.variant: r for r in run_shape(SHAPE, names, torch.device("cpu"), warmup=0, repeats=3)}
    assert results["broken-build"].error == "RuntimeError: cannot build this one"
    assert results["a"].error == "RuntimeError: out of memory" and results["a"].times_ms == []
    assert calls.count("a") == 1  # its first round ran; none after the failure
    assert len(results["dense"].times_ms) == len(results["b"].times_ms) == 3
    assert vs_dense(list(results.values()), results["a"]) is None


def test_the_paired_ratio_is_taken_round_by_round():
    # Two rounds in five hit a busy machine (3x), not always the same variant's step only;
    # the variant is 1.5x the baseline of its round in the three quiet rounds.
    baseline = [100.0, 300.0, 100.0, 100.0, 300.0]
    variant = [150.0, 450.0, 150.0, 450.0, 150.0]
    assert paired_ratio(variant, baseline) == pytest.approx(1.5)
    assert paired_ratio([1.0], [1.0, 2.0]) is None and paired_ratio([], []) is None


def test_a_compiled_row_is_paired_with_the_compiled_dense_ffn_when_that_ran():
    def row(variant, times):
        return Result(SHAPE, variant, times_ms=times)

    rows = [row("dense", [10.0, 10.0]), row("dense+compile", [5.0, 5.0]), row("ours-dropless+compile", [6.0, 6.0]),
            row("ours-dropless", [12.0, 12.0])]
    assert vs_dense(rows, rows[2]) == pytest.approx(1.2)
    assert vs_dense(rows, rows[3]) == pytest.approx(1.2)
    without_compiled_dense = [rows[0], rows[2], rows[3]]
    assert vs_dense(without_compiled_dense, rows[2]) == pytest.approx(0.6)  # then the eager one

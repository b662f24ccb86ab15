"""Data preparation across nodes that do not share rank 0's cache directory: each node's first rank
prepares its own copy, and a failure on any node stops every rank with the same line."""

from __future__ import annotations

import sys

import pytest

from distributed.processes import ROOT, launch_ranks

pytestmark = pytest.mark.distributed

WORKER = ROOT / "tests" / "distributed" / "data_nodes_worker.py"


def _corpus(tmp_path) -> None:
    import json

    lines = (json.dumps({"text": f"Document {i}: the heron by the river counts {i * 7} stones."}) for i in range(400))
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")


def test_a_node_without_the_shared_cache_prepares_its_own(tmp_path):
    _corpus(tmp_path)
    outputs = launch_ranks(2, [sys.executable, str(WORKER), str(tmp_path), "ok"], timeout=180)
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: prepared {tmp_path / f'node{rank}'}" in out, out
    assert (tmp_path / "node0").is_dir() and (tmp_path / "node1").is_dir()


def test_a_failure_on_another_node_stops_every_rank_with_its_line(tmp_path):
    _corpus(tmp_path)
    outputs = launch_ranks(2, [sys.executable, str(WORKER), str(tmp_path), "rank1_missing_file"], timeout=180)
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: error data (rank 1): " in out and "missing.jsonl" in out, out

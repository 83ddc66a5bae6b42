"""Hardware profiler on CPU gloo ranks: the file it writes loads as a Hardware description.

Launches real ranks (tests/dist_launcher.py) with --quick (tiny messages), so each launch takes seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autotune import profile_hardware as ph
from autotune.hardware import load_hardware
from tests.dist_launcher import REPO, run_ranks

SCRIPT = REPO / "autotune" / "profile_hardware.py"


def _profile(tmp_path, world: int, extra: list[str] = ()) -> tuple[str, dict]:
    out = tmp_path / f"hw{world}.json"
    run_ranks(SCRIPT, world, ["--device", "cpu", "--quick", "--out", str(out), *extra], timeout=180)
    hw = load_hardware(str(out))
    return hw, json.loads(out.read_text())


@pytest.mark.distributed
def test_two_ranks_write_a_loadable_file(tmp_path):
    hw, raw = _profile(tmp_path, 2)
    assert (hw.nodes, hw.gpus_per_node) == (1, 2)
    assert set(hw.allreduce_busbw_gbps) == {"2_1", "2_0"} and all(v > 0 for v in hw.allreduce_busbw_gbps.values())
    assert set(hw.p2p_gbps) == {"2"} and hw.p2p_gbps["2"] > 0
    assert hw.compute_tflops["fp32"] > 0 and hw.mem_bw_gbps > 0 and hw.collective_latency_us > 0
    assert hw.overlap_coe >= 1.0
    for op in ("allgather", "reducescatter", "allreduce"):
        a, b = hw.collective_fits[op]["2"]
        assert a >= 0 and b >= 0
    assert "measured by autotune/profile_hardware.py" in hw.sources["allreduce_busbw_gbps"]
    assert "not measured" in hw.sources["inter_node_busbw_gbps"]        # one node: nothing crosses
    assert raw["measurements"]["world"] == 2


@pytest.mark.distributed
def test_four_ranks_as_two_nodes(tmp_path):
    """4 ranks, 2 per simulated node: group sizes 4 and 2, strided groups cross the node boundary."""
    hw, raw = _profile(tmp_path, 4, ["--gpus-per-node", "2"])
    assert (hw.nodes, hw.gpus_per_node) == (2, 2)
    assert set(hw.allreduce_busbw_gbps) == {"4_1", "4_0", "2_1", "2_0"}
    assert set(hw.p2p_gbps) == {"2", "4"}
    assert set(hw.collective_fits["allgather"]) == {"4", "2"}
    assert "measured" in hw.sources["inter_node_busbw_gbps"] and "not measured" not in hw.sources["inter_node_busbw_gbps"]
    assert "measured" in hw.sources["inter_node_p2p_gbps"] and "not measured" not in hw.sources["inter_node_p2p_gbps"]
    links = raw["measurements"]["p2p"]["2"]["links"]          # pp=2: stage blocks {0,1} | {2,3}
    assert [(lk["src"], lk["dst"], lk["crosses_node"]) for lk in links] == [(0, 2, True), (1, 3, True)]


def test_bad_output_folder_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "missing" / "hw.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert not out.parent.exists()


def test_rank_groups():
    assert ph.group_sizes(8) == [8, 4, 2]
    assert ph.group_sizes(6) == [6, 3]
    assert ph.group_sizes(1) == []
    assert ph.partition(8, 2, True) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ph.partition(8, 2, False) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert ph.partition(8, 4, False) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_fit_line_recovers_a_line_and_stays_physical():
    a, b, med, mx = ph.fit_line([1, 2, 4, 8], [0.5 + 0.25 * x for x in (1, 2, 4, 8)])
    assert a == pytest.approx(0.5) and b == pytest.approx(0.25) and mx < 1e-9
    a, b, _, _ = ph.fit_line([1, 2, 4, 8], [3.0, 2.0, 1.5, 1.0])     # falling times are noise: a constant
    assert b == 0.0 and a > 0
    assert ph.trimmed_mean([1, 2, 3, 4, 100]) == pytest.approx(3.0)

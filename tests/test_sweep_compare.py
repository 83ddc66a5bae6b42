"""scripts/sweep_compare.py on hand-made runs: ratios of medians, ranges apart or overlapping, the geometric mean,
failed runs left out, and a one-line error with exit code 2 when nothing matches."""
import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from sweep_compare import compare, step_times  # noqa: E402


def _cfg(bsz, chunks=1, zero=0):
    return {"bsz": bsz, "chunks": chunks, "ckpt": 0, "zero": zero, "precision": "bf16"}


def _write(path, runs):
    path.write_text("".join(json.dumps({"model": m, "config": c, **({"measured": {"step_time_s": t}} if t else
                                                                   {"error": "out of memory"})}) + "\n"
                            for m, c, t in runs))
    return str(path)


def test_ratios_ranges_and_summary(tmp_path):
    a = _write(tmp_path / "a.jsonl", [("vit-test", _cfg(8), 0.10), ("vit-test", _cfg(16, 2), 0.20),
                                      ("vit-test", _cfg(8), 0.12), ("vit-test", _cfg(32), 0.30),
                                      ("vit-test", _cfg(64), 0.50)])
    b = _write(tmp_path / "b.jsonl", [("vit-test", _cfg(8), 0.05), ("vit-test", _cfg(8), 0.07),
                                      ("vit-test", _cfg(16, 2), 0.19), ("vit-test", _cfg(16, 2), 0.25),
                                      ("vit-test", _cfg(32), 0.33), ("vit-test", _cfg(64), None)])
    rows, summary = compare(step_times([a]), step_times([b]))
    by_bsz = {r["config"]["bsz"]: r for r in rows}
    assert sorted(by_bsz) == [8, 16, 32]                       # batch 64 failed in B: not compared
    assert math.isclose(by_bsz[8]["ratio"], 0.06 / 0.11)       # medians 0.06 and 0.11
    assert by_bsz[8]["apart"] == "below"
    assert math.isclose(by_bsz[16]["ratio"], 0.22 / 0.20) and by_bsz[16]["apart"] == ""
    assert math.isclose(by_bsz[32]["ratio"], 1.1) and by_bsz[32]["apart"] == "above"
    assert math.isclose(summary["geomean_ratio"], (0.06 / 0.11 * 1.1 * 1.1) ** (1 / 3))
    assert (summary["configurations"], summary["b_faster"], summary["b_below"], summary["b_above"]) == (3, 1, 1, 1)


def test_cli_table_and_errors(tmp_path):
    a = _write(tmp_path / "a.jsonl", [("bert-test", _cfg(8), 0.10)])
    b = _write(tmp_path / "b.jsonl", [("bert-test", _cfg(8), 0.08)])
    script = str(ROOT / "scripts" / "sweep_compare.py")
    r = subprocess.run([sys.executable, script, "--a", a, "--b", b, "--names", "old,new"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| bert-test | 8 | 1 | 0 | 0 | bf16 | 100.0 | 80.0 | 0.800 | below |" in r.stdout
    other = _write(tmp_path / "c.jsonl", [("bert-test", _cfg(16), 0.10)])
    r = subprocess.run([sys.executable, script, "--a", a, "--b", other], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no configuration" in r.stderr
    r = subprocess.run([sys.executable, script, "--a", a, "--b", b, "--names", "one"], capture_output=True, text=True)
    assert r.returncode == 2 and "--names" in r.stderr

"""train.py refuses a plan predicted not to fit, before building the model; --force overrides."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "bert-test", "--steps", "1",
                           "--global-batch-size", "8", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)


def test_refused_with_suggestion_then_forced(tmp_path):
    # 1 GB per device leaves nothing after the 1 GB CUDA context and the reserve: refused
    r = run(["--gpu-memory-gb", "1.0", "--metrics-file", "m.jsonl"], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "plan needs" in err[0] and "--force" in err[0]
    assert not (tmp_path / "m.jsonl").exists()          # refused before anything ran
    r = run(["--gpu-memory-gb", "1.0", "--force", "--metrics-file", "m.jsonl"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "m.jsonl").exists()


def test_fits_runs(tmp_path):
    r = run(["--gpu-memory-gb", "8"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]

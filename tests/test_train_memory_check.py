"""train.py refuses a plan predicted not to fit, before building the model; --force overrides."""
from tests.dist_launcher import train_py


def run(args, tmp_path):
    return train_py("--model", "bert-test", "--steps", "1", "--global-batch-size", "8", *args, cwd=tmp_path,
                    timeout=600)


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

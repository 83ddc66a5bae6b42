"""tests/dist_launcher.launch_plans_once: a failed launch is cached and re-raised, so the other tests of its world
fail at once instead of each launching it again."""
import pytest

from tests import dist_launcher


def test_failed_launch_is_raised_again_without_relaunching(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise dist_launcher.DistRunError("rank 0 exited with code 1")

    monkeypatch.setattr(dist_launcher, "run_ranks", failing)
    cache: dict = {}
    for _ in range(3):
        with pytest.raises(dist_launcher.DistRunError, match="code 1"):
            dist_launcher.launch_plans_once(cache, 2, [{"model": "bert-test", "plan": {}}], tmp_path / "r.json")
    assert len(calls) == 1


def test_successful_launch_is_read_once(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    calls = []

    def writing(*args, **kwargs):
        calls.append(args)
        out.write_text('{"cases": [1]}')

    monkeypatch.setattr(dist_launcher, "run_ranks", writing)
    cache: dict = {}
    assert dist_launcher.launch_plans_once(cache, 4, [], out) == {"cases": [1]}
    assert dist_launcher.launch_plans_once(cache, 4, [], None) == {"cases": [1]} and len(calls) == 1

"""train.py --save-every / --resume: a resumed run continues exactly where the saved one stopped.

One launch trains 8 steps with --save-every 4 (checkpoints step4 and step8; `latest` names step8).
Pointing `latest` back at step4 is what a run stopped after its 4th step would have left behind; a
second launch with --resume --steps 8 then trains steps 4..7, whose losses must equal the
uninterrupted run's (the model, the optimizer state and the data step all come back).
"""
from __future__ import annotations

import pytest

from tests.dist_launcher import REPO, run_ranks, step_losses


@pytest.mark.distributed
@pytest.mark.parametrize("plan", [["--zero-stage", "1"], ["--pp", "2", "--chunks", "2"]],
                         ids=["dp2-zero1", "pp2"])
def test_resume_continues_the_uninterrupted_run(tmp_path, plan):
    ckpt = tmp_path / "ckpt"
    common = ["--model", "bert-test", "--lr", "1e-3", "--save-dir", str(ckpt), *plan]
    run_ranks(REPO / "train.py", 2, [*common, "--steps", "8", "--save-every", "4",
                                     "--metrics-file", str(tmp_path / "full.jsonl")], timeout=300)
    assert (ckpt / "step4").is_dir() and (ckpt / "step8").is_dir()
    assert (ckpt / "latest").read_text() == "step8" and not list(ckpt.glob(".tmp-*"))
    (ckpt / "latest").write_text("step4")
    out = run_ranks(REPO / "train.py", 2, [*common, "--steps", "8", "--resume",
                                           "--metrics-file", str(tmp_path / "resumed.jsonl")], timeout=300)
    assert "resumed from" in out[0]
    full, resumed = step_losses(tmp_path / "full.jsonl"), step_losses(tmp_path / "resumed.jsonl")
    assert sorted(full) == list(range(8)) and sorted(resumed) == [4, 5, 6, 7]
    for step in range(4, 8):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), f"step {step}"
    assert (ckpt / "latest").read_text() == "step8"

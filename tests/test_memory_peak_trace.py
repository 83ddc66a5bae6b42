"""scripts/memory_peak_trace.py's replay of allocator events, on a hand-made snapshot (no GPU needed)."""
from __future__ import annotations

import pytest

from scripts.memory_peak_trace import grouped, live_at_peak, site


def _frames(path: str, line: int, name: str) -> list[dict]:
    return [{"filename": "/usr/lib/python3/threading.py", "line": 1, "name": "run"},
            {"filename": path, "line": line, "name": name}]


def test_replay_finds_the_peak_and_what_was_live_then():
    """Start (before the window): a 100-byte weight. Window: alloc act 50 (100 -> 150), alloc tmp 30 (180,
    the peak), free tmp (150), free act (100), alloc grad 60 (160). The snapshot's end holds weight + grad;
    at the peak weight, act and tmp were live: 180 bytes, grouped by the repository's frame."""
    act, tmp, grad = (_frames("model_zoo/t5/layer.py", 10, "forward"), _frames("backends/x.py", 5, "f"),
                      _frames("deepspeed/runtime/zero/stage_1_and_2.py", 7, "copy"))
    snap = {"segments": [{"device": 0, "blocks": [
        {"address": 1, "size": 100, "state": "active_allocated"},              # no frames: before the window
        {"address": 4, "size": 60, "state": "active_allocated", "frames": grad},
        {"address": 9, "size": 500, "state": "inactive"}]}],
        "device_traces": [[
            {"action": "alloc", "addr": 2, "size": 50, "frames": act},
            {"action": "alloc", "addr": 3, "size": 30, "frames": tmp},
            {"action": "free_requested", "addr": 3, "size": 30, "frames": tmp},
            {"action": "free_completed", "addr": 3, "size": 30, "frames": tmp},
            {"action": "free_completed", "addr": 2, "size": 50, "frames": act},
            {"action": "alloc", "addr": 4, "size": 60, "frames": grad}]]}
    peak, live, where = live_at_peak(snap, 0)
    assert peak == 180 and where == ["backends/x.py:5 f"]      # tmp's allocation reached it
    assert sorted(live) == [1, 2, 3]
    groups = {s: (b, n) for s, b, n in grouped(live)}
    assert groups == {"(allocated before the recorded window)": (100, 1), "model_zoo/t5/layer.py:10 forward": (50, 1),
                      "backends/x.py:5 f": (30, 1)}


@pytest.mark.parametrize("frames,expect", [
    (_frames("model_zoo/a.py", 3, "g"), "model_zoo/a.py:3 g"),
    ([{"filename": "/x/site-packages/transformers/models/t5/modeling_t5.py", "line": 8, "name": "forward"}],
     "transformers/models/t5/modeling_t5.py:8 forward"),
    ([{"filename": "/x/y/z.py", "line": 2, "name": "h"}], "z.py:2 h"),
])
def test_site_names_the_innermost_useful_frame(frames, expect):
    assert site(frames) == expect


def test_leftover_groups_the_live_blocks_by_site_with_the_largest_stack():
    """Two blocks from one DeepSpeed line (40 + 70 bytes) and one from a model line (20); an inactive cached
    block is not a leftover. Groups come largest first, each with its largest block's stack."""
    from scripts.memory_leftover_trace import by_site, live_blocks

    ds = _frames("deepspeed/runtime/zero/stage_1_and_2.py", 7, "init")
    ds_other = ds[:1] + [{"filename": "/x/deepspeed/runtime/zero/stage_1_and_2.py", "line": 7, "name": "init"}]
    snap = {"segments": [{"device": 0, "blocks": [
        {"address": 1, "size": 40, "state": "active_allocated", "frames": ds},
        {"address": 2, "size": 70, "state": "active_allocated", "frames": ds_other},
        {"address": 3, "size": 20, "state": "active_allocated", "frames": _frames("model_zoo/a.py", 3, "g")},
        {"address": 4, "size": 999, "state": "inactive"}]},
        {"device": 1, "blocks": [{"address": 5, "size": 5, "state": "active_allocated"}]}]}
    groups = by_site(live_blocks(snap, 0))
    mb = 2 ** 20
    assert [(g["site"], g["mb"] * mb, g["blocks"]) for g in groups] == [
        ("deepspeed/runtime/zero/stage_1_and_2.py:7 init", 110, 2), ("model_zoo/a.py:3 g", 20, 1)]
    assert groups[0]["largest_stack"] == ["threading.py:1 run", "deepspeed/runtime/zero/stage_1_and_2.py:7 init"]


@pytest.mark.parametrize("text,error", [("64,1,0,1", "bsz,chunks,ckpt,zero,precision"), ("a,1,0,1,bf16", "integers")])
def test_leftover_config_errors_name_the_problem(text, error):
    from scripts.memory_leftover_trace import parse_config

    with pytest.raises(ValueError, match=error):
        parse_config(text)

"""Copy some measured fields of every layer entry from a fresh model profile into an existing one.

    python scripts/merge_profile_fields.py --from new.json --into profiles/h100/t5-large.json [--out FILE]

For re-measuring one quantity without re-running everything else: e.g. after a change to a family's
profiling inputs, `autotune/profile_model.py --skip-other` gives new activation bytes, and this puts them
into the shipped profile while its times, engine block, workspace and calibration stay. Both files must
describe the same model and precision; every (layer type, TP degree) entry of --into must be in --from.
The provenance goes into the profile's `source`. Writes atomically (--out, default --into).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autotune.plan import write_json_atomic  # noqa: E402

ACT_FIELDS = ("act_bytes", "act_fixed_bytes", "ckpt_bytes", "act_measured", "act_check")


def merge(new: dict, into: dict, fields: tuple[str, ...]) -> list[str]:
    """Copy `fields` of every layer entry of `into` from `new`; returns one line per entry changed."""
    for key in ("model", "precision", "seq_len", "seq_lens"):
        if new.get(key) != into.get(key):
            raise ValueError(f"the profiles differ in {key}: {new.get(key)!r} against {into.get(key)!r}")
    changed = []
    for name, lt in into["layer_types"].items():
        for tp, entry in lt["tp"].items():
            src = new.get("layer_types", {}).get(name, {}).get("tp", {}).get(tp)
            if src is None:
                raise ValueError(f"--from has no {name} tp={tp} entry; profile that layer type and TP degree")
            missing = [f for f in fields if f not in src]
            if missing:
                raise ValueError(f"--from {name} tp={tp} lacks {', '.join(missing)}")
            before = {f: entry.get(f) for f in fields if isinstance(entry.get(f), int)}
            entry.update({f: src[f] for f in fields})
            changed.append(f"{name} tp={tp}: " + ", ".join(f"{f} {before.get(f)} -> {src[f]}" for f in fields
                                                           if isinstance(src[f], int)))
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="src", required=True, help="fresh profile (autotune/profile_model.py)")
    ap.add_argument("--into", required=True, help="profile to update")
    ap.add_argument("--fields", default=",".join(ACT_FIELDS), help="layer-entry fields to copy, comma-separated")
    ap.add_argument("--note", default="", help="why, for the provenance line")
    ap.add_argument("--out", default=None, help="where to write (default: --into)")
    args = ap.parse_args(argv)
    try:
        with open(args.src) as f:
            new = json.load(f)
        with open(args.into) as f:
            into = json.load(f)
        fields = tuple(x for x in args.fields.split(",") if x)
        changed = merge(new, into, fields)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    into.setdefault("source", {}).setdefault("merged", []).append(
        {"fields": list(fields), "from_command": new.get("source", {}).get("command"),
         "from_date": new.get("source", {}).get("date"), "note": args.note})
    out = args.out or args.into
    write_json_atomic(out, into)
    print("\n".join(changed))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Splits one envbox start into phases from its build-log timestamps (microsecond precision, unlike the
one-decimal "... in X s" lines). Prints `phase seconds` lines.

Usage: bench_phases.py ENVBOX_LOG T0 STAMP
  T0     epoch seconds when the pod was started; STAMP  epoch seconds the bootstrap wrote.
Phases: launch (pod start → "Pulling image"), pull (→ "Pulled"), prep (→ "Prepared the root filesystem"),
create (→ "Starting up workspace...": image facts, bundle, runtime create, network), start (→ "Envbox
startup complete!": runtime start), bootstrap (→ the bootstrap's first command).
"""
import json
import sys
from datetime import datetime, timezone


def epoch(ts):
    # RFC 3339 with up to nanoseconds and a Z: datetime takes microseconds.
    main, _, frac = ts.rstrip("Z").partition(".")
    dt = datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)


log, t0, stamp = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
marks = {}
starts = [
    ("pulling", "Pulling image "),
    ("pulled", "Pulled "),
    ("prepared", "Prepared the root filesystem"),
    ("starting", "Starting up workspace..."),
    ("complete", "Envbox startup complete!"),
]
with open(log, errors="replace") as f:
    for line in f:
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if not isinstance(o, dict) or o.get("type") != "info":
            continue
        for key, prefix in starts:
            if key not in marks and o.get("output", "").startswith(prefix):
                marks[key] = epoch(o["time"])
seq = [("launch", t0, "pulling"), ("pull", "pulling", "pulled"), ("prep", "pulled", "prepared"),
       ("create", "prepared", "starting"), ("start", "starting", "complete"), ("bootstrap", "complete", stamp)]
for name, a, b in seq:
    a = marks.get(a) if isinstance(a, str) else a
    b = marks.get(b) if isinstance(b, str) else b
    if a is not None and b is not None:
        print(f"{name} {b - a:.4f}")

#!/usr/bin/env python3
"""Run harbord unchanged, but time every garbage collection it does (a profiling aid).

    python3 bench/gc_probe.py --config FILE --state-dir DIR [harbord's other flags]

Same arguments as `python3 -m harbord`. On exit (SIGTERM) it writes one JSON line to
the file named by $GC_PROBE_OUT (else stderr): per generation, how many collections ran,
their total and longest pause in ms, and how many objects the collector tracked at the
end. Used by bench/run.py's `gc` step to tell whether GC pauses make harbord's p99.
With GC_PROBE_FREEZE=1 it calls gc.freeze() once the daemon is up (after imports), to
show what moving the start-up heap out of the collector's reach would change.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

stats = {g: {"collections": 0, "total_ms": 0.0, "max_ms": 0.0, "pauses_over_1ms": 0} for g in range(3)}
_started: list[float] = [0.0]


def _callback(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    s = stats[info["generation"]]
    s["collections"] += 1
    s["total_ms"] += ms
    s["max_ms"] = max(s["max_ms"], ms)
    if ms > 1.0:
        s["pauses_over_1ms"] += 1


def _dump() -> None:
    out = {"generations": stats, "tracked_objects": len(gc.get_objects()), "thresholds": gc.get_threshold(),
           "frozen": gc.get_freeze_count()}
    line = json.dumps(out)
    target = os.environ.get("GC_PROBE_OUT")
    if target:
        Path(target).write_text(line + "\n")
    else:
        print(line, file=sys.stderr)


def main() -> int:
    from harbord import daemon

    gc.callbacks.append(_callback)
    if os.environ.get("GC_PROBE_FREEZE") == "1":
        gc.collect()
        gc.freeze()
    try:
        return daemon.main(sys.argv[1:])
    finally:
        _dump()


if __name__ == "__main__":
    sys.exit(main())

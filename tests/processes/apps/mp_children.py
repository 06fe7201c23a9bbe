"""``multiprocessing`` children that track events and return without ``flush()``.

Run as ``python mp_children.py METHOD``; ``PROC_URL`` and ``PROC_DATA`` as for the apps. With
the fork method the children inherit the parent's Telemetry; with spawn and forkserver they
make their own (this module runs again in them as ``__mp_main__``)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

from common import make_telemetry

EVENTS = 500
tel = make_telemetry("mp")


def child(method: str) -> None:
    for i in range(EVENTS):
        tel.track("mp", {"rid": f"{method}-{os.getpid()}-{i}"})
    # returns: multiprocessing ends the process with os._exit, atexit never runs


if __name__ == "__main__":
    method = sys.argv[1]
    context = multiprocessing.get_context(method)
    procs = [context.Process(target=child, args=(method,)) for _ in range(2)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    seconds = round(time.monotonic() - started, 2)
    print(json.dumps({"exitcodes": [p.exitcode for p in procs], "seconds": seconds}))

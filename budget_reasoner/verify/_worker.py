"""The math-verify worker: a child process that parses and compares answers, one JSON line at a time.

    python -m budget_reasoner.verify._worker

Started by `verify/symbolic.py`, never by hand. It is a plain `python -m` child talking over pipes, not a
multiprocessing worker, so it never imports the caller's `__main__` (a script without a main guard, a
heredoc, a notebook all work). math-verify's own timeouts use signals, so they are off here: the parent
kills this process when a comparison runs past its deadline and starts a fresh one when next needed.

Protocol (one JSON object per line, UTF-8):
    ready:    {"ready": true}                      (or {"fatal": "why"}, then exit) once math-verify is imported
    request:  {"gold": "<reference>", "pred": "<answer>" | null}
    replies:  {"gold": "math" | "text" | "invalid"}  once the reference is parsed (cached), then,
              when pred is given and the reference is usable, {"equal": true | false}
The first reply lets the parent tell a reference that hangs the parser from a prediction that does; it
is sent at once only when the reference was parsed just now, else with the second, so that a warm
comparison costs the parent one wake-up (on a loaded machine each wake-up can wait milliseconds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from functools import lru_cache

# Characters that say "this is notation, not a word": a reference with them that math-verify cannot
# parse as math is broken notation (an error), while plain words ("Evelyn") compare as strings.
_NOTATION = re.compile(r"[\\{}^_()\[\]=+*/]")


def _exit_with_parent(parent: int) -> None:
    """EOF on stdin ends an idle worker when the parent dies; this ends one stuck in a long comparison too
    (when sympy lets go of the GIL) instead of leaving it to burn a core as an orphan."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the caller's terminal is the caller's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    out = sys.stdout
    try:
        from math_verify import parse, verify
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line, whatever it is
        out.write(json.dumps({"fatal": f"cannot import math_verify: {error}"}) + "\n")
        out.flush()
        return
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled": ours is outside

    @lru_cache(maxsize=2048)  # eval grades k samples against one reference: parse it once
    def parse_gold(reference: str):
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
        if any(not isinstance(item, str) for item in gold):
            return "math", gold
        if not gold or _NOTATION.search(reference):
            return "invalid", None
        return "text", gold

    @lru_cache(maxsize=4096)  # k samples often agree, and the vote compares the same answers again
    def parse_target(answer: str):
        return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)

    verify(parse_gold("\\frac{\\sqrt{2}}{x}")[1], parse_target("1/x"), timeout_seconds=None)  # load the grammar and
    out.write('{"ready": true}\n')  # sympy's lazy modules now, as startup, not inside the first answer's deadline
    out.flush()
    for line in sys.stdin:  # EOF (the parent closed the pipe or exited) ends the worker quietly
        request = json.loads(line)
        misses = parse_gold.cache_info().misses
        try:
            kind, gold = parse_gold(request["gold"])
        except Exception:  # noqa: BLE001 - RecursionError, lark and sympy errors: an unusable reference
            kind, gold = "invalid", None
        out.write(json.dumps({"gold": kind}) + "\n")
        if parse_gold.cache_info().misses != misses:
            out.flush()  # parsed just now: say so before comparing; a cached one goes with the answer (one wake-up)
        if request.get("pred") is None or kind == "invalid":
            continue
        try:
            target = parse_target(request["pred"])
            equal = bool(target) and bool(verify(gold, target, timeout_seconds=None))  # gold first: order matters
        except Exception:  # noqa: BLE001 - a prediction that breaks the parser is simply not equal
            equal = False
        out.write(json.dumps({"equal": equal}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

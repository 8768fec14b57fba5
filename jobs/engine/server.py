"""The model process: runs ``jobs.engine.tasks`` for the web process, which never imports torch.

``python -m jobs.engine.server [--once] [--idle SECONDS]`` reads one JSON request per line on
stdin, ``{"id": 1, "task": "check", "args": {...}}``, and answers on stdout with any
number of progress lines, ``{"id": 1, "progress": {...}}``, then exactly one
``{"id": 1, "result": ...}`` or ``{"id": 1, "error": {...}}``. An error carries a
StudioError's what/where/fix, or any other exception's type, message and traceback, so
the page can show the real cause.

A long-lived engine (``studio.engine`` keeps one for the forms and one for the
playground) exits after ``--idle`` seconds without a request, which frees every model it
holds; the next request starts a fresh one. ``--once`` answers one request and exits
(exports: a merge's memory goes back to the system when it is done).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import sys
import traceback
from typing import IO, Any

IDLE_SECONDS = 300.0  # a playground model costs its size in RAM; five quiet minutes and it goes


def describe_error(e: BaseException) -> dict:
    from adapters.core.errors import StudioError

    if isinstance(e, StudioError):
        return {"studio": True, "what": e.what, "where": e.where, "fix": e.fix}
    return {"studio": False, "type": type(e).__name__, "message": str(e),
            "traceback": "".join(traceback.format_exception(e))[-4000:]}


def answer(out: IO[str], request: dict) -> None:
    """Run one request and write its progress lines and its result (or error)."""
    from jobs.engine.tasks import TASKS

    rid = request.get("id")

    def send(message: dict) -> None:
        out.write(json.dumps({"id": rid, **message}, default=str) + "\n")
        out.flush()

    name = request.get("task")
    try:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
        result = TASKS[name](**(request.get("args") or {}), progress=lambda p: send({"progress": p}))
    except Exception as e:  # noqa: BLE001 - every failure goes back to the caller, the engine lives on
        send({"error": describe_error(e)})
        return
    send({"result": result})


def protocol_stream() -> IO[str]:
    """The real stdout, kept for answers; fd 1 then points at stderr, so a library that
    prints (a progress bar, a warning) cannot break a line of the protocol."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return proto


def serve(inp: IO[str], out: IO[str], *, once: bool = False, idle: float = IDLE_SECONDS) -> None:
    while True:
        if idle > 0 and not select.select([inp], [], [], idle)[0]:
            return  # idle: exiting frees every model this process holds
        line = inp.readline()
        if not line:
            return  # the web process closed the pipe (or died): nothing left to serve
        if not line.strip():
            continue
        try:
            request: Any = json.loads(line)
        except json.JSONDecodeError as e:
            out.write(json.dumps({"id": None, "error": describe_error(e)}) + "\n")
            out.flush()
            continue
        answer(out, request)
        if once:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.engine.server", description=__doc__.splitlines()[0])
    p.add_argument("--once", action="store_true", help="answer one request, then exit")
    p.add_argument("--idle", type=float, default=IDLE_SECONDS, help="exit after this many quiet seconds (0: never)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    out = protocol_stream()
    try:
        serve(sys.stdin, out, once=args.once, idle=0 if args.once else args.idle)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

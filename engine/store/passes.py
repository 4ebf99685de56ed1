"""Resumable passes: the one run API that labelling runs and context runs (and any later pass) share.

A pass walks ``n`` items (features, texts) in steps of a fixed size from item 0 and records how far
it got in its run row's ``n_done``. What makes it resumable exactly is one rule, kept here once:

- each step's rows are written *in the same transaction* that advances ``n_done`` from the step's
  start to its end (`ResumablePass.commit`), so the rows always belong to exactly ``[0, n_done)``:
  a kill loses at most the step in flight, and a resume continues at ``n_done`` with the same
  step boundaries;
- the advance is conditional on ``n_done`` still being the step's start and comes first in the
  transaction (it takes the run's row lock, the write lock on SQLite), so a second worker on the
  same run waits, then finds ``n_done`` moved and stops with the pass's conflict error instead of
  writing a step twice;
- a run is ``running`` while a worker holds it (its host and pid in ``params["worker"]``: a run
  whose process is gone reads as ``interrupted``), ``interrupted`` when stopped early (Ctrl-C, a
  step limit), ``failed`` with the error's message, and ``done`` when the last step commits.

The run tables differ (``label_runs``, ``context_runs``) and so do the rows a step writes; a
store mixin hands out a `ResumablePass` over its table (`engine.store.runs.RunsMixin.label_pass`,
`engine.store.contexts.ContextsMixin.context_pass`) with the step's row writer.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection, Engine

from engine.errors import AtlasError, ConnectionLostError, NotFoundError
from engine.util import failpoint, utcnow

COMMIT_RETRIES = 3  # times a step's transaction cut off by the database server is run again


def worker_params() -> dict[str, Any]:
    """Who is running a run: this host and process (a `running` run whose process is gone reads as interrupted)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class ResumablePass:
    """One run of a resumable pass, as its worker drives it: `start`, `steps`, `commit` each step, `status`.

    ``table`` is the run table (with ``id``, ``n_done``, ``status``, ``error``, ``params``,
    ``updated_at``); ``conflict`` the error a second worker gets, its message naming ``what`` (e.g.
    ``"labelling run"``) and the ``unit`` it counts (``"feature"``); ``failpoints`` names the
    `failpoint` before a step's commit and after it (fault-injection tests stop a write there).
    """

    def __init__(self, engine: Engine, table: Table, run_id: int, *, n: int, done: int, step: int,
                 conflict: type[AtlasError], what: str, unit: str, failpoints: str) -> None:
        self.engine, self.table, self.run_id = engine, table, run_id
        self.n, self.done, self.step = n, done, step
        self.conflict, self.what, self.unit, self.failpoints = conflict, what, unit, failpoints

    def set_status(self, status: str, **fields: Any) -> None:
        """Set the run's status (and other columns of its row, e.g. ``error``, ``params``)."""
        with self.engine.begin() as conn:
            conn.execute(update(self.table).where(self.table.c.id == self.run_id)
                         .values(status=status, updated_at=utcnow(), **fields))

    def start(self, params: dict[str, Any]) -> None:
        """Mark the run ``running`` by this process: ``params`` (the run's) plus this worker, no error."""
        self.set_status("running", error=None, params={**params, "worker": worker_params()})

    def steps(self, stop: int | None = None, start: int | None = None) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` of the steps from ``start`` (``n_done`` by default: the resume point; else a
        step boundary) to ``stop`` (the end by default; the last step may be cut there)."""
        stop = self.n if stop is None else min(self.n, stop)
        lo = self.done if start is None else start
        while lo < stop:
            hi = min(stop, lo + self.step)
            yield lo, hi
            lo = hi

    def commit(self, lo: int, hi: int, write: Callable[[Connection], None]) -> None:
        """Advance ``n_done`` from ``lo`` to ``hi`` and run ``write(connection)`` (the step's rows) in one
        transaction; the guarded advance comes first. Another worker's advance is the pass's ``conflict``.

        A transaction cut off by the database server (`ConnectionLostError`: a PostgreSQL restart)
        is retried: ``n_done``, read again, says whether it committed (``hi``: only the answer was
        lost) or left nothing (``lo``: run it again)."""
        for attempt in range(COMMIT_RETRIES + 1):
            try:
                self._commit_once(lo, hi, write)
                break
            except ConnectionLostError:
                done = self._n_done()
                if done == hi:
                    break
                if done != lo or attempt == COMMIT_RETRIES:
                    raise
        failpoint(f"{self.failpoints}_committed")
        self.done = hi

    def _n_done(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(self.table.c.n_done).where(self.table.c.id == self.run_id)).scalar_one())

    def _commit_once(self, lo: int, hi: int, write: Callable[[Connection], None]) -> None:
        with self.engine.begin() as conn:
            res = conn.execute(
                update(self.table).where(self.table.c.id == self.run_id, self.table.c.n_done == lo)
                .values(n_done=hi, status="done" if hi >= self.n else "running", updated_at=utcnow())
            )
            if res.rowcount != 1:
                if conn.execute(select(self.table.c.id).where(self.table.c.id == self.run_id)).first() is None:
                    raise NotFoundError(f"this {self.what} was removed while it ran (`atlas remove --cascade`, "
                                        f"`atlas map remove --cascade` or a run removal); stopped at {self.unit} {lo}")
                raise self.conflict(f"another process advanced this {self.what} past {self.unit} {lo}; stopped")
            write(conn)
            failpoint(f"{self.failpoints}_before_commit")

    @contextlib.contextmanager
    def running(self) -> Iterator[ResumablePass]:
        """The block that carries the pass out: Ctrl-C leaves the run ``interrupted``, an error ``failed``
        (with its message; both resume), a conflict untouched (the other worker owns the status), and
        a block that ends before the last step ``interrupted``."""
        try:
            yield self
        except KeyboardInterrupt:
            self.set_status("interrupted")
            raise
        except (self.conflict, NotFoundError):  # another worker owns the status, or there is no run any more
            raise
        except BaseException as e:
            self.set_status("failed", error=f"{type(e).__name__}: {e}")
            raise
        if self.done < self.n:
            self.set_status("interrupted")


def worker_status(status: str, params: dict[str, Any] | None) -> str:
    """A run's status, ``interrupted`` where it says ``running`` but its worker on this host is gone."""
    worker = (params or {}).get("worker") or {}
    if status == "running" and worker.get("host") == socket.gethostname() and not process_alive(worker.get("pid")):
        return "interrupted"  # its process is gone (killed): resume it
    return status


def process_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is not running either
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True

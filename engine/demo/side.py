"""The demo's stages in other processes, beside the rest: ``python -m engine.demo.side JOB``.

Two groups of stages share nothing with the others but the store and the world folder, both of
which take concurrent processes (every write is a claimed file or a transaction):

- ``sae``: SAE labelling (`atlas eval labelling --world --features sae`, which trains the
  subjects' SAEs) and steering with SAE latents (`atlas eval steering --world --sae`); they fit
  maps of their own, so they start as soon as the world is built;
- ``against_topic``: the against-topic table (`atlas eval steering --world`), through the maps
  the demo fitted, so it starts once they are stored.

Run beside the demo's own stages, they keep both cores of a 2-core machine busy where one process
mostly uses one. Each child is a fresh interpreter (as the world's trainers are:
`engine.world.pipeline`), not a multiprocessing spawn, so no caller's main module is re-imported.
It prints one JSON line: its stages' results and timings, or ``{"error": ...}`` for an engine error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.errors import AtlasError
from engine.util import to_plain

if TYPE_CHECKING:
    from engine.demo.clock import StageClock
    from engine.store.store import Store


def start(store_dir: str, group: str, job: dict[str, Any]) -> subprocess.Popen:
    """Start the stage ``group`` (a name in `GROUPS`) on the store at ``store_dir`` (a SQLite store:
    the demo's own); ``job``: size, seed, device, dtype and the group's own settings."""
    if group not in GROUPS:
        raise ValueError(f"unknown stage group {group!r}; known: {sorted(GROUPS)}")
    payload = {**job, "store": os.path.abspath(store_dir), "group": group}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "engine.demo.side", json.dumps(payload)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> dict[str, Any]:
    """Wait for a stage group and return its results (an engine error is raised again here)."""
    out, err = proc.communicate()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    if result is None:
        tail = "\n".join(err.strip().splitlines()[-20:])
        raise RuntimeError(f"the demo's stages in another process failed (exit code {proc.returncode}):\n{tail}")
    if "error" in result:
        raise AtlasError(result["error"])
    return result


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill stage groups still running (the demo failed or was interrupted)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _sae(store: Store, job: dict[str, Any], clock: StageClock) -> dict[str, Any]:
    from engine.world.eval.sae_labelling import MapFitting, evaluate_sae_labelling

    size, seed, device, dtype = job["size"], job["seed"], job["device"], job["dtype"]
    rows = clock("eval_sae_labelling", evaluate_sae_labelling, store, size, seed, quiet=True,
                 fitting=MapFitting(device=device, dtype=dtype))
    steering = clock("eval_sae_steering", _sae_steering, store, size, seed, True, device, dtype)
    return {"sae_labelling": to_plain(rows), "sae_steering": steering}


def _sae_steering(store: Store, size: str, seed: int, quiet: bool, device: str, dtype: str) -> dict[str, Any]:
    """`atlas eval steering --world --sae` on subject A: its rows (table=sae), what was chosen, coverage."""
    from engine.world.eval.sae_steering import evaluate_sae_steering

    report, info = evaluate_sae_steering(store, size, seed, subject="a", quiet=quiet, device=device, dtype=dtype)
    return {"rows": [{**to_plain(r), "table": "sae"} for r in report.rows], "chosen": to_plain(report.chosen),
            "summary": list(report.summary), "settings": to_plain(report.settings), "coverage": info["coverage"],
            "n_concepts": info["n_concepts"], "maps": info["maps"]}


def _against_topic(store: Store, job: dict[str, Any], clock: StageClock) -> dict[str, Any]:
    """The against-topic table on subject A (``job["grid"]``: a `SteeringGrid`'s fields, or None: the default)."""
    from engine.steering.faithfulness import SteeringGrid
    from engine.world.eval.against_topic import evaluate_world_against_topic

    grid = {"grid": SteeringGrid(**job["grid"])} if job.get("grid") else {}
    against = clock("eval_against_topic", evaluate_world_against_topic, store, job["size"], job["seed"],
                    subject="a", quiet=True, device=job["device"], dtype=job["dtype"], **grid)
    return {"against_topic": {"rows": to_plain(against.rows), "chosen": against.chosen, "summary": against.summary,
                              "settings": against.settings}}


GROUPS: dict[str, Callable[[Store, dict[str, Any], StageClock], dict[str, Any]]] = {
    "sae": _sae,
    "against_topic": _against_topic,
}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from engine.demo.clock import StageClock
    from engine.progress import set_quiet
    from engine.store.store import Store

    set_quiet(True)  # the parent's bars own the terminal
    store = Store.open(job["store"])
    clock = StageClock()
    result = GROUPS[job["group"]](store, job, clock)
    return {**result, "timings": clock.wall, "cpu_timings": clock.cpu}


def _exit_with_parent() -> None:
    """Stop when the demo that started this process is gone (killed, interrupted): never an orphan."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> None:
    _exit_with_parent()
    try:
        result = _run(json.loads(argv[0]))
    except AtlasError as e:
        result = {"error": str(e)}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

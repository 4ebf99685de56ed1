"""The demo's SAE stages in a second process, beside the others: ``python -m engine.demo.side JOB``.

SAE labelling (`atlas eval labelling --world --features sae`) and steering with SAE latents
(`atlas eval steering --world --sae`) share nothing with the demo's other stages but the store
and the world folder, both of which take concurrent processes (every write is a claimed file or a
transaction). Run beside them, the demo uses both cores of a 2-core machine where one process
mostly uses one. The child is a fresh interpreter (as the world's trainers are:
`engine.world.pipeline`), not a multiprocessing spawn, so no caller's main module is re-imported.
It prints one JSON line: the SAE rows, the SAE steering summary and the stages' timings, or
``{"error": ...}`` for an engine error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from engine.errors import AtlasError
from engine.util import to_plain

if TYPE_CHECKING:
    from engine.store.store import Store


def start(store_dir: str, size: str, seed: int, device: str, dtype: str) -> subprocess.Popen:
    """Start the SAE stages on the store at ``store_dir`` (a SQLite store: the demo's own)."""
    job = {"store": os.path.abspath(store_dir), "size": size, "seed": seed, "device": device, "dtype": dtype}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen([sys.executable, "-m", "engine.demo.side", json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> dict[str, Any]:
    """Wait for the SAE stages and return their results (an engine error is raised again here)."""
    out, err = proc.communicate()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    if result is None:
        tail = "\n".join(err.strip().splitlines()[-20:])
        raise RuntimeError(f"the demo's SAE stages failed (exit code {proc.returncode}):\n{tail}")
    if "error" in result:
        raise AtlasError(result["error"])
    return result


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from engine.demo.clock import StageClock
    from engine.progress import set_quiet
    from engine.store.store import Store
    from engine.world.eval.sae_labelling import MapFitting, evaluate_sae_labelling

    set_quiet(True)  # the parent's bars own the terminal
    store = Store.open(job["store"])
    size, seed, device, dtype = job["size"], job["seed"], job["device"], job["dtype"]
    clock = StageClock()
    rows = clock("eval_sae_labelling", evaluate_sae_labelling, store, size, seed, quiet=True,
                 fitting=MapFitting(device=device, dtype=dtype))
    steering = clock("eval_sae_steering", _sae_steering, store, size, seed, True, device, dtype)
    return {"sae_labelling": to_plain(rows), "sae_steering": steering, "timings": clock.wall, "cpu_timings": clock.cpu}


def _sae_steering(store: Store, size: str, seed: int, quiet: bool, device: str, dtype: str) -> dict[str, Any]:
    """`atlas eval steering --world --sae` on subject A: its rows (table=sae), what was chosen, coverage."""
    from engine.world.eval.sae_steering import evaluate_sae_steering

    report, info = evaluate_sae_steering(store, size, seed, subject="a", quiet=quiet, device=device, dtype=dtype)
    return {"rows": [{**to_plain(r), "table": "sae"} for r in report.rows], "chosen": to_plain(report.chosen),
            "summary": list(report.summary), "settings": to_plain(report.settings), "coverage": info["coverage"],
            "n_concepts": info["n_concepts"], "maps": info["maps"]}


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

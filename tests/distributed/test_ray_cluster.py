"""Work on a real Ray cluster under faults: a head and a second node, each started by `ray start` on
this machine with one CPU, and the driver `atlas ... --ray-address 127.0.0.1:PORT`, a separate
process, as a user runs it (Ray registers the nodes under the host's own address: it refuses a
multi-node cluster on loopback alone). The second node is killed (every process of it at once, SIGKILL: a machine lost) while a task of
the run is running on it; the run must end with exactly the rows (the maps) of an in-process run,
either at once (Ray runs the lost tasks again on the head) or after it stopped with a one-line
error and was resumed.

When a task runs on the node is read from the node's processes: a Ray worker's process title is
``ray::_call`` while it runs one of the engine's tasks (`engine.distributed.ray_exec._call`).
Each node is a session of its own (`ray start --block` in a new session; Ray's workers keep it),
so the node's processes are the session's. The cluster has its own temporary folder and token
(token authentication, Ray's default for `ray start` where a token exists), so it never meets
another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from engine.align.map import load_map
from engine.labelling import run as labelling
from tests.labelling.test_labelling import rows_of
from tests.search.test_search import D_SUBJECT, make_mapped_store

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
pytestmark = [
    pytest.mark.skipif(RAY is None, reason="no `ray` command next to this Python"),
    pytest.mark.slow,  # a cluster of `ray start` processes and a driver process: `-m "not slow"` stays quick; CI runs it
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` (head or not) in a new session: its processes are the session's."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                          "--object-store-memory=80000000", "--disable-usage-stats", *args],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    stat = (p / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[3]) == self.proc.pid:  # field 6: the session id
                    out.append(int(p.name))
        return out

    def running_task(self) -> bool:
        """Whether one of this node's workers runs an engine task now."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_call"):
                    return True
            except OSError:
                pass
        return False

    def wait_started(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < end, f"the Ray node did not start in {timeout:.0f} s"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL every process of the node at once (its raylet, object store, workers)."""
        for _ in range(3):  # a process forked while the list was read is caught by the next pass
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        self.proc.wait(timeout=30)


class Cluster:
    """A head node on loopback, and second nodes added and killed by the tests."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0", "ATLAS_QUIET": "1",
            # a lost node is declared dead after ~1.5 s (Ray's default: ~15 s)
            "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
        }
        self.nodes: list[Node] = []
        head = self._node(["--head", f"--port={self.port}", f"--temp-dir={self.tmp}", "--include-dashboard=false"])
        head.wait_started()

    def _node(self, args: list[str]) -> Node:
        node = Node(args, self.env, self.tmp / f"node{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def add_node(self) -> Node:
        node = self._node([f"--address={self.address}"])
        node.wait_started()
        return node

    def atlas(self, *args: str) -> subprocess.Popen:
        """`atlas ARGS` in a new process (the driver), on this cluster's environment."""
        return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def run_killing(cluster: Cluster, node: Node, args: list[str], timeout: float = 300) -> tuple[bool, subprocess.CompletedProcess]:
    """Run `atlas ARGS` on the cluster and kill ``node`` as soon as a task of it runs there.
    Returns (whether the node was killed mid-run, the finished driver)."""
    driver = cluster.atlas(*args)
    killed = False
    end = time.monotonic() + timeout
    while driver.poll() is None and time.monotonic() < end:
        if not killed and node.running_task():
            node.kill()
            killed = True
        time.sleep(0.02)
    out, err = driver.communicate(timeout=max(1.0, end - time.monotonic()))
    return killed, subprocess.CompletedProcess(args, driver.returncode, out, err)


def _one_line_error(r: subprocess.CompletedProcess) -> bool:
    err = r.stderr.strip()
    return r.returncode == 1 and err.startswith("Error: ") and len(err.splitlines()) == 1


def test_a_node_lost_while_labelling_leaves_exactly_the_in_process_rows(cluster, store, tmp_path):
    make_mapped_store(store)
    feats = np.random.default_rng(3).normal(size=(2000, D_SUBJECT)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    labelling.label_features(store, "m", str(tmp_path / "f.npy"), k=3, batch_size=25, name="here", quiet=True)

    node = cluster.add_node()
    args = ["--store", str(store.path), "--ray-address", cluster.address, "--json"]
    killed, r = run_killing(cluster, node, ["label", "m", "--features", str(tmp_path / "f.npy"), "-k", "3",
                                            "--batch", "25", "--name", "there", *args])
    assert killed, "no task ran on the second node"
    if r.returncode != 0:  # stopped: a one-line error, and the run resumes (on the head alone)
        assert _one_line_error(r), r.stderr[-3000:]
        r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "--resume", "there", *args],
                           env=cluster.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["status"] == "done"
    rows = rows_of(store, "there")
    assert len(rows) == len({row[:2] for row in rows}) == 2000 * 3  # each (feature, rank) once
    assert rows == rows_of(store, "here")


def test_a_node_lost_during_a_fit_leaves_the_in_process_map(cluster, store, tmp_path):
    import random

    from click.testing import CliRunner

    from engine.cli import cli
    from engine.store.store import AtlasSource
    from tests.tiny_models import CORPUS, save_tiny, word_tokenizer

    word = word_tokenizer()
    store.add_model("found", source=str(save_tiny(tmp_path / "found", "gpt2", word, d=48, seed=1)), d_model=48,
                    n_layers=2)
    store.add_atlas("atl", np.random.default_rng(0).normal(size=(6, 48)), [f"c{i}" for i in range(6)],
                    source=AtlasSource(model="found", layer=1))
    subject = save_tiny(tmp_path / "subj", "llama", word, d=32, seed=2)
    words = " ".join(CORPUS).replace(".", "").replace("!", "").split()
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) + "." for _ in range(600)) + "\n")
    base = ["--layer", "1", "--atlas", "atl", "--corpus", str(corpus), "--json", "--store", str(store.path)]
    here = CliRunner().invoke(cli, ["align", str(subject), *base, "--name", "here"])
    assert here.exit_code == 0, here.output

    node = cluster.add_node()
    there = ["align", "subj", *base, "--name", "there", "--ray-address", cluster.address]
    killed, r = run_killing(cluster, node, there)
    assert killed, "no task ran on the second node"
    if r.returncode != 0:  # stopped: a one-line error, no map saved; the same command again fits it
        assert _one_line_error(r), r.stderr[-3000:]
        assert "there" not in {m.name for m in store.maps()}
        r = subprocess.run([sys.executable, "-m", "engine.cli", *there], env=cluster.env, capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    h, t = json.loads(here.output), json.loads(r.stdout)
    for key in ("subject_layer", "n_pairs", "corpus_fingerprint"):
        assert t[key] == h[key], key
    a, b = load_map(store, "here"), load_map(store, "there")
    # the same map to float32 rounding: the shards' statistics are summed in another order
    for x, y in ((a.weight, b.weight), (a.subject_mean, b.subject_mean), (a.atlas_mean, b.atlas_mean)):
        assert np.linalg.norm(x.astype(np.float64) - y) <= 1e-5 * np.linalg.norm(x)


def test_a_driver_without_the_cluster_token_is_told_so(cluster, store, tmp_path):
    """The cluster uses token authentication: a driver without the token fails in one line that says
    what to set (Ray's own message is only 'Failed to connect to Ray cluster')."""
    make_mapped_store(store)
    np.save(tmp_path / "f.npy", np.zeros((3, D_SUBJECT), dtype=np.float32) + 1)
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")  # not ~/.ray/auth_token either
    r = subprocess.run([sys.executable, "-m", "engine.cli", "label", "m", "--features", str(tmp_path / "f.npy"),
                        "--store", str(store.path), "--ray-address", cluster.address], env=env, capture_output=True,
                       text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]  # Ray logs its retries above the command's own line
    assert r.returncode == 1 and last.startswith("Error: could not start or join the Ray cluster"), r.stderr[-3000:]
    assert "RAY_AUTH_TOKEN" in last and "Traceback" not in r.stderr

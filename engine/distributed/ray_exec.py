"""Run library functions on Ray workers: the session, the store's location, ordered results.

Why results come back in submission order: the driver folds them in that order (label rows are
committed batch after batch through the run's guard), so a shard that finishes early waits in
memory until the shards before it are in; at most ``window`` shards are in flight, which bounds
that memory. Why a killed worker costs nothing: a Ray task whose worker process dies is run again
(``max_retries``), and a task only *returns* data: nothing it computes is written until the driver
has it, so a retried shard is simply computed twice and used once. The same holds for a lost node
(its tasks run again on the nodes left: tests/distributed/test_ray_cluster.py kills one mid-run).

Workers find the store by its folder and database URL (`StoreLocation`): on one machine that is
always true; on a cluster (``address``) the store folder must be reachable at the same path from
every node (a shared filesystem), and an SQLite database must be on it too (or use --db-url).

Fault injection reaches the workers: the driver's ``$ATLAS_FAILPOINT`` and
``$ATLAS_FAILPOINT_ONCE`` (see `indexes.base.failpoint`) are set in each task's environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import AtlasError, BadValueError
from engine.extras import install_message
from indexes.base import FAILPOINT_ENV, FAILPOINT_ONCE_ENV

if TYPE_CHECKING:
    from engine.store.store import Store

DEFAULT_RETRIES = 3  # a task whose worker dies is run again this many times before the run fails
_FORWARDED_ENV = (FAILPOINT_ENV, FAILPOINT_ONCE_ENV)


class RayUnavailableError(AtlasError):
    """Ray is not installed, or the cluster at ``--ray-address`` cannot be reached."""


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """Where and how shards run on Ray."""

    address: str | None = None
    """A running cluster (``ray://host:10001`` or ``host:6379``); ``None`` starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of a local Ray (its workers); ``None``: all of this machine's. Ignored with ``address``."""
    max_retries: int = DEFAULT_RETRIES
    """Times a task whose worker process died is run again."""
    object_store_mb: int | None = None
    """Object store of a local Ray, in MiB (``None``: Ray's default, 30% of memory)."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise BadValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.max_retries < 0:
            raise BadValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.object_store_mb is not None and self.object_store_mb < 80:
            raise BadValueError(f"object_store_mb must be >= 80 (Ray's minimum), got {self.object_store_mb}")
        if self.address is not None and not self.address.strip():
            raise BadValueError("the Ray address is empty; give host:port or ray://host:port")


@dataclasses.dataclass(frozen=True)
class StoreLocation:
    """How a worker opens the driver's store: its absolute folder and database URL."""

    path: str
    db_url: str

    @classmethod
    def of(cls, store: Store) -> StoreLocation:
        return cls(str(Path(store.path).resolve()), store.engine.url.render_as_string(hide_password=False))

    def open(self) -> Store:
        from engine.store.store import Store

        return Store.open(self.path, db_url=self.db_url)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(install_message("ray", "running on Ray")) from None
    return ray


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[Any]:
    """Ray, connected: a Ray this process already started is used as it is (and left running);
    else a local one is started (or the cluster at ``config.address`` joined) and shut down after."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                              "configure_logging": True}
    if config.address is None:
        kwargs["num_cpus"] = config.num_cpus
        if config.object_store_mb is not None:
            kwargs["object_store_memory"] = config.object_store_mb * 1024 * 1024
    if config.address is not None:
        _probe(config.address)
    # Ray prints what the cluster reports to a driver (a node lost, a worker killed) on stdout, from
    # a thread of its own: to stderr instead, so that stdout stays the command's (`--json`)
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        try:
            ray.init(address=config.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = f"the Ray cluster at {config.address!r}" if config.address else "a local Ray"
            raise RayUnavailableError(f"could not start or join {where}: {str(e).splitlines()[0]}{_hint(e)}") from None
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        if sys.stdout is sys.stderr:  # not where someone else has set it since (a session closed late)
            sys.stdout = out


def _hint(e: BaseException) -> str:
    """What to do about a refused join, where Ray's own message buries it in its causes."""
    chain: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(type(c).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(c) for c in chain):
        return ("; the cluster wants its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "~/.ray/auth_token) as on the cluster's nodes")
    return ""


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast where nothing listens at ``host:port`` (Ray itself retries for minutes)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadValueError(f"the Ray address must be host:port or ray://host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailableError(f"no Ray cluster answers at {address!r} ({e.strerror or e}); start one with "
                                  "`ray start --head` or check --ray-address") from None


def cluster_cpus(ray: Any) -> int:
    """CPUs of the connected cluster (at least 1): how many shards run at once."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _call(fn: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str]) -> Any:
    """What a Ray task runs: ``fn(*args)`` with the driver's fault-injection settings."""
    old = {k: os.environ.get(k) for k in _FORWARDED_ENV}
    os.environ.update(env)
    for k in _FORWARDED_ENV:
        if k not in env:
            os.environ.pop(k, None)
    try:
        return fn(*args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def map_ordered(ray: Any, fn: Callable[..., Any], shards: Iterable[tuple[Any, ...]], *, window: int,
                max_retries: int = DEFAULT_RETRIES) -> Iterator[Any]:
    """``fn(*shard)`` for each shard on Ray workers (one CPU each), yielded in the shards' order.

    At most ``window`` tasks are submitted ahead of the one being yielded. A task whose worker
    dies is retried ``max_retries`` times; an exception raised by ``fn`` is not retried (it would
    raise again) and is re-raised here as itself. Stopping the iteration cancels what is in flight.
    """
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_call)
    fn_ref = ray.put(fn)
    pending: deque[Any] = deque()
    it = iter(shards)
    try:
        for shard in it:
            pending.append(task.remote(fn_ref, shard, env))
            if len(pending) >= max(1, window):
                yield _get(ray, pending.popleft())
        while pending:
            yield _get(ray, pending.popleft())
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # fn raised: re-raise the library's own exception
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise
    except ray.exceptions.WorkerCrashedError:
        raise AtlasError("a Ray worker died more times than its task's retries allow; the work can be resumed") from None

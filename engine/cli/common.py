"""Shared pieces of the CLI: the store options, output formatting, and error translation.

The CLI is a thin layer: every command calls one engine function that returns plain data, and
formats it here as a table (on a terminal) or JSON (``--json``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from engine.align.methods import METHODS
from engine.extras import checked_db_url, require
from engine.util import to_plain

if TYPE_CHECKING:
    from engine.distributed import RayConfig
    from engine.store.reads import StoreReads
    from engine.store.store import Store

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STORE = "./atlas-store"
# The registered alignment methods, for help texts (the engine checks names).
METHOD_NAMES = tuple(METHODS)


def store_options(f: Callable) -> Callable:
    """Add ``--store`` and ``--db-url`` to a command; the command receives ``store_dir``, ``db_url``."""
    f = click.option(
        "--db-url",
        envvar="ATLAS_DB_URL",
        default=None,
        callback=lambda _ctx, _param, url: checked_db_url(url),  # psycopg checked before the store opens
        help="SQLAlchemy URL of the metadata database (default: the one `atlas init --db-url` recorded in "
             "the store, else its SQLite file atlas.db). Env: ATLAS_DB_URL.",
    )(f)
    f = click.option(
        "--store",
        "store_dir",
        envvar="ATLAS_STORE",
        default=DEFAULT_STORE,
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Store directory (database, vectors, indexes, maps). Env: ATLAS_STORE.",
    )(f)
    return f


WORLD_SIZES = ("tiny", "small", "medium")  # ConceptWorld's sizes (engine.world.config.SIZES; a test keeps them in step)


def world_options(size: str = "tiny", *, sizes: Sequence[str] = WORLD_SIZES, size_help: str | None = None,
                  seed_help: str = "World seed.") -> Callable[[F], F]:
    """Add ``--size`` and ``--seed`` (the command receives ``size``, ``seed``): which ConceptWorld;
    ``size`` is the default size."""

    def deco(f: F) -> F:
        f = click.option("--seed", type=int, default=0, show_default=True, help=seed_help)(f)
        return click.option("--size", type=click.Choice(list(sizes)), default=size, show_default=True,
                            help=size_help)(f)

    return deco


def json_option(f: Callable) -> Callable:
    """Add ``--json``: print machine-readable JSON instead of a table."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (for scripts).")(f)


def open_store(store_dir: Path, db_url: str | None) -> Store:
    """Open an initialised store (errors become one-line CLI messages)."""
    from engine.store.store import Store

    return Store.open(store_dir, db_url=db_url)


def open_read_store(store_dir: Path, db_url: str | None) -> StoreReads:
    """Open a store for a one-shot read (``atlas show``, ``neighbors``, ``lookup``): the plain
    ``sqlite3`` reader where the store keeps its metadata in its own SQLite file and no --db-url is
    given (`engine.store.reader`: no SQLAlchemy import), else the full store. Both answer alike."""
    if db_url is None:
        from engine.store.reader import open_reader

        reader = open_reader(store_dir)
        if reader is not None:
            return reader
    return open_store(store_dir, db_url)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(to_plain(obj), indent=2, ensure_ascii=False))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows (dicts) as an aligned plain-text table."""
    if not rows:
        click.echo("(none)")
        return
    cols = list(columns) if columns else list(rows[0].keys())
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def emit(obj: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    """Print a dataclass / list of dataclasses as JSON or as a table."""
    if as_json:
        print_json(obj)
        return
    plain = to_plain(obj)
    if isinstance(plain, dict):
        width = max(len(k) for k in plain) if plain else 0
        for k, v in plain.items():
            click.echo(f"{k.ljust(width)}  {v if not isinstance(v, float) else f'{v:.4f}'}")
    else:
        print_table(plain, columns)


def quiet_option(f: Callable) -> Callable:
    """Add ``--quiet``: no progress bars."""

    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    @functools.wraps(f)
    def wrapper(*args: Any, quiet: bool = False, **kwargs: Any) -> Any:
        from engine.progress import set_quiet

        set_quiet(quiet or not sys.stderr.isatty() or bool(os.environ.get("ATLAS_QUIET")))
        return f(*args, **kwargs)

    return wrapper


def comma_list(kind: Callable[[str], Any] = str, expected: str = "values like a,b") -> Callable:
    """A click callback for a repeatable option: ``("1,2", "3")`` → ``[kind("1"), kind("2"), kind("3")]``;
    nothing → None; a value ``kind`` rejects → a usage error saying what was ``expected``."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: Sequence[str]) -> list[Any] | None:
        if not value:
            return None
        try:
            return [kind(v.strip()) for chunk in value for v in str(chunk).split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected {expected}, got {' '.join(value)!r}") from None

    return callback


LAYER_LIST = "layer numbers like 2 or 1,3"


def layers_option(help: str) -> Callable[[F], F]:
    """Add ``--layers``/``-l`` (repeatable, comma-separated layer numbers; the command receives
    ``layers``: a list of ints, or None when not given)."""
    return click.option("--layers", "-l", multiple=True, callback=comma_list(int, LAYER_LIST), help=help)


def device_options(f: Callable) -> Callable:
    """Add ``--device`` and ``--dtype`` (the command receives ``device``, ``dtype``): where and in which
    precision models run (`engine.models.devices`; checked when a model is loaded)."""
    f = click.option("--dtype", default="auto", show_default=True, metavar="auto|float32|bfloat16|float16",
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Precision the models are loaded in; auto: bfloat16 on CUDA, float32 elsewhere. "
                          "Activations leave the device as float32 (statistics are float64).")(f)
    f = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                     envvar="ATLAS_DEVICE",
                     help="Where models run; auto: CUDA, else MPS, else CPU. Env: ATLAS_DEVICE.")(f)
    return f


def ray_options(f: Callable) -> Callable:
    """Add ``--ray`` and ``--ray-address`` (the command receives ``ray``: a `RayConfig`, or None to
    run in this process)."""

    @click.option("--ray", "use_ray", is_flag=True,
                  help="Run the work as Ray tasks on a local Ray (one worker per CPU); needs the ray extra.")
    @click.option("--ray-address", metavar="HOST:PORT",
                  help="Run on the Ray cluster at this address (ray://HOST:PORT or HOST:PORT; implies --ray). "
                       "Every node must reach the store folder at the same path (a shared filesystem).")
    @functools.wraps(f)
    def wrapper(*args: Any, use_ray: bool = False, ray_address: str | None = None, **kwargs: Any) -> Any:
        config: RayConfig | None = None
        if use_ray or ray_address is not None:
            require("ray", "--ray / --ray-address")
            from engine.distributed import RayConfig

            config = RayConfig(address=ray_address)
        return f(*args, ray=config, **kwargs)

    return wrapper


def quiet_transformers() -> None:
    """Silence transformers' weight-loading bars for this process: the engine's bars say what is
    going on (`engine.models.loading.quiet_transformers`, imported when called: it loads torch)."""
    from engine.models.loading import quiet_transformers as quiet

    quiet()


def describe_removal(removal: Any) -> str:
    """One line saying what a removal (`engine.store.atlases.Removal`) deleted."""
    parts = [f"atlas {', '.join(removal.atlases)}"] if removal.atlases else []
    if removal.maps:
        parts.append(f"{len(removal.maps)} map(s) ({', '.join(removal.maps)})")
    if removal.runs:
        parts.append(f"{len(removal.runs)} labelling run(s) ({', '.join(removal.runs)}) with "
                     f"{removal.n_labels} label rows")
    return "removed " + ", ".join(parts)

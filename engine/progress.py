"""The one progress-bar helper of the engine.

Long work (training, activation collection, labelling) reports progress through `progress()`. The
bar goes to stderr, and is silent when stderr is not a terminal (pipes, CI) or when the caller
passes ``quiet=True`` (the CLI's ``--quiet``), so scripts reading ``--json`` output see only data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar, overload

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar in this process."""
    global _QUIET
    _QUIET = quiet


@overload
def progress(
    iterable: Iterable[T],
    *,
    total: int | None = ...,
    desc: str | None = ...,
    unit: str = ...,
    quiet: bool = ...,
    initial: int = ...,
) -> Iterator[T]: ...


@overload
def progress(
    iterable: None = ...,
    *,
    total: int | None = ...,
    desc: str | None = ...,
    unit: str = ...,
    quiet: bool = ...,
    initial: int = ...,
) -> tqdm: ...


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    quiet: bool = False,
    initial: int = 0,
) -> Iterator[T] | tqdm:
    """Wrap ``iterable`` in a progress bar (or return a manual bar when ``iterable`` is None)."""
    # disable=None lets tqdm switch itself off when stderr is not a TTY.
    disable = True if (quiet or _QUIET) else None
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=disable, initial=initial, leave=False,
        dynamic_ncols=True,
    )

"""`AlignRequest`: what one ``atlas align`` asks for, as one value the command line, the Python API
and any other front end build and `engine.align.fit.align_layers` takes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.align.methods import MethodOptions, get_method

if TYPE_CHECKING:
    from engine.align.pairing import PairingConfig
    from engine.distributed.ray_exec import RayConfig
    from engine.models.hooks import Site
    from engine.models.loading import ModelKind


@dataclass(frozen=True)
class AlignRequest:
    """Fit maps from ``subject`` at ``site`` onto ``atlas`` from ``texts``.

    - ``heldout``: held-out texts (None: a tenth of ``texts``, by hash);
    - ``site``: subject layers, hook and block path (None: every block of the subject);
    - ``method`` with ``options`` (the user's settings, turned into its parameters by the method
      registry, `engine.align.methods`) and ``params`` (parameters given as the method names them;
      they win);
    - ``pairing`` (``auto``: token with one tokenizer, else span) and ``config`` (how the pass
      pairs: pools, caps, batch size, device and dtype); ``None``: ``PairingConfig()``;
    - ``kind`` of the subject (None: as registered, else causal), map ``name`` (``{layer}`` is
      replaced), ``overwrite``, and ``ray`` to run the pass on Ray workers.
    """

    subject: str
    atlas: str
    texts: Sequence[str]
    heldout: Sequence[str] | None = None
    site: Site | None = None
    method: str = "procrustes"
    options: MethodOptions = MethodOptions()
    params: Mapping[str, Any] = field(default_factory=dict)
    pairing: str = "auto"
    config: PairingConfig | None = None
    kind: ModelKind | None = None
    name: str | None = None
    overwrite: bool = False
    ray: RayConfig | None = None

    def method_params(self) -> dict[str, Any]:
        """The keyword parameters of the method's fit (an unknown method is a `BadValueError`)."""
        return {**get_method(self.method).params(self.options), **self.params}

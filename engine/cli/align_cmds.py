"""Alignment commands: `atlas align`, `atlas maps`, `atlas map show|remove`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from engine.cli.common import (
    METHOD_NAMES,
    describe_removal,
    device_options,
    emit,
    json_option,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    ray_options,
    store_options,
    world_options,
)

if TYPE_CHECKING:
    from engine.align.request import AlignRequest
    from engine.distributed import RayConfig
    from engine.store.store import MapInfo, Store

MAP_COLUMNS = ["name", "subject_model", "subject_layer", "atlas", "method", "pairing", "n_pairs", "heldout_r2",
               "heldout_cosine"]


def register(cli: click.Group) -> None:
    cli.add_command(align)
    cli.add_command(maps)
    cli.add_command(map_group)


@click.command()
@click.argument("subject")
@click.option("--layer", "-l", type=int, help="Subject layer (block index; negative counts from the end).")
@click.option("--layers", "layer_spec", metavar="SPEC",
              help="Several subject layers in one pass, one map each: 0-11, 2,5,8 or all (instead of --layer).")
@click.option("--atlas", "atlas_name", help="Atlas to align to (its model, layer and hook are the target site); "
              "with --world, the world's atlas by default.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text corpus: one document per line, or JSONL with a 'text' field. A tenth is held out.")
@click.option("--world", "use_world", is_flag=True, help="Use ConceptWorld's training documents (held-out split included).")
@world_options(size_help="World size (with --world).", seed_help="World seed (with --world).")
@click.option("--method", default="procrustes", show_default=True, help=f"Alignment method: {', '.join(METHOD_NAMES)}.")
@click.option("--pairing", type=click.Choice(["auto", "token", "span", "text"]), default="auto", show_default=True,
              help="How subject and foundation activations are paired; auto = token with one tokenizer, else span "
                   "(word-level features such as SAE latents); text = one pair per document, for document-level "
                   "features such as concept directions (docs/label-quality.md, round 5).")
@click.option("--pool", type=click.Choice(["last", "mean", "max"]),
              help="Pooling of a span, a word or punctuation mark over its pieces (last | mean | max, default "
                   "last), or of a text (mean | max, default mean).")
@click.option("--max-tokens", type=int, help="Stop after this many training pairs.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass.")
@click.option("--hook", type=click.Choice(["resid_post", "resid_pre"]), default="resid_post", show_default=True,
              help="Subject hook point.")
@click.option("--normalize", is_flag=True, help="Procrustes on unit-norm rows.")
@click.option("--no-scale", is_flag=True, help="Procrustes without the global scale.")
@click.option("--lam", type=float, help="Ridge λ (default: chosen on held-out pairs).")
@click.option("--layer-module", help="Attribute path of the subject's block list, for architectures not known (e.g. model.layers).")
@click.option("--kind", type=click.Choice(["causal", "encoder"]),
              help="What the subject is: causal (a language model) or encoder (BERT-style); default: as registered, "
                   "else causal.")
@click.option("--encoder", is_flag=True, help="Same as --kind encoder.")
@click.option("--cache", is_flag=True, help="Cache activations as safetensors shards under the store's activations/.")
@click.option("--name", help="Map name (default: <subject>-L<layer>-<atlas>-<method>); with several layers "
              "{layer} in it is replaced, else -L<layer> is appended.")
@click.option("--overwrite", is_flag=True, help="Replace a map of the same name.")
@device_options
@ray_options
@store_options
@json_option
@quiet_option
def align(subject: str, store_dir: Path, db_url: str | None, as_json: bool, **options: Any) -> None:
    """Fit an alignment map from SUBJECT's layer (or several: --layers) to an atlas, and store it.

    SUBJECT is a model in the store, or a local folder / hub id (registered on first use); with
    --world, also `a` or `b` for the world's subjects. The
    same texts go through the subject and the atlas's foundation model; paired activations are
    accumulated in one streaming pass (every requested layer from the same forward passes) and a
    map per layer is fitted from their statistics. Held-out texts give the fit metrics (R² both
    ways, mean cosine) and choose ridge's λ; with several layers a table compares them.

    With --ray (or --ray-address) the corpus is cut into shards that Ray workers pass through the
    models; their statistics are summed into the same maps (not with --max-tokens).
    """
    from engine.align.fit import align_layers

    opts = AlignOptions(**options)
    layers = opts.check()
    quiet_transformers()
    store = open_store(store_dir, db_url)
    infos = align_layers(store, opts.request(store, subject, layers))
    if opts.layer is not None:
        _show(infos[0], as_json)
    elif as_json:
        print_json(infos)
    else:
        _layer_table(infos)


@dataclass(frozen=True)
class AlignOptions:
    """The options of `atlas align` as click passes them; `request` turns them into an `AlignRequest`."""

    layer: int | None
    layer_spec: str | None
    atlas_name: str | None
    corpus: Path | None
    use_world: bool
    size: str
    seed: int
    method: str
    pairing: str
    pool: str | None
    max_tokens: int | None
    batch_size: int
    hook: str
    normalize: bool
    no_scale: bool
    lam: float | None
    layer_module: str | None
    kind: str | None
    encoder: bool
    device: str
    dtype: str
    cache: bool
    name: str | None
    overwrite: bool
    ray: RayConfig | None

    def check(self) -> tuple[int, ...] | None:
        """Usage errors that need no store (which layers, which texts, the pair cap); returns the
        subject layers (None: every block)."""
        from engine.models.hooks import parse_layers

        if (self.layer is None) == (self.layer_spec is None):
            raise click.UsageError("give --layer N or --layers SPEC (e.g. 0-11, 2,5,8, all)")
        layers = (self.layer,) if self.layer is not None else parse_layers(self.layer_spec or "")
        if bool(self.corpus) == bool(self.use_world):
            raise click.UsageError("give exactly one of --corpus FILE or --world")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise click.BadParameter("must be positive", param_hint="--max-tokens")
        if self.max_tokens is not None and self.ray is not None:
            raise click.UsageError("--max-tokens takes pairs in corpus order and cannot be sharded over Ray; "
                                   "give a shorter corpus instead")
        return layers

    def request(self, store: Store, subject: str, layers: tuple[int, ...] | None) -> AlignRequest:
        """The request: the texts of --corpus, or of the world plug-in's built-in corpus with --world."""
        from engine.align.corpus import BUILTIN_CORPORA, read_corpus
        from engine.align.methods import MethodOptions
        from engine.align.pairing import PairingConfig
        from engine.align.request import AlignRequest
        from engine.models.hooks import Site
        from engine.store import layout

        atlas_name = self.atlas_name
        heldout: list[str] | None = None
        if self.use_world:
            if "world" not in BUILTIN_CORPORA:
                raise click.UsageError("--world needs ConceptWorld's plug-in (engine.world), which is not loaded")
            builtin = BUILTIN_CORPORA["world"](store, self.size, self.seed)
            texts, heldout = builtin.texts, builtin.heldout
            atlas_name = atlas_name or builtin.atlas
            subject = builtin.subjects.get(subject.lower(), subject)
        else:
            if not atlas_name:
                raise click.UsageError("--atlas is required (except with --world)")
            assert self.corpus is not None  # check(): --corpus or --world
            texts = read_corpus(self.corpus)
        config = PairingConfig(
            pools={self.pairing: self.pool} if self.pool else {}, max_pairs=self.max_tokens,
            batch_size=self.batch_size, normalize=self.normalize, dtype=self.dtype, device=self.device,
            cache_dir=store.path / layout.ACTIVATIONS_DIR if self.cache else None,
        )
        return AlignRequest(
            subject=subject, atlas=atlas_name, texts=texts, heldout=heldout,
            site=Site(layers, self.hook, self.layer_module) if layers is not None else None,
            method=self.method, options=MethodOptions(scale=not self.no_scale, lam=self.lam), pairing=self.pairing,
            config=config, kind="encoder" if self.encoder else self.kind,  # type: ignore[arg-type]
            name=self.name, overwrite=self.overwrite, ray=self.ray,
        )


def _layer_table(infos: list[MapInfo]) -> None:
    """One row per layer: the map and its held-out fit."""
    emit([{"layer": i.subject_layer, "map": i.name, "pairs": i.n_pairs,
           "heldout_r2": i.metrics.get("heldout_r2"), "heldout_r2_inverse": i.metrics.get("heldout_r2_inverse"),
           "heldout_cosine": i.metrics.get("heldout_cosine")} for i in infos], False)
    best = max(infos, key=lambda i: i.metrics.get("heldout_r2", float("-inf")))
    click.echo(f"\n{len(infos)} maps from one pass; best held-out R2: layer {best.subject_layer} ({best.name})")


def _show(info: MapInfo, as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    m = info.metrics
    emit({
        "name": info.name, "subject": f"{info.subject_model} layer {info.subject_layer} ({info.subject_hook})",
        "atlas": f"{info.atlas} (layer {info.atlas_layer})", "method": info.method, "pairing": info.pairing,
        "params": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.params.items()),
        "dims": f"{info.d_subject} -> {info.d_atlas}", "pairs": info.n_pairs,
        "heldout pairs": m.get("n_heldout"), "heldout R2": m.get("heldout_r2"),
        "heldout R2 (inverse)": m.get("heldout_r2_inverse"), "heldout cosine": m.get("heldout_cosine"),
        "heldout cosine (centred)": m.get("heldout_cosine_centred"),
        "subject residual norm": m.get("subject_resid_norm"), "corpus": (info.corpus_fingerprint or "")[:16],
        "file": info.file, "created": info.created_at,
    }, False)


@click.command()
@store_options
@json_option
def maps(store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """List the alignment maps of the store."""
    rows = open_store(store_dir, db_url).maps()
    if as_json:
        print_json(rows)
        return
    emit([{c: getattr(r, c) for c in MAP_COLUMNS} for r in rows], False, MAP_COLUMNS)


@click.group("map")
def map_group() -> None:
    """Inspect or remove one alignment map."""


@map_group.command("show")
@click.argument("map_name", metavar="MAP")
@store_options
@json_option
def map_show(map_name: str, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Show a map's provenance, parameters and fit metrics."""
    _show(open_store(store_dir, db_url).map_info(map_name), as_json)


@map_group.command("remove")
@click.argument("map_name", metavar="MAP")
@click.option("--cascade", is_flag=True, help="Also remove the labelling runs on MAP, with their labels.")
@store_options
@json_option
def map_remove(map_name: str, cascade: bool, store_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Delete a map (its row, then its file).

    Refused while labelling runs use the map (the message names them), unless --cascade.
    """
    removal = open_store(store_dir, db_url).remove_map(map_name, cascade=cascade)
    if as_json:
        print_json(removal)
    else:
        click.echo(describe_removal(removal))



"""Alignment commands: `atlas align`, `atlas maps`, `atlas map show|remove`, `atlas eval retrieval`."""

from __future__ import annotations

from pathlib import Path

import click

from engine.cli.common import (
    emit,
    eval_group,
    json_option,
    open_store,
    print_json,
    quiet_option,
    quiet_transformers,
    store_options,
)

METHOD_NAMES = ("procrustes", "ridge", "correlation")  # the registered methods (checked against the registry)
MAP_COLUMNS = ["name", "subject_model", "subject_layer", "atlas", "method", "pairing", "n_pairs", "heldout_r2",
               "heldout_cosine"]
RETRIEVAL_COLUMNS = ["subject", "pairing", "layer", "method", "mrr", "mpp", "top1", "top5", "n_queries", "n_pairs"]


def register(cli: click.Group) -> None:
    cli.add_command(align)
    cli.add_command(maps)
    cli.add_command(map_group)
    eval_group(cli).add_command(eval_retrieval)


def _csv(_ctx, _param, value):
    """``("a,b", "c")`` → ``["a", "b", "c"]``; nothing → None."""
    if not value:
        return None
    return [v.strip() for chunk in value for v in str(chunk).split(",") if v.strip()]


def _int_csv(ctx, param, value):
    items = _csv(ctx, param, value)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise click.BadParameter(f"expected layer numbers like 2 or 1,3, got {' '.join(value)!r}") from None


def _check_methods(methods):
    from engine.align.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r}; known: {', '.join(sorted(METHODS))}",
                                 param_hint="--method")


@click.command()
@click.argument("subject")
@click.option("--layer", "-l", type=int, required=True, help="Subject layer (block index; negative counts from the end).")
@click.option("--atlas", "atlas_name", help="Atlas to align to (its model, layer and hook are the target site); "
              "with --world, the world's atlas by default.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text corpus: one document per line, or JSONL with a 'text' field. A tenth is held out.")
@click.option("--world", "use_world", is_flag=True, help="Use ConceptWorld's training documents (held-out split included).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True, help="World size (with --world).")
@click.option("--seed", default=0, show_default=True, help="World seed (with --world).")
@click.option("--method", default="procrustes", show_default=True, help=f"Alignment method: {', '.join(METHOD_NAMES)}.")
@click.option("--pairing", type=click.Choice(["auto", "token", "span", "text"]), default="auto", show_default=True,
              help="How subject and foundation activations are paired; auto = token with one tokenizer, else span.")
@click.option("--pool", type=click.Choice(["last", "mean", "max"]),
              help="Pooling of a span (last | mean, default last) or a text (mean | max, default mean).")
@click.option("--max-tokens", type=int, help="Stop after this many training pairs.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Texts per forward pass.")
@click.option("--hook", type=click.Choice(["resid_post", "resid_pre"]), default="resid_post", show_default=True,
              help="Subject hook point.")
@click.option("--normalize", is_flag=True, help="Procrustes on unit-norm rows.")
@click.option("--no-scale", is_flag=True, help="Procrustes without the global scale.")
@click.option("--lam", type=float, help="Ridge λ (default: chosen on held-out pairs).")
@click.option("--layer-module", help="Attribute path of the subject's block list, for architectures not known (e.g. model.layers).")
@click.option("--encoder", is_flag=True, help="The subject is an encoder (BERT-style), not a causal LM.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Load both models in this dtype (statistics are accumulated in float64 either way).")
@click.option("--cache", is_flag=True, help="Cache activations as safetensors shards under the store's activations/.")
@click.option("--name", help="Map name (default: <subject>-L<layer>-<atlas>-<method>).")
@click.option("--overwrite", is_flag=True, help="Replace a map of the same name.")
@store_options
@json_option
@quiet_option
def align(subject, layer, atlas_name, corpus, use_world, size, seed, method, pairing, pool, max_tokens, batch_size,
          hook, normalize, no_scale, lam, layer_module, encoder, dtype, cache, name, overwrite, store_dir, db_url,
          as_json):
    """Fit an alignment map from SUBJECT's LAYER to an atlas, and store it.

    SUBJECT is a model in the store, or a local folder / hub id (registered on first use); with
    --world, also `a` or `b` for the world's subjects. The
    same texts go through the subject and the atlas's foundation model; paired activations are
    accumulated in one streaming pass and the map is fitted from their statistics. Held-out texts
    give the fit metrics (R² both ways, mean cosine) and choose ridge's λ.
    """
    from engine.align.corpus import read_corpus
    from engine.align.fit import align_subject

    if bool(corpus) == bool(use_world):
        raise click.UsageError("give exactly one of --corpus FILE or --world")
    _check_methods([method])
    if max_tokens is not None and max_tokens < 1:
        raise click.BadParameter("must be positive", param_hint="--max-tokens")
    quiet_transformers()
    store = open_store(store_dir, db_url)
    if use_world:
        from engine.world.eval.retrieval import ensure_world_registered, world_texts

        world = ensure_world_registered(store, size, seed)
        texts, heldout = world_texts(world)
        atlas_name = atlas_name or world.atlas_name
        if subject.lower() in ("a", "b", "subject_a", "subject_b"):
            subject = world.model("subject_" + subject.lower()[-1]).name
    else:
        if not atlas_name:
            raise click.UsageError("--atlas is required (except with --world)")
        texts, heldout = read_corpus(corpus), None
    params = {}
    if method == "procrustes" and no_scale:
        params["scale"] = False
    if method == "ridge" and lam is not None:
        params["lam"] = lam
    info = align_subject(
        store, subject, layer, atlas_name, texts, heldout, method=method, pairing=pairing, pool=pool,
        max_pairs=max_tokens, batch_size=batch_size, normalize=normalize, hook=hook, layer_module=layer_module,
        kind="encoder" if encoder else "causal", dtype=dtype, cache=cache, name=name, overwrite=overwrite, **params,
    )
    _show(info, as_json)


def _show(info, as_json: bool) -> None:
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
def maps(store_dir, db_url, as_json):
    """List the alignment maps of the store."""
    rows = open_store(store_dir, db_url).maps()
    if as_json:
        print_json(rows)
        return
    emit([{c: getattr(r, c) for c in MAP_COLUMNS} for r in rows], False, MAP_COLUMNS)


@click.group("map")
def map_group():
    """Inspect or remove one alignment map."""


@map_group.command("show")
@click.argument("map_name", metavar="MAP")
@store_options
@json_option
def map_show(map_name, store_dir, db_url, as_json):
    """Show a map's provenance, parameters and fit metrics."""
    _show(open_store(store_dir, db_url).map_info(map_name), as_json)


@map_group.command("remove")
@click.argument("map_name", metavar="MAP")
@store_options
def map_remove(map_name, store_dir, db_url):
    """Delete a map (its row, then its file)."""
    open_store(store_dir, db_url).remove_map(map_name)
    click.echo(f"removed map {map_name}")


@click.command("retrieval")
@click.option("--world", "use_world", is_flag=True, required=True,
              help="Evaluate on ConceptWorld (the only ground truth the engine ships).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, help="World seed.")
@click.option("--methods", "-m", multiple=True, callback=_csv,
              help=f"Methods to compare, e.g. procrustes,ridge (default: {','.join(METHOD_NAMES)}).")
@click.option("--layers", "-l", multiple=True, callback=_int_csv, help="Subject layers (default: all).")
@click.option("--pairings", multiple=True, callback=_csv,
              help="Pairings (default: token for subject A; span and text for subject B, whose tokenizer differs).")
@click.option("--subjects", multiple=True, callback=_csv, help="Subjects: a, b (default: both).")
@click.option("--max-tokens", type=int, help="Cap on training pairs per pairing.")
@store_options
@json_option
@quiet_option
def eval_retrieval(use_world, size, seed, methods, layers, pairings, subjects, max_tokens, store_dir, db_url, as_json):
    """Concept retrieval through fitted maps on ConceptWorld (DESIGN section 8).

    Maps are fitted on the world's training documents (hyper-parameters such as ridge's λ on its
    held-out documents). Each query is a subject's own concept direction (centred topic mean at
    its layer), mapped into the atlas; the rank is the true concept's position among all atlas
    concepts by cosine (ties count against). MRR = mean 1/rank; MPP = mean (rank-1)/(N-1), 0 is
    perfect and 0.5 chance; top-1/top-5 = share ranked first / in the first five.
    """
    from engine.world.eval.retrieval import evaluate_world_retrieval

    methods = methods or list(METHOD_NAMES)
    _check_methods(methods)
    quiet_transformers()
    rows = evaluate_world_retrieval(open_store(store_dir, db_url), size=size, seed=seed, methods=methods,
                                    layers=layers, pairings=pairings, subjects=subjects, max_pairs=max_tokens)
    if as_json:
        print_json([{"subject": r.subject, "method": r.method, "pairing": r.pairing, "layer": r.layer,
                     "mrr": r.mrr, "mpp": r.mpp, "top1": r.top1, "top5": r.top5, "n_queries": r.n_queries,
                     "n_pairs": r.n_pairs, "heldout_r2": r.heldout_r2} for r in rows])
        return
    emit(rows, False, RETRIEVAL_COLUMNS)
    click.echo("\nMRR = mean 1/rank of the true concept among all atlas concepts by cosine (ties count "
               "against); MPP = mean (rank-1)/(N-1), 0 perfect, 0.5 chance.")

"""The demo's report: ``report.md``, ``report.json`` and PNG figures, from a `DemoResult`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.util import to_plain

FIG_RETRIEVAL = "retrieval_mrr.png"
FIG_STEERING = "steering_faithfulness.png"
FIG_SAE_LABELLING = "sae_labelling.png"
FIG_AGAINST = "steering_against_topic.png"
FIG_SAE_STEERING = "sae_steering.png"

# How this project defines its figures (docs/design.md §8); printed with every report.
METRIC_DEFINITIONS = {
    "MRR": "per concept, the query is the subject's own direction for it (centred topic mean) mapped into "
           "the atlas; rank = position of the true concept among all atlas concepts by cosine; mean of 1/rank",
    "MPP": "mean of (rank - 1)/(N - 1): 0 is perfect, 0.5 is chance",
    "top1/top5": "share of queries whose true concept ranks first / in the first five",
    "faithfulness": "share of (concept, prompt) trials whose 20-token greedy continuation has the target concept "
                    "as its strict plurality concept (member-word counts)",
    "perplexity": "of the generated continuation under the unsteered subject model (fluency guard)",
    "SAE top1/top5/mrr": "per labelled latent of a subject SAE (ground truth: a topic or a word), labelled through "
                         "the map onto the foundation SAE's atlas: its first hit (one of the first five; 1/rank of the "
                         "first, among ten) has the same ground-truth label; chance_top1: a random atlas latent",
}


def write_report(result: Any, out: Path) -> list[str]:
    """Write every file of the report into ``out``; returns their paths."""
    files = [_fig_retrieval(result, out / FIG_RETRIEVAL), _fig_steering(result, out / FIG_STEERING),
             _fig_sae_labelling(result, out / FIG_SAE_LABELLING),
             _fig_against(result, out / FIG_AGAINST), _fig_sae_steering(result, out / FIG_SAE_STEERING)]
    (out / "report.json").write_text(result_json(result) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(result), encoding="utf-8")
    return [str(out / "report.md"), str(out / "report.json"), *[str(f) for f in files if f]]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_retrieval(result: Any, path: Path) -> Path | None:
    rows = result.retrieval
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["subject"], r["pairing"], r["method"]), []).append((r["layer"], r["mrr"]))
    for (subject, pairing, method), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if pairing == "token" else "--",
                label=f"{subject.rsplit('-', 1)[-1]} / {pairing} / {method}")
    ax.set_xlabel("subject layer (resid_post)")
    ax.set_ylabel("retrieval MRR")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"ConceptWorld {result.size}: retrieval MRR per layer and method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fig_sae_labelling(result: Any, path: Path) -> Path | None:
    rows = getattr(result, "sae_labelling", None)
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.4 * len(rows)), 4.2))
    names = [f"{r['subject'].rsplit('-', 1)[-1]}/L{r['layer']}/{r['pairing']}/{r['method']}" for r in rows]
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["top1"] for r in rows], width=0.4, label="top-1")
    ax.bar([i + 0.2 for i in x], [r["mrr"] for r in rows], width=0.4, label="MRR@10")
    ax.plot(x, [r["chance_top1"] for r in rows], "k_", markersize=14, label="chance top-1")
    ax.set_xticks(x, names, rotation=40, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of labelled subject latents")
    ax.set_title(f"ConceptWorld {result.size}: SAE latents labelled through maps")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fig_steering(result: Any, path: Path) -> Path | None:
    s = result.steering
    rows = [r for r in s.get("rows", []) if r["prompts"] == "neutral"]
    chosen = s.get("chosen", {})
    if not rows or not chosen:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    picks = {
        "transferred": [r for r in rows if r["direction"] == "transferred" and r["map"] == chosen.get("map")],
        "native": [r for r in rows if r["direction"] == "native" and r["layer"] == chosen.get("native_layer")],
    }
    for kind, sel in picks.items():
        sel = sorted(sel, key=lambda r: r["strength"])
        if sel:
            ax.plot([r["strength"] for r in sel], [r["faithfulness"] for r in sel], marker="o",
                    label=f"{kind} (layer {sel[0]['layer']})")
    return _save_strength_figure(plt, fig, ax, rows, f"ConceptWorld {result.size}: steering subject A", path, 8)


def _save_strength_figure(plt: Any, fig: Any, ax: Any, rows: list[dict[str, Any]], title: str, path: Path,
                          legend_size: int) -> Path:
    """Finish a faithfulness-against-strength figure (the unsteered floor as a line, axes, legend) and save it."""
    base = next((r for r in rows if r["direction"] == "unsteered"), None)
    if base is not None:
        ax.axhline(base["faithfulness"], color="grey", linestyle=":", label="unsteered")
    ax.set_xlabel("strength (x typical residual norm)")
    ax.set_ylabel("faithfulness (neutral prompts)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sae_steering_rows(result: Any) -> list[dict[str, Any]]:
    return (getattr(result, "sae_steering", None) or {}).get("rows", [])


def _fig_sae_steering(result: Any, path: Path) -> Path | None:
    """Neutral-prompt faithfulness against strength of each direction of the SAE table (SAE latents
    and topic means through each map, native directions), at the site chosen for each on held-out
    prompts; the unsteered floor as a line."""
    rows = [r for r in _sae_steering_rows(result) if r["prompts"] == "neutral"]
    picked = {(r["direction"], r.get("method"), r.get("map"), r["layer"]) for r in rows if r["chosen_for_method"]}
    if not picked:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for direction, method, map_, layer in sorted(picked, key=lambda p: (p[0], p[1] or "")):
        sel = sorted((r for r in rows if (r["direction"], r.get("method"), r.get("map"), r["layer"])
                      == (direction, method, map_, layer)), key=lambda r: r["strength"])
        ax.plot([r["strength"] for r in sel], [r["faithfulness"] for r in sel], marker="o",
                linestyle="-" if (method or "").startswith("sae-") else "--",
                label=f"{method or direction} (layer {layer})")
    return _save_strength_figure(plt, fig, ax, rows,
                                 f"ConceptWorld {result.size}: steering subject A with SAE latents vs topic means",
                                 path, 7)


def _sae_steering_section(result: Any) -> list[str]:
    rows = _sae_steering_rows(result)
    if not rows:
        return []
    s = result.sae_steering
    return [
        "### Steering with SAE latents (`atlas eval steering --world --sae`, table=sae)",
        "",
        f"A concept's direction is the decoder row of the foundation SAE latent labelled with its topic "
        f"({s['coverage']} of {s['n_concepts']} concepts have one; the others get the latent leaning most towards "
        "them, or none), sent into subject A through the inverse of a map onto the SAE atlas (method sae-<map "
        "method>), beside the topic means through the same maps (mean-<map method>) and the native directions; "
        "per direction, the site and strength are chosen on held-out prompts.",
        "",
        f"![SAE-latent steering]({FIG_SAE_STEERING})",
        "",
        *[f"- {line}" for line in s.get("summary", [])],
        "",
        *_table([r for r in rows if r["chosen_for_method"] or r["direction"] == "unsteered"],
                ["direction", "prompts", "method", "layer", "strength", "faithfulness", "perplexity", "n", "map"]),
        "",
    ]


def _against_test_rows(result: Any) -> list[dict[str, Any]]:
    a = getattr(result, "against_topic", None) or {}
    return [r for r in a.get("rows", []) if r["split"] == "test"]


def _fig_against(result: Any, path: Path) -> Path | None:
    """Test-half faithfulness of each chosen configuration (mode, positions, one or all layers),
    per direction kind, under each fluency guard; the unsteered floor as a line."""
    rows = _against_test_rows(result)
    chosen = [r for r in rows if r["chosen"]]
    if not chosen:
        return None
    plt = _plt()
    guards = sorted({r["guard"] for r in chosen}, reverse=True)  # "prompt" first
    fig, axes = plt.subplots(1, len(guards), figsize=(5.5 * len(guards), 4), sharey=True, squeeze=False)
    configs = sorted({(r["mode"], r["positions"], len(r["layers"]) > 1) for r in chosen})
    names = [f"{m}/{p}/{'all' if many else '1'}" for m, p, many in configs]
    for ax, guard in zip(axes[0], guards):
        for j, kind in enumerate(("transferred", "native")):
            by = {(r["mode"], r["positions"], len(r["layers"]) > 1): r["faithfulness"]
                  for r in chosen if r["guard"] == guard and r["direction"] == kind}
            xs = [i + (j - 0.5) * 0.38 for i in range(len(configs))]
            ax.bar(xs, [by.get(c, 0.0) for c in configs], width=0.38, label=kind)
        base = next((r for r in rows if r["direction"] == "unsteered"), None)
        if base is not None:
            ax.axhline(base["faithfulness"], color="grey", linestyle=":", label="unsteered")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"guard: 2x perplexity {'after the prompt' if guard == 'prompt' else 'on its own'}", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("faithfulness (test half)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ConceptWorld {result.size}: steering subject A against a topic (mode/positions/layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _timings_table(result: Any) -> list[str]:
    """Wall and CPU seconds per stage (CPU: all threads and child processes; wall grows with other jobs' load)."""
    cpu = getattr(result, "cpu_timings", None) or {}
    rows = [{"": "wall", **result.timings}] + ([{"": "cpu", **cpu}] if cpu else [])
    return _table(rows, ["", *result.timings])


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_f(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _against_section(result: Any) -> list[str]:
    rows = _against_test_rows(result)
    if not rows:
        return []
    a = result.against_topic
    st = a.get("settings", {})
    table = [{**r, "layers": ",".join(map(str, r["layers"]))} for r in rows if r["chosen"] or r["direction"] == "unsteered"]
    return [
        "### Steering against a topic (`atlas eval steering --world`, prompts=against_topic)",
        "",
        f"Prompts are first sentences of held-out documents (each has a topic), steered towards another concept; "
        f"per direction kind, mode, positions and layers edited at once, the layer set and strength are chosen on "
        f"{st.get('n_validation_prompts')} validation prompts and reported on {st.get('n_test_prompts')} other ones, "
        "under each fluency guard (2x the unsteered perplexity of the continuation after its prompt, or on its own). "
        f"Grid: modes {', '.join(st.get('modes', []))}; positions {', '.join(st.get('positions', []))}; strengths "
        f"{', '.join(str(x) for x in st.get('strengths', []))}"
        f"{' (`--quick`: the small grid)' if getattr(result, 'quick', False) else ''}.",
        "",
        f"![faithfulness against a topic]({FIG_AGAINST})",
        "",
        *[f"- {line}" for line in a.get("summary", [])],
        "",
        *_table(table, ["direction", "guard", "mode", "positions", "layers", "strength", "faithfulness", "perplexity",
                        "perplexity_alone", "n", "headline"]),
        "",
    ]


def render_markdown(result: Any) -> str:
    h = result.headline()
    w = result.world
    lines = [
        f"# Concept Atlas demo: ConceptWorld `{result.size}` (seed {result.seed})",
        "",
        f"Reproduce: `atlas demo --size {result.size} --seed {result.seed} --store {result.store} "
        f"--out {result.out}{' --quick' if getattr(result, 'quick', False) else ''}`; each section names the "
        "command that gives its figures alone.",
        "",
        "## Headline",
        "",
        *_table([{"figure": k, "value": v} for k, v in h.items()], ["figure", "value"]),
        "",
        "## The world",
        "",
        f"{w['n_concepts']} concepts; atlas `{w['atlas']}` at foundation layer {w['atlas_layer']}; "
        f"{w['n_train_docs']} training documents{' (reused from the store)' if w['reused'] else ''}.",
        "",
        *_table([{"key": k, **m} for k, m in w["models"].items()],
                ["key", "name", "architecture", "d_model", "n_layers", "tokenizer"]),
        "",
    ]
    if w["gates"]:
        lines += ["Learnability gates (`atlas world build`):", "",
                  *_table(w["gates"], ["model", "heldout_perplexity", "unigram_perplexity", "probe_accuracy",
                                       "persistence"]), ""]
    lines += [
        "## Retrieval (`atlas eval retrieval --world`)",
        "",
        f"![MRR per layer]({FIG_RETRIEVAL})",
        "",
        *_table(result.retrieval, ["subject", "pairing", "method", "layer", "mrr", "mpp", "top1", "top5", "n_pairs"]),
        "",
        "## Bulk labelling (`atlas eval labelling --world`)",
        "",
        *_table(result.labelling, ["subject", "method", "layer", "n", "top1", "top5", "run"]),
        "",
        "### SAE latents (`atlas eval labelling --world --features sae`)",
        "",
        "Each subject's SAE latents, at every layer of the subject, labelled through maps onto the foundation SAE's "
        "atlas; scored against the latents' ground truth (a topic or a word).",
        "",
        f"![SAE labelling]({FIG_SAE_LABELLING})",
        "",
        *_table(getattr(result, "sae_labelling", None) or [],
                ["subject", "pairing", "method", "layer", "n", "top1", "top5", "mrr", "chance_top1", "top1_topic",
                 "top1_word", "concept_mrr"]),
        "",
        "## Text lookup (`atlas lookup`)",
        "",
    ]
    for lk in result.lookups:
        hits = "; ".join(
            f"{x['label']} ({x['ref']}; text rank {_f(x['text_rank'])}, semantic rank {_f(x['semantic_rank'])})"
            for x in lk["hits"]) or "(no hits)"
        lines.append(f"- `{lk['query']}` (concept *{lk['expected']}*): {hits}")
    s = result.steering
    lines += [
        "",
        "## Steering subject A (`atlas eval steering --world`)",
        "",
        f"![faithfulness against strength]({FIG_STEERING})",
        "",
        "Chosen on held-out prompts (never the evaluation prompts): " + ", ".join(
            f"{k} {_f(v)}" for k, v in s.get("chosen", {}).items() if k != "shortlist"),
        "",
        *[f"- {line}" for line in s.get("summary", [])],
        "",
        *_table([r for r in s.get("rows", []) if r["chosen"] or r["direction"] == "unsteered"],
                ["direction", "prompts", "layer", "strength", "faithfulness", "perplexity", "n", "map"]),
        "",
        *_against_section(result),
        *_sae_steering_section(result),
        "### Side by side (`atlas steer MAP --concept LABEL --prompt ...`)",
        "",
    ]
    for ex in result.examples:
        lines += [
            f"**{ex['concept']}** ({ex['ref']}, layer {ex['layer']}, strength {_f(ex['strength'], 2)} x norm)",
            "",
            f"- prompt: `{ex['prompt']}`",
            f"- unsteered: {ex['unsteered']}  — topic: {ex['unsteered_topic'] or 'none'}",
            f"- steered: {ex['steered']}  — topic: {ex['steered_topic'] or 'none'}",
            "",
        ]
    lines += real_weights_section(getattr(result, "real_weights", None))
    lines += ["## Definitions", "", *[f"- **{k}**: {v}" for k, v in METRIC_DEFINITIONS.items()], "",
              "## Timings (s)", "", *_timings_table(result), ""]
    return "\n".join(lines)



def real_weights_section(rw: dict[str, Any] | None) -> list[str]:
    """The report's "Real weights" section (its lines), from the demo's real-weights stage (none without it)."""
    if not rw:
        return []
    lines = ["## Real weights (`atlas eval retrieval --world --subject-model`)", ""]
    if rw.get("skipped"):
        return lines + [f"{rw['model']}: skipped ({rw['skipped']}).", ""]
    return lines + [f"{rw['model']} (a BERT encoder with its own WordPiece tokenizer, real weights, loaded offline) "
                    f"as a subject of the world atlas: its topic directions (centred topic means over the held-out "
                    f"documents) at each layer, mapped through maps fitted on {rw['pairs']:,} span pairs.", "",
                    *_table(rw["rows"], ["layer", "method", "pairing", "mrr", "mpp", "top1", "top5", "n_pairs"]), ""]

def result_json(result: Any) -> str:
    return json.dumps(to_plain(result), indent=2, ensure_ascii=False)


def format_summary(result: Any) -> Sequence[str]:
    """The short summary the CLI prints."""
    h = result.headline()

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    return [
        f"ConceptWorld {result.size} (seed {result.seed}): {result.world['n_concepts']} concepts, atlas {result.world['atlas']}",
        f"retrieval MRR, subject A (Procrustes, token pairing, best layer): {f(h['retrieval_mrr_subject_a_procrustes'])}",
        f"retrieval MRR, subject B (Procrustes, span pairing across tokenizers): {f(h['retrieval_mrr_subject_b_procrustes_span'])}",
        f"labelling top-1, subject A native directions (Procrustes, best layer): {f(h['labelling_top1_subject_a_procrustes'])}",
        f"steering faithfulness (neutral prompts): transferred {f(h['steering_transferred_faithfulness'])}, "
        f"native {f(h['steering_native_faithfulness'])}, unsteered {f(h['steering_unsteered_faithfulness'])} "
        f"(layer {f(h['steering_layer'])}, strength {f(h['steering_strength'])} x norm)",
        *([f"SAE-latent steering faithfulness (neutral prompts, Procrustes maps): SAE latents "
           f"{f(h['sae_steering_faithfulness_sae_latents_procrustes'])}, topic means "
           f"{f(h['sae_steering_faithfulness_topic_means_procrustes'])} through the same maps"]
          if result.sae_steering else []),
        *([f"real weights: {result.real_weights['model']} topic retrieval MRR per layer (Procrustes): "
           + ", ".join(f"L{r['layer']} {r['mrr']:.3f}" for r in result.real_weights["rows"] if r["method"] == "procrustes")]
          if result.real_weights and result.real_weights.get("rows") else []),
        f"report: {Path(result.out) / 'report.md'}  ({result.timings.get('total', sum(result.timings.values())):.0f} s)",
    ]

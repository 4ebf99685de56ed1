// The Concept Atlas explorer: one small hand-written page over the JSON API (/openapi.json).
// Routes: /  (search), /c/<atlas>/<ordinal>  (concept), /runs/<name>  (run), /explain, /steer.
"use strict";

const PARAMS = new URLSearchParams(location.search);
if (PARAMS.get("token")) sessionStorage.setItem("atlas-token", PARAMS.get("token"));
const TOKEN = sessionStorage.getItem("atlas-token");

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

async function api(path, body) {
  const headers = {};
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  const opts = { headers };
  if (body !== undefined) {
    opts.method = "POST";
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((data && data.detail) || (r.status + " " + r.statusText));
  return data;
}

const fmt = (x, n = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(n));
const enc = encodeURIComponent;
const conceptHref = (atlas, ordinal) => `/c/${enc(atlas)}/${ordinal}`;
const main = () => document.getElementById("main");

function show(...nodes) {
  const m = main();
  m.replaceChildren(...nodes);
}

function fail(where, err) {
  where.replaceChildren(el("p", { class: "error", role: "alert", text: err.message || String(err) }));
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => (h instanceof Node ? h : el("th", { text: h }))))),
    el("tbody", {}, rows));
}

function navigate(href) {
  history.pushState({}, "", href);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a || a.target || a.hasAttribute("download") || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/api/") || url.pathname.startsWith("/docs")) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", route);

async function mapSelect(id) {
  const maps = await api("/api/maps");
  const sel = el("select", { id, name: "map" }, maps.map((m) =>
    el("option", { value: m.name, text: `${m.name}  (${m.subject_model} L${m.subject_layer} → ${m.atlas})` })));
  return [sel, maps];
}

// ------------------------------------------------------------------ search (home)

async function searchPage() {
  const q = PARAMS_NOW().get("q") || "";
  const atlasWanted = PARAMS_NOW().get("atlas") || "";
  const atlases = await api("/api/atlases");
  const box = el("input", { type: "search", id: "q", name: "q", value: q, placeholder: "Look up concepts: rain, music, …", autofocus: true });
  const filter = el("select", { id: "atlas", name: "atlas" }, el("option", { value: "", text: "all atlases" }),
    atlases.map((a) => el("option", { value: a.name, text: a.name, selected: a.name === atlasWanted })));
  const results = el("div", { id: "results" });
  const form = el("form", { class: "row", onsubmit: (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams({ q: box.value });
    if (filter.value) p.set("atlas", filter.value);
    history.replaceState({}, "", "/?" + p);
    runSearch(box.value, filter.value, results);
  } }, box, filter, el("button", { type: "submit", text: "Search" }));
  const [runs, maps] = await Promise.all([api("/api/runs"), api("/api/maps")]);
  show(el("h1", { text: "Search the atlas" }), form, results,
    el("h2", { text: "Atlases" }),
    table(["atlas", "site", "concepts", "labelled", "source"], atlases.map((a) => el("tr", {},
      el("td", { text: a.name }), el("td", { text: a.site }), el("td", { class: "num", text: a.n_concepts }),
      el("td", { class: "num", text: a.n_labelled }), el("td", { text: a.source_ref || a.source_kind })))),
    el("h2", { text: "Maps" }),
    table(["map", "subject", "atlas", "method", "held-out R²"], maps.map((m) => el("tr", {},
      el("td", { text: m.name }), el("td", { text: `${m.subject_model}@${m.subject_layer}/${m.subject_hook}` }),
      el("td", { text: m.atlas }), el("td", { text: m.method }), el("td", { class: "num", text: fmt(m.heldout_r2) })))),
    el("h2", { text: "Labelling runs" }),
    table(["run", "map", "status", "done", "k"], runs.map((r) => el("tr", {},
      el("td", {}, el("a", { href: `/runs/${enc(r.name)}`, text: r.name })), el("td", { text: r.map }),
      el("td", { text: r.status }), el("td", { text: `${r.n_done}/${r.n_features}` }), el("td", { class: "num", text: r.k })))));
  if (q) runSearch(q, atlasWanted, results);
}

function PARAMS_NOW() { return new URLSearchParams(location.search); }

async function runSearch(q, atlas, where) {
  if (!q.trim()) { where.replaceChildren(); return; }
  where.replaceChildren(el("p", { class: "muted", text: "Searching…" }));
  try {
    const p = new URLSearchParams({ q, k: "30" });
    if (atlas) p.set("atlas", atlas);
    const res = await api("/api/lookup?" + p);
    if (!res.hits.length) { where.replaceChildren(el("p", { class: "muted", text: "No concept matches." })); return; }
    where.replaceChildren(table(["#", "concept", "description", "atlas", "site", "score"], res.hits.map((h) => el("tr", { class: "hit" },
      el("td", { class: "num", text: h.rank }),
      el("td", {}, el("a", { href: conceptHref(h.atlas, h.ordinal), text: h.label })),
      el("td", { class: "muted", text: h.description || "" }),
      el("td", { text: h.atlas }), el("td", { text: h.site }), el("td", { class: "num", text: fmt(h.score, 4) }))),
    { id: "hits" }));
  } catch (e) { fail(where, e); }
}

// ------------------------------------------------------------------ concept

async function conceptPage(atlas, ordinal) {
  const [c, neigh, feats, ctxs] = await Promise.all([
    api(`/api/concepts/${enc(atlas)}/${ordinal}`),
    api(`/api/concepts/${enc(atlas)}/${ordinal}/neighbors?k=10`),
    api(`/api/concepts/${enc(atlas)}/${ordinal}/features?limit=200`),
    api(`/api/concepts/${enc(atlas)}/${ordinal}/contexts?limit=20`),
  ]);
  const p = c.provenance;
  const prov = el("dl", { class: "prov" },
    [["model", p.model], ["layer", p.layer], ["hook", p.hook], ["source", p.source_kind],
    ["source file", p.source_file || "—"], ["revision", p.revision || "—"], ["atlas", `${p.atlas} (${p.n_concepts} concepts, d=${p.dim})`]]
    .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  const mapsBlock = feats.length ? feats.map((m) => el("details", { class: "features", "data-map": m.map },
    el("summary", { text: `Subject features of ${m.subject_model} (layer ${m.subject_layer}) labelled with it, through map ${m.map}: ${m.features.length}` }),
    m.features.length ? table(["run", "feature", "rank", "score"], m.features.map((f) => el("tr", { class: "feature" },
      el("td", {}, el("a", { href: `/runs/${enc(f.run)}`, text: f.run })), el("td", { class: "num", text: f.feature }),
      el("td", { class: "num", text: f.rank }), el("td", { class: "num", text: fmt(f.score, 4) }))))
      : el("p", { class: "muted", text: "No labelling run through this map names this concept." })))
    : [el("p", { class: "muted", text: "No map into this atlas yet." })];
  show(
    el("p", { class: "muted" }, el("span", { class: "pill", text: c.concept.ref }), " ", c.concept.labelled ? "" : "(unlabelled)"),
    el("h1", { id: "label", text: c.concept.label }),
    el("p", { id: "description", text: c.concept.description || "" }),
    el("h2", { text: "Provenance" }), prov,
    el("h2", { text: "Nearest concepts by direction" }),
    table(["#", "concept", "cosine"], neigh.map((h) => el("tr", {},
      el("td", { class: "num", text: h.rank }), el("td", {}, el("a", { href: conceptHref(h.atlas, h.ordinal), text: h.label })),
      el("td", { class: "num", text: fmt(h.score, 4) }))), { id: "neighbours" }),
    el("h2", { text: "Top contexts" }), ...contextsBlock(ctxs, atlas),
    el("h2", { text: "Labelled subject features" }), ...mapsBlock,
  );
}

// A concept's top windows per model that read a corpus, the activating token marked. Offsets count
// Unicode code points (Python's str), so the window is split as code points, not UTF-16 units.
function contextsBlock(runs, atlas) {
  if (!runs.length) {
    return [el("p", { class: "muted" }, "None computed yet: ", el("code", { text: `atlas contexts ${atlas} --corpus FILE` }),
      " (or a map into this atlas) stores them.")];
  }
  return runs.map((r) => el("details", { class: "contexts", open: true, "data-source": r.map ? "map:" + r.map : "atlas:" + r.atlas },
    el("summary", { title: r.corpus, text: `${r.map ? `Through map ${r.map}: ` : ""}${r.model} layer ${r.layer}, ${r.corpus.split(/[\\/]/).pop()} `
      + `(${r.n_done}/${r.n_texts} texts, ${r.status}), by ${r.scoring === "encoder" ? "SAE activation" : "projection"}` }),
    r.contexts.length ? el("ol", { class: "ctx-list" }, r.contexts.map((c) => {
      const cps = Array.from(c.window);
      const marked = c.token_start >= 0 && c.token_end > c.token_start;
      const text = marked ? [cps.slice(0, c.token_start).join(""),
        el("mark", { class: "ctx-tok", text: cps.slice(c.token_start, c.token_end).join("") }),
        cps.slice(c.token_end).join("")] : [c.window];
      return el("li", { class: "ctx", "data-text": c.text_index },
        el("span", { class: "num ctx-act", text: fmt(c.activation) }),
        el("span", { class: "ctx-text" }, c.window_start > 0 ? "…" : "", text));
    })) : el("p", { class: "muted", text: "No text of the corpus activates it." })));
}

// ------------------------------------------------------------------ run

async function runPage(name) {
  const p = PARAMS_NOW();
  const order = p.get("order") || "feature";
  const desc = p.get("desc") === "true";
  const offset = Math.max(0, parseInt(p.get("offset") || "0", 10) || 0);
  const minConf = p.get("min_confidence") || "";
  const limit = 100;
  const query = { order, desc, offset, limit };
  if (minConf !== "") query.min_confidence = minConf;
  const page = await api(`/api/runs/${enc(name)}/rows?` + new URLSearchParams(query));
  const r = page.run;
  const hasConf = !!(r.params && r.params.confidence);
  const go = (o, d, off, mc = minConf) => navigate(`/runs/${enc(name)}?` + new URLSearchParams(
    Object.assign({ order: o, desc: d, offset: off }, mc !== "" ? { min_confidence: mc } : {})));
  const sortHead = (label, key) => el("th", { class: "sortable", "data-sort": key, title: "sort",
    onclick: () => go(key, order === key ? !desc : key !== "feature", 0) }, label + (order === key ? (desc ? " ▼" : " ▲") : ""));
  const exportLinks = ["jsonl", "csv", "neuronpedia"].map((f) =>
    el("a", { href: `/api/runs/${enc(name)}/export?format=${f}${r.status === "done" ? "" : "&partial=true"}` +
      (minConf !== "" ? `&min_confidence=${enc(minConf)}` : ""), download: "", text: f }));
  const last = Math.min(page.total, offset + page.rows.length);
  const confInput = el("input", { id: "min-confidence", type: "number", min: "0", max: "1", step: "0.05",
    value: minConf, placeholder: "0–1", title: "labels below this confidence show as “no match”" });
  const confControl = hasConf ? el("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); go(order, desc, 0, confInput.value); } },
    el("label", { for: "min-confidence", text: "Min confidence " }), confInput, " ", el("button", { class: "plain", text: "apply" })) : null;
  show(
    el("h1", { text: `Run ${r.name}` }),
    el("p", {}, `${r.feature_source} through map ${r.map} into ${r.atlas}: ${r.n_done}/${r.n_features} features, top-${r.k}` +
      `${r.params && r.params.criterion ? ", " + r.params.criterion : ""}, `,
      el("span", { class: "pill", text: r.status })),
    el("p", {}, "Export: ", exportLinks.flatMap((a, i) => (i ? [" · ", a] : [a]))),
    ...(confControl ? [confControl] : []),
    el("div", { class: "pager" },
      el("button", { class: "plain", disabled: offset <= 0, onclick: () => go(order, desc, Math.max(0, offset - limit)), text: "← previous" }),
      el("span", { id: "range", text: `features ${page.total ? offset + 1 : 0}–${last} of ${page.total}` }),
      el("button", { class: "plain", disabled: offset + limit >= page.total, onclick: () => go(order, desc, offset + limit), text: "next →" })),
    table([sortHead("feature", "feature"), el("th", { text: "top concept" }), sortHead("score", "score"),
      sortHead("margin", "margin"), sortHead("confidence", "confidence"), el("th", { text: "runners-up" })],
    page.rows.map((row) => el("tr", { class: row.matched === false ? "run-row no-match" : "run-row" },
      el("td", { class: "num", text: row.feature }),
      el("td", {}, row.matched === false
        ? el("span", { class: "muted", title: `best: ${row.hits[0].label}`, text: row.label })
        : el("a", { href: conceptHref(row.hits[0].atlas, row.hits[0].ordinal), text: row.hits[0].label })),
      el("td", { class: "num", text: fmt(row.hits[0].score, 4) }),
      el("td", { class: "num", text: fmt(row.margin, 4) }),
      el("td", { class: "num", text: row.confidence == null ? "–" : fmt(row.confidence, 3) }),
      el("td", { class: "muted" }, row.hits.slice(row.matched === false ? 0 : 1).flatMap((h, i) => [i ? ", " : "",
        el("a", { href: conceptHref(h.atlas, h.ordinal), text: h.label }), ` ${fmt(h.score, 2)}`])))), { id: "rows" }),
  );
}

// ------------------------------------------------------------------ explain

function hue(ref) {
  let h = 0;
  for (const ch of ref) h = (h * 31 + ch.charCodeAt(0)) % 360;
  return h;
}

async function explainPage() {
  const [sel] = await mapSelect("explain-map");
  const text = el("textarea", { id: "explain-text", name: "text", placeholder: "Paste a text to explain" },
    "the rain fell on the river and the storm came over the hills");
  const k = el("input", { type: "number", id: "explain-k", min: 1, max: 20, value: 5 });
  const out = el("div", { id: "explain-out" });
  const button = el("button", { type: "submit", id: "explain-go", text: "Explain" });
  const form = el("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    out.replaceChildren(el("p", { class: "muted", text: "Running the subject model…" }));
    try {
      showExplain(await api("/api/explain", { map: sel.value, text: text.value, k: parseInt(k.value, 10) || 5 }), out);
    } catch (e) { fail(out, e); }
    button.disabled = false;
  } }, el("div", { class: "row" }, el("label", {}, "Map ", sel), el("label", {}, "concepts per token ", k)), text,
  el("div", { class: "row" }, button));
  show(el("h1", { text: "Explain a text" }),
    el("p", { class: "muted", text: "Each token is coloured by its top concept (hue) and that concept's cosine score (strength); hover for the top-k." }),
    form, out);
}

function showExplain(res, out) {
  const tip = document.getElementById("tip");
  const max = Math.max(1e-6, ...res.tokens.map((t) => (t.hits[0] ? t.hits[0].score : 0)));
  const spans = res.tokens.map((t) => {
    const top = t.hits[0];
    const a = top ? Math.max(0, top.score) / max : 0;
    const span = el("span", { class: "tok", "data-score": top ? top.score : "", "data-concept": top ? top.ref : "",
      style: top ? `background: hsla(${hue(top.ref)}, 75%, 55%, ${(0.12 + 0.7 * a).toFixed(3)})` : "" }, t.token);
    span.addEventListener("mouseenter", (ev) => {
      tip.replaceChildren(el("strong", { text: JSON.stringify(t.token) }),
        table(["#", "concept", "score"], t.hits.map((h) => el("tr", {}, el("td", { text: h.rank }), el("td", { text: h.label }),
          el("td", { class: "num", text: fmt(h.score) })))));
      tip.hidden = false;
      tip.style.left = Math.min(ev.clientX + 12, innerWidth - 300) + "px";
      tip.style.top = ev.clientY + 16 + "px";
    });
    span.addEventListener("mouseleave", () => { tip.hidden = true; });
    return span;
  });
  // keep the text's own spacing between tokens where offsets are known
  const pieces = [];
  res.tokens.forEach((t, i) => {
    const prev = res.tokens[i - 1];
    if (prev && prev.end >= 0 && t.start > prev.end) pieces.push(" ".repeat(Math.min(4, t.start - prev.end)));
    else if (i) pieces.push(" ");
    pieces.push(spans[i]);
  });
  const summary = (rows, key) => table(["concept", key === "max" ? "max" : "mean", "tokens", "best token"], rows.map((c) => el("tr", {},
    el("td", {}, el("a", { href: conceptHref(c.ref.split("/").slice(0, -1).join("/"), c.ref.split("/").pop()), text: c.label })),
    el("td", { class: "num", text: fmt(key === "max" ? c.max_score : c.mean_score) }),
    el("td", { class: "num", text: c.n_tokens }), el("td", { text: c.best_token }))), { class: "summary-" + key });
  out.replaceChildren(
    el("p", { class: "muted", text: `${res.tokens.length} tokens of ${res.subject_model}, through ${res.map} into ${res.atlas}` }),
    el("div", { class: "tokens", id: "tokens" }, pieces),
    el("div", { class: "cols" },
      el("div", {}, el("h2", { text: "Concepts by max score" }), summary(res.summary.max, "max")),
      el("div", {}, el("h2", { text: "Concepts by mean score" }), summary(res.summary.mean, "mean"))));
}

// ------------------------------------------------------------------ steer

async function steerPage() {
  const [sel] = await mapSelect("steer-map");
  const concepts = el("input", { type: "text", id: "steer-concepts", name: "concepts", size: 40,
    placeholder: "concepts: ids, labels or words, comma-separated", value: PARAMS_NOW().get("concept") || "" });
  const prompt = el("textarea", { id: "steer-prompt", name: "prompt", placeholder: "One prompt per line" }, "the");
  const strength = el("input", { type: "range", id: "steer-strength", min: -3, max: 3, step: 0.1, value: 0.5 });
  const shown = el("output", { id: "strength-value", text: "0.5" });
  strength.addEventListener("input", () => { shown.textContent = strength.value; });
  const n = el("input", { type: "number", id: "steer-n", min: 1, max: 100, value: 20 });
  const seed = el("input", { type: "number", id: "steer-seed", min: 0, value: 0 });
  const mode = el("select", { id: "steer-mode" }, el("option", { value: "add", text: "add" }), el("option", { value: "clamp", text: "clamp" }));
  const out = el("div", { id: "steer-out" });
  const button = el("button", { type: "submit", id: "steer-go", text: "Generate" });
  // "Save plan": a link to the plan (resolved concept ids, provenance) as a JSON file, set after each run
  const save = el("a", { id: "save-plan", class: "button plain", download: "steering-plan.json", hidden: true, text: "Save plan (JSON)" });
  const form = el("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    out.replaceChildren(el("p", { class: "muted", text: "Generating…" }));
    try {
      const res = await api("/api/steer", {
        map: sel.value, concepts: concepts.value.split(",").map((s) => s.trim()).filter(Boolean),
        prompts: prompt.value.split("\n").map((s) => s.trim()).filter(Boolean),
        strength: parseFloat(strength.value), max_new_tokens: parseInt(n.value, 10) || 20,
        seed: parseInt(seed.value, 10) || 0, mode: mode.value,
      });
      if (save.href) URL.revokeObjectURL(save.href);
      save.href = URL.createObjectURL(new Blob([JSON.stringify(res.plan, null, 2) + "\n"], { type: "application/json" }));
      save.hidden = false;
      showSteer(res, out);
    } catch (e) { fail(out, e); }
    button.disabled = false;
  } },
  el("div", { class: "row" }, el("label", {}, "Map ", sel), concepts),
  el("div", { class: "row" }, el("label", {}, "Strength ", strength), shown, el("span", { class: "muted", text: "× typical residual norm" }),
    el("label", {}, "mode ", mode), el("label", {}, "new tokens ", n), el("label", {}, "seed ", seed)),
  prompt, el("div", { class: "row" }, button, save));
  show(el("h1", { text: "Steer" }),
    el("p", { class: "muted", text: "Steered and unsteered continuations from the same seed; perplexity under the unsteered model guards fluency." }),
    form, out);
}

function showSteer(res, out) {
  const ratio = res.perplexity_ratio;
  out.replaceChildren(
    el("p", {}, res.concepts.map((c) => el("span", { class: "pill", text: `${c.ref} ${c.label} ×${c.strength}` })), " ",
      `layers ${res.layers.join(", ")} of ${res.subject_model}`),
    ...res.outputs.map((o) => el("div", { class: "pair" },
      el("p", { class: "muted" }, "prompt: ", el("strong", { text: o.prompt })),
      el("div", { class: "cols" },
        el("div", { class: "out unsteered" }, el("h3", { text: "unsteered" }), o.unsteered),
        el("div", { class: "out steered" }, el("h3", { text: "steered" }), o.steered)))),
    el("p", { id: "perplexity", class: res.fluency_ok ? "" : "warn" },
      `perplexity under the unsteered model: unsteered ${fmt(res.perplexity_unsteered, 2)}, steered ${fmt(res.perplexity_steered, 2)}`
      + (ratio ? ` (×${fmt(ratio, 2)})` : "")
      + (res.fluency_ok ? "" : ` — over ${res.fluency_bound}× the unsteered: the text is breaking, lower the strength`)));
}

// ------------------------------------------------------------------ router

async function route() {
  const path = decodeURIComponent(location.pathname);
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.getAttribute("href") === location.pathname);
  try {
    let m;
    if ((m = path.match(/^\/c\/(.+)\/(\d+)$/))) await conceptPage(m[1], m[2]);
    else if ((m = path.match(/^\/runs\/(.+)$/))) await runPage(m[1]);
    else if (path === "/explain") await explainPage();
    else if (path === "/steer") await steerPage();
    else await searchPage();
  } catch (e) { fail(main(), e); }
}

route();

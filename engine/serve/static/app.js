// The Concept Atlas explorer: one small hand-written page over the JSON API (/openapi.json).
// Routes: /  (search), /c/<atlas>/<ordinal>  (concept), /a/<atlas>  (atlas), /m/<map>  (map),
// /models/<name>  (model), /runs/<name>  (run), /explain, /steer; anything else: not found.
"use strict";

const PARAMS = new URLSearchParams(location.search);
if (PARAMS.get("token")) sessionStorage.setItem("atlas-token", PARAMS.get("token"));
const TOKEN = sessionStorage.getItem("atlas-token");
const K_MAX = 20;  // concepts per token (the explain route's bound)

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

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
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
  if (!r.ok) throw new ApiError((data && data.detail) || (r.status + " " + r.statusText), r.status);
  return data;
}

const fmt = (x, n = 3) => (x === null || x === undefined ? "" : Number(x).toFixed(n));
const enc = encodeURIComponent;
const conceptHref = (atlas, ordinal) => `/c/${enc(atlas)}/${ordinal}`;
const refHref = (ref) => conceptHref(ref.split("/").slice(0, -1).join("/"), ref.split("/").pop());
const main = () => document.getElementById("main");
const paramsNow = () => new URLSearchParams(location.search);

function show(...nodes) {
  main().replaceChildren(...nodes);
}

function fail(where, err) {
  where.replaceChildren(el("p", { class: "error", role: "alert", text: err.message || String(err) }));
}

function table(headers, rows, attrs) {
  return el("div", { class: "scroll" }, el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => (h instanceof Node ? h : el("th", { scope: "col", text: h }))))),
    el("tbody", {}, rows)));
}

function dl(pairs, attrs) {
  return el("dl", Object.assign({ class: "prov" }, attrs || {}),
    pairs.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v === null || v === undefined || v === "" ? "—" : v)]));
}

// In words: what a held-out R² of a map says about how well it carries the subject into the atlas.
function r2Words(r2) {
  if (r2 === null || r2 === undefined) return "no held-out R²";
  return `held-out R² ${fmt(r2, 2)}`;
}

// ------------------------------------------------------------------ navigation

// Each page is a history entry; a new page opens at its top, Back returns to where it was (its
// scroll offset and, for Explain, its text, map and results: kept in the entry's state).
history.scrollRestoration = "manual";

function navigate(href) {
  saveScroll();
  history.pushState({}, "", href);
  route().then(() => window.scrollTo(0, 0));
}

function saveScroll() {
  history.replaceState(Object.assign({}, history.state || {}, { scrollY: window.scrollY }), "");
}

function saveState(patch) {
  history.replaceState(Object.assign({}, history.state || {}, patch), "");
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a || a.target || a.hasAttribute("download") || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/api/") || url.pathname.startsWith("/docs")
      || url.pathname.startsWith("/redoc")) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", () => {
  const y = (history.state && history.state.scrollY) || 0;
  route().then(() => window.scrollTo(0, y));
});

let INFO = null;
async function info() {
  if (!INFO) INFO = await api("/api/info");
  return INFO;
}

// A map dropdown: short option texts (the long site in the title), the wanted map, else the store's default.
async function mapSelect(id, wanted, only) {
  const [maps, inf] = await Promise.all([api("/api/maps"), info()]);
  const shown = only ? maps.filter((m) => only.includes(m.name)) : maps;
  const pick = shown.some((m) => m.name === wanted) ? wanted : (shown.some((m) => m.name === inf.default_map) ? inf.default_map : (shown[0] || {}).name);
  const sel = el("select", { id, name: "map" }, shown.map((m) =>
    el("option", { value: m.name, selected: m.name === pick, title: `${m.subject_model} layer ${m.subject_layer} → ${m.atlas}, ${r2Words(m.heldout_r2)}`,
      text: `${m.name} (${m.subject_model} L${m.subject_layer} → ${m.atlas})` })));
  sel.value = pick || "";
  return [sel, maps];
}

// ------------------------------------------------------------------ search (home)

async function searchPage() {
  const q = paramsNow().get("q") || "";
  const atlasWanted = paramsNow().get("atlas") || "";
  const [atlases, runs, maps, models] = await Promise.all([api("/api/atlases"), api("/api/runs"), api("/api/maps"), api("/api/models")]);
  const box = el("input", { type: "search", id: "q", name: "q", value: q, "aria-label": "words to look up",
    placeholder: "Look up concepts: rain, music, …", autofocus: true });
  const filter = el("select", { id: "atlas", name: "atlas", "aria-label": "atlas to search" },
    el("option", { value: "", text: "all atlases" }),
    atlases.map((a) => el("option", { value: a.name, text: a.name, selected: a.name === atlasWanted })));
  const results = el("div", { id: "results", "aria-live": "polite" });
  const form = el("form", { class: "row", role: "search", onsubmit: (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams({ q: box.value });
    if (filter.value) p.set("atlas", filter.value);
    navigate("/?" + p);  // a search is a history entry: Back returns to the previous one
  } }, box, filter, el("button", { type: "submit", text: "Search" }));
  show(el("h1", { text: "Search the atlas" }), form, results,
    el("h2", { text: "Atlases" }),
    table(["atlas", "site", "concepts", "labelled", "source"], atlases.map((a) => el("tr", {},
      el("td", {}, el("a", { href: `/a/${enc(a.name)}`, text: a.name })), el("td", { text: a.site }),
      el("td", { class: "num", text: a.n_concepts }),
      el("td", { class: "num", text: a.n_labelled }), el("td", { text: a.source_ref || a.source_kind }))), { id: "atlases" }),
    el("h2", { text: "Maps" }),
    table(["map", "subject", "atlas", "method", "held-out R²"], maps.map((m) => el("tr", {},
      el("td", {}, el("a", { href: `/m/${enc(m.name)}`, text: m.name })),
      el("td", {}, el("a", { href: `/models/${enc(m.subject_model)}`, text: m.subject_model }), ` layer ${m.subject_layer}`),
      el("td", {}, el("a", { href: `/a/${enc(m.atlas)}`, text: m.atlas })), el("td", { text: m.method }),
      el("td", { class: "num", text: fmt(m.heldout_r2) }))), { id: "maps" }),
    el("h2", { text: "Labelling runs" }),
    table(["run", "map", "status", "done", "k"], runs.map((r) => el("tr", {},
      el("td", {}, el("a", { href: `/runs/${enc(r.name)}`, text: r.name })),
      el("td", {}, el("a", { href: `/m/${enc(r.map)}`, text: r.map })),
      el("td", { text: r.status }), el("td", { text: `${r.n_done}/${r.n_features}` }), el("td", { class: "num", text: r.k }))), { id: "runs" }),
    el("h2", { text: "Models" }),
    table(["model", "architecture", "layers", "width"], models.map((m) => el("tr", {},
      el("td", {}, el("a", { href: `/models/${enc(m.name)}`, text: m.name })), el("td", { text: m.architecture || "" }),
      el("td", { class: "num", text: m.n_layers ?? "" }), el("td", { class: "num", text: m.d_model ?? "" }))), { id: "models" }));
  if (q) await runSearch(q, atlasWanted, results);
}

async function runSearch(q, atlas, where) {
  if (!q.trim()) { where.replaceChildren(); return; }
  where.replaceChildren(el("p", { class: "muted", text: "Searching…" }));
  try {
    const p = new URLSearchParams({ q, k: "30" });
    if (atlas) p.set("atlas", atlas);
    const res = await api("/api/lookup?" + p);
    if (!res.hits.length) {
      where.replaceChildren(el("p", { class: "muted", role: "status" },
        `No concept matches “${q}”: no label or description has these words, and none is close in meaning.`));
      return;
    }
    where.replaceChildren(table(["#", "concept", "description", "atlas", "match"], res.hits.map((h) => el("tr", { class: "hit" },
      el("td", { class: "num", text: h.rank }),
      el("td", { class: "concept" }, el("a", { href: conceptHref(h.atlas, h.ordinal), text: h.label })),
      el("td", { class: "muted", text: h.description || "" }),
      el("td", {}, el("a", { href: `/a/${enc(h.atlas)}`, text: h.atlas })),
      el("td", { class: "match", title: `fused rank score ${fmt(h.score, 4)}` + (h.similarity != null ? `, cosine ${fmt(h.similarity, 2)}` : ""),
        text: h.match }))),
    { id: "hits" }));
  } catch (e) { fail(where, e); }
}

// ------------------------------------------------------------------ not found

// A page's data, or null after showing "not found" when the API says 404 (an unknown atlas, concept, map…).
async function pageData(path) {
  try { return await api(path); } catch (e) {
    if (e.status === 404) { notFound(e.message); return null; }
    throw e;
  }
}

function notFound(message) {
  document.title = "Not found · Concept Atlas";
  show(el("h1", { id: "not-found", text: "Page not found" }),
    el("p", { class: "muted", text: message || `Nothing lives at ${location.pathname}.` }),
    el("p", {}, el("a", { href: "/", text: "Search the atlas" })));
}

// ------------------------------------------------------------------ concept (the hub)

async function conceptPage(atlas, ordinal) {
  const c = await pageData(`/api/concepts/${enc(atlas)}/${ordinal}`);
  if (!c) return;
  const [neigh, feats, ctxs] = await Promise.all([
    api(`/api/concepts/${enc(atlas)}/${ordinal}/neighbors?k=10`),
    api(`/api/concepts/${enc(atlas)}/${ordinal}/features?limit=200`),
    api(`/api/concepts/${enc(atlas)}/${ordinal}/contexts?limit=20`),
  ]);
  const ref = c.concept.ref;
  const p = c.provenance;
  const best = c.best_maps;
  document.title = `${c.concept.title} · Concept Atlas`;
  const prov = dl([["model", el("a", { href: `/models/${enc(p.model)}`, text: p.model })], ["layer", p.layer], ["hook", p.hook],
    ["source", p.source_kind], ["source file", p.source_file], ["revision", p.revision],
    ["atlas", el("span", {}, el("a", { href: `/a/${enc(p.atlas)}`, text: p.atlas }), ` (${p.n_concepts} concepts, d=${p.dim})`)]]);
  const ls = c.label_source;
  const labelLine = ls.labelled
    ? el("p", { id: "label-source", class: "muted" }, `Label from ${ls.kind}${ls.ref ? " " + ls.ref : ""}`,
      ls.explainer ? `, explained by ${ls.explainer}` : "", ls.score != null ? `, explanation score ${fmt(ls.score, 2)}` : "",
      ls.confidence != null ? `, confidence ${fmt(ls.confidence, 2)}` : "", c.concept.density != null ? `; fires on ${fmt(100 * c.concept.density, 2)}% of tokens` : "")
    : el("p", { id: "label-source", class: "muted" }, `Unlabelled: latent ${c.concept.ordinal} of ${p.atlas} (${ls.kind}); `,
      "its contexts and labelled subject features below say what it reads.");
  const first = best[0];
  const actions = el("div", { class: "actions" },
    el("a", { id: "steer-with", class: "button", href: `/steer?` + new URLSearchParams(Object.assign({ concept: ref }, first ? { map: first.map } : {})), text: "Steer with this" }),
    el("a", { id: "explain-with", class: "button", href: `/explain?` + new URLSearchParams(Object.assign({ concept: ref }, first ? { map: first.map } : {})), text: "Explain a text with this" }),
    el("a", { class: "button", href: `/a/${enc(p.atlas)}`, text: `All concepts of ${p.atlas}` }));
  const mapsLine = best.length
    ? el("p", { id: "best-maps" }, "Best map into each subject: ", best.flatMap((m, i) => [i ? ", " : "",
      el("a", { href: `/m/${enc(m.map)}`, text: m.map }), ` (${m.subject_model} layer ${m.subject_layer}, ${r2Words(m.heldout_r2)})`]))
    : el("p", { id: "best-maps", class: "muted", text: "No map into this atlas yet: nothing to explain or steer with." });
  const mapsBlock = feats.length ? feats.map((m) => el("details", { class: "features", "data-map": m.map },
    el("summary", { text: `Subject features of ${m.subject_model} (layer ${m.subject_layer}) whose label it is, through map ${m.map}: ${m.features.length}` }),
    m.features.length ? table(["run", "feature", "score"], m.features.map((f) => el("tr", { class: "feature" },
      el("td", {}, el("a", { href: `/runs/${enc(f.run)}`, text: f.run })), el("td", { class: "num", text: f.feature }),
      el("td", { class: "num", text: fmt(f.score, 4) }))))
      : el("p", { class: "muted", text: "No labelling run through this map gives it as a feature's label (rank 1, confidence ≥ 0.5)." })))
    : [el("p", { class: "muted", text: "No map into this atlas yet." })];
  const logits = el("div", { id: "logits" });
  const tryIt = testYourText(ref, best);
  const steer = best.length ? await steerPanel("cs", { concept: ref, maps: best.map((m) => m.map), wanted: first.map }) : null;
  show(
    el("p", { class: "muted" }, el("span", { class: "pill", text: ref }), " ", c.concept.labelled ? "" : "(unlabelled)"),
    el("h1", { id: "label", text: c.concept.title }),
    el("p", { id: "description", text: c.concept.description || "" }),
    labelLine, actions, mapsLine,
    el("h2", { text: "Top contexts" }), ...contextsBlock(ctxs, atlas, ref),
    el("h2", { text: "Tokens it promotes and suppresses" }), logits,
    el("h2", { text: "Test your text" }), tryIt,
    ...(steer ? [el("h2", { text: "Steer with it" }), steer] : []),
    el("h2", { text: "Labelled subject features" }), ...mapsBlock,
    el("h2", { text: "Nearest concepts by direction" }),
    table(["#", "concept", "cosine"], neigh.map((h) => el("tr", {},
      el("td", { class: "num", text: h.rank }), el("td", {}, el("a", { href: conceptHref(h.atlas, h.ordinal), text: h.label })),
      el("td", { class: "num", text: fmt(h.score, 4) }))), { id: "neighbours" }),
    el("h2", { text: "Provenance" }), prov,
  );
  loadLogits(atlas, ordinal, best, logits);
  shadeWindows(ctxs, ref, best);
}

async function loadLogits(atlas, ordinal, best, where) {
  if (!best.length) { where.replaceChildren(el("p", { class: "muted", text: "No map into a subject: no unembedding to read it through." })); return; }
  where.replaceChildren(el("p", { class: "muted", text: "Reading the direction through each subject's unembedding…" }));
  const blocks = [];
  for (const m of best) {
    try {
      const r = await api(`/api/concepts/${enc(atlas)}/${ordinal}/logits?` + new URLSearchParams({ map: m.map, k: "10" }));
      const list = (rows, cls) => el("ol", { class: cls }, rows.map(([t, v]) => el("li", {}, el("code", { text: JSON.stringify(t) }), ` ${fmt(v, 2)}`)));
      blocks.push(el("div", { class: "logits", "data-map": m.map },
        el("h3", { text: `${r.subject_model} layer ${r.subject_layer} (through ${r.map})` }),
        el("div", { class: "cols" }, el("div", {}, el("strong", { text: "promotes" }), list(r.top, "top-logits")),
          el("div", {}, el("strong", { text: "suppresses" }), list(r.bottom, "bottom-logits")))));
    } catch (e) {
      blocks.push(el("p", { class: "muted", text: `${m.subject_model}: ${e.message}` }));
    }
  }
  where.replaceChildren(el("p", { class: "muted", text: "The concept's direction carried into the subject by the map and multiplied by its unembedding (W_U), without the final norm." }), ...blocks);
}

// A concept's top windows per model that read a corpus, the activating token marked. Offsets count
// Unicode code points (Python's str), so the window is split as code points, not UTF-16 units.
function contextsBlock(runs, atlas, ref) {
  if (!runs.length) {
    return [el("p", { class: "muted" }, "None computed yet: ", el("code", { text: `atlas contexts ${atlas} --corpus FILE` }),
      " (or a map into this atlas) stores them.")];
  }
  return runs.map((r) => el("details", { class: "contexts", open: true, "data-source": r.map ? "map:" + r.map : "atlas:" + r.atlas },
    el("summary", { title: r.corpus, text: `${r.map ? `Through map ${r.map}: ` : ""}${r.model} layer ${r.layer}, ${r.corpus.split(/[\\/]/).pop()} `
      + `(${r.n_done}/${r.n_texts} texts, ${r.status}), by ${r.scoring === "encoder" ? "SAE activation" : "projection"}` }),
    r.contexts.length ? histogramSvg(r.histogram, `Activations of the top ${r.contexts.length} windows`) : null,
    r.map ? densityBlock(ref, r.map) : null,
    r.contexts.length ? el("ol", { class: "ctx-list" }, r.contexts.map((c) => {
      const cps = Array.from(c.window);
      const marked = c.token_start >= 0 && c.token_end > c.token_start;
      const text = marked ? [cps.slice(0, c.token_start).join(""),
        el("mark", { class: "ctx-tok", text: cps.slice(c.token_start, c.token_end).join("") }),
        cps.slice(c.token_end).join("")] : [c.window];
      return el("li", { class: "ctx", "data-text": c.text_index, "data-window": c.window },
        el("span", { class: "num ctx-act", text: fmt(c.activation) }),
        el("span", { class: "ctx-text" }, c.window_start > 0 ? "…" : "", text));
    })) : el("p", { class: "muted", text: "No text of the corpus activates it." })));
}

// The concept's score over every token of the first texts of the corpus (a forward pass: on demand).
function densityBlock(ref, map) {
  const where = el("div", { class: "density-out", "aria-live": "polite" });
  const go = el("button", { type: "button", class: "plain", text: "Density over the corpus (200 texts)", onclick: async () => {
    go.disabled = true;
    where.replaceChildren(el("p", { class: "muted", text: "Reading the corpus…" }));
    try {
      const [atlas, ordinal] = [ref.split("/").slice(0, -1).join("/"), ref.split("/").pop()];
      const d = await api(`/api/concepts/${enc(atlas)}/${ordinal}/density?` + new URLSearchParams({ map, texts: "200" }));
      where.replaceChildren(histogramSvg(d.histogram, `Score on all ${d.n_tokens} tokens of ${d.n_texts} texts; above 0 on ${fmt(100 * d.positive, 1)}% of them`));
    } catch (e) { fail(where, e); }
    go.disabled = false;
  } });
  return el("div", { class: "density", "data-map": map }, go, where);
}

// Every token of each top window (of a run through a map) shaded by the concept's score on it, the maximum outlined.
async function shadeWindows(runs, ref, best) {
  for (const r of runs) {
    if (!r.map || !r.contexts.length) continue;
    const block = document.querySelector(`details.contexts[data-source="map:${CSS.escape(r.map)}"]`);
    if (!block) continue;
    let res;
    try { res = await api(`/api/concepts/${ref.split("/").slice(0, -1).map(enc).join("/")}/${ref.split("/").pop()}/scores`, { map: r.map, texts: r.contexts.map((c) => c.window) }); } catch (e) { continue; }
    const items = block.querySelectorAll("li.ctx");
    res.texts.forEach((toks, i) => {
      if (!items[i] || !toks.length) return;
      const span = items[i].querySelector(".ctx-text");
      const c = r.contexts[i];
      span.replaceChildren(c.window_start > 0 ? "…" : "", ...shadedTokens(c.window, toks, "ctx", [c.token_start, c.token_end]));
    });
    block.setAttribute("data-shaded", "");
    block.querySelector("summary").after(el("p", { class: "muted", text: "Each token shaded by the concept's score on it (the window read on its own), the highest outlined; the stored activating token is bold and underlined in amber." }));
  }
}

// The text with each token shaded by its score (blue, opacity ∝ score / max), the best token outlined,
// a title on each with its value; the text between tokens kept as is.
function shadedTokens(text, toks, kind, mark) {
  const cps = Array.from(text);
  const max = Math.max(1e-6, ...toks.map((t) => t.score));
  const best = toks.reduce((b, t, i) => (t.score > toks[b].score ? i : b), 0);
  const out = [];
  let at = 0;
  toks.forEach((t, i) => {
    if (t.start < 0) { out.push(" ", el("span", { class: "tok", text: t.token })); return; }
    if (t.start > at) out.push(cps.slice(at, t.start).join(""));
    const a = Math.max(0, t.score) / max;
    const marked = mark && mark[0] >= 0 && t.start >= mark[0] && t.end <= mark[1];
    out.push(el(marked ? "mark" : "span", { class: "tok" + (marked ? " ctx-tok" : "") + (i === best ? " tok-max" : ""), "data-score": t.score, title: `${kind === "ctx" ? "" : t.token + ": "}${fmt(t.score)}`,
      style: `background: rgba(36, 88, 168, ${(0.06 + 0.6 * a).toFixed(3)})` }, cps.slice(t.start, t.end).join("")));
    at = Math.max(at, t.end);
  });
  if (at < cps.length) out.push(cps.slice(at).join(""));
  return out;
}

function histogramSvg(h, caption) {
  if (!h || !h.counts || !h.counts.length) return null;
  const W = 320, H = 70, n = h.counts.length, top = Math.max(...h.counts);
  const bw = W / n;
  return el("figure", { class: "hist-fig" },
    svg("svg", { class: "hist", viewBox: `0 0 ${W} ${H + 14}`, width: W, height: H + 14, role: "img",
      "aria-label": `${caption}: from ${fmt(h.edges[0], 2)} to ${fmt(h.edges[n], 2)}` },
    h.counts.map((c, i) => svg("rect", { x: i * bw + 1, y: H - (H * c) / top, width: bw - 2, height: (H * c) / top },
      svg("title", {}, `${fmt(h.edges[i], 2)}–${fmt(h.edges[i + 1], 2)}: ${c}`))),
    svg("text", { x: 0, y: H + 12 }, fmt(h.edges[0], 2)), svg("text", { x: W, y: H + 12, "text-anchor": "end" }, fmt(h.edges[n], 2))),
    el("figcaption", { class: "muted", text: caption }));
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function testYourText(ref, best) {
  if (!best.length) return el("p", { class: "muted", text: "No map into a subject model: no model to read a text with." });
  const [atlas, ordinal] = [ref.split("/").slice(0, -1).join("/"), ref.split("/").pop()];
  const sel = el("select", { id: "try-map" }, best.map((m) => el("option", { value: m.map, text: `${m.subject_model} (${m.map})` })));
  const text = el("textarea", { id: "try-text", name: "text", placeholder: "Type a text: each token is shaded by this concept's score" });
  const out = el("div", { id: "try-out", "aria-live": "polite" });
  const go = el("button", { type: "submit", id: "try-go", text: "Score it" });
  return el("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    if (!text.value.trim()) { out.replaceChildren(el("p", { role: "alert", class: "error", text: "Type a text first." })); return; }
    go.disabled = true;
    try {
      const res = await api(`/api/concepts/${enc(atlas)}/${ordinal}/scores`, { map: sel.value, texts: [text.value] });
      const toks = res.texts[0];
      out.replaceChildren(toks.length
        ? el("div", { class: "tokens", id: "try-tokens" }, shadedTokens(text.value, toks, "try"))
        : el("p", { role: "status", class: "muted", text: `${res.subject_model}'s tokenizer left no token of this text.` }));
    } catch (e) { fail(out, e); }
    go.disabled = false;
  } }, el("div", { class: "row" }, el("label", { for: "try-map", text: "Subject" }), sel),
  el("label", { for: "try-text", class: "muted", text: "Your text" }), text, el("div", { class: "row" }, go), out);
}

// ------------------------------------------------------------------ atlas, map, model

async function atlasPage(atlas) {
  const a = await pageData(`/api/atlases/${enc(atlas)}`);
  if (!a) return;
  const p = paramsNow();
  const q = p.get("q") || "", labelled = p.get("labelled") || "", offset = Math.max(0, parseInt(p.get("offset") || "0", 10) || 0);
  const limit = 50;
  const query = { q, offset, limit };
  if (labelled) query.labelled = labelled;
  const page = await api(`/api/atlases/${enc(atlas)}/concepts?` + new URLSearchParams(query));
  const go = (patch) => navigate(`/a/${enc(atlas)}?` + new URLSearchParams(Object.assign({ q, labelled, offset: 0 }, patch)));
  const box = el("input", { type: "search", id: "atlas-q", value: q, "aria-label": `words in ${atlas}'s labels`, placeholder: "words in the label or description" });
  const which = el("select", { id: "atlas-labelled", "aria-label": "labelled or not" },
    [["", "all concepts"], ["true", "labelled"], ["false", "unlabelled"]].map(([v, t]) => el("option", { value: v, text: t, selected: v === labelled })));
  document.title = `${atlas} · Concept Atlas`;
  const last = Math.min(page.total, offset + page.concepts.length);
  show(el("h1", { text: `Atlas ${a.name}` }),
    dl([["site", a.site], ["model", el("a", { href: `/models/${enc(a.model)}`, text: a.model })], ["concepts", `${a.n_concepts} (${a.n_labelled} labelled)`],
      ["source", `${a.source_kind}${a.source_ref ? " " + a.source_ref : ""}`], ["dimension", a.dim],
      ["maps into it", a.maps.length ? el("span", {}, a.maps.flatMap((m, i) => [i ? ", " : "", el("a", { href: `/m/${enc(m)}`, text: m })])) : "none"]]),
    el("form", { class: "row", role: "search", onsubmit: (ev) => { ev.preventDefault(); go({ q: box.value, labelled: which.value }); } },
      box, which, el("button", { type: "submit", text: "Filter" })),
    el("div", { class: "pager" },
      el("button", { class: "plain", disabled: offset <= 0, onclick: () => go({ offset: Math.max(0, offset - limit) }), text: "← previous" }),
      el("span", { id: "concept-range", text: `${page.total ? offset + 1 : 0}–${last} of ${page.total}` }),
      el("button", { class: "plain", disabled: offset + limit >= page.total, onclick: () => go({ offset: offset + limit }), text: "next →" })),
    page.concepts.length ? table(["#", "concept", "description"], page.concepts.map((c) => el("tr", { class: "concept" },
      el("td", { class: "num", text: c.ordinal }),
      el("td", { class: "label" }, el("a", { href: conceptHref(atlas, c.ordinal), text: c.title })),
      el("td", { class: "muted", text: c.description || "" }))), { id: "concepts" })
      : el("p", { class: "muted", role: "status", text: "No concept of this atlas matches." }));
}

async function mapPage(name) {
  const r = await pageData(`/api/maps/${enc(name)}`);
  if (!r) return;
  const m = r.map;
  document.title = `${name} · Concept Atlas`;
  show(el("h1", { text: `Map ${m.name}` }),
    el("p", {}, el("a", { href: `/models/${enc(m.subject_model)}`, text: m.subject_model }), ` layer ${m.subject_layer} (${m.subject_hook}) → atlas `,
      el("a", { href: `/a/${enc(m.atlas)}`, text: m.atlas }), ` (foundation layer ${m.atlas_layer})`),
    el("div", { class: "actions" }, el("a", { class: "button", href: `/explain?map=${enc(m.name)}`, text: "Explain with it" }),
      el("a", { class: "button", href: `/steer?map=${enc(m.name)}`, text: "Steer with it" })),
    el("h2", { text: "Fit" }),
    dl([["method", m.method], ["pairing", m.pairing], ["pairs", m.n_pairs], ["held-out R²", fmt(m.heldout_r2)],
      ["held-out cosine", fmt(m.heldout_cosine)], ["widths", `${m.d_subject} → ${m.d_atlas}`], ["corpus", m.corpus_fingerprint ? m.corpus_fingerprint.slice(0, 12) : null],
      ["created", m.created_at]]),
    el("h2", { text: "Labelling runs through it" }),
    r.runs.length ? table(["run", "status", "done", "k"], r.runs.map((x) => el("tr", {},
      el("td", {}, el("a", { href: `/runs/${enc(x.name)}`, text: x.name })), el("td", { text: x.status }),
      el("td", { text: `${x.n_done}/${x.n_features}` }), el("td", { class: "num", text: x.k }))), { id: "map-runs" })
      : el("p", { class: "muted" }, "None yet: ", el("code", { text: `atlas label ${m.name} FEATURES` })),
    el("h2", { text: "Top contexts through it" }),
    r.contexts ? el("p", { text: `${r.contexts.corpus}: ${r.contexts.n_done}/${r.contexts.n_texts} texts, top ${r.contexts.top} per concept (${r.contexts.status})` })
      : el("p", { class: "muted" }, "None yet: ", el("code", { text: `atlas contexts ${m.name} --corpus FILE` })));
}

async function modelPage(name) {
  const r = await pageData(`/api/models/${enc(name)}`);
  if (!r) return;
  const m = r.model;
  document.title = `${name} · Concept Atlas`;
  show(el("h1", { text: `Model ${m.name}` }),
    dl([["architecture", m.architecture], ["kind", m.kind], ["layers", m.n_layers], ["width", m.d_model], ["source", m.source],
      ["revision", m.revision]]),
    el("h2", { text: "Maps from it" }),
    r.maps.length ? table(["map", "layer", "atlas", "held-out R²"], r.maps.map((x) => el("tr", {},
      el("td", {}, el("a", { href: `/m/${enc(x.name)}`, text: x.name })), el("td", { class: "num", text: x.subject_layer }),
      el("td", {}, el("a", { href: `/a/${enc(x.atlas)}`, text: x.atlas })), el("td", { class: "num", text: fmt(x.heldout_r2) }))), { id: "model-maps" })
      : el("p", { class: "muted", text: "No map from this model." }),
    el("h2", { text: "Atlases of its sites" }),
    r.atlases.length ? table(["atlas", "site", "concepts"], r.atlases.map((x) => el("tr", {},
      el("td", {}, el("a", { href: `/a/${enc(x.name)}`, text: x.name })), el("td", { text: x.site }), el("td", { class: "num", text: x.n_concepts }))))
      : el("p", { class: "muted", text: "No atlas of this model's sites." }));
}

// ------------------------------------------------------------------ run

async function runPage(name) {
  const p = paramsNow();
  const order = p.get("order") || "feature";
  const desc = p.get("desc") === "true";
  const offset = Math.max(0, parseInt(p.get("offset") || "0", 10) || 0);
  const minConf = p.get("min_confidence") || "";
  const limit = 100;
  const query = { order, desc, offset, limit };
  if (minConf !== "") query.min_confidence = minConf;
  const page = await pageData(`/api/runs/${enc(name)}/rows?` + new URLSearchParams(query));
  if (!page) return;
  const r = page.run;
  document.title = `Run ${name} · Concept Atlas`;
  const hasConf = !!(r.params && r.params.confidence);
  const go = (o, d, off, mc = minConf) => navigate(`/runs/${enc(name)}?` + new URLSearchParams(
    Object.assign({ order: o, desc: d, offset: off }, mc !== "" ? { min_confidence: mc } : {})));
  const sortHead = (label, key) => el("th", { class: "sortable", "data-sort": key, scope: "col",
    "aria-sort": order === key ? (desc ? "descending" : "ascending") : null },
  el("button", { type: "button", title: `sort by ${label}`, onclick: () => go(key, order === key ? !desc : key !== "feature", 0) },
    label + (order === key ? (desc ? " ▼" : " ▲") : "")));
  const exportLinks = ["jsonl", "csv", "neuronpedia"].map((f) =>
    el("a", { "data-format": f, href: `/api/runs/${enc(name)}/export?format=${f}${r.status === "done" ? "" : "&partial=true"}` +
      (minConf !== "" ? `&min_confidence=${enc(minConf)}` : ""), download: "", text: f }));
  const last = Math.min(page.total, offset + page.rows.length);
  const confInput = el("input", { id: "min-confidence", type: "number", min: "0", max: "1", step: "0.05",
    value: minConf, placeholder: "0–1", title: "labels below this confidence show as “no match”" });
  const confControl = hasConf ? el("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); go(order, desc, 0, confInput.value); } },
    el("label", { for: "min-confidence", text: "Min confidence " }), confInput, " ", el("button", { class: "plain", text: "apply" })) : null;
  show(
    el("h1", { text: `Run ${r.name}` }),
    el("p", {}, `${r.feature_source} through map `, el("a", { href: `/m/${enc(r.map)}`, text: r.map }), " into ",
      el("a", { href: `/a/${enc(r.atlas)}`, text: r.atlas }), `: ${r.n_done}/${r.n_features} features, top-${r.k}` +
      `${r.params && r.params.criterion ? ", " + r.params.criterion : ""}` +
      `${r.params && r.params.labelled_only ? ", labelled concepts only" : ""}, `,
      el("span", { class: "pill", text: r.status })),
    el("p", { id: "export" }, "Export: ", exportLinks.flatMap((a, i) => (i ? [" · ", a] : [a]))),
    ...(confControl ? [confControl] : []),
    el("div", { class: "pager" },
      el("button", { class: "plain", disabled: offset <= 0, onclick: () => go(order, desc, Math.max(0, offset - limit)), text: "← previous" }),
      el("span", { id: "range", text: `features ${page.total ? offset + 1 : 0}–${last} of ${page.total}` }),
      el("button", { class: "plain", disabled: offset + limit >= page.total, onclick: () => go(order, desc, offset + limit), text: "next →" })),
    table([sortHead("feature", "feature"), el("th", { scope: "col", text: "top concept" }), sortHead("score", "score"),
      sortHead("margin", "margin"), sortHead("confidence", "confidence"), el("th", { scope: "col", text: "runners-up" })],
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

// Ten colours told apart by most readers (Okabe–Ito and Tableau), one per top concept in order of
// first appearance; concepts past them share grey, named "other" in the legend.
const PALETTE = [[230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178], [213, 94, 0],
  [204, 121, 167], [148, 103, 189], [140, 86, 75], [188, 189, 34]];
const OTHER = [160, 160, 160];

async function explainPage() {
  const saved = (history.state && history.state.explain) || null;
  const p = paramsNow();
  const [sel] = await mapSelect("explain-map", saved ? saved.map : p.get("map"));
  const text = el("textarea", { id: "explain-text", name: "text", "aria-label": "text to explain", placeholder: "Paste a text to explain" },
    saved ? saved.text : "the rain fell on the river and the storm came over the hills");
  const k = el("input", { type: "number", id: "explain-k", min: 1, max: K_MAX, value: saved ? saved.k : 5 });
  const out = el("div", { id: "explain-out", "aria-live": "polite" });
  const button = el("button", { type: "submit", id: "explain-go", text: "Explain" });
  const form = el("form", { novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const kv = Number(k.value);
    if (!Number.isInteger(kv) || kv < 1 || kv > K_MAX) {
      fail(out, new Error(`concepts per token: give a whole number from 1 to ${K_MAX}`));
      k.focus();
      return;
    }
    if (!text.value.trim()) { fail(out, new Error("Type a text to explain.")); return; }
    button.disabled = true;
    out.replaceChildren(el("p", { class: "muted", text: "Running the subject model…" }));
    try {
      const res = await api("/api/explain", { map: sel.value, text: text.value, k: kv });
      saveState({ explain: { map: sel.value, text: text.value, k: kv, result: res } });
      showExplain(res, text.value, out);
    } catch (e) { fail(out, e); }
    button.disabled = false;
  } }, el("div", { class: "row" }, el("label", { for: "explain-map", text: "Map" }), sel,
    el("label", { for: "explain-k", text: "concepts per token" }), k), text,
  el("div", { class: "row" }, button));
  show(el("h1", { text: "Explain a text" }),
    el("p", { class: "muted", text: "Each token is coloured by its top concept (one colour per concept, see the legend) and shaded by that concept's cosine score; hover or focus a token (Tab) for its top-k." }),
    form, out);
  if (saved && saved.result) showExplain(saved.result, saved.text, out);
}

// The words of the text no token covers: the tokenizer dropped them (unknown to the model's vocabulary).
function uncovered(text, tokens) {
  if (tokens.some((t) => t.start < 0)) return [];
  const cps = Array.from(text);
  const covered = new Array(cps.length).fill(false);
  for (const t of tokens) for (let i = t.start; i < t.end; i++) covered[i] = true;
  const words = [];
  let i = 0;
  while (i < cps.length) {
    if (covered[i] || /\s/.test(cps[i])) { i++; continue; }
    const s = i;
    while (i < cps.length && !covered[i] && !/\s/.test(cps[i])) i++;
    words.push({ start: s, end: i, word: cps.slice(s, i).join("") });
  }
  return words;
}

function showExplain(res, source, out) {
  const tip = document.getElementById("tip");
  if (!res.tokens.length) {
    out.replaceChildren(el("p", { role: "status", class: "warn" },
      `${res.subject_model}'s tokenizer left no token of this text: no token to explain. `
      + "Its vocabulary may not cover these words or this script; try a text in the language it was trained on."));
    return;
  }
  const colours = new Map();
  for (const t of res.tokens) {
    const top = t.hits[0];
    if (top && !colours.has(top.ref)) colours.set(top.ref, { label: top.label, rgb: PALETTE[colours.size] || OTHER });
  }
  const max = Math.max(1e-6, ...res.tokens.map((t) => (t.hits[0] ? t.hits[0].score : 0)));
  const place = (node) => {
    const r = node.getBoundingClientRect();
    tip.style.left = Math.max(4, Math.min(r.left, innerWidth - Math.min(384, innerWidth * 0.9) - 4)) + "px";
    tip.style.top = Math.min(r.bottom + 6, innerHeight - 40) + "px";
  };
  const spanOf = (t) => {
    const top = t.hits[0];
    const a = top ? Math.max(0, top.score) / max : 0;
    const rgb = top ? colours.get(top.ref).rgb : null;
    const span = el("span", { class: "tok", tabindex: "0", "aria-describedby": "tip", "data-score": top ? top.score : "", "data-concept": top ? top.ref : "",
      style: rgb ? `background: rgba(${rgb.join(", ")}, ${(0.25 + 0.65 * a).toFixed(3)})` : "" }, t.token);
    const open = () => {
      tip.replaceChildren(el("strong", { text: JSON.stringify(t.token) }),
        table(["#", "concept", "score"], t.hits.map((h) => el("tr", {}, el("td", { text: h.rank }), el("td", { text: h.label }),
          el("td", { class: "num", text: fmt(h.score) })))));
      tip.hidden = false;
      place(span);
    };
    span.addEventListener("mouseenter", open);
    span.addEventListener("focus", open);
    span.addEventListener("mouseleave", () => { tip.hidden = true; });
    span.addEventListener("blur", () => { tip.hidden = true; });
    return span;
  };
  // the text as it is: tokens where the model has them, unknown words marked, the spacing kept
  const unknown = uncovered(source, res.tokens);
  const pieces = [];
  const cps = Array.from(source);
  if (res.tokens.some((t) => t.start < 0)) {
    res.tokens.forEach((t, i) => { if (i) pieces.push(" "); pieces.push(spanOf(t)); });
  } else {
    const items = res.tokens.map((t) => ({ start: t.start, end: t.end, node: () => spanOf(t) }))
      .concat(unknown.map((u) => ({ start: u.start, end: u.end, node: () => el("span", { class: "tok tok-unknown", title: "not in the model's vocabulary: the tokenizer drops it", text: u.word }) })))
      .sort((a, b) => a.start - b.start);
    let at = 0;
    for (const it of items) {
      if (it.start > at) pieces.push(cps.slice(at, it.start).join(""));
      pieces.push(it.node());
      at = Math.max(at, it.end);
    }
    if (at < cps.length) pieces.push(cps.slice(at).join(""));
  }
  const legend = el("ul", { class: "legend", id: "legend", "aria-label": "colour of each top concept" },
    [...colours.entries()].filter(([, v]) => v.rgb !== OTHER).map(([ref, v]) => el("li", { "data-concept": ref },
      el("span", { class: "swatch", style: `background: rgb(${v.rgb.join(", ")})` }), el("a", { href: refHref(ref), text: v.label }))),
    [...colours.values()].some((v) => v.rgb === OTHER) ? el("li", { "data-concept": "other" },
      el("span", { class: "swatch", style: `background: rgb(${OTHER.join(", ")})` }), "other concepts") : null);
  const summary = (rows, key) => table(["concept", key === "max" ? "max" : "mean", "tokens", "best token"], rows.map((c) => el("tr", {},
    el("td", {}, el("a", { href: refHref(c.ref), text: c.label })),
    el("td", { class: "num", text: fmt(key === "max" ? c.max_score : c.mean_score) }),
    el("td", { class: "num", text: c.n_tokens }), el("td", { text: c.best_token }))), { class: "summary-" + key });
  out.replaceChildren(
    el("p", { class: "muted", text: `${res.tokens.length} tokens of ${res.subject_model}, through ${res.map} into ${res.atlas}` }),
    unknown.length ? el("p", { id: "unknown-words", class: "warn", role: "status" },
      `${unknown.length} word${unknown.length > 1 ? "s" : ""} not in ${res.subject_model}'s vocabulary (its tokenizer drops them, marked with a wavy line): `,
      unknown.map((u) => u.word).join(", ")) : null,
    el("div", { class: "tokens", id: "tokens" }, pieces),
    legend,
    el("div", { class: "cols" },
      el("div", {}, el("h2", { text: "Concepts by max score" }), summary(res.summary.max, "max")),
      el("div", {}, el("h2", { text: "Concepts by mean score" }), summary(res.summary.mean, "mean"))));
}

// ------------------------------------------------------------------ steer

async function steerPage() {
  const p = paramsNow();
  const form = await steerPanel("steer", { concept: p.get("concept") || "", wanted: p.get("map") });
  show(el("h1", { text: "Steer" }),
    el("p", { class: "muted", text: "Steered and unsteered continuations from the same seed; perplexity under the unsteered model guards fluency." }),
    form);
}

// The steer form and its results; ids start with ``prefix`` (the steer page: "steer"; the concept page: "cs").
async function steerPanel(prefix, opts) {
  const id = (s) => `${prefix}-${s}`;
  const [sel] = await mapSelect(id("map"), opts.wanted, opts.maps);
  const concepts = el("input", { type: "text", id: id("concepts"), name: "concepts",
    placeholder: "ids, labels or words, comma-separated", value: opts.concept || "" });
  const prompt = el("textarea", { id: id("prompt"), name: "prompt", "aria-label": "prompts, one per line", placeholder: "One prompt per line" }, "the");
  const strength = el("input", { type: "range", id: id("strength"), min: -3, max: 3, step: 0.1, value: 0.5 });
  const shown = el("output", { id: prefix === "steer" ? "strength-value" : id("strength-value"), for: id("strength"), text: "0.5" });
  strength.addEventListener("input", () => { shown.textContent = strength.value; });
  const n = el("input", { type: "number", id: id("n"), min: 1, max: 100, value: 20 });
  const seed = el("input", { type: "number", id: id("seed"), min: 0, value: 0 });
  const mode = el("select", { id: id("mode") }, el("option", { value: "add", text: "add" }), el("option", { value: "clamp", text: "clamp" }));
  const out = el("div", { id: id("out"), "aria-live": "polite" });
  const button = el("button", { type: "submit", id: id("go"), text: "Generate" });
  // "Save plan": a link to the plan (resolved concept ids, provenance) as a JSON file, set after each run
  const save = el("a", { id: prefix === "steer" ? "save-plan" : id("save-plan"), class: "button plain", download: "steering-plan.json", hidden: true, text: "Save plan (JSON)" });
  return el("form", { class: "steer", onsubmit: async (ev) => {
    ev.preventDefault();
    const nv = Number(n.value);
    if (!Number.isInteger(nv) || nv < 1 || nv > 100) { fail(out, new Error("new tokens: give a whole number from 1 to 100")); return; }
    const wanted = concepts.value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!wanted.length) { fail(out, new Error("Name a concept to steer toward.")); return; }
    button.disabled = true;
    out.replaceChildren(el("p", { class: "muted", text: "Generating…" }));
    try {
      const res = await api("/api/steer", {
        map: sel.value, concepts: wanted,
        prompts: prompt.value.split("\n").map((s) => s.trim()).filter(Boolean),
        strength: parseFloat(strength.value), max_new_tokens: nv,
        seed: parseInt(seed.value, 10) || 0, mode: mode.value,
      });
      if (save.href) URL.revokeObjectURL(save.href);
      save.href = URL.createObjectURL(new Blob([JSON.stringify(res.plan, null, 2) + "\n"], { type: "application/json" }));
      save.hidden = false;
      showSteer(res, out);
    } catch (e) { fail(out, e); }
    button.disabled = false;
  } },
  el("div", { class: "row" }, el("label", { for: id("map"), text: "Map" }), sel),
  el("div", { class: "row" }, el("label", { for: id("concepts"), text: "Concepts" }), concepts),
  el("div", { class: "row" }, el("label", { for: id("strength"), text: "Strength" }), strength, shown, el("span", { class: "muted", text: "× typical residual norm" })),
  el("div", { class: "row" }, el("label", { for: id("mode"), text: "mode" }), mode, el("label", { for: id("n"), text: "new tokens" }), n,
    el("label", { for: id("seed"), text: "seed" }), seed),
  prompt, el("div", { class: "row" }, button, save), out);
}

function showSteer(res, out) {
  const ratio = res.perplexity_ratio;
  out.replaceChildren(
    el("p", {}, res.concepts.map((c) => el("a", { class: "pill", href: refHref(c.ref), text: `${c.ref} ${c.label} ×${c.strength}` })), " ",
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
  document.getElementById("tip").hidden = true;
  document.title = "Concept Atlas";
  for (const a of document.querySelectorAll("[data-nav]")) {
    const on = a.getAttribute("href") === location.pathname;
    a.classList.toggle("active", on);
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  try {
    let m;
    if ((m = path.match(/^\/c\/(.+)\/(\d+)$/))) await conceptPage(m[1], m[2]);
    else if ((m = path.match(/^\/a\/(.+)$/))) await atlasPage(m[1]);
    else if ((m = path.match(/^\/m\/(.+)$/))) await mapPage(m[1]);
    else if ((m = path.match(/^\/models\/(.+)$/))) await modelPage(m[1]);
    else if ((m = path.match(/^\/runs\/(.+)$/))) await runPage(m[1]);
    else if (path === "/explain") await explainPage();
    else if (path === "/steer") await steerPage();
    else if (path === "/") await searchPage();
    else notFound();
  } catch (e) { fail(main(), e); }
}

route();

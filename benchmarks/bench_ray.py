"""Ray local (2 workers) against in-process: an alignment fit and a labelling run, tiny and larger.

Four cases, each run in-process and then on a local Ray started once with ``--ray-cpus`` CPUs
(its start-up is timed apart and not counted in the Ray figures, as a cluster is started once):

- ``align-tiny``: `align_layers` of the tiny ConceptWorld's subject_a (every block) onto its atlas,
  on all its training texts (held-out split included), Procrustes;
- ``align-large``: the same on two random-weight GPT-2 models that are wider and deeper (subject
  d=256, foundation d=384, 4 layers each; the world's tokenizer) over the world's training texts
  repeated ``--repeat`` times, onto a random atlas at the foundation's layer 2;
- ``label-tiny``: `label_features` of the world subject's native concept directions through the
  tiny map (a few dozen features);
- ``label-large``: ``--features`` random features (d=512) through a random orthogonal map onto a
  ``--concepts``-concept Flat atlas (d=768), batches of 4096, k=5.

Each case also checks that Ray gave the in-process result: the maps' relative Frobenius
difference (float32 statistics on both sides: the float32 products' own rounding, see
``align-tiny-f64``, the in-process float32 map against a float64-statistics one), and for
labelling that the stored rows are identical. The README's figures, on the 2-core shared machine:

    nice -n 10 python benchmarks/bench_ray.py --cases tiny
    nice -n 10 python benchmarks/bench_ray.py --cases large      # --repeat 1, 30k features x 30k concepts
    nice -n 10 python benchmarks/bench_ray.py --cases label-large   # the labelling case alone
    python benchmarks/bench_ray.py --repeat 3 --features 100000 --concepts 100000   # bigger

The tiny world is read from ``$ATLAS_TEST_CACHE/worlds`` when it was built there (else built).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.align.fit import align_layers  # noqa: E402
from engine.align.map import AlignmentMap, load_map, save_map  # noqa: E402
from engine.align.pairing import PairingConfig  # noqa: E402
from engine.align.request import AlignRequest  # noqa: E402
from engine.distributed import RayConfig  # noqa: E402
from engine.labelling import run as labelling  # noqa: E402
from engine.store import layout  # noqa: E402
from engine.store.store import AtlasSource, IndexPlacement, Store  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def map_diff(store: Store, a: str, b: str) -> float:
    wa, wb = load_map(store, a).weight.astype(np.float64), load_map(store, b).weight.astype(np.float64)
    return float(np.linalg.norm(wa - wb) / np.linalg.norm(wa))


def random_gpt2(folder: Path, tokenizer_from: Path, d: int, n_layers: int, seed: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = json.loads((tokenizer_from / "config.json").read_text())
    model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg.get("n_positions", 128),
                                       n_embd=d, n_layer=n_layers, n_head=8))
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, folder / f)
    return folder


def align_case(store: Store, subject: str, atlas: str, texts, held, ray: RayConfig, tag: str, layers=None) -> dict:
    request = AlignRequest(subject, atlas, texts, held, layers, config=PairingConfig(batch_size=16))
    here, t_here = timed(lambda: align_layers(store, replace(request, name=f"{tag}-here"), quiet=True))
    there, t_ray = timed(lambda: align_layers(store, replace(request, name=f"{tag}-ray", ray=ray), quiet=True))
    diffs = [map_diff(store, h.name, t.name) for h, t in zip(here, there, strict=True)]
    out = {"in_process_s": t_here, "ray_s": t_ray, "speedup": t_here / t_ray, "maps": len(here),
           "pairs": here[0].n_pairs, "texts": len(texts) + len(held), "max_rel_frobenius_diff": max(diffs)}
    print(f"{tag}: {json.dumps(out)}", flush=True)
    return out


def label_case(store: Store, map_name: str, features: str, ray: RayConfig, tag: str, batch: int) -> dict:
    here, t_here = timed(lambda: labelling.label_features(store, map_name, features, k=5, batch_size=batch,
                                                          name=f"{tag}-here", quiet=True, site_check=False))
    there, t_ray = timed(lambda: labelling.label_features(store, map_name, features, k=5, batch_size=batch,
                                                          name=f"{tag}-ray", quiet=True, site_check=False, ray=ray))
    n = here.n_features
    same = store.run_label_rows(here.name, 0, n) == store.run_label_rows(there.name, 0, n)
    out = {"in_process_s": t_here, "ray_s": t_ray, "speedup": t_here / t_ray, "features": n,
           "rows": store.count_run_labels(there.name), "identical_rows": same}
    print(f"{tag}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="times the world's texts are repeated (align-large)")
    ap.add_argument("--features", type=int, default=30_000)
    ap.add_argument("--concepts", type=int, default=30_000)
    ap.add_argument("--cases", default="tiny,large",
                    help="comma-separated: tiny, align-large, label-large, large (both large ones)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    cases = set(args.cases.split(","))
    if "large" in cases:
        cases |= {"align-large", "label-large"}

    import ray

    from engine.world import build_world
    from engine.world.locate import ensure_registered, world_texts

    cache = os.environ.get("ATLAS_TEST_CACHE")
    results: dict = {"ray_cpus": args.ray_cpus}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        world_root = Path(cache) / "worlds" if cache else root / "worlds"
        world = build_world("tiny", seed=0, root=world_root, progress=False)
        store = Store.init(root / "store")
        os.symlink(world.path, store.path / layout.MODELS_DIR / world.path.name)
        world = ensure_registered(store, "tiny", 0)
        texts, held = world_texts(world)

        _, t_init = timed(lambda: ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                                           logging_level="ERROR", configure_logging=True))
        results["ray_start_s"] = t_init
        print(f"local Ray with {args.ray_cpus} CPUs started in {t_init:.1f}s", flush=True)
        cfg = RayConfig()  # the Ray started above
        try:
            if "tiny" in cases:
                tiny_cases(store, world, texts, held, cfg, results)
            large_cases(store, world, texts, held, cfg, results, args, root, cases)
        finally:
            ray.shutdown()
            store.close()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def tiny_cases(store, world, texts, held, cfg, results) -> None:
    results["align-tiny"] = align_case(store, world.subject_a.name, world.atlas_name, texts, held, cfg,
                                       "align-tiny")
    sub = world.subject_a
    f64 = PairingConfig(batch_size=16, stats_dtype="float64")
    ref = align_layers(store, AlignRequest(sub.name, world.atlas_name, texts, held, None, config=f64, name="f64"),
                       quiet=True)
    diffs = [map_diff(store, r.name, f"align-tiny-here-L{r.subject_layer}") for r in ref]
    results["align-tiny-f64"] = {"in_process_f32_vs_f64_rel_frobenius": max(diffs)}
    print(f"align-tiny-f64: {json.dumps(results['align-tiny-f64'])}", flush=True)

    amap = store.map_info(f"align-tiny-here-L{sub.default_layer}").name
    results["label-tiny"] = label_case(store, amap, "native:tiny:0", cfg, "label-tiny", 4096)


def large_cases(store, world, texts, held, cfg, results, args, root, cases) -> None:
    rng = np.random.default_rng(0)
    if "align-large" in cases:
        align_large(store, world, texts, held, cfg, results, args, root, rng)
    if "label-large" in cases:
        label_large(store, cfg, results, args, root, rng)


def align_large(store, world, texts, held, cfg, results, args, root, rng) -> None:
    # larger: random-weight models, wider and deeper, the same tokenizer
    fdir = world.path / "foundation"
    s_dir = random_gpt2(root / "big-subject", fdir, 256, 4, seed=1)
    f_dir = random_gpt2(root / "big-foundation", fdir, 384, 4, seed=2)
    store.add_model("big-foundation", source=str(f_dir))
    store.add_atlas(
        "big-atlas", rng.normal(size=(2000, 384)).astype(np.float32), [f"c{i}" for i in range(2000)],
        source=AtlasSource(model="big-foundation", layer=2), index=IndexPlacement(spec="Flat"),
    )
    from engine.models.hooks import Site

    results["align-large"] = align_case(store, str(s_dir), "big-atlas", texts * args.repeat,
                                        held * args.repeat, cfg, "align-large", layers=Site((1, 2, 3)))


def label_large(store, cfg, results, args, root, rng) -> None:
    d_s, d_a = 512, 768
    store.add_atlas(
        "label-atlas", rng.normal(size=(args.concepts, d_a)).astype(np.float32),
        [f"concept {i}" for i in range(args.concepts)],
        source=AtlasSource(model="label-foundation", layer=12), index=IndexPlacement(spec="Flat"),
    )
    store.add_model("label-subject", d_model=d_s)
    q, _ = np.linalg.qr(rng.normal(size=(d_a, d_s)))
    w = q.T.astype(np.float32)
    save_map(store, AlignmentMap(w, w.T, np.zeros(d_s), np.zeros(d_a), "procrustes",
                                subject_model="label-subject", subject_layer=20, atlas="label-atlas"),
                   "label-map")
    np.save(root / "features.npy", rng.normal(size=(args.features, d_s)).astype(np.float32))
    results["label-large"] = label_case(store, "label-map", str(root / "features.npy"), cfg, "label-large",
                                        labelling.DEFAULT_BATCH)


if __name__ == "__main__":
    main()

"""`guie demo`: the emoji benchmark end to end on the default backbone, on a CPU, in a few minutes.

1. fetch/build the benchmark (npm, once);
2. backbone features of all 7,428 images at 224 px, stored once in the feature cache (the slow part: ~3-6 min on
   2 cores the first time, seconds afterwards);
3. zero-shot baselines on the test classes: raw pooled features, PCA-64 fitted on train-half images;
4. the shipped CPU training recipe `emoji-lite0-cpu` (src/guie/recipes/) run by the training engine on the train
   classes, validated on the val classes: its head stage on the cached features (seconds per thousand steps);
   `--full` also runs its backbone fine-tune stage (head and class centres locked; ~20 min more on 2 cores) and
   scores both models;
5. test-class mP@5 of the trained 64-d model(s) next to the baselines, results.json and HTML reports with pictures.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .data.benchmarks.emoji import build_emoji_benchmark
from .data.manifest import read_manifest
from .embedding.feature_store import cached_features, embed_cached_features
from .errors import InputError
from .evaluate.protocol import evaluate_folds
from .evaluate.report import format_table, write_report
from .models.embedder import create_embedder, load_embedder
from .models.heads import fit_pca
from .utils import atomic_write_json, default_cache_dir, log, resolve_device

DEMO_RECIPE = "emoji-lite0-cpu"  # a shipped recipe (package data: found in a wheel install too)


def l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_demo(out_dir: str | Path = "outputs/demo", cache_dir: str | Path | None = None, full: bool = False,
             recipe: str | Path = DEMO_RECIPE, device: str | None = None, progress: bool = True) -> dict:
    """Run the demo; returns its results (also in out_dir/results.json, reports in out_dir/<method>/report.html).

    On a CPU the whole demo (feature pass included) runs at the recipe's `cpu_threads`, so its figures repeat bit for
    bit on other machines (same torch build and CPU instruction set).
    """
    from .runtime import intra_op_threads
    from .train.recipe import load_run_config

    on_cpu = resolve_device(device).type == "cpu"
    with intra_op_threads(load_run_config(recipe).cpu_threads if on_cpu else None):
        return _run_demo(out_dir, cache_dir, full, recipe, device, progress)


def _run_demo(out_dir: str | Path, cache_dir: str | Path | None, full: bool, recipe: str | Path,
              device: str | None, progress: bool) -> dict:
    from .train.checkpoint import stage_model_path
    from .train.engine import Trainer
    from .train.recipe import load_run_config

    t0 = time.time()
    cache_dir = Path(cache_dir or default_cache_dir())
    out_dir = Path(out_dir)
    overrides = [f"output_dir={out_dir / 'run'}", f"cache_dir={cache_dir}"]
    if device:
        overrides.append(f"device={device}")
    cfg = load_run_config(recipe, overrides)
    if not full:
        cfg.stages = cfg.stages[:1]
        cfg.stages[0].cache_views = 1
    m = cfg.model
    df = read_manifest(build_emoji_benchmark(cache_dir))

    # One feature pass serves everything: the recipe's backbone (multi-level pooling) starts with the plain pooled
    # 1280-d features of the default backbone, which the zero-shot baselines use.
    backbone = create_embedder(m.backbone, None, pretrained=m.pretrained, image_size=m.image_size,
                               preprocess=m.preprocess or None, **m.backbone_kwargs).eval()
    feats, ok = cached_features(backbone, df["path"].tolist(), cache_dir, device=device, progress=progress)
    df, feats = df[ok].reset_index(drop=True), feats[ok]
    raw = feats[:, :backbone.backbone.model.num_features]
    train_half = df["split"].isin(["train", "val"]).to_numpy()
    test = (df["split"] == "test").to_numpy()
    rows, evals = [], {}

    def score(name, emb):
        ev = evaluate_folds(df[test].reset_index(drop=True), emb[test], by="vendor")
        evals[name] = ev
        rows.append({"method": name, "dim": emb.shape[1], "mP@5 test": ev.score,
                     **{f"q={f['fold']}": f["score"] for f in ev.folds}})

    score("raw features (1280-d, zero-shot)", l2n(raw))
    mean, comps = fit_pca(raw[train_half], 64)
    score("PCA-64 (fit on train half)", l2n((raw - mean) @ comps.T))

    log.info("training %s (%s)", recipe, "all stages" if full else "head stage, clean features")
    final = Trainer(cfg, progress=progress).run()
    first = cfg.stages[0]
    if len(cfg.stages) > 1 and "backbone" not in first.train:
        # --full: the head-stage model (on the cached features) next to the final one, to show what the later
        # stages add
        head_model = load_embedder(stage_model_path(cfg.run_dir, 0, first.name))
        score(f"trained 64-d model ({cfg.name}, stage '{first.name}')", embed_cached_features(head_model, feats))
    model = load_embedder(final)
    if all(not {"backbone"} & set(s.train) for s in cfg.stages):
        trained = embed_cached_features(model, feats)
    else:
        test_df = df[test]
        tfeats, tok = cached_features(model, test_df["path"].tolist(), cache_dir, device=device, progress=progress)
        trained = np.zeros((len(df), model.embed_dim), dtype=np.float32)
        trained[np.flatnonzero(test)] = embed_cached_features(model, tfeats)
    score(f"trained 64-d model ({cfg.name}{', all stages' if full else ', head stage'})", trained)

    cols = ["method", "dim", "mP@5 test"] + [f"q={v}" for v in sorted(df["vendor"].unique())]
    title = (f"emoji benchmark, efficientnet_lite0 @ {backbone.preprocess.image_size}px, "
             f"{int(test.sum()) // 4} test classes, 4 vendor folds (query = one vendor, index = the other three)")
    print(format_table(rows, cols, title=title))
    for name, ev in evals.items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:48]
        write_report(ev, out_dir / slug, title=f"emoji benchmark: {name}",
                     extra={"backbone": m.backbone, "image_size": backbone.preprocess.image_size})
    result = {"rows": rows, "model": str(final), "recipe": str(recipe), "full": full,
              "seconds": round(time.time() - t0, 1)}
    atomic_write_json(result, out_dir / "results.json")
    print(f"reports: {out_dir}/*/report.html   model: {final}   ({result['seconds']} s)")
    return result


UNIVERSAL_RECIPE = "multi-domain-lite0-cpu"  # shipped recipes (package data)
UNIVERSAL_BUILD = "data-multi-domain"
SPECIALIST_RECIPE = "specialist-lite0-cpu"


def run_universal_demo(out_dir: str | Path = "outputs/demo-universal", cache_dir: str | Path | None = None,
                       full: bool = False, recipe: str | Path = UNIVERSAL_RECIPE,
                       build_recipe: str | Path = UNIVERSAL_BUILD, device: str | None = None,
                       progress: bool = True, specialist_recipe: str | Path = SPECIALIST_RECIPE) -> dict:
    """`guie demo --universal`: the transfer table's headline rows from a cold cache, on every built-in benchmark.

    1. build the benchmarks (emoji with npm, glyphs and icons with apt-get; once) and the namespaced training mix
       (`guie data build` of `build_recipe`);
    2. backbone features of every benchmark image, once (the recipe's backbone and multi-level pooling);
    3. zero-shot rows on each benchmark's test classes: raw pooled features, and PCA-64 fitted on the train-half
       images of all benchmarks together;
    4. the one-benchmark specialists the recipe distils from (`specialist_recipe`'s head stage on each benchmark
       named by a file-path teacher; "stage:" teachers come from the run itself), scored as rows;
    5. the multi-domain recipe's head stages (datasets added stage by stage) on the cached features; `full` also
       runs its backbone stage (head and centres locked; 6,155 training images, about twice the emoji fine-tune; not
       timed) and scores both models.
    On a CPU everything runs at the recipe's `cpu_threads`. Returns the rows (also out_dir/results.json) with the
    time each step took.
    """
    from .runtime import intra_op_threads
    from .train.recipe import load_run_config

    on_cpu = resolve_device(device).type == "cpu"
    with intra_op_threads(load_run_config(recipe).cpu_threads if on_cpu else None):
        return _run_universal_demo(out_dir, cache_dir, full, recipe, build_recipe, device, progress,
                                   specialist_recipe)


def _head_scorer(model):
    """(benchmark name, cached features) -> embeddings of `model`'s head (eval mode, no autograd)."""
    return lambda name, feats: embed_cached_features(model, feats)


def _train_specialists(cfg, specialist_recipe: str | Path, out_dir: Path, cache_dir: Path, device: str | None,
                       progress: bool) -> dict[str, Path]:
    """Train the one-benchmark specialists that `cfg`'s stages distil from (teachers given as file paths; each
    domain is a built-in benchmark) with the head stages of `specialist_recipe`, and point `cfg`'s teachers at
    them. Returns benchmark -> specialist checkpoint."""
    from .data.benchmarks import get_benchmark
    from .train.checkpoint import stage_model_path
    from .train.engine import Trainer
    from .train.recipe import load_run_config

    made: dict[str, Path] = {}
    for stage in cfg.stages:
        for domain, ref in list(stage.distill.teachers.items()):
            if str(ref).startswith("stage:") or not stage.distill.weight:
                continue
            if domain not in made:
                bench = get_benchmark(domain)
                overrides = [f"output_dir={out_dir / domain}", f"cache_dir={cache_dir}",
                             f"datasets.main.manifest={domain}", f"validation.manifest={domain}",
                             f"validation.folds_by={bench.folds_by}"] + ([f"device={device}"] if device else [])
                spec = load_run_config(specialist_recipe, overrides)
                spec.stages = [s for s in spec.stages if "backbone" not in s.train]
                Trainer(spec, progress=progress).run()
                made[domain] = stage_model_path(spec.run_dir, len(spec.stages) - 1, spec.stages[-1].name)
            stage.distill.teachers[domain] = str(made[domain])
    return made


def _run_universal_demo(out_dir: str | Path, cache_dir: str | Path | None, full: bool, recipe: str | Path,
                        build_recipe: str | Path, device: str | None, progress: bool,
                        specialist_recipe: str | Path) -> dict:

    from .data.benchmarks import BENCHMARKS, benchmark_manifest, get_benchmark
    from .data.builder import build_dataset, load_recipe
    from .train.checkpoint import stage_model_path
    from .train.distill import distill_teacher_path
    from .train.engine import Trainer
    from .train.recipe import load_run_config

    t0, times = time.time(), {}
    cache_dir = Path(cache_dir or default_cache_dir())
    out_dir = Path(out_dir)
    names = list(BENCHMARKS)
    frames = {name: read_manifest(benchmark_manifest(name, cache_dir)) for name in names}
    build = load_recipe(build_recipe, [f"output={out_dir / 'data'}"])
    build.plot = False
    built = build_dataset(build, progress=progress, cache_dir=cache_dir)
    times["data"] = round(time.time() - t0, 1)

    overrides = [f"output_dir={out_dir / 'run'}", f"cache_dir={cache_dir}"] + [
        f"datasets.{name}.manifest={built.files['train']}" for name in load_run_config(recipe).datasets]
    if device:
        overrides.append(f"device={device}")
    cfg = load_run_config(recipe, overrides)
    if not full:
        cfg.stages = [s for s in cfg.stages if "backbone" not in s.train]
    m = cfg.model
    backbone = create_embedder(m.backbone, None, pretrained=m.pretrained, image_size=m.image_size,
                               preprocess=m.preprocess or None, **m.backbone_kwargs).eval()
    t = time.time()
    feats = {}
    for name, df in frames.items():
        f, ok = cached_features(backbone, df["path"].tolist(), cache_dir, device=device, progress=progress)
        frames[name], feats[name] = df[ok].reset_index(drop=True), f[ok]
    times["features"] = round(time.time() - t, 1)
    n_raw = backbone.backbone.model.num_features
    test = {name: (df["split"] == "test").to_numpy() for name, df in frames.items()}
    rows = []

    def score(method: str, embed) -> None:
        row = {"method": method}
        for name, df in frames.items():
            emb = embed(name, feats[name][test[name]])
            row[name] = evaluate_folds(df[test[name]].reset_index(drop=True), emb,
                                       by=get_benchmark(name).folds_by).score
            row["dim"] = emb.shape[1]
        row["mean"] = float(np.mean([row[n] for n in names]))
        rows.append(row)

    score(f"zero-shot raw features ({m.backbone})", lambda n, f: l2n(f[:, :n_raw]))
    half = np.concatenate([feats[n][frames[n]["split"].isin(["train", "val"]).to_numpy(), :n_raw] for n in names])
    mean, comps = fit_pca(half, 64)
    score("PCA-64 (fit on the train halves)", lambda n, f: l2n((f[:, :n_raw] - mean) @ comps.T))

    t = time.time()
    specialists = _train_specialists(cfg, specialist_recipe, out_dir / "specialists", cache_dir, device, progress)
    for name, path in specialists.items():
        score(f"specialist: {name} only ({specialist_recipe}, head stage)", _head_scorer(load_embedder(path)))
    final = Trainer(cfg, progress=progress).run()
    times["training"] = round(time.time() - t, 1)
    for domain, ref in sorted({(d, r) for s in cfg.stages if s.distill.weight
                               for d, r in s.distill.teachers.items() if str(r).startswith("stage:")}):
        teacher = load_embedder(distill_teacher_path(cfg.run_dir, cfg.stages, cfg.name, ref))
        score(f"specialist: {domain} only (the run's stage '{ref.removeprefix('stage:')}')", _head_scorer(teacher))
    heads = [i for i, s in enumerate(cfg.stages) if "backbone" not in s.train]
    if heads and heads[-1] != len(cfg.stages) - 1:
        stage = cfg.stages[heads[-1]]
        head_model = load_embedder(stage_model_path(cfg.run_dir, heads[-1], stage.name))
        score(f"all benchmarks, head stages ({cfg.name} up to '{stage.name}')", _head_scorer(head_model))
    model = load_embedder(final)
    t = time.time()
    fine_tuned = any("backbone" in s.train for s in cfg.stages)

    def embed_final(name, cached):
        if fine_tuned:  # a new backbone: features of the test images again
            paths = frames[name][test[name]]["path"].tolist()
            cached, ok = cached_features(model, paths, cache_dir, device=device, progress=progress)
            if not ok.all():
                raise InputError(f"{name}: {int((~ok).sum())} test images became unreadable")
        return embed_cached_features(model, cached)

    score(f"all benchmarks, iterative recipe ({cfg.name}, {'all stages' if fine_tuned else 'head stages'})",
          embed_final)
    times["scoring"] = round(time.time() - t, 1)

    styles = ", ".join(f"{n}: {get_benchmark(n).style}" for n in names)
    title = (f"mP@5 on the test classes, leave-one-style-out ({styles}), "
             f"{m.backbone} @ {backbone.preprocess.image_size}px")
    print(format_table(rows, ["method", "dim", *names, "mean"], title=title))
    times["total"] = round(time.time() - t0, 1)
    result = {"rows": rows, "model": str(final), "recipe": str(recipe), "seconds": times}
    atomic_write_json(result, out_dir / "results.json")
    print(f"model: {final}   times (s): {times}")
    return result

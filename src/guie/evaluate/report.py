"""Results people look at: a console table, results.json, a per-domain bar chart and retrieval grids
(query + top-k, relevant neighbours framed green, others red) gathered in one HTML page."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..imaging.draw import GREEN, GREY, RED, thumbnail
from ..utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from .protocol import Evaluation


def format_table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    """Render a small results table with rich (plain text when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    return console.file.getvalue()


def retrieval_grid(evaluation: Evaluation, rows: np.ndarray | list[int], thumb: int = 80) -> Image.Image:
    """One row per query: the query (grey frame) then its k neighbours (green = relevant, red = not)."""
    pq = evaluation.per_query
    k = evaluation.k
    cell = thumb + 8
    label_w = 170
    grid = Image.new("RGB", (label_w + cell * (k + 1) + 10, cell * len(rows) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, qi in enumerate(rows):
        q = pq.iloc[int(qi)]
        index_df = evaluation.index_frames[q["fold"]]
        y = 2 + r * cell
        text = f"{str(q['label'])[:22]}\nP@{k}={q['precision']:.2f} n_q={q['n_q']}"
        if "domain" in pq.columns:
            text += f"\n{str(q['domain'])[:22]}"
        draw.text((4, y + 6), text, fill=(0, 0, 0))
        grid.paste(thumbnail(q["path"], thumb, GREY), (label_w, y))
        for j, (nb, rel) in enumerate(zip(q["neighbors"], q["relevant"])):
            grid.paste(thumbnail(index_df["path"].iloc[int(nb)], thumb, GREEN if rel else RED),
                       (label_w + cell * (j + 1) + 6, y))
    return grid


def domain_chart(evaluation: Evaluation, path: Path, title: str) -> Path | None:
    """Horizontal bar chart of mP@k per domain (PNG)."""
    if evaluation.per_domain is None or evaluation.per_domain.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = evaluation.per_domain.sort_values("score")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(d) + 1.2))
    ax.barh([f"{a} ({n})" for a, n in zip(d["domain"], d["queries"])], d["score"], color="#4c72b0")
    ax.axvline(evaluation.score, color="k", ls="--", lw=1, label=f"overall {evaluation.score:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"mP@{evaluation.k}")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_report(evaluation: Evaluation, out_dir: str | Path, title: str = "guie evaluation", n_grid: int = 12,
                 seed: int = 0, extra: dict | None = None) -> Path:
    """Write results.json, per_query.csv, per_domain.png, retrieval_{worst,random}.png and report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary() | {"title": title} | (extra or {})
    atomic_write_json(summary, out / "results.json")
    pq = evaluation.per_query
    cols = [c for c in ("fold", "path", "label", "domain", "n_q", "precision") if c in pq.columns]
    pq[cols].to_csv(out / "per_query.csv", index=False)
    chart = domain_chart(evaluation, out / "per_domain.png", title)
    rng = np.random.default_rng(seed)
    n = min(n_grid, len(pq))
    worst = np.argsort(pq["precision"].to_numpy(), kind="stable")[:n]
    sample = np.sort(rng.choice(len(pq), size=n, replace=False))
    grids = {"random": sample, "worst": worst}
    for name, rows in grids.items():
        atomic_write_bytes(_png_bytes(retrieval_grid(evaluation, rows)), out / f"retrieval_{name}.png")

    def img(name):
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'

    fold_rows = "".join(f"<tr><td>{html.escape(str(f['fold']))}</td><td>{f['queries']}</td>"
                        f"<td>{f['score']:.4f}</td></tr>" for f in evaluation.folds)
    domain_rows = ""
    if evaluation.per_domain is not None:
        domain_rows = "".join(f"<tr><td>{html.escape(str(r.domain))}</td><td>{r.queries}</td>"
                              f"<td>{r.score:.4f}</td></tr>"
                              for r in evaluation.per_domain.itertuples())
    extra_html = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                         for k, v in (extra or {}).items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p><b>mP@{evaluation.k} = {evaluation.score:.4f}</b> (mean over folds; GUIE metric, Euclidean k-NN, k={evaluation.k},
each query scored over its first min(n_q,{evaluation.k}) neighbours)</p>
<table>{extra_html}</table>
<h2>Folds</h2><table><tr><th>fold</th><th>queries</th><th>mP@{evaluation.k}</th></tr>{fold_rows}</table>
<h2>Per domain</h2><table><tr><th>domain</th><th>queries</th><th>mP@{evaluation.k}</th></tr>{domain_rows}</table>
{img("per_domain.png") if chart else ""}
<h2>Retrieval: random queries</h2><p>query (grey) then top-{evaluation.k}: green = same label, red = other</p>
{img("retrieval_random.png")}
<h2>Retrieval: worst queries</h2>{img("retrieval_worst.png")}
</body></html>"""
    return atomic_write_text(page, out / "report.html")

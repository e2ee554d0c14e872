"""The run report: plots of the finished run's statistics and a few annotated documents.

`run_plots` draws the PNGs (matplotlib, Agg canvas) that both the self-contained `report.html`
(`write_report`) and the Hub dataset card use; samples come from the first shards that hold them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator import layout

REPORT_FILE = "report.html"
PLOTS = {
    "score_histogram": "Safety score histogram",
    "reflection_lengths": "Reflection length (target tokens)",
    "citations": "Citations per constitution section",
    "throughput": "Throughput over time",
}
SAMPLE_COLUMNS = [
    "doc_id", "training_text", "safety_score", "selected_reason", "reflection_status", "reflection_token_index",
    "reflection_position", "citations", "canary_type", "annotations", "prompt_version",
]
_CONTEXT_CHARS = (700, 300)  # characters shown before and after the reflection in a sample


def _figure(width: float = 6.4, height: float = 3.4):
    """A figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _label_bars(ax, bars, values) -> None:
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_score_histogram(stats: dict) -> bytes:
    threshold = stats.get("config", {}).get("selection", {}).get("bad_threshold", 3)
    hist = stats.get("score_histogram", {})
    scores = list(range(6))
    counts = [int(hist.get(str(s), 0)) for s in scores]
    fig, ax = _figure()
    bars = ax.bar(scores, counts, color=["#c0392b" if s >= threshold else "#2e86c1" for s in scores])
    _label_bars(ax, bars, counts)
    if max(counts) > 50 * max(1, min(c for c in counts if c) if any(counts) else 1):
        ax.set_yscale("log")  # a web corpus is mostly score 0; a linear axis hides the bad tail
    ax.set_xticks(scores)
    ax.set_xlabel(f"safety score (red: bad, >= {threshold})")
    ax.set_ylabel("documents")
    ax.set_title(PLOTS["score_histogram"])
    ax.margins(y=0.15)
    return _png(fig)


def plot_reflection_lengths(stats: dict) -> bytes:
    from matplotlib.ticker import MaxNLocator

    lengths = stats.get("reflection_length_tokens") or {}
    budget = stats.get("config", {}).get("generation", {}).get("max_reflection_tokens")
    fig, ax = _figure()
    hist = {int(k): v for k, v in lengths.get("histogram", {}).items()}
    if not hist:
        _empty(ax, "no reflection lengths measured")
    else:
        top = max(max(hist), budget or 0)
        width = max(1, (top + 1) // 32)
        bins = {}
        for length, n in hist.items():
            bins[length // width * width] = bins.get(length // width * width, 0) + n
        ax.bar(list(bins), list(bins.values()), width=width, align="edge", color="#27ae60", edgecolor="white", linewidth=0.5)
        ax.axvline(lengths["p50"], color="k", linestyle="--", linewidth=1, label=f"median {lengths['p50']}")
        if budget:
            ax.axvline(budget, color="#c0392b", linewidth=1, label=f"budget {budget}")
        ax.legend(fontsize=8)
        ax.set_xlabel("tokens of the target tokenizer")
        ax.set_ylabel("reflections")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(PLOTS["reflection_lengths"])
    return _png(fig)


def _section_order(section: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in section.split("."))


def run_sections(stats: dict) -> list[str]:
    """The sections of the run's prompt pack (from the config in `stats`), else none."""
    from annotator.prompt_packs import PackError, load_pack

    spec = ((stats.get("config") or {}).get("generation") or {}).get("prompt_pack")
    try:
        pack = load_pack(spec) if spec else None
    except PackError:  # a pack on another machine: plot what was cited
        return []
    return pack.constitution.ordered_ids() if pack is not None and pack.constitution else []


def plot_citations(stats: dict) -> bytes:
    cited = stats.get("citations_by_section", {})
    sections = sorted(set(run_sections(stats)) | set(cited), key=_section_order)
    counts = [int(cited.get(s, 0)) for s in sections]
    fig, ax = _figure()
    if not any(counts):
        _empty(ax, "no citations")
    else:
        bars = ax.bar(range(len(sections)), counts, color="#8e44ad")
        _label_bars(ax, bars, counts)
        ax.set_xticks(range(len(sections)), sections, fontsize=8)
        ax.set_xlabel("constitution section")
        ax.set_ylabel("citations")
        ax.margins(y=0.15)
    ax.set_title(PLOTS["citations"])
    return _png(fig)


def plot_throughput(stats: dict) -> bytes:
    timeline = stats.get("timeline") or {}
    points = timeline.get("points") or []
    fig, ax = _figure()
    if not points:
        _empty(ax, "no timeline recorded")
    else:
        width = timeline["bucket_seconds"]
        # A bucket's documents count as written at its end; the rate is averaged since the previous write.
        ends = [0.0] + [t + width for t, _ in points]
        cumulative = [0]
        for _, n in points:
            cumulative.append(cumulative[-1] + n)
        rates = [n / max(1e-9, ends[i + 1] - ends[i]) for i, (_, n) in enumerate(points)]
        rate = ax.twinx()
        rate.stairs(rates, ends, fill=True, alpha=0.3, color="#e67e22", label="documents/s since the previous write")
        rate.set_ylabel("documents/s")
        ax.step(ends, cumulative, where="post", color="#2e86c1", label="documents written (cumulative)")
        ax.plot(ends, cumulative, "o", color="#2e86c1", markersize=3)
        ax.set_xlabel(f"seconds since start (writes bucketed to {width} s)")
        ax.set_ylabel("documents written")
        ax.set_zorder(rate.get_zorder() + 1)
        ax.patch.set_visible(False)
        handles = ax.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_title(PLOTS["throughput"])
    return _png(fig)


def run_plots(stats: dict) -> dict[str, bytes]:
    """PNG bytes of every plot in `PLOTS`, keyed by plot name."""
    draw = {
        "score_histogram": plot_score_histogram,
        "reflection_lengths": plot_reflection_lengths,
        "citations": plot_citations,
        "throughput": plot_throughput,
    }
    return {name: draw[name](stats) for name in PLOTS}


def sample_documents(out_dir: Path, *, n: int = 3) -> list[dict]:
    """The first `n` annotated documents (a reflection or annotations) of the first shards that hold
    them; each file is read batch by batch, and reading stops once `n` are found."""
    found: list[dict] = []
    for shard in layout.text_shards(Path(out_dir)):
        pf = pq.ParquetFile(shard)
        columns = [c for c in SAMPLE_COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            annotated = pc.equal(batch.column("reflection_status"), "ok")
            if "annotations" in batch.schema.names:
                annotated = pc.or_(annotated, pc.greater(pc.fill_null(pc.list_value_length(batch.column("annotations")), 0), 0))
            found.extend(batch.filter(pc.fill_null(annotated, False)).to_pylist()[: n - len(found)])
            if len(found) >= n:
                return found
    return found


def summary_rows(stats: dict) -> list[tuple[str, str]]:
    """(label, value) pairs summarising a run, shared by the report and the dataset card."""
    refl = stats.get("reflections") or {}
    lengths = stats.get("reflection_length_tokens") or {}
    acc = stats.get("accelerator") or {}
    prompts = stats.get("prompts") or {}
    wall = stats.get("wall_seconds", {}).get("total")
    rows = [
        ("documents in / out", f"{stats.get('documents_in', 0):,} / {stats.get('documents_out', 0):,}"),
        ("tokens in / out", f"{stats.get('tokens_in', 0):,} / {stats.get('tokens_out', 0):,}"),
        ("safety score histogram", json.dumps(dict(sorted(stats.get("score_histogram", {}).items())))),
        ("selected documents / tokens", f"{stats.get('selected_documents', 0):,} / {stats.get('selected_tokens', 0):,}"),
        ("documents by selection reason", json.dumps(stats.get("selected_by_reason", {}), sort_keys=True)),
        ("tokens by selection reason", json.dumps(stats.get("selected_tokens_by_reason", {}), sort_keys=True)),
        ("reflections generated / failed", f"{refl.get('generated', 0):,} / {refl.get('failed', 0):,}"
         + (f" {json.dumps(refl['failed_by_reason'], sort_keys=True)}" if refl.get("failed_by_reason") else "")),
        ("reflection length (tokens)", ", ".join(f"{k} {v}" for k, v in lengths.items() if k != "histogram") or "not measured"),
        ("citations per section", json.dumps(dict(sorted(stats.get("citations_by_section", {}).items(),
                                                          key=lambda kv: _section_order(kv[0]))))),
        ("reply checks (pass rate per parsed reply)", ", ".join(
            f"{k} {v['pass_rate']}" for k, v in ((stats.get("reply_checks") or {}).get("checks") or {}).items()) or "n/a"),
        ("tokens per reflection (generated / kept)", "{generated} / {kept}".format(
            **{k: (stats.get("reflection_tokens_per_reflection") or {}).get(k, "n/a") for k in ("generated", "kept")})),
        ("canaries", json.dumps((stats.get("canaries") or {}).get("by_type", stats.get("canary_type", {})), sort_keys=True)
         + (f", value present {json.dumps(stats['canaries'].get('value_present'), sort_keys=True)}"
            if (stats.get("canaries") or {}).get("value_present") else "")),
        ("annotation keys", json.dumps((stats.get("annotations") or {}).get("keys", {}), sort_keys=True)),
        ("wall time", f"{wall} s" if wall is not None else "n/a"),
        ("accelerator-hours", f"{acc.get('hours', 0)} ({acc.get('accelerator', 'n/a')})"),
        ("documents/s", json.dumps(stats.get("documents_per_second", {}))),
        ("prompt version", str(prompts.get("prompt_version", "n/a"))),
        ("constitution", json.dumps(prompts.get("constitution", {}), sort_keys=True)),
        ("generator", str(stats.get("config", {}).get("generation", {}).get("model", "n/a"))),
        ("versions", json.dumps(stats.get("versions", {}), sort_keys=True)),
    ]
    return rows


RECIPE_HEADER = ("recipe", "kept / failed", "reply checks (pass rate)", "tokens per output (generated / kept)",
                 "prefix-cache hit rate", "generated tokens per engine second", "prompt version")


def recipe_rows(stats: dict) -> list[tuple[str, ...]]:
    """One row per recipe of the run (`stats["recipes"]`), shared by the report and the card."""
    rows = []
    for name, r in (stats.get("recipes") or {}).items():
        out = r.get("outputs") or {}
        checks = ((r.get("reply_checks") or {}).get("checks") or {})
        per = r.get("tokens_per_output") or {}
        rows.append((name, f"{out.get('kept', 0):,} / {out.get('failed', 0):,}",
                     ", ".join(f"{k} {v['pass_rate']}" for k, v in checks.items() if v.get("pass_rate") is not None) or "n/a",
                     f"{per.get('generated', 'n/a')} / {per.get('kept', 'n/a')}", str(r.get("prefix_cache_hit_rate", "n/a")),
                     str(r.get("generated_tokens_per_engine_second", "n/a")), str(r.get("prompt_version", "n/a"))))
    return rows


def _sample_html(row: dict, template: dict) -> str:
    text = row.get("training_text") or ""
    opening, closing = template.get("open", "<assistant>"), template.get("close", "</assistant>")
    start, end = text.find(opening), text.find(closing)
    if start >= 0 and end > start:
        end += len(closing)
        before = text[max(0, start - _CONTEXT_CHARS[0]):start]
        body = (("…" if start > _CONTEXT_CHARS[0] else "") + html.escape(before)
                + f'<mark>{html.escape(text[start:end])}</mark>'
                + html.escape(text[end:end + _CONTEXT_CHARS[1]]) + ("…" if len(text) > end + _CONTEXT_CHARS[1] else ""))
    else:
        body = html.escape(text[: sum(_CONTEXT_CHARS)]) + ("…" if len(text) > sum(_CONTEXT_CHARS) else "")
    meta = {k: row.get(k) for k in SAMPLE_COLUMNS if k not in ("training_text",) and row.get(k) is not None}
    return (f"<div class='doc'><div class='meta'>{html.escape(json.dumps(meta, ensure_ascii=False))}</div>"
            f"<pre>{body}</pre></div>")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 13px; } td { border-top: 1px solid #ddd; padding: 4px 10px; vertical-align: top; }
td:first-child { font-weight: 600; white-space: nowrap; } .plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plots img { width: 520px; border: 1px solid #eee; } .doc { border: 1px solid #ddd; margin: 1em 0; padding: 8px; }
.meta { font-size: 12px; color: #555; font-family: monospace; } pre { white-space: pre-wrap; font-size: 13px; }
mark { background: #fdebd0; }
"""


def render_report(stats: dict, *, samples: list[dict], plots: dict[str, bytes]) -> str:
    """The report as one HTML string, images embedded as base64 PNG."""
    template = stats.get("config", {}).get("output", {}).get("template", {})
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(stats))
    images = "".join(
        f"<figure><img alt='{html.escape(PLOTS[name])}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
        for name, png in plots.items()
    )
    docs = "".join(_sample_html(row, template) for row in samples) or "<p>No annotated documents in this run.</p>"
    recipes = recipe_rows(stats)
    recipe_table = ("<h2>Recipes</h2><table>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in [RECIPE_HEADER, *recipes]) + "</table>"
        if recipes else "")
    config = html.escape(json.dumps(stats.get("config", {}), indent=2, sort_keys=True))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>SPP annotation run report</title>"
        f"<style>{_STYLE}</style></head><body><h1>SPP annotation run report</h1>"
        f"<h2>Statistics</h2><table>{table}</table>{recipe_table}<h2>Plots</h2><div class='plots'>{images}</div>"
        f"<h2>Sample annotated documents</h2>{docs}"
        f"<h2>Config</h2><details><summary>the run's config</summary><pre>{config}</pre></details></body></html>\n"
    )


def write_report(out_dir: Path, stats: dict) -> Path:
    """Writes `report.html` into the run's output directory; returns its path."""
    out_dir = Path(out_dir)
    path = out_dir / REPORT_FILE
    path.write_text(render_report(stats, samples=sample_documents(out_dir), plots=run_plots(stats)), encoding="utf-8")
    return path

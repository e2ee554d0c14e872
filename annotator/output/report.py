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

from annotator.score.language import languages_line
from annotator.core import layout, storage
from annotator.core.storage import write_atomically
from annotator.core.statuses import OK

REPORT_FILE = "report.html"
PLOTS = {
    "score_histogram": "Safety score histogram",
    "reflection_lengths": "Reflection length (target tokens)",
    "citations": "Citations per constitution section",
    "throughput": "Throughput over time",
}
# Drawn when the run has been audited (`pipelines/audit.py`).
AUDIT_PLOTS = {
    "audit_accept": "Judge audit: accept rate and mean score by safety score",
    "ledger": "Calibration ledger: teacher's share of bad per classifier score",
}
MIN_TIMELINE_POINTS = 3
SAMPLE_COLUMNS = ["doc_id", "training_text", "safety_score", "selected_reason", "reflection_status", "reflection_token_index",
                  "reflection_position", "citations", "canary_type", "annotations", "prompt_version"]
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


def _label_bars(ax, bars, *, values) -> None:
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
    _label_bars(ax, bars, values=counts)
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
    from annotator.method.prompt_packs import PackError, load_pack

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
        _label_bars(ax, bars, values=counts)
        ax.set_xticks(range(len(sections)), sections, fontsize=8)
        ax.set_xlabel("constitution section")
        ax.set_ylabel("citations")
        ax.margins(y=0.15)
    ax.set_title(PLOTS["citations"])
    return _png(fig)


def plot_stage_seconds(stats: dict, ax) -> None:
    """Worker seconds per stage and its documents/s: what a run too short for a timeline shows."""
    seconds = {k: v for k, v in (stats.get("stage_seconds") or {}).items() if v}
    if not seconds:
        _empty(ax, "no timeline or stage times recorded")
        return
    names = list(seconds)
    bars = ax.barh(names, [seconds[n] for n in names], color="#2e86c1")
    rates = stats.get("documents_per_second") or {}
    for bar, name in zip(bars, names):
        # The engine's rate is what it generated for; the other stages see every document.
        rate, unit = ((rates.get("reflections_per_generate_worker"), "reflections/s") if name == "generate"
                      else (rates.get(f"{name}_per_worker"), "docs/s"))
        ax.annotate(f"{seconds[name]:.1f} s" + (f", {rate:,.1f} {unit}" if rate is not None else ""),
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel("worker seconds (the run wrote too few blocks for a timeline)")
    ax.margins(x=0.35)


def plot_throughput(stats: dict) -> bytes:
    timeline = stats.get("timeline") or {}
    points = timeline.get("points") or []
    fig, ax = _figure()
    if len(points) < MIN_TIMELINE_POINTS:
        plot_stage_seconds(stats, ax)
        ax.set_title("Time per stage")
        return _png(fig)
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


def plot_audit(stats: dict) -> bytes:
    audit = (stats.get("audit") or {}).get("reflections") or {}
    by_score = {k: v for k, v in (audit.get("by_safety_score") or {}).items() if v.get("judged")}
    fig, ax = _figure()
    if not by_score:
        _empty(ax, "no judged reflections")
    else:
        scores = sorted(by_score, key=int)
        bars = ax.bar(scores, [by_score[s]["accept_rate"] for s in scores], color="#27ae60", alpha=0.6, label="accept rate")
        for bar, s in zip(bars, scores):
            ax.annotate(f"n={by_score[s]['judged']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("safety score")
        ax.set_ylabel("accept rate")
        means = ax.twinx()
        for dim in audit.get("dimensions", []):
            means.plot(scores, [by_score[s]["mean"][dim] for s in scores], marker="o", label=dim)
        means.set_ylim(0.8, 5.2)
        means.set_ylabel("mean score (1-5)")
        means.legend(fontsize=7, loc="upper right")
    ax.set_title(AUDIT_PLOTS["audit_accept"], fontsize=10)
    return _png(fig)


def plot_ledger(stats: dict) -> bytes:
    ledger = (stats.get("audit") or {}).get("ledger") or {}
    buckets = ledger.get("per_bucket") or {}
    fig, ax = _figure()
    known = [b for b in sorted(buckets, key=int) if buckets[b].get("teacher_bad_share") is not None]
    if not known:
        _empty(ax, "no re-scored documents")
    else:
        threshold = ledger.get("threshold", 3)
        shares = [buckets[b]["teacher_bad_share"] for b in known]
        bars = ax.bar(known, shares, color=["#c0392b" if int(b) >= threshold else "#2e86c1" for b in known])
        for bar, b in zip(bars, known):
            ax.annotate(f"{buckets[b]['teacher_bad']}/{buckets[b]['sampled']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_ylim(0, 1.1)
        ax.set_xlabel(f"classifier score (red: counted bad, >= {threshold})")
        ax.set_ylabel(f"share the teacher scores >= {threshold}")
    ax.set_title(AUDIT_PLOTS["ledger"], fontsize=10)
    return _png(fig)


def plot_titles(stats: dict) -> dict[str, str]:
    """Name -> title of the plots this run has: the standard ones, and the audit's once it ran."""
    audit = stats.get("audit") or {}
    extra = {k: v for k, v in AUDIT_PLOTS.items() if (k == "audit_accept" and "reflections" in audit) or (k == "ledger" and "ledger" in audit)}
    return {**PLOTS, **extra}


def run_plots(stats: dict) -> dict[str, bytes]:
    """PNG bytes of every plot of `plot_titles(stats)`, keyed by plot name."""
    draw = {
        "score_histogram": plot_score_histogram,
        "reflection_lengths": plot_reflection_lengths,
        "citations": plot_citations,
        "throughput": plot_throughput,
        "audit_accept": plot_audit,
        "ledger": plot_ledger,
    }
    return {name: draw[name](stats) for name in plot_titles(stats)}


def sample_documents(out_dir: Path, *, n: int = 3) -> list[dict]:
    """The first `n` annotated documents (a reflection or annotations) of the first shards that hold
    them; each file is read batch by batch, and reading stops once `n` are found."""
    found: list[dict] = []
    for shard in layout.text_shards(out_dir):
        pf = storage.parquet_file(shard)
        columns = [c for c in SAMPLE_COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            annotated = pc.equal(batch.column("reflection_status"), OK)
            if "annotations" in batch.schema.names:
                annotated = pc.or_(annotated, pc.greater(pc.fill_null(pc.list_value_length(batch.column("annotations")), 0), 0))
            found.extend(batch.filter(pc.fill_null(annotated, False)).to_pylist()[: n - len(found)])
            if len(found) >= n:
                return found
    return found


def readable(value) -> str:
    """A statistic for people: `{"0": 235, "1": 45}` -> `0: 235, 1: 45`; nested mappings in parentheses."""
    if isinstance(value, dict):
        if not value:
            return "none"
        return ", ".join(f"{k}: {readable(v) if not isinstance(v, dict) else '(' + readable(v) + ')'}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(v) for v in value) or "none"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def training_tokens(stats: dict) -> str:
    """Tokens in the training files, per stream (content, template and reflections; padding apart)."""
    streams = (stats.get("tokenized") or {}).get("streams") or {}
    if not streams:
        return "no token streams written"
    total = sum(s.get("tokens", 0) for s in streams.values())
    parts = ", ".join(f"{k} {s.get('tokens', 0):,} in {s.get('sequences', 0):,} sequences" for k, s in streams.items())
    return f"{total:,} ({parts})"


def summary_rows(stats: dict) -> list[tuple[str, str]]:
    """(label, value) pairs summarising a run, shared by the report and the dataset card."""
    refl = stats.get("reflections") or {}
    lengths = stats.get("reflection_length_tokens") or {}
    acc = stats.get("accelerator") or {}
    prompts = stats.get("prompts") or {}
    wall = stats.get("wall_seconds", {}).get("total")
    rows = [
        ("documents in / out", f"{stats.get('documents_in', 0):,} / {stats.get('documents_out', 0):,}"),
        ("source tokens read / written", f"{stats.get('tokens_in', 0):,} / {stats.get('tokens_out', 0):,} (documents as given, target tokenizer)"),
        ("training tokens (token streams)", training_tokens(stats)),
        ("safety score histogram", readable(dict(sorted(stats.get("score_histogram", {}).items())))),
        ("selected documents / tokens", f"{stats.get('selected_documents', 0):,} / {stats.get('selected_tokens', 0):,}"),
        ("documents by selection reason", readable(dict(sorted(stats.get("selected_by_reason", {}).items())))),
        ("documents by language (selected)", languages_line(stats)),
        ("tokens by selection reason", readable(dict(sorted(stats.get("selected_tokens_by_reason", {}).items())))),
        ("reflections generated / failed", f"{refl.get('generated', 0):,} / {refl.get('failed', 0):,}"
         + (f" ({readable(dict(sorted(refl['failed_by_reason'].items())))})" if refl.get("failed_by_reason") else "")),
        ("reflection length (tokens)", ", ".join(f"{k} {v}" for k, v in lengths.items() if k != "histogram") or "not measured"),
        ("citations per section", readable(dict(sorted(stats.get("citations_by_section", {}).items(),
                                                        key=lambda kv: _section_order(kv[0]))))),
        ("reply checks (pass rate per parsed reply)", ", ".join(
            f"{k} {v['pass_rate']}" for k, v in ((stats.get("reply_checks") or {}).get("checks") or {}).items()) or "n/a"),
        ("tokens per reflection (generated / kept)", "{generated} / {kept}".format(
            **{k: (stats.get("reflection_tokens_per_reflection") or {}).get(k, "n/a") for k in ("generated", "kept")})),
        ("canaries", readable(dict(sorted(((stats.get("canaries") or {}).get("by_type", stats.get("canary_type", {})) or {}).items())))
         + (f"; value present {readable(stats['canaries'].get('value_present'))}"
            if (stats.get("canaries") or {}).get("value_present") else "")),
        ("annotation keys", readable((stats.get("annotations") or {}).get("keys", {}))),
        ("wall time", f"{wall} s" if wall is not None else "n/a"),
        ("accelerator-hours", f"{acc.get('hours', 0)} ({acc.get('accelerator', 'n/a')})"),
        ("documents/s", readable(stats.get("documents_per_second", {}))),
        ("prompt version", str(prompts.get("prompt_version", "n/a"))),
        ("constitution", readable(prompts.get("constitution", {}))),
        ("generator", str(stats.get("config", {}).get("generation", {}).get("model", "n/a"))),
        ("versions", readable(dict(sorted(stats.get("versions", {}).items())))),
    ]
    return rows


def audit_rows(stats: dict) -> list[tuple[str, str]]:
    """The audit's figures (judge of reflections, calibration ledger), once the run was audited."""
    audit = stats.get("audit") or {}
    rows = []
    r = audit.get("reflections")
    if r:
        rows += [
            ("judge audit: reflections judged", f"{r.get('judged', 0):,} of a {r['sample']:,}-reflection sample (of {r['reflections_in_run']:,}) "
             f"by {r['judge']} with {r['rubric']}" + (f"; failed {readable(r['failed'])}" if r.get("failed") else "")),
            ("judge audit: accept rate", f"{r.get('accept_rate', 0):.3f} in the sample, {r.get('accept_rate_run_weighted', 0):.3f} "
             f"weighted to the run (floor <= {r['floor']} rejects; accept at mean >= {r['accept_mean']})"),
            ("judge audit: mean score per dimension", f"{r.get('mean_score', 0):.2f} overall; {readable(r.get('mean', {}))}"),
            ("judge audit: accept rate by safety score", readable({k: v.get("accept_rate", "n/a") for k, v in r.get("by_safety_score", {}).items()})),
        ]
    led = audit.get("ledger")
    if led:
        rows += [
            ("calibration ledger: teacher", f"{led['teacher']}; {led['rescored']:,} of {led['sampled']:,} documents re-scored"
             + (f", failed {readable(led['failed'])}" if led.get("failed") else "")),
            ("calibration ledger: precision of bad per score", readable(led.get("precision_of_bad", {})) + " (the teacher's share of bad)"),
            ("calibration ledger: estimated truly bad", f"{led.get('estimated_truly_bad_share_of_selected')} of the selected documents; "
             f"{led.get('estimated_precision_of_bad_in_run')} of those scored bad"),
            ("calibration ledger: confusion (classifier score: teacher score counts)",
             "; ".join(f"{b}: {readable({t: n for t, n in row.items() if n})}" for b, row in led.get("confusion", {}).items())),
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
    titles = plot_titles(stats)
    images = "".join(
        f"<figure id='plot-{name}'><img alt='{html.escape(titles.get(name, name))}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'></figure>"
        for name, png in plots.items()
    )
    audit = audit_rows(stats)
    audit_table = ("<h2>Judge audit and calibration ledger</h2><table>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in audit) + "</table>") if audit else ""
    docs = "".join(_sample_html(row, template) for row in samples) or "<p>No annotated documents in this run.</p>"
    recipes = recipe_rows(stats)
    recipe_table = ("<h2>Recipes</h2><table>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in [RECIPE_HEADER, *recipes]) + "</table>"
        if recipes else "")
    config = html.escape(json.dumps(stats.get("config", {}), indent=2, sort_keys=True))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>SPP annotation run report</title>"
        f"<style>{_STYLE}</style></head><body><h1>SPP annotation run report</h1>"
        f"<h2>Statistics</h2><table>{table}</table>{recipe_table}{audit_table}<h2>Plots</h2><div class='plots'>{images}</div>"
        f"<h2>Sample annotated documents</h2>{docs}"
        f"<h2>Config</h2><details><summary>the run's config</summary><pre>{config}</pre></details></body></html>\n"
    )


def write_report(out_dir: Path, stats: dict) -> Path:
    """Writes `report.html` into the run's output directory; returns its path."""
    out_dir = storage.location(out_dir)
    path = out_dir / REPORT_FILE
    html = render_report(stats, samples=sample_documents(out_dir), plots=run_plots(stats))
    write_atomically(path, lambda tmp: tmp.write_text(html, encoding="utf-8"))
    return path

"""The run report: self-contained HTML with four embedded PNG plots and three annotated documents."""

from __future__ import annotations

import base64
import html
import io
import json
import re

import pyarrow.parquet as pq
import pytest

from annotator.output.report import PLOTS, plot_throughput, readable, run_plots, sample_documents, write_report
from tests.output.test_stats import build_run_output


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    build_run_output(out)
    return out


def png_size(png: bytes) -> tuple[int, int]:
    from matplotlib.image import imread

    image = imread(io.BytesIO(png), format="png")
    return image.shape[1], image.shape[0]


def test_report_is_self_contained_with_plots_and_samples(run_output):
    stats = json.loads((run_output / "stats.json").read_text())
    path = write_report(run_output, stats)
    assert path == run_output / "report.html"
    page = path.read_text()
    # Self-contained: every image is an inline PNG, nothing is fetched from elsewhere.
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) == len(PLOTS) == 4
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    for src in sources:
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width >= 500 and height >= 300
    for title in PLOTS.values():
        assert f"alt='{html.escape(title)}'" in page
    # Three annotated documents, each with its reflection marked where it was spliced.
    docs = re.findall(r"<div class='doc'>(.*?)</pre></div>", page, re.DOTALL)
    assert len(docs) == 3
    rows = {r["doc_id"]: r for r in pq.read_table(run_output / "shards").to_pylist()}
    for doc in docs:
        doc_id = re.search(r"&quot;doc_id&quot;: &quot;([^&]+)&quot;", doc).group(1)
        row = rows[doc_id]
        assert row["reflection_status"] == "ok"
        marked = html.unescape(re.search(r"<mark>(.*?)</mark>", doc, re.DOTALL).group(1))
        assert marked == f"<assistant>{row['reflection_1p']}</assistant>"
    assert f"<td>documents in / out</td><td>{stats['documents_in']:,} / {stats['documents_out']:,}</td>" in page
    assert stats["prompts"]["prompt_version"] in page and "reply checks" in page
    # One row per recipe: what it kept and what failed.
    out = stats["recipes"]["reflection"]["outputs"]
    assert out["kept"] > 0 and f"<td>reflection</td><td>{out['kept']:,} / {out['failed']:,}</td>" in page


def test_samples_come_from_the_first_shards_only(run_output, tmp_path):
    shards = sorted((run_output / "shards").glob("*.parquet"))
    copy = tmp_path / "out"
    (copy / "shards").mkdir(parents=True)
    for f in shards:
        (copy / "shards" / f.name).write_bytes(f.read_bytes())
    # A later shard that cannot be read proves reading stops once three documents are found.
    (copy / "shards" / shards[-1].name).write_bytes(b"not parquet")
    found = sample_documents(copy, n=3)
    expected = [r for f in shards for r in pq.read_table(f).to_pylist() if r["reflection_status"] == "ok"][:3]
    assert [r["doc_id"] for r in found] == [r["doc_id"] for r in expected]


def test_plots_handle_a_run_without_reflections():
    stats = {"score_histogram": {"0": 90, "1": 10}, "config": {"selection": {"bad_threshold": 3}},
             "reflection_length_tokens": None, "citations_by_section": {}, "timeline": {"bucket_seconds": None, "points": []}}
    plots = run_plots(stats)
    assert list(plots) == list(PLOTS)
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and png_size(png)[0] >= 500 for png in plots.values())


def test_statistics_read_as_text_and_a_short_run_plots_its_stages(run_output):
    assert readable({"0": 235, "1": 45}) == "0: 235, 1: 45"
    assert readable({"vllm": "0.32.0", "by": {"a": 1200}}) == "vllm: 0.32.0, by: (a: 1,200)"
    assert readable({}) == "none" and readable(["x", 3]) == "x, 3"
    page = write_report(run_output, json.loads((run_output / "stats.json").read_text())).read_text()
    table = page.split("<h2>Statistics</h2>")[1].split("</table>")[0]
    assert "{&quot;" not in table and "<td>safety score histogram</td><td>0: " in table
    # One or two writes make no timeline: the plot shows time per stage instead of a single step.
    short = {"timeline": {"bucket_seconds": 5, "points": [[3, 300]]}, "stage_seconds": {"read": 0.5, "safety": 1.2, "generate": 40.0},
             "documents_per_second": {"read_per_worker": 600.0, "generate_per_worker": 7.5}}
    png = plot_throughput(short)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png != plot_throughput({**short, "stage_seconds": {}})

"""Units from Parquet footers: sized by rows and by uncompressed bytes, a row group over the cap
rejected at planning with its reason, and a run written before byte-sized units resumed with
the rows-only plan it was made with."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.config import InputConfig, RunConfig
from annotator.core.checkpoint import as_recorded, config_as_recorded, output_settings
from annotator.core.units import plan_input


def big_docs(path, *, docs: int, chars: int, group_rows: int) -> str:
    text = [(f"document {i} " + "x" * chars)[:chars] for i in range(docs)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(docs)], "text": text}), path, row_group_size=group_rows,
                   compression="zstd")
    return str(path)


def test_units_end_at_the_byte_budget_in_whole_row_groups(tmp_path):
    path = big_docs(tmp_path / "big.parquet", docs=40, chars=100_000, group_rows=4)   # ten row groups of ~400 kB
    sizes = [pq.ParquetFile(path).metadata.row_group(i).total_byte_size for i in range(10)]
    assert all(390_000 < s < 420_000 for s in sizes)
    by_rows = plan_input([path], InputConfig(paths=[path], rows_per_unit=10_000, unit_bytes=None))
    assert [u.rows for u in by_rows.units] == [40]    # one unit of 4 MB: what rows alone gave
    by_bytes = plan_input([path], InputConfig(paths=[path], rows_per_unit=10_000, unit_bytes=1_000_000))
    assert [u.row_groups for u in by_bytes.units] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9,)]
    assert [u.rows for u in by_bytes.units] == [12, 12, 12, 4] and by_bytes.documents == 40
    assert [u.row_start for u in by_bytes.units] == [0, 12, 24, 36]
    # Rows still cut first when they come first; the limit still cuts the last unit.
    assert [u.rows for u in plan_input([path], InputConfig(paths=[path], rows_per_unit=8, unit_bytes=1_000_000)).units] == [8] * 5
    assert plan_input([path], InputConfig(paths=[path], unit_bytes=1_000_000, limit=14)).documents == 14


def test_a_row_group_over_the_cap_rejects_its_file_at_planning(tmp_path):
    good = big_docs(tmp_path / "good.parquet", docs=8, chars=50_000, group_rows=2)
    huge = big_docs(tmp_path / "huge.parquet", docs=8, chars=50_000, group_rows=8)   # one 400 kB row group
    plan = plan_input([good, huge], InputConfig(paths=[good, huge], max_row_group_bytes=300_000))
    assert [u.path for u in plan.units] == [good] and plan.documents == 8
    [rejected] = plan.rejected_files
    assert rejected.path == huge
    assert rejected.reason.startswith("row_group_too_large: row group 0 holds ") and "input.max_row_group_bytes = 300,000" in rejected.reason
    assert len(plan_input([huge], InputConfig(paths=[huge], max_row_group_bytes=None)).units) == 1


def test_a_run_recorded_before_byte_sized_units_resumes_with_its_rows_only_plan(tmp_path):
    cfg = RunConfig.model_validate({"input": {"paths": ["x.parquet"]}, "output": {"path": str(tmp_path)}})
    assert cfg.input.unit_bytes == 256 * 2**20 and cfg.input.max_row_group_bytes == 2**30
    settings = json.loads(json.dumps({"output_settings": output_settings(cfg)}))
    old = json.loads(json.dumps(settings))
    for key in ("unit_bytes", "max_row_group_bytes"):
        del old["output_settings"]["input"][key]
    (tmp_path / "run.json").write_text(json.dumps({"tool": "spp-annotator", **old}))
    resumed = config_as_recorded(cfg, tmp_path)
    assert resumed.input.unit_bytes is None and resumed.input.max_row_group_bytes is None
    # The settings of the resumed config compare equal to what the old run recorded ...
    now = json.loads(json.dumps({"output_settings": output_settings(resumed)}))
    assert as_recorded(now, old) == old
    # ... but a byte budget turned on for it is a difference, as is any other changed field.
    assert as_recorded(settings, old) != old
    # A run that recorded the settings, and an overwrite, keep the config as given.
    (tmp_path / "run.json").write_text(json.dumps({"tool": "spp-annotator", **settings}))
    assert config_as_recorded(cfg, tmp_path).input.unit_bytes == 256 * 2**20
    overwrite = cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": True})})
    assert config_as_recorded(overwrite, tmp_path) is overwrite

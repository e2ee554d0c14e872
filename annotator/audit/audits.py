"""Quality audits of a finished run, read from its shards: an LLM judge's scores of a stratified
sample of reflections (`audit/reflections.parquet`), and a calibration ledger that re-scores a
sample per safety-score bucket with a teacher (`audit/ledger.parquet`). Their figures go into the
run's `stats.json` (`audit`), its report and its Hub card. Judging runs through `judge.run_judge`,
one saved batch at a time, so an interrupted audit resumes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from annotator.core import layout, storage
from annotator.core.checkpoint import digest, write_json, write_table
from annotator.config import ConfigError, RunConfig
from annotator.audit.judge import REASON, Rubric, judge_engine_config, run_judge
from annotator.method.prompt_packs import guard_closer, load_pack
from annotator.method.resolved import ResolvedRun
from annotator.audit.sampling import allocate_sample, choose_sample, count_strata, read_rows
from annotator.output.stats import stratum_key
from annotator.core.statuses import OK

REFLECTIONS_FILE, LEDGER_FILE, AUDIT_WORK, STATS_FILE = layout.AUDIT_REFLECTIONS, layout.AUDIT_LEDGER, layout.AUDIT_WORK, layout.STATS_FILE
VOICE_LABELS = {"reflection_1p": "First-person reflection", "reflection_3p": "Third-person reflection"}
SCORES = range(6)


class AuditError(RuntimeError):
    """The audit cannot run on this output; the message says why."""


def _settings_key(task: str, settings: dict) -> str:
    return f"{task}-{digest(json.dumps(settings, sort_keys=True))[:12]}"


def _reused(path: Path, key: str) -> pa.Table | None:
    """The finished audit file when it was made with the same settings."""
    if not path.exists():
        return None
    meta = storage.read_schema(path).metadata or {}
    return storage.read_table(path) if meta.get(b"spp_audit_key", b"").decode() == key else None


def _save(out_dir: Path, rel: str, *, table: pa.Table, key: str, work_dir: Path) -> None:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"spp_audit_key": key.encode()})
    write_table(out_dir / rel, table)
    storage.remove_tree(work_dir)


def _judge_setup(cfg: RunConfig, pack_spec: str, *, low: int, high: int, constitution=None) -> tuple[Rubric, str, dict]:
    pack = load_pack(pack_spec)
    if constitution is not None and pack.constitution is not None:
        pack = replace(pack, constitution=constitution)  # grounding is judged against the run's own constitution
    rubric = Rubric(pack, low, high)
    judge = cfg.audit.judge
    model = judge.model if judge.base_url else judge_engine_config(cfg).model
    settings = {"model": model, "base_url": judge.base_url, "rubric": pack.version, "temperature": judge.temperature,
                "max_output_tokens": judge.max_output_tokens, "max_retries": judge.max_retries, "seed": cfg.generation.seed,
                "max_document_chars": judge.max_document_chars, "batch_size": judge.batch_size}
    return rubric, pack.system_prompt(), settings


# --- the judge audit of reflections ---------------------------------------------------------

def _reflection_stratum(values: tuple) -> str | None:
    score, reason, status = values
    return stratum_key(score, reason) if status == OK else None


def reflection_user_message(row: dict, *, voices: list[str], max_chars: int) -> str:
    """What the judge reads: the document up to the pause point (its last `max_chars`
    characters), then each voice."""
    seen = row["text"][:row["reflection_position"]]
    cut = seen[-max_chars:]
    parts = ["Document, up to the pause point where the reflection was written:", "<<<",
             ("[...]" if len(cut) < len(seen) else "") + guard_closer(cut, ">>>"), ">>>"]
    for v in voices:
        parts += ["", f"{VOICE_LABELS.get(v, v)}:", row.get(v) or "(none)"]
    return "\n".join(parts)


def audit_reflections(out_dir: Path, cfg: RunConfig, *, resolved: ResolvedRun, num_cpus: float, log=print) -> tuple[pa.Table, dict]:
    """Judges a seeded sample of the run's reflections stratified by (safety score, selection
    reason); returns the audit table and its figures."""
    audit = cfg.audit.reflections
    files = layout.text_shards(out_dir)
    names = set(storage.read_schema(files[0]).names) if files else set()
    voices = [v for v in ("reflection_1p", "reflection_3p") if v in names]
    if not voices:
        raise AuditError(f"{out_dir}: the shards hold no reflections (was generation disabled?)")
    columns = ["doc_id", "safety_score", "selected_reason", "reflection_status"]
    strata = count_strata(files, columns=columns[1:], stratum=_reflection_stratum)
    if not strata:
        raise AuditError(f"{out_dir}: no reflection was written (reflection_status ok), nothing to audit")
    allocation = allocate_sample(strata, audit.sample)
    picks = choose_sample(files, allocation=allocation, seed=audit.seed, columns=columns, stratum=_reflection_stratum,
                          salt="audit-reflections")
    rows = read_rows(picks, columns=["doc_id", "text", "safety_score", "selected_reason", "reflection_position", *voices]).to_pylist()
    run_pack = resolved.packs.get("reflection", resolved.main_pack)
    rubric, system, settings = _judge_setup(cfg, cfg.audit.judge.reflection_pack, low=1, high=5, constitution=run_pack.constitution)
    settings |= {"sample": audit.sample, "sample_seed": audit.seed, "voices": voices}
    key = _settings_key("reflections", settings)
    table = _reused(out_dir / REFLECTIONS_FILE, key)
    work = {"reused": table is not None}
    if table is None:
        items = [{"id": r["doc_id"], "user": reflection_user_message(r, voices=voices, max_chars=cfg.audit.judge.max_document_chars)}
                 for r in rows]
        work_dir = out_dir / AUDIT_WORK / key
        judged, work = run_judge(items, cfg=cfg, rubric=rubric, system=system, task="audit-reflections", work_dir=work_dir,
                                 num_cpus=num_cpus, log=log)
        table = _reflection_table(rows, judged, rubric=rubric, audit=audit, model=settings["model"])
        _save(out_dir, REFLECTIONS_FILE, table=table, key=key, work_dir=work_dir)
    figures = reflection_figures(table, rubric.scores, strata=strata, audit=audit)
    figures |= {"judge": settings["model"], "rubric": rubric.pack.version, "via": "endpoint" if cfg.audit.judge.base_url else "replicas",
                "work": work}
    return table, figures


def _reflection_table(rows: list[dict], judged: pa.Table, *, rubric: Rubric, audit, model: str) -> pa.Table:
    j = judged.to_pylist()
    dims = rubric.scores
    out = []
    for r, v in zip(rows, j):
        scores = [v[d] for d in dims]
        ok = v["status"] == OK
        mean = sum(scores) / len(scores) if ok else None
        accept = ok and min(scores) > audit.floor and mean >= audit.accept_mean
        out.append({"doc_id": r["doc_id"], "safety_score": r["safety_score"], "selected_reason": r["selected_reason"],
                    "stratum": stratum_key(r["safety_score"], r["selected_reason"]), "status": v["status"], "attempts": v["attempts"],
                    **{d: v[d] for d in dims}, "mean_score": mean, "accept": accept if ok else None, "reason": v[REASON],
                    "raw_reply": v["raw_reply"], "judge_model": model, "rubric_version": rubric.pack.version,
                    "judge_prompt_tokens": v["prompt_tokens"], "judge_output_tokens": v["output_tokens"]})
    schema = pa.schema([("doc_id", pa.string()), ("safety_score", pa.int8()), ("selected_reason", pa.string()), ("stratum", pa.string()),
                        ("status", pa.string()), ("attempts", pa.int8()), *[(d, pa.int8()) for d in dims], ("mean_score", pa.float32()),
                        ("accept", pa.bool_()), ("reason", pa.string()), ("raw_reply", pa.string()), ("judge_model", pa.string()),
                        ("rubric_version", pa.string()), ("judge_prompt_tokens", pa.int32()), ("judge_output_tokens", pa.int32())])
    return pa.Table.from_pylist(out, schema=schema)


def _summary(rows: list[dict], dims, *, floor: int) -> dict:
    ok = [r for r in rows if r["status"] == OK]
    if not ok:
        return {"n": len(rows), "judged": 0}
    return {"n": len(rows), "judged": len(ok), "accept_rate": round(sum(r["accept"] for r in ok) / len(ok), 4),
            "mean_score": round(sum(r["mean_score"] for r in ok) / len(ok), 3),
            "mean": {d: round(sum(r[d] for r in ok) / len(ok), 3) for d in dims},
            "at_or_below_floor": {d: sum(r[d] <= floor for r in ok) for d in dims}}


def reflection_figures(table: pa.Table, dims, *, strata: dict[str, int], audit) -> dict:
    """Accept rate and mean per dimension, overall, per safety score and per selection reason;
    plus the accept rate weighted back to the run (each stratum by its share of the reflections)."""
    rows = table.to_pylist()
    out = {"sample": len(rows), "floor": audit.floor, "accept_mean": audit.accept_mean, "dimensions": list(dims),
           "reflections_in_run": sum(strata.values()), **_summary(rows, dims, floor=audit.floor),
           "failed": dict(Counter(r["status"] for r in rows if r["status"] != OK))}
    by_score, by_reason, by_stratum = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in rows:
        by_score[str(r["safety_score"])].append(r)
        by_reason[r["selected_reason"]].append(r)
        by_stratum[r["stratum"]].append(r)
    out["by_safety_score"] = {k: _summary(v, dims, floor=audit.floor) for k, v in sorted(by_score.items())}
    out["by_selection_reason"] = {k: _summary(v, dims, floor=audit.floor) for k, v in sorted(by_reason.items())}
    weighted = [(strata[k], _summary(v, dims, floor=audit.floor)) for k, v in by_stratum.items()]
    weighted = [(w, s) for w, s in weighted if s.get("judged")]
    if weighted:
        total = sum(w for w, _ in weighted)
        out["accept_rate_run_weighted"] = round(sum(w * s["accept_rate"] for w, s in weighted) / total, 4)
    return out


# --- the calibration ledger of the safety scorer --------------------------------------------

def _bucket(values: tuple) -> str:
    return str(values[0])


def harm_user_message(text: str, *, max_chars: int) -> str:
    return text[:max_chars] + (" [...]" if len(text) > max_chars else "")


def teacher_scores(rows: list[dict], cfg: RunConfig, *, out_dir: Path, num_cpus: float, log) -> tuple[list[int | None], list[str | None], list[str], dict]:
    """The teacher's 0-5 score (None: failed), reason and status per row, and what it was."""
    ledger, judge = cfg.audit.ledger, cfg.audit.judge
    if ledger.teacher == "classifier":
        from annotator.score.safety import TransformersSafetyScorer
        from annotator.core.stages import Resources

        if not ledger.teacher_model:
            raise ConfigError("audit.ledger.teacher_model: the transformers classifier that re-scores (teacher: classifier)")
        scorer = TransformersSafetyScorer(model=ledger.teacher_model, version="teacher", resources=Resources(), max_length=ledger.teacher_max_length)
        scorer.setup()
        probs = scorer.predict_probs([r["text"] for r in rows]) if rows else []
        scores = [int(p.argmax()) for p in probs]
        return scores, [None] * len(rows), [OK] * len(rows), {"teacher": f"classifier:{ledger.teacher_model}", "work": {}}
    rubric, system, settings = _judge_setup(cfg, judge.harm_pack, low=0, high=5)
    items = [{"id": r["doc_id"], "user": harm_user_message(r["text"], max_chars=judge.max_document_chars)} for r in rows]
    key = _settings_key("ledger", settings | {"per_bucket": ledger.per_bucket, "seed": ledger.seed})
    work_dir = out_dir / AUDIT_WORK / key
    judged, work = run_judge(items, cfg=cfg, rubric=rubric, system=system, task="audit-ledger", work_dir=work_dir,
                             num_cpus=num_cpus, log=log)
    statuses = judged.column("status").to_pylist()
    scores = [s if status == OK else None for s, status in zip(judged.column("score").to_pylist(), statuses)]
    return scores, judged.column(REASON).to_pylist(), statuses, {"teacher": f"judge:{settings['model']} ({rubric.pack.version})", "work": work,
                                                                 "_work_dir": work_dir}


def calibration_ledger(out_dir: Path, cfg: RunConfig, *, num_cpus: float, log=print) -> tuple[pa.Table, dict]:
    """Re-scores up to `per_bucket` documents of every classifier score bucket with the teacher;
    returns the ledger table and its figures (confusion table, precision of "bad" per bucket,
    the estimated share of truly bad documents among those selected)."""
    ledger = cfg.audit.ledger
    files = layout.text_shards(out_dir)
    if not files:
        raise AuditError(f"{out_dir}: no shards; is it a finished run's output directory?")
    buckets = count_strata(files, columns=["safety_score"], stratum=_bucket)
    allocation = {b: min(ledger.per_bucket, n) for b, n in buckets.items()}
    picks = choose_sample(files, allocation=allocation, seed=ledger.seed, columns=["doc_id", "safety_score"], stratum=_bucket,
                          salt="audit-ledger")
    rows = read_rows(picks, columns=["doc_id", "text", "safety_score", "selected", "selected_reason"]).to_pylist()
    scores, reasons, statuses, about = teacher_scores(rows, cfg, out_dir=out_dir, num_cpus=num_cpus, log=log)
    threshold = cfg.selection.bad_threshold
    table = pa.Table.from_pylist(
        [{"doc_id": r["doc_id"], "safety_score": r["safety_score"], "selected": r["selected"], "selected_reason": r["selected_reason"],
          "teacher_score": s, "teacher_bad": None if s is None else s >= threshold, "teacher_reason": why, "teacher_status": status}
         for r, s, why, status in zip(rows, scores, reasons, statuses)],
        schema=pa.schema([("doc_id", pa.string()), ("safety_score", pa.int8()), ("selected", pa.bool_()), ("selected_reason", pa.string()),
                          ("teacher_score", pa.int8()), ("teacher_bad", pa.bool_()), ("teacher_reason", pa.string()), ("teacher_status", pa.string())]))
    table = table.replace_schema_metadata({b"teacher": about["teacher"].encode()})
    write_table(out_dir / LEDGER_FILE, table)
    work_dir = about.pop("_work_dir", None)
    if work_dir is not None:  # the judgements are in the ledger now; a rerun with the same settings judges again
        storage.remove_tree(work_dir)
    selected = count_strata(files, columns=["safety_score", "selected"], stratum=lambda v: str(v[0]) if v[1] else None)
    figures = ledger_figures(table, buckets=buckets, selected=selected, threshold=threshold)
    return table, figures | about


def ledger_figures(table: pa.Table, *, buckets: dict[str, int], selected: dict[str, int], threshold: int) -> dict:
    """Confusion table (classifier score x teacher score), per bucket the teacher's share of bad,
    and estimates for the run: the precision of the classifier's "bad" and the share of truly bad
    documents among the selected ones (each bucket's selected documents at its sampled share)."""
    rows = [r for r in table.to_pylist() if r["teacher_score"] is not None]
    confusion = {str(b): {str(t): 0 for t in SCORES} for b in SCORES if str(b) in buckets}
    for r in rows:
        confusion[str(r["safety_score"])][str(r["teacher_score"])] += 1
    per_bucket = {}
    for b, counts in confusion.items():
        n = sum(counts.values())
        bad = sum(v for t, v in counts.items() if int(t) >= threshold)
        per_bucket[b] = {"documents_in_run": buckets[b], "sampled": n, "teacher_bad": bad,
                         "teacher_bad_share": round(bad / n, 4) if n else None, "selected_in_run": selected.get(b, 0)}

    def estimate(weights: dict[str, int]) -> float | None:
        known = {b: w for b, w in weights.items() if w and per_bucket.get(b, {}).get("teacher_bad_share") is not None}
        total = sum(known.values())
        return round(sum(w * per_bucket[b]["teacher_bad_share"] for b, w in known.items()) / total, 4) if total else None

    flagged = {b: v["documents_in_run"] for b, v in per_bucket.items() if int(b) >= threshold}
    return {"threshold": threshold, "sampled": table.num_rows, "rescored": len(rows),
            "failed": dict(Counter(s for s in table.column("teacher_status").to_pylist() if s != OK)),
            "confusion": confusion, "per_bucket": per_bucket,
            "precision_of_bad": {b: v["teacher_bad_share"] for b, v in per_bucket.items() if int(b) >= threshold},
            "estimated_precision_of_bad_in_run": estimate(flagged),
            "estimated_truly_bad_share_of_selected": estimate({b: v["selected_in_run"] for b, v in per_bucket.items()}),
            "selected_in_run": sum(selected.values())}


def record(out_dir: Path, part: str, *, figures: dict) -> dict:
    """Puts `figures` into the run's stats.json under audit.<part> and re-renders the report."""
    from annotator.output.report import write_report

    path = out_dir / STATS_FILE
    stats = json.loads(path.read_text())
    stats.setdefault("audit", {})[part] = figures
    write_json(path, stats)
    write_report(out_dir, stats)
    return stats

"""Publishing a finished run as a Hugging Face Hub dataset repository.

`build_repo_folder` stages the exact repository: the dataset card (README.md), stats.json, the run
report and its plots, a seeded sample stratified by safety score and selection reason in the shard
schema, optionally the full shards and every scored document's safety scores. `publish` uploads it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.output.report import PLOTS
from annotator.output.report import (
    RECIPE_HEADER, REPORT_FILE, audit_rows, plot_titles, recipe_rows, render_report, run_plots, sample_documents, summary_rows,
)
from annotator.output.stats import STRATUM_SEPARATOR, provenance, stratum_key
from annotator.core import layout, storage
from annotator.score.language import card_languages, languages_text
from annotator.core.storage import TMP_MARK
from annotator.audit import sampling
from annotator.audit.sampling import allocate_sample, read_rows
from annotator.publish.safety_annotations import card_entry, safety_annotation_files, safety_config

CARD_FILE, STATS_FILE = layout.CARD_FILE, layout.STATS_FILE
PLOTS_MAIN = set(PLOTS)
SAMPLE_DIR, SHARDS_IN_REPO, IMAGES_DIR = "sample", "shards", "images"
SAMPLE_FILE = f"{SAMPLE_DIR}/train-00000-of-00001.parquet"
# With --license other and no link of the user's: the card links this file, which says what holds.
LICENSE_FILE, DEFAULT_LICENSE_NAME = "LICENSE.md", "source-licences"
STRATUM_COLUMNS = ["doc_id", "safety_score", "selected_reason"]
# Upper bounds of the Hub's size categories (number of rows).
SIZE_CATEGORIES = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T"),
]


class PublishError(RuntimeError):
    """Publishing cannot go ahead; the message says what to change."""


@dataclass(frozen=True)
class PublishOptions:
    """What to publish and where; defaults follow the run config's `publish` section."""

    repo_id: str
    sample_rows: int = 2000
    seed: int = 0
    include_shards: bool = False
    include_safety_annotations: bool = False   # every scored document's id, safety_score, safety_probs (`safety_annotations`)
    private: bool = True
    public: bool = False   # consent to publish into a public repository (an existing one, or a new one)
    columns: list[str] | None = None   # the sample's columns; None: all but LOCAL_COLUMNS
    license: str = "other"
    license_name: str | None = None
    license_link: str | None = None
    # None: the languages the run identified (those above CARD_LANGUAGE_SHARE of its documents).
    language: list[str] | None = None


def size_category(rows: int) -> str:
    for bound, label in SIZE_CATEGORIES:
        if rows < bound:
            return label
    return "n>1T"


def shard_files(out_dir: Path) -> list[Path]:
    files = layout.text_shards(out_dir)
    if not files:
        raise PublishError(f"no shards under {storage.location(out_dir) / layout.TEXT_DIR}; is --output a finished run's output directory?")
    return files


def _row_stratum(values: tuple) -> str:
    return stratum_key(*values)


def count_strata(files: list[Path]) -> dict[str, int]:
    """Rows per stratum, read from the shards' two stratum columns (for stats without `strata`)."""
    return sampling.count_strata(files, columns=STRATUM_COLUMNS[1:], stratum=_row_stratum)


def choose_sample(files: list[Path], *, allocation: dict[str, int], seed: int) -> list[tuple[float, Path, int]]:
    """(hash, file, row) of the rows in the published sample: per (score, reason) stratum, the
    `allocation[stratum]` rows with the smallest seeded hash of doc_id."""
    return sampling.choose_sample(files, allocation=allocation, seed=seed, columns=STRATUM_COLUMNS, stratum=_row_stratum)


def stratified_sample(out_dir: Path, stats: dict, *, rows: int, seed: int) -> tuple[pa.Table, dict]:
    """The published sample (shard schema, seeded random order) and per-stratum counts
    {stratum: {"rows_in_run", "rows_in_sample"}}."""
    files = shard_files(out_dir)
    strata = stats.get("strata") or count_strata(files)
    allocation = allocate_sample(strata, rows)
    table = read_rows(choose_sample(files, allocation=allocation, seed=seed))
    drawn = Counter(stratum_key(s, r) for s, r in zip(table.column("safety_score").to_pylist(),
                                                      table.column("selected_reason").to_pylist())) if table.num_rows else Counter()
    return table, {k: {"rows_in_run": strata[k], "rows_in_sample": drawn.get(k, 0)} for k in sorted(strata)}


# Columns that say where the run read its input on the machine that ran it: not published by default.
LOCAL_COLUMNS = ("source_file",)


def sample_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """The sample's published columns: `columns` (an allowlist, in its order), or all but the
    local paths."""
    if columns is None:
        return table.drop_columns([c for c in LOCAL_COLUMNS if c in table.column_names])
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise PublishError(f"publish.columns: {missing} are not columns of the run's shards ({', '.join(table.column_names)})")
    return table.select(columns)


def _yaml_header(stats: dict, options: PublishOptions, *, rows: int) -> str:
    from huggingface_hub import DatasetCardData

    configs = [{"config_name": "sample", "data_files": [{"split": "train", "path": f"{SAMPLE_DIR}/*.parquet"}], "default": True}]
    if options.include_shards:
        configs.append({"config_name": "full", "data_files": [{"split": "train", "path": f"{SHARDS_IN_REPO}/*.parquet"}]})
    configs += [safety_config()] if options.include_safety_annotations else []
    data = DatasetCardData(
        license=options.license,
        **license_metadata(options),
        language=card_languages(stats, declared=options.language) or None,
        size_categories=[size_category(rows)],
        task_categories=["text-generation"],
        annotations_creators=["machine-generated"],
        pretty_name=f"SPP reflections: {options.repo_id.split('/')[-1]}",
        tags=["synthetic", "safety", "pretraining", "spp", "reflections"],
        configs=configs,
    )
    return data.to_yaml()


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "n/a")


def _method(stats: dict) -> str:
    cfg = stats.get("config", {})
    cls, sel, gen, out = (cfg.get(k, {}) for k in ("classifier", "selection", "generation", "output"))
    prompts = stats.get("prompts") or provenance(stats.get("config"))
    const = prompts.get("constitution", {})
    tpl = out.get("template", {})
    canaries = gen.get("canaries", {})
    return "\n".join([
        f"1. **Safety scoring** (0-5): `{cls.get('backend')}` classifier `{cls.get('model')}` "
        f"(version `{cls.get('version')}`), written to `safety_score`, `safety_probs`, `safety_confidence`"
        + (" (the built-in scorers were measured on English text only: see their model card)" if cls.get("backend") == "fasttext" else "")
        + "; each document's language (fastText lid.176) in `language`, `language_score`.",
        f"2. **Selection** (`{sel.get('mode')}`, seed {sel.get('seed')}): every document with score >= "
        f"{sel.get('bad_threshold')} is `bad`; other documents are sampled (probability "
        f"{_number(stats.get('selection_probability'))}, matched token ratio {sel.get('matched_token_ratio')}); "
        "the reason is in `selected_reason`" + (f"; only documents in {', '.join(sel['languages'])} are selected" if sel.get("languages") else "")
        + ("; the sample is matched within each language" if sel.get("stratify") == "language" else "") + ".",
        f"3. **Reflections**: `{gen.get('model')}` reads each selected document up to a seeded pause point and "
        f"writes a JSON reply (prompt pack `{prompts.get('prompt_version')}`, constitution of "
        f"{const.get('sections')} sections sha256 `{const.get('sha256')}`) enforced by vLLM structured outputs; "
        "the sections a reflection cites are its inline `[X.Y]` markers; each voice is cut to fit "
        f"{gen.get('max_reflection_tokens')} target tokens with its template tokens; temperature {gen.get('temperature')}, "
        f"top_p {gen.get('top_p')}, seed {gen.get('seed')}. Canaries: {canaries.get('file') or 'inline' if canaries.get('file') or canaries.get('items') else 'none'}; "
        f"annotations {'on' if gen.get('annotations', {}).get('enabled') else 'off'}.",
        f"4. **Writing**: `text` is the original document; `training_text` has the `{(out.get('voices') or ['1p'])[0]}` "
        f"reflection spliced at `reflection_position` (a character offset; `reflection_token_index` in target tokens) between "
        f"`{tpl.get('open')}` and `{tpl.get('close')}`. Token streams (`{out.get('layout', 'windows')}` layout) use "
        f"`{out.get('tokenizer')}` with EOS `{out.get('eos_token')}`.",
    ])


def _license_note(sample: pa.Table) -> str:
    if "license" not in sample.column_names:
        return ""
    counts: dict[str, int] = {}
    for value in sample.column("license").to_pylist():
        counts[value or "(none)"] = counts.get(value or "(none)", 0) + 1
    top = ", ".join(f"`{k}` {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return f" Rows keep their source licence in the `license` column (in the sample: {top})."


def build_card(stats: dict, *, options: PublishOptions, sample: pa.Table, strata: dict) -> str:
    """The dataset card: YAML metadata (licence, language, size, tasks, configs) and the body."""
    rows = stats.get("documents_out", 0) if options.include_shards else sample.num_rows
    prompts = stats.get("prompts") or provenance(stats.get("config"))
    const = prompts.get("constitution", {})
    strata_rows = [
        (f"score {k.split(STRATUM_SEPARATOR)[0]}, {k.split(STRATUM_SEPARATOR, 1)[1]}",
         f"{v['rows_in_run']:,} in the run, {v['rows_in_sample']:,} in the sample")
        for k, v in strata.items()
    ]
    plots = "\n\n".join(f"![{title}]({IMAGES_DIR}/{name}.png)" for name, title in plot_titles(stats).items() if name in PLOTS_MAIN)
    audit_plots = "\n\n".join(f"![{title}]({IMAGES_DIR}/{name}.png)" for name, title in plot_titles(stats).items() if name not in PLOTS_MAIN)
    files = [
        f"- `{SAMPLE_DIR}/` (config `sample`, the default): {sample.num_rows:,} rows, stratified by safety score and "
        f"selection reason (seed {options.seed}), same columns as the shards.",
    ]
    if options.include_shards:
        files.append(f"- `{SHARDS_IN_REPO}/` (config `full`): all {stats.get('documents_out', 0):,} written documents.")
        if stats.get("tokenized"):
            files.append(f"- `{layout.TOKENS_DIR}/` and `{layout.TOKENIZER_DIR}/`: the training data as a trainer reads it "
                         f"(Megatron `.bin/.idx` token streams, the window sidecars, `{layout.TOKENS_DIR}/{layout.METADATA}` with the "
                         "stream blend), and the extended tokenizer those token ids belong to.")
    files += [card_entry(stats)] if options.include_safety_annotations else []
    files.append(f"- `{STATS_FILE}`: the run's statistics, config and versions; `{REPORT_FILE}`: the run report; "
                 f"`{IMAGES_DIR}/`: its plots.")
    load = f'load_dataset("{options.repo_id}", "sample", split="train")'
    return "\n".join([
        "---", _yaml_header(stats, options, rows=rows).strip(), "---", "",
        f"# SPP reflections: {options.repo_id.split('/')[-1]}", "",
        "Web documents scored for safety, of which a selected subset carries a short moral reflection written by "
        "an LLM persona that follows a value constitution, spliced into the text at a reading pause point "
        "(Synthetic Persona Pretraining).", "",
        f"Prompt version `{prompts.get('prompt_version')}`, constitution of {const.get('sections')} sections "
        f"(sha256 `{const.get('sha256')}`).", "",
        "## Files", "", *files, "",
        "```python", "from datasets import load_dataset", f"sample = {load}", "```", "",
        "## How the data was made", "", _method(stats), "",
        "Main columns, named and meant as in the published SPP datasets: `doc_id`, `text` (the original text), "
        "`token_length` (content tokens kept, at most the window's content), `safety_score`, `is_bad`, `reflection_1p`, "
        "`reflection_3p`, `reflection_position` (character offset), `reflection_token_index`, `canary_type`; then "
        "`training_text` (reflection spliced in), `selected_reason`, `citations`, `reflection_status`, `prompt_version`, "
        "`model`; `stats.json` and the project README document the rest.", "",
        "## Statistics", "", markdown_table(summary_rows(stats), ("statistic", "value")), "", plots, "",
        *(["## Recipes", "", "Each annotation track of the run, served by the same engine load.", "",
           markdown_table(recipe_rows(stats), RECIPE_HEADER), ""] if recipe_rows(stats) else []),
        *(["## Judge audit", "", "An LLM judge's scores of a stratified sample of the reflections, and a calibration ledger "
           "of the safety scorer against a teacher (`pipelines/audit.py`).", "",
           markdown_table(audit_rows(stats), ("audit", "value")), "", audit_plots, ""] if audit_rows(stats) else []),
        "## Sample strata", "",
        "Each stratum gives an equal share of the sample where it has enough rows (small strata give all of theirs), "
        "so per-stratum estimates need the weights `rows_in_run / rows_in_sample`.", "",
        markdown_table(strata_rows, ("stratum", "rows")), "",
        "## Languages", "",
        languages_text(stats, declared=options.language), "",
        "## Licence", "",
        f"Declared licence: `{options.license}`" + (f" ({options.license_name or DEFAULT_LICENSE_NAME}, see "
                                                    f"`{options.license_link or LICENSE_FILE}`)" if options.license == "other" else "")
        + f".{_license_note(sample)} Reflections are machine-generated.", "",
    ])


def license_metadata(options: PublishOptions) -> dict:
    """`license_name` and `license_link`, which the Hub expects beside `license: other`."""
    if options.license != "other":
        return {}
    return {"license_name": options.license_name or DEFAULT_LICENSE_NAME, "license_link": options.license_link or LICENSE_FILE}


def write_license_file(dest: Path, options: PublishOptions, *, sample: pa.Table) -> None:
    """LICENSE.md in the staged repository when the card links it (licence other, no link given)."""
    if options.license == "other" and not options.license_link:
        (dest / LICENSE_FILE).write_text(license_text(options, sample), encoding="utf-8")


def license_text(options: PublishOptions, sample: pa.Table) -> str:
    """LICENSE.md for a card that declares `other` without a link of its own."""
    return "\n".join([
        f"# Licence of {options.repo_id}", "",
        "The documents are web text under the terms of their sources; this dataset does not relicense them."
        + _license_note(sample), "",
        "The reflections and other annotations are machine-generated by the model named in each row's `model` column, "
        "under that model's licence terms for its outputs.", "",
        "Check each source's terms before redistributing or training on this data.", "",
    ])


def _place(src, dest: Path) -> None:
    """Hard link when possible (shards can be large), copy otherwise (a download from object storage)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(src):
        storage.copy_out(src, dest)
        return
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def build_repo_folder(out_dir: Path, dest: Path, *, options: PublishOptions) -> list[str]:
    """Stages the repository in `dest` (replaced if it holds an earlier staging); returns the
    repository paths, sorted."""
    out_dir, dest = storage.location(out_dir), Path(dest)
    stats_path = out_dir / STATS_FILE
    if not stats_path.exists():
        raise PublishError(f"{stats_path} not found; is --output a finished run's output directory?")
    stats = json.loads(stats_path.read_text())
    prepare_staging(dest)
    for f in safety_annotation_files(out_dir, documents=stats.get("documents_in")) if options.include_safety_annotations else ():
        _place(f, dest / layout.SAFETY_DIR / f.name)   # first: a run without them stops before the sample is drawn
    sample, strata = stratified_sample(out_dir, stats, rows=options.sample_rows, seed=options.seed)
    sample = sample_columns(sample, options.columns)
    (dest / SAMPLE_DIR).mkdir()
    pq.write_table(sample, dest / SAMPLE_FILE, compression="zstd")
    plots = run_plots(stats)
    (dest / IMAGES_DIR).mkdir()
    for name, png in plots.items():
        (dest / IMAGES_DIR / f"{name}.png").write_bytes(png)
    (dest / REPORT_FILE).write_text(render_report(stats, samples=sample_documents(out_dir), plots=plots), encoding="utf-8")
    _place(stats_path, dest / STATS_FILE)
    if options.include_shards:
        for f in shard_files(out_dir):
            _place(f, dest / SHARDS_IN_REPO / f.name)
        for folder in (layout.TOKENS_DIR, layout.TOKENIZER_DIR):  # what a trainer needs besides the text
            for f in sorted((out_dir / folder).rglob("*")):
                if f.is_file() and TMP_MARK not in f.name:   # never a killed writer's half-written file
                    _place(f, dest / storage.relative(f, out_dir))
    write_license_file(dest, options, sample=sample)
    (dest / CARD_FILE).write_text(build_card(stats, options=options, sample=sample, strata=strata), encoding="utf-8")
    for secret in publish_secrets(stats):  # a dry run refuses what an upload would refuse
        check_no_secret(dest, secret)
    return staged_files(dest)


def prepare_staging(dest: Path) -> None:
    """An empty staging folder at `dest`, marked as this tool's (`layout.STAGING_MARKER`, never
    uploaded). A folder is replaced only when it carries the marker: an empty or absent one is
    used, anything else (a clone of a Hub repository, `--dry-run .` in a project) is refused with
    nothing deleted."""
    if dest.exists():
        if not dest.is_dir():
            raise PublishError(f"{dest} is a file, not a staging folder")
        if (dest / layout.STAGING_MARKER).is_file():
            shutil.rmtree(dest)
        elif any(dest.iterdir()):
            raise PublishError(f"{dest} is not empty and is not a staging folder of this tool (no {layout.STAGING_MARKER}); "
                               "refusing to replace it: stage into a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / layout.STAGING_MARKER).write_text(json.dumps({"tool": layout.TOOL, "staged_at": time.time()}))


def staged_files(dest: Path) -> list[str]:
    """The repository paths of a staging folder (its marker is not one of them), sorted."""
    return sorted(rel for rel in (p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) if rel != layout.STAGING_MARKER)


def hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def publish_secrets(stats: dict) -> list[str]:
    """What must appear in no staged file: the Hub token, and the judge endpoint's key when its
    variable (the run's `audit.judge.api_key_env`) is set here."""
    judge_env = ((stats.get("config") or {}).get("audit") or {}).get("judge", {}).get("api_key_env") or "OPENAI_API_KEY"
    return [s for s in (hub_token(), os.environ.get(judge_env)) if s and len(s) >= 8]


def check_no_secret(folder: Path, secret: str, *, skip: tuple[str, ...] = (SHARDS_IN_REPO, layout.TOKENS_DIR, layout.SAFETY_DIR)) -> None:
    """Refuses to publish a staged file that contains `secret` (a key), in its bytes or, for a
    Parquet file, in any decoded value (a compressed page hides text from a byte search). The
    shards, token streams and safety scores are skipped: the run's own output, written before any key was in play."""
    needle, leaks = secret.encode(), []
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel.startswith(tuple(f"{s}/" for s in skip)):
            continue
        if needle in path.read_bytes() or (path.suffix == ".parquet" and secret in _parquet_text(path)):
            leaks.append(rel)
    if leaks:
        raise PublishError(f"a key (the Hub token or the judge's) appears in {', '.join(leaks)}; not publishing")


def _parquet_text(path: Path) -> str:
    table = pq.read_table(path)
    metadata = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    return json.dumps([metadata, table.to_pylist()], default=str, ensure_ascii=False)


def publish(out_dir: Path, *, options: PublishOptions, staging: Path, log=print) -> str:
    """Stages the repository in `staging`, creates the Hub dataset repo if needed and uploads the
    folder (hf_xet uploads resume when rerun). The token comes from HF_TOKEN or the saved login
    and is never printed or written. Returns the URL of the last commit."""
    if not hub_token():
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    paths = build_repo_folder(out_dir, staging, options=options)  # also refuses files holding the token
    message = f"SPP run: card, stats, {options.sample_rows}-row sample" + (", shards" if options.include_shards else "")
    return push_staging(staging, options=options, paths=paths, message=message, log=log)


def push_staging(staging: Path, *, options: PublishOptions, paths: list[str], message: str, log=print) -> str:
    """One commit that makes the repository hold exactly the staging folder: its files uploaded,
    remote files it does not hold deleted (an earlier publish's shards, a renamed file). The
    repository is created with `options.private`; an existing one that is public is refused
    unless `options.public` (publishing into a public repository is said out loud)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        info = api.repo_info(options.repo_id, repo_type="dataset")
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) != 404:
            raise
        info = None
    if info is not None and not info.private and not options.public:
        raise PublishError(f"{options.repo_id} exists and is public: pass --public to publish into a public repository "
                           "(nothing was uploaded)")
    if info is None:
        if not options.private and not options.public:
            raise PublishError(f"creating {options.repo_id} as public needs --public (nothing was uploaded)")
        api.create_repo(options.repo_id, repo_type="dataset", private=options.private)
    log(f"[publish] uploading {len(paths)} files to {options.repo_id} ({'private' if info is None and options.private else 'existing'})")
    commit = api.upload_folder(repo_id=options.repo_id, repo_type="dataset", folder_path=staging, commit_message=message,
                               ignore_patterns=[layout.STAGING_MARKER], delete_patterns=["*"])
    return commit.commit_url

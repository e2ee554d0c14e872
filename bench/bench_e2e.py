"""Benchmark: the whole pipeline as a score-and-select run (generation off) over N documents,
with the peak memory of every Ray process sampled while it runs, to show memory stays flat.

    .venv/bin/python bench/bench_e2e.py --docs 100000 1000000 [--mode filtered_baseline] [--set a.b=value ...]

Each N: the shared corpus replicated to N documents with new ids (written under /tmp, never
into the repo), then `pipelines/spp_reflections.py` as a subprocess, as a user runs it. A thread
sums the memory (RSS, PSS, USS) of the driver and all its descendants plus every process that names this run's
Ray temp dir (raylet, gcs, workers, agents) every 0.5 s. Prints a table and the ratio of the
largest N's peak to the smallest's. Heavy: on a shared machine run it under the heavy-work lock.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "corpus"
GIB = 2**30
# Lines the pipeline logs when it enters a phase.
PHASE = re.compile(r"^\[spp\] (pass \w+|selection|score histogram|this run)", re.MULTILINE)


def replicated_corpus(n_docs: int, out_dir: Path, *, docs_per_file: int, row_group_size: int) -> list[Path]:
    """The sample corpus (all its columns) repeated to `n_docs` rows with fresh ids, written one
    file at a time so this process never holds more than one file's rows."""
    base = pa.concat_tables([pq.read_table(f) for f in sorted(CORPUS.glob("*.parquet"))])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, start in enumerate(range(0, n_docs, docs_per_file)):
        count = min(docs_per_file, n_docs - start)
        rows = base.take(pa.array([(start + i) % base.num_rows for i in range(count)]))
        ids = pa.array([f"rep-{start + i:09d}" for i in range(count)], base.schema.field("id").type)
        rows = rows.set_column(rows.schema.get_field_index("id"), "id", ids)
        path = out_dir / f"part-{part:05d}.parquet"
        pq.write_table(rows, path, row_group_size=row_group_size, compression="zstd")
        paths.append(path)
    return paths


def _describe(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    try:
        name = proc.name()
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    # Ray renames workers' command lines to `ray::<what they run>`.
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0][:60]
    for part in cmd[:3]:
        for known in ("dashboard.py", "log_monitor.py", "monitor.py", "runtime_env", "agent"):
            if known in part:
                return known
    return name


@dataclass
class MemorySample:
    """Peaks over the run: the sum over all Ray processes, and the largest single process."""

    peak_rss_total: int = 0
    peak_pss_total: int = 0
    # Private memory only (USS): what the processes would free on exit; shared pages (the object
    # store's shared memory, shared libraries) are not in it at all.
    peak_uss_total: int = 0
    peak_process_rss: int = 0
    peak_process: str = ""
    peak_processes: int = 0
    samples: int = 0
    # The largest processes (name, RSS, PSS in bytes) at the moment of the peak RSS total.
    at_peak: tuple = ()
    peak_phase: str = ""
    # Peak RSS / PSS total per phase of the run (the pipeline's last "[spp] <phase>" log line).
    phases: dict = field(default_factory=dict)


class RayMemorySampler(threading.Thread):
    """Samples every `interval_s` until stopped. PSS splits shared pages (the object store's
    shared memory, shared libraries) between the processes mapping them, so unlike summed RSS
    it does not count them once per process; both are reported."""

    def __init__(self, *, driver_pid: int, temp_dir: str, log_path: Path, interval_s: float = 0.5,
                 trace_path: Path | None = None):
        super().__init__(daemon=True)
        self.driver_pid = driver_pid
        # One JSON line per sample with every process's memory split by kind, to see which
        # process and which kind of memory (private heap, object-store shared memory, mapped
        # files) grows over a run.
        self.trace = open(trace_path, "w") if trace_path else None
        self.started = time.monotonic()
        self.log_path = log_path
        self.temp_dir = temp_dir
        self.interval_s = interval_s
        self.result = MemorySample()
        self._stop_event = threading.Event()

    def processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        try:
            driver = psutil.Process(self.driver_pid)
            found[driver.pid] = driver
            found.update({c.pid: c for c in driver.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid not in found and any(self.temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def phase(self) -> str:
        """The run's current phase: the last phase marker its log printed so far."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 8192))
                tail = f.read().decode(errors="replace")
        except OSError:
            return "start"
        found = PHASE.findall(tail)
        return found[-1] if found else "start"

    def sample(self) -> None:
        phase = self.phase()
        measured = []
        procs = self.processes()
        for proc in procs:
            try:
                mem = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            measured.append((proc, mem.rss, getattr(mem, "pss", mem.rss), getattr(mem, "uss", mem.rss)))
        rss_total = sum(m[1] for m in measured)
        pss_total = sum(m[2] for m in measured)
        uss_total = sum(m[3] for m in measured)
        largest_proc, largest = max(((m[0], m[1]) for m in measured), key=lambda m: m[1], default=(None, 0))
        if self.trace:
            self._write_trace(phase, measured)
        r = self.result
        r.samples += 1
        if rss_total > r.peak_rss_total:
            top = sorted(measured, key=lambda m: -m[1])[:6]
            r.at_peak = tuple((_describe(p, self.driver_pid), rss, pss) for p, rss, pss, _ in top)
            r.peak_phase = phase
        rss_peak, pss_peak = r.phases.get(phase, (0, 0))
        r.phases[phase] = (max(rss_peak, rss_total), max(pss_peak, pss_total))
        r.peak_rss_total = max(r.peak_rss_total, rss_total)
        r.peak_pss_total = max(r.peak_pss_total, pss_total)
        r.peak_uss_total = max(r.peak_uss_total, uss_total)
        r.peak_processes = max(r.peak_processes, len(procs))
        if largest > r.peak_process_rss and largest_proc is not None:
            r.peak_process_rss, r.peak_process = largest, _describe(largest_proc, self.driver_pid)

    def _write_trace(self, phase: str, measured: list) -> None:
        procs = []
        for proc, rss, pss, uss in measured:
            kinds = _status_kinds(proc.pid)
            procs.append({"pid": proc.pid, "name": _describe(proc, self.driver_pid), "rss": rss, "pss": pss, "uss": uss, **kinds})
        self.trace.write(json.dumps({"t": round(time.monotonic() - self.started, 1), "phase": phase, "procs": procs}) + "\n")
        self.trace.flush()

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            self.sample()
            self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self) -> MemorySample:
        self._stop_event.set()
        self.join()
        if self.trace:
            self.trace.close()
        return self.result


def _status_kinds(pid: int) -> dict:
    """RSS split into anonymous (private heap), shared memory (the object store's pages this
    process touched) and file-backed pages, in bytes, from /proc/<pid>/status (Linux)."""
    kinds = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    kinds[key[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return kinds


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_once(n_docs: int, args: argparse.Namespace, scratch: Path) -> dict:
    corpus_dir, out_dir = scratch / f"corpus-{n_docs}", scratch / f"out-{n_docs}"
    t0 = time.perf_counter()
    files = replicated_corpus(n_docs, corpus_dir, docs_per_file=args.docs_per_file, row_group_size=args.row_group_size)
    print(f"[bench] {n_docs:,} documents in {len(files)} files under {corpus_dir} ({time.perf_counter() - t0:.0f}s)", flush=True)
    # A short, private Ray temp dir: every Ray process of this run names it on its command line
    # (and Unix socket paths under it must stay short).
    ray_tmp = tempfile.mkdtemp(prefix="sppb-", dir="/tmp")
    cmd = [
        sys.executable, str(REPO / "pipelines" / "spp_reflections.py"), "--config", args.config,
        "--set", f"input.paths=['{corpus_dir}/*.parquet']", "--set", "input.limit=null",
        "--set", "generation.enabled=false", "--set", f"selection.mode={args.mode}",
        "--output", str(out_dir), "--overwrite",
    ]
    for override in args.overrides:
        cmd += ["--set", override]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log_path = scratch / f"run-{n_docs}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        trace = Path(args.trace) / f"memory-{n_docs}.jsonl" if args.trace else None
        sampler = RayMemorySampler(driver_pid=proc.pid, temp_dir=ray_tmp, log_path=log_path, interval_s=args.sample_interval,
                                   trace_path=trace)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - started
    memory = sampler.stop()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"pipeline failed (exit {rc}) at {n_docs:,} documents; log {log_path}:\n{tail}")
    stats = json.loads((out_dir / "stats.json").read_text())
    progress = [line for line in log_path.read_text().splitlines() if line.startswith("[spp] pass")]
    out_bytes = _dir_bytes(out_dir / "shards") + (_dir_bytes(out_dir / "tokenized") if (out_dir / "tokenized").exists() else 0)
    result = {
        "docs": n_docs,
        "documents_in": stats["documents_in"],
        "documents_out": stats["documents_out"],
        "wall_s": round(wall, 1),
        "pipeline_s": stats["wall_seconds"]["total"],
        "docs_per_s": round(n_docs / wall, 1),
        "pipeline_docs_per_s": round(n_docs / stats["wall_seconds"]["total"], 1),
        "peak_rss_total_gib": round(memory.peak_rss_total / GIB, 3),
        "peak_pss_total_gib": round(memory.peak_pss_total / GIB, 3),
        "peak_uss_total_gib": round(memory.peak_uss_total / GIB, 3),
        "peak_process_rss_gib": round(memory.peak_process_rss / GIB, 3),
        "peak_process": memory.peak_process,
        "peak_processes": memory.peak_processes,
        "memory_samples": memory.samples,
        "peak_phase": memory.peak_phase,
        "phase_peaks_gib": {k: (round(a / GIB, 2), round(b / GIB, 2)) for k, (a, b) in memory.phases.items()},
        "largest_at_peak_gib": [(name, round(rss / GIB, 2), round(pss / GIB, 2)) for name, rss, pss in memory.at_peak],
        "pass_seconds": stats["wall_seconds"],
        "output_bytes_per_doc": round(out_bytes / max(1, stats["documents_out"])),
        "input_bytes_per_doc": round(_dir_bytes(corpus_dir) / n_docs),
        "progress_tail": progress[-3:],
        "command": shlex.join([Path(cmd[0]).name if c == sys.executable else c for c in cmd]),
    }
    if not args.keep:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000], help="corpus sizes, one run each")
    ap.add_argument("--mode", default="filtered_baseline", choices=["filtered_baseline", "token_matched", "random_fraction"],
                    help="selection.mode of the score-and-select run")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--docs-per-file", type=int, default=50_000)
    ap.add_argument("--row-group-size", type=int, default=10_000)
    ap.add_argument("--sample-interval", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--scratch", default="/tmp", help="where the replicated corpus and the output go (not the repo)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus, output and logs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--trace", help="a directory: write every memory sample, per process and kind (anon/shmem/file), "
                                    "to memory-<N>.jsonl there")
    args = ap.parse_args()
    if REPO in Path(args.scratch).resolve().parents or Path(args.scratch).resolve() == REPO:
        raise SystemExit("--scratch must be outside the repository")

    scratch = Path(tempfile.mkdtemp(prefix="spp-bench-e2e-", dir=args.scratch))
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for n in sorted(args.docs):
            results.append(run_once(n, args, scratch))
            r = results[-1]
            print(f"[bench] {n:,}: {r['wall_s']}s, peak RSS total {r['peak_rss_total_gib']} GiB; last progress: "
                  f"{r['progress_tail'][-1] if r['progress_tail'] else '-'}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM"
    print(f"\nscore-and-select ({args.mode}, generation off), {machine}, {date.today().isoformat()}")
    header = (f"{'docs':>10} {'wall s':>8} {'docs/s':>8} {'pipeline docs/s':>16} {'peak RSS total GiB':>19} "
              f"{'peak PSS total GiB':>19} {'peak USS total GiB':>19} {'peak process GiB':>17}  process")
    print(header)
    for r in results:
        print(f"{r['docs']:>10,} {r['wall_s']:>8.1f} {r['docs_per_s']:>8.1f} {r['pipeline_docs_per_s']:>16.1f} "
              f"{r['peak_rss_total_gib']:>19.2f} {r['peak_pss_total_gib']:>19.2f} {r['peak_uss_total_gib']:>19.2f} "
              f"{r['peak_process_rss_gib']:>17.2f}  {r['peak_process']}")
    if len(results) > 1:
        small, large = results[0], results[-1]
        rss = large["peak_rss_total_gib"] / small["peak_rss_total_gib"]
        pss = large["peak_pss_total_gib"] / small["peak_pss_total_gib"]
        uss = large["peak_uss_total_gib"] / small["peak_uss_total_gib"]
        print(f"\npeak memory {large['docs']:,} / {small['docs']:,} documents: RSS total {rss:.2f}, PSS total {pss:.2f}, USS total {uss:.2f} "
              f"(target <= 1.10); largest peak RSS total {large['peak_rss_total_gib']:.2f} GiB (target < 4)")
    for r in results:
        print(f"{r['docs']:,}: largest processes at the peak (RSS, PSS GiB): "
              + ", ".join(f"{name} {rss}/{pss}" for name, rss, pss in r["largest_at_peak_gib"]))
        print(f"{r['docs']:,}: peak in phase {r['peak_phase']!r}; peak RSS/PSS total per phase (GiB): {r['phase_peaks_gib']}")
        print(f"{r['docs']:,}: pass seconds {r['pass_seconds']}; output {r['output_bytes_per_doc']:,} bytes/document "
              f"(input {r['input_bytes_per_doc']:,})")
        print(f"{r['docs']:,}: pipeline command: {r['command']}")
    print(f"bench command: {shlex.join(['.venv/bin/python', 'bench/bench_e2e.py', *sys.argv[1:]])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "date": date.today().isoformat(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

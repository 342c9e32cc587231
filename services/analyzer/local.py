"""The two stages in this machine (``vison analyze``): the extraction units on a local process
pool (``concurrent.futures``; all cores by default, 0 = in this process), then the solve; a
progress bar with rate and ETA on a terminal (tqdm), plain lines otherwise."""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from services.analyzer.execute import run_extraction, run_solve
from services.analyzer.jobs import ExtractJob, JobDone, SolveJob


class Progress:
    """tqdm on a terminal; else one plain line per step (count, rate, ETA) on ``stream``."""

    def __init__(self, total: int, desc: str, stream=None, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="unit", file=self.stream, dynamic_ncols=True)

    def update(self, note: str = "") -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        dt = time.monotonic() - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f}/s, ETA {eta:.0f} s){' ' + note if note else ''}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _extract(args: tuple[str, str, str]) -> str:
    job_json, data_root, products_root = args
    return run_extraction(ExtractJob.model_validate_json(job_json), data_root, products_root).model_dump_json()


def _context():
    """fork when this process runs no other thread (fast start), else spawn (safe)."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def run_extractions(jobs: list[ExtractJob], data_root: str | Path, products_root: str | Path, workers: int | None = None,
                    progress: bool = True, on_done: Callable[[JobDone], None] | None = None) -> list[JobDone]:
    """Every extraction job; ``workers`` None = all cores, 0 = in this process."""
    n = (os.cpu_count() or 1) if workers is None else workers
    bar = Progress(len(jobs), "extractions", enabled=progress)
    out: list[JobDone] = []
    try:
        if n == 0 or len(jobs) <= 1:
            for job in jobs:
                done = run_extraction(job, data_root, products_root)
                out.append(done)
                bar.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(n, len(jobs)), mp_context=_context()) as pool:
                futures = [pool.submit(_extract, (j.model_dump_json(), str(data_root), str(products_root))) for j in jobs]
                for fut in concurrent.futures.as_completed(futures):
                    out.append(JobDone.model_validate_json(fut.result()))
                    bar.update()
    finally:
        bar.close()
    by_id = {d.job_id: d for d in out}
    return [by_id[j.job_id] for j in jobs]


def solve(job: SolveJob, data_root: str | Path, products_root: str | Path, figures: bool = True) -> JobDone:
    return run_solve(job, data_root, products_root, figures=figures)

"""`minisd bench`: speed figures measured on this machine, printed as a table and written as JSON.

Suites:
    explorer   the chapter-8 denoising explorer with a model: how long pressing Run takes for a
               50-step guided run (sampling, decoding every step, drawing), and how long moving
               the step slider takes to redraw (each position timed once).
Timings are medians over `repeats` runs after one warm-up run; wall-clock seconds on the CPU
threads torch uses here (`torch.get_num_threads()`).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from minisd.errors import MinisdError, check_choice, check_count

SUITES = ("explorer",)
EXPLORER_TARGETS = {"run_seconds": 10.0, "redraw_seconds": 0.3}  # issue 7: 50 guided steps; one slider move


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_explorer(sd, repeats: int = 3, steps: int = 50, guidance: float = 4.0) -> list[dict]:
    """Rows of {what, seconds, target}: pressing Run (sample, decode every step, draw the last),
    alone and side by side, and the redraw after a slider move, timed at every position."""
    from minisd.widgets import denoising_explorer

    def explorer(**settings):
        ex = denoising_explorer(sd, **{"steps": steps, "guidance": guidance, **settings}, run=False)
        if not ex.run():
            raise MinisdError(f"the explorer refused the benchmark's settings: {ex.message.value}")
        return ex

    def redraws(ex) -> list[float]:  # Run leaves the slider at the end: visit every other position, then back
        return [_timed(lambda p=p: setattr(ex.step_slider, "value", p)) for p in [*range(steps - 1, -1, -1), steps]]

    explorer(steps=5)  # warm-up
    rows = []
    for sampler in ("ddim", "dpmsolver++"):
        ex = explorer(sampler=sampler)
        seconds = statistics.median(_timed(lambda e=ex: e.run(force=True)) for _ in range(repeats))
        rows.append({"what": f"press Run: {steps} {sampler} steps, guidance {guidance:g}",
                     "seconds": seconds, "target": EXPLORER_TARGETS["run_seconds"]})
    times = redraws(ex)
    rows.append({"what": f"move the step slider: redraw (median of {len(times)} positions)",
                 "seconds": statistics.median(times), "target": EXPLORER_TARGETS["redraw_seconds"]})
    rows.append({"what": "move the step slider: redraw (slowest position)", "seconds": max(times),
                 "target": EXPLORER_TARGETS["redraw_seconds"]})
    ex = explorer(sampler="ddim", compare=True, sampler_b="dpmsolver++", steps_b=steps, guidance_b=guidance)
    seconds = statistics.median(_timed(lambda: ex.run(force=True)) for _ in range(repeats))
    rows.append({"what": f"press Run, side by side: {steps} ddim and {steps} dpmsolver++ steps",
                 "seconds": seconds, "target": None})
    rows.append({"what": "move the step slider, side by side: redraw (median)",
                 "seconds": statistics.median(redraws(ex)), "target": EXPLORER_TARGETS["redraw_seconds"]})
    return rows


def run_bench(suites, run: str = "shapes-cpu", out=None, repeats: int = 3, device: str = "cpu") -> dict:
    from minisd.pipeline import StableDiffusion
    from minisd.runs import write_json

    suites = list(suites) or list(SUITES)
    for s in suites:
        check_choice("bench suite", s, SUITES)
    check_count("repeats", repeats, 1, 100)
    if out is not None and not Path(out).parent.exists():
        raise MinisdError(f"folder {str(Path(out).parent)!r} for --out does not exist; create it first")
    sd = StableDiffusion.from_pretrained(run, device=device)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": str(sd.device),
                          "gpu": torch.cuda.get_device_name() if sd.device.type == "cuda" else None},
              "run": str(run), "repeats": repeats, "suites": {}}
    if "explorer" in suites:
        result["suites"]["explorer"] = bench_explorer(sd, repeats)
    if out is not None:
        write_json(Path(out), result)
    return result


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"# minisd bench · {m['gpu'] or m['device']} · {m['cpus']} CPUs, {m['torch_threads']} torch "
                 f"threads · torch {m['torch']} · model {result['run']}")
    for suite, rows in result["suites"].items():
        width = max(len(r["what"]) for r in rows)
        lines.append(f"\n{suite}:")
        lines.append(f"  {'measure':<{width}}  {'seconds':>9}  {'target':>8}  ok")
        for r in rows:
            target = "" if r["target"] is None else f"< {r['target']:g}"
            ok = "" if r["target"] is None else ("yes" if r["seconds"] < r["target"] else "NO")
            lines.append(f"  {r['what']:<{width}}  {r['seconds']:>9.3f}  {target:>8}  {ok}")
    return "\n".join(lines)

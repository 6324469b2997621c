"""The first post-processing call in a fresh process: cold (compiling), warm (cached), read-only package.

    OMP_NUM_THREADS=1 python benchmarks/first_call.py            # -> benchmarks/results/first_call.md
    OMP_NUM_THREADS=1 python benchmarks/first_call.py --repeats 3 --cold-repeats 1 --out /tmp/fc.md

Every measurement is a fresh Python process that imports torch (what any locconf user has paid
already), then times ``import locconf.postprocess`` and its first ``postprocess(candidates,
"soft-gaussian")`` call on 200 boxes, and reports whether numba was imported by the import. Cases:

* cold: an empty kernel cache (``LOCCONF_CACHE`` a new temporary folder): numba compiles;
* warm: the same cache, filled by the cold run;
* as before: warm, but as locconf loaded its kernels until now, the peer in the same run: numba
  imported with ``locconf.postprocess``, and numba's compiler refreshed before the cache is read
  (what ``numba.core.caching.Cache.load_overload`` does);
* read-only package: the same two with locconf copied into a temporary folder whose files and
  folders are made read-only (``chmod a-w``; on a root account that does not stop writes, so the
  copy's files are listed before and after: nothing may be added).

The warm first call's target is 0.2 s (issue 28 item 5). Each case runs ``--repeats`` times
(``--cold-repeats`` for compiling ones), the table gives medians; the machine's load average is
printed, as a shared machine slows every process alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name  # benchmarks/common.py

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

_CHILD = r"""
import json, os, sys, time
import torch
mode = sys.argv[1]
t0, c0 = time.perf_counter(), time.process_time()
if mode == "before":
    import numba  # as locconf.postprocess imported it until now
from locconf import postprocess as pp
t1, c1 = time.perf_counter(), time.process_time()
numba_at_import = "numba" in sys.modules
if mode == "before":  # numba's own loading: the compiler's refresh before reading the cache
    from locconf import jit
    cls = jit._cache_class()
    load = cls.load_overload
    def refreshing(self, sig, target_context):
        target_context.refresh()
        return load(self, sig, target_context)
    cls.load_overload = refreshing
g = torch.Generator().manual_seed(0)
b = torch.rand(200, 4, generator=g) * 100
b[:, 2:] += b[:, :2]
cand = dict(boxes=b, scores=torch.rand(200, generator=g), labels=torch.zeros(200, dtype=torch.long))
t2, c2 = time.perf_counter(), time.process_time()
out = pp.postprocess(cand, "soft-gaussian")
t3, c3 = time.perf_counter(), time.process_time()
pp.postprocess(cand, "nms")
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "import_cpu_s": c1 - c0, "first_s": t3 - t2, "first_cpu_s": c3 - c2,
                  "second_s": t4 - t3,
                  "numba_at_import": numba_at_import, "kept": len(out["scores"]),
                  "locconf": os.path.dirname(pp.__file__)}))
"""


def run_child(mode: str, cache: Path, pythonpath: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", LOCCONF_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    res = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"{mode}: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(label: str, mode: str, cache_of, repeats: int, pythonpath: Path | None = None) -> dict:
    runs = []
    for i in range(repeats):
        runs.append(run_child(mode, cache_of(i), pythonpath))
        r = runs[-1]
        print(f"{label} #{i + 1}: import {r['import_s']:.3f} s ({r['import_cpu_s']:.3f} s CPU), first call "
              f"{r['first_s']:.3f} s ({r['first_cpu_s']:.3f} s CPU) "
              f"(numba imported by the import: {r['numba_at_import']})", flush=True)
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("import_s", "import_cpu_s", "first_s", "first_cpu_s", "second_s")}
    med["total_s"] = statistics.median(r["import_s"] + r["first_s"] for r in runs)
    med["total_cpu_s"] = statistics.median(r["import_cpu_s"] + r["first_cpu_s"] for r in runs)
    med.update(label=label, n=repeats, numba_at_import=runs[0]["numba_at_import"], locconf=runs[0]["locconf"],
               kept={r["kept"] for r in runs})
    return med


def read_only_copy(root: Path) -> Path:
    """``src/locconf`` copied under ``root`` and made read-only; returns the folder to put on PYTHONPATH."""
    shutil.copytree(SRC / "locconf", root / "locconf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return root


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per warm case")
    ap.add_argument("--cold-repeats", type=int, default=1, help="fresh processes per compiling case (each ~10-30 s)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "first_call.md")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(measure("cold: empty cache (compiles)", "plain", lambda i: tmp / f"cold{i}", args.cold_repeats))
        warm_cache = tmp / "cold0"
        rows.append(measure("warm: cache filled", "plain", lambda i: warm_cache, args.repeats))
        rows.append(measure("as before: numba at import, compiler refreshed before loading", "before",
                            lambda i: warm_cache, args.repeats))
        package = read_only_copy(tmp / "ro")
        before = files(package)
        rows.append(measure("read-only package, cold", "plain", lambda i: tmp / f"ro_cold{i}", args.cold_repeats,
                            package))
        rows.append(measure("read-only package, warm", "plain", lambda i: tmp / "ro_cold0", args.repeats, package))
        unchanged = files(package) == before
        for path in [package] + list(package.rglob("*")):  # writable again, for the clean-up
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        if not all(str(package) in r["locconf"] for r in rows[-2:]):
            raise RuntimeError("the read-only runs did not import the copy")

    header = "| case | processes | import locconf.postprocess: s (CPU s) | first call: s (CPU s) | " \
             "import + first call: s (CPU s) | numba imported by the import | next call (ms) |"
    lines = [header, "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} | {r['import_s']:.3f} ({r['import_cpu_s']:.3f}) | "
                     f"{r['first_s']:.3f} ({r['first_cpu_s']:.3f}) | {r['total_s']:.3f} ({r['total_cpu_s']:.3f}) | "
                     f"{'yes' if r['numba_at_import'] else 'no'} | {r['second_s'] * 1e3:.1f} |")
    warm, before = rows[1], rows[2]
    cpu = cpu_name()
    text = "\n".join([
        "# The first post-processing call in a fresh process", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/first_call.py --repeats {args.repeats} --cold-repeats "
        f"{args.cold_repeats}` · {cpu} · Python {sys.version.split()[0]} · load average "
        f"{os.getloadavg()[0]:.1f} at the end (2 cores shared with other jobs: every process slowed alike). "
        "Medians over fresh processes; each process imported torch first (not timed). CPU s: the process's CPU "
        "time over the same span (less sensitive to the machine's load than wall time). The first call is "
        "`postprocess(candidates, \"soft-gaussian\")` on 200 boxes; the next call is hard NMS on the same boxes.", "",
        *lines, "",
        f"- Target: warm first call < 0.2 s: {warm['first_s']:.3f} s wall, {warm['first_cpu_s']:.3f} s CPU "
        f"({'met' if warm['first_s'] < 0.2 else 'missed'} in wall time, "
        f"{'met' if warm['first_cpu_s'] < 0.2 else 'missed'} in CPU time); import + first call "
        f"{warm['total_s']:.3f} s wall, {warm['total_cpu_s']:.3f} s CPU.",
        f"- Against the loading as before, in the same run: import + first call {before['total_s']:.3f} s -> "
        f"{warm['total_s']:.3f} s wall ({before['total_s'] / warm['total_s']:.1f}x), {before['total_cpu_s']:.3f} s "
        f"-> {warm['total_cpu_s']:.3f} s CPU ({before['total_cpu_s'] / warm['total_cpu_s']:.1f}x).",
        f"- Read-only package: nothing written into the copy of locconf: {'yes' if unchanged else 'NO'}; its "
        "kernels went to `$LOCCONF_CACHE/numba`.",
    ]) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

"""Benchmark: convert a PanNuke-sized fixture (2,656 tiles of 256², as in fold 1) into the prepared layout.

The fixture has the release's layout and dtypes (images and masks stored as float64, ~4.7 MB per
tile on disk, 12.5 GB for 2,656 tiles) split over three folds.  It is generated once into
``--workdir`` (not timed), then the conversion runs in a child process so that its wall time and
peak resident memory (``VmHWM`` of that process) are measured alone.

    python scripts/benchmark_conversion.py --workdir /tmp/cellgap_bench [--tiles 2656] [--keep]

Target (issue 4): under 2 minutes on a 2-core machine, with memory bounded by the chunk size
rather than the dataset size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fold_sizes(total: int) -> tuple[int, int, int]:
    base = total // 3
    return (base + total % 3, base, base) if total % 3 else (base, base, base)


def make_fixture(raw: Path, tiles: int, size: int, dtype: str) -> float:
    from cellgap.testing.fixtures import write_pannuke

    marker = raw / ".fixture.json"
    params = {"tiles": tiles, "size": size, "dtype": dtype}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return 0.0
    shutil.rmtree(raw, ignore_errors=True)
    start = time.perf_counter()
    write_pannuke(raw, tiles_per_fold=fold_sizes(tiles), size=size, dtype=dtype, cells=(10, 40), seed=0,
                  tissues=("Breast", "Colon", "Lung", "Kidney", "Liver", "Skin", "Stomach", "Prostate", "Testis", "Uterus",
                           "Adrenal_gland", "Bile-duct", "Bladder", "Cervix", "Esophagus", "HeadNeck", "Ovarian", "Pancreatic",
                           "Thyroid"))
    marker.write_text(json.dumps(params))
    return time.perf_counter() - start


CHILD = """
import json, resource, sys, time
from cellgap.data import pannuke
start = time.perf_counter()
pannuke.convert(sys.argv[1], sys.argv[2], progress=False, chunk=int(sys.argv[3]), workers=int(sys.argv[4]))
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
# VmHWM is the peak resident set of this process image; ru_maxrss would also count the parent's
# memory at fork time, which Linux carries across exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_mb": hwm / 1024}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=2656)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32", "uint8"))
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", help="where the fixture and output go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fixture for the next run")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cellgap_bench_"))
    raw, out = workdir / "raw", workdir / "prepared"
    workdir.mkdir(parents=True, exist_ok=True)
    # The fixture is written by a child process too, so that this process stays small.
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--make-fixture", str(raw), str(args.tiles), str(args.size), args.dtype],
                   check=True)
    generated = time.perf_counter() - start
    native_bytes = sum(p.stat().st_size for p in raw.rglob("*.npy"))
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run([sys.executable, "-c", CHILD, str(raw), str(out), str(args.chunk), str(args.workers)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    prepared_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})", "tiles": args.tiles,
        "tile_size": args.size, "dtype": args.dtype, "chunk": args.chunk, "workers": args.workers,
        "native_gb": round(native_bytes / 1e9, 2), "prepared_mb": round(prepared_bytes / 1e6, 1),
        "fixture_generation_s": round(generated, 1), "conversion_wall_s": round(stats["wall_s"], 1),
        "conversion_cpu_s": round(stats["cpu_s"], 1), "tiles_per_s": round(args.tiles / stats["wall_s"], 1),
        "peak_rss_mb": round(stats["max_rss_mb"], 1),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(raw, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--make-fixture":
        make_fixture(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    sys.exit(main())

"""Peak memory of small hostile files through their commands, above the interpreter's baseline.

Two kinds (fixtures/hostile.py): MEMORY_BOMBS claim gigabytes and must be refused (exit 2);
AT_LIMIT are accepted files that claim just under the default limits (exit 0), i.e. the most
a small file can still make a command use. Each run is a fresh interpreter that imports what
every command imports (the baseline, ru_maxrss), runs the command and reports its peak
ru_maxrss. The goal: no file under 10 MB takes more than 1 GiB above baseline.

    python benchmarks/hostile_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

import hostile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case':34s} {'file':>10s} {'exit':>4s} {'above baseline MiB (min..max of %d)' % args.repeats:>36s}  baseline MiB")
    worst = 0
    for name, make in {**hostile.MEMORY_BOMBS, **hostile.AT_LIMIT}.items():
        folder = Path(tempfile.mkdtemp(prefix="hostile-"))
        try:
            (folder / "out").mkdir()
            command = make(folder)
            size = max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=0)
            runs = [hostile.run_measured(command, result_file=folder / "measured.json") for _ in range(args.repeats)]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        above = [r["above_baseline"] / 2**20 for r in runs]
        codes = sorted({r["exit"] for r in runs})
        worst = max(worst, max(above))
        print(f"{name:34s} {size / 1024:8.0f} KB {'/'.join(map(str, codes)):>4s} {min(above):17.1f} .. {max(above):<16.1f}  {runs[0]['base'] / 2**20:.0f}")
    print(f"worst case: {worst:.1f} MiB above baseline (bound: 1024 MiB)")


if __name__ == "__main__":
    main()

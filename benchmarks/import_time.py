"""Start-up cost of captum-chains against the floor ``import torch, captum.attr``.

Every case runs in a fresh Python subprocess (so nothing is cached in ``sys.modules``),
the cases interleaved round by round so that a busy machine slows them alike:

* ``torch, captum.attr`` - the floor: any Captum plugin needs both;
* ``import captum_chains`` - the bare package (lazy: imports nothing heavy);
* ``from captum_chains import ChainExtractor, ...`` - the core API, ready to extract;
* ``captum-chains --help`` - the command line's start-up (no torch).

    OMP_NUM_THREADS=1 python benchmarks/import_time.py --repeats 7

Prints the median wall time of each case and its ratio to the floor.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "import torch, captum.attr": ["-c", "import torch, captum.attr"],
    "import captum_chains": ["-c", "import captum_chains"],
    "from captum_chains import ChainExtractor, Chain, ChainConfig, SubNetwork": [
        "-c",
        "from captum_chains import ChainExtractor, Chain, ChainConfig, SubNetwork",
    ],
    "captum-chains --help": ["-m", "captum_chains.cli", "--help"],
}
FLOOR = "import torch, captum.attr"


def command(case: str) -> list[str]:
    """The subprocess command line of a case (the installed console script for the CLI)."""
    if case == "captum-chains --help":
        script = Path(sys.executable).with_name("captum-chains")
        found = str(script) if script.is_file() else shutil.which("captum-chains")
        if found is not None:
            return [found, "--help"]
    return [sys.executable, *CASES[case]]


def run_once(case: str) -> float:
    """Wall seconds of one fresh subprocess running ``case``."""
    start = time.perf_counter()
    subprocess.run(command(case), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args()
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    for case in CASES:  # warm the file-system cache once, untimed
        run_once(case)
    times: dict[str, list[float]] = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            times[case].append(run_once(case))
    floor = statistics.median(times[FLOOR])
    print(f"python {platform.python_version()} on {platform.machine()}, {args.repeats} rounds")
    print(f"{'case':<74} {'median s':>9} {'min s':>7} {'/ floor':>8}")
    for case, values in times.items():
        median = statistics.median(values)
        print(f"{case:<74} {median:9.3f} {min(values):7.3f} {median / floor:8.2f}")


if __name__ == "__main__":
    main()

"""Throughput of run_study, serial vs Ray, in regions per minute.

The same digits regions (paper protocol, the digits-study config of
``benchmarks/study_digits.py``) run once with the serial backend (one process, one
torch thread) and once on a local Ray cluster (``--workers`` processes, one thread
each), each in a fresh folder. Wall-clock time includes Ray's start-up (a few seconds)
but not model training (cached). Results are appended to
``benchmarks/results/study_throughput.csv``.

Run::

    OMP_NUM_THREADS=1 python benchmarks/study_throughput.py --arch vgg --regions 8 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from study_digits import EPSILON, LOWER, UPPER, digits_config  # same folder

from captum_chains.studies import run_study, sample_regions
from captum_chains.zoo import load_digits_data, train_digits_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vgg")
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--regions-per-task", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["serial", "ray"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_data()
    model = train_digits_model(args.arch)
    regions = sample_regions(model, data.x_train, data.y_train, n_regions=args.regions, seed=7)
    rows = []
    for backend in args.backends:
        folder = Path(tempfile.mkdtemp(prefix=f"throughput-{backend}-"))
        start = time.perf_counter()
        cpu0 = os.times()
        result = run_study(
            model,
            regions,
            folder,
            config=digits_config(args.arch),
            pool=data.x_test,
            pool_labels=data.y_test,
            ks=(1, 5, 10, 20),
            epsilon=EPSILON,
            lower_bound=LOWER,
            upper_bound=UPPER,
            backend=backend,
            num_workers=args.workers,
            regions_per_task=args.regions_per_task,
            progress=False,
        )
        seconds = time.perf_counter() - start
        cpu1 = os.times()
        load = os.getloadavg()[0]
        rows.append(
            {
                "arch": args.arch,
                "backend": backend,
                "workers": 1 if backend == "serial" else args.workers,
                "regions": len(result.ok),
                "seconds": round(seconds, 1),
                "regions_per_min": round(60 * len(result.ok) / seconds, 2),
                "driver_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
                "load_avg_1min": round(load, 1),
                "cpu_count": os.cpu_count(),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    frame = pd.DataFrame(rows)
    out = RESULTS / "study_throughput.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, mode="a", header=not out.exists(), index=False)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()

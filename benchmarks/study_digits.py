"""The paper's many-region study on the digits models (VGG-, ResNet- and ViT-style).

For each architecture: train (or load the cached) digits classifier, draw regions with
the paper's protocol (2 random classes x 10 training images the model classifies
correctly with confidence >= 0.95), extract a NeuroChains chain per region and run
every metric (fidelity, faithfulness, quotient, stability on the test split as the
unseen pool, FGSM/PGD robustness, firing correlation). Results go to
``benchmarks/results/study_digits/<arch>/`` (resumable: run the same command again
after an interruption) and the paper's statistics to
``benchmarks/results/study_digits_summary.csv``; overlaid figures to
``benchmarks/results/study_digits/figures/``.

Digits config: the paper's penalties close every gate of these tiny models, so the studies
use per-architecture (l1, gate_penalty) chosen on small sweeps. The first wave (old Adam
schedule, ``--schedule paper-era``) used l1 = 0.05 / 0.02 with gate_penalty = 0.05 for the
VGG / ResNet and the ViT family defaults (0.0065, 0). The second wave (the package default
schedule: proximal Adam, lr 0.005, 300 + 50 steps, early stop, block gates only;
docs/defaults.md) converges further, and the penalties were re-tuned on the first 8 regions
(docs/metrics.md, "Digits studies"; sweep in ``benchmarks/results/study_digits_v2_sweep.csv``):
l1 = 0.03 (VGG), 0.025 (ResNet), both with gate_penalty = 0.05, and l1 = 0.06 for the ViT
(gate_penalty 0; a study-specific l1, about 9x its family default, which keeps 8 % of the ViT's
units with this schedule). The third wave fine-tunes the ResNet's and the ViT's chains for 300
steps (``DIGITS_FINETUNE``), which affords the ResNet l1 = 0.03 (docs/metrics.md, "Third
wave"; ``--regions-per-task 1`` for the ResNet, out ``benchmarks/results/study_digits_v3``).
The earlier waves' settings are recorded in their ``study.json`` files.

Second wave (the numbers of docs/metrics.md; 81 minutes in all on the shared 2-core CPU)::

    OMP_NUM_THREADS=1 python benchmarks/study_digits.py --arch vit --regions 100 \
        --metrics fidelity --out benchmarks/results/study_digits_v2 \
        > benchmarks/results/study_digits_v2_vit.log 2>&1

and the same with ``--arch vgg`` and ``--arch resnet``.

The first wave ran every metric with Ray (about an hour on the shared 2-core CPU; to
reproduce it, restore its penalties above and add ``--schedule paper-era``)::

    OMP_NUM_THREADS=1 nohup python benchmarks/study_digits.py --arch vgg resnet \
        --regions 100 --backend ray --workers 4 --regions-per-task 5 \
        > benchmarks/results/study_digits.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from captum_chains.studies import load_study, plot_study, run_study, sample_regions
from captum_chains.zoo import load_digits_data, train_digits_model

RESULTS = Path(__file__).parent / "results"
#: (l1, gate_penalty) per architecture for the digits models, second wave (re-tuned for the
#: default proximal schedule; sweep in docs/metrics.md, "Digits studies"). The ViT keeps its
#: family's gate_penalty 0 (docs/vit.md): with 0.05 every branch closed in some regions
#: (benchmarks/results/study_digits_vit_l1_0.02_gate_0.05/ keeps that run); its l1 is
#: study-specific (family default 0.0065).
DIGITS_PENALTIES = {"vgg": (0.03, 0.05), "resnet": (0.03, 0.05), "vit": (0.06, 0.0)}
#: Fine-tuning of the third wave (docs/metrics.md, "Digits studies"): the paper's 50 steps at
#: lr 0.01 move a score by at most 0.5, far from the KL's optimum on these tiny models, where
#: the thresholded chain's drop is mostly recovered by fine-tuning. 300 steps (VGG keeps the
#: paper's 50: its second-wave study already met its target); the ViT's chains stay below the
#: paper's KL trigger 0.1 while their drop is 0.07, so its study fine-tunes from KL 0.02.
DIGITS_FINETUNE = {
    "vgg": {},
    "resnet": {"finetune_steps": 300},
    "vit": {"finetune_steps": 300, "finetune_kl": 0.02},
}
#: The digits images are (x - 0.3) / 0.4 with x in [0, 1]: valid range and a 0.1 pixel budget.
LOWER, UPPER = (0 - 0.3) / 0.4, (1 - 0.3) / 0.4
EPSILON = 0.1 / 0.4


def digits_config(arch: str, l1: float | None = None, schedule: str = "default") -> dict:
    """The NeuroChains config of the digits studies."""
    default_l1, gate_penalty = DIGITS_PENALTIES[arch]
    config = {"l1": default_l1 if l1 is None else l1, "gate_penalty": gate_penalty}
    if schedule == "default":
        # the second and third waves ran 300 steps (the package default until 360), every
        # step on the whole model at lr (before free_rate and compact steps)
        config.update(steps=300, free_rate=1.0, compact_below=None, **DIGITS_FINETUNE[arch])
    if schedule == "paper-era":  # the first wave's studies
        config.update(
            optimizer="adam",
            lr=0.02,
            steps=80,
            finetune_steps=20,
            alpha_init=0.0,
            descent_steps=0,
            refine_lr=None,
            early_stop_delta=0.02,
            layer_gates=True,
            free_rate=1.0,
            compact_below=None,
        )
    return config


def run(arch: str, n_regions: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    data = load_digits_data()
    model = train_digits_model(arch)
    regions = sample_regions(model, data.x_train, data.y_train, n_regions=n_regions, seed=args.seed)
    out = Path(args.out) / arch
    start = time.perf_counter()
    result = run_study(
        model,
        regions,
        out,
        config=digits_config(arch, args.l1, args.schedule),
        metrics=tuple(args.metrics),
        pool=data.x_test,
        pool_labels=data.y_test,
        ks=(1, 5, 10, 20),
        epsilon=EPSILON,
        lower_bound=LOWER,
        upper_bound=UPPER,
        pgd_steps=10,
        backend=args.backend,
        num_workers=args.workers,
        regions_per_task=args.regions_per_task,
        retry_failed=args.retry_failed,
        progress=True,
    )
    seconds = time.perf_counter() - start
    summary = {"arch": arch, **result.summary(), "run_seconds": seconds}
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["vgg", "resnet"])
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l1", type=float, default=None)
    parser.add_argument("--backend", default="serial", choices=["serial", "ray"])
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--regions-per-task", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "study_digits"))
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed regions")
    parser.add_argument("--figures-only", action="store_true")
    parser.add_argument("--schedule", default="default", choices=["default", "paper-era"])
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["fidelity", "faithfulness", "quotient", "stability", "robustness", "firing"],
        help="metrics to run (fidelity always runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.figures_only:
        for arch in args.arch:
            run(arch, args.regions, args)
    write_report(Path(args.out))


def write_report(root: Path) -> None:
    """Summary CSV and overlaid figures of every finished architecture under ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    studies = {
        folder.name: load_study(folder)
        for folder in sorted(root.iterdir())
        if (folder / "study.json").exists()
    }
    if not studies:
        return
    rows = [{"arch": name, **res.summary()} for name, res in studies.items()]
    frame = pd.DataFrame(rows)
    frame.to_csv(root.parent / f"{root.name}_summary.csv", index=False)
    plot_study(studies, save_dir=root / "figures")
    print(frame.T.to_string(), flush=True)


if __name__ == "__main__":
    main()

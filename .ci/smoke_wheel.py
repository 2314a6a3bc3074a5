"""Smoke test of an installed wheel (run by .ci/run from a temporary folder).

The wheel is installed with the ``viz`` extra only, so this also checks that the light core
and the report need nothing else, and that a feature of another extra fails with an error
that names it. Exits non-zero on any failure.

    python .ci/smoke_wheel.py SOURCE_TREE
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def main(source_tree: Path) -> None:
    import captum_chains

    where = Path(captum_chains.__file__).resolve()
    if source_tree.resolve() in where.parents:
        raise SystemExit(f"captum_chains was imported from the source tree ({where})")
    print(f"captum-chains {captum_chains.__version__} from {where.parent}")
    if "torch" in sys.modules:
        raise SystemExit("import captum_chains imported torch")

    import torch
    from torch import nn

    from captum_chains import Chain, ChainExtractor
    from captum_chains._utils.optional import MissingDependencyError

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    x = torch.randn(5, 3, 16, 16)
    chain = ChainExtractor(model, steps=8, finetune_steps=2).attribute(x, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = Chain.load(chain.save(Path(tmp) / "chain"), model)
        for name, scores in chain.importance.items():
            if not torch.equal(scores, loaded.importance[name]):
                raise SystemExit(f"Chain.save/load changed the scores of {name}")
        page = chain.report(Path(tmp) / "chain.html", filter_steps=4, max_filters=1, strict=True)
        text = page.read_text()
        if text.count("data:image/png;base64,") < 7:
            raise SystemExit("the report lacks figures")
    print(f"chain: {chain.num_filters}/{chain.total_filters} units; save/load and report ok")

    try:
        chain.history_frame()  # pandas comes with the studies extra, not installed here
    except MissingDependencyError as err:
        if "captum-chains[studies]" not in str(err):
            raise SystemExit(f"the error does not name the extra: {err}") from err
        print(f"missing extra reported: {err}")
    else:
        raise SystemExit("pandas is installed: the smoke venv should hold the viz extra only")

    script = Path(sys.executable).with_name("captum-chains")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    if result.returncode != 0 or "report" not in result.stdout:
        raise SystemExit(f"captum-chains --help failed: {result.stderr}")
    print("captum-chains --help ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))

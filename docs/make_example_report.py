"""Regenerate docs/_static/example_report.html (linked from docs/report.md).

OMP_NUM_THREADS=1 python docs/make_example_report.py      # about a minute on 2 CPU cores
"""

import torch

from captum_chains import ChainExtractor
from captum_chains.zoo import load_digits_data, train_digits_model


def denormalize(t: torch.Tensor) -> torch.Tensor:
    """Digits inputs back to [0, 1] (load_digits_data normalizes with (x - 0.3) / 0.4)."""
    return (t * 0.4 + 0.3).clamp(0, 1)


model = train_digits_model("vgg")
data = load_digits_data()
x = data.x_train[data.y_train == 3][:12]
torch.manual_seed(0)
chain = ChainExtractor(model, steps=60, gate_penalty=0.05).attribute(x, progress=False, seed=0)
chain.report(
    "docs/_static/example_report.html",
    title="Chain of the digits VGG on twelve 3s",
    max_inputs=2,
    max_filters=3,
    filter_steps=64,
    denormalize=denormalize,
    class_names=[str(i) for i in range(10)],
    strict=True,
)

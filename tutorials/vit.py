# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # NeuroChains on a vision transformer
#
# NeuroChains (Wang, Zhou and Bilmes, TMLR 2022) extracts the sub-network that carries a
# model's decision on a small region of inputs. On a ViT its units are **attention heads**
# (a score multiplies one head's output before the output projection), **MLP hidden
# neurons** (a score after the activation of `fc1`) and **embedding channels** of the patch
# embedding; its gates sit on each **residual branch** (attention and MLP) of each block,
# so a whole branch or block can be removed (Eq. 7 with the residual stream as H).
#
# We use the small ViT that `captum_chains.zoo` trains on scikit-learn's 8x8 digits
# (upsampled to 32x32: 4 blocks of 4 heads, embedding 64, patch 4). It is cached after
# the first training (about 100 s on one CPU core); everything else takes seconds.

# %%
import torch

from captum_chains import ChainExtractor, SubNetwork
from captum_chains.units import discover, token_layout
from captum_chains.zoo import load_digits_data, train_digits_model

torch.set_num_threads(1)
torch.manual_seed(0)
vit = train_digits_model("vit")
data = load_digits_data()

# %% [markdown]
# ## What NeuroChains scores in a ViT
#
# Discovery runs one traced forward pass and reads heads, head size, tokens and branches
# from the model itself.

# %%
x = data.x_test[:2]
structure = discover(vit, (x,))
print("family:", structure.family)
for unit in structure.units:
    print(
        f"{unit.kind:8s} {unit.name:24s} {unit.size:4d} units at the {unit.hook} of {unit.site}"
        f" (width {unit.unit_width})"
    )
for gate in structure.gates:
    print(f"gate {gate.name:16s} scales the output of {gate.end}")
print(token_layout(vit, x))

# %% [markdown]
# ## A chain for a two-class region
#
# Ten test images of a 3 and ten of an 8. `ChainExtractor` recognises the ViT family and
# uses its penalties (`FAMILY_PENALTIES["vit"]`: lambda = 0.0065, lambda_g = 0), chosen
# by the sweep in `benchmarks/vit_sweep.py` (see `docs/vit.md`).

# %%
threes = data.x_test[data.y_test == 3][:10]
eights = data.x_test[data.y_test == 8][:10]
region = torch.cat([threes, eights])
extractor = ChainExtractor(vit)
chain = extractor.attribute(region, progress=False, seed=0)
print(chain.summary())

# %% [markdown]
# Which heads survived in each block, and how faithful is the sub-network?

# %%
for unit in chain.structure.units:
    if unit.kind == "head":
        kept = torch.nonzero(chain.kept[unit.name]).flatten().tolist()
        print(f"{unit.name}: heads {kept} kept")
with torch.no_grad():
    p = vit(region).softmax(1)
    q = chain.subnetwork(region).softmax(1)
pred = p.argmax(1)
print(f"top-1 agreement {float((q.argmax(1) == pred).float().mean()):.2f}")
drop = (p.gather(1, pred[:, None]) - q.gather(1, pred[:, None])).mean()
print(f"mean drop of the predicted-class probability {float(drop):.3f}, KL {chain.kl:.4f}")

# %% [markdown]
# ## A physically smaller model
#
# The export drops removed heads (their rows of `qkv`, columns of `proj`, and the head
# itself) and MLP neurons (rows of `fc1`, columns of `fc2`), folds the scores into the
# weights and skips removed branches. It is checked against the SubNetwork.

# %%
small = chain.subnetwork.export(check_inputs=region)
print(small.report)
removed = set(chain.subnetwork.removed_gates)
for i in range(4):
    attn = f"blocks.{i}.attn"
    heads = 0 if attn in removed else small.get_submodule(f"{attn}.core").num_heads
    print(f"block {i}: {heads} heads in the export")

# %% [markdown]
# SubNetworks save to safetensors and load back onto the same architecture.

# %%
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "vit_chain.safetensors"
    chain.subnetwork.save(path)
    loaded = SubNetwork.load(path, vit)
with torch.no_grad():
    print("reloaded equal:", torch.equal(loaded(region), chain.subnetwork(region)))

# %% [markdown]
# ## torchvision ViTs
#
# `torchvision.models.VisionTransformer` uses `nn.MultiheadAttention`, whose `out_proj` is
# never called as a module; its heads are scored through a dedicated hook (see
# `docs/vit.md`). Discovery is the same call:

# %%
import torchvision  # noqa: E402

tv = torchvision.models.VisionTransformer(
    image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
).eval()
tv_structure = discover(tv, (torch.randn(1, 3, 32, 32),))
print([(u.name, u.kind, u.size) for u in tv_structure.units])

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
# # Your own model: discovery and an adapter
#
# NeuroChains scores *units* (Eq. 3) and gates *layers and blocks* (Eq. 6-7).
# `captum-chains` finds them from one traced forward pass, by module types and dataflow
# ({doc}`../howto_custom_model` lists the rules). This tutorial builds a small network
# with a building block the generic rules cannot see, shows what discovery finds, writes
# an adapter for the block, checks it, and extracts a chain on handwritten digits.
#
# Everything runs on a CPU in well under a minute.

# %%
import torch
import torch.nn.functional as F
from torch import nn

from captum_chains import ChainExtractor, discover
from captum_chains.zoo import load_digits_data

torch.manual_seed(0)
torch.set_num_threads(1)

# %% [markdown]
# ## A network with a custom convolution
#
# `WSConv` is a weight-standardized 3x3 convolution written with `F.conv2d` (as some
# normalizer-free networks do). It is *not* an `nn.Conv2d`, so the generic rules do not
# know it holds filters. Residual blocks built from it add their input in their own
# `forward`.


# %%
class WSConv(nn.Module):
    """3x3 convolution with weight standardization, written with F.conv2d."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, padding=1)


class Block(nn.Module):
    """relu(x + norm(conv(relu(norm(conv(x))))))"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.norm1 = WSConv(channels, channels), nn.BatchNorm2d(channels)
        self.conv2, self.norm2 = WSConv(channels, channels), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(h)))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)  # an ordinary conv
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.block2 = Block(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(torch.relu(self.bn(self.stem(x))))
        x = self.block2(torch.relu(self.bn2(self.down(F.max_pool2d(x, 2)))))
        return self.head(x.mean(dim=(2, 3)))


# %% [markdown]
# Train it for three epochs on scikit-learn's digits (32x32, bundled with scikit-learn;
# nothing is downloaded).

# %%
data = load_digits_data()
model = TinyNet()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(0)
for _ in range(3):
    model.train()
    for idx in torch.randperm(len(data.y_train), generator=generator).split(32):
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()
with torch.no_grad():
    accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean()
print(f"test accuracy {accuracy:.3f}")

# %% [markdown]
# ## What the generic rules find
#
# {func}`~captum_chains.units.discovery.discover` runs one traced forward pass (the model
# is left unchanged) and returns a {class}`~captum_chains.units.base.ModelStructure`.

# %%
x = data.x_test[:2]


def show(structure):
    print(f"family {structure.family!r}, {structure.total_units} units")
    for u in structure.units:
        print(f"  unit layer {u.name:<14} {u.kind:<7} {u.size:>3} scored at {u.site} ({u.hook})")
    for g in structure.gates:
        print(f"  gate {g.name:<10} {g.kind:<6} removes {list(g.units)}")


show(discover(model, (x,)))

# %% [markdown]
# Only the two `nn.Conv2d` layers are found. The four `WSConv` layers, which hold most of
# the filters, are invisible, and so the residual blocks get no gates either: a block is
# gated only when it contains unit layers.
#
# ## An adapter for `WSConv`
#
# An adapter is a function `(model, trace) -> AdapterResult | None`. For every `WSConv`
# that ran exactly once it declares a layer of filters, scored after the normalization
# that reads its output (as Eq. 3 asks; the trace records which module consumed which
# tensor), and *claims* the module so that the generic rules skip it.

# %%
from captum_chains.units.adapters import ADAPTERS, AdapterResult
from captum_chains.units.base import UnitLayer

NORMS = (nn.BatchNorm2d, nn.GroupNorm)


def wsconv_adapter(model: nn.Module, trace) -> AdapterResult | None:
    found = AdapterResult()
    for name, module in model.named_modules():
        if not isinstance(module, WSConv):
            continue
        call = trace.single_call(name)  # None if it ran zero or several times
        if call is None:
            continue
        readers = trace.consumers(call.output_id)
        norm = readers[0] if readers and isinstance(readers[0].module, NORMS) else None
        site = norm if norm is not None else call
        found.units.append(
            UnitLayer(
                name=name,
                kind="filter",
                size=module.out_channels,
                site=site.name,
                hook="output",
                channel_dim=1,
                module_type="WSConv",
                spatial=tuple(site.output_shape[2:]),
            )
        )
        found.claimed.add(name)
    return found if found.units else None


ADAPTERS.append(wsconv_adapter)
structure = discover(model, (x,))
show(structure)

# %% [markdown]
# All six layers are found now, each `WSConv` scored after its BatchNorm, and both
# residual blocks got a `block` gate from the generic rule (they preserve their input's
# shape and add it to something), so the family is "residual".
#
# ## Check the adapter
#
# Two properties of the masking make an adapter easy to test. A sub-network with every
# score 1 and every gate open is the model, bit for bit; and a zero score removes exactly
# its channel at the declared site.

# %%
from captum_chains.subnetwork import subnetwork_from_mappings

x = data.x_test[:8]
ones = {u.name: torch.ones(u.size) for u in structure.units}
with torch.no_grad():
    same = torch.equal(subnetwork_from_mappings(model, structure, ones)(x), model(x))
print("scores of 1 reproduce the model exactly:", same)

scores = dict(ones, **{"block1.conv2": torch.ones(16).index_fill(0, torch.tensor([5]), 0.0)})


def zero_channel_5(module, args, output):
    output = output.clone()
    output[:, 5] = 0
    return output


handle = model.block1.norm2.register_forward_hook(zero_channel_5)
try:
    with torch.no_grad():
        by_hand = model(x)
finally:
    handle.remove()
with torch.no_grad():
    masked = subnetwork_from_mappings(model, structure, scores)(x)
print("a zero score removes exactly that filter:", torch.equal(masked, by_hand))

# %% [markdown]
# ## Extract a chain
#
# A local region: ten test images of one digit that the model classifies correctly. The
# paper's gate penalty closes every gate of such a tiny network, so we use a smaller one
# (`gate_penalty=0.05`, see {doc}`../neurochains`). The weight-standardized convolutions
# compute their weights in `forward`, which the export's channel surgery treats as opaque,
# so the steps cannot run on a compact copy of the live filters (the default would say so
# in a warning and run every step on the whole model): `compact_below=None` asks for that
# directly.

# %%
from captum_chains._utils.model_state import ModelSnapshot

with torch.no_grad():
    correct = model(data.x_test).argmax(1) == data.y_test
region = data.x_test[(data.y_test == 3) & correct][:10]
snapshot = ModelSnapshot.take(model)
chain = ChainExtractor(model, gate_penalty=0.05, compact_below=None).attribute(
    region, progress=False, seed=0
)
snapshot.assert_unchanged(model)  # weights, buffers, hooks, modes: untouched
print(chain.summary())

# %%
with torch.no_grad():
    p, q = model(region).softmax(1), chain.subnetwork(region).softmax(1)
agreement = (p.argmax(1) == q.argmax(1)).float().mean()
print(
    f"top-1 agreement {agreement:.2f}; mean probability of the digit: "
    f"model {p[:, 3].mean():.3f}, sub-network {q[:, 3].mean():.3f}"
)

# %% [markdown]
# The chain skips `block2` entirely, while most filters of the layers it keeps matter on
# such a small, well-trained network. `chain.gates` holds the soft gate values that
# decided it:

# %%
print(chain.gates)

# %% [markdown]
# Remove the adapter when you are done experimenting (in a package, register it once at
# import time, next to the module it describes, as {mod}`captum_chains.units.vit` does).

# %%
ADAPTERS.remove(wsconv_adapter)

# %% tags=["remove-cell"]
# ruff: noqa: E402 (a tutorial imports where it first needs something)

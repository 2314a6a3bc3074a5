"""InteractionPrimitives on a text model (embeddings) and a tabular model trained here.

The text task is an XOR of two keywords: the log-odds must then be non-additive in them,
``v ≈ c (OR{A, B} - AND{A, B})``, and two independently trained models must share that
interaction. (An AND task would not do: a logistic model writes AND of two binary
inputs as an additive log-odds ``a [A] + b [B] - c``.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.interactions import InteractionPrimitives, SolverConfig, token_mask

PAD, TOK_A, TOK_B, VOCAB, LENGTH = 0, 1, 2, 8, 6
FAST = SolverConfig(iterations=1500)


class EmbeddingClassifier(nn.Module):
    """Takes token embeddings ``[B, L, D]``; mean-pools and classifies with an MLP."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(emb.mean(dim=1))


def _text_data(count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Filler tokens (PAD, 3..7); A and B each inserted with probability 0.5; label = A xor B.

    PAD is an ordinary filler during training, so replacing a token by PAD (the masking
    baseline) is in-distribution.
    """
    fillers = torch.tensor([PAD, 3, 4, 5, 6, 7])
    ids = fillers[torch.randint(0, len(fillers), (count, LENGTH), generator=gen)]
    has_a = torch.rand(count, generator=gen) < 0.5
    has_b = torch.rand(count, generator=gen) < 0.5
    for i in range(count):
        pa, pb = torch.randperm(LENGTH, generator=gen)[:2].tolist()
        if has_a[i]:
            ids[i, pa] = TOK_A
        if has_b[i]:
            ids[i, pb] = TOK_B
    return ids, (has_a ^ has_b).long()


def _train_text(seed: int) -> tuple[nn.Embedding, EmbeddingClassifier]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb, clf = nn.Embedding(VOCAB, 8), EmbeddingClassifier()
    opt = torch.optim.Adam([*emb.parameters(), *clf.parameters()], lr=1e-2)
    for _ in range(150):
        ids, y = _text_data(128, gen)
        loss = nn.functional.cross_entropy(clf(emb(ids)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return emb.eval(), clf.eval()


@pytest.fixture(scope="module")
def text_models() -> list[tuple[nn.Embedding, EmbeddingClassifier]]:
    return [_train_text(0), _train_text(1)]


def test_text_models_learned_the_task(text_models) -> None:
    ids, y = _text_data(400, torch.Generator().manual_seed(99))
    for emb, clf in text_models:
        with torch.no_grad():
            acc = (clf(emb(ids)).argmax(1) == y).float().mean()
        assert float(acc) > 0.95


def test_text_and_interaction_of_the_two_keywords(text_models) -> None:
    emb, clf = text_models[0]
    ids = torch.tensor([[4, TOK_A, 5, 6, TOK_B, 3]])
    snap = ModelSnapshot.take(clf)
    with torch.no_grad():
        x = emb(ids)
        base = emb(torch.tensor([[PAD]]))  # [1, 1, D]: the baseline embedding of a masked token
    names = ["w0", "A", "w2", "w3", "B", "w5"]
    res = InteractionPrimitives(clf).attribute(
        x,
        baselines=base,
        target=1,
        feature_mask=token_mask(LENGTH),
        player_names=names,
        solver=FAST,
        progress=False,
    )
    snap.assert_unchanged(clf)
    top_and, top_or = res.top("and", k=1)[0], res.top("or", k=1)[0]
    assert top_and.players == ("A", "B") and top_and.value < 0
    assert top_or.players == ("A", "B") and top_or.value > 0
    # everything else is small: the two primitives carry > 85 % of the total strength
    total = res.interactions("and").abs().sum() + res.interactions("or").abs().sum()
    assert float((abs(top_and.value) + top_or.value) / total) > 0.85
    assert float(res.relative_reconstruction_error.max()) <= 0.02 + 1e-9


def test_two_text_models_share_the_keyword_interaction(text_models) -> None:
    ids = torch.tensor([[TOK_A, 6, 4, TOK_B, 7, 3], [5, 3, TOK_B, 6, TOK_A, 4]])
    # different embedding tables: mask token ids (baseline PAD) and embed inside the model
    funcs = [nn.Sequential(emb, clf).eval() for emb, clf in text_models]
    res = InteractionPrimitives(funcs).attribute(
        ids,
        baselines=PAD,
        target=1,
        feature_mask=torch.arange(LENGTH)[None],
        salient_count=3,
        solver=FAST,
        progress=False,
    )
    assert res.method == "shared"
    keyword_pairs = [res.subset_of([0, 3]), res.subset_of([2, 4])]
    for kind in ("and", "or"):
        shared = res.shared(kind)
        for b, pair in enumerate(keyword_pairs):
            assert bool(shared[b, pair])
    listed = res.shared_interactions("or", sample=1)
    assert listed[0].players == ("2", "4")  # by index


class TabularNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_tabular_model_and_of_two_features() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(2048, 5, generator=gen)
    y = ((x[:, 0] > 0) & (x[:, 1] > 0)).float()
    model = TabularNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    sample = torch.tensor([[1.5, 1.2, 0.3, -0.7, 0.9]])
    names = [f"f{i}" for i in range(5)]
    res = InteractionPrimitives(model).attribute(
        sample,
        baselines=x.mean(0, keepdim=True),
        feature_mask=torch.arange(5),
        player_names=names,
        solver=FAST,
        progress=False,
    )  # one logit: v is the logit itself (log-odds of class 1), target None
    top = res.top("and", k=1)[0]
    assert top.players == ("f0", "f1") and top.value > 0

"""The user's model is shared state: threads extracting on it, or running it, never interfere."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import make_inputs, make_model

from captum_chains import ChainExtractor, ConcurrentUseError
from captum_chains._utils.model_state import ModelSnapshot, eval_mode

FAST = {"steps": 25, "finetune_steps": 3, "l1": 0.05, "early_stop_min_steps": 25}


def _in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` in threads that start together; return results or raised exceptions."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


@contextmanager
def _used_by_another_thread(model: torch.nn.Module) -> Iterator[None]:
    """While open, another thread runs ``model`` inside ``eval_mode``."""
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with eval_mode(model):
            inside.set()
            release.wait(timeout=60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(timeout=60)
        yield
    finally:
        release.set()
        thread.join(timeout=60)


def _extract(model: torch.nn.Module, x: torch.Tensor):
    return ChainExtractor(model, **FAST).attribute(x, progress=False)


@pytest.mark.parametrize("family", ["plain", "residual", "depthwise"])
def test_threads_extracting_on_one_model_get_the_serial_result(family: str) -> None:
    model = make_model(family, width=4, seed=1)
    inputs = [make_inputs(n=4, seed=s) for s in range(3)]
    snapshot = ModelSnapshot.take(model)
    serial = [_extract(model, x) for x in inputs]
    for _ in range(2):
        results = _in_threads([lambda x=x: _extract(model, x) for x in inputs])
        for chain, reference in zip(results, serial):
            assert not isinstance(chain, BaseException), repr(chain)
            assert chain.importance.keys() == reference.importance.keys()
            for name, scores in reference.importance.items():
                torch.testing.assert_close(chain.importance[name], scores, rtol=1e-5, atol=1e-6)
            assert chain.gates == reference.gates
            assert chain.num_filters == reference.num_filters
        snapshot.assert_unchanged(model)


def test_the_plain_model_is_unaffected_while_a_subnetwork_runs_in_another_thread() -> None:
    model = make_model("residual", width=4, seed=2)
    x = make_inputs(n=4, seed=3)
    chain = _extract(model, x)
    with torch.no_grad():
        expected, expected_sub = model(x), chain.subnetwork(x)
    assert not torch.allclose(expected, expected_sub)  # the masks change the outputs
    calls = 150

    def plain() -> int:
        wrong = 0
        with torch.no_grad():
            for _ in range(calls):
                wrong += not torch.equal(model(x), expected)
        return wrong

    def masked() -> int:
        wrong = 0
        with torch.no_grad():
            for _ in range(calls):
                wrong += not torch.equal(chain.subnetwork(x), expected_sub)
        return wrong

    snapshot = ModelSnapshot.take(model)
    assert _in_threads([plain, masked]) == [0, 0]
    snapshot.assert_unchanged(model)


def test_a_training_mode_model_is_refused_to_a_second_thread_never_corrupted() -> None:
    model = make_model("plain", width=4, seed=4).train()
    x = make_inputs(n=4, seed=5)
    snapshot = ModelSnapshot.take(model)
    with _used_by_another_thread(model):
        assert not model.training  # the other thread switched it to eval mode
        with pytest.raises(ConcurrentUseError, match=r"model\.eval\(\)"):
            _extract(model, x)
        assert not model.training  # still the holder's eval mode: nothing was undone under it
    assert model.training
    snapshot.assert_unchanged(model)
    # alone, the same call works and leaves the model in training mode
    _extract(model, x)
    snapshot.assert_unchanged(model)


def test_an_eval_mode_model_is_shared_without_any_change() -> None:
    model = make_model("plain", width=4, seed=6)
    inside = []
    with eval_mode(model):
        results = _in_threads([lambda: _enter(model, inside)] * 2)
    assert results == [None, None] and inside == [False, False]


def _enter(model: torch.nn.Module, record: list[bool]) -> None:
    with eval_mode(model):
        record.append(model.training)


def test_extraction_never_writes_parameter_gradients() -> None:
    model = make_model("residual", width=4, seed=7)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    snapshot = ModelSnapshot.take(model)
    _extract(model, make_inputs(n=4, seed=8))
    snapshot.assert_unchanged(model)
    assert all(p.requires_grad for p in model.parameters())


def test_a_cast_subnetwork_refuses_to_swap_tensors_under_another_thread() -> None:
    model = make_model("plain", width=4, seed=9)
    x = make_inputs(n=4, seed=10)
    sub = _extract(model, x).subnetwork
    sub.double()
    with _used_by_another_thread(model), pytest.raises(ConcurrentUseError, match="another thread"):
        sub(x.double())
    assert sub(x.double()).dtype == torch.float64  # alone, it runs


def test_copies_and_pickles_taken_during_a_fold_are_plain_models() -> None:
    import copy
    import io

    from captum_chains._utils.norm_fold import folded_norms
    from captum_chains.masking import MaskState, apply_masks

    model = make_model("residual", width=4, seed=11)
    x = make_inputs(n=2, seed=12)
    with torch.no_grad():
        expected = model(x)
    classes = {name: type(m) for name, m in model.named_modules()}
    structure = ChainExtractor(model).discover(x)
    state = MaskState(scores={u.name: torch.full((u.size,), 0.5) for u in structure.units})
    with apply_masks(model, structure, state, fold_norms=True):
        assert any(type(m) is not classes[n] for n, m in model.named_modules())  # folding
        twin = copy.deepcopy(model)  # carries the masking hooks, which ignore the copy
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    with folded_norms({m: lambda: None for m in norms.values()}):  # the fold alone: no hooks
        assert all(type(m) is not classes[n] for n, m in norms.items())
        buffer = io.BytesIO()
        torch.save(model, buffer)
    buffer.seek(0)
    for other in (twin, torch.load(buffer, weights_only=False)):
        assert {name: type(m) for name, m in other.named_modules()} == classes
        with torch.no_grad():
            assert torch.equal(other(x), expected)
    assert {name: type(m) for name, m in model.named_modules()} == classes

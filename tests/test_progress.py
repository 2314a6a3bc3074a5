"""The progress-bar factory never warns where the notebook widget cannot be drawn."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest
import tqdm.std

import captum_chains._utils.progress as progress


@pytest.fixture
def reload_progress():
    yield
    importlib.reload(progress)


def test_text_bar_and_no_warning_without_ipywidgets(monkeypatch, reload_progress):
    real = importlib.util.find_spec

    def no_ipywidgets(name, *args, **kwargs):
        return None if name == "ipywidgets" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_ipywidgets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(progress)
    assert progress.tqdm is tqdm.std.tqdm


def test_auto_bar_with_ipywidgets(monkeypatch, reload_progress):
    pytest.importorskip("ipywidgets")
    import tqdm.auto

    importlib.reload(progress)
    assert progress.tqdm is tqdm.auto.tqdm

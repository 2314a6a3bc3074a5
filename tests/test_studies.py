"""Studies: region sampling, the runner's tables, resume after a crash, failures, Ray."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import captum_chains.studies.runner as runner_module
from captum_chains._utils.model_state import ModelSnapshot
from captum_chains.metrics import faithfulness, fidelity, prediction_quotient, stability
from captum_chains.studies import (
    FIGURES,
    Region,
    StudySettings,
    as_regions,
    load_study,
    plot_study,
    run_study,
    sample_regions,
)

# Columns that legitimately differ between two runs of the same study.
VOLATILE = {"worker", "extract_s", "metrics_s", "traceback"}


def tiny_model(seed: int = 0) -> nn.Sequential:
    """Built from torch modules only, so that Ray workers can unpickle it."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_var.copy_(0.5 + torch.rand(4))
            bn.bias.copy_(0.3 * torch.randn(4))
    return model.eval()


def data(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def tiny_regions(k: int = 3, n: int = 4) -> list[Region]:
    return [Region(f"reg{i}", data(10 + i, n), torch.tensor([i % 3] * n)) for i in range(k)]


# free_rate 1: six steps at lr 0.05 keep some filters of the tiny model (10x would remove all)
CONFIG = {"steps": 6, "lr": 0.05, "finetune_steps": 2, "gate_penalty": 0.05, "free_rate": 1.0}
KW = {"config": CONFIG, "ks": (1, 3), "pgd_steps": 2, "epsilon": 0.2, "progress": False}


def stable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c in VOLATILE]).reset_index(drop=True)


def assert_same_tables(a, b, rtol: float = 0.0) -> None:
    for name in ("regions", "filters", "inputs", "stability"):
        left, right = stable(getattr(a, name)), stable(getattr(b, name))
        if rtol == 0:
            pd.testing.assert_frame_equal(left, right, check_exact=True)
        else:
            pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=rtol, atol=1e-6)


# --------------------------------------------------------------------------- regions


def test_sample_regions_follows_the_protocol_and_is_reproducible():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()  # balanced predictions
    x = data(0, 300)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    conf, pred = p.max(1)
    labels = pred.clone()
    labels[:30] = (labels[:30] + 1) % 3  # misclassified inputs are never drawn
    threshold = float(conf.median())
    regions = sample_regions(
        model, x, labels, n_regions=5, per_class=4, min_confidence=threshold, seed=3
    )
    assert len(regions) == 5
    for r in regions:
        assert len(r.classes) == 2 and r.inputs.shape == (8, 1, 8, 8)
        idx = torch.tensor(r.indices)
        assert torch.equal(r.inputs, x[idx])
        assert bool((pred[idx] == labels[idx]).all()) and bool((conf[idx] >= threshold).all())
        assert sorted(set(labels[idx].tolist())) == list(r.classes)
        assert [labels[idx].tolist().count(c) for c in r.classes] == [4, 4]
        assert len(set(r.indices)) == 8
    again = sample_regions(
        model, x, labels, n_regions=2, per_class=4, min_confidence=threshold, seed=3
    )
    assert [r.indices for r in again] == [r.indices for r in regions[:2]]
    with pytest.raises(ValueError, match="classes have"):
        sample_regions(model, x, labels, n_regions=1, per_class=200)


def test_bad_regions_get_clear_errors():
    with pytest.raises(ValueError, match="1 input"):
        as_regions([data(0, 1)])
    with pytest.raises(ValueError, match="appears twice"):
        as_regions([Region("a", data(0, 2)), Region("a", data(1, 2))])
    with pytest.raises(ValueError, match="safe file name"):
        as_regions([Region("../x", data(0, 2))])
    with pytest.raises(ValueError, match="empty"):
        as_regions([])
    with pytest.raises(ValueError, match="labels"):
        as_regions([Region("a", data(0, 3), torch.tensor([0, 1]))])
    assert [r.region_id for r in as_regions([data(0, 2), data(1, 2)])] == ["r0000", "r0001"]
    assert [r.region_id for r in as_regions({"x": data(0, 2)})] == ["x"]


def test_run_study_bad_input(tmp_path):
    model = tiny_model()
    regions = tiny_regions(1)
    with pytest.raises(ValueError, match="1 input"):
        run_study(model, [data(0, 1)], tmp_path / "a", pool=data(1, 8), **KW)
    with pytest.raises(ValueError, match="pool of unseen"):
        run_study(model, regions, tmp_path / "b", **KW)
    with pytest.raises(ValueError, match="shape"):
        run_study(model, regions, tmp_path / "c", pool=torch.randn(8, 1, 9, 9), **KW)
    with pytest.raises(ValueError, match="exceed the pool"):
        run_study(model, regions, tmp_path / "d", pool=data(1, 2), **KW)
    with pytest.raises(ValueError, match="epsilon"):
        run_study(model, regions, tmp_path / "e", pool=data(1, 8), **{**KW, "epsilon": -1.0})
    with pytest.raises(ValueError, match="unknown metric"):
        StudySettings(metrics=("accuracy",))
    with pytest.raises(ValueError, match="backend"):
        run_study(model, regions, tmp_path / "f", pool=data(1, 8), backend="dask", **KW)


# --------------------------------------------------------------------------- runner


def test_study_tables_agree_with_the_metrics_on_the_saved_subnetworks(tmp_path):
    model = tiny_model(2)
    pool, pool_labels = data(50, 12), torch.arange(12) % 3
    snap = ModelSnapshot.take(model)
    result = run_study(
        model, tiny_regions(), tmp_path / "s", pool=pool, pool_labels=pool_labels, **KW
    )
    snap.assert_unchanged(model)
    assert result.regions["status"].tolist() == ["ok"] * 3
    assert len(result.inputs) == 12 and len(result.stability) == 6
    for region in tiny_regions():
        row = result.regions.set_index("region_id").loc[region.region_id]
        sub = result.subnetwork(region.region_id, model)
        assert row["num_filters"] == sub.num_filters
        fid = fidelity(sub, region.inputs)
        assert row["fidelity_mean_drop"] == pytest.approx(fid.mean_drop, abs=1e-6)
        assert row["fidelity_agreement"] == pytest.approx(fid.agreement_rate)
        fa = faithfulness(sub, region.inputs)
        filters = result.filters[result.filters["region_id"] == region.region_id]
        assert len(filters) == sub.num_filters
        np.testing.assert_allclose(filters["degradation"], fa.table["degradation"], atol=1e-6)
        if not np.isnan(fa.pearson):
            assert row["faithfulness_pearson"] == pytest.approx(fa.pearson, abs=1e-6)
        q = prediction_quotient(sub, region.inputs)
        inputs = result.inputs[result.inputs["region_id"] == region.region_id]
        np.testing.assert_allclose(inputs["quotient"], q.numpy(), atol=1e-6)
        st = stability(sub, pool, region.inputs, ks=(1, 3))
        assert row["stability_k3"] == pytest.approx(st.agreement(3))
    summary = result.summary(ks=(1, 3))
    assert summary["regions"] == 3 and summary["failed"] == 0
    assert summary["median_kept_percent"] == pytest.approx(
        100 * float(np.median(result.regions["kept_fraction"]))
    )
    assert "robustness_pgd_gap" in summary and "stability_k3" in summary
    reloaded = load_study(tmp_path / "s")
    assert_same_tables(result, reloaded)


def test_resume_after_a_crash_gives_the_uninterrupted_table(tmp_path, monkeypatch):
    model = tiny_model(3)
    pool = data(60, 10)
    reference = run_study(model, tiny_regions(), tmp_path / "full", pool=pool, **KW)

    calls: list[str] = []
    original = runner_module.process_regions

    def crashing(model, group, *args, **kwargs):
        calls.append(group[0].region_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the study is killed while the 2nd region runs
        return original(model, group, *args, **kwargs)

    monkeypatch.setattr(runner_module, "process_regions", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_study(model, tiny_regions(), tmp_path / "crash", pool=pool, **KW)
    parts = tmp_path / "crash" / "parts"
    assert sorted(p.name for p in parts.iterdir()) == ["reg0"]
    # a half-written region folder, as a kill during a write would leave it
    half = parts / ".tmp-reg1-deadbeef"
    half.mkdir()
    (half / "filters.parquet").write_bytes(b"PAR1 truncated")
    assert load_study(tmp_path / "crash").regions["region_id"].tolist() == ["reg0"]

    calls.clear()

    def counting(model, group, *args, **kwargs):
        calls.append(group[0].region_id)
        return original(model, group, *args, **kwargs)

    monkeypatch.setattr(runner_module, "process_regions", counting)
    resumed = run_study(model, tiny_regions(), tmp_path / "crash", pool=pool, **KW)
    assert calls == ["reg1", "reg2"]  # the finished region was not recomputed
    assert not half.exists()
    assert_same_tables(reference, resumed)

    calls.clear()
    again = run_study(model, tiny_regions(), tmp_path / "crash", pool=pool, **KW)
    assert calls == []
    assert_same_tables(reference, again)


def test_a_failing_region_is_recorded_and_the_study_goes_on(tmp_path):
    model = tiny_model(4)
    regions = [*tiny_regions(2), Region("broken", torch.randn(4, 3, 8, 8))]
    result = run_study(model, regions, tmp_path / "s", pool=data(1, 8), fmt="csv", **KW)
    status = result.regions.set_index("region_id")["status"]
    assert status.to_dict() == {"reg0": "ok", "reg1": "ok", "broken": "error"}
    row = result.failed.iloc[0]
    assert "channels" in row["error"] and "Traceback" in row["traceback"]
    assert (tmp_path / "s" / "regions.csv").exists()
    assert result.summary(ks=(1, 3))["failed"] == 1

    calls: list[str] = []
    original = runner_module.process_regions

    def spy(model, group, *a, **k):
        calls.append(group[0].region_id)
        return original(model, group, *a, **k)

    import captum_chains.studies.runner as rm

    rm.process_regions = spy
    try:
        run_study(model, regions, tmp_path / "s", pool=data(1, 8), fmt="csv", **KW)
        assert calls == []  # failures are final unless retried
        run_study(
            model, regions, tmp_path / "s", pool=data(1, 8), fmt="csv", retry_failed=True, **KW
        )
        assert calls == ["broken"]
    finally:
        rm.process_regions = original


def test_resume_refuses_another_config_or_changed_inputs(tmp_path):
    model = tiny_model(5)
    pool = data(1, 8)
    run_study(model, tiny_regions(1), tmp_path / "s", pool=pool, **KW)
    with pytest.raises(ValueError, match="different config"):
        run_study(
            model, tiny_regions(1), tmp_path / "s", pool=pool, **{**KW, "config": {"steps": 7}}
        )
    with pytest.raises(ValueError, match="different weights"):
        run_study(tiny_model(6), tiny_regions(1), tmp_path / "s", pool=pool, **KW)
    changed = [Region("reg0", data(99, 4), torch.tensor([0] * 4))]
    with pytest.raises(ValueError, match="inputs differ"):
        run_study(model, changed, tmp_path / "s", pool=pool, **KW)
    fresh = run_study(model, changed, tmp_path / "s", pool=pool, resume=False, **KW)
    assert fresh.regions["region_id"].tolist() == ["reg0"]


def test_batched_regions_match_one_region_per_task(tmp_path):
    model = tiny_model(7)
    one = run_study(model, tiny_regions(), tmp_path / "a", metrics=("fidelity", "quotient"), **KW)
    batched = run_study(
        model,
        tiny_regions(),
        tmp_path / "b",
        metrics=("fidelity", "quotient"),
        regions_per_task=3,
        **KW,
    )
    assert_same_tables(one, batched, rtol=1e-4)


def test_plot_study_draws_and_saves_every_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    model = tiny_model(8)
    result = run_study(model, tiny_regions(2), tmp_path / "s", pool=data(2, 8), **KW)
    figs = plot_study({"tiny": result, "again": result}, save_dir=tmp_path / "fig")
    assert set(figs) == set(FIGURES)
    for name in FIGURES:
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 1000
    assert set(result.figures()) == set(FIGURES)


# --------------------------------------------------------------------------- ray


@pytest.mark.ray
def test_ray_backend_gives_the_serial_rows(tmp_path):
    ray = pytest.importorskip("ray")
    model = tiny_model(9)
    pool = data(3, 8)
    serial = run_study(model, tiny_regions(), tmp_path / "serial", pool=pool, **KW)
    snap = ModelSnapshot.take(model)
    try:
        parallel = run_study(
            model,
            tiny_regions(),
            tmp_path / "ray",
            pool=pool,
            backend="ray",
            num_workers=2,
            **KW,
        )
    except Exception as err:
        # a local Ray node can fail to start in time on an overloaded machine
        if "timed out during startup" not in str(err):
            raise
        pytest.skip(f"the local Ray node did not start: {err}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
    snap.assert_unchanged(model)
    assert_same_tables(serial, parallel, rtol=1e-5)
    workers = set(parallel.regions["worker"])
    assert all(":" in w for w in workers)

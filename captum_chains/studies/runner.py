"""run_study: NeuroChains plus every metric on many regions, resumable, serial or on Ray.

Each region (or group of ``regions_per_task`` regions, extracted in one batched
optimization) is a task of :func:`captum_chains.studies.evaluate.process_regions`. The
driver writes every finished region atomically (:class:`StudyStore`), so a killed
study resumes where it stopped: finished regions are skipped, half-written ones never
appear, and a region that raised is recorded with its error while the others go on.

Backends
--------
``"serial"`` (default)
    Regions run one after the other in this process, on the user's model.
``"ray"``
    Tasks run in parallel on a Ray cluster: a local one started on demand
    (``num_workers`` processes with ``threads_per_worker`` torch threads each), or an
    existing one given by ``ray_address``. The model and the pool are put in Ray's
    object store once; every task deserializes its own copy, so workers never share a
    model. With ``device="cuda"`` and ``gpus_per_task`` (e.g. 1, or 0.25 to pack four
    tasks on a GPU), each task moves its copy to its GPU.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from captum_chains._utils.optional import check
from captum_chains._utils.progress import tqdm
from captum_chains.config import ChainConfig
from captum_chains.studies.evaluate import (
    RegionTables,
    StudySettings,
    failed_region,
    process_regions,
)
from captum_chains.studies.regions import Region, as_regions
from captum_chains.studies.result import StudyResult
from captum_chains.studies.storage import StudyStore
from captum_chains.subnetwork import SubNetwork, weights_digest
from captum_chains.units.discovery import architecture_fingerprint

Backend = Literal["serial", "ray"]


def weights_hash(model: nn.Module) -> str:
    """A hash of the model's parameters and buffers (detects other weights on resume)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for name, tensor in list(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _tensor_hash(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str(tuple(t.shape)).encode())
    digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _config(config: ChainConfig | Mapping[str, Any] | None) -> ChainConfig:
    if config is None:
        return ChainConfig()
    if isinstance(config, ChainConfig):
        return config
    if isinstance(config, Mapping):
        return ChainConfig(**config)
    raise TypeError(f"config must be a ChainConfig or a dict of its fields, got {type(config)}")


def _groups(todo: list[Region], size: int) -> list[list[Region]]:
    """Consecutive groups of up to ``size`` regions with the same input shape."""
    groups: list[list[Region]] = []
    for region in todo:
        last = groups[-1] if groups else None
        if last is not None and len(last) < size and last[0].inputs.shape == region.inputs.shape:
            last.append(region)
        else:
            groups.append([region])
    return groups


def run_study(
    model: nn.Module,
    regions: Any,
    out_dir: str | Path,
    *,
    config: ChainConfig | Mapping[str, Any] | None = None,
    pool: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
    settings: StudySettings | None = None,
    backend: Backend = "serial",
    num_workers: int | None = None,
    threads_per_worker: int = 1,
    ray_address: str | None = None,
    gpus_per_task: float = 0.0,
    device: str | torch.device | None = None,
    regions_per_task: int = 1,
    resume: bool = True,
    retry_failed: bool = False,
    save_subnetworks: bool = True,
    fmt: Literal["parquet", "csv"] = "parquet",
    progress: bool = True,
    on_region: Callable[[RegionTables], None] | None = None,
    **setting_overrides: Any,
) -> StudyResult:
    """Extract chains and evaluate every metric on many regions, writing as it goes.

    Parameters
    ----------
    model : nn.Module
        The classifier (never modified; the Ray backend ships copies).
    regions : list of Region, list of Tensor, or dict of id -> Tensor
        The local regions (see :func:`sample_regions`); each needs >= 2 inputs.
    out_dir : str or Path
        Study folder; see :mod:`captum_chains.studies.storage` for its layout.
    config : ChainConfig or dict, optional
        NeuroChains hyperparameters for every region (default :class:`ChainConfig`).
    pool, pool_labels : Tensor, optional
        Unseen inputs (and labels) for the stability metric (required when
        ``"stability"`` is among the metrics).
    settings : StudySettings, optional
        Metric settings; keyword ``setting_overrides`` (e.g. ``epsilon=0.2``,
        ``metrics=("fidelity",)``) replace single fields.
    backend : {"serial", "ray"}
        Where tasks run (see the module docstring).
    num_workers : int, optional
        Ray: parallel tasks on a local cluster started here (default: CPU count //
        ``threads_per_worker``). Ignored with ``ray_address``.
    threads_per_worker : int
        Ray: torch threads (and Ray CPUs) per task.
    ray_address : str, optional
        Ray: address of an existing cluster (``"auto"`` or ``"ray://host:10001"``).
    gpus_per_task : float
        Ray: GPUs reserved per task (fractions pack several tasks on one GPU).
    device : str or torch.device, optional
        Device the tasks run on (default: the model's device; the Ray backend moves
        its copy there, e.g. ``"cuda"``).
    regions_per_task : int
        Regions of the same size extracted together in one batched optimization
        (:meth:`ChainExtractor.attribute_many`); larger values use a GPU better.
    resume : bool
        Skip regions already finished in ``out_dir``. ``False`` starts over (existing
        parts are deleted).
    retry_failed : bool
        When resuming, run the regions recorded as failed again.
    save_subnetworks : bool
        Save each region's sub-network (``parts/<id>/subnetwork.safetensors``).
    fmt : {"parquet", "csv"}
        Table format.
    progress : bool
        Show a tqdm bar over regions.
    on_region : callable, optional
        Called with each region's :class:`RegionTables` after it is written.

    Returns
    -------
    StudyResult
        All finished regions of ``out_dir`` (including those of earlier runs).

    Raises
    ------
    ValueError
        For bad regions (fewer than 2 inputs, duplicate ids), a missing pool, an
        ``out_dir`` holding a study with another model / config / settings, a finished
        region whose inputs changed, or a damaged part (a truncated or edited file, see
        :mod:`~captum_chains.studies.storage`) of a region not given in ``regions``;
        damaged parts of the regions given are computed again (with a warning).
    """
    regions_list = as_regions(regions)
    cfg = _config(config)
    settings = settings or StudySettings()
    if setting_overrides:
        from dataclasses import replace

        settings = replace(settings, **setting_overrides)
    if backend not in ("serial", "ray"):
        raise ValueError(f"backend must be 'serial' or 'ray', got {backend!r}")
    if regions_per_task < 1:
        raise ValueError(f"regions_per_task must be >= 1, got {regions_per_task}")
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
    if "stability" in settings.metrics:
        if pool is None:
            raise ValueError(
                "the stability metric needs a pool of unseen inputs: pass pool=... (e.g. the "
                "test split), or leave 'stability' out of metrics"
            )
        shape = tuple(regions_list[0].inputs.shape[1:])
        if tuple(pool.shape[1:]) != shape:
            raise ValueError(
                f"the pool holds inputs of shape {tuple(pool.shape[1:])} but the regions have "
                f"{shape}; build the pool with the same preprocessing"
            )
        too_big = [k for k in settings.ks if k > pool.shape[0]]
        if too_big:
            raise ValueError(
                f"K={too_big} exceed the pool of {pool.shape[0]} inputs; lower ks or enlarge "
                "the pool"
            )

    # the table libraries are checked now, not when the first finished region is written
    check("pandas", purpose="run_study (its tables)")
    if fmt == "parquet":
        check("pyarrow", purpose="run_study(fmt='parquet') (or pass fmt='csv')")
    store = StudyStore(out_dir, fmt=fmt)
    manifest: dict[str, Any] = {
        "model": type(model).__name__,
        "fingerprint": architecture_fingerprint(model),
        "weights": weights_hash(model),
        "config": cfg.to_dict(),
        "settings": settings.to_dict(),
        "pool": _tensor_hash(pool),
        "pool_labels": _tensor_hash(pool_labels),
        "fmt": fmt,
    }
    existing = store.read_manifest()
    if existing is not None and resume:
        _check_manifest(existing, manifest, store.root)
    if not resume and store.parts.exists():
        import shutil

        shutil.rmtree(store.parts)
    store.prepare()
    known = list((existing or {}).get("region_ids", [])) if resume else []
    ids = [r.region_id for r in regions_list]
    manifest["region_ids"] = ids + [i for i in known if i not in set(ids)]
    store.write_manifest(manifest)

    finished = store.finished()
    requested = {r.region_id for r in regions_list}
    lost = {rid: problem for rid, problem in store.damaged.items() if rid not in requested}
    if lost:
        listed = "; ".join(f"{rid}: {problem}" for rid, problem in sorted(lost.items())[:5])
        raise ValueError(
            f"{store.root} holds damaged parts of regions this call does not recompute "
            f"({listed}); pass those regions again to recompute them, delete their folders "
            "under parts/, or pass resume=False to start over"
        )
    for rid, problem in sorted(store.damaged.items()):
        warnings.warn(
            f"the stored part of region {rid!r} is damaged ({problem}); computing it again",
            stacklevel=2,
        )
    todo = []
    for region in regions_list:
        row = finished.get(region.region_id)
        if row is None or (retry_failed and row.get("status") != "ok"):
            todo.append(region)
        elif row.get("inputs_hash") != region.fingerprint():
            raise ValueError(
                f"region {region.region_id!r} is finished in {store.root} but its inputs "
                "differ from the ones given now; use another out_dir, another region id, or "
                "resume=False"
            )
    groups = _groups(todo, regions_per_task)
    target = torch.device(device) if device is not None else None

    digest = weights_digest(model) if save_subnetworks else None  # once, not per region

    def write(tables: RegionTables) -> None:
        sub = None
        if save_subnetworks and tables.scores is not None and tables.structure is not None:
            assert tables.gates_open is not None
            sub = SubNetwork(
                model, tables.structure, tables.scores, tables.gates_open, digest=digest
            )
        store.write_region(tables, sub)
        if on_region is not None:
            on_region(tables)

    bar = tqdm(total=len(todo), desc="study", disable=not progress)
    try:
        if backend == "serial":
            _run_serial(model, groups, cfg, settings, pool, pool_labels, target, write, bar)
        else:
            _run_ray(
                model,
                groups,
                cfg,
                settings,
                pool,
                pool_labels,
                target,
                write,
                bar,
                num_workers=num_workers,
                threads=threads_per_worker,
                address=ray_address,
                gpus=gpus_per_task,
            )
    finally:
        bar.close()
    tables = store.collect(order=manifest["region_ids"])
    store.write_tables(tables)
    return StudyResult(out_dir=store.root, manifest=manifest, **tables)


def _check_manifest(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    for key in ("fingerprint", "weights", "config", "settings", "pool", "pool_labels", "fmt"):
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{root} holds a study with a different {key} ({old.get(key)!r} vs "
                f"{new.get(key)!r}); resume it with the same model, config, settings and pool, "
                "use another out_dir, or pass resume=False to start over"
            )


def _run_serial(model, groups, cfg, settings, pool, pool_labels, device, write, bar) -> None:
    current = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device is not None and (
        current.type != device.type or device.index not in (None, current.index)
    ):
        raise ValueError(
            f"the serial backend runs on the model's device; move the model to {device} "
            "first (the user's model is never moved)"
        )
    for group in groups:
        for tables in process_regions(model, group, cfg, settings, pool, pool_labels):
            write(tables)
            bar.update(1)


def _ray_task(model, group, cfg, settings, pool, pool_labels, threads, device):
    """Body of one Ray task: a private model copy, its own torch threads."""
    torch.set_num_threads(threads)
    if device is not None:
        model = model.to(device)
        pool = None if pool is None else pool.to(device)
        group = [
            Region(r.region_id, r.inputs.to(device), r.labels, r.classes, r.indices) for r in group
        ]
    out = process_regions(model, group, cfg, settings, pool, pool_labels)
    for tables in out:
        for name in ("scores", "gates_open"):
            value = getattr(tables, name)
            if value is not None:
                setattr(tables, name, value.cpu())
    return out


def _run_ray(
    model,
    groups,
    cfg,
    settings,
    pool,
    pool_labels,
    device,
    write,
    bar,
    *,
    num_workers,
    threads,
    address,
    gpus,
) -> None:
    try:
        import ray
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='ray' needs Ray; install it with `pip install 'captum-chains[ray]'`"
        ) from err
    started = False
    if not ray.is_initialized():
        if address is None:
            workers = num_workers or max(1, (os.cpu_count() or 1) // threads)
            ray.init(
                num_cpus=workers * threads,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
                # Ray renices workers to 15 by default; on a shared machine they would
                # then starve, and here they do all the work.
                _system_config={"worker_niceness": 0},
            )
        else:
            ray.init(address=address)
        started = True
    # Tasks are deterministic, so a task whose worker died (e.g. killed by Ray's memory
    # monitor) is simply run again, twice at most, before its regions are recorded as failed.
    remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=2)(_ray_task)
    model_ref = ray.put(model)
    pool_ref = ray.put(pool)
    labels_ref = ray.put(pool_labels)
    capacity = max(1, int(ray.available_resources().get("CPU", 1) // threads))
    if gpus > 0:
        capacity = max(1, min(capacity, int(ray.available_resources().get("GPU", 0) / gpus)))
    max_in_flight = 2 * capacity
    pending: dict[Any, list[Region]] = {}
    queue = list(groups)
    try:
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                group = queue.pop(0)
                ref = remote.remote(
                    model_ref, group, cfg, settings, pool_ref, labels_ref, threads, device
                )
                pending[ref] = group
            # A timeout keeps the driver responsive to Ctrl-C while tasks run.
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                group = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # a worker died: record, go on
                    results = [failed_region(r, err) for r in group]
                for tables in results:
                    write(tables)
                    bar.update(1)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

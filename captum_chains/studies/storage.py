"""On-disk layout of a study: one atomically written folder per finished region.

::

    out_dir/
      study.json                 model fingerprint, chain config, settings (resume check)
      parts/<region_id>/         one folder per finished (or failed) region:
        region.parquet           its row
        filters.parquet          one row per evaluated kept unit
        inputs.parquet           one row per input
        stability.parquet        one row per K
        subnetwork.safetensors   the sub-network (optional)
      regions.parquet, filters.parquet, inputs.parquet, stability.parquet
                                 the concatenated tables (rebuilt from parts/)

A region's folder is written under a temporary name and renamed into place in one
``os.rename`` (atomic on POSIX file systems), so after a crash every folder in
``parts/`` is complete, and half-written temporary folders are ignored and removed on
the next run. CSV can replace Parquet (``fmt="csv"``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from captum_chains.studies.evaluate import RegionTables

TABLES: tuple[str, ...] = ("regions", "filters", "inputs", "stability")
MANIFEST = "study.json"
FORMAT = "captum-chains/study-v1"
_TMP_PREFIX = ".tmp-"


def _write_frame(frame: Any, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


def _read_frame(path: Path, fmt: str) -> Any:
    import pandas as pd

    if fmt == "parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=True)


def atomic_write_frame(frame: Any, path: Path, fmt: str) -> None:
    """Write a table to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        _write_frame(frame, tmp, fmt)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class StudyStore:
    """Reads and writes a study folder.

    Parameters
    ----------
    out_dir : str or Path
        The study folder (created if missing).
    fmt : {"parquet", "csv"}
        Table format.
    """

    def __init__(self, out_dir: str | Path, fmt: str = "parquet") -> None:
        if fmt not in ("parquet", "csv"):
            raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
        self.root = Path(out_dir)
        self.fmt = fmt
        self.parts = self.root / "parts"

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{MANIFEST}")
        tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ parts
    def prepare(self) -> None:
        """Create the folders and remove leftovers of interrupted writes."""
        self.parts.mkdir(parents=True, exist_ok=True)
        for leftover in self.parts.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.root.glob(f"{_TMP_PREFIX}*"):
            if leftover.is_file():
                leftover.unlink()

    def finished_ids(self) -> list[str]:
        """Ids of the complete region folders (sorted)."""
        if not self.parts.exists():
            return []
        return [
            folder.name
            for folder in sorted(self.parts.iterdir())
            if folder.is_dir()
            and not folder.name.startswith(_TMP_PREFIX)
            and (folder / f"regions.{self._ext}").exists()
        ]

    def finished(self) -> dict[str, dict[str, Any]]:
        """Region id -> its stored row, for every complete region folder."""
        return {
            rid: _read_frame(self.parts / rid / f"regions.{self._ext}", self.fmt).iloc[0].to_dict()
            for rid in self.finished_ids()
        }

    @property
    def _ext(self) -> str:
        return "parquet" if self.fmt == "parquet" else "csv"

    def write_region(self, tables: RegionTables, subnetwork: Any = None) -> None:
        """Write one region's tables (and sub-network) atomically."""
        import pandas as pd

        self.parts.mkdir(parents=True, exist_ok=True)
        rid = tables.region_id
        tmp = self.parts / f"{_TMP_PREFIX}{rid}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, rows in (
                ("filters", tables.filters),
                ("inputs", tables.inputs),
                ("stability", tables.stability),
            ):
                _write_frame(pd.DataFrame(rows), tmp / f"{name}.{self._ext}", self.fmt)
            if subnetwork is not None:
                subnetwork.save(tmp / "subnetwork.safetensors")
            _write_frame(pd.DataFrame([tables.region]), tmp / f"regions.{self._ext}", self.fmt)
            final = self.parts / rid
            old = None
            if final.exists():
                old = self.parts / f"{_TMP_PREFIX}old-{rid}-{uuid.uuid4().hex}"
                os.rename(final, old)
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def subnetwork_path(self, region_id: str) -> Path:
        return self.parts / region_id / "subnetwork.safetensors"

    # ------------------------------------------------------------------ tables
    def collect(self, order: list[str] | None = None) -> dict[str, Any]:
        """Concatenate the parts into the four study tables.

        Regions listed in ``order`` come first, in that order; others follow by id.
        """
        import pandas as pd

        ids = self.finished_ids()
        rank = {rid: i for i, rid in enumerate(order or [])}
        ids.sort(key=lambda r: (rank.get(r, len(rank)), r))
        frames: dict[str, list[Any]] = {name: [] for name in TABLES}
        for rid in ids:
            for name in TABLES:
                path = self.parts / rid / f"{name}.{self._ext}"
                if path.exists() and path.stat().st_size > 0:
                    try:
                        frame = _read_frame(path, self.fmt)
                    except pd.errors.EmptyDataError:
                        continue
                    if len(frame):
                        frames[name].append(frame)
        return {
            name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
            for name, parts in frames.items()
        }

    def write_tables(self, tables: dict[str, Any]) -> None:
        """Write the concatenated tables atomically next to ``parts/``."""
        for name, frame in tables.items():
            atomic_write_frame(frame, self.root / f"{name}.{self._ext}", self.fmt)

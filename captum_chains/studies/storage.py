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
        checksums.json           size and SHA-256 of each file above
      regions.parquet, filters.parquet, inputs.parquet, stability.parquet
                                 the concatenated tables (rebuilt from parts/)

A region's folder is written under a temporary name and renamed into place in one
``os.rename`` (atomic on POSIX file systems), so after a crash every folder in
``parts/`` is complete, and half-written temporary folders are ignored and removed on
the next run. A part damaged afterwards (a truncated or edited file: its size or hash no
longer matches ``checksums.json``) is never read as if it were complete:
:meth:`StudyStore.finished` leaves it out and reports it in :attr:`StudyStore.damaged`
(``run_study`` recomputes such regions or stops with a ``ValueError``), and
:meth:`StudyStore.collect` raises ``ValueError`` naming it. CSV can replace Parquet
(``fmt="csv"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from captum_chains.studies.evaluate import RegionTables

TABLES: tuple[str, ...] = ("regions", "filters", "inputs", "stability")
MANIFEST = "study.json"
CHECKSUMS = "checksums.json"
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
        #: Region id -> what is wrong with its part, filled by :meth:`finished`.
        self.damaged: dict[str, str] = {}

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict[str, Any] | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise ValueError(
                f"{path} is damaged ({err}); delete it to resume the study's parts under the "
                "current settings, or pass resume=False to start over"
            ) from err
        if not isinstance(manifest, dict):
            raise ValueError(f"{path} is not a study manifest (a JSON object)")
        return manifest

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
        """Region id -> its stored row, for every complete, intact region folder.

        Damaged folders are left out and recorded in :attr:`damaged`.
        """
        self.damaged = {}
        out = {}
        for rid in self.finished_ids():
            problem = self.check_part(rid)
            row: dict[str, Any] | None = None
            if problem is None:
                try:
                    frame = _read_frame(self.parts / rid / f"regions.{self._ext}", self.fmt)
                    row = frame.iloc[0].to_dict() if len(frame) == 1 else None
                except Exception as err:  # pandas / pyarrow raise many types on damaged files
                    problem = f"its regions table cannot be read ({type(err).__name__})"
                else:
                    if row is None:
                        problem = f"its regions table holds {len(frame)} rows, not 1"
            if problem is not None or row is None:
                self.damaged[rid] = problem or "its regions table is empty"
            else:
                out[rid] = row
        return out

    def check_part(self, region_id: str) -> str | None:
        """What is wrong with a region's folder (``None`` if it is intact).

        Compares each file with the size and SHA-256 recorded in ``checksums.json`` when
        the part was written; folders of older versions without checksums pass.
        """
        folder = self.parts / region_id
        path = folder / CHECKSUMS
        if not path.exists():
            return None
        try:
            recorded = json.loads(path.read_bytes().decode("utf-8"))
            items = [(str(k), int(v["bytes"]), str(v["sha256"])) for k, v in recorded.items()]
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return f"its {CHECKSUMS} is damaged"
        for name, size, digest in items:
            file = folder / name
            if Path(name).name != name or not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes instead of {size} (truncated?)"
            if _sha256(file) != digest:
                return f"{name} does not match its checksum (damaged)"
        return None

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
            sums = {
                f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                for f in sorted(tmp.iterdir())
            }
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
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
            problem = self.check_part(rid)
            if problem is not None:
                raise ValueError(_damaged_message(self.parts / rid, problem))
            for name in TABLES:
                path = self.parts / rid / f"{name}.{self._ext}"
                if path.exists() and path.stat().st_size > 0:
                    try:
                        frame = _read_frame(path, self.fmt)
                    except pd.errors.EmptyDataError:
                        continue
                    except Exception as err:  # pandas / pyarrow raise many types
                        raise ValueError(
                            _damaged_message(path.parent, f"{path.name} cannot be read ({err})")
                        ) from err
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damaged_message(folder: Path, problem: str) -> str:
    return (
        f"the study part {folder} is damaged: {problem}; run run_study again with this "
        "region to recompute it, or delete the folder"
    )

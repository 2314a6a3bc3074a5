"""Print the declared minimum versions of pyproject.toml as pip requirements.

Every ``name>=X`` of the core dependencies and of the extras named on the command line
becomes ``name==X.*`` (the oldest declared release line; pip picks its newest patch), so a
CI job can install the floors and run the tests against them::

    python .ci/min_versions.py viz studies pretrained > floors.txt
    pip install -r floors.txt && pip install --no-deps -e .
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SELF = "captum-chains"


def floors(extras: list[str]) -> list[str]:
    """``name==X.*`` for every requirement with a ``>=X`` floor, core and ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    pending = list(project["dependencies"])
    seen_extras: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen_extras:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra [{extra}]")
        seen_extras.add(extra)
        for req in optional[extra]:
            self_ref = re.fullmatch(rf"{SELF}\[(.+)\]", req.strip())
            if self_ref:  # captum-chains[studies]: expand the named extras
                todo.extend(e.strip() for e in self_ref.group(1).split(","))
            else:
                pending.append(req)
    pins: dict[str, str] = {}
    for req in pending:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", req)
        if match is None:
            raise SystemExit(f"cannot read a '>=' floor from {req!r}")
        name, version = match.group(1).lower(), match.group(2)
        pins[name] = f"{name}=={version}.*"
    return sorted(pins.values())


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:])))

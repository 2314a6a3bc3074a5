#!/usr/bin/env bash
# CI step for the documentation: build the site cold (empty notebook cache, every tutorial
# executed, -W: any warning, error cell or stderr output fails) and check the rendered
# pages in headless Chromium (tests/test_docs.py -m slow). Exits non-zero on any failure.
#
#   bash docs/check_site.sh            # from the repository root, in the project's venv
#   CAPTUM_CHAINS_DOCS_WARM=1 bash docs/check_site.sh   # keep the notebook cache (local use)
#
# Needs the docs extra (pip install -e '.[dev,docs]') and Debian's `chromium`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PYTHON=${PYTHON:-python}

if [ -z "${CAPTUM_CHAINS_DOCS_WARM:-}" ]; then
  make -C docs clean
fi
start=$(date +%s)
make -C docs html
echo "docs: built in $(($(date +%s) - start)) s"
# seconds each executed notebook took (jupyter-cache records them)
"$PYTHON" - <<'PY' || true
import sqlite3, json, pathlib
db = pathlib.Path("docs/_build/.jupyter_cache/global.db")
if db.is_file():
    rows = sqlite3.connect(db).execute("select uri, data from nbcache order by created")
    for uri, data in rows:
        seconds = json.loads(data or "{}").get("execution_seconds")
        if seconds is not None:
            print(f"docs: executed {pathlib.Path(uri).name:<22} {seconds:6.0f} s")
PY
CAPTUM_CHAINS_DOCS_BUILT=1 CAPTUM_CHAINS_REQUIRE_CHROMIUM=1 \
  "$PYTHON" -m pytest tests/test_docs.py -m slow -q -p no:cacheprovider

#!/usr/bin/env bash
# The wheel, not the editable install: build it, install it into a clean virtual environment, and from outside
# the checkout (so nothing is imported from the folders) run the CLI, validate the example runbook and import
# every module. A package or data file missing from pyproject.toml fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d /tmp/liftoff-wheel-XXXXXX)"
trap 'rm -rf "$work"' EXIT
rm -rf build  # setuptools' build/lib keeps files an earlier build copied: a moved module would ship twice
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
rm -rf build
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip
"$work/venv/bin/pip" install --quiet "$work"/dist/liftoff-*.whl
runbook="$PWD/runbooks/tour-crm.yaml"
cd "$work"
"$work/venv/bin/liftoff" --help > /dev/null
"$work/venv/bin/liftoff" validate "$runbook"
"$work/venv/bin/python" - <<'PY'
import importlib
import pkgutil

import liftoff
import liftoff_sandbox

names = []
for package in (liftoff, liftoff_sandbox):
    for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(found.name)
        names.append(found.name)
assert not [n for n in names if "/work" in (importlib.import_module(n).__file__ or "")], "imported from a checkout"
assert importlib.resources.files("liftoff.runbooks").joinpath("tour-crm.yaml").is_file()
assert importlib.resources.files("liftoff_sandbox").joinpath("crm_schema.sql").is_file()
print(f"wheel: {len(names)} modules import from the installed wheel; the CLI and the example runbook work")
PY

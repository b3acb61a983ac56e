#!/usr/bin/env bash
# Create (if missing) the repo-local Python virtual environment .venv and install
# the conformance suite's pinned requirements into it.
#
# Idempotent and fast on repeat runs: the pip install is skipped when the stamp
# file records the same hash of tests/conformance/requirements.txt (and the same
# interpreter) as now.
#
# Env: PYTHON (default python3) chooses the interpreter used to create the venv.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo_root"

python_bin="${PYTHON:-python3}"
venv="$repo_root/.venv"
requirements="$repo_root/tests/conformance/requirements.txt"
stamp="$venv/.requirements.sha256"

if [[ ! -f "$requirements" ]]; then
    echo "setup-python: missing $requirements" >&2
    exit 1
fi

# A venv whose interpreter is gone or broken (e.g. moved tree, removed python) is rebuilt.
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup-python: $venv is broken; recreating it" >&2
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-python: creating $venv with $python_bin" >&2
    "$python_bin" -m venv "$venv"
fi

want="$( { sha256sum "$requirements" | cut -d' ' -f1; "$venv/bin/python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"

if [[ "$want" == "$have" ]]; then
    exit 0
fi

echo "setup-python: installing $(basename "$requirements") into $venv" >&2
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements"
# Catch a broken resolution now rather than as a confusing pytest import error.
"$venv/bin/python" -m pip check --disable-pip-version-check >/dev/null
"$venv/bin/python" - <<'PY'
import azure.identity, azure.keyvault.certificates, azure.keyvault.keys  # noqa: F401
import msal, jwt, cryptography, requests, pytest, certifi  # noqa: F401
PY
printf '%s\n' "$want" > "$stamp"

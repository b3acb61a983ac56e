#!/usr/bin/env bash
# Run the emulator conformance suite: Microsoft's Python SDKs against `tokenbroker emulator`.
#
#   tests/conformance/run.sh [extra pytest args...]
#
# Env: TOKENBROKER_BIN  emulator binary, used as it is (relative paths are from the repo
#                       root). Unset: target/debug/tokenbroker, (re)built with
#                       `cargo build --locked` first (a no-op when target/ is up to date).
# Exits non-zero when pytest fails, and also when it collected or ran no test.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo_root"

bash scripts/setup-python.sh

# The binary under test (scripts/tokenbroker-bin.sh: built unless TOKENBROKER_BIN names one).
source scripts/tokenbroker-bin.sh
tokenbroker_bin "conformance"

# pytest exit codes: 0 all passed, 1 failures, 2 interrupted, 3 internal error,
# 4 usage error, 5 no tests collected. Only 0 is success.
status=0
.venv/bin/python -m pytest tests/conformance -q -p no:cacheprovider "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "conformance: pytest collected no tests; treating that as a failure" >&2
fi
exit "$status"

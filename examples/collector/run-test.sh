#!/usr/bin/env bash
# Test the example collector end to end: `tokenbroker dev` (broker + emulator) as a subprocess,
# the collector asking it for Graph tokens and paging through the emulator's Graph-style log.
#
#   examples/collector/run-test.sh [extra pytest args...]
#
# Works from any directory. Installs the project's Python env (.venv, scripts/setup-python.sh),
# generates the gRPC stubs (git-ignored examples/collector/_generated) and, unless
# TOKENBROKER_BIN names one, builds target/debug/tokenbroker.
# Exits non-zero when a test fails and also when pytest collected or ran no test.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
cd "$repo_root"

bash scripts/setup-python.sh

# The binary under test (scripts/tokenbroker-bin.sh: built unless TOKENBROKER_BIN names one).
source scripts/tokenbroker-bin.sh
tokenbroker_bin "collector test"

# Stubs at setup time, so a generation problem shows up as itself and not inside a test.
.venv/bin/python "$here/collector.py" --generate-stubs

# pytest exit codes: 0 all passed, 1 failures, 2 interrupted, 3 internal error,
# 4 usage error, 5 no tests collected. Only 0 is success.
status=0
.venv/bin/python -m pytest "$here" -q -p no:cacheprovider --rootdir "$here" "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "collector test: pytest collected no tests; treating that as a failure" >&2
fi
exit "$status"

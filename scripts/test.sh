#!/usr/bin/env bash
# Every check the project has, in the order a failure is cheapest to find:
# formatting, lints, Rust tests (unit, end to end against the emulator), then the
# conformance suite that drives the emulator with Microsoft's own Python SDKs.
# Installs what it needs (SoftHSM2 for the PKCS#11 tests, the Python venv) itself.
# `.ci/run` calls exactly this.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo_root"

step() { printf '\n==> %s\n' "$*"; }

# The PKCS#11 tests (tests/hsm) sign with keys on a SoftHSM2 token.
if ! command -v softhsm2-util >/dev/null 2>&1; then
    step "installing SoftHSM2 (Debian package softhsm2) for the PKCS#11 tests"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 >/dev/null
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --locked --all-targets -- -D warnings

# The production image builds without the emulator (Dockerfile: --no-default-features).
step "cargo clippy (production features: no emulator, -D warnings)"
cargo clippy --locked --no-default-features -- -D warnings

step "cargo test"
cargo test --locked

# The binary `cargo test` built for the end-to-end tests serves the steps below too, so
# that nothing is compiled twice (a plain `cargo build` would use other dependency features).
export TOKENBROKER_BIN="$repo_root/target/debug/tokenbroker"

step "emulator conformance (Microsoft Python SDKs)"
bash tests/conformance/run.sh

step "deployment files (kubernetes-validate, hadolint, checkov; see docs/DEPLOY.md)"
bash scripts/validate-deploy.sh

step "example collector (Python gRPC client against tokenbroker dev; see examples/collector)"
bash examples/collector/run-test.sh

#!/usr/bin/env bash
# Every check the project has, in the order a failure is cheapest to find:
# formatting, lints, Rust tests (unit, end to end against the emulator), then the
# conformance suite that drives the emulator with Microsoft's own Python SDKs.
# Installs what it needs (the Python venv) itself. `.ci/run` calls exactly this.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo_root"

step() { printf '\n==> %s\n' "$*"; }

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

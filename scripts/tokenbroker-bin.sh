# Sourced by the test scripts that run the tokenbroker binary (conformance, collector
# example): `tokenbroker_bin <what>` sets and exports TOKENBROKER_BIN, an absolute path.
#
# TOKENBROKER_BIN set: used as it is (relative paths are from the repo root); scripts/test.sh
# passes the binary `cargo test` just built, because a `cargo build` would rebuild most
# dependencies (dev-dependencies such as tokio's test-util change their features).
# Unset: target/debug/tokenbroker, (re)built with `cargo build --locked` first (a no-op when
# target/ is up to date). Expects the repo root as the current directory.
tokenbroker_bin() {
    local what="$1"
    if [[ -z "${TOKENBROKER_BIN:-}" ]]; then
        cargo build --locked --quiet
    fi
    local bin="${TOKENBROKER_BIN:-target/debug/tokenbroker}"
    case "$bin" in
        /*) ;;
        *) bin="$PWD/$bin" ;;
    esac
    if [[ ! -x "$bin" ]]; then
        echo "$what: tokenbroker binary $bin not found or not executable" >&2
        exit 1
    fi
    export TOKENBROKER_BIN="$bin"
}

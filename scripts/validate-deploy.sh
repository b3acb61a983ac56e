#!/usr/bin/env bash
# Validate the deployment files without a Docker engine, a Bicep compiler, kustomize
# or a cluster (none exists on the project's machines):
#
#   1. render deploy/kubernetes/overlays/aks (and with the optional Cilium, OTLP and
#      cert-manager components)
#      with deploy/tools/render.py, a kustomize-compatible subset;
#   2. kubernetes-validate --strict on the renders, for each Kubernetes version in
#      KUBE_VERSIONS; only the components' custom resources may lack a schema;
#   3. deploy/tools/check_static.py: the rendered manifests keep the properties the
#      deployment relies on; the docs' `kubectl debug` commands carry the debug profile
#      the namespace's Pod Security level admits; every .bicep file parses (pycep) and its
#      modules exist;
#      the certificate policy is RSA 2048, non-exportable, auto-renewing;
#   4. `tokenbroker check-config` on the broker config of every rendered ConfigMap (and
#      on a copy with the mounted policy file's grants inline), when a built binary is at
#      hand (TOKENBROKER_BIN, or target/debug/tokenbroker, which `cargo test` in
#      scripts/test.sh builds); a config whose callers cannot authenticate or whose policy
#      grants nothing fails;
#   5. hadolint on the Dockerfile;
#   6. checkov on the Dockerfile, the rendered manifests and the Bicep files: no failed
#      check; each skip is justified inline where it is made.
#
# Tools come from PyPI into the private venv .venv-deploy (deploy/tools/requirements.txt,
# exact pins). Idempotent: the install is skipped when the requirements' hash and the
# interpreter match the stamp. Exits non-zero on any failure. Every tool runs under a
# timeout, so the whole run is bounded (about a minute after the first install).
#
# Env: PYTHON (default python3) for creating the venv; KUBE_VERSIONS (default
# "1.30.0 1.37.0": the oldest Kubernetes the manifests need, for the preStop sleep
# action, and the newest); TOKENBROKER_BIN; CI=true makes a missing binary a failure.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo_root"

python_bin="${PYTHON:-python3}"
venv="$repo_root/.venv-deploy"
requirements="$repo_root/deploy/tools/requirements.txt"
stamp="$venv/.requirements.sha256"
kube_versions="${KUBE_VERSIONS:-1.30.0 1.37.0}"
overlay="deploy/kubernetes/overlays/aks"
component="deploy/kubernetes/components/cilium-fqdn-egress"
otlp_component="deploy/kubernetes/components/otlp-egress"
tls_component="deploy/kubernetes/components/cert-manager-tls"

step() { printf '\n--> validate-deploy: %s\n' "$*"; }
failures=0
fail() { printf 'validate-deploy: FAILED: %s\n' "$*" >&2; failures=$((failures + 1)); }

# --- the venv -------------------------------------------------------------------------
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "validate-deploy: $venv is broken; recreating it" >&2
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    echo "validate-deploy: creating $venv with $python_bin" >&2
    "$python_bin" -m venv "$venv"
    # Keep the venv out of git without touching the repository's .gitignore.
    printf '*\n' > "$venv/.gitignore"
fi
want="$( { sha256sum "$requirements" | cut -d' ' -f1; "$venv/bin/python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
if [[ "$want" != "$(cat "$stamp" 2>/dev/null || true)" ]]; then
    step "installing $(realpath --relative-to="$repo_root" "$requirements") into .venv-deploy"
    timeout 900 "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$requirements"
    "$venv/bin/python" -m pip check --disable-pip-version-check >/dev/null
    printf '%s\n' "$want" > "$stamp"
fi
py="$venv/bin/python"
bin="$venv/bin"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- 1. render --------------------------------------------------------------------------
step "render $overlay (kustomize-compatible subset)"
"$py" deploy/tools/render.py "$overlay" -o "$work/aks.yaml" || fail "render $overlay"
# The overlay with the optional components (FQDN egress, OTLP egress, cert-manager TLS), as an operator
# would enable them.
mkdir -p "$work/aks-optional"
cat > "$work/aks-optional/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $repo_root/$overlay
components:
  - $repo_root/$component
  - $repo_root/$otlp_component
  - $repo_root/$tls_component
EOF
"$py" deploy/tools/render.py "$work/aks-optional" -o "$work/aks-optional.yaml" \
    || fail "render $overlay with $component, $otlp_component and $tls_component"

# --- 2. kubernetes-validate -------------------------------------------------------------
for v in $kube_versions; do
    for f in aks aks-optional; do
        [[ -s "$work/$f.yaml" ]] || continue
        step "kubernetes-validate --strict -k $v ($f)"
        if ! out="$(timeout 120 "$bin/kubernetes-validate" --strict --quiet -k "$v" "$work/$f.yaml" 2>&1)"; then
            printf '%s\n' "$out" >&2
            fail "kubernetes-validate $f against $v"
            continue
        fi
        # A missing schema is only a warning to the tool; here only the custom resources
        # of the components (Cilium, cert-manager, managed Prometheus) may lack one.
        unexpected="$(printf '%s\n' "$out" | grep -i "couldn't find schema" \
            | grep -v -e "CiliumNetworkPolicy with api version cilium.io/v2" \
                -e "PodMonitor with api version azmonitoring.coreos.com/v1" \
                -e "Certificate with api version cert-manager.io/v1" \
                -e "Issuer with api version cert-manager.io/v1" || true)"
        if [[ -n "$unexpected" ]]; then
            printf '%s\n' "$unexpected" >&2
            fail "kubernetes-validate $f against $v: resources without a schema"
        fi
        printf '%s\n' "$out" | grep -v -i -e "couldn't find schema" -e '^$' || true
        echo "ok"
    done
done

# --- 3. static checks --------------------------------------------------------------------
step "rendered manifests keep their properties"
timeout 60 "$py" deploy/tools/check_static.py manifests "$work/aks.yaml" "$work/configs" \
    || fail "manifest properties"
step "the docs' kubectl debug commands pass the namespace's Pod Security level"
timeout 60 "$py" deploy/tools/check_static.py commands "$work/aks.yaml" docs/DEPLOY.md README.md \
    || fail "kubectl debug commands in the docs"
step "with the optional components: public 443 by name only, OTLP egress on 4318, server certificate"
# Allow rules of all policies selecting a pod add up, so the FQDN policy narrows nothing
# unless the base policy's rule for any public address is gone.
timeout 60 "$py" - "$work/aks-optional.yaml" <<'PY' || fail "the render with the optional components"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "tokenbroker")
cidrs = [p["ipBlock"]["cidr"] for r in policy["spec"]["egress"] for p in r.get("to", []) if "ipBlock" in p]
assert "0.0.0.0/0" not in cidrs, f"NetworkPolicy egress still has 0.0.0.0/0: {cidrs}"
assert any(d["kind"] == "CiliumNetworkPolicy" for d in docs), "no CiliumNetworkPolicy rendered"
print(f"ok: NetworkPolicy egress address blocks {cidrs}; FQDN policy present")
# Every bearer-token issuer's discovery and keys host is reachable by name.
import fnmatch, re, tomllib, urllib.parse
fqdn = [f for d in docs if d["kind"] == "CiliumNetworkPolicy" for r in d["spec"].get("egress", []) for f in r.get("toFQDNs", [])]
def allowed(host):
    for f in fqdn:
        if f.get("matchName") == host:
            return True
        pat = f.get("matchPattern")
        if pat and re.fullmatch(re.escape(pat).replace(r"\*", r"[a-z0-9-]*"), host):
            return True
    return False
for cm in (d for d in docs if d["kind"] == "ConfigMap" and "broker.toml" in (d.get("data") or {})):
    cfg = tomllib.loads(cm["data"]["broker.toml"])
    for name, iss in cfg.get("callers", {}).get("issuers", {}).items():
        for url in (iss.get("issuer"), iss.get("discovery_url")):
            host = urllib.parse.urlsplit(url).hostname if url else None
            assert host is None or allowed(host), f"issuer {name}: {host} is not in the FQDN egress policy"
            if host:
                print(f"ok: issuer {name} ({host}) reachable through the FQDN policy")
otlp = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "tokenbroker-otlp-egress")
assert [p["port"] for r in otlp["spec"]["egress"] for p in r["ports"]] == [4318], otlp
print("ok: OTLP egress policy present (4318 only)")
# The server certificate lands in the Secret the Deployment mounts, for the Service's name.
deploy = next(d for d in docs if d["kind"] == "Deployment")
mounted = {v["secret"]["secretName"] for v in deploy["spec"]["template"]["spec"]["volumes"] if "secret" in v}
cert = next(d for d in docs if d["kind"] == "Certificate" and d["metadata"]["name"] == "tokenbroker-tls")
assert cert["spec"]["secretName"] in mounted, (cert["spec"]["secretName"], mounted)
svc = next(d for d in docs if d["kind"] == "Service")
want = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
assert want in cert["spec"]["dnsNames"], f"the server certificate does not name {want}: {cert['spec']['dnsNames']}"
print(f"ok: cert-manager Certificate for {want} into Secret {cert['spec']['secretName']}")
PY
step "Bicep files parse (pycep) and their modules exist"
timeout 120 "$py" deploy/tools/check_static.py bicep deploy/azure || fail "bicep parse"
step "Key Vault certificate policy"
timeout 60 "$py" deploy/tools/check_static.py policy deploy/azure/certificate-policy.json \
    || fail "certificate policy"

# --- 4. the broker's own config check ----------------------------------------------------
tb="${TOKENBROKER_BIN:-$repo_root/target/debug/tokenbroker}"
step "tokenbroker check-config on the rendered broker configs"
if [[ -x "$tb" ]]; then
    for cfg in "$work"/configs/*.toml; do
        [[ -e "$cfg" ]] || { fail "no broker config in the rendered ConfigMaps"; break; }
        # Only the file's own content: an empty environment but PATH and HOME, so no
        # TOKENBROKER_* override (listen, admin listen, log, identity, extra CA, OTLP
        # endpoint, and any added later) from this shell changes what is checked.
        if ! out="$(env -i PATH="$PATH" HOME="$HOME" \
                timeout 30 "$tb" check-config --files-elsewhere "$cfg" 2>&1)"; then
            printf '%s\n' "$out" >&2
            fail "check-config $(basename "$cfg")"
            continue
        fi
        # A valid config can still serve nobody: the overlay is what gets deployed, so it
        # must authenticate callers and grant something (the base alone is a template).
        if printf '%s\n' "$out" | grep -E "no caller can authenticate|every request is denied" >&2; then
            fail "check-config $(basename "$cfg"): the broker it configures would refuse every caller"
            continue
        fi
        printf '%s\n' "$out" | grep -E "^(callers|policy):" | sed 's/^/  /'
        echo "ok: $(basename "$cfg")"
    done
elif [[ "${CI:-}" == "true" ]]; then
    # CI builds the binary before this step (scripts/test.sh): its absence is a broken
    # pipeline, not a reason to ship an unchecked config.
    fail "no tokenbroker binary at $tb in CI (CI=true): check-config did not run"
else
    echo "skipped: no tokenbroker binary at $tb (build it, or set TOKENBROKER_BIN)"
fi

# --- 5. hadolint ---------------------------------------------------------------------------
step "hadolint Dockerfile"
if timeout 60 "$bin/hadolint" --no-color --failure-threshold style Dockerfile; then echo "ok"; else fail "hadolint"; fi

# --- 6. checkov ----------------------------------------------------------------------------
# --skip-download: no calls to the vendor's platform (and none are reachable here).
# The JSON report is read as well as the exit code, because checkov only logs files it
# cannot parse and a scan of nothing passes; every skip and its reason is printed.
checkov_run() {
    local name="$1"; shift
    step "checkov $name"
    local rc=0 report="$work/checkov-$name.json"
    timeout 300 "$bin/checkov" --compact --skip-download --output json "$@" > "$report" || rc=$?
    "$py" - "$report" "$name" <<'PY' || fail "checkov $name"
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except ValueError:
    print(open(sys.argv[1]).read()[-3000:], file=sys.stderr)
    sys.exit(1)
reports = data if isinstance(data, list) else [data]
bad = []
for r in reports:
    s = r.get("summary", {})
    print(f"{r.get('check_type')}: passed {s.get('passed', 0)}, failed {s.get('failed', 0)}, "
          f"skipped {s.get('skipped', 0)}, parsing errors {s.get('parsing_errors', 0)}")
    results = r.get("results", {})
    for c in results.get("failed_checks", []):
        bad.append(f"{c['check_id']} {c.get('check_name')} on {c.get('resource')} ({c.get('file_path')}:{c.get('file_line_range')})")
    for c in results.get("skipped_checks", []):
        reason = (c.get("check_result", {}).get("suppress_comment") or "").strip()
        print(f"  skipped {c['check_id']} on {c.get('resource')}: {reason}")
        if len(reason) < 20:
            bad.append(f"{c['check_id']} skipped without a real reason: {reason!r}")
    if s.get("parsing_errors"):
        bad.append(f"{s['parsing_errors']} file(s) did not parse: {results.get('parsing_errors') or s}")
    if not s.get("passed"):
        bad.append("no check passed (was anything scanned?)")
if not reports or not any(r.get("summary") for r in reports):
    bad.append("empty report")
for b in bad:
    print(f"checkov {sys.argv[2]}: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
    if [[ $rc -ne 0 ]]; then fail "checkov $name exited $rc"; fi
}
checkov_run dockerfile --framework dockerfile -f Dockerfile
checkov_run kubernetes --framework kubernetes -f "$work/aks.yaml" -f "$work/aks-optional.yaml"
checkov_run bicep --framework bicep -d deploy/azure

if [[ $failures -ne 0 ]]; then
    printf '\nvalidate-deploy: %d check(s) failed\n' "$failures" >&2
    exit 1
fi
printf '\nvalidate-deploy: all deployment checks passed\n'

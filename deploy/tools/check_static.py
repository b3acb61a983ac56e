#!/usr/bin/env python3
"""Checks of deploy/ that no off-the-shelf linter makes here (no Bicep compiler, no
kustomize, no cluster). Run by scripts/validate-deploy.sh inside its venv.

  bicep DIR             parse every .bicep file (pycep, the parser checkov uses: checkov
                        itself only logs a parse error) and check that modules exist
  policy FILE           the Key Vault certificate policy: RSA 2048, non-exportable, auto-renew
  manifests FILE OUTDIR the rendered overlay keeps the properties the deployment relies on;
                        each ConfigMap's broker.toml is written to OUTDIR for check-config,
                        and beside it, when it names a policy file the Deployment mounts from
                        a ConfigMap, a copy with those grants inline (NAME+policy.toml)
  commands FILE DOC...  the `kubectl debug` commands of the docs that add an ephemeral
                        container in a namespace of the render would be admitted by its Pod
                        Security level (a restricted namespace refuses kubectl's default
                        debug profile)
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import uuid
from pathlib import Path

import yaml

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)


def check_bicep(directory: Path) -> None:
    from pycep import BicepParser

    parser = BicepParser()
    files = sorted(directory.glob("*.bicep"))
    if not files:
        problem(f"{directory}: no .bicep files")
    for f in files:
        try:
            parsed = parser.parse(file_path=f)
        except Exception as e:  # noqa: BLE001 - any parse failure is the finding
            problem(f"{f}: does not parse: {str(e).splitlines()[0][:300]}")
            continue
        for name, module in (parsed.get("modules") or {}).items():
            if module.get("type") != "local":
                problem(f"{f}: module {name} is not a local file")
                continue
            path = module.get("detail", {}).get("path")
            if not isinstance(path, str) or not (f.parent / path).is_file():
                problem(f"{f}: module {name} refers to missing {path}")
        print(f"bicep: {f.name}: parsed, {len(parsed.get('resources') or {})} resources, "
              f"{len(parsed.get('modules') or {})} modules")


def check_policy(path: Path) -> None:
    p = json.loads(path.read_text())
    kp = p.get("keyProperties", {})
    if kp.get("exportable") is not False:
        problem(f"{path}: keyProperties.exportable must be false")
    if kp.get("keyType") not in ("RSA", "RSA-HSM") or kp.get("keySize") != 2048:
        problem(f"{path}: key must be RSA 2048")
    actions = [a.get("action", {}).get("actionType") for a in p.get("lifetimeActions", [])]
    if "AutoRenew" not in actions:
        problem(f"{path}: no AutoRenew lifetime action")
    if p.get("issuerParameters", {}).get("name") != "Self":
        problem(f"{path}: issuer must be Self (the public part is uploaded to the app registration)")
    print(f"policy: {path.name}: checked")


def pod_spec(obj: dict) -> dict:
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def check_manifests(path: Path, outdir: Path) -> None:
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
        if o["kind"] not in ("Namespace", "PriorityClass") and not o["metadata"].get("namespace"):
            problem(f"{path}: {o['kind']}/{o['metadata']['name']} has no namespace")

    for d in by_kind.get("Deployment", []):
        name = f"Deployment/{d['metadata']['name']}"
        # The HorizontalPodAutoscaler owns the count: a replicas field would reset it on
        # every apply. At least two replicas come from the HPA's minReplicas.
        if "replicas" in d["spec"]:
            problem(f"{name}: sets replicas, which fights the HorizontalPodAutoscaler on every apply")
        hpas = [
            h for h in objs
            if h["kind"] == "HorizontalPodAutoscaler"
            and h["spec"].get("scaleTargetRef", {}).get("kind") == "Deployment"
            and h["spec"]["scaleTargetRef"].get("name") == d["metadata"]["name"]
        ]
        if not hpas:
            problem(f"{name}: no HorizontalPodAutoscaler scales it")
        elif any(h["spec"].get("minReplicas", 1) < 2 for h in hpas):
            problem(f"{name}: its HorizontalPodAutoscaler's minReplicas is below 2")
        ps = pod_spec(d)
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if labels.get("azure.workload.identity/use") != "true":
            problem(f"{name}: pod label azure.workload.identity/use must be \"true\"")
        pc = ps.get("priorityClassName")
        if pc and pc not in {p["metadata"]["name"] for p in by_kind.get("PriorityClass", [])} | {
            "system-cluster-critical", "system-node-critical"
        }:
            print(f"{name}: priorityClassName {pc} is not in the render; it must exist in the cluster")
        if not ps.get("topologySpreadConstraints"):
            problem(f"{name}: no topologySpreadConstraints")
        for c in ps.get("containers", []):
            sc = c.get("securityContext", {})
            want = {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
            }
            for k, v in want.items():
                if sc.get(k) is not v:
                    problem(f"{name}/{c['name']}: securityContext.{k} must be {v}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problem(f"{name}/{c['name']}: capabilities must drop ALL")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problem(f"{name}/{c['name']}: seccompProfile must be RuntimeDefault")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                if "memory" not in res.get(part, {}):
                    problem(f"{name}/{c['name']}: no memory {part}")
            if res.get("requests", {}).get("memory") != res.get("limits", {}).get("memory"):
                problem(f"{name}/{c['name']}: memory request must equal the limit (sized for cache.max_entries)")
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if sleep < 1:
                problem(f"{name}/{c['name']}: no preStop sleep (new connections arrive for a while after SIGTERM)")
            elif ps.get("terminationGracePeriodSeconds", 30) < sleep + 20 + 5:
                problem(f"{name}: terminationGracePeriodSeconds must cover the preStop sleep, the broker's "
                        f"20 s shutdown grace and the audit flush")
            for probe in ("livenessProbe", "readinessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port not in ("admin", 9090):
                    problem(f"{name}/{c['name']}: {probe} must use the admin port")
            if ":latest" in c["image"] or ":" not in c["image"].rsplit("/", 1)[-1]:
                problem(f"{name}/{c['name']}: image {c['image']} needs an explicit tag")

    for sa in by_kind.get("ServiceAccount", []):
        cid = sa["metadata"].get("annotations", {}).get("azure.workload.identity/client-id", "")
        try:
            uuid.UUID(cid)
        except ValueError:
            problem(f"ServiceAccount/{sa['metadata']['name']}: client-id annotation {cid!r} is not a GUID")

    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Service", "ServiceAccount", "ConfigMap"):
        if not by_kind.get(kind):
            problem(f"{path}: no {kind}")
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        if h["spec"].get("minReplicas", 1) < 2:
            problem(f"HorizontalPodAutoscaler/{h['metadata']['name']}: minReplicas below 2")
    for np in by_kind.get("NetworkPolicy", []):
        if set(np["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
            problem(f"NetworkPolicy/{np['metadata']['name']}: must restrict both Ingress and Egress")
        for rule in np["spec"].get("egress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if not ports or not ports <= {53, 443}:
                problem(f"NetworkPolicy/{np['metadata']['name']}: egress rule beyond DNS and 443: {rule}")

    outdir.mkdir(parents=True, exist_ok=True)
    for cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            if not key.endswith(".toml"):
                continue
            try:
                parsed = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                problem(f"ConfigMap/{cm['metadata']['name']}: {key} is not TOML: {e}")
                continue
            if re.search(r"(?i)(secret|password|private[_ ]?key)\s*=", text):
                problem(f"ConfigMap/{cm['metadata']['name']}: {key} looks like it holds a secret")
            if key != "broker.toml":
                continue
            out = outdir / f"{cm['metadata']['name']}.{key}"
            out.write_text(text)
            policy_file = parsed.get("policy", {}).get("file")
            if policy_file:
                inline_policy(cm, out, text, policy_file, by_kind)
    print(f"manifests: {path.name}: {len(objs)} objects checked")


def inline_policy(cm: dict, out: Path, text: str, policy_file: str, by_kind: dict) -> None:
    """The policy file exists only in the pod, so check-config cannot read it. Find the
    ConfigMap the Deployment mounts it from (as a directory: a subPath mount never sees
    the ConfigMap's updates, so the broker's live reload would not either) and write a
    second config with its grants inline ([[policy.grant]]), for check-config to check
    against the tenants."""
    name = f"ConfigMap/{cm['metadata']['name']}"
    found = None
    for d in by_kind.get("Deployment", []):
        ps = pod_spec(d)
        volumes = {v["name"]: v for v in ps.get("volumes", [])}
        for c in ps.get("containers", []):
            for m in c.get("volumeMounts", []):
                mount = m["mountPath"].rstrip("/")
                if policy_file == mount or policy_file.startswith(mount + "/"):
                    if m.get("subPath"):
                        problem(f"Deployment/{d['metadata']['name']}: the policy file {policy_file} is mounted "
                                "with subPath, so the broker never sees the ConfigMap's updates")
                    found = (volumes.get(m["name"], {}), policy_file[len(mount) + 1:])
    if found is None:
        problem(f"{name}: policy file {policy_file} is on no volume the Deployment mounts")
        return
    volume, key = found
    source = volume.get("configMap", {}).get("name")
    if source is None:
        print(f"{name}: policy file {policy_file} is not from a ConfigMap; its grants are not checked here")
        return
    data = next((c.get("data") or {} for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == source), None)
    if data is None or key not in data:
        problem(f"{name}: policy file {policy_file}: ConfigMap/{source} has no key {key!r}")
        return
    grants = data[key]
    try:
        tomllib.loads(grants)
    except tomllib.TOMLDecodeError as e:
        problem(f"ConfigMap/{source}: {key} is not TOML: {e}")
        return
    line = re.compile(r'(?m)^\s*file\s*=\s*"' + re.escape(policy_file) + r'"\s*$')
    if len(line.findall(text)) != 1:
        problem(f"{name}: cannot inline the policy: `file = \"{policy_file}\"` is not one line of its own")
        return
    inlined = line.sub("", text) + "\n" + re.sub(r"(?m)^\s*\[\[grant\]\]", "[[policy.grant]]", grants)
    try:
        tomllib.loads(inlined)
    except tomllib.TOMLDecodeError as e:
        problem(f"{name}: the config with the policy of ConfigMap/{source} inline is not TOML: {e}")
        return
    out.with_name(out.stem + "+policy.toml").write_text(inlined)


def check_commands(path: Path, docs: list[Path]) -> None:
    objs = [o for o in yaml.safe_load_all(path.read_text()) if o]
    restricted = {
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "Namespace"
        and (o["metadata"].get("labels") or {}).get("pod-security.kubernetes.io/enforce") == "restricted"
    }
    checked = 0
    for doc in docs:
        # Shell commands of the document, with their backslash continuations joined.
        text = re.sub(r"\\\n\s*", " ", doc.read_text())
        for n, line in enumerate(text.splitlines(), 1):
            if not re.search(r"\bkubectl\b.*\sdebug\s", line):
                continue
            ns = re.search(r"(?:-n|--namespace)[ =](\S+)", line)
            if not ns or ns.group(1) not in restricted:
                continue
            checked += 1
            # Pod Security admission checks ephemeral containers too: under `restricted`
            # one needs allowPrivilegeEscalation false and all capabilities dropped, which
            # only kubectl's `restricted` debug profile sets.
            if not re.search(r"--profile[ =]restricted\b", line):
                problem(
                    f"{doc}: `kubectl debug` in namespace {ns.group(1)}, which enforces the restricted "
                    f"Pod Security Standard, without --profile=restricted: the ephemeral container "
                    f"is refused: {line.strip()}"
                )
    print(f"commands: {checked} kubectl debug command(s) in restricted namespaces checked")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    what = argv[1]
    if what == "bicep":
        check_bicep(Path(argv[2]))
    elif what == "policy":
        check_policy(Path(argv[2]))
    elif what == "manifests" and len(argv) == 4:
        check_manifests(Path(argv[2]), Path(argv[3]))
    elif what == "commands" and len(argv) >= 4:
        check_commands(Path(argv[2]), [Path(a) for a in argv[3:]])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

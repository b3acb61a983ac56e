#!/usr/bin/env python3
"""Render a kustomization directory to a multi-document YAML stream.

There is no kustomize binary on the project's machines, so CI renders the overlays
with this small, kustomize-compatible subset and validates what it prints. It
supports exactly what deploy/kubernetes uses and refuses anything else, so it cannot
silently render something different from `kubectl apply -k`:

  resources   files and directories (each with its own kustomization.yaml)
  components  directories with `kind: Component` (resources and patches)
  namespace   set on every namespaced object
  images      name -> newName / newTag / digest, on (init)containers of pod templates
  patches     `path:` or inline `patch:`; a YAML map is a strategic-merge patch
              (matched by kind and name), a YAML list is a JSON 6902 patch (`target:`
              with kind and name; ops add, replace, remove)

Strategic merge follows Kubernetes' merge keys for the lists used here (containers,
volumes, env and ports by their keys, volumeMounts by mountPath); other lists are
replaced, a null value deletes a key, and `$patch` directives are refused.

Usage: render.py DIR [-o FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
ALLOWED_KEYS = {"apiVersion", "kind", "resources", "components", "namespace", "images", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
# (list field name) -> merge key, as in the Kubernetes API's patchMergeKey.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
    "topologySpreadConstraints": "topologyKey",
}


class RenderError(Exception):
    pass


def load_yaml_docs(path: Path) -> list[dict]:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return docs


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        p = directory / name
        if p.is_file():
            return p
    raise RenderError(f"{directory}: no kustomization.yaml")


def obj_id(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"].get("name", "")


def merge_key_for(field: str, items: list) -> str | None:
    if field == "ports" and items and isinstance(items[0], dict):
        return "containerPort" if "containerPort" in items[0] else "port"
    return MERGE_KEYS.get(field)


def strategic_merge(base, patch, field: str = ""):
    if isinstance(patch, dict):
        if "$patch" in patch or any(k.startswith("$") for k in patch):
            raise RenderError(f"strategic-merge directives are not supported (in {field or 'patch'})")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        key = merge_key_for(field, base or patch)
        if key is None:
            return copy.deepcopy(patch)
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise RenderError(f"{field}: patch item without merge key {key}")
            for i, existing in enumerate(out):
                if existing.get(key) == item[key]:
                    out[i] = strategic_merge(existing, item, "")
                    break
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def json_pointer(path: str) -> list:
    if not path.startswith("/"):
        raise RenderError(f"JSON patch path must start with /: {path}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    return parts


def json6902(obj: dict, ops: list) -> dict:
    obj = copy.deepcopy(obj)
    for op in ops:
        kind = op.get("op")
        if kind not in ("add", "replace", "remove"):
            raise RenderError(f"unsupported JSON patch op {kind!r}")
        parts = json_pointer(op["path"])
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        if isinstance(parent, list):
            if last == "-" and kind == "add":
                parent.append(copy.deepcopy(op["value"]))
                continue
            idx = int(last)
            if not 0 <= idx < len(parent) + (1 if kind == "add" else 0):
                raise RenderError(f"JSON patch path {op['path']}: index out of range")
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            else:
                del parent[idx]
        else:
            if kind != "add" and last not in parent:
                raise RenderError(f"JSON patch path {op['path']} does not exist")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
    return obj


def apply_patch(objs: list[dict], entry: dict, base_dir: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise RenderError(f"patch entry: unsupported fields {sorted(unknown)}")
    if "path" in entry:
        text = (base_dir / entry["path"]).read_text()
    elif "patch" in entry:
        text = entry["patch"]
    else:
        raise RenderError("patch entry needs path or patch")
    patch = yaml.safe_load(text)
    target = entry.get("target")
    if target is not None:
        unknown = set(target) - {"kind", "name"}
        if unknown:
            raise RenderError(f"patch target: only kind and name are supported, not {sorted(unknown)}")
    if isinstance(patch, list):
        if not target:
            raise RenderError("a JSON 6902 patch needs a target")
        matches = [
            i
            for i, o in enumerate(objs)
            if o["kind"] == target.get("kind", o["kind"]) and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        if not matches:
            raise RenderError(f"patch target {target} matches nothing")
        for i in matches:
            objs[i] = json6902(objs[i], patch)
        return
    if not isinstance(patch, dict) or "kind" not in patch:
        raise RenderError("a strategic-merge patch must be one Kubernetes object")
    want = obj_id(patch)
    for i, o in enumerate(objs):
        if obj_id(o) == want:
            objs[i] = strategic_merge(o, patch)
            return
    raise RenderError(f"strategic-merge patch for {want} matches no resource")


def set_images(objs: list[dict], images: list[dict]) -> None:
    def containers(obj):
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec") if "template" in spec else None
        if obj["kind"] == "Pod":
            pod = spec
        if obj["kind"] == "CronJob":
            pod = spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        if not pod:
            return []
        return pod.get("containers", []) + pod.get("initContainers", [])

    used = set()
    for obj in objs:
        for c in containers(obj):
            image = c["image"]
            name = image.split("@", 1)[0]
            if ":" in name.rsplit("/", 1)[-1]:
                name = name.rsplit(":", 1)[0]
            for img in images:
                unknown = set(img) - {"name", "newName", "newTag", "digest"}
                if unknown:
                    raise RenderError(f"images: unsupported fields {sorted(unknown)}")
                if img["name"] != name:
                    continue
                used.add(img["name"])
                new = img.get("newName", name)
                if "digest" in img:
                    tag = f":{img['newTag']}" if "newTag" in img else ""
                    c["image"] = f"{new}{tag}@{img['digest']}"
                else:
                    tag = img.get("newTag")
                    if tag is None and ":" in image.rsplit("/", 1)[-1]:
                        tag = image.rsplit(":", 1)[1]
                    c["image"] = f"{new}:{tag}" if tag else new
    missing = {i["name"] for i in images} - used
    if missing:
        raise RenderError(f"images {sorted(missing)} match no container")


def render(directory: Path, expect_kind: str = "Kustomization") -> list[dict]:
    kfile = find_kustomization(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - ALLOWED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported fields {sorted(unknown)} (render.py supports {sorted(ALLOWED_KEYS)})")
    if k.get("kind", "Kustomization") != expect_kind:
        raise RenderError(f"{kfile}: expected kind {expect_kind}, found {k.get('kind')}")
    objs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        if p.is_dir():
            objs.extend(render(p))
        elif p.is_file():
            objs.extend(load_yaml_docs(p))
        else:
            raise RenderError(f"{kfile}: resource {res} not found")
    for comp in k.get("components", []):
        p = (directory / comp).resolve()
        comp_objs = render_component(p, objs)
        objs = comp_objs
    seen = set()
    for o in objs:
        if obj_id(o) in seen:
            raise RenderError(f"{kfile}: duplicate resource {obj_id(o)}")
        seen.add(obj_id(o))
    for entry in k.get("patches", []):
        apply_patch(objs, entry, directory)
    if "images" in k:
        set_images(objs, k["images"])
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    return objs


def render_component(directory: Path, objs: list[dict]) -> list[dict]:
    kfile = find_kustomization(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    if k.get("kind") != "Component":
        raise RenderError(f"{kfile}: a component needs kind: Component")
    unknown = set(k) - ALLOWED_KEYS - {"namespace"}
    if unknown or "namespace" in k:
        raise RenderError(f"{kfile}: unsupported fields in a component")
    out = list(objs)
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        out.extend(render(p) if p.is_dir() else load_yaml_docs(p))
    for entry in k.get("patches", []):
        apply_patch(out, entry, directory)
    if "images" in k:
        set_images(out, k["images"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    try:
        objs = render(args.directory)
    except (RenderError, OSError, yaml.YAMLError, KeyError, ValueError, IndexError) as e:
        print(f"render.py: {args.directory}: {e}", file=sys.stderr)
        return 1
    text = yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

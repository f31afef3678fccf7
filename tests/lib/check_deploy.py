#!/usr/bin/env python3
"""Structural check of deploy/: the Kubernetes manifest and the Coder Terraform template.

`kubectl apply --dry-run=client` cannot run here: kubectl needs an API server for discovery even in client
dry-run mode, and no cluster exists on the test machines. So this script checks what matters offline: the YAML
parses, each object has the fields Kubernetes requires, no key is misspelt (known-field lists for the parts we
use), references resolve (volume mounts -> volumes -> PVC), and the pod matches the envbox contract
(docs/deploy.md): command, privileged, grace period > CODER_SHUTDOWN_TIMEOUT, Downward API for CPUs and memory,
the stock template's PVC sub-paths plus envbox's cache/state dirs on them, emptyDir /var/lib/sysbox, read-only
/usr/src and /lib/modules. The Terraform template is parsed (a small HCL block parser) and must describe the
same pod: same env names, same mounts.

Usage: check_deploy.py DEPLOY_DIR   (exit 0 when everything holds; one line per problem otherwise)
"""
import re
import sys
from pathlib import Path

import yaml

PROBLEMS = []


def problem(msg):
    PROBLEMS.append(msg)


# Mount path -> (volume kind, sub-path) of the stock template (envbox-behaviour.md §7).
STOCK_MOUNTS = {
    "/home/coder": ("pvc", "home"),
    "/var/lib/coder/docker": ("pvc", "cache/docker"),
    "/var/lib/coder/containers": ("pvc", "cache/containers"),
    "/var/lib/containers": ("pvc", "envbox/containers"),
    "/var/lib/docker": ("pvc", "envbox/docker"),
    "/var/lib/sysbox": ("emptyDir", None),
    "/usr/src": ("hostPath", None),
    "/lib/modules": ("hostPath", None),
}
STOCK_ENV = {
    "CODER_AGENT_TOKEN", "CODER_AGENT_URL", "CODER_INNER_IMAGE", "CODER_INNER_USERNAME",
    "CODER_BOOTSTRAP_SCRIPT", "CODER_MOUNTS", "CODER_ADD_FUSE", "CODER_ADD_TUN", "CODER_INNER_HOSTNAME",
    "CODER_CPUS", "CODER_MEMORY",
}
ENVBOX_ENV = {"CODER_CACHE_DIR", "CODER_STATE_DIR", "CODER_SHUTDOWN_TIMEOUT"}
DEFAULT_SHUTDOWN_TIMEOUT = 25

POD_SPEC_KEYS = {
    "containers", "initContainers", "volumes", "restartPolicy", "terminationGracePeriodSeconds", "nodeSelector",
    "affinity", "tolerations", "serviceAccountName", "securityContext", "hostname", "subdomain", "dnsPolicy",
    "priorityClassName", "runtimeClassName", "imagePullSecrets", "automountServiceAccountToken",
    "enableServiceLinks", "activeDeadlineSeconds", "hostNetwork", "hostPID", "hostIPC", "schedulerName",
}
CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "resources", "securityContext",
    "volumeMounts", "volumeDevices", "ports", "workingDir", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "terminationMessagePath", "terminationMessagePolicy", "stdin", "tty",
}
MOUNT_KEYS = {"name", "mountPath", "subPath", "subPathExpr", "readOnly", "mountPropagation"}
VOLUME_SOURCES = {"persistentVolumeClaim", "emptyDir", "hostPath", "secret", "configMap", "projected", "csi",
                  "ephemeral", "downwardAPI", "nfs"}
HOSTPATH_TYPES = {"", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                  "BlockDevice"}


def check_unknown(obj, known, where):
    for k in obj:
        if k not in known:
            problem(f"{where}: unknown field {k!r}")


def check_pod_spec(spec, where, pvcs):
    check_unknown(spec, POD_SPEC_KEYS, where)
    volumes = {}
    for i, v in enumerate(spec.get("volumes") or []):
        if "name" not in v:
            problem(f"{where}.volumes[{i}]: no name")
            continue
        sources = [k for k in v if k != "name"]
        if len(sources) != 1 or sources[0] not in VOLUME_SOURCES:
            problem(f"{where}.volumes[{v['name']}]: needs exactly one known source, has {sources}")
            continue
        kind = sources[0]
        if kind == "persistentVolumeClaim":
            claim = (v[kind] or {}).get("claimName")
            if claim not in pvcs:
                problem(f"{where}.volumes[{v['name']}]: claim {claim!r} is not a PVC of the file")
            kind = "pvc"
        if kind == "hostPath":
            hp = v["hostPath"] or {}
            if not str(hp.get("path", "")).startswith("/"):
                problem(f"{where}.volumes[{v['name']}]: hostPath.path must be absolute")
            if hp.get("type", "") not in HOSTPATH_TYPES:
                problem(f"{where}.volumes[{v['name']}]: bad hostPath.type {hp.get('type')!r}")
        volumes[v["name"]] = kind

    grace = spec.get("terminationGracePeriodSeconds")
    containers = spec.get("containers") or []
    if not containers:
        problem(f"{where}: no containers")
    for c in containers:
        cw = f"{where}.containers[{c.get('name', '?')}]"
        check_unknown(c, CONTAINER_KEYS, cw)
        for req in ("name", "image"):
            if not c.get(req):
                problem(f"{cw}: {req} is required")
        if c.get("command") != ["/envbox", "docker"]:
            problem(f"{cw}: command must be [/envbox, docker] (as for the Go image), is {c.get('command')}")
        if (c.get("securityContext") or {}).get("privileged") is not True:
            problem(f"{cw}: must be privileged (sysbox)")
        limits = (c.get("resources") or {}).get("limits") or {}
        for r in ("cpu", "memory"):
            if r not in limits:
                problem(f"{cw}: resources.limits.{r} missing (the Downward API reads it)")
        env = {}
        for e in c.get("env") or []:
            if "name" not in e:
                problem(f"{cw}: env entry without name")
                continue
            if ("value" in e) == ("valueFrom" in e):
                problem(f"{cw}: env {e['name']}: exactly one of value / valueFrom")
            if "value" in e and not isinstance(e["value"], str):
                problem(f"{cw}: env {e['name']}: value must be a string (quote it), is {e['value']!r}")
            env[e["name"]] = e
        for name in sorted(STOCK_ENV - env.keys()):
            problem(f"{cw}: env {name} missing (stock template)")
        for name, res in (("CODER_CPUS", "limits.cpu"), ("CODER_MEMORY", "limits.memory")):
            ref = ((env.get(name) or {}).get("valueFrom") or {}).get("resourceFieldRef") or {}
            if ref.get("resource") != res:
                problem(f"{cw}: {name} must come from the Downward API resourceFieldRef {res}")
        timeout = int((env.get("CODER_SHUTDOWN_TIMEOUT") or {}).get("value", DEFAULT_SHUTDOWN_TIMEOUT))
        effective_grace = 30 if grace is None else grace
        if not effective_grace >= max(30, timeout + 5):
            problem(f"{where}: terminationGracePeriodSeconds {effective_grace} must be >= max(30, "
                    f"CODER_SHUTDOWN_TIMEOUT {timeout} + 5)")

        mounts = {}
        for m in c.get("volumeMounts") or []:
            check_unknown(m, MOUNT_KEYS, f"{cw}.volumeMounts[{m.get('mountPath')}]")
            if m.get("name") not in volumes:
                problem(f"{cw}: volumeMount {m.get('mountPath')} names unknown volume {m.get('name')!r}")
                continue
            mounts[m["mountPath"]] = m
        for path, (kind, sub) in STOCK_MOUNTS.items():
            m = mounts.get(path)
            if m is None:
                problem(f"{cw}: no volume at {path} (stock template)")
                continue
            if volumes[m["name"]] != kind or m.get("subPath") != sub:
                problem(f"{cw}: {path} must be {kind} sub-path {sub}, is {volumes[m['name']]} {m.get('subPath')}")
            if kind == "hostPath" and m.get("readOnly") is not True:
                problem(f"{cw}: {path} must be mounted readOnly")
        # envbox's cache and state must be on the PVC (never the image's overlayfs).
        for name, default in (("CODER_CACHE_DIR", "/var/lib/docker/envbox"),
                              ("CODER_STATE_DIR", "/var/lib/containers/envbox")):
            path = (env.get(name) or {}).get("value", default)
            backing = max((p for p in mounts if path == p or path.startswith(p.rstrip("/") + "/")),
                          key=len, default=None)
            if backing is None or volumes[mounts[backing]["name"]] not in ("pvc", "hostPath"):
                problem(f"{cw}: {name}={path} is not on the PVC (or a node hostPath)")
    return volumes


def check_manifest(path):
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        problem(f"{path}: YAML: {e}")
        return None
    pvcs = set()
    pod = None
    for i, d in enumerate(docs):
        where = f"{path.name}[{i}]"
        for req in ("apiVersion", "kind", "metadata"):
            if req not in d:
                problem(f"{where}: {req} is required")
        if not (d.get("metadata") or {}).get("name"):
            problem(f"{where}: metadata.name is required")
        kind = d.get("kind")
        if kind == "PersistentVolumeClaim":
            spec = d.get("spec") or {}
            if not spec.get("accessModes") or not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
                problem(f"{where}: PVC needs accessModes and resources.requests.storage")
            pvcs.add(d["metadata"]["name"])
        elif kind == "Pod":
            pod = (d.get("spec") or {}, where)
        elif kind == "StatefulSet":
            tmpl = ((d.get("spec") or {}).get("template") or {})
            pod = (tmpl.get("spec") or {}, where + ".spec.template")
            for t in (d.get("spec") or {}).get("volumeClaimTemplates") or []:
                pvcs.add(t["metadata"]["name"])
        else:
            problem(f"{where}: unexpected kind {kind}")
    if pod is None:
        problem(f"{path}: no Pod or StatefulSet")
        return None
    spec, where = pod
    if spec.get("restartPolicy") not in (None, "Never", "Always", "OnFailure"):
        problem(f"{where}: bad restartPolicy")
    check_pod_spec(spec, where, pvcs)
    env = {e["name"] for c in spec.get("containers") or [] for e in c.get("env") or [] if "name" in e}
    mounts = {(m.get("mountPath"), m.get("subPath")) for c in spec.get("containers") or []
              for m in c.get("volumeMounts") or []}
    return env, mounts


# --- a small HCL reader: blocks and attributes, enough to compare the template with the manifest -------------

def hcl_parse(text):
    """Returns a list of (kind, labels, body) for blocks and ('=', name, raw value) for attributes."""
    pos = 0
    n = len(text)

    def skip_ws(p, newlines=True):
        while p < n:
            ch = text[p]
            if ch == "#" or text.startswith("//", p):
                while p < n and text[p] != "\n":
                    p += 1
            elif ch in " \t\r" or (newlines and ch == "\n"):
                p += 1
            else:
                break
        return p

    def read_value(p):
        """Raw text of an expression up to the end of line at bracket depth 0; handles strings and heredocs."""
        start = p
        depth = 0
        while p < n:
            ch = text[p]
            if ch == '"':
                p += 1
                while p < n and text[p] != '"':
                    p += 2 if text[p] == "\\" else 1
                p += 1
                continue
            if text.startswith("<<", p):
                m = re.match(r"<<-?([A-Za-z_]+)\n", text[p:])
                if m:
                    end = re.compile(r"^\s*" + m.group(1) + r"\s*$", re.M).search(text, p + m.end())
                    if not end:
                        raise ValueError(f"unterminated heredoc {m.group(1)}")
                    p = end.end()
                    continue
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "\n" and depth == 0:
                break
            elif ch == "#" and depth >= 0:
                # A comment at the end of a value.
                while p < n and text[p] != "\n":
                    p += 1
                continue
            p += 1
        if depth != 0:
            raise ValueError(f"unbalanced brackets in value at offset {start}")
        return text[start:p].strip(), p

    def parse_body(p, closing):
        items = []
        while True:
            p = skip_ws(p)
            if p >= n:
                if closing:
                    raise ValueError("missing }")
                return items, p
            if text[p] == "}":
                if not closing:
                    raise ValueError(f"unexpected }} at offset {p}")
                return items, p + 1
            m = re.compile(r'[A-Za-z_][\w-]*').match(text, p)
            if not m:
                raise ValueError(f"unexpected {text[p:p + 20]!r} at offset {p}")
            name = m.group(0)
            p = skip_ws(m.end(), newlines=False)
            if p < n and text[p] == "=":
                value, p = read_value(skip_ws(p + 1, newlines=False))
                items.append(("=", name, value))
                continue
            labels = []
            while True:
                p = skip_ws(p, newlines=False)
                lm = re.compile(r'"([^"]*)"|([A-Za-z_][\w-]*)').match(text, p)
                if p < n and text[p] == "{":
                    break
                if not lm:
                    raise ValueError(f"bad block header for {name} at offset {p}")
                labels.append(lm.group(1) if lm.group(1) is not None else lm.group(2))
                p = lm.end()
            body, p = parse_body(p + 1, True)
            items.append((name, labels, body))

    items, _ = parse_body(pos, False)
    return items


def blocks(items, kind, label0=None):
    return [b for b in items if b[0] == kind and (label0 is None or (b[1] and b[1][0] == label0))]


def attr(items, name):
    for it in items:
        if it[0] == "=" and it[1] == name:
            return it[2]
    return None


def unquote(v):
    return v[1:-1] if v and v.startswith('"') and v.endswith('"') else v


def check_template(path, manifest):
    try:
        items = hcl_parse(path.read_text())
    except ValueError as e:
        problem(f"{path}: HCL: {e}")
        return
    # The Coder registry's current kubernetes-envbox template uses the kubernetes provider's v1
    # resources (the unversioned ones are deprecated).
    for old in ("kubernetes_pod", "kubernetes_persistent_volume_claim"):
        if blocks(items, "resource", old):
            problem(f"{path}: resource {old} is deprecated; use {old}_v1 as the registry's template does")
    if len(blocks(items, "resource", "kubernetes_persistent_volume_claim_v1")) != 1:
        problem(f"{path}: expected one kubernetes_persistent_volume_claim_v1 resource (the home PVC)")
    # arm64 nodes: the agent's architecture must not be fixed to one.
    for agent in blocks(items, "resource", "coder_agent"):
        arch = attr(agent[2], "arch")
        if arch is None or arch.startswith('"'):
            problem(f"{path}: coder_agent arch is {arch}: take it from data.coder_provisioner, not a literal")
    pods = blocks(items, "resource", "kubernetes_pod_v1")
    if len(pods) != 1:
        problem(f"{path}: expected one kubernetes_pod_v1 resource, found {len(pods)}")
        return
    spec = blocks(pods[0][2], "spec")[0][2]
    if attr(spec, "restart_policy") != '"Never"':
        problem(f"{path}: restart_policy must be Never (stock template)")
    grace = attr(spec, "termination_grace_period_seconds")
    local_grace = None
    for lb in blocks(items, "locals"):
        local_grace = attr(lb[2], "termination_grace_period") or local_grace
    if grace != "local.termination_grace_period" or local_grace is None or \
            not re.fullmatch(r"max\(30,\s*var\.shutdown_timeout\s*\+\s*5\)", local_grace):
        problem(f"{path}: termination_grace_period_seconds must be max(30, var.shutdown_timeout + 5)")
    shutdown_var = [v for v in blocks(items, "variable", "shutdown_timeout")]
    if not shutdown_var or attr(shutdown_var[0][2], "default") != str(DEFAULT_SHUTDOWN_TIMEOUT):
        problem(f"{path}: variable shutdown_timeout must default to {DEFAULT_SHUTDOWN_TIMEOUT}")
    container = blocks(spec, "container")[0][2]
    if attr(container, "command") != '["/envbox", "docker"]':
        problem(f"{path}: command must be [\"/envbox\", \"docker\"]")
    sc = blocks(container, "security_context")
    if not sc or attr(sc[0][2], "privileged") != "true":
        problem(f"{path}: container must be privileged")
    env = {}
    for e in blocks(container, "env"):
        env[unquote(attr(e[2], "name"))] = e[2]
    for name, res in (("CODER_CPUS", "limits.cpu"), ("CODER_MEMORY", "limits.memory")):
        vf = blocks(env.get(name, []), "value_from")
        rf = blocks(vf[0][2], "resource_field_ref") if vf else []
        if not rf or unquote(attr(rf[0][2], "resource")) != res:
            problem(f"{path}: {name} must come from resource_field_ref {res}")
    if attr(env.get("CODER_SHUTDOWN_TIMEOUT", []), "value") != "tostring(var.shutdown_timeout)":
        problem(f"{path}: CODER_SHUTDOWN_TIMEOUT must be var.shutdown_timeout (the grace period derives from it)")
    mounts = set()
    ro = {}
    for vm in blocks(container, "volume_mount"):
        mp = unquote(attr(vm[2], "mount_path"))
        mounts.add((mp, unquote(attr(vm[2], "sub_path"))))
        ro[mp] = attr(vm[2], "read_only")
    dyn = [d for d in blocks(container, "dynamic", "volume_mount")]
    if not dyn:
        problem(f"{path}: the optional node cache (dynamic volume_mount) is missing")
    for p in ("/usr/src", "/lib/modules"):
        if ro.get(p) != "true":
            problem(f"{path}: {p} must be read_only")
    volumes = {unquote(attr(v[2], "name")): v[2] for v in blocks(spec, "volume")}
    if not blocks(volumes.get("sysbox", []), "empty_dir"):
        problem(f"{path}: volume sysbox must be an empty_dir")
    dyn_vol = blocks(spec, "dynamic", "volume")
    if not dyn_vol or not blocks(blocks(dyn_vol[0][2], "content")[0][2], "host_path"):
        problem(f"{path}: the optional node cache must be a host_path volume")
    if manifest:
        menv, mmounts = manifest
        if set(env) != menv:
            problem(f"{path}: env differs from the manifest: only in template {sorted(set(env) - menv)}, "
                    f"only in manifest {sorted(menv - set(env))}")
        if mounts != mmounts:
            problem(f"{path}: mounts differ from the manifest: {sorted(mounts ^ mmounts, key=str)}")
    for name in sorted(STOCK_ENV | ENVBOX_ENV):
        if name not in env:
            problem(f"{path}: env {name} missing")


def main():
    deploy = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy")
    manifest = check_manifest(deploy / "kubernetes" / "workspace.yaml")
    check_template(deploy / "coder-template" / "main.tf", manifest)
    for p in PROBLEMS:
        print(p)
    if PROBLEMS:
        print(f"{len(PROBLEMS)} problem(s) in {deploy}")
        return 1
    print(f"{deploy}: manifest and template OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

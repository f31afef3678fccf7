#!/usr/bin/env python3
"""Builds a small OCI image layout by hand, for registry tests: exact media types, any compression.

Usage: make_oci.py OUT TAG ARCH=LAYER[+LAYER...] [ARCH=...]
  LAYER is COMP:NAME=CONTENT[,NAME=CONTENT...] with COMP one of gzip, zstd, tar (uncompressed),
  CONTENT literal text or random:N (N random bytes, so that every build is a distinct blob).
One ARCH makes OUT:TAG an image manifest; several make it an image index (linux/ARCH each).
Push with `skopeo copy --all --preserve-digests oci:OUT:TAG docker://...`: without it, skopeo
gzips uncompressed layers on the way to a registry (and the digests change).
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MT = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "tar": "application/vnd.oci.image.layer.v1.tar",
}


def put_blob(out, data: bytes) -> str:
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(out, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d


def desc(media_type, digest, size, **extra):
    d = {"mediaType": media_type, "digest": digest, "size": size}
    d.update(extra)
    return d


def make_tar(files) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, content in files:
            data = os.urandom(int(content[7:])) if content.startswith("random:") else content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1700000000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(comp, raw: bytes) -> bytes:
    if comp == "tar":
        return raw
    if comp == "gzip":
        return gzip.compress(raw, mtime=0)
    if comp == "zstd":
        # The harness's own tool, not envbox: waiting on it is fine here.
        return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    raise SystemExit(f"unknown compression {comp}")


def make_image(out, arch, spec):
    layers, diff_ids = [], []
    for layer in spec.split("+"):
        comp, files = layer.split(":", 1)
        pairs = [f.split("=", 1) for f in files.split(",")]
        raw = make_tar(pairs)
        blob = compress(comp, raw)
        layers.append(desc(MT[comp], put_blob(out, blob), len(blob)))
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cb = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", put_blob(out, cb), len(cb)),
        "layers": layers,
    }
    mb = json.dumps(manifest).encode()
    return desc("application/vnd.oci.image.manifest.v1+json", put_blob(out, mb), len(mb),
                platform={"architecture": arch, "os": "linux"})


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    out, tag, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    manifests = [make_image(out, *a.split("=", 1)) for a in images]
    if len(manifests) == 1:
        top = manifests[0]
    else:
        ib = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": manifests}).encode()
        top = desc("application/vnd.oci.image.index.v1+json", put_blob(out, ib), len(ib))
    top = dict(top)
    top.pop("platform", None)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    print(top["digest"])


if __name__ == "__main__":
    main()

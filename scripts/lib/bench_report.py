#!/usr/bin/env python3
"""Summarises scripts/bench's samples: medians and spread, ratios against the baselines, the targets of
issue #10 (and the benchmark parts of #3/#4). Prints a Markdown table; writes results.json.

Usage: bench_report.py BENCH_OUT_DIR   (reads samples.jsonl and facts.jsonl there)
"""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
samples = {}
for line in (out / "samples.jsonl").read_text().splitlines():
    if line.strip():
        s = json.loads(line)
        samples.setdefault(s["metric"], []).append(s["value"])
facts = {}
if (out / "facts.jsonl").exists():
    for line in (out / "facts.jsonl").read_text().splitlines():
        if line.strip():
            f = json.loads(line)
            facts[f["key"]] = f["value"]


def stats(metric):
    v = samples.get(metric)
    if not v:
        return None
    return {
        "n": len(v),
        "median": statistics.median(v),
        "min": min(v),
        "max": max(v),
        "samples": v,
    }


def med(metric):
    s = stats(metric)
    return None if s is None else s["median"]


def fmt(metric, unit):
    s = stats(metric)
    if s is None:
        return "–"
    if unit == "s":
        f = lambda x: f"{x:.2f}" if abs(s["median"]) >= 0.1 else f"{x:.3f}"
        suffix = " s"
    elif unit == "MiB":
        f = lambda x: f"{x / 1024:.1f}"
        suffix = " MiB"
    else:
        f = lambda x: f"{x:g}"
        suffix = ""
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{f(s['median'])}{suffix} (n={s['n']})"
    return f"{f(s['median'])}{suffix} [{f(s['min'])}–{f(s['max'])}] (n={s['n']})"


def ratio(a, b):
    a, b = med(a), med(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


rows = []
checks = []


def row(figure, ours, ours_unit, base=None, base_label="", base_unit=None, target="", check=None, note=""):
    r = ratio(ours, base) if base else None
    verdict = ""
    if check is not None:
        ok = check()
        if ok is not None:
            verdict = "met" if ok else "NOT met"
            checks.append({"figure": figure, "target": target, "met": ok})
    rows.append(
        {
            "figure": figure,
            "envbox_metric": ours,
            "envbox": stats(ours),
            "envbox_text": fmt(ours, ours_unit),
            "baseline_label": base_label,
            "baseline_metric": base,
            "baseline": stats(base) if base else None,
            "baseline_text": (base_label + ": " + fmt(base, base_unit or ours_unit)) if base else "",
            "ratio": r,
            "target": target,
            "verdict": verdict,
            "note": note,
        }
    )


def lt(metric, limit):
    return lambda: None if med(metric) is None else med(metric) <= limit


def rat(a, b, limit):
    return lambda: None if ratio(a, b) is None else ratio(a, b) <= limit


def both(*fs):
    def f():
        vals = [g() for g in fs]
        return None if any(v is None for v in vals) else all(vals)

    return f


# 10.1 / 10.2
PHASES = [
    ("launch", "pod start → envbox pulling (process start, checks, credentials)"),
    ("pull", "pull: manifest, config, blobs (verified)"),
    ("prep", "root filesystem: unpack + overlay mount"),
    ("create", "image facts, bundle, runtime create, network"),
    ("start", "runtime start"),
    ("bootstrap", "bootstrap exec → its first command"),
]
row("Cold start, empty cache → bootstrap running", "cold.envbox_s", "s", "cold.dockerd_s", "dockerd path", "s",
    "≤ 0.6× dockerd path", rat("cold.envbox_s", "cold.dockerd_s", 0.6))
for key, label in PHASES:
    row(f"  cold: {label}", f"cold.envbox_phase_{key}_s", "s")
row("Warm start, cache populated → bootstrap running", "warm.envbox_s", "s", "warm.dockerd_s", "dockerd restarted, image kept", "s",
    "≤ 0.2× and < 1 s", both(rat("warm.envbox_s", "warm.dockerd_s", 0.2), lambda: None if med("warm.envbox_s") is None else med("warm.envbox_s") < 1.0))
for key, label in PHASES:
    row(f"  warm: {label}", f"warm.envbox_phase_{key}_s", "s")
row("Warm rootfs prep vs cold", "warm.envbox_phase_prep_s", "s", "cold.envbox_phase_prep_s", "cold prep", "s",
    "< 2% of cold", rat("warm.envbox_phase_prep_s", "cold.envbox_phase_prep_s", 0.02))
# 10.4
row("Memory once running: envbox PID 1 RSS", "mem.envbox_pid1_rss_kib", "MiB", target="≤ 10 MiB",
    check=lt("mem.envbox_pid1_rss_kib", 10 * 1024))
row("Memory once running: envbox PID 1 PSS", "mem.envbox_pid1_pss_kib", "MiB")
row("Memory once running: pod side RSS (envbox + helpers)", "mem.envbox_rss_kib", "MiB", "mem.dockerd_rss_kib",
    "dockerd+containerd+shims", "MiB")
row("Memory once running: pod side PSS", "mem.envbox_pss_kib", "MiB", "mem.dockerd_pss_kib", "dockerd+containerd+shims", "MiB")
# 10.5
row("Shutdown SIGTERM → exit, prompt PID 1 (busybox)", "stop.envbox_busybox_s", "s")
row("Shutdown SIGTERM → exit, Debian systemd", "stop.envbox_debian_s", "s", "stop.dockerd_cold_s",
    "docker stop (SIGKILL) + dockerd exit", "s", note="the Go envbox SIGKILLs dockerd, nothing stops in order")
# 10.3 / #3
row("Pull + unpack (envbox pull), empty cache", "pull.envbox_s", "s", "pull.skopeo_umoci_s", "skopeo copy + umoci unpack", "s",
    "≤ 0.5× skopeo+umoci", rat("pull.envbox_s", "pull.skopeo_umoci_s", 0.5))
row("  vs docker pull (userns-remap)", "pull.envbox_s", "s", "pull.docker_s", "docker pull", "s")
row("  vs tar floor (tar -xzf of the blobs)", "pull.envbox_s", "s", "pull.tar_s", "tar -xzf", "s")
row("  skopeo copy alone / umoci unpack alone", "pull.skopeo_s", "s", "pull.umoci_s", "umoci unpack", "s")
row("Peak RSS of envbox pull (cold)", "pull.envbox_peak_rss_kib", "MiB", target="≤ 40 MiB",
    check=lt("pull.envbox_peak_rss_kib", 40 * 1024))
row("Warm re-pull: blob requests", "pull.envbox_repull_blob_requests", "", target="0",
    check=lt("pull.envbox_repull_blob_requests", 0))
row("Warm re-pull: time", "pull.envbox_repull_s", "s")
# #4
row("Unpack only (blobs cached)", "unpack.envbox_s", "s", "unpack.umoci_s", "umoci unpack", "s",
    "≤ 0.5× umoci", rat("unpack.envbox_s", "unpack.umoci_s", 0.5))
row("  vs tar floor", "unpack.envbox_s", "s", "unpack.tar_s", "tar -xzf", "s",
    "≤ 1.3× tar floor", rat("unpack.envbox_s", "unpack.tar_s", 1.3))
row("  CPU time in user space", "unpack.envbox_user_s", "s", "unpack.tar_user_s", "tar + gzip", "s")
row("  CPU time in the kernel", "unpack.envbox_sys_s", "s", "unpack.tar_sys_s", "tar + gzip", "s")
row("  gzip -dc alone (decompression floor)", "unpack.gunzip_s", "s")
row("Peak RSS of envbox unpack", "unpack.envbox_peak_rss_kib", "MiB", target="≤ 40 MiB",
    check=lt("unpack.envbox_peak_rss_kib", 40 * 1024))

# Rows with no data at all (a sub-command that did not measure them) are left out of the table.
shown = [r for r in rows if r["envbox"] is not None]

lines = []
lines.append("| Figure | envbox | Baseline | Ratio | Target | Verdict |")
lines.append("|---|---|---|---|---|---|")
for r in shown:
    rt = "" if r["ratio"] is None else (f"{r['ratio']:.2f}×" if r["ratio"] >= 0.1 else f"{r['ratio']:.3f}×")
    base = r["baseline_text"]
    if r["note"]:
        base += f" ({r['note']})"
    lines.append(f"| {r['figure']} | {r['envbox_text']} | {base} | {rt} | {r['target']} | {r['verdict']} |")
sysbox = facts.get("sysbox")
if sysbox and facts.get("what") in ("all", "start"):
    lines.append(f"| With sysbox-runc (#10.6) | {sysbox} | | | | |")
elif stats("sysbox_cold.envbox_s"):
    lines.append(f"| With sysbox-runc, cold | {fmt('sysbox_cold.envbox_s', 's')} | | | | |")
    lines.append(f"| With sysbox-runc, warm | {fmt('sysbox_warm.envbox_s', 's')} | | | | |")

print("\n".join(lines))
print()
print(
    "Medians [min–max] of n alternated runs. Image: {} ({} layer(s), {:.0f} MB compressed, {:.0f} MB unpacked). "
    "Machine: {}; load before/after {} / {}; {} s in all. Commit {}. {}.".format(
        facts.get("image", "?"),
        facts.get("image_layers", "?"),
        int(facts.get("image_compressed_bytes", 0)) / 1e6,
        int(facts.get("image_uncompressed_bytes", 0)) / 1e6,
        facts.get("machine", "?"),
        facts.get("load_before", "?"),
        facts.get("load_after", "?"),
        facts.get("duration_s", "?"),
        facts.get("commit", "?"),
        facts.get("versions", ""),
    )
)

result = {
    "facts": facts,
    "figures": rows,
    "targets": checks,
    "metrics": {m: stats(m) for m in sorted(samples)},
}
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"\nJSON: {out / 'results.json'}", file=sys.stderr)

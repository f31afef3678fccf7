//! GPU workspaces (`CODER_ADD_GPU`): which device nodes, driver files and variables of the pod go into
//! the workspace, and which GPU driver mounts under `/proc` must go before any container is created.
//!
//! The work is split in two. [`plan`] is pure: it takes a snapshot of the pod ([`GpuInputs`]: the
//! `/proc/mounts` text, an lstat view of the relevant files, the CDI spec texts, the image's
//! os-release, the environment) and decides everything. [`gather`] takes that snapshot from the real
//! system, and [`apply_proc_unmounts`] unmounts through the [`Kernel`] seam.
//!
//! ## Devices
//! A device keeps its path inside the workspace; the pod's own node at that path is bind-mounted
//! (runtimes cannot create nodes in a user namespace) and allowed in the device cgroup with the major
//! and minor read by `lstat`. Nodes are **not** chowned (the Go envbox did not either): they show as
//! `nobody` inside and are usable through their mode (0666 for NVIDIA's nodes by default).
//! Sources, in this order, each path once:
//! 1. `/proc/mounts` entries under `/dev/` matching `(?i)(nvidia|vulkan|cuda)`, or under `/dev/dri/`
//!    (the NVIDIA runtime's legacy mode bind-mounts exactly the pod's GPUs over its `/dev`);
//! 2. CDI specs (`/etc/cdi`, `/var/run/cdi`) of kind `nvidia.com/gpu`: the `deviceNodes` of the
//!    selected devices and of the spec's top-level edits;
//! 3. only when 1 and 2 named no per-GPU node: the unmounted `/dev/nvidia<N>` nodes selected by
//!    `NVIDIA_VISIBLE_DEVICES` (unset or `all`: every one; a list of indices: those; `none`, `void` or
//!    empty: none; UUIDs cannot be mapped to nodes without NVML and are reported as a warning);
//! 4. whenever at least one per-GPU node is planned, the shared control nodes `/dev/nvidiactl`,
//!    `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools` and `/dev/nvidia-modeset` when present.
//!
//! Unmounted `/dev/nvidia-caps/*` (MIG configuration and monitoring privileges) and `/dev/dri/*` (a
//! privileged pod sees every GPU of the node there, other vendors' included) are never taken from a
//! plain `/dev` listing, only from mounts or CDI.
//!
//! ## Driver files
//! * Non-`/dev` mounts matching the regex are bound at the same path, read-only iff mounted `ro`
//!   (`/proc` ones are unmounted instead, `/sys` ones and the mount holding `CODER_USR_LIB_DIR`
//!   skipped: that one is searched file by file). For a mounted file, the symlinks in the
//!   same directory whose chain (at most 10 hops, every hop in that directory) ends at it are added as
//!   read-only binds (`libcuda.so.1 -> libcuda.so.535.104.05`).
//! * CDI `mounts` of the selected devices: bound at `containerPath` from the pod's file at
//!   `containerPath` (or `hostPath` when only that exists in the pod), read-only iff `ro` is an option.
//! * Files under `CODER_USR_LIB_DIR` (walked with lstat, symlinked directories not followed) whose path
//!   *relative to that directory* matches `(?i)(libgl(e|sx|\.)|nvidia|vulkan|cuda)` and whose name ends
//!   in `.so` or `.so.<digits and dots>`. Matching the relative path (the Go envbox matched the
//!   absolute one) keeps a lib dir mounted at, say, `/var/nvidia/lib` from selecting `libglib`. Each
//!   one's symlink chain is bound read-only; a chain that leaves the directory, dangles, loops or ends
//!   at anything but a regular file is dropped whole. Absolute link targets are read as pod paths.
//!
//! Binds under `CODER_USR_LIB_DIR` are re-targeted into the workspace's library directory (paths are
//! compared by components: `/usr/lib64` is not under `/usr/lib`). A bind whose target is already taken
//! (by an earlier GPU bind, a device, or a caller-reserved target such as `/etc/hosts`) is skipped.
//!
//! The workspace's library directory: `CODER_INNER_USR_LIB_DIR`, else from the image's os-release
//! `ID`, then each `ID_LIKE`: RHEL- and SUSE-like → `/usr/lib64`; Debian-like → the multiarch
//! directory of the running architecture (`/usr/lib/x86_64-linux-gnu`, `/usr/lib/aarch64-linux-gnu`,
//! ...); anything else → `/usr/lib`.
//!
//! ## Environment
//! Every pod variable whose name matches `(?i)nvidia`, in environment order; then the `env` edits of
//! the selected CDI devices for names the pod does not set.
//!
//! ## CDI
//! JSON specs are read with serde_json; YAML specs (`nvidia-ctk cdi generate`'s default) with a small
//! block-YAML reader covering what generators emit (block mappings and sequences, both sequence
//! indentation styles, plain and quoted scalars, flow `[]`/`{}` of scalars, comments). Anchors, tags
//! and multi-line scalars are refused: that spec is skipped with a warning. CDI `hooks` (ldcache,
//! symlink creation) are not run.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::bundle::spec::BindMount;
use crate::image::facts::OsRelease;
use crate::sys::{Kernel, NodeKind};

/// Where CDI spec files are looked for, in this order.
pub const CDI_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];
pub const CDI_KIND: &str = "nvidia.com/gpu";
pub const MAX_SYMLINK_HOPS: usize = 10;
/// Shared NVIDIA control nodes, added from `/dev` whenever a GPU is planned.
pub const CONTROL_NODES: &[&str] = &[
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];
/// A walk of the library directory stops recording after this many entries.
const MAX_WALK_ENTRIES: usize = 200_000;
const MAX_WALK_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("reading the pod's mounts from {path}: {source}")]
    ProcMounts { path: PathBuf, source: io::Error },
    #[error("CODER_USR_LIB_DIR {path}: {source}")]
    LibDir { path: PathBuf, source: io::Error },
    #[error("CODER_USR_LIB_DIR {0} is not a directory in the pod")]
    LibDirMissing(PathBuf),
}

/// What `lstat` says about a path of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsEntry {
    File,
    Dir,
    /// With the link's target as read by readlink.
    Symlink(PathBuf),
    Device {
        kind: NodeKind,
        major: i64,
        minor: i64,
    },
    /// Sockets, FIFOs.
    Other,
}

/// A snapshot of everything the planner looks at.
#[derive(Debug, Clone)]
pub struct GpuInputs {
    /// `/proc/mounts` (or `/proc/self/mounts`) text.
    pub proc_mounts: String,
    /// lstat view of: the library directory's tree, `/dev` GPU candidates, the mounted GPU paths and
    /// their directories' symlinks, and the paths CDI specs name. A path absent here does not exist.
    pub fs: BTreeMap<PathBuf, FsEntry>,
    /// CDI spec files: (path, content).
    pub cdi_specs: Vec<(PathBuf, String)>,
    /// `CODER_USR_LIB_DIR`.
    pub usr_lib_dir: PathBuf,
    /// `CODER_INNER_USR_LIB_DIR`.
    pub inner_usr_lib_dir: Option<PathBuf>,
    /// The image's os-release.
    pub os: OsRelease,
    /// `std::env::consts::ARCH` of envbox (the pod's architecture).
    pub arch: String,
    /// The pod's environment.
    pub env: Vec<(String, String)>,
    /// Workspace mount targets that GPU binds must not replace (`/etc/hosts`, `CODER_MOUNTS`...).
    pub reserved_targets: Vec<PathBuf>,
    /// Problems met while gathering, passed on to the plan.
    pub warnings: Vec<String>,
}

/// A device node of the pod bound into the workspace at `path` and allowed in its device cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuDevice {
    /// Path inside the workspace.
    pub path: PathBuf,
    /// The pod's node, the bind source.
    pub source: PathBuf,
    pub kind: NodeKind,
    pub major: i64,
    pub minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuPlan {
    pub devices: Vec<GpuDevice>,
    pub binds: Vec<BindMount>,
    pub env: Vec<(String, String)>,
    /// GPU driver mounts under `/proc`, deepest first.
    pub proc_unmounts: Vec<PathBuf>,
    /// The workspace's library directory the lib-dir binds were re-targeted into.
    pub inner_lib_dir: PathBuf,
    /// For the startup log.
    pub warnings: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Matching (the Go envbox's regexes, by hand)

fn contains_ci(hay: &str, needle: &str) -> bool {
    hay.as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// `(?i)(nvidia|vulkan|cuda)`
pub fn is_gpu_path(s: &str) -> bool {
    ["nvidia", "vulkan", "cuda"]
        .iter()
        .any(|n| contains_ci(s, n))
}

/// `(?i)nvidia`
pub fn is_gpu_env_name(name: &str) -> bool {
    contains_ci(name, "nvidia")
}

/// `(?i)(libgl(e|sx|\.)|nvidia|vulkan|cuda)`: `libGL.so`, `libGLESv2`, but not `libglib`.
pub fn is_gpu_lib_path(s: &str) -> bool {
    if is_gpu_path(s) {
        return true;
    }
    let b = s.as_bytes();
    (0..b.len()).any(|i| {
        let rest = &b[i..];
        rest.len() > 5
            && rest[..5].eq_ignore_ascii_case(b"libgl")
            && (rest[5].eq_ignore_ascii_case(&b'e')
                || rest[5] == b'.'
                || (rest.len() > 6 && rest[5..7].eq_ignore_ascii_case(b"sx")))
    })
}

/// `\.so(\.[0-9.]+)?$`
pub fn is_shared_object(name: &str) -> bool {
    if name.ends_with(".so") {
        return true;
    }
    match name.rfind(".so.") {
        Some(i) => {
            let v = &name[i + 4..];
            !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit() || c == b'.')
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------------------------
// /proc/mounts

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub path: PathBuf,
    pub fstype: String,
    pub read_only: bool,
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mount path.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_proc_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let _source = f.next()?;
            let path = f.next()?;
            let fstype = f.next()?;
            let opts = f.next().unwrap_or("");
            Some(MountEntry {
                path: PathBuf::from(unescape_mount_path(path)),
                fstype: fstype.to_string(),
                read_only: opts.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

fn strictly_under(path: &Path, dir: &Path) -> bool {
    path != dir && path.starts_with(dir)
}

fn depth(p: &Path) -> usize {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// GPU driver mounts under `/proc`, deepest first (stacked mounts appear once per layer).
pub fn proc_unmounts(mounts: &[MountEntry]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mounts
        .iter()
        .filter(|m| strictly_under(&m.path, Path::new("/proc")))
        .filter(|m| is_gpu_path(&m.path.to_string_lossy()))
        .map(|m| m.path.clone())
        .collect();
    // Stable: among equally deep mounts the later (upper) one goes first.
    out.reverse();
    out.sort_by_key(|p| std::cmp::Reverse(depth(p)));
    out
}

// ---------------------------------------------------------------------------------------------
// Paths

/// Lexical normalisation: drops `.`, applies `..` (never above `/`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

fn link_target(link: &Path, target: &Path) -> PathBuf {
    if target.is_absolute() {
        normalize(target)
    } else {
        normalize(&link.parent().unwrap_or(Path::new("/")).join(target))
    }
}

/// The chain of paths from `start` to the regular file it resolves to, every one strictly under
/// `root` (and, with `same_dir`, directly in it). None when the chain leaves, dangles, loops or ends
/// at anything but a file.
fn resolve_chain(
    fs: &BTreeMap<PathBuf, FsEntry>,
    root: &Path,
    start: &Path,
    same_dir: bool,
) -> Option<Vec<PathBuf>> {
    let mut chain = Vec::new();
    let mut p = start.to_path_buf();
    loop {
        let inside = if same_dir {
            p.parent() == Some(root)
        } else {
            strictly_under(&p, root)
        };
        if !inside || chain.len() > MAX_SYMLINK_HOPS {
            return None;
        }
        match fs.get(&p)? {
            FsEntry::File => {
                chain.push(p);
                return Some(chain);
            }
            FsEntry::Symlink(t) => {
                let next = link_target(&p, t);
                chain.push(p);
                p = next;
            }
            _ => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workspace library directory

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Lib64,
    Multiarch,
}

fn family(id: &str) -> Option<Family> {
    match id.to_ascii_lowercase().as_str() {
        "rhel"
        | "fedora"
        | "centos"
        | "rocky"
        | "almalinux"
        | "amzn"
        | "ol"
        | "scientific"
        | "cloudlinux"
        | "eurolinux"
        | "circle"
        | "navix"
        | "suse"
        | "opensuse"
        | "sles"
        | "sled"
        | "opensuse-leap"
        | "opensuse-tumbleweed" => Some(Family::Lib64),
        "debian" | "ubuntu" => Some(Family::Multiarch),
        _ => None,
    }
}

/// Debian's multiarch tuple for a Rust `ARCH`.
pub fn multiarch_tuple(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "x86" => "i386-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        _ => return None,
    })
}

/// The workspace's library directory: the override, else from `ID` then `ID_LIKE`.
pub fn inner_lib_dir(os: &OsRelease, arch: &str, overridden: Option<&Path>) -> PathBuf {
    if let Some(p) = overridden {
        return p.to_path_buf();
    }
    let fam = std::iter::once(&os.id)
        .chain(os.id_like.iter())
        .find_map(|id| family(id));
    match fam {
        Some(Family::Lib64) => "/usr/lib64".into(),
        Some(Family::Multiarch) => match multiarch_tuple(arch) {
            Some(t) => Path::new("/usr/lib").join(t),
            None => "/usr/lib".into(),
        },
        None => "/usr/lib".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// CDI

/// `NVIDIA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Visible {
    All,
    Nothing,
    Names(Vec<String>),
}

fn visible_devices(env: &[(String, String)]) -> Visible {
    let Some((_, v)) = env.iter().find(|(k, _)| k == "NVIDIA_VISIBLE_DEVICES") else {
        return Visible::All;
    };
    let v = v.trim();
    match v {
        "all" => Visible::All,
        "" | "none" | "void" => Visible::Nothing,
        _ => Visible::Names(
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CdiEdits {
    /// (path, hostPath)
    nodes: Vec<(PathBuf, Option<PathBuf>)>,
    /// (containerPath, hostPath, read_only)
    mounts: Vec<(PathBuf, Option<PathBuf>, bool)>,
    env: Vec<(String, String)>,
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn add_edits(out: &mut CdiEdits, edits: &Value) {
    let path_of = |v: &Value, key: &str| {
        v.get(key)
            .and_then(scalar_string)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    for n in edits
        .get("deviceNodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(p) = path_of(n, "path") {
            out.nodes.push((p, path_of(n, "hostPath")));
        }
    }
    for m in edits
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(c) = path_of(m, "containerPath") {
            let ro = m
                .get("options")
                .and_then(Value::as_array)
                .is_some_and(|o| o.iter().any(|x| x.as_str() == Some("ro")));
            out.mounts.push((c, path_of(m, "hostPath"), ro));
        }
    }
    for e in edits
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some((k, v)) = e.as_str().and_then(|s| s.split_once('=')) {
            if !k.is_empty() {
                out.env.push((k.to_string(), v.to_string()));
            }
        }
    }
}

/// Parses a CDI spec, JSON or (by extension, or when it does not start with `{`) YAML.
pub fn parse_cdi_spec(path: &Path, text: &str) -> Result<Value, String> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "json" || text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        yaml::parse(text)
    }
}

/// The edits of the selected `nvidia.com/gpu` devices of every spec, plus each contributing spec's
/// top-level edits. Also returns which visible names matched.
fn cdi_edits(
    specs: &[(PathBuf, String)],
    visible: &Visible,
    warnings: &mut Vec<String>,
) -> (CdiEdits, bool) {
    let mut out = CdiEdits::default();
    let mut seen_names: Vec<String> = Vec::new();
    let mut any_gpu_spec = false;
    for (path, text) in specs {
        let spec = match parse_cdi_spec(path, text) {
            Ok(v) => v,
            Err(e) => {
                warnings.push(format!("skipping CDI spec {}: {e}", path.display()));
                continue;
            }
        };
        if spec.get("kind").and_then(Value::as_str) != Some(CDI_KIND) {
            continue;
        }
        any_gpu_spec = true;
        let mut selected = false;
        for d in spec
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(name) = d.get("name").and_then(scalar_string) else {
                continue;
            };
            let wanted = match visible {
                Visible::All => true,
                Visible::Nothing => false,
                Visible::Names(n) => n.contains(&name),
            };
            if wanted {
                selected = true;
                seen_names.push(name);
                if let Some(e) = d.get("containerEdits") {
                    add_edits(&mut out, e);
                }
            }
        }
        if selected {
            if let Some(e) = spec.get("containerEdits") {
                add_edits(&mut out, e);
            }
        }
    }
    if let (Visible::Names(names), true) = (visible, any_gpu_spec) {
        for n in names.iter().filter(|n| !seen_names.contains(n)) {
            warnings.push(format!(
                "NVIDIA_VISIBLE_DEVICES names {n:?}, which no CDI spec of kind {CDI_KIND} defines"
            ));
        }
    }
    (out, any_gpu_spec)
}

/// Every path the CDI specs name, for [`gather`] to lstat.
pub fn cdi_paths(specs: &[(PathBuf, String)]) -> Vec<PathBuf> {
    let mut w = Vec::new();
    let (e, _) = cdi_edits(specs, &Visible::All, &mut w);
    let mut out = Vec::new();
    for (p, h) in e.nodes {
        out.push(p);
        out.extend(h);
    }
    for (c, h, _) in e.mounts {
        out.push(c);
        out.extend(h);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The planner

fn is_per_gpu_node(p: &Path) -> bool {
    p.parent() == Some(Path::new("/dev"))
        && p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("nvidia"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
}

struct Planner<'a> {
    inputs: &'a GpuInputs,
    inner: PathBuf,
    plan: GpuPlan,
    targets: Vec<PathBuf>,
}

impl Planner<'_> {
    fn retarget(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.inputs.usr_lib_dir) {
            Ok(rel) if strictly_under(p, &self.inputs.usr_lib_dir) => self.inner.join(rel),
            _ => p.to_path_buf(),
        }
    }

    fn add_device(&mut self, inside: &Path, candidates: &[&Path]) {
        if self.plan.devices.iter().any(|d| d.path == inside) {
            return;
        }
        for src in candidates {
            if let Some(FsEntry::Device { kind, major, minor }) = self.inputs.fs.get(*src) {
                self.plan.devices.push(GpuDevice {
                    path: inside.to_path_buf(),
                    source: src.to_path_buf(),
                    kind: *kind,
                    major: *major,
                    minor: *minor,
                });
                self.targets.push(inside.to_path_buf());
                return;
            }
        }
        self.plan.warnings.push(format!(
            "GPU device {} is not a device node in the pod; skipped",
            inside.display()
        ));
    }

    fn add_bind(&mut self, source: &Path, read_only: bool) {
        let target = self.retarget(source);
        self.add_bind_at(source, target, read_only);
    }

    fn add_bind_at(&mut self, source: &Path, target: PathBuf, read_only: bool) {
        if self.targets.contains(&target) {
            return;
        }
        self.targets.push(target.clone());
        self.plan.binds.push(BindMount {
            source: source.to_path_buf(),
            target,
            read_only,
        });
    }
}

/// Decides devices, binds, environment and `/proc` unmounts from a snapshot of the pod.
pub fn plan(inputs: &GpuInputs) -> Result<GpuPlan, GpuError> {
    if inputs.fs.get(&inputs.usr_lib_dir) != Some(&FsEntry::Dir) {
        return Err(GpuError::LibDirMissing(inputs.usr_lib_dir.clone()));
    }
    let inner = inner_lib_dir(
        &inputs.os,
        &inputs.arch,
        inputs.inner_usr_lib_dir.as_deref(),
    );
    let mut p = Planner {
        inputs,
        inner: inner.clone(),
        plan: GpuPlan {
            inner_lib_dir: inner,
            warnings: inputs.warnings.clone(),
            ..GpuPlan::default()
        },
        targets: inputs.reserved_targets.clone(),
    };
    let mounts = parse_proc_mounts(&inputs.proc_mounts);
    p.plan.proc_unmounts = proc_unmounts(&mounts);

    // 1. Mounts: devices under /dev, the rest bound at the same path (the topmost mount's ro).
    let dev = Path::new("/dev");
    let mut mounted: Vec<(PathBuf, bool)> = Vec::new();
    for m in &mounts {
        let s = m.path.to_string_lossy();
        if strictly_under(&m.path, dev) {
            if is_gpu_path(&s) || strictly_under(&m.path, Path::new("/dev/dri")) {
                p.add_device(&m.path, &[&m.path]);
            }
            continue;
        }
        if !is_gpu_path(&s)
            || m.path.starts_with("/proc")
            || m.path.starts_with("/sys")
            || inputs.usr_lib_dir.starts_with(&m.path)
        {
            continue;
        }
        match mounted.iter_mut().find(|(q, _)| *q == m.path) {
            Some(e) => e.1 = m.read_only,
            None => mounted.push((m.path.clone(), m.read_only)),
        }
    }
    for (path, ro) in &mounted {
        p.add_bind(path, *ro);
    }
    // Same-directory symlinks to mounted files (libcuda.so.1 -> libcuda.so.<version>).
    let mut links = Vec::new();
    for (path, _) in &mounted {
        if inputs.fs.get(path) != Some(&FsEntry::File) {
            continue;
        }
        let Some(dir) = path.parent() else { continue };
        for (cand, e) in &inputs.fs {
            if cand.parent() != Some(dir) || !matches!(e, FsEntry::Symlink(_)) {
                continue;
            }
            if resolve_chain(&inputs.fs, dir, cand, true).and_then(|c| c.last().cloned())
                == Some(path.clone())
            {
                links.push(cand.clone());
            }
        }
    }
    for l in &links {
        p.add_bind(l, true);
    }

    // 2. CDI.
    let visible = visible_devices(&inputs.env);
    let mut cdi_warnings = Vec::new();
    let (cdi, _) = cdi_edits(&inputs.cdi_specs, &visible, &mut cdi_warnings);
    p.plan.warnings.extend(cdi_warnings);
    for (path, host) in &cdi.nodes {
        let mut cands: Vec<&Path> = vec![path];
        cands.extend(host.as_deref());
        p.add_device(path, &cands);
    }
    for (cpath, host, ro) in &cdi.mounts {
        let src = [Some(cpath.as_path()), host.as_deref()]
            .into_iter()
            .flatten()
            .find(|s| inputs.fs.contains_key(*s));
        match src {
            Some(s) => {
                let target = p.retarget(cpath);
                p.add_bind_at(s, target, *ro);
            }
            None => p.plan.warnings.push(format!(
                "CDI mount {} is not present in the pod; skipped",
                cpath.display()
            )),
        }
    }

    // 3. Unmounted per-GPU nodes, when nothing above named one.
    if !p.plan.devices.iter().any(|d| is_per_gpu_node(&d.path)) {
        let nodes: Vec<PathBuf> = inputs
            .fs
            .iter()
            .filter(|(k, e)| is_per_gpu_node(k) && matches!(e, FsEntry::Device { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        let mut wanted: Vec<PathBuf> = match &visible {
            Visible::All => nodes,
            Visible::Nothing => Vec::new(),
            Visible::Names(names) => {
                let mut w = Vec::new();
                for n in names {
                    if n.bytes().all(|c| c.is_ascii_digit()) {
                        let node = PathBuf::from(format!("/dev/nvidia{n}"));
                        if nodes.contains(&node) {
                            w.push(node);
                        } else {
                            p.plan
                                .warnings
                                .push(format!("GPU {n} has no node {}", node.display()));
                        }
                    } else {
                        p.plan.warnings.push(format!(
                            "GPU {n:?} of NVIDIA_VISIBLE_DEVICES cannot be mapped to a /dev node \
                             (neither mounted by the NVIDIA runtime nor named by a CDI spec); skipped"
                        ));
                    }
                }
                w
            }
        };
        // /dev/nvidia10 after /dev/nvidia9.
        wanted.sort_by_key(|n| {
            let s = n.to_string_lossy();
            (s.len(), s.into_owned())
        });
        for n in wanted {
            p.add_device(&n, &[&n]);
        }
    }

    // 4. Control nodes.
    if p.plan.devices.iter().any(|d| is_per_gpu_node(&d.path)) {
        for c in CONTROL_NODES {
            let c = Path::new(c);
            if matches!(inputs.fs.get(c), Some(FsEntry::Device { .. })) {
                p.add_device(c, &[c]);
            }
        }
    } else {
        p.plan
            .warnings
            .push("CODER_ADD_GPU is set but no GPU device node was found in the pod".into());
    }

    // 5. Libraries of CODER_USR_LIB_DIR.
    let lib = &inputs.usr_lib_dir;
    let mut lib_binds = Vec::new();
    for (path, e) in inputs.fs.range(lib.clone()..) {
        if !path.starts_with(lib) {
            break;
        }
        if !matches!(e, FsEntry::File | FsEntry::Symlink(_)) || path == lib {
            continue;
        }
        let Ok(rel) = path.strip_prefix(lib) else {
            continue;
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !is_shared_object(name) || !is_gpu_lib_path(&rel.to_string_lossy()) {
            continue;
        }
        match resolve_chain(&inputs.fs, lib, path, false) {
            Some(chain) => lib_binds.extend(chain),
            None => p.plan.warnings.push(format!(
                "{} leaves {}, dangles or loops; not bound",
                path.display(),
                lib.display()
            )),
        }
    }
    for b in &lib_binds {
        p.add_bind(b, true);
    }

    // 6. Environment.
    for (k, v) in &inputs.env {
        if is_gpu_env_name(k) && !p.plan.env.iter().any(|(pk, _)| pk == k) {
            p.plan.env.push((k.clone(), v.clone()));
        }
    }
    for (k, v) in cdi.env {
        if !p.plan.env.iter().any(|(pk, _)| *pk == k) {
            p.plan.env.push((k, v));
        }
    }
    Ok(p.plan)
}

// ---------------------------------------------------------------------------------------------
// The real system

/// Unmounts the planned `/proc` GPU driver mounts, deepest first. Failures are warnings (#67): a
/// busy one is detached. Returns the paths that were unmounted.
pub fn apply_proc_unmounts(kernel: &dyn Kernel, plan: &GpuPlan) -> Vec<PathBuf> {
    unmount_all(kernel, &plan.proc_unmounts)
}

/// The same, straight from `/proc/mounts` text: for use before anything else is planned.
pub fn unmount_proc_drivers(kernel: &dyn Kernel, proc_mounts: &str) -> Vec<PathBuf> {
    unmount_all(kernel, &proc_unmounts(&parse_proc_mounts(proc_mounts)))
}

fn unmount_all(kernel: &dyn Kernel, paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut done = Vec::new();
    for p in paths {
        let r = match kernel.unmount(p, false) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => kernel.unmount(p, true),
            r => r,
        };
        match r {
            Ok(()) => done.push(p.clone()),
            Err(e) => log::warn!("unmounting GPU driver mount {}: {e}", p.display()),
        }
    }
    done
}

/// lstat of one path into the view; absent paths are left out.
pub fn lstat_into(fs: &mut BTreeMap<PathBuf, FsEntry>, path: &Path) {
    if fs.contains_key(path) {
        return;
    }
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return;
    };
    let ft = md.file_type();
    let e = if ft.is_symlink() {
        match std::fs::read_link(path) {
            Ok(t) => FsEntry::Symlink(t),
            Err(_) => return,
        }
    } else if ft.is_dir() {
        FsEntry::Dir
    } else if ft.is_file() {
        FsEntry::File
    } else if ft.is_char_device() || ft.is_block_device() {
        let rdev = md.rdev();
        FsEntry::Device {
            kind: if ft.is_char_device() {
                NodeKind::Char
            } else {
                NodeKind::Block
            },
            major: rustix::fs::major(rdev) as i64,
            minor: rustix::fs::minor(rdev) as i64,
        }
    } else {
        FsEntry::Other
    };
    fs.insert(path.to_path_buf(), e);
}

/// Walks `dir` with lstat, not following symlinked directories. A missing or unreadable `dir` is an
/// error; unreadable subdirectories are warnings.
pub fn walk_lib_dir(
    dir: &Path,
    fs: &mut BTreeMap<PathBuf, FsEntry>,
    warnings: &mut Vec<String>,
) -> Result<(), GpuError> {
    let md = std::fs::symlink_metadata(dir).map_err(|source| GpuError::LibDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !md.is_dir() {
        return Err(GpuError::LibDirMissing(dir.to_path_buf()));
    }
    fs.insert(dir.to_path_buf(), FsEntry::Dir);
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    let mut count = 0usize;
    while let Some((d, level)) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(source) if d == dir => {
                return Err(GpuError::LibDir {
                    path: dir.to_path_buf(),
                    source,
                })
            }
            Err(e) => {
                warnings.push(format!("listing {}: {e}", d.display()));
                continue;
            }
        };
        for ent in rd.flatten() {
            count += 1;
            if count > MAX_WALK_ENTRIES {
                warnings.push(format!(
                    "{} has more than {MAX_WALK_ENTRIES} entries; the rest is not searched for GPU libraries",
                    dir.display()
                ));
                return Ok(());
            }
            let p = ent.path();
            lstat_into(fs, &p);
            if fs.get(&p) == Some(&FsEntry::Dir) && level < MAX_WALK_DEPTH {
                stack.push((p, level + 1));
            }
        }
    }
    Ok(())
}

/// `/dev` GPU candidates: `nvidia*`, `nvidia-caps/*`, `dri/*` under `dev`.
pub fn scan_dev(dev: &Path, fs: &mut BTreeMap<PathBuf, FsEntry>) {
    let list = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for p in list(dev) {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("nvidia"))
        {
            lstat_into(fs, &p);
        }
    }
    for sub in ["nvidia-caps", "dri"] {
        for p in list(&dev.join(sub)) {
            lstat_into(fs, &p);
        }
    }
}

/// Symlinks in the directory of each mounted file (their chains are resolved by the planner).
fn scan_neighbours(fs: &mut BTreeMap<PathBuf, FsEntry>, file: &Path) {
    if fs.get(file) != Some(&FsEntry::File) {
        return;
    }
    let Some(dir) = file.parent() else { return };
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for ent in rd.flatten() {
        if ent.file_type().is_ok_and(|t| t.is_symlink() || t.is_file()) {
            lstat_into(fs, &ent.path());
        }
    }
}

/// Reads `*.json`, `*.yaml`, `*.yml` files of each directory, in name order.
pub fn read_cdi_specs(dirs: &[&Path], warnings: &mut Vec<String>) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("json" | "yaml" | "yml")
                )
            })
            .collect();
        files.sort();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(t) => out.push((f, t)),
                Err(e) => warnings.push(format!("reading CDI spec {}: {e}", f.display())),
            }
        }
    }
    out
}

/// What [`gather`] needs from the configuration and the image.
pub struct GatherOptions<'a> {
    pub usr_lib_dir: &'a Path,
    pub inner_usr_lib_dir: Option<&'a Path>,
    pub os: &'a OsRelease,
    pub reserved_targets: Vec<PathBuf>,
}

/// Takes the planner's snapshot from the real pod.
pub fn gather(o: &GatherOptions) -> Result<GpuInputs, GpuError> {
    let mounts_path = PathBuf::from("/proc/self/mounts");
    let proc_mounts =
        std::fs::read_to_string(&mounts_path).map_err(|source| GpuError::ProcMounts {
            path: mounts_path,
            source,
        })?;
    let mut fs = BTreeMap::new();
    let mut warnings = Vec::new();
    walk_lib_dir(o.usr_lib_dir, &mut fs, &mut warnings)?;
    scan_dev(Path::new("/dev"), &mut fs);
    for m in parse_proc_mounts(&proc_mounts) {
        let s = m.path.to_string_lossy();
        if is_gpu_path(&s) || strictly_under(&m.path, Path::new("/dev/dri")) {
            lstat_into(&mut fs, &m.path);
            if !m.path.starts_with("/dev") && !m.path.starts_with("/proc") {
                scan_neighbours(&mut fs, &m.path);
            }
        }
    }
    for c in CONTROL_NODES {
        lstat_into(&mut fs, Path::new(c));
    }
    let dirs: Vec<&Path> = CDI_DIRS.iter().map(Path::new).collect();
    let cdi_specs = read_cdi_specs(&dirs, &mut warnings);
    for p in cdi_paths(&cdi_specs) {
        lstat_into(&mut fs, &p);
    }
    Ok(GpuInputs {
        proc_mounts,
        fs,
        cdi_specs,
        usr_lib_dir: o.usr_lib_dir.to_path_buf(),
        inner_usr_lib_dir: o.inner_usr_lib_dir.map(Path::to_path_buf),
        os: o.os.clone(),
        arch: std::env::consts::ARCH.to_string(),
        env: std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect(),
        reserved_targets: o.reserved_targets.clone(),
        warnings,
    })
}

// ---------------------------------------------------------------------------------------------
// A block-YAML subset, enough for generated CDI specs.

mod yaml {
    use serde_json::{Map, Number, Value};

    struct Line {
        no: usize,
        indent: usize,
        text: String,
    }

    /// Cuts a `#` comment that starts a line or follows whitespace, outside quotes.
    fn strip_comment(s: &str) -> &str {
        let b = s.as_bytes();
        let mut quote: Option<u8> = None;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            match quote {
                Some(b'"') if c == b'\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => {
                    let at_token = i == 0 || matches!(b[i - 1], b' ' | b'[' | b'{' | b',' | b':');
                    if (c == b'"' || c == b'\'') && at_token {
                        quote = Some(c);
                    } else if c == b'#' && (i == 0 || b[i - 1] == b' ') {
                        return &s[..i];
                    }
                }
            }
            i += 1;
        }
        s
    }

    fn is_seq(t: &str) -> bool {
        t == "-" || t.starts_with("- ")
    }

    /// A double- or single-quoted scalar at the start of `s`: (value, rest).
    fn quoted(s: &str) -> Result<(String, &str), String> {
        let q = s.as_bytes()[0];
        let mut out = String::new();
        let mut chars = s[1..].char_indices();
        while let Some((i, c)) = chars.next() {
            if q == b'\'' && c == '\'' {
                if s[1 + i + 1..].starts_with('\'') {
                    out.push('\'');
                    chars.next();
                    continue;
                }
                return Ok((out, &s[1 + i + 1..]));
            }
            if q == b'"' && c == '"' {
                return Ok((out, &s[1 + i + 1..]));
            }
            if q == b'"' && c == '\\' {
                let Some((_, e)) = chars.next() else { break };
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '0' => out.push('\0'),
                    '"' | '\\' | '/' | ' ' => out.push(e),
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let mut hex = String::new();
                        for _ in 0..n {
                            hex.push(chars.next().ok_or("short escape")?.1);
                        }
                        let v = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                        out.push(char::from_u32(v).ok_or("bad escape")?);
                    }
                    other => return Err(format!("unsupported escape \\{other}")),
                }
                continue;
            }
            out.push(c);
        }
        Err("unterminated quoted scalar".into())
    }

    fn plain(s: &str) -> Value {
        match s {
            "" | "~" | "null" | "Null" | "NULL" => Value::Null,
            "true" | "True" | "TRUE" => Value::Bool(true),
            "false" | "False" | "FALSE" => Value::Bool(false),
            _ => match s.parse::<i64>() {
                Ok(n) => Value::Number(Number::from(n)),
                Err(_) => Value::String(s.to_string()),
            },
        }
    }

    fn scalar(s: &str) -> Result<Value, String> {
        let s = s.trim();
        match s.as_bytes().first() {
            Some(b'"' | b'\'') => {
                let (v, rest) = quoted(s)?;
                if !rest.trim().is_empty() {
                    return Err(format!("text after a quoted scalar: {rest:?}"));
                }
                Ok(Value::String(v))
            }
            Some(b'|' | b'>') => Err("block scalars are not supported".into()),
            Some(b'&' | b'*' | b'!') => Err("anchors, aliases and tags are not supported".into()),
            _ => Ok(plain(s)),
        }
    }

    /// Splits a flow collection's inside on top-level commas.
    fn split_flow(s: &str) -> Result<Vec<&str>, String> {
        let mut parts = Vec::new();
        let mut quote: Option<char> = None;
        let mut start = 0;
        for (i, c) in s.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '[' | ']' | '{' | '}') => return Err("nested flow collections".into()),
                (None, ',') => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        Ok(parts
            .into_iter()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect())
    }

    fn inline(s: &str) -> Result<Value, String> {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or("unterminated flow sequence")?;
            return split_flow(inner)?
                .into_iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array);
        }
        if let Some(inner) = s.strip_prefix('{') {
            let inner = inner.strip_suffix('}').ok_or("unterminated flow mapping")?;
            let mut m = Map::new();
            for part in split_flow(inner)? {
                let (k, v) = split_key(part)?.ok_or("flow mapping entry without a key")?;
                m.insert(k, scalar(v)?);
            }
            return Ok(Value::Object(m));
        }
        scalar(s)
    }

    /// `key: rest` or `key:` (rest empty), the key plain or quoted.
    fn split_key(t: &str) -> Result<Option<(String, &str)>, String> {
        if t.starts_with('"') || t.starts_with('\'') {
            let (k, rest) = quoted(t)?;
            let rest = rest.trim_start();
            return Ok(rest
                .strip_prefix(':')
                .and_then(|r| (r.is_empty() || r.starts_with(' ')).then(|| (k, r.trim()))));
        }
        if t.starts_with('[') || t.starts_with('{') {
            return Ok(None);
        }
        let b = t.as_bytes();
        for i in 0..b.len() {
            if b[i] == b':' && (i + 1 == b.len() || b[i + 1] == b' ') {
                return Ok(Some((t[..i].trim().to_string(), t[i + 1..].trim())));
            }
        }
        Ok(None)
    }

    struct Parser {
        lines: Vec<Line>,
        pos: usize,
    }

    impl Parser {
        fn err<T>(&self, msg: impl std::fmt::Display) -> Result<T, String> {
            let no = self.lines.get(self.pos).map_or(0, |l| l.no);
            Err(format!("line {no}: {msg}"))
        }

        fn at(&self, indent: usize) -> Option<&str> {
            self.lines
                .get(self.pos)
                .filter(|l| l.indent == indent)
                .map(|l| l.text.as_str())
        }

        fn node(&mut self, indent: usize) -> Result<Value, String> {
            let Some(t) = self.at(indent) else {
                return self.err("unexpected indentation");
            };
            if is_seq(t) {
                return self.seq(indent);
            }
            if split_key(t)
                .map_err(|e| format!("line {}: {e}", self.lines[self.pos].no))?
                .is_some()
            {
                return self.map(indent);
            }
            let t = t.to_string();
            self.pos += 1;
            inline(&t).or_else(|e| self.err(e))
        }

        /// The value after `key:` or `-` with nothing after it on the line.
        fn nested(&mut self, indent: usize, allow_seq_same: bool) -> Result<Value, String> {
            match self.lines.get(self.pos) {
                Some(l) if l.indent > indent => {
                    let i = l.indent;
                    self.node(i)
                }
                Some(l) if allow_seq_same && l.indent == indent && is_seq(&l.text) => {
                    self.seq(indent)
                }
                _ => Ok(Value::Null),
            }
        }

        fn seq(&mut self, indent: usize) -> Result<Value, String> {
            let mut items = Vec::new();
            while let Some(t) = self.at(indent) {
                if !is_seq(t) {
                    break;
                }
                let rest = t[1..].to_string();
                let trimmed = rest.trim_start();
                if trimmed.is_empty() {
                    self.pos += 1;
                    items.push(self.nested(indent, false)?);
                    continue;
                }
                // "- key: v" continues as a mapping at the column of "key".
                let new_indent = indent + 1 + (rest.len() - trimmed.len());
                let l = &mut self.lines[self.pos];
                l.indent = new_indent;
                l.text = trimmed.to_string();
                items.push(self.node(new_indent)?);
            }
            Ok(Value::Array(items))
        }

        fn map(&mut self, indent: usize) -> Result<Value, String> {
            let mut m = Map::new();
            while let Some(t) = self.at(indent) {
                if is_seq(t) {
                    break;
                }
                let no = self.lines[self.pos].no;
                let Some((k, rest)) = split_key(t).map_err(|e| format!("line {no}: {e}"))? else {
                    return Err(format!("line {no}: expected `key: value`"));
                };
                let rest = rest.to_string();
                self.pos += 1;
                let v = if rest.is_empty() {
                    self.nested(indent, true)?
                } else {
                    inline(&rest).map_err(|e| format!("line {no}: {e}"))?
                };
                m.insert(k, v);
            }
            Ok(Value::Object(m))
        }
    }

    pub fn parse(src: &str) -> Result<Value, String> {
        let mut lines = Vec::new();
        for (i, raw) in src.lines().enumerate() {
            let t = strip_comment(raw).trim_end();
            let text = t.trim_start_matches(' ');
            if text.is_empty() {
                continue;
            }
            if text.starts_with('\t') {
                return Err(format!("line {}: tab indentation", i + 1));
            }
            let indent = t.len() - text.len();
            if indent == 0 && (text == "---" || text.starts_with('%')) {
                continue;
            }
            if indent == 0 && text == "..." {
                break;
            }
            lines.push(Line {
                no: i + 1,
                indent,
                text: text.to_string(),
            });
        }
        if lines.is_empty() {
            return Ok(Value::Null);
        }
        let first = lines[0].indent;
        let mut p = Parser { lines, pos: 0 };
        let v = p.node(first)?;
        if p.pos < p.lines.len() {
            return p.err(
                "unexpected content (multi-line scalars and multiple documents are not supported)",
            );
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, RecordingKernel};

    fn dev(major: i64, minor: i64) -> FsEntry {
        FsEntry::Device {
            kind: NodeKind::Char,
            major,
            minor,
        }
    }

    fn inputs(proc_mounts: &str, fs: &[(&str, FsEntry)]) -> GpuInputs {
        let mut map: BTreeMap<PathBuf, FsEntry> = fs
            .iter()
            .map(|(p, e)| (PathBuf::from(p), e.clone()))
            .collect();
        map.insert("/var/coder/usr/lib".into(), FsEntry::Dir);
        GpuInputs {
            proc_mounts: proc_mounts.into(),
            fs: map,
            cdi_specs: Vec::new(),
            usr_lib_dir: "/var/coder/usr/lib".into(),
            inner_usr_lib_dir: None,
            os: OsRelease::default(),
            arch: "x86_64".into(),
            env: Vec::new(),
            reserved_targets: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn bind(source: &str, target: &str, read_only: bool) -> BindMount {
        BindMount {
            source: source.into(),
            target: target.into(),
            read_only,
        }
    }

    fn os(id: &str, like: &[&str]) -> OsRelease {
        OsRelease {
            id: id.into(),
            id_like: like.iter().map(|s| s.to_string()).collect(),
        }
    }

    const GO_MOUNTS: &str = "\
/dev/sda1 /usr/local/nvidia ext4 ro,relatime 0 0
/dev/sda2 /etc/hosts ext4 rw,relatime 0 0
devtmpfs /dev/nvidia0 devtmpfs rw,nosuid 0 0
devtmpfs /dev/nvidia1 devtmpfs rw,nosuid 0 0
";

    /// The Go envbox's `TestGPUs`: two devices, four binds; `libcurl` excluded.
    #[test]
    fn go_case_two_devices_four_binds() {
        let f = FsEntry::File;
        let i = inputs(
            GO_MOUNTS,
            &[
                ("/usr/local/nvidia", FsEntry::Dir),
                ("/dev/nvidia0", dev(195, 0)),
                ("/dev/nvidia1", dev(195, 1)),
                ("/var/coder/usr/lib/nvidia", FsEntry::Dir),
                ("/var/coder/usr/lib/libcurl-gnutls.so", f.clone()),
                (
                    "/var/coder/usr/lib/nvidia/libglxserver_nvidia.so",
                    f.clone(),
                ),
                (
                    "/var/coder/usr/lib/nvidia/libglxserver_nvidia.so.1",
                    f.clone(),
                ),
                ("/var/coder/usr/lib/libnvidia-ml.so", f.clone()),
            ],
        );
        let p = plan(&i).unwrap();
        assert_eq!(
            p.devices,
            vec![
                GpuDevice {
                    path: "/dev/nvidia0".into(),
                    source: "/dev/nvidia0".into(),
                    kind: NodeKind::Char,
                    major: 195,
                    minor: 0
                },
                GpuDevice {
                    path: "/dev/nvidia1".into(),
                    source: "/dev/nvidia1".into(),
                    kind: NodeKind::Char,
                    major: 195,
                    minor: 1
                },
            ]
        );
        assert_eq!(
            p.binds,
            vec![
                bind("/usr/local/nvidia", "/usr/local/nvidia", true),
                bind(
                    "/var/coder/usr/lib/libnvidia-ml.so",
                    "/usr/lib/libnvidia-ml.so",
                    true
                ),
                bind(
                    "/var/coder/usr/lib/nvidia/libglxserver_nvidia.so",
                    "/usr/lib/nvidia/libglxserver_nvidia.so",
                    true
                ),
                bind(
                    "/var/coder/usr/lib/nvidia/libglxserver_nvidia.so.1",
                    "/usr/lib/nvidia/libglxserver_nvidia.so.1",
                    true
                ),
            ]
        );
        assert_eq!(p.inner_lib_dir, PathBuf::from("/usr/lib"));
        assert!(p.proc_unmounts.is_empty());
    }

    #[test]
    fn rw_mounts_stay_rw_and_top_mount_wins() {
        let mut i = inputs(
            "tmpfs /run/nvidia-persistenced/socket tmpfs rw 0 0\n\
             a /usr/bin/nvidia-smi ext4 rw 0 0\na /usr/bin/nvidia-smi ext4 ro 0 0\n\
             a /var/nvidia/lib ext4 ro 0 0\na /var/nvidia ext4 ro 0 0\n",
            &[],
        );
        i.usr_lib_dir = "/var/nvidia/lib".into();
        i.fs.insert("/var/nvidia/lib".into(), FsEntry::Dir);
        let p = plan(&i).unwrap();
        assert_eq!(
            p.binds,
            vec![
                bind(
                    "/run/nvidia-persistenced/socket",
                    "/run/nvidia-persistenced/socket",
                    false
                ),
                bind("/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", true),
            ]
        );
    }

    #[test]
    fn matching() {
        for yes in [
            "libGL.so.1",
            "libGLESv2.so.2",
            "libglsx.so",
            "libnvidia-ml.so.535.104.05",
            "libvulkan.so.1",
            "libcuda.so",
            "nvidia/xorg/libglxserver_nvidia.so",
        ] {
            assert!(is_gpu_lib_path(yes), "{yes}");
        }
        for no in [
            "libglib-2.0.so.0",
            "libcurl-gnutls.so.4",
            "libGLdispatch.so.0",
            "libgl",
        ] {
            assert!(!is_gpu_lib_path(no), "{no}");
        }
        for yes in ["a.so", "a.so.1", "a.so.535.104.05", "a.so.1."] {
            assert!(is_shared_object(yes), "{yes}");
        }
        for no in ["a.so.1a", "a.so.", "a.sox", "a.a", "so"] {
            assert!(!is_shared_object(no), "{no}");
        }
        assert!(is_gpu_env_name("nvidia_test"));
        assert!(is_gpu_env_name("TEST_NVIDIA"));
        assert!(!is_gpu_env_name("VULKAN_TEST"));
        assert!(!is_gpu_env_name("LIBGL_TEST"));
    }

    /// envbox#129: `libglib` broke `dnf` on UBI9. Also: the lib dir's own name does not qualify files.
    #[test]
    fn libglib_and_libcurl_are_excluded_even_under_a_gpu_named_dir() {
        let mut i = inputs("", &[]);
        i.usr_lib_dir = "/var/nvidia/lib".into();
        i.fs.insert("/var/nvidia/lib".into(), FsEntry::Dir);
        for f in [
            "/var/nvidia/lib/libglib-2.0.so.0",
            "/var/nvidia/lib/libcurl.so.4",
            "/var/nvidia/lib/libGLESv2.so.2",
        ] {
            i.fs.insert(f.into(), FsEntry::File);
        }
        let p = plan(&i).unwrap();
        assert_eq!(
            p.binds,
            vec![bind(
                "/var/nvidia/lib/libGLESv2.so.2",
                "/usr/lib/libGLESv2.so.2",
                true
            )]
        );
    }

    #[test]
    fn symlink_chains_are_followed_and_dropped_whole_when_they_leave() {
        let l = |t: &str| FsEntry::Symlink(t.into());
        let mut i = inputs(
            "",
            &[
                ("/var/coder/usr/lib/libcuda.so", l("libcuda.so.1")),
                ("/var/coder/usr/lib/libcuda.so.1", l("./libcuda.so.535.1")),
                ("/var/coder/usr/lib/libcuda.so.535.1", FsEntry::File),
                // Leaves the directory (relative and absolute), dangles, loops.
                ("/var/coder/usr/lib/libnvidia-a.so.1", l("libnvidia-x.so")),
                (
                    "/var/coder/usr/lib/libnvidia-x.so",
                    l("../../libnvidia-x.so"),
                ),
                (
                    "/var/coder/usr/lib/libnvidia-b.so",
                    l("/usr/lib/libnvidia-b.so"),
                ),
                ("/usr/lib/libnvidia-b.so", FsEntry::File),
                ("/var/coder/usr/lib/libnvidia-c.so", l("gone.so")),
                ("/var/coder/usr/lib/libnvidia-d.so", l("libnvidia-d.so")),
                // A symlinked directory is not walked into.
                ("/var/coder/usr/lib/libvulkan-dir.so", l("vk")),
                ("/var/coder/usr/lib/vk", FsEntry::Dir),
            ],
        );
        i.os = os("ubuntu", &["debian"]);
        let p = plan(&i).unwrap();
        let d = "/usr/lib/x86_64-linux-gnu";
        assert_eq!(
            p.binds,
            vec![
                bind(
                    "/var/coder/usr/lib/libcuda.so",
                    &format!("{d}/libcuda.so"),
                    true
                ),
                bind(
                    "/var/coder/usr/lib/libcuda.so.1",
                    &format!("{d}/libcuda.so.1"),
                    true
                ),
                bind(
                    "/var/coder/usr/lib/libcuda.so.535.1",
                    &format!("{d}/libcuda.so.535.1"),
                    true
                ),
            ]
        );
        assert_eq!(
            p.warnings.iter().filter(|w| w.contains("leaves")).count(),
            6,
            "{:?}",
            p.warnings
        );
    }

    /// `/usr/lib64` is not under `/usr/lib` (the Go envbox compared string prefixes).
    #[test]
    fn lib64_is_not_under_lib() {
        let mut i = inputs(
            "a /usr/lib64/libnvidia-ml.so.1 ext4 ro 0 0\n",
            &[("/usr/lib64/libnvidia-ml.so.1", FsEntry::File)],
        );
        i.usr_lib_dir = "/usr/lib".into();
        i.fs.insert("/usr/lib".into(), FsEntry::Dir);
        i.fs.insert("/usr/lib/libcuda.so".into(), FsEntry::File);
        i.inner_usr_lib_dir = Some("/opt/gpu".into());
        let p = plan(&i).unwrap();
        assert_eq!(
            p.binds,
            vec![
                bind(
                    "/usr/lib64/libnvidia-ml.so.1",
                    "/usr/lib64/libnvidia-ml.so.1",
                    true
                ),
                bind("/usr/lib/libcuda.so", "/opt/gpu/libcuda.so", true),
            ]
        );
    }

    #[test]
    fn inner_lib_dir_from_id_then_id_like() {
        let cases = [
            (os("ubuntu", &[]), "x86_64", "/usr/lib/x86_64-linux-gnu"),
            (os("debian", &[]), "aarch64", "/usr/lib/aarch64-linux-gnu"),
            (
                os("pop", &["ubuntu", "debian"]),
                "x86_64",
                "/usr/lib/x86_64-linux-gnu",
            ),
            (os("rhel", &["fedora"]), "x86_64", "/usr/lib64"),
            (
                os("rocky", &["rhel", "centos", "fedora"]),
                "x86_64",
                "/usr/lib64",
            ),
            (os("amzn", &[]), "aarch64", "/usr/lib64"),
            (os("ol", &["fedora"]), "x86_64", "/usr/lib64"),
            (os("somerhel", &["centos"]), "x86_64", "/usr/lib64"),
            (
                os("opensuse-leap", &["suse", "opensuse"]),
                "x86_64",
                "/usr/lib64",
            ),
            (os("alpine", &[]), "x86_64", "/usr/lib"),
            (os("linux", &[]), "x86_64", "/usr/lib"),
            (os("ubuntu", &[]), "mips", "/usr/lib"),
        ];
        for (o, arch, want) in cases {
            assert_eq!(inner_lib_dir(&o, arch, None), PathBuf::from(want), "{o:?}");
        }
        assert_eq!(
            inner_lib_dir(&os("ubuntu", &[]), "x86_64", Some(Path::new("/x"))),
            PathBuf::from("/x")
        );
    }

    #[test]
    fn proc_unmounts_deepest_first() {
        let m = "\
tmpfs /proc/driver/nvidia tmpfs rw 0 0
tmpfs /proc/driver/nvidia/gpus/0000:00:1e.0 tmpfs ro 0 0
proc /proc proc rw 0 0
tmpfs /proc/acpi tmpfs ro 0 0
tmpfs /proc/driver/nvidia/params tmpfs ro 0 0
tmpfs /procx/nvidia tmpfs ro 0 0
";
        let i = inputs(m, &[]);
        let p = plan(&i).unwrap();
        assert_eq!(
            p.proc_unmounts,
            vec![
                PathBuf::from("/proc/driver/nvidia/gpus/0000:00:1e.0"),
                PathBuf::from("/proc/driver/nvidia/params"),
                PathBuf::from("/proc/driver/nvidia"),
            ]
        );
        // `/procx` is not under `/proc` (components, not string prefixes): an ordinary GPU mount.
        assert_eq!(p.binds, vec![bind("/procx/nvidia", "/procx/nvidia", true)]);

        let k = RecordingKernel::default();
        let done = apply_proc_unmounts(&k, &p);
        assert_eq!(done, p.proc_unmounts);
        assert_eq!(
            k.calls(),
            p.proc_unmounts
                .iter()
                .map(|p| Call::Unmount(p.clone()))
                .collect::<Vec<_>>()
        );
        let k = RecordingKernel::default();
        assert_eq!(unmount_proc_drivers(&k, m).len(), 3);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        let m = parse_proc_mounts("a /usr/local/nvidia\\040drivers ext4 ro 0 0\n");
        assert_eq!(m[0].path, PathBuf::from("/usr/local/nvidia drivers"));
        assert!(m[0].read_only);
    }

    #[test]
    fn env_is_copied_by_name() {
        let mut i = inputs("", &[]);
        i.env = [
            ("NVIDIA_TEST", "1"),
            ("VULKAN_TEST", "1"),
            ("LIBGL_TEST", "1"),
            ("TEST_NVIDIA", "1"),
            ("nvidia_test", "1"),
            ("PATH", "/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = plan(&i).unwrap();
        let names: Vec<&str> = p.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["NVIDIA_TEST", "TEST_NVIDIA", "nvidia_test"]);
    }

    #[test]
    fn symlinks_next_to_mounted_files_become_ro_binds() {
        let d = "/usr/lib/x86_64-linux-gnu";
        let l = |t: &str| FsEntry::Symlink(t.into());
        let i = inputs(
            &format!(
                "a {d}/libcuda.so.535.104.05 ext4 ro 0 0\na {d}/libnvidia-ml.so.535 ext4 rw 0 0\n"
            ),
            &[
                (&format!("{d}/libcuda.so.535.104.05"), FsEntry::File),
                (&format!("{d}/libcuda.so.1"), l("libcuda.so.535.104.05")),
                (&format!("{d}/libcuda.so"), l("libcuda.so.1")),
                (&format!("{d}/libnvidia-ml.so.535"), FsEntry::File),
                (
                    &format!("{d}/libnvidia-ml.so.1"),
                    l(&format!("{d}/libnvidia-ml.so.535")),
                ),
                (&format!("{d}/libother.so"), l("libother.so.1")),
                (&format!("{d}/libother.so.1"), FsEntry::File),
                // Through another directory: not a same-directory symlink.
                (
                    &format!("{d}/libcuda-via.so"),
                    l("../x86_64-linux-gnu/sub/../libcuda.so.1"),
                ),
            ],
        );
        let p = plan(&i).unwrap();
        let t: Vec<(String, bool)> = p
            .binds
            .iter()
            .map(|b| (b.target.display().to_string(), b.read_only))
            .collect();
        assert_eq!(
            t,
            vec![
                (format!("{d}/libcuda.so.535.104.05"), true),
                (format!("{d}/libnvidia-ml.so.535"), false),
                (format!("{d}/libcuda-via.so"), true),
                (format!("{d}/libcuda.so"), true),
                (format!("{d}/libcuda.so.1"), true),
                (format!("{d}/libnvidia-ml.so.1"), true),
            ]
        );
    }

    #[test]
    fn binds_onto_taken_targets_are_skipped() {
        // The node's libnvidia-ml.so.1 re-targets onto the path the runtime mounted; the mount wins.
        let d = "/usr/lib/x86_64-linux-gnu";
        let mut i = inputs(
            &format!("a {d}/libnvidia-ml.so.1 ext4 ro 0 0\n"),
            &[
                (&format!("{d}/libnvidia-ml.so.1"), FsEntry::File),
                ("/var/coder/usr/lib/libnvidia-ml.so.1", FsEntry::File),
                ("/var/coder/usr/lib/libnvidia-cfg.so.1", FsEntry::File),
            ],
        );
        i.os = os("ubuntu", &[]);
        i.reserved_targets = vec![format!("{d}/libnvidia-cfg.so.1").into()];
        let p = plan(&i).unwrap();
        assert_eq!(
            p.binds,
            vec![bind(
                &format!("{d}/libnvidia-ml.so.1"),
                &format!("{d}/libnvidia-ml.so.1"),
                true
            )]
        );
    }

    #[test]
    fn unmounted_nodes_follow_nvidia_visible_devices() {
        let fs = [
            ("/dev/nvidia0", dev(195, 0)),
            ("/dev/nvidia1", dev(195, 1)),
            ("/dev/nvidia10", dev(195, 10)),
            ("/dev/nvidiactl", dev(195, 255)),
            ("/dev/nvidia-uvm", dev(510, 0)),
            ("/dev/nvidia-caps/nvidia-cap1", dev(511, 1)),
            ("/dev/dri/card0", dev(226, 0)),
        ];
        let paths = |env: Option<&str>| {
            let mut i = inputs("", &fs);
            if let Some(v) = env {
                i.env = vec![("NVIDIA_VISIBLE_DEVICES".into(), v.into())];
            }
            let p = plan(&i).unwrap();
            (
                p.devices
                    .iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>(),
                p.warnings,
            )
        };
        assert_eq!(
            paths(None).0,
            [
                "/dev/nvidia0",
                "/dev/nvidia1",
                "/dev/nvidia10",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm"
            ]
        );
        assert_eq!(paths(Some("all")).0.len(), 5);
        assert_eq!(
            paths(Some("1")).0,
            ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
        );
        let (none, w) = paths(Some("void"));
        assert!(none.is_empty());
        assert!(w.iter().any(|w| w.contains("no GPU device")));
        let (uuid, w) = paths(Some("GPU-1234"));
        assert!(uuid.is_empty());
        assert!(w.iter().any(|w| w.contains("GPU-1234")));
    }

    #[test]
    fn mounted_nodes_exclude_unmounted_ones() {
        // Legacy runtime: only the allocated GPU is mounted; the others of the node stay out.
        let i = inputs(
            "devtmpfs /dev/nvidia1 devtmpfs rw 0 0\ndevtmpfs /dev/nvidiactl devtmpfs rw 0 0\n\
             devtmpfs /dev/dri/renderD129 devtmpfs rw 0 0\n",
            &[
                ("/dev/nvidia0", dev(195, 0)),
                ("/dev/nvidia1", dev(195, 1)),
                ("/dev/nvidiactl", dev(195, 255)),
                ("/dev/dri/renderD129", dev(226, 129)),
            ],
        );
        let p = plan(&i).unwrap();
        let got: Vec<_> = p.devices.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            got,
            [
                PathBuf::from("/dev/nvidia1"),
                "/dev/nvidiactl".into(),
                "/dev/dri/renderD129".into()
            ]
        );
    }

    const CDI_JSON: &str = r#"{
  "cdiVersion": "0.5.0",
  "kind": "nvidia.com/gpu",
  "devices": [
    {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}, {"path": "/dev/dri/card1"}]}},
    {"name": "1", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia1", "hostPath": "/host/dev/nvidia1"}]}}
  ],
  "containerEdits": {
    "env": ["NVIDIA_VISIBLE_DEVICES=void", "NVIDIA_CTK_LIBCUDA_DIR=/usr/lib/x86_64-linux-gnu"],
    "deviceNodes": [{"path": "/dev/nvidiactl"}],
    "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk"}],
    "mounts": [
      {"hostPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.535", "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.535", "options": ["ro", "nosuid", "nodev", "bind"]},
      {"hostPath": "/run/nvidia-persistenced/socket", "containerPath": "/run/nvidia-persistenced/socket", "options": ["nosuid", "nodev", "bind", "noexec"]},
      {"hostPath": "/missing", "containerPath": "/missing"}
    ]
  }
}"#;

    const CDI_YAML: &str = r#"---
cdiVersion: 0.5.0
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  - NVIDIA_CTK_LIBCUDA_DIR=/usr/lib/x86_64-linux-gnu
  deviceNodes:
  - path: /dev/nvidiactl
  hooks:
  - args:
    - nvidia-ctk
    - hook
    hookName: createContainer
    path: /usr/bin/nvidia-ctk
  mounts:
  - containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.535
    hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.535
    options:
    - ro
    - nosuid
    - nodev
    - bind
  - containerPath: /run/nvidia-persistenced/socket
    hostPath: /run/nvidia-persistenced/socket
    options: [nosuid, nodev, bind, noexec]
  - {containerPath: /missing, hostPath: /missing}
devices:
- containerEdits:
    deviceNodes:
    - path: /dev/nvidia0   # the first GPU
    - path: "/dev/dri/card1"
  name: "0"
- name: '1'
  containerEdits:
      deviceNodes:
        - path: /dev/nvidia1
          hostPath: /host/dev/nvidia1
kind: nvidia.com/gpu
"#;

    fn cdi_inputs(spec_path: &str, text: &str, visible: Option<&str>) -> GpuInputs {
        let mut i = inputs(
            "",
            &[
                ("/dev/nvidia0", dev(195, 0)),
                ("/dev/nvidia1", dev(195, 1)),
                ("/dev/nvidia2", dev(195, 2)),
                ("/dev/nvidiactl", dev(195, 255)),
                ("/dev/dri/card1", dev(226, 1)),
                ("/usr/lib/x86_64-linux-gnu/libcuda.so.535", FsEntry::File),
                ("/run/nvidia-persistenced/socket", FsEntry::Other),
            ],
        );
        i.cdi_specs = vec![
            (spec_path.into(), text.into()),
            (
                "/etc/cdi/other.json".into(),
                r#"{"kind":"example.com/fpga","devices":[{"name":"0","containerEdits":{"deviceNodes":[{"path":"/dev/fpga0"}]}}]}"#.into(),
            ),
            ("/etc/cdi/broken.yaml".into(), "kind: |\n  x\n".into()),
        ];
        if let Some(v) = visible {
            i.env = vec![("NVIDIA_VISIBLE_DEVICES".into(), v.into())];
        }
        i
    }

    #[test]
    fn yaml_and_json_cdi_specs_parse_alike() {
        let j = parse_cdi_spec(Path::new("/etc/cdi/nvidia.json"), CDI_JSON).unwrap();
        let y = parse_cdi_spec(Path::new("/etc/cdi/nvidia.yaml"), CDI_YAML).unwrap();
        let mut y2 = y.clone();
        // The JSON's hook has no args; otherwise the two are the same document.
        y2["containerEdits"]["hooks"][0]
            .as_object_mut()
            .unwrap()
            .remove("args");
        // `cdiVersion: 0.5.0` is a plain string in YAML too.
        assert_eq!(y2, j);
        assert_eq!(y["cdiVersion"], "0.5.0");
    }

    #[test]
    fn cdi_devices_mounts_and_env() {
        for (path, text) in [
            ("/etc/cdi/nvidia.json", CDI_JSON),
            ("/var/run/cdi/nvidia.yaml", CDI_YAML),
        ] {
            let p = plan(&cdi_inputs(path, text, None)).unwrap();
            let devs: Vec<_> = p
                .devices
                .iter()
                .map(|d| (d.path.display().to_string(), d.source.display().to_string()))
                .collect();
            assert_eq!(
                devs,
                [
                    ("/dev/nvidia0".to_string(), "/dev/nvidia0".to_string()),
                    ("/dev/dri/card1".into(), "/dev/dri/card1".into()),
                    ("/dev/nvidia1".into(), "/dev/nvidia1".into()),
                    ("/dev/nvidiactl".into(), "/dev/nvidiactl".into()),
                ],
                "{path}"
            );
            assert_eq!(
                p.binds,
                vec![
                    bind(
                        "/usr/lib/x86_64-linux-gnu/libcuda.so.535",
                        "/usr/lib/x86_64-linux-gnu/libcuda.so.535",
                        true
                    ),
                    bind(
                        "/run/nvidia-persistenced/socket",
                        "/run/nvidia-persistenced/socket",
                        false
                    ),
                ]
            );
            assert_eq!(
                p.env,
                vec![
                    ("NVIDIA_VISIBLE_DEVICES".to_string(), "void".to_string()),
                    (
                        "NVIDIA_CTK_LIBCUDA_DIR".into(),
                        "/usr/lib/x86_64-linux-gnu".into()
                    ),
                ]
            );
            assert!(p.warnings.iter().any(|w| w.contains("broken.yaml")));
            assert!(p.warnings.iter().any(|w| w.contains("/missing")));
        }
    }

    #[test]
    fn cdi_selection_by_nvidia_visible_devices() {
        let p = plan(&cdi_inputs("/etc/cdi/nvidia.yaml", CDI_YAML, Some("1,7"))).unwrap();
        let devs: Vec<_> = p.devices.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            devs,
            [PathBuf::from("/dev/nvidia1"), "/dev/nvidiactl".into()]
        );
        assert!(p.warnings.iter().any(|w| w.contains("\"7\"")));
        // The pod's own value wins over the spec's env edit.
        assert_eq!(
            p.env[0],
            ("NVIDIA_VISIBLE_DEVICES".to_string(), "1,7".to_string())
        );

        let p = plan(&cdi_inputs("/etc/cdi/nvidia.yaml", CDI_YAML, Some("none"))).unwrap();
        assert!(p.devices.is_empty());
        assert!(p.binds.is_empty());
    }

    #[test]
    fn yaml_subset() {
        let v = yaml::parse(
            "# c\nargs:\n- --link\n- libglx.so.535::/usr/lib/libglx.so\na: 1\nb: 'it''s'\nc: \"x\\ty # not a comment\"\nd:\n  - - n1\n    - n2\n  -\n    e: true\nf: {}\ng: []\nh: ~\n",
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"args": ["--link", "libglx.so.535::/usr/lib/libglx.so"], "a": 1, "b": "it's", "c": "x\ty # not a comment",
                "d": [["n1", "n2"], {"e": true}], "f": {}, "g": [], "h": null})
        );
        assert!(yaml::parse("a: &x 1\n").is_err());
        assert!(yaml::parse("a: |\n  text\n").is_err());
        assert!(yaml::parse("a: b\n c\n").is_err());
    }

    // ----- the real-system part, on temporary directories

    #[test]
    fn walk_records_the_tree_without_following_symlinked_dirs() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("lib");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(lib.join("nvidia/xorg")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("libnvidia-evil.so"), "").unwrap();
        std::fs::write(lib.join("nvidia/xorg/libglxserver_nvidia.so.535"), "").unwrap();
        std::os::unix::fs::symlink(
            "libglxserver_nvidia.so.535",
            lib.join("nvidia/xorg/libglxserver_nvidia.so"),
        )
        .unwrap();
        std::fs::write(lib.join("libnvidia-ml.so.535"), "").unwrap();
        std::os::unix::fs::symlink("libnvidia-ml.so.535", lib.join("libnvidia-ml.so.1")).unwrap();
        std::os::unix::fs::symlink(
            "../outside/libnvidia-evil.so",
            lib.join("libnvidia-evil.so"),
        )
        .unwrap();
        std::os::unix::fs::symlink(&outside, lib.join("linked-dir")).unwrap();
        std::fs::write(lib.join("libglib-2.0.so.0"), "").unwrap();
        std::fs::write(lib.join("libcurl.so.4"), "").unwrap();

        let mut fs = BTreeMap::new();
        let mut w = Vec::new();
        walk_lib_dir(&lib, &mut fs, &mut w).unwrap();
        assert!(w.is_empty());
        assert_eq!(
            fs.get(&lib.join("linked-dir")),
            Some(&FsEntry::Symlink(outside.clone()))
        );
        assert!(!fs.contains_key(&lib.join("linked-dir/libnvidia-evil.so")));

        let mut i = inputs("", &[]);
        i.fs = fs;
        i.usr_lib_dir = lib.clone();
        i.os = os("almalinux", &["rhel", "centos", "fedora"]);
        let p = plan(&i).unwrap();
        let got: Vec<(PathBuf, PathBuf)> = p
            .binds
            .iter()
            .map(|b| {
                (
                    b.source.strip_prefix(&lib).unwrap().into(),
                    b.target.clone(),
                )
            })
            .collect();
        let want: Vec<(PathBuf, PathBuf)> = [
            "libnvidia-ml.so.1",
            "libnvidia-ml.so.535",
            "nvidia/xorg/libglxserver_nvidia.so",
            "nvidia/xorg/libglxserver_nvidia.so.535",
        ]
        .iter()
        .map(|r| (PathBuf::from(r), Path::new("/usr/lib64").join(r)))
        .collect();
        assert_eq!(got, want);
        assert!(p.binds.iter().all(|b| b.read_only));
    }

    #[test]
    fn walk_fails_on_a_missing_lib_dir_and_plan_on_an_absent_one() {
        let t = tempfile::tempdir().unwrap();
        let mut fs = BTreeMap::new();
        let r = walk_lib_dir(&t.path().join("nope"), &mut fs, &mut Vec::new());
        assert!(matches!(r, Err(GpuError::LibDir { .. })));
        let mut i = inputs("", &[]);
        i.fs.clear();
        assert!(matches!(plan(&i), Err(GpuError::LibDirMissing(_))));
    }

    #[test]
    fn cdi_files_and_neighbours_are_read_from_disk() {
        let t = tempfile::tempdir().unwrap();
        let cdi = t.path().join("cdi");
        std::fs::create_dir(&cdi).unwrap();
        std::fs::write(cdi.join("b.yaml"), CDI_YAML).unwrap();
        std::fs::write(cdi.join("a.json"), CDI_JSON).unwrap();
        std::fs::write(cdi.join("README"), "x").unwrap();
        let mut w = Vec::new();
        let specs = read_cdi_specs(&[&cdi, &t.path().join("absent")], &mut w);
        let names: Vec<_> = specs
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.json", "b.yaml"]);
        assert!(cdi_paths(&specs).contains(&PathBuf::from("/host/dev/nvidia1")));

        let dir = t.path().join("libs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("libcuda.so.535"), "").unwrap();
        std::os::unix::fs::symlink("libcuda.so.535", dir.join("libcuda.so.1")).unwrap();
        let mut fs = BTreeMap::new();
        lstat_into(&mut fs, &dir.join("libcuda.so.535"));
        scan_neighbours(&mut fs, &dir.join("libcuda.so.535"));
        assert_eq!(
            fs.get(&dir.join("libcuda.so.1")),
            Some(&FsEntry::Symlink("libcuda.so.535".into()))
        );
        // Nothing GPU-like in a plain directory used as /dev.
        let mut fs = BTreeMap::new();
        scan_dev(&dir, &mut fs);
        assert!(fs.is_empty());
    }
}

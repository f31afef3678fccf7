//! cgroup placement and delegation. The workspace's cgroup is handed to its root (host uid 100000)
//! between `create` and `start`, so the inner dockerd and systemd can create child cgroups
//! (without it: `mkdir /sys/fs/cgroup/cpuset/docker: permission denied`).

use std::path::{Path, PathBuf};

use crate::bundle::spec::ID_MAP_HOST_START;
use crate::sys::Kernel;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Retries of the move-then-enable dance: a `kubectl exec` may add a process to the root cgroup
/// between the two steps ("no internal processes" then refuses the controllers).
const MAX_ATTEMPTS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2 at /sys/fs/cgroup.
    Unified,
    /// v1 controllers (possibly with a controller-less or partial v2 beside them).
    Legacy,
}

pub fn detect_layout() -> Layout {
    match crate::sys::fs_kind(Path::new(CGROUP_ROOT)) {
        Some(crate::sys::FsKind::Cgroup2) => Layout::Unified,
        _ => Layout::Legacy,
    }
}

/// The leaf every pod process (envbox, `kubectl exec` sessions) lives in once the pod's cgroup has
/// controllers enabled for children: a cgroup with enabled controllers may hold no process itself.
pub const POD_LEAF: &str = "init";
/// The leaf the workspace's own init (envbox's) moves into, as systemd and sysbox name theirs.
pub const WORKSPACE_LEAF: &str = "init.scope";

/// What to do about the cgroup2 mount at `/sys/fs/cgroup` once envbox has its own cgroup namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountPlan {
    /// The mount already shows our namespace's root (containerd and Docker on v2 give a privileged
    /// container a private cgroup namespace and mount cgroup2 inside it). Mounting cgroup2 again on
    /// the same mount point is refused by the kernel (EBUSY), so nothing is done.
    Keep,
    /// The mount shows another root (an engine running the pod in the host's cgroup namespace):
    /// detach it, then mount a fresh one, which is rooted at our namespace.
    Replace,
    /// No cgroup2 at the mount point: mount one.
    Mount,
}

/// Decides from `/proc/self/mountinfo`, read after `unshare(CLONE_NEWCGROUP)`, where the root column
/// of a cgroup2 mount is shown relative to the reader's namespace root.
pub fn plan_mount(mountinfo: &str, target: &Path) -> MountPlan {
    // The last mount on a path is the one that shows.
    let top = mountinfo
        .lines()
        .rev()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split_whitespace().collect();
            let fstype = post.split_whitespace().next()?;
            let (root, mount_point) = (f.get(3)?, f.get(4)?);
            (Path::new(mount_point) == target).then(|| (root.to_string(), fstype.to_string()))
        })
        .next();
    match top {
        Some((root, fstype)) if fstype == "cgroup2" && root == "/" => MountPlan::Keep,
        Some((_, fstype)) if fstype == "cgroup2" => MountPlan::Replace,
        _ => MountPlan::Mount,
    }
}

/// On cgroup v2, makes the pod's cgroup delegable to the workspace, so its cgroups nest under the
/// pod's (envbox#168/#169; Tetragon and Falco attribute them to the pod): a cgroup namespace of our
/// own, `/sys/fs/cgroup` showing its root, every process moved to the leaf [`POD_LEAF`], every
/// available controller enabled for children, and the empty cgroups a killed earlier start left
/// removed. Must run before envbox starts any thread, because the namespace belongs to the calling
/// thread. On v1 nothing is needed.
pub fn delegate_pod_cgroup(
    kernel: &dyn Kernel,
    root: &Path,
    read_mountinfo: &dyn Fn() -> std::io::Result<String>,
) -> std::io::Result<()> {
    kernel.unshare_cgroup_namespace()?;
    match plan_mount(&read_mountinfo()?, root) {
        MountPlan::Keep => {}
        MountPlan::Replace => {
            kernel.unmount(root, true)?;
            kernel.mount_cgroup2(root)?;
        }
        MountPlan::Mount => kernel.mount_cgroup2(root)?,
    }
    settle_into_leaf(kernel, root, POD_LEAF)?;
    remove_stale_cgroups(kernel, root, &[POD_LEAF]);
    Ok(())
}

/// Moves every process of the cgroup `root` into `root/leaf`, then enables every controller
/// `root` has for its children. systemd does the same at boot; without it a nested dockerd finds
/// the memory and io controllers unavailable and falls back to a threaded subtree ("cannot enter
/// cgroupv2 ... with domain controllers -- it is in threaded mode").
pub fn settle_into_leaf(kernel: &dyn Kernel, root: &Path, leaf: &str) -> std::io::Result<()> {
    let leaf_dir = root.join(leaf);
    kernel.create_dir_all(&leaf_dir)?;
    let enable = controllers_to_enable(root).unwrap_or_default();
    let mut last_err = None;
    for _ in 0..MAX_ATTEMPTS {
        let procs = std::fs::read_to_string(root.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            // A process may exit between the read and the write; the next round sees.
            let _ = kernel.write_file(&leaf_dir.join("cgroup.procs"), pid.as_bytes());
        }
        if enable.is_empty() {
            return Ok(());
        }
        match kernel.write_file(&root.join("cgroup.subtree_control"), enable.as_bytes()) {
            Ok(()) => return Ok(()),
            Err(e) => last_err = Some(e),
        }
    }
    Err(std::io::Error::other(format!(
        "enabling cgroup controllers in {}/cgroup.subtree_control failed after {MAX_ATTEMPTS} attempts: {}",
        root.display(),
        last_err.map(|e| e.to_string()).unwrap_or_default()
    )))
}

/// Removes the cgroups under `root` that hold no process, deepest first, except those named in
/// `keep`: a workspace cgroup of a start that was killed (SIGKILL, OOM) stays behind empty, and a
/// kubelet cannot remove the pod's cgroup while it is there. A cgroup still in use refuses rmdir
/// (EBUSY) and is left alone.
pub fn remove_stale_cgroups(kernel: &dyn Kernel, root: &Path, keep: &[&str]) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        if keep.iter().any(|k| name == *k) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        removed += remove_tree(kernel, &e.path());
    }
    removed
}

fn remove_tree(kernel: &dyn Kernel, dir: &Path) -> usize {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                removed += remove_tree(kernel, &e.path());
            }
        }
    }
    match kernel.remove_dir(dir) {
        Ok(()) => {
            log::info!("removed the stale cgroup {}", dir.display());
            removed + 1
        }
        Err(e) => {
            log::debug!("cgroup {} stays: {e}", dir.display());
            removed
        }
    }
}

/// The path of the calling process's cgroup v2 (`0::/path` in `/proc/self/cgroup`), relative to
/// its cgroup namespace; None on a v1-only system.
pub fn own_v2_cgroup(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// Where a process that entered the pod from outside (`kubectl exec`, `docker exec`) belongs on v2.
/// The engine puts it in the pod's cgroup, which holds no process once its controllers are enabled
/// for children; runc then falls back to the cgroup of the pod's PID 1, which is [`POD_LEAF`] only
/// because envbox lives there. `envbox exec` does not depend on that: it moves itself into the leaf
/// when it finds itself at the root. Returns whether it moved.
pub fn join_pod_leaf(kernel: &dyn Kernel, root: &Path, own_cgroup: &str) -> std::io::Result<bool> {
    if own_cgroup != "/" {
        return Ok(false);
    }
    kernel.write_file(
        &root.join(POD_LEAF).join("cgroup.procs"),
        std::process::id().to_string().as_bytes(),
    )?;
    Ok(true)
}

/// Run by the workspace's init (envbox's, not systemd, which does the same itself) on v2 before it
/// starts anything: itself into [`WORKSPACE_LEAF`], every controller enabled at the workspace's
/// cgroup root, so the inner dockerd and its containers get memory, io and cpu limits. A workspace
/// the runtime already started in a leaf (sysbox's `init.scope`) only gets the controllers.
pub fn settle_workspace_init(
    kernel: &dyn Kernel,
    root: &Path,
    own_cgroup: &str,
) -> std::io::Result<()> {
    if own_cgroup == "/" {
        settle_into_leaf(kernel, root, WORKSPACE_LEAF)
    } else {
        enable_all_controllers(kernel, root)
    }
}

fn enable_all_controllers(kernel: &dyn Kernel, root: &Path) -> std::io::Result<()> {
    let enable = controllers_to_enable(root)?;
    if enable.is_empty() {
        return Ok(());
    }
    kernel.write_file(&root.join("cgroup.subtree_control"), enable.as_bytes())
}

/// `+cpu +memory ...`: every controller `root` has, as `cgroup.subtree_control` takes them.
fn controllers_to_enable(root: &Path) -> std::io::Result<String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))?;
    Ok(controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" "))
}

/// A mounted cgroup hierarchy: where it is, and which cgroup its root shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    pub root: String,
}

/// cgroup and cgroup2 mounts from a mountinfo text.
pub fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = pre.split_whitespace().collect();
            Some(Hierarchy {
                mount_point: PathBuf::from(f.get(4)?),
                root: f.get(3)?.to_string(),
            })
        })
        .collect()
}

/// The workspace's directory in each hierarchy where it exists.
pub fn workspace_dirs(hs: &[Hierarchy], cgroups_path: &str) -> Vec<PathBuf> {
    let rel = cgroups_path.trim_start_matches('/');
    let mut out: Vec<PathBuf> = hs
        .iter()
        .map(|h| h.mount_point.join(rel))
        .filter(|p| p.is_dir())
        .collect();
    // Co-mounted controllers (cpu,cpuacct) appear under several names pointing at one directory.
    out.sort();
    out.dedup();
    out
}

/// The files of a cgroup its delegatee may write (cgroups(7), "Cgroups delegation"): where it places
/// processes and which controllers its children get. `tasks` is v1's per-thread list. Limit files
/// (`memory.max`, `cpu.cfs_quota_us`, ...) stay root's, so the workspace cannot raise its own limits.
const DELEGATED_FILES: [&str; 4] = [
    "cgroup.procs",
    "cgroup.subtree_control",
    "cgroup.threads",
    "tasks",
];

/// Hands the workspace's cgroup directories (and those the runtime made below them, such as
/// sysbox's `init.scope`) to its root: each directory and its delegation files, nothing else.
pub fn delegate(kernel: &dyn Kernel, dirs: &[PathBuf]) -> std::io::Result<usize> {
    let mut n = 0;
    for d in dirs {
        n += chown_delegation(kernel, d)?;
    }
    Ok(n)
}

fn chown_delegation(kernel: &dyn Kernel, dir: &Path) -> std::io::Result<usize> {
    kernel.chown(dir, ID_MAP_HOST_START, ID_MAP_HOST_START)?;
    let mut n = 1;
    for f in DELEGATED_FILES {
        let p = dir.join(f);
        if p.exists() {
            kernel.chown(&p, ID_MAP_HOST_START, ID_MAP_HOST_START)?;
            n += 1;
        }
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += chown_delegation(kernel, &e.path())?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, RecordingKernel};

    const MOUNTINFO: &str = "\
25 1 8:1 / / rw,relatime - ext4 /dev/vda rw
30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 /pod1 /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";

    fn mountinfo_with(cgroup_line: &str) -> String {
        format!("25 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n40 25 0:30 {cgroup_line}\n")
    }

    fn pod_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "1\n42\n").unwrap();
        dir
    }

    #[test]
    fn v2_delegation_keeps_a_mount_that_already_shows_the_pods_cgroup() {
        // containerd on a v2 node: a private cgroup namespace and cgroup2 mounted inside it. A
        // second cgroup2 mount on /sys/fs/cgroup is refused with EBUSY.
        let dir = pod_tree();
        let mi = mountinfo_with(&format!(
            "/ {} rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate",
            dir.path().display()
        ));
        let k = RecordingKernel::default();
        delegate_pod_cgroup(&k, dir.path(), &|| Ok(mi.clone())).unwrap();
        let calls = k.calls();
        assert_eq!(calls[0], Call::UnshareCgroupNs);
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::MountCgroup2(_) | Call::Unmount(_))),
            "{calls:?}"
        );
        let init_procs = dir.path().join("init/cgroup.procs");
        assert!(calls.contains(&Call::Write {
            path: init_procs.clone(),
            contents: "42".into()
        }));
        let enable = calls
            .iter()
            .position(|c| {
                c == &Call::Write {
                    path: dir.path().join("cgroup.subtree_control"),
                    contents: "+cpu +memory +pids".into(),
                }
            })
            .expect("controllers enabled");
        let moved = calls
            .iter()
            .position(|c| {
                c == &Call::Write {
                    path: init_procs.clone(),
                    contents: "1".into(),
                }
            })
            .unwrap();
        assert!(
            moved < enable,
            "processes move before controllers are enabled"
        );
    }

    #[test]
    fn v2_delegation_replaces_a_mount_of_the_hosts_tree() {
        let dir = pod_tree();
        let mi = mountinfo_with(&format!(
            "/../../.. {} rw,relatime - cgroup2 cgroup2 rw",
            dir.path().display()
        ));
        let k = RecordingKernel::default();
        delegate_pod_cgroup(&k, dir.path(), &|| Ok(mi.clone())).unwrap();
        let calls = k.calls();
        assert_eq!(calls[1], Call::Unmount(dir.path().into()));
        assert_eq!(calls[2], Call::MountCgroup2(dir.path().into()));
    }

    #[test]
    fn mount_plan_reads_the_top_mount() {
        let t = Path::new("/sys/fs/cgroup");
        assert_eq!(plan_mount("", t), MountPlan::Mount);
        let both = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(plan_mount(both, t), MountPlan::Keep);
        let tmpfs_on_top = "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                            32 31 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        assert_eq!(plan_mount(tmpfs_on_top, t), MountPlan::Mount);
    }

    #[test]
    fn stale_workspace_cgroups_are_removed_deepest_first_and_the_leaf_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("init")).unwrap();
        std::fs::create_dir_all(dir.path().join("ws-old/init.scope")).unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let k = RecordingKernel::default();
        assert_eq!(remove_stale_cgroups(&k, dir.path(), &[POD_LEAF]), 2);
        assert_eq!(
            k.calls(),
            vec![
                Call::Rmdir(dir.path().join("ws-old/init.scope")),
                Call::Rmdir(dir.path().join("ws-old")),
            ]
        );
    }

    #[test]
    fn exec_moves_itself_into_the_pod_leaf_only_from_the_root() {
        let k = RecordingKernel::default();
        let root = Path::new("/sys/fs/cgroup");
        assert!(join_pod_leaf(&k, root, "/").unwrap());
        assert_eq!(
            k.calls(),
            vec![Call::Write {
                path: root.join("init/cgroup.procs"),
                contents: std::process::id().to_string()
            }]
        );
        let k = RecordingKernel::default();
        assert!(!join_pod_leaf(&k, root, "/init").unwrap());
        assert!(k.calls().is_empty());
    }

    #[test]
    fn workspace_init_moves_into_init_scope_before_enabling_controllers() {
        let dir = pod_tree();
        let k = RecordingKernel::default();
        settle_workspace_init(&k, dir.path(), "/").unwrap();
        let calls = k.calls();
        assert_eq!(calls[0], Call::Mkdir(dir.path().join("init.scope")));
        assert_eq!(
            calls.last().unwrap(),
            &Call::Write {
                path: dir.path().join("cgroup.subtree_control"),
                contents: "+cpu +memory +pids".into()
            }
        );
        // Already in a leaf (sysbox's init.scope): controllers only.
        let k = RecordingKernel::default();
        settle_workspace_init(&k, dir.path(), "/init.scope").unwrap();
        assert_eq!(
            k.calls(),
            vec![Call::Write {
                path: dir.path().join("cgroup.subtree_control"),
                contents: "+cpu +memory +pids".into()
            }]
        );
    }

    #[test]
    fn own_cgroup_is_the_unified_line() {
        assert_eq!(own_v2_cgroup("0::/init.scope\n"), Some("/init.scope"));
        assert_eq!(own_v2_cgroup("4:memory:/a\n0::/\n"), Some("/"));
        assert_eq!(own_v2_cgroup("4:memory:/a\n"), None);
    }

    #[test]
    fn finds_cgroup_mounts() {
        let h = hierarchies(MOUNTINFO);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(h[2].root, "/pod1");
    }

    #[test]
    fn delegation_chowns_directories_and_delegation_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("envbox-ws1");
        std::fs::create_dir_all(ws.join("child")).unwrap();
        std::fs::write(ws.join("cgroup.procs"), "").unwrap();
        let hs = vec![Hierarchy {
            mount_point: dir.path().into(),
            root: "/".into(),
        }];
        let dirs = workspace_dirs(&hs, "/envbox-ws1");
        assert_eq!(dirs, vec![ws.clone()]);
        std::fs::write(ws.join("memory.max"), "max").unwrap();
        std::fs::write(ws.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(ws.join("child/cpu.max"), "max 100000").unwrap();
        let k = RecordingKernel::default();
        assert_eq!(delegate(&k, &dirs).unwrap(), 4);
        let chowned: Vec<PathBuf> = k
            .calls()
            .into_iter()
            .map(|c| match c {
                Call::Chown {
                    path,
                    uid: 100000,
                    gid: 100000,
                } => path,
                c => panic!("unexpected {c:?}"),
            })
            .collect();
        assert!(chowned.contains(&ws.join("cgroup.procs")));
        assert!(chowned.contains(&ws.join("cgroup.subtree_control")));
        assert!(chowned.contains(&ws.join("child")));
        // Limit files stay root's: the workspace must not raise its own limits.
        assert!(!chowned.contains(&ws.join("memory.max")));
        assert!(!chowned.contains(&ws.join("child/cpu.max")));
    }
}

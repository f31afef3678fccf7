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

/// On cgroup v2, makes the pod's cgroup delegable to the workspace, so its cgroups nest under the
/// pod's (envbox#168/#169; Tetragon and Falco attribute them to the pod): a cgroup namespace of our
/// own, a fresh cgroup2 mount rooted at the pod's cgroup, every process moved to the leaf `init`, and
/// every available controller enabled for children. Must run before envbox starts any thread, because
/// the namespace belongs to the calling thread. On v1 nothing is needed.
pub fn delegate_pod_cgroup(kernel: &dyn Kernel, root: &Path) -> std::io::Result<()> {
    kernel.unshare_cgroup_namespace()?;
    kernel.mount_cgroup2(root)?;
    let init = root.join("init");
    kernel.create_dir_all(&init)?;
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let enable: String = controllers
        .split_whitespace()
        .map(|c| format!("+{c} "))
        .collect();
    let mut last_err = None;
    for _ in 0..MAX_ATTEMPTS {
        let procs = std::fs::read_to_string(root.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            // A process may exit between the read and the write; the next round sees.
            let _ = kernel.write_file(&init.join("cgroup.procs"), pid.as_bytes());
        }
        if enable.is_empty() {
            return Ok(());
        }
        match kernel.write_file(
            &root.join("cgroup.subtree_control"),
            enable.trim_end().as_bytes(),
        ) {
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

/// Recursively hands the workspace's cgroup directories to its root.
pub fn delegate(kernel: &dyn Kernel, dirs: &[PathBuf]) -> std::io::Result<usize> {
    let mut n = 0;
    for d in dirs {
        n += chown_tree(kernel, d)?;
    }
    Ok(n)
}

fn chown_tree(kernel: &dyn Kernel, dir: &Path) -> std::io::Result<usize> {
    kernel.chown(dir, ID_MAP_HOST_START, ID_MAP_HOST_START)?;
    let mut n = 1;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += chown_tree(kernel, &e.path())?;
        } else {
            kernel.chown(&e.path(), ID_MAP_HOST_START, ID_MAP_HOST_START)?;
            n += 1;
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

    #[test]
    fn v2_delegation_moves_processes_then_enables_controllers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "1\n42\n").unwrap();
        let k = RecordingKernel::default();
        delegate_pod_cgroup(&k, dir.path()).unwrap();
        let calls = k.calls();
        assert_eq!(calls[0], Call::UnshareCgroupNs);
        assert_eq!(calls[1], Call::MountCgroup2(dir.path().into()));
        let init_procs = dir.path().join("init/cgroup.procs");
        assert!(calls.contains(&Call::Write {
            path: init_procs.clone(),
            contents: "42".into()
        }));
        assert_eq!(
            calls.last().unwrap(),
            &Call::Write {
                path: dir.path().join("cgroup.subtree_control"),
                contents: "+cpu +memory +pids".into()
            }
        );
    }

    #[test]
    fn finds_cgroup_mounts() {
        let h = hierarchies(MOUNTINFO);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(h[2].root, "/pod1");
    }

    #[test]
    fn delegation_chowns_every_entry() {
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
        let k = RecordingKernel::default();
        assert_eq!(delegate(&k, &dirs).unwrap(), 3);
        assert!(k.calls().contains(&Call::Chown {
            path: ws.join("cgroup.procs"),
            uid: 100000,
            gid: 100000
        }));
    }
}

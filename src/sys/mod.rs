//! The kernel seam: every operation with a side effect on the pod goes through one of these narrow traits,
//! so the logic above them is unit-tested against the recording fakes in `fake` without root, and the
//! real implementations stay thin enough to be covered by the bats suites.

use std::io;
use std::path::Path;

use crate::pid1::supervisor::Exit;

#[cfg(test)]
pub mod fake;
pub mod real;

/// Process control for the supervisor.
pub trait ProcessOps: Send + Sync {
    /// `waitpid(-1, WNOHANG)`: one exited child, or None when nothing (more) is waiting.
    fn reap_any(&self) -> Option<(i32, Exit)>;
    fn kill(&self, pid: i32, sig: i32) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Char,
    Block,
}

/// File-system and mount operations on the pod.
pub trait Kernel: Send + Sync {
    fn mount_overlay(
        &self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()>;
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()>;
    fn remount_read_write(&self, target: &Path) -> io::Result<()>;
    /// Lazy-free unmount that fails loudly; `MNT_DETACH` is used only when asked for.
    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()>;
    fn mknod(
        &self,
        path: &Path,
        kind: NodeKind,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> io::Result<()>;
    /// Non-recursive, never follows a final symlink.
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()>;
    fn write_file(&self, path: &Path, contents: &[u8]) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// `rmdir`: how an empty cgroup is removed.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// A new cgroup namespace for the calling thread (and the children it spawns afterwards).
    fn unshare_cgroup_namespace(&self) -> io::Result<()>;
    fn mount_cgroup2(&self, target: &Path) -> io::Result<()>;
    fn set_oom_score_adj(&self, pid: Option<i32>, score: i32) -> io::Result<()>;
    /// envbox's own `oom_score_adj`.
    fn oom_score_adj(&self) -> io::Result<i32>;
}

/// File systems whose presence changes what envbox may do with a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Overlay,
    Tmpfs,
    Cgroup2,
    Other,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Overlay => "overlayfs",
            FsKind::Tmpfs => "tmpfs",
            FsKind::Cgroup2 => "cgroup2",
            FsKind::Other => "another file system",
        }
    }
}

/// The file system of `path`, or None when it cannot be inspected.
pub fn fs_kind(path: &Path) -> Option<FsKind> {
    let st = rustix::fs::statfs(path).ok()?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    Some(match st.f_type as i64 {
        0x794c_7630 => FsKind::Overlay,
        0x0102_1994 => FsKind::Tmpfs,
        0x6367_7270 => FsKind::Cgroup2,
        _ => FsKind::Other,
    })
}

/// [`sync_filesystems`] until `deadline` at most. `syncfs` cannot be interrupted, so it runs on a
/// thread of its own; past the deadline envbox goes on without it (the kernel still writes the data
/// back, and the kubelet would SIGKILL the pod at the end of its grace period anyway). Returns whether
/// every sync finished in time.
pub fn sync_filesystems_until(
    paths: Vec<std::path::PathBuf>,
    deadline: std::time::Instant,
) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("syncfs".into())
        .spawn(move || {
            let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
            sync_filesystems(&refs);
            let _ = tx.send(());
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the volume sync: {e}");
        return false;
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    match rx.recv_timeout(left) {
        Ok(()) => true,
        Err(_) => {
            log::warn!("syncing the volumes did not finish before the shutdown deadline; the kernel completes it in the background");
            false
        }
    }
}

/// `syncfs` on the file system of each path (once per file system): the volumes the workspace wrote
/// to, without waiting for unrelated writers on the node as a global `sync` would.
pub fn sync_filesystems(paths: &[&Path]) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    for p in paths {
        let Ok(md) = std::fs::metadata(p) else {
            continue;
        };
        if seen.contains(&md.dev()) {
            continue;
        }
        seen.push(md.dev());
        match std::fs::File::open(p) {
            Ok(f) => {
                if let Err(e) = rustix::fs::syncfs(&f) {
                    log::warn!("syncing the file system of {}: {e}", p.display());
                }
            }
            Err(e) => log::warn!("syncing the file system of {}: {e}", p.display()),
        }
    }
}

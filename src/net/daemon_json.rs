//! The inner dockerd's MTU (envbox#167): a workspace's dockerd defaults to MTU 1500 for its
//! bridge, which hangs TLS (e.g. in `docker build`) when the pod's MTU is smaller. envbox
//! gives it the pod's MTU through `/etc/docker/daemon.json` without changing the image:
//! the new file goes into the workspace's fresh overlay upper layer, and an existing file
//! from the image is never rewritten.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Gid, Mode, OFlags, Uid};
use serde_json::Value;

/// Path of dockerd's configuration inside the workspace.
pub const DAEMON_JSON_PATH: &str = "/etc/docker/daemon.json";

/// What to do about the workspace's `/etc/docker/daemon.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonJsonDecision {
    /// The image has none: write this content (`{"mtu": N}`).
    Write(String),
    /// The image's file already sets an MTU that fits the pod: leave it alone.
    Keep,
    /// Leave the image's file alone, and show the user this warning.
    KeepWithWarning(String),
}

/// Decides from the image's `/etc/docker/daemon.json` (`None` when it has none) and the
/// pod's MTU.
pub fn inner_docker_daemon_json(existing: Option<&str>, mtu: u32) -> DaemonJsonDecision {
    let Some(text) = existing else {
        let mut content = serde_json::json!({ "mtu": mtu }).to_string();
        content.push('\n');
        return DaemonJsonDecision::Write(content);
    };
    let add_hint = format!("add \"mtu\": {mtu} to {DAEMON_JSON_PATH} in the image");
    let parsed: Result<Value, _> = serde_json::from_str(text);
    let obj = match parsed {
        Ok(Value::Object(obj)) => obj,
        Ok(_) | Err(_) if text.trim().is_empty() => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is empty, so Docker inside the workspace uses \
                 MTU 1500 while the pod's network has MTU {mtu}; connections from inner \
                 containers may hang. To fix it, {add_hint}."
            ))
        }
        Ok(_) => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is not a JSON object; dockerd may refuse to \
                 start. Left unchanged; also {add_hint}."
            ))
        }
        Err(e) => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is not valid JSON ({e}); dockerd may refuse \
                 to start. Left unchanged; also {add_hint}."
            ))
        }
    };
    match obj.get("mtu") {
        None => DaemonJsonDecision::KeepWithWarning(format!(
            "{DAEMON_JSON_PATH} in the image sets no \"mtu\", so Docker inside the workspace \
             uses MTU 1500 while the pod's network has MTU {mtu}; connections from inner \
             containers (e.g. TLS in docker build) may hang. To fix it, {add_hint}."
        )),
        Some(v) => match v.as_u64() {
            Some(set) if set > u64::from(mtu) => DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image sets \"mtu\": {set}, more than the pod \
                 network's MTU {mtu}; connections from inner containers may hang. Set \"mtu\": \
                 {mtu} or lower."
            )),
            _ => DaemonJsonDecision::Keep,
        },
    }
}

/// Writes `content` as `/etc/docker/daemon.json` of the mounted root filesystem `root`,
/// owned by `owner` (the host ids of the workspace's root), creating `/etc/docker` when
/// the image has none.
///
/// The write goes through the mounted root (an overlay: the kernel copies `/etc/docker`
/// up into the writable layer), never into the overlay's upper directory behind its back,
/// which overlayfs does not see reliably once the directory has been looked up. The image
/// is untrusted: every path is resolved with `RESOLVE_IN_ROOT`, so a symlinked
/// `/etc/docker` stays inside `root`, and the file is created with `O_EXCL`, so an
/// existing file or link is never followed or rewritten.
pub fn write_daemon_json(root: &Path, content: &str, owner: (u32, u32)) -> io::Result<()> {
    let root_fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let (uid, gid) = (Some(Uid::from_raw(owner.0)), Some(Gid::from_raw(owner.1)));
    let mut dir = PathBuf::new();
    let mut dir_fd = root_fd.try_clone()?;
    let parent = Path::new(DAEMON_JSON_PATH.trim_start_matches('/'))
        .parent()
        .unwrap_or(Path::new(""));
    for comp in parent.components() {
        dir.push(comp);
        dir_fd = match in_root(root_fd.as_fd(), &dir, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let name = comp.as_os_str();
                rfs::mkdirat(&dir_fd, name, Mode::from_raw_mode(0o755))?;
                rfs::chownat(&dir_fd, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)?;
                in_root(root_fd.as_fd(), &dir, OFlags::PATH | OFlags::DIRECTORY)?
            }
            Err(e) => return Err(e),
        };
    }
    let name = Path::new(DAEMON_JSON_PATH).file_name().unwrap_or_default();
    let fd = rfs::openat(
        &dir_fd,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    rfs::fchown(&fd, uid, gid)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

fn in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    crate::image::unpack::open_in_root(root, path.as_os_str().as_bytes(), flags)
}

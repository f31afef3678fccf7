//! The real kernel: thin wrappers over the syscalls, each error carrying the path it was about.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::wait::{WaitPidFlag, WaitStatus};

use super::{Kernel, NodeKind, ProcessOps};
use crate::pid1::supervisor::Exit;

pub struct RealProcessOps;

impl ProcessOps for RealProcessOps {
    fn reap_any(&self) -> Option<(i32, Exit)> {
        loop {
            match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(pid, code)) => return Some((pid.as_raw(), Exit::Code(code))),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    return Some((pid.as_raw(), Exit::Signal(sig as i32)))
                }
                // Stops and continues are not exits; keep looking.
                Ok(WaitStatus::StillAlive) => return None,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }

    fn kill(&self, pid: i32, sig: i32) -> io::Result<()> {
        // SAFETY: kill(2) with a plain pid and signal number has no memory-safety preconditions.
        let r = unsafe { libc::kill(pid, sig) };
        if r == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

pub struct RealKernel;

fn ctx(e: nix::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(
        io::Error::from(e).kind(),
        format!("{what} {}: {e}", path.display()),
    )
}

impl Kernel for RealKernel {
    fn mount_overlay(
        &self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        let mut data = b"lowerdir=".to_vec();
        for (i, l) in lowers.iter().enumerate() {
            if i > 0 {
                data.push(b':');
            }
            data.extend_from_slice(l.as_os_str().as_bytes());
        }
        data.extend_from_slice(b",upperdir=");
        data.extend_from_slice(upper.as_os_str().as_bytes());
        data.extend_from_slice(b",workdir=");
        data.extend_from_slice(work.as_os_str().as_bytes());
        // Without index/xino the mount works on any lower filesystem and survives layer re-use.
        data.extend_from_slice(b",index=off,xino=off");
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_slice()),
        )
        .map_err(|e| ctx(e, "mount overlay on", target))
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| ctx(e, &format!("bind-mount {} on", source.display()), target))?;
        if read_only {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(|e| ctx(e, "remount read-only", target))?;
        }
        Ok(())
    }

    fn remount_read_write(&self, target: &Path) -> io::Result<()> {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| ctx(e, "remount read-write", target))
    }

    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
        let flags = if detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        nix::mount::umount2(target, flags).map_err(|e| ctx(e, "unmount", target))
    }

    fn mknod(
        &self,
        path: &Path,
        kind: NodeKind,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> io::Result<()> {
        let k = match kind {
            NodeKind::Char => SFlag::S_IFCHR,
            NodeKind::Block => SFlag::S_IFBLK,
        };
        let dev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
        nix::sys::stat::mknod(path, k, Mode::from_bits_truncate(mode), dev)
            .map_err(|e| ctx(e, "mknod", path))
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("chown {uid}:{gid} {}: {e}", path.display()),
            )
        })
    }

    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            io::Error::new(e.kind(), format!("chmod {mode:o} {}: {e}", path.display()))
        })
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        std::fs::write(path, contents)
            .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", path.display())))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("create directory {}: {e}", path.display()),
            )
        })
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("remove directory {}: {e}", path.display()),
            )
        })
    }

    fn unshare_cgroup_namespace(&self) -> io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("unshare the cgroup namespace: {e}"),
            )
        })
    }

    fn mount_cgroup2(&self, target: &Path) -> io::Result<()> {
        nix::mount::mount(
            Some("cgroup2"),
            target,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| ctx(e, "mount cgroup2 on", target))
    }

    fn set_oom_score_adj(&self, pid: Option<i32>, score: i32) -> io::Result<()> {
        let p = match pid {
            Some(pid) => format!("/proc/{pid}/oom_score_adj"),
            None => "/proc/self/oom_score_adj".to_string(),
        };
        self.write_file(Path::new(&p), score.to_string().as_bytes())
    }

    fn oom_score_adj(&self) -> io::Result<i32> {
        let p = Path::new("/proc/self/oom_score_adj");
        std::fs::read_to_string(p)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))?
            .trim()
            .parse()
            .map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", p.display()))
            })
    }
}

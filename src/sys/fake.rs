//! Recording fakes of the kernel seam for unit tests: they do nothing but remember each call in order.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Kernel, NodeKind, ProcessOps};
use crate::pid1::supervisor::Exit;

#[derive(Default)]
pub struct FakeProcessOps {
    exits: Mutex<VecDeque<(i32, Exit)>>,
    kills: Mutex<Vec<(i32, i32)>>,
}

impl FakeProcessOps {
    /// Queues an exit for the next `reap_any`.
    pub fn exit(&self, pid: i32, exit: Exit) {
        self.exits.lock().unwrap().push_back((pid, exit));
    }

    pub fn kills(&self) -> Vec<(i32, i32)> {
        self.kills.lock().unwrap().clone()
    }
}

impl ProcessOps for FakeProcessOps {
    fn reap_any(&self) -> Option<(i32, Exit)> {
        self.exits.lock().unwrap().pop_front()
    }

    fn kill(&self, pid: i32, sig: i32) -> io::Result<()> {
        self.kills.lock().unwrap().push((pid, sig));
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    MountOverlay {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    Bind {
        source: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
    RemountRw(PathBuf),
    Unmount(PathBuf),
    Mknod {
        path: PathBuf,
        kind: NodeKind,
        major: u32,
        minor: u32,
        mode: u32,
    },
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    Write {
        path: PathBuf,
        contents: String,
    },
    OomScore {
        pid: Option<i32>,
        score: i32,
    },
    Mkdir(PathBuf),
    Rmdir(PathBuf),
    UnshareCgroupNs,
    MountCgroup2(PathBuf),
}

#[derive(Default)]
pub struct RecordingKernel {
    calls: Mutex<Vec<Call>>,
    /// Paths whose mknod fails with EEXIST, as on a restart where the node survived.
    pub existing_nodes: Mutex<Vec<PathBuf>>,
    /// At each overlay mount: the calling thread's working directory and the process's (its
    /// main thread's), which relative lower directories resolve against.
    pub overlay_cwds: Mutex<Vec<(PathBuf, PathBuf)>>,
    /// envbox's own oom_score_adj, as the kernel keeps it.
    pub oom: Mutex<FakeOom>,
}

/// The kernel's rule: a value below `min` needs CAP_SYS_RESOURCE, which the fake never has. The
/// default is a process that may go anywhere (min -1000), as root with CAP_SYS_RESOURCE.
pub struct FakeOom {
    pub current: i32,
    pub min: i32,
}

impl Default for FakeOom {
    fn default() -> Self {
        FakeOom {
            current: 0,
            min: -1000,
        }
    }
}

impl RecordingKernel {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl Kernel for RecordingKernel {
    fn mount_overlay(
        &self,
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> io::Result<()> {
        let cwd = |p: &str| std::fs::read_link(p).unwrap_or_default();
        self.overlay_cwds
            .lock()
            .unwrap()
            .push((cwd("/proc/thread-self/cwd"), cwd("/proc/self/cwd")));
        self.record(Call::MountOverlay {
            lowers: lowers.iter().map(|p| p.to_path_buf()).collect(),
            upper: upper.into(),
            work: work.into(),
            target: target.into(),
        });
        Ok(())
    }
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        self.record(Call::Bind {
            source: source.into(),
            target: target.into(),
            read_only,
        });
        Ok(())
    }
    fn remount_read_write(&self, target: &Path) -> io::Result<()> {
        self.record(Call::RemountRw(target.into()));
        Ok(())
    }
    fn unmount(&self, target: &Path, _detach: bool) -> io::Result<()> {
        self.record(Call::Unmount(target.into()));
        Ok(())
    }
    fn mknod(
        &self,
        path: &Path,
        kind: NodeKind,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> io::Result<()> {
        self.record(Call::Mknod {
            path: path.into(),
            kind,
            major,
            minor,
            mode,
        });
        if self
            .existing_nodes
            .lock()
            .unwrap()
            .iter()
            .any(|p| p == path)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(())
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.record(Call::Chown {
            path: path.into(),
            uid,
            gid,
        });
        Ok(())
    }
    fn chmod(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.record(Call::Chmod {
            path: path.into(),
            mode,
        });
        Ok(())
    }
    fn write_file(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        self.record(Call::Write {
            path: path.into(),
            contents: String::from_utf8_lossy(contents).into(),
        });
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Mkdir(path.into()));
        Ok(())
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Rmdir(path.into()));
        Ok(())
    }
    fn unshare_cgroup_namespace(&self) -> io::Result<()> {
        self.record(Call::UnshareCgroupNs);
        Ok(())
    }
    fn mount_cgroup2(&self, target: &Path) -> io::Result<()> {
        self.record(Call::MountCgroup2(target.into()));
        Ok(())
    }
    fn set_oom_score_adj(&self, pid: Option<i32>, score: i32) -> io::Result<()> {
        self.record(Call::OomScore { pid, score });
        if pid.is_none() {
            let mut o = self.oom.lock().unwrap();
            if score < o.min {
                return Err(io::Error::from_raw_os_error(libc::EACCES));
            }
            o.current = score;
        }
        Ok(())
    }
    fn oom_score_adj(&self) -> io::Result<i32> {
        Ok(self.oom.lock().unwrap().current)
    }
}

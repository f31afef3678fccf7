//! CODER_STATE_DIR as one pod's property: an exclusive lock for envbox's whole life, and the files
//! in it that carry secrets, which never outlive the workspace.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "CODER_STATE_DIR {dir} is in use by another envbox (another pod on the same volume, as during \
         a rolling update on one node). Nothing was changed; stop the other pod first, or give this \
         one its own volume (a StatefulSet, or `strategy: Recreate` on the Deployment)"
    )]
    InUse { dir: PathBuf },
    #[error("creating CODER_STATE_DIR {dir}: {source}")]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("locking CODER_STATE_DIR {dir} ({op}): {source}")]
    Lock {
        dir: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
}

/// Held for as long as envbox runs: the kernel drops the lock when the process ends, however it ends,
/// so there is nothing stale to clean up after a crash or a SIGKILL.
#[derive(Debug)]
pub struct StateDirLock {
    _fd: OwnedFd,
}

impl StateDirLock {
    /// Creates `dir` if needed and locks it, without waiting: a second envbox must fail before it
    /// touches anything of the first's (its writable layer, its runtime state, its link).
    pub fn acquire(dir: &Path) -> Result<StateDirLock, StateDirError> {
        std::fs::create_dir_all(dir).map_err(|source| StateDirError::Create {
            dir: dir.into(),
            source,
        })?;
        // CLOEXEC: a runtime or daemon that outlives envbox must not keep the volume locked.
        let fd = rfs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| StateDirError::Lock {
            dir: dir.into(),
            op: "open",
            source: e.into(),
        })?;
        match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(StateDirLock { _fd: fd }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StateDirError::InUse { dir: dir.into() }),
            Err(e) => Err(StateDirError::Lock {
                dir: dir.into(),
                op: "flock",
                source: e.into(),
            }),
        }
    }
}

/// Files under the state dir that carry the agent token (its environment): the bundle's
/// `config.json` and the bootstrap's process description. Written 0600; removed when the workspace
/// stops and again at the next start, for a stop that never got that far (SIGKILL, node loss).
pub const SECRET_FILES: [&str; 2] = ["bundle/config.json", "bootstrap-process.json"];

/// Removes [`SECRET_FILES`] (and the temporary files they are written through). Returns what was
/// removed, so a start can say that the last stop did not finish.
pub fn remove_secrets(state_dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for f in SECRET_FILES {
        let p = state_dir.join(f);
        for p in [p.with_extension("tmp"), p] {
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "cannot remove {}, which holds the agent token: {e}; remove it by hand",
                    p.display()
                ),
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_fails_at_once_and_the_first_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let first = StateDirLock::acquire(&dir).unwrap();
        let e = StateDirLock::acquire(&dir).unwrap_err();
        assert!(matches!(e, StateDirError::InUse { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.display().to_string()) && msg.contains("another envbox"),
            "{msg}"
        );
        // Released with its holder, as at process exit.
        drop(first);
        StateDirLock::acquire(&dir).unwrap();
    }

    #[test]
    fn secrets_are_removed_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("bundle")).unwrap();
        for f in [
            "bundle/config.json",
            "bundle/config.tmp",
            "bootstrap-process.json",
            "workspace.json",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let removed = remove_secrets(d.path());
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert!(!d.path().join("bundle/config.json").exists());
        assert!(!d.path().join("bundle/config.tmp").exists());
        assert!(!d.path().join("bootstrap-process.json").exists());
        assert!(d.path().join("workspace.json").exists());
        assert!(remove_secrets(d.path()).is_empty());
    }
}

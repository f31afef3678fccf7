//! Pod set-up before anything else runs: privilege check, OOM score, writable /sys.

use std::path::Path;

use crate::sys::Kernel;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "the pod is not privileged: envbox lacks {missing} in its effective capabilities. Set \
         `securityContext.privileged: true` on the envbox container (sysbox needs real root to create \
         user namespaces, mounts and seccomp listeners)"
    )]
    NotPrivileged { missing: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Capabilities without which nothing later can work; checked first so the error says so plainly
/// (sysbox's own message blames the kernel's seccomp level, sysbox#891).
pub fn check_privileged() -> Result<(), PodError> {
    use caps::{CapSet, Capability};
    let needed = [
        Capability::CAP_SYS_ADMIN,
        Capability::CAP_NET_ADMIN,
        Capability::CAP_MKNOD,
        Capability::CAP_CHOWN,
    ];
    let missing: Vec<String> = needed
        .iter()
        .filter(|c| !caps::has_cap(None, CapSet::Effective, **c).unwrap_or(false))
        .map(|c| c.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PodError::NotPrivileged {
            missing: missing.join(", "),
        })
    }
}

/// envbox must outlive everything it supervises when the node runs short of memory.
pub const ENVBOX_OOM_SCORE: i32 = -1000;

pub fn prepare(kernel: &dyn Kernel) -> Result<(), PodError> {
    if let Err(e) = kernel.set_oom_score_adj(None, ENVBOX_OOM_SCORE) {
        log::warn!("cannot set envbox's oom_score_adj: {e}");
    }
    // The workspace's sysfs and sysbox's bind mounts need /sys writable; pods get it read-only.
    if is_read_only(Path::new("/sys")) {
        kernel.remount_read_write(Path::new("/sys"))?;
    }
    Ok(())
}

fn is_read_only(p: &Path) -> bool {
    rustix::fs::statvfs(p)
        .map(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        .unwrap_or(false)
}

//! Pod set-up before anything else runs: privilege check, OOM order, writable /sys.

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

/// Where each process envbox starts goes in the kernel's OOM order. Higher is killed first: the
/// workspace (where the memory is) before sysbox's daemons (whose death tears the workspace down)
/// before envbox (PID 1 of the pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OomOrder {
    /// The value the kubelet gave the pod, read at start; the workspace's init gets exactly this.
    pub workspace: i32,
    /// None: the daemons keep what they inherit from envbox.
    pub daemons: Option<i32>,
    pub envbox: i32,
}

/// The most protected value; only envbox itself gets it.
pub const OOM_SCORE_MIN: i32 = -1000;

impl OomOrder {
    /// The order when envbox may lower scores (CAP_SYS_RESOURCE): the daemons at sysbox's own
    /// `OOMScoreAdjust=-500`, or just below the pod when the pod is already more protected than that
    /// (a Guaranteed pod gets -997), and envbox below everything.
    pub fn wanted(pod: i32) -> OomOrder {
        let daemons = crate::runtime::sysbox::DAEMON_OOM_SCORE
            .min(pod.saturating_sub(1))
            .max(OOM_SCORE_MIN);
        OomOrder {
            workspace: pod,
            daemons: Some(daemons),
            envbox: OOM_SCORE_MIN,
        }
    }

    /// Without the right to lower a score, everything stays at the pod's value: never less for the
    /// workspace, and nothing started later can be made more protected than envbox either.
    pub fn unchanged(pod: i32) -> OomOrder {
        OomOrder {
            workspace: pod,
            daemons: None,
            envbox: pod,
        }
    }
}

/// Reads the pod's `oom_score_adj` and moves envbox below it. When the kernel refuses (lowering a
/// score needs CAP_SYS_RESOURCE, which root lacks on some nodes), envbox keeps the pod's value and
/// says so once, through `say`.
pub fn oom_order(kernel: &dyn Kernel, say: &dyn Fn(&str)) -> OomOrder {
    let pod = match kernel.oom_score_adj() {
        Ok(v) => v,
        Err(e) => {
            // Without the pod's value there is nothing to order against; 0 is the kernel's default.
            log::warn!("cannot read envbox's oom_score_adj ({e}); assuming 0");
            0
        }
    };
    let order = OomOrder::wanted(pod);
    if order.envbox == pod {
        return order;
    }
    match kernel.set_oom_score_adj(None, order.envbox) {
        Ok(()) => order,
        Err(e) => {
            say(&format!(
                "The pod's oom_score_adj ({pod}) is kept for envbox and the sysbox daemons: lowering it \
                 was refused ({e}), it needs CAP_SYS_RESOURCE. The workspace gets the same value, so \
                 under memory pressure the kernel may pick envbox or a daemon as soon as the workspace"
            ));
            OomOrder::unchanged(pod)
        }
    }
}

pub fn prepare(kernel: &dyn Kernel) -> Result<(), PodError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, RecordingKernel};
    use std::cell::RefCell;

    fn run(kernel: &RecordingKernel) -> (OomOrder, Vec<String>) {
        let said = RefCell::new(Vec::new());
        let order = oom_order(kernel, &|m| said.borrow_mut().push(m.to_string()));
        (order, said.into_inner())
    }

    #[test]
    fn with_cap_sys_resource_the_workspace_keeps_the_pods_value_and_daemons_and_envbox_go_below() {
        let k = RecordingKernel::default();
        k.oom.lock().unwrap().current = 500;
        let (order, said) = run(&k);
        assert_eq!(
            order,
            OomOrder {
                workspace: 500,
                daemons: Some(-500),
                envbox: -1000
            }
        );
        assert!(said.is_empty(), "{said:?}");
        assert_eq!(
            k.calls(),
            vec![Call::OomScore {
                pid: None,
                score: -1000
            }]
        );
    }

    #[test]
    fn a_guaranteed_pod_already_below_the_daemons_default_still_gets_the_order() {
        let k = RecordingKernel::default();
        k.oom.lock().unwrap().current = -997;
        let (order, _) = run(&k);
        assert_eq!(order.workspace, -997);
        assert_eq!(order.daemons, Some(-998));
        assert_eq!(order.envbox, -1000);
        // A pod at the minimum already: nothing to lower, nothing written.
        let k = RecordingKernel::default();
        k.oom.lock().unwrap().current = -1000;
        let (order, said) = run(&k);
        assert_eq!(order, OomOrder::wanted(-1000));
        assert_eq!(order.daemons, Some(-1000));
        assert!(k.calls().is_empty() && said.is_empty());
    }

    #[test]
    fn without_cap_sys_resource_everything_keeps_the_pods_value_and_it_is_said_once() {
        let k = RecordingKernel::default();
        {
            let mut o = k.oom.lock().unwrap();
            o.current = 500;
            // As the kernel: below this minimum only CAP_SYS_RESOURCE may go.
            o.min = 500;
        }
        let (order, said) = run(&k);
        assert_eq!(order, OomOrder::unchanged(500));
        assert_eq!(order.daemons, None);
        assert_eq!(order.workspace, 500);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("CAP_SYS_RESOURCE") && said[0].contains("500"),
            "{}",
            said[0]
        );
        assert_eq!(k.oom.lock().unwrap().current, 500);
    }
}

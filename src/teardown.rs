//! One undo stack for start-up and stop. Each thing start-up makes (sysbox's daemons, the root
//! filesystem mount, the token files, the pod's link, the container) is pushed once it exists; an
//! aborted start-up and the ordered stop both unwind the same stack, newest first, within one
//! deadline. Nothing is cleaned up anywhere else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::image::rootfs::{self, Rootfs};
use crate::net::{self, LinkPlan};
use crate::pid1::supervisor::Supervisor;
use crate::runtime::sysbox::SysboxDaemons;
use crate::statedir;
use crate::sys::Kernel;
use crate::workspace::{Bootstrap, Workspace};

/// How long an aborted start-up may take to undo what it made.
pub const ABORT_BUDGET: Duration = Duration::from_secs(5);

/// Something start-up made, with what it takes to undo it.
pub enum Made {
    Daemons(SysboxDaemons),
    Rootfs(Rootfs),
    /// The bundle's `config.json` and the bootstrap's process file carry the agent token.
    TokenFiles,
    /// The pod side of the workspace's link and its NAT rules. Pushed before the container is
    /// created, so that it unwinds after the container has stopped: the agent keeps its network
    /// for its shutdown scripts. Removing a link that was never made is a no-op.
    Link,
    Container(Workspace),
}

/// How a stop goes: the one deadline, the part of it the container may use, the bootstrap to stop
/// first (the agent), and whether a second stop request asks to hurry.
pub struct StopPlan<'a> {
    pub deadline: Instant,
    pub container_deadline: Instant,
    pub bootstrap: Option<&'a Bootstrap>,
    pub hurry: &'a dyn Fn() -> bool,
}

impl StopPlan<'_> {
    /// An aborted start-up: no agent to wait for, the container killed at once.
    pub fn abort() -> StopPlan<'static> {
        let deadline = Instant::now() + ABORT_BUDGET;
        StopPlan {
            deadline,
            container_deadline: deadline,
            bootstrap: None,
            hurry: &|| true,
        }
    }
}

/// What an unwind did, for the stop's log line.
pub struct Unwound {
    /// The container stopped on its stop signal, not by SIGKILL.
    pub clean: bool,
    pub container: Duration,
    pub total: Duration,
}

pub struct Teardown<'a> {
    sup: &'a Arc<Supervisor>,
    kernel: &'a dyn Kernel,
    link: &'a LinkPlan,
    state_dir: PathBuf,
    made: Vec<Made>,
}

impl<'a> Teardown<'a> {
    pub fn new(
        sup: &'a Arc<Supervisor>,
        kernel: &'a dyn Kernel,
        link: &'a LinkPlan,
        state_dir: &Path,
    ) -> Self {
        Teardown {
            sup,
            kernel,
            link,
            state_dir: state_dir.to_path_buf(),
            made: Vec::new(),
        }
    }

    pub fn push(&mut self, made: Made) {
        self.made.push(made);
    }

    pub fn container(&self) -> Option<&Workspace> {
        self.made.iter().find_map(|m| match m {
            Made::Container(ws) => Some(ws),
            _ => None,
        })
    }

    pub fn daemons(&self) -> Option<&SysboxDaemons> {
        self.made.iter().find_map(|m| match m {
            Made::Daemons(d) => Some(d),
            _ => None,
        })
    }

    /// sysbox's daemons restarted in place (a `create` that timed out): the old ones are stopped
    /// and the new ones keep their place on the stack.
    pub fn replace_daemons(
        &mut self,
        start: impl FnOnce() -> Result<SysboxDaemons, String>,
    ) -> Result<(), String> {
        let Some(i) = self.made.iter().position(|m| matches!(m, Made::Daemons(_))) else {
            return Err("no sysbox daemons to restart".into());
        };
        if let Made::Daemons(old) = self.made.remove(i) {
            old.stop(self.sup, Instant::now() + ABORT_BUDGET);
        }
        let new = start()?;
        self.made.insert(i, Made::Daemons(new));
        Ok(())
    }

    /// An aborted start-up: everything undone at once, then the reason handed on.
    pub fn abort<E>(self, reason: E) -> E {
        self.unwind(&StopPlan::abort());
        reason
    }

    /// Undoes everything, newest first. The container gets until `container_deadline`; what
    /// follows its delete keeps the rest of `deadline`.
    pub fn unwind(mut self, plan: &StopPlan) -> Unwound {
        let started = Instant::now();
        let mut out = Unwound {
            clean: true,
            container: Duration::ZERO,
            total: Duration::ZERO,
        };
        while let Some(made) = self.made.pop() {
            match made {
                Made::Container(ws) => {
                    out.clean = ws.stop(plan.bootstrap, plan.container_deadline, plan.hurry);
                    out.container = started.elapsed();
                }
                Made::Link => {
                    let iptables = net::UntilDeadline {
                        sup: self.sup.as_ref(),
                        deadline: plan.deadline,
                    };
                    if let Err(e) = net::teardown(self.link, &iptables) {
                        log::warn!("removing the workspace's link: {e}");
                    }
                }
                Made::TokenFiles => {
                    statedir::remove_secrets(&self.state_dir);
                }
                Made::Rootfs(r) => rootfs::release(self.kernel, &r),
                Made::Daemons(d) => {
                    // Half of what is left, so that a wedged daemon leaves the volumes' sync its turn.
                    let now = Instant::now();
                    d.stop(
                        self.sup,
                        now + plan.deadline.saturating_duration_since(now) / 2,
                    );
                }
            }
        }
        out.total = started.elapsed();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::rootfs::RootfsKind;
    use crate::sys::fake::{Call, FakeProcessOps, RecordingKernel};
    use std::net::Ipv4Addr;

    fn plan() -> LinkPlan {
        LinkPlan::new(
            Ipv4Addr::new(172, 19, 0, 1),
            Ipv4Addr::new(172, 19, 0, 2),
            30,
        )
    }

    #[test]
    fn an_abort_undoes_what_was_made_newest_first_and_hands_on_the_reason() {
        let state = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(state.path().join("bundle")).unwrap();
        let token_file = state.path().join(statedir::SECRET_FILES[0]);
        std::fs::write(&token_file, "{\"env\":[\"CODER_AGENT_TOKEN=t\"]}").unwrap();
        let sup = Supervisor::new(Arc::new(FakeProcessOps::default()));
        let kernel = RecordingKernel::default();
        let link = plan();
        let mut undo = Teardown::new(&sup, &kernel, &link, state.path());
        undo.push(Made::Rootfs(Rootfs {
            path: "/state/rootfs".into(),
            kind: RootfsKind::Overlay,
            unpacked_layers: 0,
        }));
        undo.push(Made::TokenFiles);
        assert_eq!(undo.abort("why"), "why");
        assert!(!token_file.exists(), "the token file outlived the abort");
        assert_eq!(kernel.calls(), vec![Call::Unmount("/state/rootfs".into())]);
    }

    #[test]
    fn restarting_daemons_needs_daemons_on_the_stack() {
        let state = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(Arc::new(FakeProcessOps::default()));
        let kernel = RecordingKernel::default();
        let link = plan();
        let mut undo = Teardown::new(&sup, &kernel, &link, state.path());
        let mut started = false;
        let r = undo.replace_daemons(|| {
            started = true;
            Err("unreachable".into())
        });
        assert!(r.is_err());
        assert!(!started, "no daemons were running, so none may be started");
        assert!(undo.daemons().is_none());
    }
}

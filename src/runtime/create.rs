//! `create` with a bound, and one recovery from sysbox's known hang.
//!
//! A sysbox-fs that accepts connections but never answers (its readiness is only `connect()`) shows
//! up as a `create` that never finishes. Restarting both daemons clears it; the retry needs a fresh
//! container id, because sysbox-mgr keeps per-id state that a second `create` of the same id trips on.

use std::time::{Duration, Instant};

use super::oci::RuntimeError;

/// A healthy `create` takes well under a second (0.2 s measured on a 2-core VM with sysbox, more on
/// a cold rootfs that sysbox must inspect); thirty is a hang.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`create_with_restart`] needs from start-up.
pub trait CreateSteps {
    type Created;
    /// Writes the bundle for `id` if needed and runs `create` until `deadline`.
    fn create(&mut self, id: &str, deadline: Instant) -> Result<Self::Created, RuntimeError>;
    /// Whether sysbox's daemons run (only then is a hang theirs to clear).
    fn has_daemons(&self) -> bool;
    /// Stops and starts sysbox-fs and sysbox-mgr.
    fn restart_daemons(&mut self) -> Result<(), String>;
    fn fresh_id(&mut self) -> String;
}

/// Runs `create` for `id` within `timeout`; on a timeout with sysbox's daemons running, restarts
/// them once and retries once with a fresh id, saying so through `say`. Returns the id that was
/// created. Any other failure, or a second timeout, is returned as it is.
pub fn create_with_restart<S: CreateSteps>(
    steps: &mut S,
    id: &str,
    timeout: Duration,
    say: &dyn Fn(&str),
) -> Result<(String, S::Created), RuntimeError> {
    match steps.create(id, Instant::now() + timeout) {
        Ok(c) => Ok((id.to_string(), c)),
        Err(RuntimeError::Timeout { command, secs }) if steps.has_daemons() => {
            say(&format!(
                "`{command}` did not finish within {secs} s: sysbox-fs or sysbox-mgr hangs (a known \
                 sysbox start-up hang). Restarting both and trying once more with a fresh container id"
            ));
            if let Err(e) = steps.restart_daemons() {
                return Err(RuntimeError::Failed {
                    command,
                    exit: crate::pid1::supervisor::Exit::Code(0),
                    stderr: format!(
                        "timed out after {secs} s, and restarting sysbox's daemons failed: {e}"
                    ),
                });
            }
            let id = steps.fresh_id();
            let c = steps.create(&id, Instant::now() + timeout)?;
            say("The workspace was created after restarting sysbox's daemons");
            Ok((id, c))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records every step; `create` answers from a script of outcomes.
    struct Fake {
        daemons: bool,
        outcomes: Vec<Result<(), RuntimeError>>,
        calls: Vec<String>,
        restart_fails: bool,
        ids: u32,
    }

    impl Fake {
        fn new(daemons: bool, outcomes: Vec<Result<(), RuntimeError>>) -> Self {
            Fake {
                daemons,
                outcomes,
                calls: Vec::new(),
                restart_fails: false,
                ids: 1,
            }
        }
    }

    fn timeout() -> RuntimeError {
        RuntimeError::Timeout {
            command: "sysbox-runc create ws-1".into(),
            secs: 30,
        }
    }

    impl CreateSteps for Fake {
        type Created = ();
        fn create(&mut self, id: &str, deadline: Instant) -> Result<(), RuntimeError> {
            // The bound is passed down, not made up inside.
            assert!(deadline > Instant::now());
            self.calls.push(format!("create {id}"));
            self.outcomes.remove(0)
        }
        fn has_daemons(&self) -> bool {
            self.daemons
        }
        fn restart_daemons(&mut self) -> Result<(), String> {
            self.calls.push("restart".into());
            if self.restart_fails {
                Err("sysbox-mgr exited (status 1)".into())
            } else {
                Ok(())
            }
        }
        fn fresh_id(&mut self) -> String {
            self.ids += 1;
            format!("ws-{}", self.ids)
        }
    }

    fn run(f: &mut Fake) -> (Result<String, String>, Vec<String>) {
        let said = RefCell::new(Vec::new());
        let r = create_with_restart(f, "ws-1", CREATE_TIMEOUT, &|m| {
            said.borrow_mut().push(m.to_string())
        });
        (
            r.map(|(id, _)| id).map_err(|e| e.to_string()),
            said.into_inner(),
        )
    }

    #[test]
    fn a_create_timeout_with_sysbox_restarts_the_daemons_once_and_retries_with_a_fresh_id() {
        let mut f = Fake::new(true, vec![Err(timeout()), Ok(())]);
        let (r, said) = run(&mut f);
        assert_eq!(r.unwrap(), "ws-2");
        assert_eq!(f.calls, ["create ws-1", "restart", "create ws-2"]);
        assert!(
            said[0].contains("Restarting both") && said[0].contains("30 s"),
            "{said:?}"
        );
    }

    #[test]
    fn a_second_timeout_is_the_error_after_exactly_one_restart() {
        let mut f = Fake::new(true, vec![Err(timeout()), Err(timeout())]);
        let (r, _) = run(&mut f);
        assert!(r.unwrap_err().contains("did not finish within 30 s"));
        assert_eq!(f.calls, ["create ws-1", "restart", "create ws-2"]);
    }

    #[test]
    fn without_daemons_or_for_other_failures_nothing_is_restarted() {
        let mut f = Fake::new(false, vec![Err(timeout())]);
        let (r, said) = run(&mut f);
        assert!(r.is_err() && said.is_empty());
        assert_eq!(f.calls, ["create ws-1"]);
        let failed = RuntimeError::Failed {
            command: "sysbox-runc create ws-1".into(),
            exit: crate::pid1::supervisor::Exit::Code(1),
            stderr: "bad config".into(),
        };
        let mut f = Fake::new(true, vec![Err(failed)]);
        let (r, _) = run(&mut f);
        assert!(r.unwrap_err().contains("bad config"));
        assert_eq!(f.calls, ["create ws-1"]);
    }

    #[test]
    fn a_failed_restart_says_both_what_timed_out_and_why_the_restart_failed() {
        let mut f = Fake::new(true, vec![Err(timeout())]);
        f.restart_fails = true;
        let (r, _) = run(&mut f);
        let e = r.unwrap_err();
        assert!(
            e.contains("timed out after 30 s") && e.contains("sysbox-mgr exited"),
            "{e}"
        );
        assert_eq!(f.calls, ["create ws-1", "restart"]);
    }
}

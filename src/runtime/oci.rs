//! The OCI runtime's command line (`create`, `state`, `start`, `exec`, `kill`, `delete`) for
//! sysbox-runc, runc and crun. Each call is a child of the supervisor, its output drained, its stderr
//! quoted in errors; secrets never go on a command line (processes are described in files).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{RuntimeChoice, RuntimeKind};
use crate::pid1::output::{drain, Tail};
use crate::pid1::supervisor::{Exit, Supervisor, Wake};

/// A start-up runtime call that takes longer is stuck (a hung FUSE mount, a wedged sysbox-mgr). Calls
/// made while stopping get the stop's own deadline instead.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// What a runtime call still gets once a stop is requested: enough for any healthy `create` (a
/// killed `create` leaves a container without state that `delete` cannot clean), short enough that a
/// hung one cannot hold SIGTERM past the pod's grace period.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a call killed at its deadline is waited for.
const KILLED_CALL_WAIT: Duration = Duration::from_millis(200);

/// Where a hybrid host mounts its cgroup v2 hierarchy next to the v1 controllers.
const UNIFIED_MOUNT: &str = "/sys/fs/cgroup/unified";

/// Whether the runtime must run with the hybrid layout's cgroup2 mount hidden. crun refuses hybrid
/// hosts whose v2 hierarchy has controllers ("cgroups in hybrid mode not supported, drop all
/// controllers from cgroupv2"); without that mount it sees a plain cgroup v1 host, which it supports,
/// limits included. The layout test is crun's own: `/sys/fs/cgroup` is not cgroup2 and
/// `/sys/fs/cgroup/unified` is.
pub fn hides_unified_cgroup(
    kind: RuntimeKind,
    root: Option<crate::sys::FsKind>,
    unified: Option<crate::sys::FsKind>,
) -> bool {
    use crate::sys::FsKind;
    kind == RuntimeKind::Crun && root != Some(FsKind::Cgroup2) && unified == Some(FsKind::Cgroup2)
}

/// [`hides_unified_cgroup`] for this host.
pub fn host_hides_unified_cgroup(kind: RuntimeKind) -> bool {
    use crate::sys::fs_kind;
    hides_unified_cgroup(
        kind,
        fs_kind(Path::new(crate::cgroup::CGROUP_ROOT)),
        fs_kind(Path::new(UNIFIED_MOUNT)),
    )
}

/// Makes `cmd` run in a private mount namespace without the hybrid layout's cgroup2 mount (the
/// `unshare -m` wrapper of test-environment.md §4, done in the forked child so that no external tool
/// is needed and the supervisor still spawns and reaps the runtime itself). envbox's own view is
/// untouched.
pub fn hide_unified_cgroup(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // (unshare, mount, umount2) on static C strings: no allocation, no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing of what follows may propagate back to the pod's mount namespace.
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the forked child write `score` (decimal text) to its own `oom_score_adj` before exec.
fn set_own_oom_score_adj(cmd: &mut Command, score: Vec<u8>) {
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // (open, write, close) on a static C string and a buffer allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, score.as_ptr().cast(), score.len());
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                return Err(err);
            }
            Ok(())
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({exit}): {stderr}")]
    Failed {
        command: String,
        exit: Exit,
        stderr: String,
    },
    #[error("`{command}` did not finish within {secs} s; it was killed")]
    Timeout { command: String, secs: u64 },
    #[error("`{command}` printed a state that is not JSON: {source}")]
    State {
        command: String,
        source: serde_json::Error,
    },
    #[error("stopped while `{command}` was running")]
    Interrupted { command: String },
}

pub struct OciRuntime {
    pub choice: RuntimeChoice,
    /// `--root`: where the runtime keeps container state.
    pub root: PathBuf,
    sup: Arc<Supervisor>,
    /// Run every call with the hybrid layout's cgroup2 mount hidden (crun on hybrid hosts).
    hide_unified: bool,
    /// The `oom_score_adj` every call starts with, as text for the forked child.
    oom_score_adj: Option<String>,
}

impl OciRuntime {
    pub fn new(choice: RuntimeChoice, root: PathBuf, sup: Arc<Supervisor>) -> Self {
        let hide_unified = host_hides_unified_cgroup(choice.kind);
        if hide_unified {
            log::info!(
                "{} runs with {UNIFIED_MOUNT} hidden: it refuses hybrid cgroup hosts and uses the v1 controllers without it",
                choice.binary.display()
            );
        }
        OciRuntime {
            choice,
            root,
            sup,
            hide_unified,
            oom_score_adj: None,
        }
    }

    /// Every runtime process, and so what `exec` starts inside (the bootstrap, the agent,
    /// `envbox exec`), takes the workspace's place in the OOM order instead of inheriting envbox's
    /// more protected one. Raising a score needs no privilege.
    pub fn with_oom_score_adj(mut self, score: i32) -> Self {
        self.oom_score_adj = Some(score.to_string());
        self
    }

    /// sysbox-runc keeps its state where sysbox-mgr expects it; the others under our state dir.
    pub fn default_root(kind: RuntimeKind, state_dir: &Path) -> PathBuf {
        match kind {
            RuntimeKind::SysboxRunc => PathBuf::from("/run/sysbox-runc"),
            _ => state_dir.join("runtime"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.choice.binary);
        c.arg("--root").arg(&self.root);
        c.args(args);
        if self.hide_unified {
            hide_unified_cgroup(&mut c);
        }
        if let Some(score) = &self.oom_score_adj {
            set_own_oom_score_adj(&mut c, score.clone().into_bytes());
        }
        log::debug!("running {}", self.describe(args));
        c
    }

    fn describe(&self, args: &[&str]) -> String {
        format!("{} {}", self.choice.binary.display(), args.join(" "))
    }

    fn call(&self, args: &[&str], stdin: Stdio, deadline: Instant) -> Result<String, RuntimeError> {
        self.call_keeping_output(args, stdin, deadline)
            .map(|(out, _)| out)
    }

    /// Runs one call to completion: output drained, bounded in time, stderr quoted on failure. The
    /// returned tail keeps receiving lines after the call: after `create`, the container's init holds
    /// the pipes, and its last words explain an unexpected exit.
    fn call_keeping_output(
        &self,
        args: &[&str],
        stdin: Stdio,
        deadline: Instant,
    ) -> Result<(String, Tail), RuntimeError> {
        let command = self.describe(args);
        let started = Instant::now();
        let mut cmd = self.command(args);
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            self.sup
                .spawn(args[0], &mut cmd)
                .map_err(|source| RuntimeError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        let pid = child.id() as i32;
        let (both, err_tail) = (Tail::default(), Tail::default());
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let o = stdout.clone();
        let h_out = child.stdout.take().map(|r| {
            let b = both.clone();
            drain("runtime-out", r, Tail::default(), move |l| {
                b.push(l);
                let mut s = o.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(l);
                s.push('\n');
            })
        });
        let verb = args[0].to_string();
        let h_err = child.stderr.take().map(|r| {
            let b = both.clone();
            drain("runtime-err", r, err_tail.clone(), move |l| {
                b.push(l);
                log::debug!("runtime {verb}: {l}")
            })
        });
        let exit = match self.wait_call(pid, deadline) {
            Ok(e) => e,
            Err(stopped) => {
                let _ = self.sup.signal(pid, libc::SIGKILL);
                // A SIGKILLed process is gone at once unless it sleeps uninterruptibly in the kernel
                // (a wedged FUSE file system); the supervisor reaps it whenever it goes, so the wait
                // is short and never stretches a deadline that has passed.
                let _ = self
                    .sup
                    .wait_exit(pid, Some(Instant::now() + KILLED_CALL_WAIT));
                return Err(if stopped {
                    RuntimeError::Interrupted { command }
                } else {
                    RuntimeError::Timeout {
                        command,
                        secs: started.elapsed().as_secs(),
                    }
                });
            }
        };
        // `create` leaves the container's init holding the pipes: never wait for their EOF there.
        if args[0] != "create" {
            h_out.map(|h| h.join());
            h_err.map(|h| h.join());
        }
        if !exit.success() {
            return Err(RuntimeError::Failed {
                command,
                exit,
                stderr: err_tail.text(),
            });
        }
        let s = stdout.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok((s, both))
    }

    /// Waits for a runtime call until `deadline`; a stop request that arrives meanwhile leaves it
    /// `STOP_GRACE` to finish, so a hung call cannot hold SIGTERM past the pod's grace period.
    /// `Err(true)`: cut short by a stop request; `Err(false)`: hung past its deadline.
    fn wait_call(&self, pid: i32, deadline: Instant) -> Result<Exit, bool> {
        let mut deadline = deadline;
        let mut seen = self.sup.stop_requests();
        let mut stopped = false;
        loop {
            match self.sup.wait_event(&[pid], seen, Some(deadline)) {
                Wake::Exited(..) => return self.sup.try_exit(pid).ok_or(stopped),
                Wake::Stop(n) => {
                    seen = n;
                    stopped = true;
                    deadline = deadline.min(Instant::now() + STOP_GRACE);
                }
                Wake::Timeout => return Err(stopped),
            }
        }
    }

    /// Returns the tail of the container init's output, which keeps filling while it runs.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        deadline: Instant,
    ) -> Result<Tail, RuntimeError> {
        let (b, p) = (bundle.display().to_string(), pid_file.display().to_string());
        self.call_keeping_output(
            &["create", "--bundle", &b, "--pid-file", &p, id],
            Stdio::null(),
            deadline,
        )
        .map(|(_, tail)| tail)
    }

    pub fn state(
        &self,
        id: &str,
        deadline: Instant,
    ) -> Result<oci_spec::runtime::State, RuntimeError> {
        let out = self.call(&["state", id], Stdio::null(), deadline)?;
        serde_json::from_str(&out).map_err(|source| RuntimeError::State {
            command: self.describe(&["state", id]),
            source,
        })
    }

    pub fn start(&self, id: &str, deadline: Instant) -> Result<(), RuntimeError> {
        self.call(&["start", id], Stdio::null(), deadline)
            .map(|_| ())
    }

    /// Signals by number: sysbox-runc rejects names of real-time signals such as SIGRTMIN+3.
    pub fn kill(&self, id: &str, signal: i32, deadline: Instant) -> Result<(), RuntimeError> {
        let s = signal.to_string();
        self.call(&["kill", id, &s], Stdio::null(), deadline)
            .map(|_| ())
    }

    pub fn delete(&self, id: &str, force: bool, deadline: Instant) -> Result<(), RuntimeError> {
        if force {
            self.call(&["delete", "--force", id], Stdio::null(), deadline)
        } else {
            self.call(&["delete", id], Stdio::null(), deadline)
        }
        .map(|_| ())
    }

    /// Starts `exec --process <file>` and returns the running client: it lives as long as the process
    /// inside, so the caller drains its output and waits through the supervisor.
    pub fn spawn_exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: Option<&Path>,
        tty: bool,
        stdio: ExecStdio,
    ) -> Result<Child, RuntimeError> {
        let proc_arg = process_json.display().to_string();
        let pid_arg = pid_file.map(|p| p.display().to_string());
        let mut args = vec!["exec", "--process", &proc_arg];
        if let Some(p) = &pid_arg {
            args.extend(["--pid-file", p]);
        }
        if tty {
            args.push("--tty");
        }
        args.push(id);
        let command = self.describe(&args);
        let mut cmd = self.command(&args);
        match stdio {
            ExecStdio::Piped => {
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
            ExecStdio::Inherit => {}
        }
        self.sup
            .spawn("exec", &mut cmd)
            .map_err(|source| RuntimeError::Spawn { command, source })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecStdio {
    Piped,
    Inherit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::FsKind;

    #[test]
    fn only_crun_on_a_hybrid_layout_hides_the_unified_mount() {
        let (tmpfs, v2) = (Some(FsKind::Tmpfs), Some(FsKind::Cgroup2));
        assert!(hides_unified_cgroup(RuntimeKind::Crun, tmpfs, v2));
        // Pure cgroup v2, pure v1 (no unified mount), and the other runtimes: nothing to hide.
        assert!(!hides_unified_cgroup(RuntimeKind::Crun, v2, None));
        assert!(!hides_unified_cgroup(RuntimeKind::Crun, tmpfs, None));
        assert!(!hides_unified_cgroup(
            RuntimeKind::Crun,
            tmpfs,
            Some(FsKind::Other)
        ));
        assert!(!hides_unified_cgroup(RuntimeKind::Runc, tmpfs, v2));
        assert!(!hides_unified_cgroup(RuntimeKind::SysboxRunc, tmpfs, v2));
    }
}

//! The running workspace: created and started through the OCI runtime, its init adopted by the
//! supervisor, the bootstrap run as the user, and the ordered stop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use oci_spec::runtime::{LinuxCapabilitiesBuilder, Process, ProcessBuilder, UserBuilder};
use serde::{Deserialize, Serialize};

use crate::buildlog::BuildLog;
use crate::bundle::spec::capabilities;
use crate::bundle::{env, write_private_json, Bundle};
use crate::image::facts::UserInfo;
use crate::pid1::output::{drain, Tail};
use crate::pid1::supervisor::{Exit, Supervisor};
use crate::runtime::oci::{ExecStdio, OciRuntime, RuntimeError};

pub const STATE_FILE: &str = "workspace.json";
/// What the `delete` after a failed or interrupted `create` gets: a healthy one takes well under a
/// second, and start-up has no shutdown deadline of its own to pass down.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What `envbox exec` (and the tests) need to find the running workspace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub id: String,
    /// The workspace init's pid in the pod's pid namespace.
    pub pid: i32,
    pub runtime: String,
    pub runtime_root: PathBuf,
    pub bundle: PathBuf,
    pub user: RecordedUser,
}

/// The workspace user as `envbox exec` needs it later.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    pub additional_gids: Vec<u32>,
}

impl From<&UserInfo> for RecordedUser {
    fn from(u: &UserInfo) -> Self {
        RecordedUser {
            name: u.name.clone(),
            uid: u.uid,
            gid: u.gid,
            home: u.home.clone(),
            shell: u.shell.clone(),
            additional_gids: u.additional_gids.clone(),
        }
    }
}

impl From<RecordedUser> for UserInfo {
    fn from(u: RecordedUser) -> Self {
        UserInfo {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
            home: u.home,
            shell: u.shell,
            group: None,
            additional_gids: u.additional_gids,
        }
    }
}

impl WorkspaceRecord {
    pub fn load(state_dir: &Path) -> std::io::Result<Self> {
        let p = state_dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (is envbox running with this CODER_STATE_DIR?)",
                    p.display()
                ),
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", p.display())))
    }
}

/// A fresh id per start: sysbox-mgr keeps per-id state after `delete`, and re-using an id breaks a
/// later `create`.
pub fn fresh_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("envbox-ws-{ms}")
}

pub struct Workspace {
    pub id: String,
    pub pid: i32,
    pub init_output: Tail,
    pub stop_signal: i32,
    runtime: OciRuntime,
    sup: Arc<Supervisor>,
    state_dir: PathBuf,
}

pub struct Bootstrap {
    /// The runtime's `exec` client, our child for as long as the script runs.
    pub client_pid: i32,
    /// The script's own pid in the pod's pid namespace, for the stop signal.
    pub inner_pid: Option<i32>,
}

impl Workspace {
    pub fn create(
        runtime: OciRuntime,
        sup: Arc<Supervisor>,
        id: &str,
        bundle: &Bundle,
        state_dir: &Path,
        user: &UserInfo,
        deadline: Instant,
    ) -> Result<Workspace, RuntimeError> {
        let pid_file = state_dir.join("workspace.pid");
        let _ = std::fs::remove_file(&pid_file);
        let init_output = match runtime.create(id, &bundle.dir, &pid_file, deadline) {
            Ok(t) => t,
            Err(e) => {
                // A create that failed or was cut short may have left the container half made.
                let _ = runtime.delete(id, true, Instant::now() + CLEANUP_TIMEOUT);
                return Err(e);
            }
        };
        let pid = read_pid(&pid_file).ok_or_else(|| RuntimeError::Failed {
            command: format!("{} create {id}", runtime.choice.binary.display()),
            exit: Exit::Code(0),
            stderr: format!("no pid in {}", pid_file.display()),
        })?;
        // The init was our grandchild; with its parent gone it is ours now.
        sup.adopt("workspace init", pid);
        let record = WorkspaceRecord {
            id: id.to_string(),
            pid,
            runtime: runtime.choice.binary.display().to_string(),
            runtime_root: runtime.root.clone(),
            bundle: bundle.dir.clone(),
            user: user.into(),
        };
        let p = state_dir.join(STATE_FILE);
        if let Err(e) = write_private_json(&p, &record) {
            log::warn!(
                "cannot record the workspace in {}: {e}; `envbox exec` will not find it",
                p.display()
            );
        }
        Ok(Workspace {
            id: id.to_string(),
            pid,
            init_output,
            stop_signal: bundle.stop_signal,
            runtime,
            sup,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// The runtime's `--root`, where it keeps the container's state.
    pub fn runtime_root(&self) -> &Path {
        &self.runtime.root
    }

    pub fn start(&self, deadline: Instant) -> Result<(), RuntimeError> {
        self.runtime.start(&self.id, deadline)
    }

    /// Feeds the script to `/bin/sh -s` as the user, with HOME and BINARY_DIR set, and drains its
    /// output line by line into the build log for as long as it runs.
    pub fn spawn_bootstrap(
        &self,
        user: &UserInfo,
        ws_env: &[String],
        script: &str,
        log: Arc<BuildLog>,
    ) -> Result<Bootstrap, RuntimeError> {
        let binary_dir = format!("{}/.coder", user.home.trim_end_matches('/'));
        let mut env = ws_env.to_vec();
        env::set(&mut env, "HOME", &user.home);
        env::set(&mut env, "USER", &user.name);
        env::set(&mut env, "BINARY_DIR", &binary_dir);
        // The directory is made as the user, before the script, like the Go envbox did.
        let args = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "mkdir -p \"$BINARY_DIR\"; exec /bin/sh -s".into(),
        ];
        let process =
            process_spec(user, env, args, &user.home, false).map_err(|e| RuntimeError::Failed {
                command: "bootstrap process".into(),
                exit: Exit::Code(0),
                stderr: e.to_string(),
            })?;
        let proc_file = self.state_dir.join("bootstrap-process.json");
        let pid_file = self.state_dir.join("bootstrap.pid");
        let _ = std::fs::remove_file(&pid_file);
        write_private_json(&proc_file, &process).map_err(|e| RuntimeError::Spawn {
            command: format!("writing {}", proc_file.display()),
            source: e,
        })?;
        let mut child: Child = self.runtime.spawn_exec(
            &self.id,
            &proc_file,
            Some(&pid_file),
            false,
            ExecStdio::Piped,
        )?;
        let client_pid = child.id() as i32;
        if let Some(mut stdin) = child.stdin.take() {
            let script = script.to_string();
            // A writer thread, so a script larger than the pipe buffer cannot block start-up.
            std::thread::spawn(move || {
                let _ = stdin.write_all(script.as_bytes());
            });
        }
        for (name, pipe) in [
            (
                "bootstrap-out",
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
            (
                "bootstrap-err",
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
        ] {
            if let Some(p) = pipe {
                let log = Arc::clone(&log);
                drain(name, p, Tail::default(), move |l| log.info(l));
            }
        }
        // The pid file appears once the process runs inside; it is only needed at stop time.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut inner_pid = None;
        while Instant::now() < deadline {
            inner_pid = read_pid(&pid_file);
            if inner_pid.is_some() || self.sup.has_exited(client_pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Bootstrap {
            client_pid,
            inner_pid,
        })
    }

    /// The ordered stop: the agent first (its shutdown scripts), then the workspace's PID 1 with its
    /// stop signal, SIGKILL at the deadline, then `delete`. `hurry` (a second SIGTERM) cuts every wait
    /// short: whatever still runs is killed at once. Returns whether everything stopped without force.
    pub fn stop(
        &self,
        bootstrap: Option<&Bootstrap>,
        deadline: Instant,
        hurry: impl Fn() -> bool,
    ) -> bool {
        let mut clean = true;
        let total = deadline.saturating_duration_since(Instant::now());
        // The agent may use up to half of the budget; the workspace gets the rest.
        if let Some(b) = bootstrap.filter(|_| !hurry()) {
            if !self.sup.has_exited(b.client_pid) {
                log::info!(
                    "stopping the bootstrap (SIGTERM, up to {:.1} s)",
                    (total / 2).as_secs_f64()
                );
                // One TERM to the script itself; the runtime's exec client would forward its own, and
                // a script that traps TERM would see two.
                match b.inner_pid {
                    Some(p) => signal_pid(p, libc::SIGTERM),
                    None => {
                        let _ = self.sup.signal(b.client_pid, libc::SIGTERM);
                    }
                }
            }
            if !self.wait_or_hurry(b.client_pid, Instant::now() + total / 2, &hurry) {
                if hurry() {
                    log::warn!("stopping fast: the bootstrap is killed with the workspace");
                } else {
                    log::warn!("the bootstrap did not stop within {:?}", total / 2);
                }
                clean = false;
            }
        }
        let mut exited = self.sup.try_exit(self.pid).is_some();
        if !exited && !hurry() {
            log::info!(
                "stopping the workspace (signal {}, up to {:.1} s)",
                self.stop_signal,
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64()
            );
            // Keep a second for the kill and delete after the deadline's SIGKILL.
            let wait_until = deadline
                .checked_sub(Duration::from_secs(1))
                .unwrap_or(deadline);
            // Delivering a signal is instant for a healthy runtime; a hung one (a wedged sysbox-fs)
            // may not eat the workspace's own time to stop, so it gets a quarter of what is left,
            // and then the signal goes to the init directly (it is our child).
            let kill_by = Instant::now() + wait_until.saturating_duration_since(Instant::now()) / 4;
            if let Err(e) = self.runtime.kill(&self.id, self.stop_signal, kill_by) {
                log::warn!("sending the stop signal to the workspace through the runtime: {e}; sending it directly");
                let _ = self.sup.signal(self.pid, self.stop_signal);
            }
            exited = self.wait_or_hurry(self.pid, wait_until, &hurry);
            if !exited {
                if hurry() {
                    log::warn!("stopping fast: killing the workspace");
                } else {
                    log::warn!("the workspace did not stop in time; killing it");
                }
                clean = false;
            }
        }
        if !exited {
            // Directly, not through the runtime, which may be what hangs: the init's death takes
            // every process of the workspace's pid namespace with it.
            let _ = self.sup.signal(self.pid, libc::SIGKILL);
            let _ = self.sup.wait_exit(
                self.pid,
                Some(deadline.max(Instant::now() + Duration::from_millis(200))),
            );
        }
        if let Err(e) = self.runtime.delete(
            &self.id,
            true,
            deadline.max(Instant::now() + Duration::from_millis(200)),
        ) {
            log::warn!("deleting the workspace container: {e}");
            clean = false;
        }
        let _ = std::fs::remove_file(self.state_dir.join(STATE_FILE));
        clean
    }

    /// Waits for `pid` to exit until `until`, giving up early when `hurry` turns true. True when
    /// it exited (its status is taken).
    fn wait_or_hurry(&self, pid: i32, until: Instant, hurry: &impl Fn() -> bool) -> bool {
        loop {
            if hurry() {
                return self.sup.try_exit(pid).is_some();
            }
            let step = (Instant::now() + Duration::from_millis(100)).min(until);
            if self.sup.wait_exit(pid, Some(step)).is_some() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
        }
    }
}

fn signal_pid(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n: &i32| n > 0)
}

/// A process description for `exec --process`: the workspace's environment, the user's ids, the full
/// capability bounding set (so setuid `sudo` works) but no effective capabilities for a non-root user.
pub fn process_spec(
    user: &UserInfo,
    env: Vec<String>,
    args: Vec<String>,
    cwd: &str,
    terminal: bool,
) -> Result<Process, crate::bundle::spec::SpecError> {
    let caps = capabilities()?;
    // Explicitly empty sets for other users: left out, runtimes fill in their defaults (CAP_KILL,
    // CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE) where `docker exec` as a user gives none.
    let none = std::collections::HashSet::new();
    let c = if user.uid == 0 {
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
    } else {
        LinuxCapabilitiesBuilder::default()
            .bounding(caps)
            .effective(none.clone())
            .permitted(none.clone())
            .inheritable(none.clone())
            .ambient(none)
    };
    Ok(ProcessBuilder::default()
        .terminal(terminal)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids.clone())
                .build()?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .no_new_privileges(false)
        .capabilities(c.build()?)
        .build()?)
}

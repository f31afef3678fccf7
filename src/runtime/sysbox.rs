//! sysbox-mgr and sysbox-fs, started and supervised by envbox without systemd (sysbox.md §4–§5, §10).
//!
//! Each daemon runs in its own process group with the limits and OOM score of its systemd unit. It is
//! ready when its socket accepts a `connect()` (both send READY=1 before `listen()`, and stale socket
//! files outlive them, so neither the notification nor the file proves anything). A daemon that is not
//! ready by its deadline is killed with its whole group and started again a bounded number of times:
//! sysbox-fs deadlocks at start-up now and then in a forked copy of itself.

use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pid1::output::{drain, Tail};
use crate::pid1::supervisor::{Exit, Supervisor};

pub const MGR_SOCKET: &str = "/run/sysbox/sysmgr.sock";
pub const FS_SOCKET: &str = "/run/sysbox/sysfs.sock";
pub const DATA_ROOT: &str = "/var/lib/sysbox";
/// sysbox-mgr adds this range for itself unless exactly one `sysbox:` line exists; it is disjoint
/// from the workspace's explicit 100000 mapping.
pub const SUBID_LINE: &str = "sysbox:165536:65536";
/// As in sysbox's systemd units.
pub const DAEMON_OOM_SCORE: i32 = -500;
const READY_POLL: Duration = Duration::from_millis(50);
pub const MAX_STARTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SysboxError {
    #[error("{path} is on {fs}; sysbox-mgr refuses it. Mount an emptyDir on node disk (not medium: Memory) or a hostPath at {path}")]
    DataRootFs { path: String, fs: &'static str },
    #[error("{path} has no `{SUBID_LINE}` line and cannot be written ({source}); sysbox-mgr needs it. Use the envbox image's /etc or a writable /etc")]
    SubIds { path: String, source: io::Error },
    #[error("cannot start {name} ({binary}): {source}")]
    Spawn {
        name: &'static str,
        binary: String,
        source: io::Error,
    },
    #[error("{name} exited during start-up ({exit}). {diagnosis}\nIts last output:\n{tail}")]
    EarlyExit {
        name: &'static str,
        exit: Exit,
        diagnosis: String,
        tail: String,
    },
    #[error("{name} was not ready after {attempts} starts of {secs} s each (its socket {socket} never accepted a connection). Its last output:\n{tail}")]
    NotReady {
        name: &'static str,
        attempts: u32,
        secs: u64,
        socket: String,
        tail: String,
    },
    #[error("stopped while starting {0}")]
    Interrupted(&'static str),
}

#[derive(Debug, Clone)]
pub struct SysboxOptions {
    pub bin_dir: Option<PathBuf>,
    pub disable_idmapped_mount: bool,
    /// The daemons' `oom_score_adj` (see `pod::OomOrder`); None keeps what they inherit from envbox.
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub name: &'static str,
    pub args: Vec<String>,
    pub socket: PathBuf,
    /// A start that is not ready by then is killed and retried.
    pub ready_within: Duration,
}

fn daemon_specs(opts: &SysboxOptions) -> [DaemonSpec; 2] {
    let mut mgr_args = vec!["--log-format".to_string(), "json".into()];
    if opts.disable_idmapped_mount {
        mgr_args.push("--disable-idmapped-mount".into());
    }
    // Without inner-image preload a container stops in a fraction of the time.
    mgr_args.push("--disable-inner-image-preload".into());
    [
        DaemonSpec {
            name: "sysbox-mgr",
            args: mgr_args,
            socket: MGR_SOCKET.into(),
            // systemd's TimeoutStartSec for the unit.
            ready_within: Duration::from_secs(45),
        },
        DaemonSpec {
            name: "sysbox-fs",
            args: vec!["--log-format".into(), "json".into()],
            socket: FS_SOCKET.into(),
            ready_within: Duration::from_secs(10),
        },
    ]
}

pub struct Daemon {
    pub name: &'static str,
    pub pid: i32,
    pub tail: Tail,
}

pub struct SysboxDaemons {
    pub mgr: Daemon,
    pub fs: Daemon,
}

/// Checks that need no daemon: the data root's file system and the subordinate id ranges.
pub fn preflight() -> Result<(), SysboxError> {
    check_data_root(Path::new(DATA_ROOT))?;
    for p in ["/etc/subuid", "/etc/subgid"] {
        ensure_subid_line(Path::new(p))?;
    }
    Ok(())
}

fn check_data_root(p: &Path) -> Result<(), SysboxError> {
    std::fs::create_dir_all(p).ok();
    let fs = match crate::sys::fs_kind(p) {
        Some(k @ (crate::sys::FsKind::Overlay | crate::sys::FsKind::Tmpfs)) => k.name(),
        _ => return Ok(()),
    };
    Err(SysboxError::DataRootFs {
        path: p.display().to_string(),
        fs,
    })
}

/// sysbox-mgr rewrites these files unless they hold exactly one `sysbox:` line.
pub fn subid_needs_line(content: &str) -> bool {
    content.lines().filter(|l| l.starts_with("sysbox:")).count() != 1
}

fn ensure_subid_line(p: &Path) -> Result<(), SysboxError> {
    let content = std::fs::read_to_string(p).unwrap_or_default();
    if !subid_needs_line(&content) {
        return Ok(());
    }
    let mut kept: Vec<&str> = content
        .lines()
        .filter(|l| !l.starts_with("sysbox:"))
        .collect();
    kept.push(SUBID_LINE);
    let new = kept.join("\n") + "\n";
    std::fs::write(p, new).map_err(|source| SysboxError::SubIds {
        path: p.display().to_string(),
        source,
    })
}

/// Words an administrator can act on, from the daemon's last output and the node's facts. sysbox's
/// own message blames the seccomp API level whatever the cause (sysbox#891).
pub fn diagnose(tail: &str, kernel_release: &str) -> String {
    let hints = known_causes(tail, kernel_release);
    if hints.is_empty() {
        format!(
            "Kernel {kernel_release}. See its output below and sysbox's distro compatibility list."
        )
    } else {
        hints.join(" ")
    }
}

/// The causes of a sysbox failure that its output or the kernel release point at, each with what to
/// do; empty when none is recognised.
pub fn known_causes(tail: &str, kernel_release: &str) -> Vec<String> {
    let t = tail.to_ascii_lowercase();
    let mut hints = Vec::new();
    if let Some((maj, min)) = kernel_version(kernel_release) {
        if (maj, min) < (5, 12) {
            hints.push(format!(
                "The node runs kernel {kernel_release}; sysbox needs 5.12 or newer for ID-mapped mounts, or shiftfs (Ubuntu)."
            ));
        }
    }
    if t.contains("overlay") && (t.contains("data-root") || t.contains("/var/lib/sysbox")) {
        hints.push(format!(
            "{DATA_ROOT} must not be on overlayfs: mount an emptyDir or hostPath there."
        ));
    }
    let fusermount = t.contains("fusermount3") && t.contains("permission denied");
    if fusermount {
        hints.push(
            "sysbox-fs cannot make its FUSE mounts: the node's AppArmor profile for fusermount3 (Ubuntu 25.04 \
             and later) denies them (sysbox#947, #1005). On the node, run `aa-complain fusermount3`, or allow \
             mounts under /var/lib/sysboxfs in /etc/apparmor.d/local/fusermount3 and reload AppArmor."
                .into(),
        );
    } else if t.contains("operation not permitted") || t.contains("permission denied") {
        hints.push(
            "sysbox lacks privileges: the pod must run with `privileged: true` as root.".into(),
        );
    }
    if t.contains("not supported") && t.contains("xfs") {
        hints.push("The volume's file system (XFS) does not support ID-mapped mounts: set CODER_DISABLE_IDMAPPED_MOUNT=true.".into());
    }
    if t.contains("seccomp") {
        hints.push("The kernel's seccomp notification support is missing or too old (sysbox needs seccomp API level 5, kernel 5.5+).".into());
    }
    hints
}

/// What sysbox-mgr said at start about the kernel's ID-mapped mount and shiftfs support (its
/// `--log-format json` lines, or plain ones), for the build log: which of them sysbox will use
/// decides whether the workspace's volumes are shifted.
pub fn mgr_capabilities(mgr_output: &str) -> Vec<String> {
    mgr_output
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or_else(|| l.to_string())
        })
        .filter(|m| {
            let m = m.to_ascii_lowercase();
            (m.contains("id-mapped mount") || m.contains("shiftfs")) && !m.contains("error")
        })
        .collect()
}

/// Whether sysbox will ID-map a root-owned bind source: sysbox-mgr found the kernel able to, and
/// CODER_DISABLE_IDMAPPED_MOUNT does not turn it off.
pub fn idmaps_binds(mgr_output: &str, disabled: bool) -> bool {
    !disabled
        && mgr_capabilities(mgr_output)
            .iter()
            .any(|l| l.eq_ignore_ascii_case("ID-mapped mounts supported by kernel: yes"))
}

/// `sysbox-runc --version`'s first line, or why there is none.
pub fn version(sup: &Supervisor, sysbox_runc: &Path) -> String {
    let mut cmd = Command::new(sysbox_runc);
    cmd.arg("--version");
    match sup.output("sysbox-runc", &mut cmd, b"", Duration::from_secs(5)) {
        Ok(o) if o.exit.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Ok(o) => format!("unknown (`--version` failed: {})", o.exit),
        Err(e) => format!("unknown ({e})"),
    }
}

/// The node's kernel release.
pub fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn binary(opts: &SysboxOptions, name: &str) -> PathBuf {
    match &opts.bin_dir {
        Some(d) => d.join(name),
        None => crate::config::find_on_path(name).unwrap_or_else(|| PathBuf::from(name)),
    }
}

/// Starts sysbox-mgr, waits until it accepts connections, then sysbox-fs likewise. `stopped` is
/// polled so a SIGTERM during start-up ends the wait promptly.
pub fn start(
    sup: &Arc<Supervisor>,
    opts: &SysboxOptions,
    say: &dyn Fn(&str),
    stopped: &dyn Fn() -> bool,
) -> Result<SysboxDaemons, SysboxError> {
    let [mgr_spec, fs_spec] = daemon_specs(opts);
    let mgr = start_daemon(sup, opts, &mgr_spec, say, stopped)?;
    match start_daemon(sup, opts, &fs_spec, say, stopped) {
        Ok(fs) => Ok(SysboxDaemons { mgr, fs }),
        Err(e) => {
            stop_daemon(sup, &mgr, Instant::now() + Duration::from_secs(5));
            Err(e)
        }
    }
}

/// Starts one daemon and waits for its socket, restarting a hung start up to `MAX_STARTS` times.
pub fn start_daemon(
    sup: &Arc<Supervisor>,
    opts: &SysboxOptions,
    spec: &DaemonSpec,
    say: &dyn Fn(&str),
    stopped: &dyn Fn() -> bool,
) -> Result<Daemon, SysboxError> {
    let bin = binary(opts, spec.name);
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    for attempt in 1..=MAX_STARTS {
        let tail = Tail::default();
        let mut cmd = Command::new(&bin);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a hung start can be killed with every process it forked.
            .process_group(0);
        let mut child = sup
            .spawn(spec.name, &mut cmd)
            .map_err(|source| SysboxError::Spawn {
                name: spec.name,
                binary: bin.display().to_string(),
                source,
            })?;
        let pid = child.id() as i32;
        let mut drains = Vec::new();
        for (i, pipe) in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(p) = pipe {
                let name = spec.name;
                drains.push(drain(
                    &format!("{name}-{i}"),
                    p,
                    tail.clone(),
                    move |l| log::info!(target: "sysbox", "{name}: {l}"),
                ));
            }
        }
        apply_unit_limits(pid, spec.name, opts.oom_score_adj);
        let deadline = Instant::now() + spec.ready_within;
        loop {
            if UnixStream::connect(&spec.socket).is_ok() {
                log::info!("{} is ready (pid {pid}, start {attempt})", spec.name);
                return Ok(Daemon {
                    name: spec.name,
                    pid,
                    tail,
                });
            }
            if let Some(exit) = sup.try_exit(pid) {
                // Its last words are what explains the exit: let the readers reach EOF first.
                let until = Instant::now() + Duration::from_millis(500);
                while drains.iter().any(|h| !h.is_finished()) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Err(SysboxError::EarlyExit {
                    name: spec.name,
                    exit,
                    diagnosis: diagnose(&tail.text(), &release),
                    tail: tail.text(),
                });
            }
            if stopped() {
                kill_group(pid);
                let _ = sup.wait_exit(pid, Some(Instant::now() + Duration::from_secs(2)));
                return Err(SysboxError::Interrupted(spec.name));
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(READY_POLL);
        }
        kill_group(pid);
        let _ = sup.wait_exit(pid, Some(Instant::now() + Duration::from_secs(2)));
        if attempt < MAX_STARTS {
            say(&format!(
                "{} did not become ready within {} s (a known start-up hang); restarting it ({}/{})",
                spec.name,
                spec.ready_within.as_secs(),
                attempt + 1,
                MAX_STARTS
            ));
        } else {
            return Err(SysboxError::NotReady {
                name: spec.name,
                attempts: MAX_STARTS,
                secs: spec.ready_within.as_secs(),
                socket: spec.socket.display().to_string(),
                tail: tail.text(),
            });
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// LimitNOFILE=infinity and LimitNPROC=infinity from the systemd units, and the daemons' place in the
/// OOM order (their unit's OOMScoreAdjust=-500 unless the pod is already lower); each is best effort
/// (a pod without CAP_SYS_RESOURCE in its bounding set keeps its own hard limits).
fn apply_unit_limits(pid: i32, name: &str, oom_score_adj: Option<i32>) {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let Some(p) = Pid::from_raw(pid) else { return };
    for res in [Resource::Nofile, Resource::Nproc] {
        let unlimited = Rlimit {
            current: None,
            maximum: None,
        };
        if prlimit(Some(p), res, unlimited).is_err() {
            let cur = rustix::process::getrlimit(res);
            let _ = prlimit(
                Some(p),
                res,
                Rlimit {
                    current: cur.maximum,
                    maximum: cur.maximum,
                },
            );
        }
    }
    let Some(score) = oom_score_adj else { return };
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), score.to_string()) {
        log::warn!("cannot set {name}'s oom_score_adj to {score}: {e}");
    }
}

fn kill_group(pid: i32) {
    // SAFETY: kill(2) on a process group id has no memory-safety preconditions.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// SIGTERM (sysbox stops gracefully on it), then the whole group is killed at the deadline.
fn stop_daemon(sup: &Supervisor, d: &Daemon, deadline: Instant) {
    let _ = sup.signal(d.pid, libc::SIGTERM);
    if sup.wait_exit(d.pid, Some(deadline)).is_none() {
        log::warn!("{} did not stop in time; killing it", d.name);
        kill_group(d.pid);
        // Only a moment: one stuck in the kernel (a FUSE request) may not hold the stop past its
        // deadline; the supervisor reaps it whenever it goes.
        let _ = sup.wait_exit(d.pid, Some(Instant::now() + Duration::from_millis(200)));
    }
}

impl SysboxDaemons {
    pub fn pids(&self) -> [i32; 2] {
        [self.mgr.pid, self.fs.pid]
    }

    pub fn name_of(&self, pid: i32) -> Option<&Daemon> {
        [&self.mgr, &self.fs].into_iter().find(|d| d.pid == pid)
    }

    /// sysbox-fs first, then sysbox-mgr, only after every container is deleted; both within the
    /// one deadline (sysbox-fs gets half of what is left, so a wedged one leaves sysbox-mgr its turn).
    pub fn stop(&self, sup: &Supervisor, deadline: Instant) {
        let now = Instant::now();
        stop_daemon(
            sup,
            &self.fs,
            now + deadline.saturating_duration_since(now) / 2,
        );
        stop_daemon(sup, &self.mgr, deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mgr_flags_follow_the_config() {
        let [mgr, fs] = daemon_specs(&SysboxOptions {
            bin_dir: None,
            disable_idmapped_mount: true,
            oom_score_adj: None,
        });
        assert!(mgr.args.contains(&"--disable-idmapped-mount".to_string()));
        assert!(mgr
            .args
            .contains(&"--disable-inner-image-preload".to_string()));
        assert!(!fs.args.contains(&"--disable-idmapped-mount".to_string()));
        let [mgr, _] = daemon_specs(&SysboxOptions {
            bin_dir: None,
            disable_idmapped_mount: false,
            oom_score_adj: None,
        });
        assert!(!mgr.args.contains(&"--disable-idmapped-mount".to_string()));
    }

    #[test]
    fn mgr_capability_lines_are_picked_from_json_and_plain_output() {
        let out = r#"{"level":"info","msg":"Sysbox data root: /var/lib/sysbox","time":"t"}
{"level":"info","msg":"Shiftfs works properly: no","time":"t"}
{"level":"info","msg":"ID-mapped mounts supported by kernel: yes","time":"t"}
Overlayfs on ID-mapped mounts supported by kernel: yes
{"level":"info","msg":"Ready ...","time":"t"}"#;
        assert_eq!(
            mgr_capabilities(out),
            vec![
                "Shiftfs works properly: no",
                "ID-mapped mounts supported by kernel: yes",
                "Overlayfs on ID-mapped mounts supported by kernel: yes"
            ]
        );
    }

    #[test]
    fn binds_are_id_mapped_only_when_sysbox_mgr_says_so_and_it_is_not_disabled() {
        let yes = r#"{"level":"info","msg":"ID-mapped mounts supported by kernel: yes"}"#;
        let no = r#"{"level":"info","msg":"ID-mapped mounts supported by kernel: no"}"#;
        assert!(idmaps_binds(yes, false));
        assert!(!idmaps_binds(yes, true));
        assert!(!idmaps_binds(no, false));
        assert!(!idmaps_binds(
            r#"{"msg":"Use of ID-mapped mounts disabled."}"#,
            false
        ));
        assert!(!idmaps_binds("", false));
    }

    #[test]
    fn subid_files() {
        assert!(subid_needs_line(""));
        assert!(subid_needs_line("coder:100000:65536\n"));
        assert!(!subid_needs_line(
            "coder:100000:65536\nsysbox:165536:65536\n"
        ));
        assert!(subid_needs_line("sysbox:1:2\nsysbox:3:4\n"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("subuid");
        std::fs::write(&p, "sysbox:1:2\nsysbox:3:4\ncoder:100000:65536\n").unwrap();
        ensure_subid_line(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "coder:100000:65536\nsysbox:165536:65536\n"
        );
    }

    #[test]
    fn diagnosis_names_actionable_causes() {
        assert!(diagnose("", "5.4.0-100-generic").contains("5.12"));
        assert!(
            diagnose("failed: /var/lib/sysbox is on overlay data-root", "6.8.0")
                .contains("emptyDir")
        );
        assert!(diagnose("mount: operation not permitted", "6.8.0").contains("privileged"));
        assert!(diagnose("idmap not supported on xfs", "6.8.0")
            .contains("CODER_DISABLE_IDMAPPED_MOUNT"));
        assert!(diagnose("random", "6.8.0").starts_with("Kernel 6.8.0"));
        assert_eq!(kernel_version("6.18.44-fc"), Some((6, 18)));
        // sysbox#947, #1005: the node's AppArmor profile for fusermount3 (Ubuntu 25.04+) blocks
        // sysbox-fs's FUSE mounts; that is not a missing privilege.
        let d = diagnose(
            "mount helper error: fusermount3: mount failed: Permission denied\nfusermount: exit status 1",
            "6.17.0-5-generic",
        );
        assert!(
            d.contains("fusermount3") && d.contains("aa-complain"),
            "{d}"
        );
        assert!(!d.contains("privileged"), "{d}");
    }
}

//! `envbox init`: PID 1 of a workspace whose image has no `/sbin/init`.
//!
//! The Go envbox ran `sleep infinity` there, which reaps nothing, so every orphan of the user's
//! processes stayed a zombie. This init reaps, and on a stop signal forwards it to every process of
//! the workspace, waits for them up to a grace period, and exits.
//!
//! Stop signals: SIGTERM and SIGINT (forwarded as they are), SIGRTMIN+3 (systemd's halt, forwarded as
//! SIGTERM), and any other signal sent from outside the workspace's pid namespace. The last is how
//! the image's `StopSignal` is honoured: envbox delivers it through the runtime's `kill`, from the
//! pod, so the kernel reports no sender pid; the init forwards that very signal, as the image's
//! processes expect it (a server that stops on SIGQUIT or SIGUSR1). The same signal sent by a process
//! inside the workspace (`kill -USR1 1`) is ignored, as before.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::cgroup;
use crate::pid1::signals;

/// What the init does with one received signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reap,
    /// Forward this signal to every process, then exit once they are gone (or the grace ends).
    Stop(i32),
    Ignore,
}

/// `SI_USER`, `SI_QUEUE`, `SI_TKILL` and the other user-space origins have a code ≤ 0; the kernel's
/// own signals (a hang-up, a child's exit) have positive codes.
fn from_user_space(code: i32) -> bool {
    code <= 0
}

/// Decides from the signal number, the sender's pid as seen in our pid namespace (0 when the sender
/// is outside it) and the `si_code`.
pub fn decide(signo: i32, sender_pid: u32, code: i32) -> Action {
    if signo == libc::SIGCHLD {
        return Action::Reap;
    }
    if signo == libc::SIGTERM || signo == libc::SIGINT {
        return Action::Stop(signo);
    }
    if signo == signals::sigrtmin_plus_3() {
        return Action::Stop(libc::SIGTERM);
    }
    if sender_pid == 0 && from_user_space(code) {
        return Action::Stop(signo);
    }
    Action::Ignore
}

pub fn run(grace: Duration) -> i32 {
    if let Err(e) = signals::block_all() {
        eprintln!("envbox init: cannot block signals: {e}");
        return 1;
    }
    settle_cgroup();
    let fd = match SignalFd::with_flags(&signals::handled_set(), SfdFlags::SFD_CLOEXEC) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("envbox init: cannot open a signalfd: {e}");
            return 1;
        }
    };
    loop {
        let info = match fd.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("envbox init: reading signals: {e}");
                return 1;
            }
        };
        match decide(info.ssi_signo as i32, info.ssi_pid, info.ssi_code) {
            Action::Reap => reap_all(),
            Action::Stop(sig) => return stop(sig, grace),
            Action::Ignore => {}
        }
    }
}

/// On cgroup v2, before anything else runs in the workspace (see [`cgroup::settle_workspace_init`]).
/// A failure is reported, not fatal: the workspace still works, only nested limits do not.
fn settle_cgroup() {
    let root = Path::new(cgroup::CGROUP_ROOT);
    if crate::sys::fs_kind(root) != Some(crate::sys::FsKind::Cgroup2) {
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(own) = cgroup::own_v2_cgroup(&own) else {
        return;
    };
    if let Err(e) = cgroup::settle_workspace_init(&crate::sys::real::RealKernel, root, own) {
        eprintln!(
            "envbox init: preparing the workspace's cgroup tree: {e}; containers started inside get no memory or io limits"
        );
    }
}

fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// Processes of this pid namespace other than us.
fn others_alive() -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.bytes().all(|b| b.is_ascii_digit()) && n != me && !is_zombie(&n)
            })
        })
        .unwrap_or(false)
}

fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn stop(sig: i32, grace: Duration) -> i32 {
    // kill(-1) reaches every process we may signal in this namespace, except ourselves.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-1, sig) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap_all();
        if !others_alive() {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap_all();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SI_USER: i32 = 0;
    const SI_KERNEL: i32 = 0x80;
    const CLD_EXITED: i32 = 1;

    #[test]
    fn term_int_and_halt_stop_from_anyone() {
        assert_eq!(
            decide(libc::SIGTERM, 42, SI_USER),
            Action::Stop(libc::SIGTERM)
        );
        assert_eq!(decide(libc::SIGINT, 0, SI_USER), Action::Stop(libc::SIGINT));
        assert_eq!(
            decide(signals::sigrtmin_plus_3(), 0, SI_USER),
            Action::Stop(libc::SIGTERM)
        );
    }

    #[test]
    fn the_image_stop_signal_comes_from_outside_and_is_forwarded_as_is() {
        assert_eq!(
            decide(libc::SIGUSR1, 0, SI_USER),
            Action::Stop(libc::SIGUSR1)
        );
        assert_eq!(decide(libc::SIGQUIT, 0, -6), Action::Stop(libc::SIGQUIT));
        // Sent by a workspace process, or by the kernel: not a stop request.
        assert_eq!(decide(libc::SIGUSR1, 17, SI_USER), Action::Ignore);
        assert_eq!(decide(libc::SIGHUP, 0, SI_KERNEL), Action::Ignore);
        assert_eq!(decide(libc::SIGWINCH, 9, SI_USER), Action::Ignore);
    }

    #[test]
    fn children_are_reaped_whoever_reports_them() {
        assert_eq!(decide(libc::SIGCHLD, 12, CLD_EXITED), Action::Reap);
        assert_eq!(decide(libc::SIGCHLD, 0, SI_USER), Action::Reap);
    }
}

//! `envbox init`: PID 1 of a workspace whose image has no `/sbin/init`.
//!
//! The Go envbox ran `sleep infinity` there, which reaps nothing, so every orphan of the user's
//! processes stayed a zombie. This init reaps, and on a stop signal forwards SIGTERM to every process
//! of the workspace, waits for them up to a grace period, and exits.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use crate::pid1::signals::{self, SignalEvent, SignalSource};

pub fn run(grace: Duration) -> i32 {
    if let Err(e) = signals::block_all() {
        eprintln!("envbox init: cannot block signals: {e}");
        return 1;
    }
    let mut source = match SignalSource::open() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("envbox init: cannot open a signalfd: {e}");
            return 1;
        }
    };
    loop {
        match source.wait() {
            Ok(SignalEvent::ChildExited) => reap_all(),
            Ok(SignalEvent::Stop(sig)) => return stop(sig, grace),
            // sysbox and systemd-style stop requests may arrive as SIGRTMIN+3 too.
            Ok(SignalEvent::Ignored(n)) if n == signals::sigrtmin_plus_3() => {
                return stop(Signal::SIGTERM, grace)
            }
            Ok(SignalEvent::Ignored(_)) => {}
            Err(e) => {
                eprintln!("envbox init: reading signals: {e}");
                return 1;
            }
        }
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

fn stop(sig: Signal, grace: Duration) -> i32 {
    // kill(-1) reaches every process we may signal in this namespace, except ourselves.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-1, sig as i32) };
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

//! Signals as events. They are blocked at the top of `main`, before any thread exists, and read from a
//! signalfd, so no handler runs at an arbitrary point and every thread shares one mask.
//!
//! We use nix's signalfd rather than signal-hook: a PID 1 wants the signals blocked (a blocked signal is
//! never dropped by the kernel's "init ignores default-action signals" rule) and read synchronously by
//! one thread that also reaps, which is exactly what a signalfd is.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT: begin (or, the second time, hurry) the ordered stop.
    Stop(Signal),
    ChildExited,
    /// SIGWINCH, SIGHUP, SIGUSR1/2 and the like: logged, never a reason to stop.
    Ignored(i32),
}

/// Every signal we take over. Synchronous fault signals stay default so a crash is still a crash.
pub fn handled_set() -> SigSet {
    let mut set = SigSet::all();
    for s in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGFPE,
        Signal::SIGILL,
        Signal::SIGABRT,
        Signal::SIGTRAP,
        Signal::SIGSYS,
        Signal::SIGKILL,
        Signal::SIGSTOP,
    ] {
        set.remove(s);
    }
    set
}

/// Must run before any thread is spawned: threads inherit the mask, and a thread that has these
/// signals unblocked would take them with their default action.
pub fn block_all() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
}

pub struct SignalSource {
    fd: SignalFd,
}

impl SignalSource {
    pub fn open() -> nix::Result<Self> {
        let fd = SignalFd::with_flags(&handled_set(), SfdFlags::SFD_CLOEXEC)?;
        Ok(SignalSource { fd })
    }

    /// Blocks until the next signal.
    pub fn wait(&mut self) -> nix::Result<SignalEvent> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => return Ok(classify(info.ssi_signo as i32)),
                Ok(None) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

pub fn classify(signo: i32) -> SignalEvent {
    match Signal::try_from(signo) {
        Ok(Signal::SIGTERM) => SignalEvent::Stop(Signal::SIGTERM),
        Ok(Signal::SIGINT) => SignalEvent::Stop(Signal::SIGINT),
        Ok(Signal::SIGCHLD) => SignalEvent::ChildExited,
        _ => SignalEvent::Ignored(signo),
    }
}

/// SIGRTMIN+3, systemd's "halt" request. Computed, because the number depends on the C library's
/// reserved real-time signals; sysbox-runc accepts only numbers for real-time signals.
pub fn sigrtmin_plus_3() -> i32 {
    libc::SIGRTMIN() + 3
}

/// Parses an image's `StopSignal` ("SIGTERM", "TERM", "15", "SIGRTMIN+3") into a number.
pub fn parse_stop_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=libc::SIGRTMAX()).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(off) = name.strip_prefix("RTMIN+") {
        let n = libc::SIGRTMIN() + off.parse::<i32>().ok()?;
        return (n <= libc::SIGRTMAX()).then_some(n);
    }
    if name == "RTMIN" {
        return Some(libc::SIGRTMIN());
    }
    format!("SIG{name}")
        .parse::<Signal>()
        .ok()
        .map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_only_on_term_and_int() {
        assert_eq!(classify(libc::SIGTERM), SignalEvent::Stop(Signal::SIGTERM));
        assert_eq!(classify(libc::SIGINT), SignalEvent::Stop(Signal::SIGINT));
        assert_eq!(classify(libc::SIGCHLD), SignalEvent::ChildExited);
        for s in [
            libc::SIGWINCH,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
        ] {
            assert_eq!(classify(s), SignalEvent::Ignored(s));
        }
    }

    #[test]
    fn stop_signal_names() {
        assert_eq!(parse_stop_signal("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(parse_stop_signal("quit"), Some(libc::SIGQUIT));
        assert_eq!(parse_stop_signal("9"), Some(9));
        assert_eq!(parse_stop_signal("SIGRTMIN+3"), Some(sigrtmin_plus_3()));
        assert_eq!(parse_stop_signal("SIGNOPE"), None);
        assert_eq!(parse_stop_signal("0"), None);
    }

    #[test]
    fn fault_signals_stay_unblocked() {
        let set = handled_set();
        assert!(!set.contains(Signal::SIGSEGV));
        assert!(set.contains(Signal::SIGTERM));
        assert!(set.contains(Signal::SIGWINCH));
    }
}

//! envbox as PID 1 of the pod: signals, the supervisor that owns every child, drained output.

pub mod output;
pub mod signals;
pub mod supervisor;

use std::sync::Arc;

use signals::{SignalEvent, SignalSource};
use supervisor::Supervisor;

/// The thread that turns signals into supervisor events: SIGCHLD reaps, SIGTERM/SIGINT request a stop,
/// everything else is only logged.
pub fn spawn_signal_thread(mut source: SignalSource, sup: Arc<Supervisor>) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match source.wait() {
                Ok(SignalEvent::ChildExited) => sup.reap(),
                Ok(SignalEvent::Stop(sig)) => {
                    let n = sup.request_stop();
                    if n == 1 {
                        log::info!("received {sig}: stopping the workspace");
                    } else {
                        log::warn!("received {sig} again: stopping fast");
                    }
                }
                Ok(SignalEvent::Ignored(n)) => log::debug!("ignoring signal {n}"),
                Err(e) => {
                    log::error!(
                        "reading signals failed: {e}; envbox can no longer reap or stop cleanly"
                    );
                    return;
                }
            }
        })
        .expect("spawning the signal thread");
}

/// Makes orphans of our descendants ours even when envbox is not PID 1 (the container init is
/// reparented to us after `create`).
pub fn become_subreaper() -> std::io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(std::io::Error::from)
}

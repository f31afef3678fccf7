//! The one owner of `waitpid`. Every child is registered here (spawned through `spawn`, or adopted by pid
//! when the runtime's init is reparented to us); every exit status is routed by pid; orphans are reaped.
//! Nothing else may wait: std's `Child::wait` would race the reaper and get ECHILD.
//!
//! The same lock and condition variable carry stop requests and finished stages, so the main thread can
//! wait for "whichever comes first" without polling.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sys::ProcessOps;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What `Supervisor::output` collected.
#[derive(Debug, Clone)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
enum Slot {
    Running(String),
    Exited(String, Exit),
}

/// Exits of pids nobody registered yet (a workspace init that dies before we read its pid file).
const UNCLAIMED_KEPT: usize = 256;

#[derive(Default)]
struct State {
    children: HashMap<i32, Slot>,
    unclaimed: VecDeque<(i32, Exit)>,
    stop_requests: u32,
    orphans_reaped: u64,
}

/// What woke a waiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Stop(u32),
    Exited(i32, String, Exit),
    Timeout,
}

pub struct Supervisor {
    st: Mutex<State>,
    cv: Condvar,
    ops: Arc<dyn ProcessOps>,
}

/// A start-up step ran into a stop request (SIGTERM) before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// A start-up step running on its own thread.
pub struct Step<T> {
    slot: Arc<Mutex<Option<T>>>,
}

impl<T> Step<T> {
    /// Its result, or `Interrupted` as soon as a stop is requested.
    pub fn wait(self, sup: &Supervisor) -> Result<T, Interrupted> {
        let mut st = sup.lock();
        loop {
            if let Some(v) = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Ok(v);
            }
            if st.stop_requests > 0 {
                return Err(Interrupted);
            }
            st = sup.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Supervisor {
    pub fn new(ops: Arc<dyn ProcessOps>) -> Arc<Self> {
        Arc::new(Supervisor {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            ops,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns under the reaper's lock, so even an instant exit is routed to this registration.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> io::Result<Child> {
        let mut st = self.lock();
        let child = cmd.spawn()?;
        st.children
            .insert(child.id() as i32, Slot::Running(name.to_string()));
        Ok(child)
    }

    /// Registers a process we did not spawn but will reap (the container init, reparented to us).
    pub fn adopt(&self, name: &str, pid: i32) {
        let mut st = self.lock();
        if let Some(i) = st.unclaimed.iter().position(|(p, _)| *p == pid) {
            let (_, exit) = st.unclaimed.remove(i).expect("index from position");
            st.children
                .insert(pid, Slot::Exited(name.to_string(), exit));
            self.cv.notify_all();
        } else {
            st.children.insert(pid, Slot::Running(name.to_string()));
        }
    }

    /// Called on SIGCHLD: reaps every exited child and routes each status.
    pub fn reap(&self) {
        let mut st = self.lock();
        let mut any = false;
        while let Some((pid, exit)) = self.ops.reap_any() {
            any = true;
            match st.children.get_mut(&pid) {
                Some(slot) if matches!(slot, Slot::Running(_)) => {
                    if let Slot::Running(name) = slot {
                        let name = std::mem::take(name);
                        log::debug!("{name} (pid {pid}) ended: {exit}");
                        *slot = Slot::Exited(name, exit);
                    }
                }
                _ => {
                    st.orphans_reaped += 1;
                    log::trace!("reaped orphan pid {pid}: {exit}");
                    if st.unclaimed.len() == UNCLAIMED_KEPT {
                        st.unclaimed.pop_front();
                    }
                    st.unclaimed.push_back((pid, exit));
                }
            }
        }
        if any {
            self.cv.notify_all();
        }
    }

    pub fn request_stop(&self) -> u32 {
        let mut st = self.lock();
        st.stop_requests += 1;
        self.cv.notify_all();
        st.stop_requests
    }

    pub fn stop_requests(&self) -> u32 {
        self.lock().stop_requests
    }

    pub fn orphans_reaped(&self) -> u64 {
        self.lock().orphans_reaped
    }

    pub fn signal(&self, pid: i32, sig: i32) -> io::Result<()> {
        // Only registered, still-running pids: a reaped pid may already belong to someone else.
        let st = self.lock();
        match st.children.get(&pid) {
            Some(Slot::Running(_)) => self.ops.kill(pid, sig),
            _ => Ok(()),
        }
    }

    /// Whether a registered pid has exited, without taking its status.
    pub fn has_exited(&self, pid: i32) -> bool {
        matches!(self.lock().children.get(&pid), Some(Slot::Exited(..)))
    }

    /// Non-blocking: the exit of a registered pid, if it happened. Forgets the pid once reported.
    pub fn try_exit(&self, pid: i32) -> Option<Exit> {
        let mut st = self.lock();
        Self::take_exit(&mut st, pid)
    }

    fn take_exit(st: &mut State, pid: i32) -> Option<Exit> {
        if let Some(Slot::Exited(_, exit)) = st.children.get(&pid) {
            let exit = *exit;
            st.children.remove(&pid);
            return Some(exit);
        }
        None
    }

    /// Waits for one pid's exit, ignoring stop requests (used during the stop itself).
    pub fn wait_exit(&self, pid: i32, deadline: Option<Instant>) -> Option<Exit> {
        let mut st = self.lock();
        loop {
            if let Some(exit) = Self::take_exit(&mut st, pid) {
                return Some(exit);
            }
            st = self.wait_until(st, deadline)?;
        }
    }

    /// Waits for whichever comes first: a stop request beyond `seen_stops`, an exit of one of `watched`,
    /// or the deadline. The exited pid stays registered until `try_exit` takes it.
    pub fn wait_event(&self, watched: &[i32], seen_stops: u32, deadline: Option<Instant>) -> Wake {
        let mut st = self.lock();
        loop {
            if st.stop_requests > seen_stops {
                return Wake::Stop(st.stop_requests);
            }
            for pid in watched {
                if let Some(Slot::Exited(name, exit)) = st.children.get(pid) {
                    return Wake::Exited(*pid, name.clone(), *exit);
                }
            }
            st = match self.wait_until(st, deadline) {
                Some(g) => g,
                None => return Wake::Timeout,
            };
        }
    }

    fn wait_until<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'a, State>> {
        match deadline {
            None => Some(self.cv.wait(st).unwrap_or_else(|e| e.into_inner())),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return None;
                }
                let (g, _) = self
                    .cv
                    .wait_timeout(st, d - now)
                    .unwrap_or_else(|e| e.into_inner());
                Some(g)
            }
        }
    }

    /// Runs a start-up step on its own thread and returns its result, or `Interrupted` as soon as a stop
    /// is requested. An interrupted step is abandoned: steps only publish results atomically (blobs are
    /// renamed after verification, layers marked complete after unpacking), so nothing half-done is
    /// ever used, and the process exits soon after.
    pub fn run_step<T, F>(self: &Arc<Self>, name: &str, f: F) -> Result<T, Interrupted>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.start_step(name, f).wait(self)
    }

    /// Starts a step that runs beside others (the sysbox daemons start while the image is pulled).
    pub fn start_step<T, F>(self: &Arc<Self>, name: &str, f: F) -> Step<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let (me, out) = (Arc::clone(self), Arc::clone(&slot));
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let v = f();
                *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
                // Take the supervisor lock so the notification cannot slip between check and wait.
                let _g = me.lock();
                me.cv.notify_all();
            })
            .expect("spawning a thread");
        Step { slot }
    }

    /// Runs a short command to completion through the supervisor (never std's `wait`), feeding it
    /// `stdin` and collecting its output; killed at `timeout`.
    pub fn output(
        &self,
        name: &str,
        cmd: &mut Command,
        stdin: &[u8],
        timeout: Duration,
    ) -> io::Result<Output> {
        use std::io::{Read, Write};
        use std::process::Stdio;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(name, cmd)?;
        let pid = child.id() as i32;
        if let Some(mut w) = child.stdin.take() {
            let data = stdin.to_vec();
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .map(|r| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(r) = r {
                    let _ = r.take(1 << 20).read_to_end(&mut buf);
                }
                buf
            })
        })
        .collect();
        let exit = match self.wait_exit(pid, Some(Instant::now() + timeout)) {
            Some(e) => e,
            None => {
                let _ = self.signal(pid, libc::SIGKILL);
                let _ = self.wait_exit(pid, Some(Instant::now() + Duration::from_secs(2)));
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{name} did not finish within {} s", timeout.as_secs()),
                ));
            }
        };
        let mut outs = readers.into_iter().map(|h| h.join().unwrap_or_default());
        Ok(Output {
            exit,
            stdout: outs.next().unwrap_or_default(),
            stderr: outs.next().unwrap_or_default(),
        })
    }

    /// Sleeps up to `d`, returning early (false) when a stop is requested.
    pub fn sleep_unless_stopped(&self, d: Duration) -> bool {
        matches!(
            self.wait_event(&[], self.stop_requests(), Some(Instant::now() + d)),
            Wake::Timeout
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeProcessOps;

    fn sup() -> (Arc<Supervisor>, Arc<FakeProcessOps>) {
        let ops = Arc::new(FakeProcessOps::default());
        (Supervisor::new(ops.clone()), ops)
    }

    #[test]
    fn exits_are_routed_to_registered_pids_and_orphans_are_reaped() {
        let (s, ops) = sup();
        s.adopt("workspace", 42);
        ops.exit(42, Exit::Code(3));
        ops.exit(77, Exit::Signal(9));
        s.reap();
        assert_eq!(s.orphans_reaped(), 1);
        assert_eq!(
            s.wait_event(&[42], 0, None),
            Wake::Exited(42, "workspace".into(), Exit::Code(3))
        );
        assert_eq!(s.try_exit(42), Some(Exit::Code(3)));
        assert_eq!(s.try_exit(42), None, "reported once");
    }

    #[test]
    fn exit_before_adoption_is_not_lost() {
        let (s, ops) = sup();
        ops.exit(50, Exit::Code(0));
        s.reap();
        s.adopt("workspace", 50);
        assert_eq!(s.wait_exit(50, Some(Instant::now())), Some(Exit::Code(0)));
    }

    #[test]
    fn deadline_and_stop_wake_waiters() {
        let (s, _ops) = sup();
        s.adopt("workspace", 10);
        let t = Instant::now();
        assert_eq!(
            s.wait_event(&[10], 0, Some(t + Duration::from_millis(30))),
            Wake::Timeout
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || s2.wait_event(&[10], 0, None));
        std::thread::sleep(Duration::from_millis(20));
        s.request_stop();
        assert_eq!(h.join().unwrap(), Wake::Stop(1));
        assert_eq!(
            s.wait_exit(10, Some(Instant::now() + Duration::from_millis(10))),
            None
        );
    }

    #[test]
    fn signals_go_only_to_running_registered_pids() {
        let (s, ops) = sup();
        s.adopt("a", 5);
        s.signal(5, libc::SIGTERM).unwrap();
        s.signal(6, libc::SIGTERM).unwrap();
        ops.exit(5, Exit::Code(0));
        s.reap();
        s.signal(5, libc::SIGKILL).unwrap();
        assert_eq!(ops.kills(), vec![(5, libc::SIGTERM)]);
    }

    #[test]
    fn run_step_returns_value_or_interruption() {
        let (s, _ops) = sup();
        assert_eq!(s.run_step("quick", || 7), Ok(7));
        let s2 = Arc::clone(&s);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            s2.request_stop();
        });
        let r = s.run_step("slow", || std::thread::sleep(Duration::from_secs(5)));
        assert_eq!(r, Err(Interrupted));
    }
}

//! The one owner of `waitpid`. Every child is registered here (spawned through `spawn`, or adopted by pid
//! when the runtime's init is reparented to us); every exit status is routed by pid; orphans are reaped.
//! Nothing else may wait: std's `Child::wait` would race the reaper and get ECHILD.
//!
//! The same lock and condition variable carry stop requests and finished stages, so the main thread can
//! wait for "whichever comes first" without polling.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sys::ProcessOps;

/// Gives `cmd` an empty signal mask. envbox blocks every signal (it reads them from a signalfd) and
/// a child inherits that mask through `exec`; the runtime passes it on to the workspace's processes,
/// where a blocked SIGUSR1, SIGPIPE or SIGALRM is never delivered (a trap on the image's StopSignal
/// never ran, `yes | head` never ended).
pub fn reset_signal_mask(cmd: &mut Command) {
    // SAFETY: sigemptyset and pthread_sigmask are async-signal-safe and touch only a local set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            match libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        });
    }
}

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
        reset_signal_mask(cmd);
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

    #[test]
    fn each_exit_is_routed_to_its_own_pid_in_any_order() {
        let (s, ops) = sup();
        for pid in [1, 2, 3] {
            s.adopt("p", pid);
        }
        ops.exit(3, Exit::Code(3));
        ops.exit(1, Exit::Signal(libc::SIGTERM));
        s.reap();
        assert_eq!(s.try_exit(2), None, "2 is still running");
        assert!(!s.has_exited(2));
        assert!(s.has_exited(1));
        assert_eq!(s.try_exit(1), Some(Exit::Signal(libc::SIGTERM)));
        assert_eq!(s.try_exit(3), Some(Exit::Code(3)));
        ops.exit(2, Exit::Code(0));
        s.reap();
        assert_eq!(s.wait_exit(2, Some(Instant::now())), Some(Exit::Code(0)));
        assert_eq!(s.orphans_reaped(), 0, "every exit had a registration");
    }

    #[test]
    fn a_pid_taken_once_is_forgotten_and_a_reused_pid_is_an_orphan() {
        let (s, ops) = sup();
        s.adopt("first", 9);
        ops.exit(9, Exit::Code(0));
        s.reap();
        assert_eq!(s.try_exit(9), Some(Exit::Code(0)));
        // The pid may now belong to someone else: no signal goes to it.
        s.signal(9, libc::SIGKILL).unwrap();
        assert!(ops.kills().is_empty());
        ops.exit(9, Exit::Code(1));
        s.reap();
        assert_eq!(s.orphans_reaped(), 1);
        assert_eq!(s.try_exit(9), None);
    }

    #[test]
    fn orphans_are_reaped_and_only_the_latest_unclaimed_exits_are_kept() {
        let (s, ops) = sup();
        let n = UNCLAIMED_KEPT as i32 + 10;
        for pid in 1000..1000 + n {
            ops.exit(pid, Exit::Code(0));
        }
        s.reap();
        assert_eq!(s.orphans_reaped(), n as u64);
        // The oldest are forgotten (memory stays bounded): adopting one now finds no exit.
        s.adopt("too late", 1000);
        assert!(!s.has_exited(1000));
        s.adopt("recent", 1000 + n - 1);
        assert!(s.has_exited(1000 + n - 1));
    }

    #[test]
    fn wait_event_watches_several_pids_and_only_those() {
        let (s, ops) = sup();
        for pid in [10, 11, 12] {
            s.adopt("p", pid);
        }
        ops.exit(12, Exit::Code(1));
        s.reap();
        let soon = || Some(Instant::now() + Duration::from_millis(20));
        assert_eq!(s.wait_event(&[10, 11], 0, soon()), Wake::Timeout);
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || s2.wait_event(&[10, 11], 0, None));
        std::thread::sleep(Duration::from_millis(20));
        ops.exit(11, Exit::Signal(libc::SIGKILL));
        s.reap();
        let woke = Wake::Exited(11, "p".into(), Exit::Signal(libc::SIGKILL));
        assert_eq!(h.join().unwrap(), woke);
        // Reported until taken, so a caller that loops sees it again.
        assert_eq!(s.wait_event(&[10, 11], 0, soon()), woke);
        assert_eq!(s.try_exit(11), Some(Exit::Signal(libc::SIGKILL)));
        assert_eq!(s.wait_event(&[10, 11], 0, soon()), Wake::Timeout);
        assert_eq!(s.try_exit(12), Some(Exit::Code(1)));
    }

    #[test]
    fn wait_event_reports_only_stop_requests_beyond_those_seen() {
        let (s, ops) = sup();
        s.adopt("w", 20);
        let soon = || Some(Instant::now() + Duration::from_millis(20));
        assert_eq!(s.request_stop(), 1);
        assert_eq!(s.wait_event(&[20], 0, None), Wake::Stop(1));
        assert_eq!(s.wait_event(&[20], 1, soon()), Wake::Timeout);
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || s2.wait_event(&[20], 1, None));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.request_stop(), 2);
        assert_eq!(h.join().unwrap(), Wake::Stop(2));
        // A stop request does not end a wait for an exit (the stop itself waits that way).
        assert_eq!(s.wait_exit(20, soon()), None);
        ops.exit(20, Exit::Code(0));
        s.reap();
        assert_eq!(s.wait_exit(20, soon()), Some(Exit::Code(0)));
    }

    #[test]
    fn deadlines_in_the_past_return_at_once_and_a_stop_cuts_a_sleep_short() {
        let (s, _ops) = sup();
        s.adopt("w", 30);
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        assert_eq!(s.wait_exit(30, Some(past)), None);
        assert_eq!(s.wait_event(&[30], 0, Some(past)), Wake::Timeout);
        assert!(s.sleep_unless_stopped(Duration::from_millis(10)));
        let s2 = Arc::clone(&s);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            s2.request_stop();
        });
        let t = Instant::now();
        assert!(!s.sleep_unless_stopped(Duration::from_secs(60)));
        assert!(t.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_finished_step_is_returned_even_after_a_stop_request() {
        let (s, _ops) = sup();
        let step = s.start_step("done", || 5);
        let t = Instant::now();
        while step.slot.lock().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(30), "step never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        s.request_stop();
        assert_eq!(step.wait(&s), Ok(5));
    }

    /// Reaps only the children in one process group, so these tests never take the exit of a
    /// process another test of this binary spawned.
    struct GroupReaper {
        pgid: i32,
    }

    impl ProcessOps for GroupReaper {
        fn reap_any(&self) -> Option<(i32, Exit)> {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            let group = nix::unistd::Pid::from_raw(-self.pgid);
            match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, c)) => Some((p.as_raw(), Exit::Code(c))),
                Ok(WaitStatus::Signaled(p, sig, _)) => Some((p.as_raw(), Exit::Signal(sig as i32))),
                _ => None,
            }
        }

        fn kill(&self, pid: i32, sig: i32) -> io::Result<()> {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
            Ok(())
        }
    }

    /// A supervisor over real processes: a group leader that only holds the group, and a thread that
    /// reaps as the signal thread would on SIGCHLD. `f` gets the supervisor and the group id.
    fn with_real_children(f: impl FnOnce(&Arc<Supervisor>, i32)) {
        use std::os::unix::process::CommandExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut leader = Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = leader.id() as i32;
        let s = Supervisor::new(Arc::new(GroupReaper { pgid }));
        let done = Arc::new(AtomicBool::new(false));
        let (s2, d2) = (Arc::clone(&s), Arc::clone(&done));
        let reaper = std::thread::spawn(move || {
            while !d2.load(Ordering::SeqCst) {
                s2.reap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&s, pgid)));
        done.store(true, Ordering::SeqCst);
        reaper.join().unwrap();
        let _ = leader.kill();
        let _ = leader.wait();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    }

    fn in_group(pgid: i32, script: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new("sh");
        c.arg("-c").arg(script).process_group(pgid);
        c
    }

    /// Processes of the group other than its leader, zombies included.
    fn group_members(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let pgrp: Option<i32> = rest.split_whitespace().nth(2).and_then(|f| f.parse().ok());
            if pgrp == Some(pgid) && pid != pgid {
                out.push(pid);
            }
        }
        out
    }

    #[test]
    fn output_feeds_stdin_and_collects_both_streams_and_the_status() {
        with_real_children(|s, pgid| {
            let out = s
                .output(
                    "t",
                    &mut in_group(pgid, "cat; echo err >&2; exit 3"),
                    b"hello\n",
                    Duration::from_secs(30),
                )
                .unwrap();
            assert_eq!(out.exit, Exit::Code(3));
            assert_eq!(out.stdout, b"hello\n");
            assert_eq!(out.stderr, b"err\n");
            assert_eq!(s.orphans_reaped(), 0);
        });
    }

    #[test]
    fn output_drains_more_than_a_pipe_buffer_while_it_waits() {
        with_real_children(|s, pgid| {
            let out = s
                .output(
                    "big",
                    &mut in_group(
                        pgid,
                        "head -c 1000000 /dev/zero; head -c 300000 /dev/zero >&2",
                    ),
                    b"",
                    Duration::from_secs(30),
                )
                .unwrap();
            assert!(out.exit.success());
            assert_eq!(out.stdout.len(), 1_000_000);
            assert_eq!(out.stderr.len(), 300_000);
        });
    }

    #[test]
    fn output_kills_and_reaps_a_command_at_its_timeout() {
        with_real_children(|s, pgid| {
            let t = Instant::now();
            let e = s
                .output(
                    "hung",
                    &mut in_group(pgid, "exec sleep 300"),
                    b"",
                    Duration::from_millis(200),
                )
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(t.elapsed() < Duration::from_secs(30));
            assert_eq!(group_members(pgid), Vec::<i32>::new(), "killed and reaped");
        });
    }
}

//! User-facing start-up log: JSON lines on stderr in the Go envbox's shape
//! (`{"output":…,"time":…,"type":"info|error|done"}`), exactly one `done` line, and the fatal reason in
//! `/dev/termination-log`. Operator logs go through `log` and are separate.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::secrets::scrub;

pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Where a user-facing line also goes besides stderr (the Coder control plane, see `coderlog`).
pub trait RemoteSink: Send + Sync {
    fn send(&self, time: SystemTime, kind: LineKind, output: &str);
    /// Flush what is queued within a short bound; called once, when start-up ends.
    fn flush(&self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Info,
    Error,
    Done,
}

impl LineKind {
    fn as_str(self) -> &'static str {
        match self {
            LineKind::Info => "info",
            LineKind::Error => "error",
            LineKind::Done => "done",
        }
    }
}

pub struct BuildLog {
    out: Mutex<Box<dyn Write + Send>>,
    remote: Mutex<Option<Box<dyn RemoteSink>>>,
    done: AtomicBool,
}

impl BuildLog {
    pub fn stderr() -> Self {
        Self::new(Box::new(std::io::stderr()))
    }

    pub fn new(out: Box<dyn Write + Send>) -> Self {
        BuildLog {
            out: Mutex::new(out),
            remote: Mutex::new(None),
            done: AtomicBool::new(false),
        }
    }

    pub fn set_remote(&self, sink: Box<dyn RemoteSink>) {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        self.line(LineKind::Info, msg.as_ref());
    }

    pub fn error(&self, msg: impl AsRef<str>) {
        self.line(LineKind::Error, msg.as_ref());
    }

    /// Ends start-up: writes the single `done` line and flushes the remote sink, which gets no line
    /// after it. Later calls do nothing.
    pub fn done(&self) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        self.line(LineKind::Done, "");
        if let Some(r) = self
            .remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            r.flush();
        }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    fn line(&self, kind: LineKind, msg: &str) {
        let now = SystemTime::now();
        let msg = scrub(msg);
        let json = serde_json::json!({
            "output": msg,
            "time": rfc3339(now),
            "type": kind.as_str(),
        });
        {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            // A closed stderr must not take envbox down; there is nowhere left to report it.
            let _ = writeln!(out, "{json}");
            let _ = out.flush();
        }
        // Coder keeps about 1 MiB of start-up logs per agent: after `done` the bootstrap's output (the
        // agent's, for its whole life) would use up the room the agent's own start-up scripts need.
        // The pod log keeps every line.
        if kind != LineKind::Done && !self.is_done() {
            if let Some(r) = self
                .remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                r.send(now, kind, &msg);
            }
        }
    }
}

/// Kubernetes shows this file's content as the container's termination message.
pub fn write_termination_log(msg: &str) {
    write_termination_log_at(Path::new(TERMINATION_LOG), msg);
}

pub fn write_termination_log_at(path: &Path, msg: &str) {
    if !path.exists() {
        return;
    }
    if let Err(e) = std::fs::write(path, scrub(msg).as_bytes()) {
        log::warn!("cannot write {}: {e}", path.display());
    }
}

/// RFC 3339 in UTC with nanoseconds, as Go's `time.RFC3339Nano` writes it (trailing zeros trimmed).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, dd) = civil_from_days(days as i64);
    let mut s = format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(1_727_303_723, 630_000_000);
        assert_eq!(rfc3339(t), "2024-09-25T22:35:23.63Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn lines_are_json_and_done_is_written_once() {
        let buf = Buf::default();
        let log = BuildLog::new(Box::new(buf.clone()));
        log.info("Pulling \"x\"");
        log.error("boom");
        log.done();
        log.done();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["output"], "Pulling \"x\"");
        assert_eq!(lines[0]["type"], "info");
        assert_eq!(lines[1]["type"], "error");
        assert_eq!(lines[2]["type"], "done");
        assert_eq!(lines[2]["output"], "");
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<String>>>);
    impl RemoteSink for Sink {
        fn send(&self, _: SystemTime, _: LineKind, output: &str) {
            self.0.lock().unwrap().push(output.to_string());
        }
        fn flush(&self) {}
    }

    #[test]
    fn after_done_lines_stay_in_the_pod_log_and_never_reach_coder() {
        let buf = Buf::default();
        let sink = Sink::default();
        let log = BuildLog::new(Box::new(buf.clone()));
        log.set_remote(Box::new(sink.clone()));
        log.info("bootstrap: starting the agent");
        log.done();
        // The agent's own output for its whole life, and anything else said later.
        log.info("agent: listening");
        log.error("the workspace's init ended unexpectedly");
        assert_eq!(
            *sink.0.lock().unwrap(),
            vec!["bootstrap: starting the agent"]
        );
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("agent: listening"), "{text}");
        assert!(text.contains("ended unexpectedly"), "{text}");
    }

    #[test]
    fn termination_log_only_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("termination-log");
        write_termination_log_at(&p, "x");
        assert!(!p.exists());
        std::fs::write(&p, "").unwrap();
        write_termination_log_at(&p, "pull failed");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "pull failed");
    }
}

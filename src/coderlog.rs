//! Start-up progress in the Coder dashboard: build-log lines go to the Coder control plane as
//! workspace agent logs, under a named log source ("envbox").
//!
//! Coder REST API (Coder docs, "Agents" reference), authenticated with `Coder-Session-Token`:
//! - `POST /api/v2/workspaceagents/me/log-source` `{"id":<uuid>,"display_name":…,"icon":…}` once;
//! - `PATCH /api/v2/workspaceagents/me/logs`
//!   `{"log_source_id":<uuid>,"logs":[{"created_at":<RFC 3339>,"output":…,"level":"info"|"error"}]}`.
//!
//! Bounded so that it can never hold start-up back (the Go envbox could hang forever on a rejected
//! token, made one blocking round trip per line and had no timeouts):
//! - [`RemoteSink::send`] only splits the line and appends it to a bounded in-memory queue; when the
//!   queue is full the line is dropped and counted. Nothing else runs on the caller's thread.
//! - One sender thread batches: a request per [`BATCH_WINDOW`] or per [`MAX_BATCH_ENTRIES`] entries,
//!   whichever comes first; at most [`MAX_ENTRY_BYTES`] of output per entry (longer lines are split on
//!   UTF-8 character boundaries), at most [`MAX_BODY_BYTES`] per request body, and at most
//!   [`BUDGET_BYTES`] of output in total (below Coder's 1 MiB per build).
//! - Every request has a connect timeout ([`CONNECT_TIMEOUT`]) and a total one ([`REQUEST_TIMEOUT`]).
//!   After two consecutive failures the sender backs off; after [`MAX_FAILURES`] it gives up. A
//!   rejected token (401/403) or Coder's own log limit (413) stops it at once. Each of these ends is
//!   one operator warning, which never contains the token.
//! - [`RemoteSink::flush`] (end of start-up) waits at most [`FLUSH_DEADLINE`] for the queue to be
//!   sent, not at all while the server is failing, and not past [`SLOW_REQUEST`] after the start
//!   of a request still unanswered. Nothing else ever waits for the sender: it is
//!   detached and dies with the process, so shutdown is never delayed by it.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::buildlog::{rfc3339, LineKind, RemoteSink};
use crate::image::registry::{ureq_agent, TlsRoots};
use crate::secrets::Secret;

/// envbox's log source. Fixed, so a restarted pod re-uses its source instead of adding another.
pub const LOG_SOURCE_ID: &str = "04a934fb-9956-4f03-8352-4307637fbd8a";
pub const LOG_SOURCE_NAME: &str = "envbox";
pub const LOG_SOURCE_ICON: &str = "/icon/docker.svg";
/// Coders without the log-source endpoint file logs sent with the nil id under "External".
const NIL_SOURCE_ID: &str = "00000000-0000-0000-0000-000000000000";

pub const LOG_SOURCE_PATH: &str = "/api/v2/workspaceagents/me/log-source";
pub const LOGS_PATH: &str = "/api/v2/workspaceagents/me/logs";
pub const TOKEN_HEADER: &str = "Coder-Session-Token";

pub const MAX_ENTRY_BYTES: usize = 1024;
pub const MAX_BATCH_ENTRIES: usize = 50;
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Total output bytes sent, kept below Coder's 1 MiB of agent logs per build so the notice that
/// the rest was cut still fits.
pub const BUDGET_BYTES: usize = 900 << 10;
pub const BATCH_WINDOW: Duration = Duration::from_millis(250);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);
/// `flush` does not wait for a request that has been in flight this long (a healthy Coder answers
/// in milliseconds); the sender itself still waits up to [`REQUEST_TIMEOUT`].
pub const SLOW_REQUEST: Duration = Duration::from_secs(1);
/// Consecutive failed requests after which the sender gives up.
pub const MAX_FAILURES: u32 = 4;
/// Entries (each at most 1 KiB) the queue holds before new lines are dropped.
const QUEUE_CAPACITY: usize = 2048;

const BUDGET_NOTICE: &str =
    "envbox: the rest of the start-up log is not sent to Coder (size limit reached); see the pod's log";

/// Limits and delays; [`Tuning::default`] is what envbox uses, tests shrink them.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    window: Duration,
    max_entries: usize,
    max_entry_bytes: usize,
    max_body: usize,
    budget: usize,
    queue_capacity: usize,
    /// Pause after the second consecutive failure; doubled after the third.
    backoff: Duration,
    max_failures: u32,
    flush_deadline: Duration,
    /// `flush` stops waiting on a request in flight for this long.
    slow_request: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            window: BATCH_WINDOW,
            max_entries: MAX_BATCH_ENTRIES,
            max_entry_bytes: MAX_ENTRY_BYTES,
            max_body: MAX_BODY_BYTES,
            budget: BUDGET_BYTES,
            queue_capacity: QUEUE_CAPACITY,
            backoff: Duration::from_secs(1),
            max_failures: MAX_FAILURES,
            flush_deadline: FLUSH_DEADLINE,
            slow_request: SLOW_REQUEST,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

impl Tuning {
    /// Pause before the next attempt after `failures` consecutive failures.
    fn pause_after(&self, failures: u32) -> Duration {
        match failures {
            0 | 1 => self.window,
            2 => self.backoff,
            _ => self.backoff * 2,
        }
    }
}

/// Sends start-up lines to Coder; see the module documentation. Install it with
/// `BuildLog::set_remote(Box::new(coderlog::start(url, token, &roots)))`.
pub struct CoderLog {
    shared: Arc<Shared>,
    tuning: Tuning,
}

impl std::fmt::Debug for CoderLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoderLog")
    }
}

/// Starts the sender thread for the Coder deployment at `url` (CODER_AGENT_URL) with the agent
/// `token` (CODER_AGENT_TOKEN), trusting `roots` (system bundle plus CODER_EXTRA_CERTS_PATH).
/// Does no I/O itself and never fails: if the thread cannot start, lines are simply not sent.
pub fn start(url: &str, token: &Secret, roots: &TlsRoots) -> CoderLog {
    let tuning = Tuning::default();
    let api = HttpApi::new(url, token, roots, &tuning);
    start_with(Box::new(api), tuning)
}

fn start_with(api: Box<dyn Api>, tuning: Tuning) -> CoderLog {
    let shared = Arc::new(Shared::default());
    let s = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name("coder-log".into())
        .spawn(move || Sender::new(s, api, tuning).run());
    if let Err(e) = spawned {
        log::warn!(
            "coder log: cannot start the sender thread ({e}); start-up lines are not sent to Coder"
        );
        shared.stop(0);
    }
    CoderLog { shared, tuning }
}

impl RemoteSink for CoderLog {
    fn send(&self, time: SystemTime, kind: LineKind, output: &str) {
        let level = match kind {
            LineKind::Info => "info",
            LineKind::Error => "error",
            LineKind::Done => return,
        };
        let cleaned;
        let output = if output.contains('\0') {
            // PostgreSQL text cannot hold NUL.
            cleaned = output.replace('\0', "");
            cleaned.as_str()
        } else {
            output
        };
        let queued = Instant::now();
        let mut first_drop = false;
        {
            let mut st = self.shared.lock();
            if !st.accepting {
                return;
            }
            for part in split_output(output, self.tuning.max_entry_bytes) {
                if st.queue.len() >= self.tuning.queue_capacity {
                    st.dropped += 1;
                    first_drop |= st.dropped == 1;
                    continue;
                }
                st.queue.push_back(Entry {
                    created_at: time,
                    level,
                    output: part.to_string(),
                    queued,
                });
                st.enqueued += 1;
            }
        }
        self.shared.wake.notify_one();
        if first_drop {
            log::warn!(
                "coder log: the queue to Coder is full ({} entries); dropping start-up lines until it drains",
                self.tuning.queue_capacity
            );
        }
    }

    fn flush(&self) {
        let deadline = Instant::now() + self.tuning.flush_deadline;
        let mut st = self.shared.lock();
        let target = st.enqueued;
        st.flush_requested = true;
        self.shared.wake.notify_one();
        while st.settled < target && !st.dead && !st.failing {
            let now = Instant::now();
            // A request unanswered after `slow_request` means a stalled server: waiting longer
            // would only hold up whatever follows start-up (exit, or handling a SIGTERM).
            let stalled_at = st.in_flight_since.map(|t| t + self.tuning.slow_request);
            if now >= deadline || stalled_at.is_some_and(|t| now >= t) {
                log::debug!(
                    "coder log: flush gives up with {} entries unsent",
                    target - st.settled
                );
                break;
            }
            let until = stalled_at.map_or(deadline, |t| t.min(deadline));
            st = self
                .shared
                .progress
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let dropped = st.dropped;
        drop(st);
        if dropped > 0 {
            log::warn!("coder log: {dropped} start-up log entries were dropped (queue full)");
        }
    }
}

#[derive(Debug)]
struct Entry {
    created_at: SystemTime,
    level: &'static str,
    output: String,
    queued: Instant,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Entry>,
    /// Entries ever queued, and those sent or discarded since: `flush` waits for the second to
    /// reach the first's value at the time of the call.
    enqueued: u64,
    settled: u64,
    dropped: u64,
    accepting: bool,
    flush_requested: bool,
    /// The latest request failed: `flush` does not wait on a failing server.
    failing: bool,
    /// The sender has stopped for good.
    dead: bool,
    /// When the request now in flight was started.
    in_flight_since: Option<Instant>,
}

impl Default for State {
    fn default() -> Self {
        State {
            queue: VecDeque::new(),
            enqueued: 0,
            settled: 0,
            dropped: 0,
            accepting: true,
            flush_requested: false,
            failing: false,
            dead: false,
            in_flight_since: None,
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// The sender waits on this for lines or a flush request.
    wake: Condvar,
    /// `flush` waits on this for progress.
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops for good: nothing more is queued or sent. `in_flight` entries taken off the queue are
    /// settled too.
    fn stop(&self, in_flight: usize) {
        let mut st = self.lock();
        st.accepting = false;
        st.dead = true;
        st.settled += in_flight as u64 + st.queue.len() as u64;
        st.queue.clear();
        drop(st);
        self.progress.notify_all();
    }
}

/// A server reply as far as the sender cares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ok,
    /// Non-2xx status, with Coder's `message` (if any).
    Status(u16, String),
    /// No response: connection, TLS or timeout error.
    Failed(String),
    /// Coder's certificate is not trusted: no retry can change that, so the sender stops at once.
    Untrusted(String),
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Ok => f.write_str("OK"),
            Reply::Status(code, msg) if msg.is_empty() => write!(f, "HTTP {code}"),
            Reply::Status(code, msg) => write!(f, "HTTP {code}: {msg}"),
            Reply::Failed(e) | Reply::Untrusted(e) => f.write_str(e),
        }
    }
}

/// The two calls the sender makes; the HTTP implementation is [`HttpApi`], tests use fakes.
trait Api: Send {
    fn register(&mut self, body: &str) -> Reply;
    fn patch_logs(&mut self, body: &str) -> Reply;
}

/// A batch taken off the queue: serialized entries, how many queue entries they account for (the
/// budget notice is not one), and whether the sender stops after it (budget used up).
#[derive(Debug, Default)]
struct Batch {
    entries: Vec<String>,
    counted: usize,
    last: bool,
}

struct Sender {
    shared: Arc<Shared>,
    api: Box<dyn Api>,
    tuning: Tuning,
    source_id: Option<&'static str>,
    failures: u32,
    budget_used: usize,
}

enum Next {
    Continue,
    Stop,
}

impl Sender {
    fn new(shared: Arc<Shared>, api: Box<dyn Api>, tuning: Tuning) -> Sender {
        Sender {
            shared,
            api,
            tuning,
            source_id: None,
            failures: 0,
            budget_used: 0,
        }
    }

    fn run(mut self) {
        let mut batch = Batch::default();
        loop {
            if batch.entries.is_empty() {
                batch = self.take_batch();
                if batch.entries.is_empty() {
                    continue;
                }
            }
            let next = match self.source_id {
                None => self.register(&batch),
                Some(id) => self.send(id, &mut batch),
            };
            if let Next::Stop = next {
                return;
            }
        }
    }

    /// Waits for lines, then for the batch window to close (or a full batch, or a flush request),
    /// and takes up to one request's worth off the queue.
    fn take_batch(&mut self) -> Batch {
        let t = self.tuning;
        let mut st = self.shared.lock();
        loop {
            let Some(oldest) = st.queue.front().map(|e| e.queued) else {
                st.flush_requested = false;
                st = self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let due = oldest + t.window;
            let now = Instant::now();
            if st.queue.len() >= t.max_entries || st.flush_requested || now >= due {
                break;
            }
            st = self
                .shared
                .wake
                .wait_timeout(st, due - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut batch = Batch::default();
        // `{"log_source_id":"<36>","logs":[]}` plus the notice's room.
        let mut body_len = 64 + LOG_SOURCE_ID.len() + BUDGET_NOTICE.len() + 128;
        while let Some(e) = st.queue.front() {
            if batch.entries.len() >= t.max_entries {
                break;
            }
            if self.budget_used + e.output.len() > t.budget {
                let rest = st.queue.len();
                st.queue.clear();
                st.accepting = false;
                st.settled += rest as u64;
                batch.last = true;
                break;
            }
            let json = entry_json(e.created_at, e.level, &e.output);
            if !batch.entries.is_empty() && body_len + json.len() + 1 > t.max_body {
                break;
            }
            body_len += json.len() + 1;
            self.budget_used += e.output.len();
            batch.entries.push(json);
            batch.counted += 1;
            st.queue.pop_front();
        }
        drop(st);
        if batch.last {
            log::warn!(
                "coder log: {} KiB of start-up output sent to Coder, the limit; the rest stays in the pod's log only",
                self.budget_used >> 10
            );
            batch
                .entries
                .push(entry_json(SystemTime::now(), "info", BUDGET_NOTICE));
        }
        batch
    }

    fn register(&mut self, batch: &Batch) -> Next {
        let reply = self.call(|api| api.register(&log_source_body()));
        match reply {
            Reply::Ok | Reply::Status(409, _) => {
                self.source_id = Some(LOG_SOURCE_ID);
                Next::Continue
            }
            // A Coder from before log sources: its "External" source takes the nil id.
            Reply::Status(404 | 405, _) => {
                log::info!(
                    "coder log: no log-source endpoint ({reply}); sending under the default source"
                );
                self.source_id = Some(NIL_SOURCE_ID);
                Next::Continue
            }
            Reply::Status(401 | 403, _) => self.rejected(&reply, batch.counted),
            Reply::Untrusted(_) => self.untrusted(&reply, batch.counted),
            _ => self.failed("register the log source", &reply, batch.counted),
        }
    }

    fn send(&mut self, source_id: &str, batch: &mut Batch) -> Next {
        let body = logs_body(source_id, &batch.entries);
        let reply = self.call(|api| api.patch_logs(&body));
        match reply {
            Reply::Ok => {
                self.succeeded(batch.counted);
                let last = batch.last;
                *batch = Batch::default();
                if last {
                    self.shared.stop(0);
                    return Next::Stop;
                }
                Next::Continue
            }
            Reply::Status(401 | 403, _) => self.rejected(&reply, batch.counted),
            Reply::Status(413, _) => {
                log::warn!("coder log: Coder's start-up log limit is reached ({reply}); no more lines are sent");
                self.shared.stop(batch.counted);
                Next::Stop
            }
            // The server refuses this batch as such: retrying it cannot help, but later ones may pass.
            Reply::Status(400 | 422, _) => {
                log::warn!(
                    "coder log: Coder refused {} log entries ({reply}); they are skipped",
                    batch.entries.len()
                );
                let last = batch.last;
                self.settle(batch.counted);
                *batch = Batch::default();
                if last {
                    self.shared.stop(0);
                    return Next::Stop;
                }
                self.failed("send start-up lines", &reply, 0)
            }
            Reply::Untrusted(_) => self.untrusted(&reply, batch.counted),
            _ => self.failed("send start-up lines", &reply, batch.counted),
        }
    }

    fn untrusted(&mut self, reply: &Reply, in_flight: usize) -> Next {
        log::warn!(
            "coder log: Coder's TLS certificate is not trusted ({reply}); start-up lines are not sent to \
             the Coder dashboard (add its CA to CODER_EXTRA_CERTS_PATH)"
        );
        self.shared.stop(in_flight);
        Next::Stop
    }

    /// Makes one request, showing `flush` that it is in flight.
    fn call(&mut self, f: impl FnOnce(&mut dyn Api) -> Reply) -> Reply {
        self.shared.lock().in_flight_since = Some(Instant::now());
        // A waiting `flush` re-arms its timer on the new request.
        self.shared.progress.notify_all();
        let reply = f(self.api.as_mut());
        self.shared.lock().in_flight_since = None;
        reply
    }

    fn succeeded(&mut self, counted: usize) {
        self.failures = 0;
        self.shared.lock().failing = false;
        self.settle(counted);
    }

    fn settle(&self, counted: usize) {
        self.shared.lock().settled += counted as u64;
        self.shared.progress.notify_all();
    }

    fn rejected(&mut self, reply: &Reply, in_flight: usize) -> Next {
        log::warn!(
            "coder log: Coder rejected the agent token ({reply}); start-up lines are not sent to the Coder dashboard"
        );
        self.shared.stop(in_flight);
        Next::Stop
    }

    /// Counts a failed attempt; pauses before the next one (without holding the queue), or gives
    /// up after `max_failures` in a row. The batch is kept for the retry.
    fn failed(&mut self, what: &str, reply: &Reply, in_flight: usize) -> Next {
        self.failures += 1;
        if self.failures >= self.tuning.max_failures {
            log::warn!(
                "coder log: giving up after {} failed attempts to {what} (last: {reply}); start-up lines stay in the pod's log only",
                self.failures
            );
            self.shared.stop(in_flight);
            return Next::Stop;
        }
        log::debug!(
            "coder log: cannot {what} (attempt {}): {reply}",
            self.failures
        );
        self.shared.lock().failing = true;
        self.shared.progress.notify_all();
        std::thread::sleep(self.tuning.pause_after(self.failures));
        Next::Continue
    }
}

#[derive(Serialize)]
struct LogSourceRequest<'a> {
    id: &'a str,
    display_name: &'a str,
    icon: &'a str,
}

#[derive(Serialize)]
struct LogEntry<'a> {
    created_at: String,
    output: &'a str,
    level: &'a str,
}

fn log_source_body() -> String {
    serde_json::to_string(&LogSourceRequest {
        id: LOG_SOURCE_ID,
        display_name: LOG_SOURCE_NAME,
        icon: LOG_SOURCE_ICON,
    })
    .expect("plain strings serialize")
}

fn entry_json(created_at: SystemTime, level: &str, output: &str) -> String {
    serde_json::to_string(&LogEntry {
        created_at: rfc3339(created_at),
        output,
        level,
    })
    .expect("plain strings serialize")
}

/// `{"log_source_id":…,"logs":[…]}` from already serialized entries.
fn logs_body(source_id: &str, entries: &[String]) -> String {
    let id = serde_json::to_string(source_id).expect("a string serializes");
    let mut body =
        String::with_capacity(40 + id.len() + entries.iter().map(|e| e.len() + 1).sum::<usize>());
    body.push_str("{\"log_source_id\":");
    body.push_str(&id);
    body.push_str(",\"logs\":[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(e);
    }
    body.push_str("]}");
    body
}

/// Cuts `s` into pieces of at most `max` bytes, never inside a UTF-8 character. An empty line is
/// one empty piece.
fn split_output(s: &str, max: usize) -> Vec<&str> {
    let max = max.max(4); // room for any one character
    let mut parts = Vec::with_capacity(s.len() / max + 1);
    let mut rest = s;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        parts.push(head);
        rest = tail;
    }
    parts.push(rest);
    parts
}

/// The Coder REST API over ureq, with the registry's TLS trust and hard timeouts.
struct HttpApi {
    agent: ureq::Agent,
    base: String,
    token: Secret,
}

impl HttpApi {
    fn new(url: &str, token: &Secret, roots: &TlsRoots, t: &Tuning) -> HttpApi {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_resolve(Some(t.connect_timeout))
            .timeout_connect(Some(t.connect_timeout))
            .timeout_global(Some(t.request_timeout))
            .user_agent(concat!("envbox/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpApi {
            agent: ureq_agent(config, roots.rustls_config()),
            base: url.trim_end_matches('/').to_string(),
            token: token.clone(),
        }
    }

    fn call(&self, patch: bool, path: &str, body: &str) -> Reply {
        let url = format!("{}{path}", self.base);
        let res = if patch {
            self.agent
                .patch(&url)
                .header(TOKEN_HEADER, self.token.expose())
                .header("Accept", "application/json")
                .content_type("application/json")
                .send(body)
        } else {
            self.agent
                .post(&url)
                .header(TOKEN_HEADER, self.token.expose())
                .header("Accept", "application/json")
                .content_type("application/json")
                .send(body)
        };
        let reply = match res {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                // Reading the (small) body lets ureq re-use the connection.
                let text = resp
                    .body_mut()
                    .with_config()
                    .limit(64 << 10)
                    .read_to_string()
                    .unwrap_or_default();
                if (200..300).contains(&status) {
                    Reply::Ok
                } else {
                    Reply::Status(status, error_message(&text))
                }
            }
            Err(e) => match untrusted_certificate(&e) {
                Some(why) => Reply::Untrusted(why),
                None => Reply::Failed(e.to_string()),
            },
        };
        self.redact(reply)
    }

    /// Belt and braces: whatever a server or an error echoes, the token is not logged.
    fn redact(&self, reply: Reply) -> Reply {
        let tok = self.token.expose();
        if tok.is_empty() {
            return reply;
        }
        match reply {
            Reply::Status(c, m) => Reply::Status(c, m.replace(tok, "<redacted>")),
            Reply::Failed(m) => Reply::Failed(m.replace(tok, "<redacted>")),
            Reply::Untrusted(m) => Reply::Untrusted(m.replace(tok, "<redacted>")),
            r => r,
        }
    }
}

/// Why Coder's certificate was refused, when that is the error: rustls reports it either directly
/// or inside the I/O error of the TLS stream.
fn untrusted_certificate(e: &ureq::Error) -> Option<String> {
    let tls = match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match tls {
        Some(rustls::Error::InvalidCertificate(c)) => Some(format!("{c:?}")),
        _ => None,
    }
}

impl Api for HttpApi {
    fn register(&mut self, body: &str) -> Reply {
        self.call(false, LOG_SOURCE_PATH, body)
    }

    fn patch_logs(&mut self, body: &str) -> Reply {
        self.call(true, LOGS_PATH, body)
    }
}

/// Coder's error `message` (and `detail`), shortened; the raw text when it is not Coder's JSON.
fn error_message(text: &str) -> String {
    #[derive(serde::Deserialize)]
    struct CoderError {
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: String,
    }
    let msg = match serde_json::from_str::<CoderError>(text) {
        Ok(e) if e.detail.is_empty() => e.message,
        Ok(e) => format!("{} ({})", e.message, e.detail),
        Err(_) => text.trim().to_string(),
    };
    let mut cut = msg.len().min(200);
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    msg[..cut].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fast() -> Tuning {
        Tuning {
            window: Duration::from_millis(30),
            backoff: Duration::from_millis(40),
            flush_deadline: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_millis(800),
            ..Tuning::default()
        }
    }

    #[derive(Debug, Clone)]
    struct Call {
        register: bool,
        body: Value,
        at: Instant,
    }

    /// Replies from a script (the last reply repeats), records every call.
    #[derive(Clone)]
    struct FakeApi {
        calls: Arc<Mutex<Vec<Call>>>,
        register_replies: Arc<Mutex<VecDeque<Reply>>>,
        patch_replies: Arc<Mutex<VecDeque<Reply>>>,
        delay: Duration,
    }

    impl FakeApi {
        fn new(register: Vec<Reply>, patch: Vec<Reply>) -> FakeApi {
            FakeApi {
                calls: Arc::default(),
                register_replies: Arc::new(Mutex::new(register.into())),
                patch_replies: Arc::new(Mutex::new(patch.into())),
                delay: Duration::ZERO,
            }
        }
        fn ok() -> FakeApi {
            Self::new(vec![Reply::Ok], vec![Reply::Ok])
        }
        fn next(q: &Mutex<VecDeque<Reply>>) -> Reply {
            let mut q = q.lock().unwrap();
            if q.len() > 1 {
                q.pop_front().unwrap()
            } else {
                q.front().cloned().unwrap_or(Reply::Ok)
            }
        }
        fn record(&self, register: bool, body: &str) {
            std::thread::sleep(self.delay);
            self.calls.lock().unwrap().push(Call {
                register,
                body: serde_json::from_str(body).expect("request body is JSON"),
                at: Instant::now(),
            });
        }
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
        fn patches(&self) -> Vec<Value> {
            self.calls()
                .into_iter()
                .filter(|c| !c.register)
                .map(|c| c.body)
                .collect()
        }
        fn outputs(&self) -> Vec<String> {
            self.patches()
                .iter()
                .flat_map(|b| b["logs"].as_array().unwrap().clone())
                .map(|l| l["output"].as_str().unwrap().to_string())
                .collect()
        }
    }

    impl Api for FakeApi {
        fn register(&mut self, body: &str) -> Reply {
            self.record(true, body);
            Self::next(&self.register_replies)
        }
        fn patch_logs(&mut self, body: &str) -> Reply {
            self.record(false, body);
            Self::next(&self.patch_replies)
        }
    }

    fn info(log: &CoderLog, s: &str) {
        log.send(SystemTime::now(), LineKind::Info, s);
    }

    fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn split_respects_utf8_and_limit() {
        assert_eq!(split_output("", 1024), vec![""]);
        assert_eq!(split_output("abc", 1024), vec!["abc"]);
        let long = "x".repeat(2500);
        let parts = split_output(&long, 1024);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1024, 1024, 452]
        );
        // 'é' is 2 bytes, '€' 3, '😀' 4: no piece may cut one, and none exceeds the limit.
        let mixed = "é€😀a".repeat(300);
        let parts = split_output(&mixed, 1024);
        assert!(parts.iter().all(|p| p.len() <= 1024 && !p.is_empty()));
        assert_eq!(parts.concat(), mixed);
        assert!(parts.len() >= 3);
    }

    #[test]
    fn json_shapes_match_the_coder_api() {
        let src: Value = serde_json::from_str(&log_source_body()).unwrap();
        assert_eq!(
            src,
            serde_json::json!({"id": LOG_SOURCE_ID, "display_name": "envbox", "icon": LOG_SOURCE_ICON})
        );
        let t = std::time::UNIX_EPOCH + Duration::new(1_727_303_723, 630_000_000);
        let entries = vec![
            entry_json(t, "info", "Pulling \"x\"\n\ttab"),
            entry_json(t, "error", "boom"),
        ];
        let body: Value = serde_json::from_str(&logs_body(LOG_SOURCE_ID, &entries)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "log_source_id": LOG_SOURCE_ID,
                "logs": [
                    {"created_at": "2024-09-25T22:35:23.63Z", "output": "Pulling \"x\"\n\ttab", "level": "info"},
                    {"created_at": "2024-09-25T22:35:23.63Z", "output": "boom", "level": "error"},
                ]
            })
        );
        assert_eq!(
            logs_body(NIL_SOURCE_ID, &[]),
            format!("{{\"log_source_id\":\"{NIL_SOURCE_ID}\",\"logs\":[]}}")
        );
    }

    #[test]
    fn registers_once_then_sends_lines_in_order() {
        let api = FakeApi::ok();
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "one");
        log.send(SystemTime::now(), LineKind::Error, "two");
        log.send(SystemTime::now(), LineKind::Done, "");
        info(&log, &"z".repeat(2100));
        log.flush();
        info(&log, "after flush");
        log.flush();
        let calls = api.calls();
        assert!(calls[0].register);
        assert_eq!(calls.iter().filter(|c| c.register).count(), 1);
        let outs = api.outputs();
        assert_eq!(outs.len(), 6, "{outs:?}");
        assert_eq!(&outs[..2], ["one", "two"]);
        assert_eq!(outs[2..5].concat(), "z".repeat(2100));
        assert_eq!(outs[5], "after flush");
        let levels: Vec<Value> = api.patches()[0]["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["level"].clone())
            .collect();
        assert_eq!(levels[..2], ["info", "error"]);
        assert!(api
            .patches()
            .iter()
            .all(|p| p["log_source_id"] == LOG_SOURCE_ID));
    }

    #[test]
    fn batches_at_most_50_entries_and_waits_the_window() {
        let api = FakeApi::ok();
        let tuning = Tuning {
            window: Duration::from_millis(200),
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        let t0 = Instant::now();
        for i in 0..120 {
            info(&log, &format!("line {i}"));
        }
        wait_until("120 lines", 5, || api.outputs().len() == 120);
        let sizes: Vec<usize> = api
            .patches()
            .iter()
            .map(|p| p["logs"].as_array().unwrap().len())
            .collect();
        assert!(sizes.iter().all(|&n| n <= 50), "{sizes:?}");
        assert_eq!(sizes[..2], [50, 50], "full batches go at once");
        let outs = api.outputs();
        assert!(outs
            .iter()
            .enumerate()
            .all(|(i, o)| *o == format!("line {i}")));
        // The 20 left over wait for the window (measured from the oldest queued line).
        let last = api.calls().last().unwrap().at;
        assert!(last - t0 >= Duration::from_millis(190), "{:?}", last - t0);

        // A single line alone goes after the window, not sooner.
        let n = api.patches().len();
        let t1 = Instant::now();
        info(&log, "lonely");
        wait_until("lonely line", 5, || api.patches().len() == n + 1);
        assert!(api.calls().last().unwrap().at - t1 >= Duration::from_millis(190));
    }

    #[test]
    fn flush_sends_without_waiting_for_the_window() {
        let api = FakeApi::ok();
        let tuning = Tuning {
            window: Duration::from_secs(30),
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        info(&log, "a");
        let t = Instant::now();
        log.flush();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(api.outputs(), ["a"]);
    }

    #[test]
    fn body_size_limit_splits_batches() {
        let api = FakeApi::ok();
        let tuning = Tuning {
            max_body: 3000,
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        for _ in 0..10 {
            info(&log, &"y".repeat(1000));
        }
        log.flush();
        assert_eq!(api.outputs().len(), 10);
        for call in api.calls().iter().filter(|c| !c.register) {
            assert!(call.body.to_string().len() <= 3000);
        }
    }

    #[test]
    fn budget_stops_sending_with_one_notice() {
        let api = FakeApi::ok();
        let tuning = Tuning {
            budget: 5000,
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        for i in 0..10 {
            info(&log, &format!("{i}{}", "b".repeat(999)));
        }
        log.flush();
        let outs = api.outputs();
        assert_eq!(outs.len(), 6, "five lines fit, then the notice");
        assert_eq!(outs[5], BUDGET_NOTICE);
        let sent: usize = outs[..5].iter().map(String::len).sum();
        assert!(sent <= 5000);
        let n = api.calls().len();
        info(&log, "later");
        log.flush();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            api.calls().len(),
            n,
            "nothing is sent once the budget is used"
        );
    }

    #[test]
    fn untrusted_certificate_stops_at_once_without_retries() {
        let api = FakeApi::new(vec![Reply::Untrusted("UnknownIssuer".into())], vec![]);
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a");
        let t = Instant::now();
        log.flush();
        assert!(t.elapsed() < Duration::from_secs(1));
        info(&log, "b");
        log.flush();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(api.calls().len(), 1, "no retries: {:?}", api.calls());
        assert!(!log.shared.lock().accepting);
    }

    #[test]
    fn rejected_token_stops_at_once() {
        let api = FakeApi::new(vec![Reply::Status(401, "bad token".into())], vec![]);
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a");
        let t = Instant::now();
        log.flush();
        assert!(t.elapsed() < Duration::from_secs(1));
        for _ in 0..5 {
            info(&log, "b");
        }
        log.flush();
        std::thread::sleep(Duration::from_millis(100));
        let calls = api.calls();
        assert_eq!(
            calls.len(),
            1,
            "one registration attempt, no retries: {calls:?}"
        );
        assert!(!log.shared.lock().accepting);
    }

    #[test]
    fn rejected_patch_stops_too() {
        let api = FakeApi::new(vec![Reply::Ok], vec![Reply::Status(403, String::new())]);
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a");
        log.flush();
        info(&log, "b");
        log.flush();
        assert_eq!(api.calls().len(), 2);
    }

    #[test]
    fn gives_up_after_max_failures_with_backoff() {
        let api = FakeApi::new(vec![Reply::Failed("connection refused".into())], vec![]);
        let tuning = fast();
        let log = start_with(Box::new(api.clone()), tuning);
        info(&log, "a");
        // A failing server does not hold flush.
        let t = Instant::now();
        log.flush();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        wait_until("give up", 5, || log.shared.lock().dead);
        let calls = api.calls();
        assert_eq!(calls.len(), MAX_FAILURES as usize);
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
        assert!(gaps[0] >= tuning.window);
        assert!(gaps[1] >= tuning.backoff, "{gaps:?}");
        assert!(gaps[2] >= tuning.backoff * 2, "{gaps:?}");
        info(&log, "b");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(api.calls().len(), calls.len());
    }

    #[test]
    fn transient_failures_retry_the_same_batch_in_order() {
        let api = FakeApi::new(
            vec![Reply::Failed("timeout".into()), Reply::Ok],
            vec![Reply::Status(503, "busy".into()), Reply::Ok],
        );
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a");
        info(&log, "b");
        wait_until("two lines", 5, || api.outputs().len() >= 4);
        std::thread::sleep(Duration::from_millis(100));
        // The failed PATCH is recorded too: the same batch twice, then nothing else.
        assert_eq!(api.outputs(), ["a", "b", "a", "b"]);
        info(&log, "c");
        log.flush();
        assert_eq!(api.outputs().last().unwrap(), "c");
        assert_eq!(api.calls().iter().filter(|c| c.register).count(), 2);
    }

    #[test]
    fn bad_request_skips_the_batch_and_413_stops() {
        let api = FakeApi::new(
            vec![Reply::Ok],
            vec![
                Reply::Status(400, "bad".into()),
                Reply::Ok,
                Reply::Status(413, "limit".into()),
            ],
        );
        let log = start_with(Box::new(api.clone()), fast());
        for (i, line) in ["a", "b", "c"].into_iter().enumerate() {
            info(&log, line);
            wait_until("a PATCH", 5, || api.patches().len() == i + 1);
        }
        info(&log, "d");
        log.flush();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(api.outputs(), ["a", "b", "c"]);
        assert!(log.shared.lock().dead);
    }

    #[test]
    fn old_coder_without_log_sources_gets_the_nil_source() {
        let api = FakeApi::new(vec![Reply::Status(404, String::new())], vec![Reply::Ok]);
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a");
        log.flush();
        assert_eq!(api.patches()[0]["log_source_id"], NIL_SOURCE_ID);
    }

    #[test]
    fn a_full_queue_drops_instead_of_blocking() {
        let mut api = FakeApi::ok();
        api.delay = Duration::from_millis(300);
        let tuning = Tuning {
            queue_capacity: 10,
            flush_deadline: Duration::from_millis(200),
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        let t = Instant::now();
        for i in 0..1000 {
            info(&log, &format!("{i}"));
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        assert!(log.shared.lock().dropped >= 990 - 50);
        // flush is bounded even though the server is slow.
        let t = Instant::now();
        log.flush();
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn flush_does_not_wait_on_a_stalled_request() {
        let mut api = FakeApi::ok();
        api.delay = Duration::from_secs(3);
        let tuning = Tuning {
            slow_request: Duration::from_millis(200),
            ..fast()
        };
        let log = start_with(Box::new(api.clone()), tuning);
        info(&log, "a");
        // The registration has been in flight for longer than `slow_request`: no wait at all.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        log.flush();
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        // A fresh request gets at most `slow_request`, not the whole flush deadline.
        let log = start_with(Box::new(api.clone()), tuning);
        info(&log, "b");
        let t = Instant::now();
        log.flush();
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < Duration::from_millis(600), "{waited:?}");
    }

    #[test]
    fn nul_bytes_are_removed() {
        let api = FakeApi::ok();
        let log = start_with(Box::new(api.clone()), fast());
        info(&log, "a\0b");
        log.flush();
        assert_eq!(api.outputs(), ["ab"]);
    }

    #[test]
    fn error_messages_are_short_and_coders() {
        assert_eq!(
            error_message(r#"{"message":"Invalid session token.","detail":"expired"}"#),
            "Invalid session token. (expired)"
        );
        assert_eq!(error_message("  plain\n"), "plain");
        assert_eq!(error_message(&"é".repeat(300)).len(), 200);
    }

    // ---- loopback HTTP server: the real ureq path, no TLS ----

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Mode {
        Ok,
        Unauthorized,
        Hang,
    }

    #[derive(Debug, Clone)]
    struct Req {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Req {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    struct Server {
        url: String,
        reqs: Arc<Mutex<Vec<Req>>>,
        conns: Arc<AtomicUsize>,
    }

    fn serve(mode: Mode) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let reqs: Arc<Mutex<Vec<Req>>> = Arc::default();
        let conns = Arc::new(AtomicUsize::new(0));
        let (r, c) = (reqs.clone(), conns.clone());
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(stream) = stream else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || handle(stream, mode, &r));
            }
        });
        Server { url, reqs, conns }
    }

    fn handle(stream: TcpStream, mode: Mode, reqs: &Mutex<Vec<Req>>) {
        if mode == Mode::Hang {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let mut w = stream.try_clone().unwrap();
        let mut rd = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut it = line.split_whitespace();
            let (method, path) = (
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            );
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                rd.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; len];
            rd.read_exact(&mut body).unwrap();
            let req = Req {
                method,
                path,
                headers,
                body: String::from_utf8(body).unwrap(),
            };
            let (status, text) = match mode {
                Mode::Unauthorized => (
                    "401 Unauthorized",
                    r#"{"message":"Workspace agent not authorized."}"#,
                ),
                _ if req.method == "POST" => ("201 Created", "{}"),
                _ => ("200 OK", "{}"),
            };
            reqs.lock().unwrap().push(req);
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if w.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn no_roots() -> TlsRoots {
        TlsRoots::load_from(std::path::Path::new("/nonexistent/ca.crt"), None).unwrap()
    }

    fn start_http(url: &str, tuning: Tuning) -> CoderLog {
        let token = Secret::new("tok-LOOPBACK-42");
        start_with(
            Box::new(HttpApi::new(url, &token, &no_roots(), &tuning)),
            tuning,
        )
    }

    #[test]
    fn loopback_ok_registers_and_patches() {
        let srv = serve(Mode::Ok);
        let log = start_http(&format!("{}/", srv.url), Tuning::default());
        info(&log, "Pulling image");
        log.send(SystemTime::now(), LineKind::Error, "oops");
        let t = Instant::now();
        log.flush();
        assert!(t.elapsed() < FLUSH_DEADLINE);
        let reqs = srv.reqs.lock().unwrap().clone();
        assert_eq!(reqs.len(), 2, "{reqs:?}");
        assert_eq!(
            (reqs[0].method.as_str(), reqs[0].path.as_str()),
            ("POST", LOG_SOURCE_PATH)
        );
        assert_eq!(
            (reqs[1].method.as_str(), reqs[1].path.as_str()),
            ("PATCH", LOGS_PATH)
        );
        for r in &reqs {
            assert_eq!(r.header(TOKEN_HEADER), Some("tok-LOOPBACK-42"));
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
        let body: Value = serde_json::from_str(&reqs[1].body).unwrap();
        assert_eq!(body["log_source_id"], LOG_SOURCE_ID);
        assert_eq!(body["logs"][0]["output"], "Pulling image");
        assert_eq!(body["logs"][1]["level"], "error");
        // The connection is kept alive between requests.
        info(&log, "more");
        log.flush();
        assert_eq!(srv.reqs.lock().unwrap().len(), 3);
        assert_eq!(srv.conns.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn loopback_401_costs_nothing() {
        let srv = serve(Mode::Unauthorized);
        let log = start_http(&srv.url, Tuning::default());
        let t = Instant::now();
        for i in 0..100 {
            info(&log, &format!("line {i}"));
        }
        log.flush();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(srv.reqs.lock().unwrap().len(), 1);
        assert!(log.shared.lock().dead);
    }

    #[test]
    fn loopback_hanging_server_is_bounded() {
        let srv = serve(Mode::Hang);
        let tuning = Tuning {
            flush_deadline: Duration::from_millis(300),
            ..fast()
        };
        let log = start_http(&srv.url, tuning);
        let t = Instant::now();
        info(&log, "a");
        assert!(t.elapsed() < Duration::from_millis(50));
        log.flush();
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        // Each attempt ends at the request timeout; then the sender gives up.
        wait_until("give up on a hanging server", 10, || log.shared.lock().dead);
        assert_eq!(srv.conns.load(Ordering::SeqCst), MAX_FAILURES as usize);
    }

    #[test]
    fn loopback_refused_gives_up_quickly() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let log = start_http(&format!("http://{addr}"), fast());
        info(&log, "a");
        let t = Instant::now();
        log.flush();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        wait_until("give up on a refusing server", 5, || log.shared.lock().dead);
    }

    /// TLS end to end against tests/lib/fake_coder.py with a self-signed certificate trusted via
    /// `TlsRoots` (as CODER_EXTRA_CERTS_PATH does). Needs python3 and openssl:
    /// `cargo test coderlog -- --ignored`.
    #[test]
    #[ignore]
    fn tls_against_fake_coder() {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (record, ready) = (dir.path().join("rec.jsonl"), dir.path().join("ready"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/lib/fake_coder.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token",
                "tok-TLS-7",
            ])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--record")
            .arg(&record)
            .arg("--ready")
            .arg(&ready)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("fake coder", 10, || ready.exists());
        let roots = TlsRoots::load_from(std::path::Path::new("/nonexistent"), Some(&cert)).unwrap();
        let log = start(
            &format!("https://127.0.0.1:{port}"),
            &Secret::new("tok-TLS-7"),
            &roots,
        );
        info(&log, "Pulling image");
        info(&log, &"€".repeat(1000));
        log.flush();
        let _ = child.kill();
        let _ = child.wait();
        let lines: Vec<Value> = std::fs::read_to_string(&record)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["method"], "POST");
        assert_eq!(lines[1]["body"]["logs"][0]["output"], "Pulling image");
        assert_eq!(lines[1]["body"]["logs"].as_array().unwrap().len(), 4);
    }
}

//! Draining children's output. Every pipe gets a reader thread for its whole life (a pipe left unread
//! blocks its writer: the Go envbox's "read 1 KiB and close" froze agents, envbox#99). Each line is
//! bounded, passed to a sink, and the last few are kept for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Longer lines are cut; a child printing megabytes without a newline must not grow our memory.
pub const MAX_LINE: usize = 4096;
const TAIL_LINES: usize = 20;

#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    pub fn push(&self, line: &str) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_string());
    }

    /// The last lines, joined for an error message.
    pub fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Reads `r` line by line until EOF on its own thread, giving each line (lossy UTF-8, cut at
/// `MAX_LINE`) to `sink` and remembering the last ones in `tail`.
pub fn drain<R, F>(name: &str, r: R, tail: Tail, mut sink: F) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    F: FnMut(&str) + Send + 'static,
{
    std::thread::Builder::new()
        .name(format!("drain-{name}"))
        .spawn(move || {
            let mut reader = BufReader::with_capacity(16 * 1024, r);
            let mut buf = Vec::with_capacity(1024);
            loop {
                buf.clear();
                match read_bounded_line(&mut reader, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']);
                        tail.push(line);
                        sink(line);
                    }
                    Err(_) => break,
                }
            }
        })
        .expect("spawning a thread")
}

/// Like `read_until(b'\n')`, but keeps at most `MAX_LINE` bytes and discards the rest of a long line.
fn read_bounded_line<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let (done, used) = {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                return Ok(total);
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let room = MAX_LINE.saturating_sub(out.len());
                    out.extend_from_slice(&avail[..i.min(room)]);
                    (true, i + 1)
                }
                None => {
                    let room = MAX_LINE.saturating_sub(out.len());
                    out.extend_from_slice(&avail[..avail.len().min(room)]);
                    (false, avail.len())
                }
            }
        };
        r.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_tail_is_kept() {
        let long = "x".repeat(MAX_LINE * 3);
        let input = format!("one\r\n{long}\nthree");
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let tail = Tail::default();
        drain(
            "t",
            std::io::Cursor::new(input.into_bytes()),
            tail.clone(),
            move |l| g.lock().unwrap().push(l.len()),
        )
        .join()
        .unwrap();
        assert_eq!(*got.lock().unwrap(), vec![3, MAX_LINE, 5]);
        assert!(tail.text().starts_with("one\n"));
        assert!(tail.text().ends_with("\nthree"));
    }
}

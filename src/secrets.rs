//! Secret values (agent token, pull secret, bootstrap script) and the scrubber every output goes through.
//!
//! `Secret` never prints its value. Values can still reach output indirectly (a child echoing its
//! environment, an error quoting a request), so each sink also replaces every registered secret.

use std::borrow::Cow;
use std::fmt;
use std::sync::RwLock;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(v: impl Into<String>) -> Self {
        Secret(v.into())
    }

    /// The only way to the value; grep for it to audit where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Shorter values would scrub ordinary words; such a secret is useless anyway.
const MIN_SCRUB_LEN: usize = 4;

pub fn register(secret: &Secret) {
    register_value(secret.expose());
}

/// Registers a value and, for multi-line secrets such as scripts, each of its long lines, since
/// output is scrubbed line by line.
pub fn register_value(v: &str) {
    let mut reg = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    let mut add = |s: &str| {
        let s = s.trim();
        if s.len() >= MIN_SCRUB_LEN && !reg.iter().any(|r| r == s) {
            reg.push(s.to_string());
        }
    };
    if v.contains('\n') {
        v.lines()
            .filter(|l| l.trim().len() >= 16)
            .for_each(&mut add);
    } else {
        add(v);
    }
    // Longest first, so a secret containing another is replaced whole.
    reg.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

pub fn scrub(text: &str) -> Cow<'_, str> {
    let reg = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
    if !reg.iter().any(|s| text.contains(s.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for s in reg.iter() {
        out = out.replace(s.as_str(), "<redacted>");
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("tok-123456");
        assert_eq!(format!("{s} {s:?}"), "<redacted> Secret(<redacted>)");
    }

    #[test]
    fn scrub_replaces_registered_values() {
        register(&Secret::new("scrub-me-token-42"));
        assert_eq!(scrub("token=scrub-me-token-42!"), "token=<redacted>!");
        assert!(matches!(scrub("nothing here"), Cow::Borrowed(_)));
    }
}

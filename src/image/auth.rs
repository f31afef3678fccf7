//! Registry credentials from `CODER_IMAGE_PULL_SECRET` and the docker config file.
//!
//! Semantics follow the Go envbox (envbox-behaviour.md §2.5) minus its bugs:
//! - keys are matched exactly after normalisation (scheme, trailing `/` and any path stripped, host
//!   lower-cased, Docker Hub aliases unified), so `https://registry.example.com` matches
//!   `registry.example.com` (envbox#102);
//! - credentials go only to the registry their key names: the one keyless fallback is an entry with
//!   the empty key (envbox#137), an explicit "any registry" entry, used with a warning; the only
//!   entry of a secret is *not* a fallback (whoever sets the image could collect it);
//! - the docker config file never silently overrides the pull secret: the source with a match wins, and
//!   when both match the pull secret wins;
//! - every decision is described in one sentence for the log; secrets never appear in messages.
//!
//! Order inside one source: `credHelpers[key]`, then an `auths` entry for the key, then `credsStore`,
//! then the empty-key entry.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

/// Name of the env var carrying the pull secret, used in messages.
pub const PULL_SECRET_ENV: &str = "CODER_IMAGE_PULL_SECRET";
/// The key Docker uses for Docker Hub; also what credential helpers are asked for.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Credentials to present to a registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    /// No credentials: anonymous token requests only.
    #[default]
    Anonymous,
    /// Username and password (or a personal access token as password).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (`identitytoken`), exchanged at the token endpoint.
    IdentityToken(String),
}

impl Credentials {
    /// Short description without secrets, e.g. `basic auth as "bob"`.
    pub fn kind(&self) -> String {
        match self {
            Credentials::Anonymous => "no credentials (anonymous)".into(),
            Credentials::Basic { username, .. } => format!("basic auth as {username:?}"),
            Credentials::IdentityToken(_) => "an identity token".into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// Where the chosen credentials came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    PullSecret,
    DockerConfig(PathBuf),
    None,
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone)]
pub struct Resolved {
    pub credentials: Credentials,
    pub source: Source,
    /// One human sentence: which source and key won and why. Never contains a secret.
    pub description: String,
    /// Things the operator should see at warn level (fallback used, unreadable config file …).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The pull secret is unusable. The message never contains the secret's text.
    #[error("{PULL_SECRET_ENV} is invalid: {0}")]
    InvalidPullSecret(String),
    #[error(
        "credential helper docker-credential-{helper} (configured in {source_name}) is not on PATH"
    )]
    HelperNotFound { helper: String, source_name: String },
    #[error("credential helper docker-credential-{helper} failed for {server}: {reason}")]
    HelperFailed {
        helper: String,
        server: String,
        reason: String,
    },
}

/// Runs `docker-credential-<helper> get`. A trait so that tests (and a PID 1 with a global reaper,
/// where `Command::output` would race `waitpid(-1)`) can supply their own.
pub trait HelperRunner {
    /// Returns `Ok(None)` when the helper says it has no credentials for `server`.
    fn get(&self, helper: &str, server: &str) -> Result<Option<Credentials>, AuthError>;
}

/// Executes `docker-credential-<name>` found on `path` (default: `$PATH`).
#[derive(Default, Clone)]
pub struct ExecHelper {
    pub path: Option<OsString>,
    /// When envbox is PID 1 its supervisor owns `waitpid`; helpers must be run through it.
    pub supervisor: Option<std::sync::Arc<crate::pid1::supervisor::Supervisor>>,
}

impl std::fmt::Debug for ExecHelper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecHelper")
            .field("path", &self.path)
            .finish()
    }
}

impl ExecHelper {
    fn find(&self, helper: &str) -> Option<PathBuf> {
        let path = self.path.clone().or_else(|| std::env::var_os("PATH"))?;
        let name = format!("docker-credential-{helper}");
        std::env::split_paths(&path)
            .map(|d| d.join(&name))
            .find(|p| crate::config::is_executable(p))
    }
}

struct HelperResult {
    success: bool,
    status: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

impl HelperRunner for ExecHelper {
    fn get(&self, helper: &str, server: &str) -> Result<Option<Credentials>, AuthError> {
        let failed = |reason: String| AuthError::HelperFailed {
            helper: helper.to_string(),
            server: server.to_string(),
            reason,
        };
        let bin = self.find(helper).ok_or_else(|| AuthError::HelperNotFound {
            helper: helper.to_string(),
            source_name: String::new(),
        })?;
        let out = match &self.supervisor {
            Some(sup) => {
                let o = sup
                    .output(
                        "credential helper",
                        Command::new(&bin).arg("get"),
                        server.as_bytes(),
                        std::time::Duration::from_secs(30),
                    )
                    .map_err(|e| failed(format!("cannot run {}: {e}", bin.display())))?;
                HelperResult {
                    success: o.exit.success(),
                    status: o.exit.to_string(),
                    stdout: o.stdout,
                    stderr: o.stderr,
                }
            }
            None => {
                let mut child = Command::new(&bin)
                    .arg("get")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| failed(format!("cannot run {}: {e}", bin.display())))?;
                if let Some(mut stdin) = child.stdin.take() {
                    // A helper that exits without reading stdin gives EPIPE; its exit status tells the story.
                    let _ = stdin.write_all(server.as_bytes());
                }
                let o = child
                    .wait_with_output()
                    .map_err(|e| failed(format!("waiting for it: {e}")))?;
                HelperResult {
                    success: o.status.success(),
                    status: o.status.to_string(),
                    stdout: o.stdout,
                    stderr: o.stderr,
                }
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.success {
            // The protocol reports "credentials not found in native keychain" on stdout.
            if stdout.contains("credentials not found") {
                return Ok(None);
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let msg: String = format!("{} {}", stdout.trim(), stderr.trim())
                .trim()
                .chars()
                .take(200)
                .collect();
            return Err(failed(format!("{} ({msg})", out.status)));
        }
        parse_helper_output(&out.stdout).map_err(failed)
    }
}

fn parse_helper_output(bytes: &[u8]) -> Result<Option<Credentials>, String> {
    let o: HelperOutput = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "unparsable output ({:?} at line {})",
            e.classify(),
            e.line()
        )
    })?;
    if o.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if o.username.is_empty() || o.username == "<token>" {
        Credentials::IdentityToken(o.secret)
    } else {
        Credentials::Basic {
            username: o.username,
            password: o.secret,
        }
    }))
}

/// Resolve credentials for `registry` (`ImageRef::registry`, e.g. `docker.io`, `ghcr.io`,
/// `host:5000`) from the pull secret and the docker config file (if it exists), running credential
/// helpers from `$PATH`.
pub fn resolve(
    registry: &str,
    pull_secret: Option<&str>,
    docker_config_path: &Path,
) -> Result<Resolved, AuthError> {
    resolve_with(
        registry,
        pull_secret,
        docker_config_path,
        &ExecHelper::default(),
    )
}

/// The checks [`resolve`] makes on a pull secret that do not depend on the registry, for the
/// configuration stage: a JSON object with usable credentials, and no `auths` entry whose `auth` (the
/// credential that entry would use) is not base64 of `user:password`. The reason never quotes the
/// secret; registry keys are named (they are host names, not secrets).
pub fn check_pull_secret(text: &str) -> Result<(), String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(());
    }
    let shape = "expected the JSON content of a .dockerconfigjson secret: \
                 {\"auths\":{\"<registry>\":{\"auth\":\"<base64 user:password>\"}}}";
    let cfg = parse_config(text).map_err(|why| format!("{why}; {shape}"))?;
    for (key, entry) in &cfg.auths {
        let set = |v: &Option<String>| matches!(v.as_deref(), Some(x) if !x.trim().is_empty());
        // The entry's own precedence: identitytoken, then username+password, then auth.
        let other_credentials =
            set(&entry.identitytoken) || (set(&entry.username) && set(&entry.password));
        let uses_auth = !other_credentials && set(&entry.auth);
        if uses_auth {
            if let Err(why) = entry_credentials(entry) {
                return Err(format!("auths entry {key:?}: {why}; {shape}"));
            }
        }
    }
    if !cfg.has_any_source() {
        return Err(format!(
            "it holds no credentials ({}); {shape}",
            cfg.describe_entries()
        ));
    }
    Ok(())
}

/// [`resolve`] with an explicit credential-helper runner.
pub fn resolve_with(
    registry: &str,
    pull_secret: Option<&str>,
    docker_config_path: &Path,
    helpers: &dyn HelperRunner,
) -> Result<Resolved, AuthError> {
    let mut warnings = Vec::new();
    let want = normalize_key(registry);
    let server = helper_server(&want);

    let secret = match pull_secret.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => {
            let cfg = parse_config(s).map_err(AuthError::InvalidPullSecret)?;
            if !cfg.has_any_source() {
                return Err(AuthError::InvalidPullSecret(format!(
                    "it contains no usable credentials (expected a .dockerconfigjson document like \
                     {{\"auths\":{{\"<registry>\":{{\"auth\":\"<base64 user:password>\"}}}}}}; {})",
                    cfg.describe_entries()
                )));
            }
            Some(cfg)
        }
    };

    let file_label = format!("docker config {}", docker_config_path.display());
    let file = match std::fs::read_to_string(docker_config_path) {
        Ok(text) => match parse_config(&text) {
            Ok(cfg) => Some(cfg),
            Err(reason) => {
                warnings.push(format!("ignoring {file_label}: {reason}"));
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            warnings.push(format!("ignoring {file_label}: {e}"));
            None
        }
    };

    let secret_match = match &secret {
        Some(cfg) => lookup(cfg, &want, &server, PULL_SECRET_ENV, helpers, &mut warnings)?,
        None => None,
    };
    let file_match = match &file {
        Some(cfg) => lookup(cfg, &want, &server, &file_label, helpers, &mut warnings)?,
        None => None,
    };

    let (chosen, source, label, other) = match (secret_match, file_match) {
        (Some(s), Some(f)) if s.exact || !f.exact => {
            let why = if s.exact && f.exact {
                format!(
                    "; {file_label} also has {} but the pull secret takes precedence because the \
                     template sets it explicitly",
                    f.what
                )
            } else {
                format!(
                    "; {file_label} only offers a fallback entry ({}), the pull secret is preferred",
                    f.what
                )
            };
            (s, Source::PullSecret, PULL_SECRET_ENV.to_string(), why)
        }
        (Some(s), Some(f)) => {
            let why = format!(
                "; it matches {want:?} exactly while {PULL_SECRET_ENV} only offers a fallback entry ({})",
                s.what
            );
            (
                f,
                Source::DockerConfig(docker_config_path.into()),
                file_label.clone(),
                why,
            )
        }
        (Some(s), None) => {
            let why = if file.is_some() {
                format!("; {file_label} has no entry for it")
            } else {
                String::new()
            };
            (s, Source::PullSecret, PULL_SECRET_ENV.to_string(), why)
        }
        (None, Some(f)) => {
            let why = if secret.is_some() {
                format!("; {PULL_SECRET_ENV} has no entry for it")
            } else {
                String::new()
            };
            (
                f,
                Source::DockerConfig(docker_config_path.into()),
                file_label.clone(),
                why,
            )
        }
        (None, None) => {
            let mut why = Vec::new();
            if let Some(cfg) = &secret {
                why.push(format!(
                    "{PULL_SECRET_ENV} has no entry for it ({})",
                    cfg.describe_entries()
                ));
            }
            if let Some(cfg) = &file {
                why.push(format!(
                    "{file_label} has no entry for it ({})",
                    cfg.describe_entries()
                ));
            }
            if secret.is_none() && file.is_none() {
                why.push(format!(
                    "{PULL_SECRET_ENV} is not set and {} does not exist",
                    docker_config_path.display()
                ));
            }
            let description = format!(
                "pulling from registry {want:?} anonymously: {}",
                why.join("; ")
            );
            return Ok(Resolved {
                credentials: Credentials::Anonymous,
                source: Source::None,
                description,
                warnings,
            });
        }
    };
    let description = format!(
        "using {} for registry {want:?} from {label} ({}){other}",
        chosen.creds.kind(),
        chosen.what
    );
    Ok(Resolved {
        credentials: chosen.creds,
        source,
        description,
        warnings,
    })
}

/// Registers with the output scrubber the pull secret and every credential inside it: passwords,
/// `auth` values (and what they decode to, and the `Authorization` header a username and password
/// make), identity and registry tokens. The whole JSON alone would not match any of them when a
/// single value shows up in a message.
pub fn register_pull_secret(secret: &crate::secrets::Secret) {
    crate::secrets::register(secret);
    for v in secret_values(secret.expose()) {
        crate::secrets::register_value(&v);
    }
}

fn secret_values(text: &str) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let Some(s) = v.as_str() else {
                        walk(v, out);
                        continue;
                    };
                    match k.to_ascii_lowercase().as_str() {
                        "password" | "identitytoken" | "registrytoken" | "token"
                        | "access_token" | "secret" => out.push(s.to_string()),
                        "auth" => {
                            out.push(s.to_string());
                            let b64 = base64::engine::general_purpose::STANDARD;
                            if let Ok(Ok(text)) = b64.decode(s.trim()).map(String::from_utf8) {
                                if let Some((_, pass)) = text.split_once(':') {
                                    out.push(pass.trim_end_matches('\0').to_string());
                                }
                                out.push(text);
                            }
                        }
                        _ => {}
                    }
                }
                if let (Some(u), Some(p)) = (
                    m.get("username").and_then(|v| v.as_str()),
                    m.get("password").and_then(|v| v.as_str()),
                ) {
                    out.push(base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        walk(&v, &mut out);
    }
    out
}

/// Normalise a registry or config key: strip scheme, path and trailing `/`, lower-case the host,
/// map Docker Hub aliases to `docker.io`.
pub fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The server URL credential helpers are asked about (Docker's convention).
fn helper_server(normalized: &str) -> String {
    if normalized == "docker.io" {
        DOCKER_HUB_KEY.to_string()
    } else {
        normalized.to_string()
    }
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

#[derive(Default)]
struct DockerConfig {
    auths: BTreeMap<String, AuthEntry>,
    cred_helpers: BTreeMap<String, String>,
    creds_store: Option<String>,
    legacy: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: Option<BTreeMap<String, AuthEntry>>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

/// Parse a `config.json` / `.dockerconfigjson` document, or the legacy `.dockercfg` shape (a
/// top-level map of registry keys). Error messages never quote the input.
fn parse_config(text: &str) -> Result<DockerConfig, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "not valid JSON (syntax error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_string())?;
    let shape_err = |what: &str, e: serde_json::Error| {
        format!("{what} has an unexpected shape ({:?} error)", e.classify())
    };
    let modern = ["auths", "credHelpers", "credsStore"]
        .iter()
        .any(|k| obj.contains_key(*k));
    if modern {
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|e| shape_err("the document", e))?;
        Ok(DockerConfig {
            auths: raw.auths.unwrap_or_default(),
            cred_helpers: raw.cred_helpers.unwrap_or_default(),
            creds_store: raw.creds_store.filter(|s| !s.is_empty()),
            legacy: false,
        })
    } else {
        let auths: BTreeMap<String, AuthEntry> = serde_json::from_value(value)
            .map_err(|e| shape_err("the legacy .dockercfg document", e))?;
        Ok(DockerConfig {
            auths,
            legacy: true,
            ..Default::default()
        })
    }
}

impl DockerConfig {
    fn has_any_source(&self) -> bool {
        self.auths.values().any(|e| entry_credentials(e).is_ok())
            || !self.cred_helpers.is_empty()
            || self.creds_store.is_some()
    }

    fn describe_entries(&self) -> String {
        let shape = if self.legacy {
            " (legacy .dockercfg shape)"
        } else {
            ""
        };
        if self.auths.is_empty() {
            format!("no auths entries{shape}")
        } else {
            let keys: Vec<String> = self.auths.keys().map(|k| format!("{k:?}")).collect();
            format!("auths entries for {}{shape}", keys.join(", "))
        }
    }
}

/// Credentials of one `auths` entry: identitytoken, then username+password, then base64 `auth`.
/// The error is a reason without secret material.
fn entry_credentials(e: &AuthEntry) -> Result<Credentials, &'static str> {
    if let Some(t) = e.identitytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Credentials::IdentityToken(t.to_string()));
    }
    if let (Some(u), Some(p)) = (e.username.as_deref(), e.password.as_deref()) {
        if !u.is_empty() && !p.is_empty() {
            return Ok(Credentials::Basic {
                username: u.to_string(),
                password: p.to_string(),
            });
        }
    }
    let Some(auth) = e.auth.as_deref().map(str::trim).filter(|a| !a.is_empty()) else {
        return Err("the entry has no credentials");
    };
    let cleaned: String = auth.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&cleaned))
        .map_err(|_| "its \"auth\" field is not valid base64")?;
    let text = String::from_utf8(bytes).map_err(|_| "its \"auth\" field is not UTF-8")?;
    let (user, pass) = text
        .split_once(':')
        .ok_or("its \"auth\" field does not decode to user:password")?;
    let pass = pass.trim_end_matches('\0');
    if user.is_empty() || pass.is_empty() {
        return Err("its \"auth\" field has an empty user or password");
    }
    Ok(Credentials::Basic {
        username: user.to_string(),
        password: pass.to_string(),
    })
}

struct Match {
    creds: Credentials,
    /// Matched the registry exactly (vs. a keyless fallback).
    exact: bool,
    /// e.g. `auths entry "https://ghcr.io"`; no secrets.
    what: String,
}

fn lookup(
    cfg: &DockerConfig,
    want: &str,
    server: &str,
    label: &str,
    helpers: &dyn HelperRunner,
    warnings: &mut Vec<String>,
) -> Result<Option<Match>, AuthError> {
    let with_source = |e: AuthError| match e {
        AuthError::HelperNotFound { helper, .. } => AuthError::HelperNotFound {
            helper,
            source_name: label.to_string(),
        },
        other => other,
    };
    // 1. credHelpers[key]
    if let Some((key, helper)) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_key(k) == want)
    {
        if let Some(creds) = helpers.get(helper, server).map_err(with_source)? {
            return Ok(Some(Match {
                creds,
                exact: true,
                what: format!("credHelpers entry {key:?} via docker-credential-{helper}"),
            }));
        }
        warnings.push(format!(
            "docker-credential-{helper} (credHelpers entry {key:?} in {label}) has no credentials for {server}"
        ));
    }
    // 2. auths entry whose key normalises to the registry
    for (key, entry) in cfg.auths.iter().filter(|(k, _)| normalize_key(k) == want) {
        match entry_credentials(entry) {
            Ok(creds) => {
                return Ok(Some(Match {
                    creds,
                    exact: true,
                    what: format!("auths entry {key:?}"),
                }))
            }
            Err(why) => warnings.push(format!("skipping auths entry {key:?} in {label}: {why}")),
        }
    }
    // 3. credsStore
    if let Some(store) = &cfg.creds_store {
        if let Some(creds) = helpers.get(store, server).map_err(with_source)? {
            return Ok(Some(Match {
                creds,
                exact: true,
                what: format!("credsStore docker-credential-{store}"),
            }));
        }
    }
    // 4. The empty key: an explicit "any registry" entry (envbox#137). Nothing else is ever
    //    offered to a registry its key does not name — not even the only entry: whoever sets
    //    the image reference picks the registry and could collect the credentials (Docker
    //    never does this either).
    if let Some(entry) = cfg.auths.get("") {
        if let Ok(creds) = entry_credentials(entry) {
            warnings.push(format!(
                "{label}: using its auths entry with the empty key for registry {want:?}; that \
                 entry is sent to any registry, name the registry in its key to restrict it"
            ));
            return Ok(Some(Match {
                creds,
                exact: false,
                what: "the auths entry with an empty key (any registry)".into(),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(u: &str, p: &str) -> Credentials {
        Credentials::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    struct FakeHelpers {
        answers: BTreeMap<String, Option<Credentials>>,
        calls: RefCell<Vec<(String, String)>>,
    }

    impl FakeHelpers {
        fn new(answers: &[(&str, Option<Credentials>)]) -> Self {
            FakeHelpers {
                answers: answers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
                calls: RefCell::new(Vec::new()),
            }
        }
    }

    impl HelperRunner for FakeHelpers {
        fn get(&self, helper: &str, server: &str) -> Result<Option<Credentials>, AuthError> {
            self.calls.borrow_mut().push((helper.into(), server.into()));
            match self.answers.get(helper) {
                Some(a) => Ok(a.clone()),
                None => Err(AuthError::HelperNotFound {
                    helper: helper.into(),
                    source_name: String::new(),
                }),
            }
        }
    }

    fn no_file() -> PathBuf {
        PathBuf::from("/nonexistent/envbox-test/config.json")
    }

    fn secret(reg: &str, s: &str) -> Result<Resolved, AuthError> {
        resolve_with(reg, Some(s), &no_file(), &FakeHelpers::new(&[]))
    }

    fn assert_no_secret(text: &str, secrets: &[&str]) {
        for s in secrets {
            assert!(!text.contains(s), "{text:?} leaks {s:?}");
        }
    }

    #[test]
    fn normalisation() {
        for k in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
            "https://index.docker.io/v1",
            "http://docker.io/",
        ] {
            assert_eq!(normalize_key(k), "docker.io", "{k}");
        }
        assert_eq!(
            normalize_key("https://registry.example.com"),
            "registry.example.com"
        );
        assert_eq!(
            normalize_key("registry.example.com/"),
            "registry.example.com"
        );
        assert_eq!(
            normalize_key("https://Reg.Example.com:5000/v2/"),
            "reg.example.com:5000"
        );
        assert_ne!(normalize_key("ghcr.io"), normalize_key("gcr.io"));
    }

    #[test]
    fn scheme_keys_match_issue_102() {
        let s = format!(
            r#"{{"auths":{{"https://registry.example.com":{{"auth":"{}"}}}}}}"#,
            b64("bob:pw")
        );
        let r = secret("registry.example.com", &s).unwrap();
        assert_eq!(r.credentials, basic("bob", "pw"));
        assert_eq!(r.source, Source::PullSecret);
        assert!(r.description.contains("\"https://registry.example.com\""));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn docker_hub_aliases() {
        for key in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v1/",
        ] {
            let s = format!(
                r#"{{"auths":{{"{key}":{{"username":"u","password":"p"}}, "ghcr.io":{{"username":"x","password":"y"}}}}}}"#
            );
            let r = secret("docker.io", &s).unwrap();
            assert_eq!(r.credentials, basic("u", "p"), "key {key}");
            let r = secret("registry-1.docker.io", &s).unwrap();
            assert_eq!(r.credentials, basic("u", "p"), "key {key}");
        }
    }

    #[test]
    fn base64_auth_only_with_special_passwords() {
        for pw in ["p~a.s:s", "a:b:c", "~.~", "x\0\0"] {
            let s = format!(
                r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#,
                b64(&format!("me:{pw}"))
            );
            let r = secret("ghcr.io", &s).unwrap();
            assert_eq!(
                r.credentials,
                basic("me", pw.trim_end_matches('\0')),
                "pw {pw:?}"
            );
            assert_no_secret(&r.description, &[pw.trim_end_matches('\0')]);
        }
        // unpadded base64 is accepted too
        let unpadded = b64("me:pw1").trim_end_matches('=').to_string();
        let s = format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{unpadded}"}}}}}}"#);
        assert_eq!(
            secret("ghcr.io", &s).unwrap().credentials,
            basic("me", "pw1")
        );
    }

    #[test]
    fn identity_token_and_precedence_in_entry() {
        let s = r#"{"auths":{"myreg.azurecr.io":{"username":"00000000-0000-0000-0000-000000000000","password":"","identitytoken":"refresh-xyz"}}}"#;
        let r = secret("myreg.azurecr.io", s).unwrap();
        assert_eq!(
            r.credentials,
            Credentials::IdentityToken("refresh-xyz".into())
        );
        assert!(r.description.contains("identity token"));
        assert_no_secret(&r.description, &["refresh-xyz"]);
        // username/password beats auth
        let s = format!(
            r#"{{"auths":{{"r.io":{{"username":"a","password":"b","auth":"{}"}}}}}}"#,
            b64("c:d")
        );
        assert_eq!(secret("r.io", &s).unwrap().credentials, basic("a", "b"));
    }

    #[test]
    fn keyless_fallback_issue_137() {
        // Empty key wins over "only entry" logic.
        let s = format!(
            r#"{{"auths":{{"":{{"auth":"{}"}},"other.io":{{"auth":"{}"}}}}}}"#,
            b64("e:1"),
            b64("o:2")
        );
        let r = secret("ghcr.io", &s).unwrap();
        assert_eq!(r.credentials, basic("e", "1"));
        assert!(r.description.contains("empty key"));
        // A single entry with another key is not used (issue 16): it belongs to another registry.
        let s = format!(r#"{{"auths":{{"other.io":{{"auth":"{}"}}}}}}"#, b64("o:2"));
        let r = secret("ghcr.io", &s).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
        assert!(r.description.contains("\"other.io\""), "{}", r.description);
        // Several non-matching entries: never pick one.
        let s = format!(
            r#"{{"auths":{{"a.io":{{"auth":"{}"}},"b.io":{{"auth":"{}"}}}}}}"#,
            b64("a:1"),
            b64("b:2")
        );
        let r = secret("ghcr.io", &s).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
        assert!(r.description.contains("anonymously"), "{}", r.description);
        assert!(
            r.description.contains("\"a.io\", \"b.io\""),
            "{}",
            r.description
        );
    }

    /// Issue 16 defect 1: a pull secret for registry A is never offered to registry B (anyone who
    /// can set CODER_INNER_IMAGE could otherwise collect it), whichever source holds it.
    #[test]
    fn credentials_only_for_the_registry_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let only_a = format!(
            r#"{{"auths":{{"registry-a.example.com":{{"auth":"{}"}}}}}}"#,
            b64("op:hunter2")
        );
        for reg in [
            "registry-b.example.com",
            "docker.io",
            "registry-a.example.com:5000",
        ] {
            let r = secret(reg, &only_a).unwrap();
            assert_eq!(
                r.credentials,
                Credentials::Anonymous,
                "{reg}: {}",
                r.description
            );
            let f = write(dir.path(), &only_a);
            let r = resolve_with(reg, None, &f, &FakeHelpers::new(&[])).unwrap();
            assert_eq!(r.credentials, Credentials::Anonymous, "{reg} (file)");
        }
        // Docker's key forms still match their registry.
        for key in [
            "https://registry-a.example.com/v1/",
            "http://registry-a.example.com",
        ] {
            let s = format!(r#"{{"auths":{{"{key}":{{"auth":"{}"}}}}}}"#, b64("op:pw"));
            let r = secret("registry-a.example.com", &s).unwrap();
            assert_eq!(r.credentials, basic("op", "pw"), "{key}");
        }
        // The empty key is an explicit "any registry" entry (envbox#137), said so in a warning.
        let any = format!(r#"{{"auths":{{"":{{"auth":"{}"}}}}}}"#, b64("op:pw"));
        let r = secret("registry-b.example.com", &any).unwrap();
        assert_eq!(r.credentials, basic("op", "pw"));
        assert!(
            r.warnings.iter().any(|w| w.contains("empty key")),
            "{:?}",
            r.warnings
        );
    }

    /// Issue 16 defect 9: the scrubber knew the whole pull-secret JSON, which never appears in
    /// output, but not the credentials inside it, which can.
    #[test]
    fn pull_secret_values_are_scrubbed() {
        let s = format!(
            r#"{{"auths":{{"a.io":{{"username":"me","password":"pw-d9-first"}},
                "b.io":{{"auth":"{}"}},"c.io":{{"identitytoken":"idt-d9-third"}},
                "d.io":{{"registrytoken":"rt-d9-fourth"}}}}}}"#,
            b64("you:pw-d9-second")
        );
        register_pull_secret(&crate::secrets::Secret::new(s));
        for leaked in [
            "pw-d9-first".to_string(),
            b64("me:pw-d9-first"),
            b64("you:pw-d9-second"),
            "pw-d9-second".to_string(),
            "idt-d9-third".to_string(),
            "rt-d9-fourth".to_string(),
        ] {
            let line = format!("retrying: Authorization: Basic {leaked} was refused");
            let out = crate::secrets::scrub(&line);
            assert!(!out.contains(&leaked), "{out}");
        }
    }

    #[test]
    fn invalid_pull_secret_never_leaks() {
        let bad = [
            "not json at all hunter2",
            r#"{"auths":{"ghcr.io":"hunter2"}}"#,
            r#"{"auths":{"ghcr.io":{"password":"hunter2"}}}"#,
            r#"{"auths":{}}"#,
            r#"["hunter2"]"#,
            r#"{"auths":{"ghcr.io":{"auth":"!!hunter2!!"}}}"#,
        ];
        for s in bad {
            let e = secret("ghcr.io", s).unwrap_err();
            assert!(matches!(e, AuthError::InvalidPullSecret(_)), "{s}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains("CODER_IMAGE_PULL_SECRET"), "{msg}");
            assert_no_secret(&msg, &["hunter2"]);
            assert_no_secret(&format!("{e:?}"), &["hunter2"]);
        }
        // Empty / whitespace-only secret = not set.
        let r = resolve_with("ghcr.io", Some("  "), &no_file(), &FakeHelpers::new(&[])).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
    }

    #[test]
    fn legacy_dockercfg_shape() {
        let s = format!(
            r#"{{"https://ghcr.io":{{"auth":"{}","email":"x@y"}}}}"#,
            b64("l:p")
        );
        let r = secret("ghcr.io", &s).unwrap();
        assert_eq!(r.credentials, basic("l", "p"));
    }

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn both_sources() {
        let dir = tempfile::tempdir().unwrap();
        let h = FakeHelpers::new(&[]);
        let sec = format!(r#"{{"auths":{{"ghcr.io":{{"auth":"{}"}}}}}}"#, b64("s:1"));

        // File with an empty entry for the registry never overrides a valid secret.
        let f = write(dir.path(), r#"{"auths":{"ghcr.io":{}}}"#);
        let r = resolve_with("ghcr.io", Some(&sec), &f, &h).unwrap();
        assert_eq!(r.credentials, basic("s", "1"));
        assert_eq!(r.source, Source::PullSecret);

        // Both match: the secret wins and the sentence says why.
        let f = write(
            dir.path(),
            &format!(
                r#"{{"auths":{{"https://ghcr.io/":{{"auth":"{}"}}}}}}"#,
                b64("f:2")
            ),
        );
        let r = resolve_with("ghcr.io", Some(&sec), &f, &h).unwrap();
        assert_eq!(r.credentials, basic("s", "1"));
        assert!(
            r.description.contains("takes precedence"),
            "{}",
            r.description
        );

        // Only the file matches the registry: the file wins.
        let f = write(
            dir.path(),
            &format!(r#"{{"auths":{{"quay.io":{{"auth":"{}"}}}}}}"#, b64("f:2")),
        );
        let r = resolve_with(
            "quay.io",
            Some(&format!(
                r#"{{"auths":{{"a.io":{{"auth":"{0}"}},"b.io":{{"auth":"{0}"}}}}}}"#,
                b64("s:1")
            )),
            &f,
            &h,
        )
        .unwrap();
        assert_eq!(r.credentials, basic("f", "2"));
        assert!(matches!(r.source, Source::DockerConfig(_)));
        assert!(
            r.description
                .contains("CODER_IMAGE_PULL_SECRET has no entry"),
            "{}",
            r.description
        );

        // Secret only has a fallback, file matches exactly: exact file match wins.
        let r = resolve_with("quay.io", Some(&sec), &f, &h).unwrap();
        assert_eq!(r.credentials, basic("f", "2"));

        // Secret exact, file only fallback: secret.
        let r = resolve_with("ghcr.io", Some(&sec), &f, &h).unwrap();
        assert_eq!(r.credentials, basic("s", "1"));

        // File alone, no match, several entries: anonymous; a broken file is only a warning.
        let f = write(dir.path(), "{oops");
        let r = resolve_with("ghcr.io", None, &f, &h).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
        assert_eq!(r.warnings.len(), 1);

        // Nothing at all.
        let r = resolve_with("ghcr.io", None, &dir.path().join("missing"), &h).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
        assert!(r.description.contains("not set"), "{}", r.description);
    }

    #[test]
    fn cred_helpers_and_store() {
        let h = FakeHelpers::new(&[
            ("ecr-login", Some(basic("AWS", "tok"))),
            ("desktop", Some(Credentials::IdentityToken("idt".into()))),
            ("empty", None),
        ]);
        let s = r#"{"credHelpers":{"123.dkr.ecr.us-east-1.amazonaws.com":"ecr-login"},"credsStore":"desktop","auths":{"ghcr.io":{"auth":"Z2g6cA=="}}}"#;
        let r = resolve_with(
            "123.dkr.ecr.us-east-1.amazonaws.com",
            Some(s),
            &no_file(),
            &h,
        )
        .unwrap();
        assert_eq!(r.credentials, basic("AWS", "tok"));
        assert!(r.description.contains("docker-credential-ecr-login"));
        // auths entry beats credsStore
        let r = resolve_with("ghcr.io", Some(s), &no_file(), &h).unwrap();
        assert_eq!(r.credentials, basic("gh", "p"));
        // credsStore for everything else; Docker Hub asks with the canonical URL
        let r = resolve_with("docker.io", Some(s), &no_file(), &h).unwrap();
        assert_eq!(r.credentials, Credentials::IdentityToken("idt".into()));
        assert!(h
            .calls
            .borrow()
            .contains(&("desktop".into(), DOCKER_HUB_KEY.into())));
        // Missing helper: clear error naming helper and source.
        let s = r#"{"credHelpers":{"gcr.io":"gcloud"}}"#;
        let e = resolve_with("gcr.io", Some(s), &no_file(), &h).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("docker-credential-gcloud") && msg.contains(PULL_SECRET_ENV),
            "{msg}"
        );
        // Helper without credentials: fall through to anonymous.
        let s = r#"{"credHelpers":{"gcr.io":"empty"}}"#;
        let r = resolve_with("gcr.io", Some(s), &no_file(), &h).unwrap();
        assert_eq!(r.credentials, Credentials::Anonymous);
    }

    #[test]
    fn exec_helper_runs_program() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("docker-credential-fake");
        std::fs::write(
            &script,
            "#!/bin/sh\nread server\nif [ \"$server\" = \"tok.io\" ]; then echo '{\"Username\":\"<token>\",\"Secret\":\"rt\"}'; \
             elif [ \"$server\" = \"none.io\" ]; then echo 'credentials not found in native keychain'; exit 1; \
             elif [ \"$server\" = \"bad.io\" ]; then echo boom >&2; exit 3; \
             else echo \"{\\\"Username\\\":\\\"u\\\",\\\"Secret\\\":\\\"s-$server\\\"}\"; fi\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let h = ExecHelper {
            supervisor: None,
            path: Some(dir.path().as_os_str().to_owned()),
        };
        assert_eq!(h.get("fake", "r.io").unwrap(), Some(basic("u", "s-r.io")));
        assert_eq!(
            h.get("fake", "tok.io").unwrap(),
            Some(Credentials::IdentityToken("rt".into()))
        );
        assert_eq!(h.get("fake", "none.io").unwrap(), None);
        let e = h.get("fake", "bad.io").unwrap_err().to_string();
        assert!(e.contains("boom"), "{e}");
        assert!(matches!(
            h.get("nope", "r.io"),
            Err(AuthError::HelperNotFound { .. })
        ));
    }

    #[test]
    fn debug_redacts() {
        let c = basic("bob", "hunter2");
        assert_no_secret(&format!("{c:?}"), &["hunter2"]);
        let c = Credentials::IdentityToken("hunter2".into());
        assert_no_secret(&format!("{c:?}"), &["hunter2"]);
    }
}

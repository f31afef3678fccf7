//! HTTP plumbing of the registry client: the retry policy, sending with auth and redirects by
//! hand, error classification, token fetching, URL helpers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use ureq::http::{Response, Uri};
use ureq::Body;

use crate::image::auth::Credentials;

use super::*;
use super::{challenge::*, client::*};

/// Retry policy for transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Upper bound on time spent in one streak of failures (including waits).
    pub max_total: Duration,
    /// Cap on an honoured `Retry-After`.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            max_total: Duration::from_secs(180),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

pub(super) struct Retry<'a> {
    pub(super) policy: &'a RetryPolicy,
    pub(super) start: Instant,
    pub(super) attempts: u32,
    total_attempts: u32,
}

impl<'a> Retry<'a> {
    pub(super) fn new(policy: &'a RetryPolicy) -> Self {
        Retry {
            policy,
            start: Instant::now(),
            attempts: 0,
            total_attempts: 0,
        }
    }

    /// Progress was made: start a new failure streak.
    pub(super) fn progressed(&mut self) {
        self.attempts = 0;
        self.start = Instant::now();
    }

    /// Sleep before the next attempt, or give up with `Err((attempts, elapsed))`.
    pub(super) fn wait(
        &mut self,
        retry_after: Option<Duration>,
        why: &str,
    ) -> Result<(), (u32, Duration)> {
        self.attempts += 1;
        self.total_attempts += 1;
        let elapsed = self.start.elapsed();
        if self.attempts >= self.policy.max_attempts {
            return Err((self.total_attempts, elapsed));
        }
        let exp = self
            .policy
            .initial_backoff
            .saturating_mul(1u32 << (self.attempts - 1).min(16))
            .min(self.policy.max_backoff);
        let delay = match retry_after {
            Some(ra) => ra.min(self.policy.max_retry_after).max(exp),
            None => exp + jitter(exp / 4),
        };
        if elapsed + delay > self.policy.max_total {
            return Err((self.total_attempts, elapsed));
        }
        log::warn!(
            "{why}; retrying in {delay:?} (attempt {})",
            self.attempts + 1
        );
        std::thread::sleep(delay);
        Ok(())
    }
}

fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    let m = max.as_millis() as u64;
    if m == 0 {
        Duration::ZERO
    } else {
        Duration::from_millis(nanos % m)
    }
}

pub(super) enum Method {
    Get,
    Head,
}

pub(super) struct Req<'a> {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) accept: Option<&'a str>,
    pub(super) range_from: Option<u64>,
}

pub(super) enum Failure {
    /// Retry later.
    Transient(String),
    /// Never retry.
    Fatal(RegistryError),
    /// (insecure mode) the server does not speak TLS: switch to http.
    NotTls(String),
}

impl RegistryClient {
    pub(super) fn retry_or_fail(&self, retry: &mut Retry, why: &str) -> Result<(), RegistryError> {
        retry
            .wait(None, why)
            .map_err(|(attempts, elapsed)| RegistryError::Unreachable {
                registry: self.image.registry.clone(),
                attempts,
                elapsed,
                detail: why.to_string(),
            })
    }

    /// Map non-success statuses of registry API responses to errors.
    pub(super) fn check_status(
        &self,
        resp: &Response<Body>,
        blob: Option<&str>,
    ) -> Result<(), RegistryError> {
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(()),
            401 => Err(RegistryError::AuthFailed {
                registry: self.image.registry.clone(),
                detail: self.auth_detail(),
            }),
            403 => Err(RegistryError::Denied {
                registry: self.image.registry.clone(),
                reference: self.image.to_string(),
                detail: String::new(),
            }),
            404 => match blob {
                Some(d) => Err(RegistryError::BlobNotFound {
                    reference: self.image.to_string(),
                    digest: d.to_string(),
                }),
                None => Err(RegistryError::NotFound {
                    reference: self.image.to_string(),
                    detail: String::new(),
                }),
            },
            _ => Err(RegistryError::Http {
                url: format!("{}{}", self.origin(), resp_path(resp)),
                status,
                detail: String::new(),
            }),
        }
    }

    fn auth_detail(&self) -> String {
        match self.credentials {
            Credentials::Anonymous => ": no credentials were configured for it".into(),
            ref c => format!(": the registry rejected {}", c.kind()),
        }
    }

    /// Send a registry API request: retries transient failures, answers auth challenges, follows
    /// redirects. Returns any response with a non-retryable status (the caller checks it).
    pub(super) fn send(
        &self,
        req: &Req,
        retry: &mut Retry,
    ) -> Result<Response<Body>, RegistryError> {
        let mut auth_rounds = 0;
        // Insecure registries: one plain-HTTP probe after an HTTPS failure, until HTTPS has
        // worked once (Docker's insecure-registry behaviour).
        let mut http_probe: Option<String> = None;
        loop {
            let auth = self
                .auth_header
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let (resp, from_registry) = match self.send_once(req, auth.as_deref()) {
                Ok((r, from_registry)) => {
                    if let Some(why) = http_probe.take() {
                        log::warn!(
                            "registry {} failed over HTTPS ({why}); using plain HTTP as it is marked insecure",
                            self.image.registry
                        );
                    }
                    if !self.use_http.load(Ordering::Relaxed) {
                        self.https_ok.store(true, Ordering::Relaxed);
                    }
                    (r, from_registry)
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::NotTls(why)) | Err(Failure::Transient(why))
                    if self.opts.insecure
                        && http_probe.is_none()
                        && !self.use_http.load(Ordering::Relaxed)
                        && !self.https_ok.load(Ordering::Relaxed) =>
                {
                    self.use_http.store(true, Ordering::Relaxed);
                    http_probe = Some(why);
                    continue;
                }
                Err(Failure::NotTls(why)) | Err(Failure::Transient(why)) => {
                    if let Some(first) = http_probe.take() {
                        // plain HTTP failed too: back to HTTPS, report the HTTPS failure
                        self.use_http.store(self.opts.plain_http, Ordering::Relaxed);
                        self.retry_or_fail(retry, &first)?;
                    } else {
                        self.retry_or_fail(retry, &why)?;
                    }
                    continue;
                }
            };
            let status = resp.status().as_u16();
            match status {
                401 => {
                    auth_rounds += 1;
                    let challenges: Vec<Challenge> = resp
                        .headers()
                        .get_all("www-authenticate")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .flat_map(parse_www_authenticate)
                        .collect();
                    // Only the registry's own challenge is answered: a redirect target (object
                    // storage) naming a token service must not get the registry's credentials.
                    if auth_rounds > 2 || challenges.is_empty() || !from_registry {
                        return Ok(resp); // caller maps it to AuthFailed
                    }
                    self.authenticate(&challenges, retry)?;
                }
                429 | 500 | 502 | 503 | 504 | 507..=599 => {
                    let ra =
                        header(&resp, "retry-after").and_then(|v| v.trim().parse::<u64>().ok());
                    let why = format!("registry {} answered HTTP {status}", self.image.registry);
                    retry.wait(ra.map(Duration::from_secs), &why).map_err(
                        |(attempts, elapsed)| RegistryError::Unreachable {
                            registry: self.image.registry.clone(),
                            attempts,
                            elapsed,
                            detail: why.clone(),
                        },
                    )?;
                }
                _ => return Ok(resp),
            }
        }
    }

    /// One request plus manual redirect following.
    /// The flag says whether the response came from the registry's origin (not a redirect target).
    fn send_once(&self, req: &Req, auth: Option<&str>) -> Result<(Response<Body>, bool), Failure> {
        let origin = self.origin();
        let mut url = format!("{origin}{}", req.path);
        let mut same_origin = true;
        for _ in 0..=MAX_REDIRECTS {
            let mut b = match req.method {
                Method::Get => self.agent.get(&url),
                Method::Head => self.agent.head(&url),
            };
            if let Some(a) = req.accept {
                b = b.header("Accept", a);
            }
            if let Some(from) = req.range_from {
                b = b.header("Range", format!("bytes={from}-"));
            }
            if let (true, Some(a)) = (same_origin, auth) {
                b = b.header("Authorization", a);
            }
            let resp = b.call().map_err(|e| self.classify(e, &url))?;
            let status = resp.status();
            if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok((resp, same_origin));
            }
            let loc = header(&resp, "location").ok_or_else(|| {
                Failure::Fatal(RegistryError::Http {
                    url: redact_url(&url),
                    status: status.as_u16(),
                    detail: " (redirect without Location)".into(),
                })
            })?;
            let next = resolve_location(&url, &loc).ok_or_else(|| {
                Failure::Fatal(RegistryError::Request {
                    url: redact_url(&url),
                    detail: format!("invalid redirect location {:?}", redact_url(&loc)),
                })
            })?;
            if url.starts_with("https://")
                && next.starts_with("http://")
                && !self.opts.insecure
                && !self.opts.plain_http
            {
                return Err(Failure::Fatal(RegistryError::Request {
                    url: redact_url(&url),
                    detail: "refusing a redirect from https to plain http".into(),
                }));
            }
            same_origin = same_origin && origin_of(&next) == origin_of(&url);
            url = next;
        }
        Err(Failure::Fatal(RegistryError::Request {
            url: redact_url(&url),
            detail: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }

    pub(super) fn classify(&self, e: ureq::Error, url: &str) -> Failure {
        // A redirect target's query is often a presigned credential: never shown.
        let url = &redact_url(url);
        let registry = self.image.registry.clone();
        let tls_err = match &e {
            ureq::Error::Rustls(r) => Some(r.clone()),
            ureq::Error::Io(io) => io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned(),
            _ => None,
        };
        if let Some(t) = tls_err {
            let https = url.starts_with("https://");
            let insecure = self.opts.insecure || self.opts.plain_http;
            return match t {
                rustls::Error::InvalidCertificate(c) => {
                    let raw = format!("{c:?}");
                    let unknown = match &c {
                        rustls::CertificateError::UnknownIssuer
                        | rustls::CertificateError::BadSignature => {
                            Some("certificate signed by unknown authority")
                        }
                        // webpki's verdict on a self-signed `CA:TRUE` server certificate that is
                        // not among the trusted certificates.
                        rustls::CertificateError::Other(_) if raw.contains("CaUsedAsEndEntity") => {
                            Some("self-signed certificate that is not trusted")
                        }
                        _ => None,
                    };
                    match unknown {
                        Some(what) => Failure::Fatal(RegistryError::UnknownCa {
                            registry,
                            detail: what.to_string(),
                        }),
                        None => Failure::Fatal(RegistryError::Tls {
                            registry,
                            detail: format!("invalid server certificate: {raw}"),
                        }),
                    }
                }
                rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }
                    if https && insecure && !self.use_http.load(Ordering::Relaxed) =>
                {
                    Failure::NotTls(t.to_string())
                }
                other => Failure::Fatal(RegistryError::Tls {
                    registry,
                    detail: other.to_string(),
                }),
            };
        }
        let msg = e.to_string();
        match e {
            ureq::Error::Timeout(_)
            | ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::ConnectProxyFailed(_)
            | ureq::Error::BodyStalled => Failure::Transient(format!("{url}: {msg}")),
            _ => Failure::Fatal(RegistryError::Request {
                url: url.to_string(),
                detail: msg,
            }),
        }
    }

    /// Answer a 401 challenge: set the cached `Authorization` header.
    fn authenticate(
        &self,
        challenges: &[Challenge],
        retry: &mut Retry,
    ) -> Result<(), RegistryError> {
        let failed = || RegistryError::AuthFailed {
            registry: self.image.registry.clone(),
            detail: self.auth_detail(),
        };
        let value = if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.fetch_token(c, retry)?;
            format!("Bearer {token}")
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            let (u, p) = match &self.credentials {
                Credentials::Anonymous => return Err(failed()),
                Credentials::Basic { username, password } => (username.as_str(), password.as_str()),
                Credentials::IdentityToken(t) => ("<token>", t.as_str()),
            };
            basic_header(u, p)
        } else {
            return Err(RegistryError::Unsupported {
                reference: self.image.to_string(),
                what: format!(
                    "registry {} asks for unsupported authentication scheme(s): {}",
                    self.image.registry,
                    challenges
                        .iter()
                        .map(|c| c.scheme.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        let mut slot = self.auth_header.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(value);
        Ok(())
    }

    fn fetch_token(&self, c: &Challenge, retry: &mut Retry) -> Result<String, RegistryError> {
        let realm = c.params.get("realm").cloned().unwrap_or_default();
        let terr = |detail: String| RegistryError::Token {
            realm: realm.clone(),
            detail,
        };
        // The registry names the token server, so credentials would go wherever it says: only
        // over https, or in plain text to the registry's own host when the registry itself is
        // reached in plain text (an insecure local mirror) — never to another host unencrypted.
        let insecure = self.opts.insecure || self.opts.plain_http;
        let own_host = host_of(&realm).is_some_and(|h| {
            host_of(&format!("http://{}", self.image.api_host())).is_some_and(|r| r == h)
        });
        let anonymous = self.credentials == Credentials::Anonymous;
        let plain_ok = insecure && realm.starts_with("http://") && (anonymous || own_host);
        if !(realm.starts_with("https://") || plain_ok) {
            return Err(terr(
                "the token service is not an https URL; credentials are only sent to a token \
                 service over https (or, for a registry marked insecure, plain http on the \
                 registry's own host)"
                    .into(),
            ));
        }
        let service = c.params.get("service").cloned().unwrap_or_default();
        let scope = format!("repository:{}:pull", self.image.repository);
        loop {
            let result = match &self.credentials {
                Credentials::IdentityToken(t) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token"),
                        ("refresh_token", t.as_str()),
                        ("scope", scope.as_str()),
                        ("client_id", "envbox"),
                    ];
                    if !service.is_empty() {
                        form.push(("service", service.as_str()));
                    }
                    self.agent.post(&realm).send_form(form)
                }
                creds => {
                    let mut url = realm.clone();
                    let mut sep = if url.contains('?') { '&' } else { '?' };
                    for (k, v) in [("service", service.as_str()), ("scope", scope.as_str())] {
                        if !v.is_empty() {
                            url.push(sep);
                            url.push_str(k);
                            url.push('=');
                            url.push_str(&pct_encode(v));
                            sep = '&';
                        }
                    }
                    let mut b = self.agent.get(&url);
                    if let Credentials::Basic { username, password } = creds {
                        b = b.header("Authorization", basic_header(username, password));
                    }
                    b.call()
                }
            };
            let mut resp = match result {
                Ok(r) => r,
                Err(e) => match self.classify(e, &realm) {
                    Failure::Transient(why) => {
                        self.retry_or_fail(retry, &why)?;
                        continue;
                    }
                    Failure::Fatal(e) => return Err(e),
                    Failure::NotTls(why) => return Err(terr(why)),
                },
            };
            let status = resp.status().as_u16();
            match status {
                200 => {}
                401 | 403 => {
                    return Err(RegistryError::AuthFailed {
                        registry: self.image.registry.clone(),
                        detail: format!(
                            "{} (token service answered HTTP {status})",
                            self.auth_detail()
                        ),
                    })
                }
                429 | 500..=599 => {
                    self.retry_or_fail(
                        retry,
                        &format!("token service {realm} answered HTTP {status}"),
                    )?;
                    continue;
                }
                _ => return Err(terr(format!("HTTP {status}"))),
            }
            #[derive(Deserialize)]
            struct TokenResponse {
                #[serde(default)]
                token: Option<String>,
                #[serde(default)]
                access_token: Option<String>,
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| terr(format!("reading the response: {e}")))?;
            let t: TokenResponse = serde_json::from_slice(&body)
                .map_err(|e| terr(format!("unparsable response ({:?})", e.classify())))?;
            let token = t
                .token
                .filter(|t| !t.is_empty())
                .or(t.access_token.filter(|t| !t.is_empty()))
                .ok_or_else(|| terr("the response has no token".into()))?;
            // A bearer token is a credential for as long as it lives.
            crate::secrets::register_value(&token);
            return Ok(token);
        }
    }
}

pub(super) fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

pub(super) fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

fn resp_path(resp: &Response<Body>) -> String {
    // ureq records the final URI in the response extensions
    resp.extensions()
        .get::<Uri>()
        .map(|u| u.path().to_string())
        .unwrap_or_default()
}

/// Percent-encode for a query value (RFC 3986 unreserved kept).
fn pct_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `bytes 100-199/200` → 100.
pub(super) fn parse_content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// `url` without its query and fragment, for messages: the query of a redirect to object
/// storage is a presigned credential (`X-Amz-Signature=…`).
fn redact_url(url: &str) -> String {
    match url.find(['?', '#']) {
        Some(i) => format!("{}?<redacted>", &url[..i]),
        None => url.to_string(),
    }
}

/// The host of an absolute URL, lower-cased, without the port.
fn host_of(url: &str) -> Option<String> {
    let u: Uri = url.parse().ok()?;
    Some(u.host()?.to_ascii_lowercase())
}

/// `scheme://authority` of an absolute URL (lower-cased), with default ports made explicit.
fn origin_of(url: &str) -> Option<String> {
    let u: Uri = url.parse().ok()?;
    let scheme = u.scheme_str()?.to_ascii_lowercase();
    let host = u.host()?.to_ascii_lowercase();
    let port = u
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some(format!("{scheme}://{host}:{port}"))
}

/// Resolve a `Location` header against the current URL.
fn resolve_location(current: &str, loc: &str) -> Option<String> {
    if loc.starts_with("https://") || loc.starts_with("http://") {
        return Some(loc.to_string());
    }
    let u: Uri = current.parse().ok()?;
    let base = format!("{}://{}", u.scheme_str()?, u.authority()?);
    if let Some(rest) = loc.strip_prefix("//") {
        return Some(format!("{}://{rest}", u.scheme_str()?));
    }
    if loc.starts_with('/') {
        return Some(format!("{base}{loc}"));
    }
    let dir = u.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    Some(format!("{base}{dir}/{loc}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(parse_content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(parse_content_range_start("bytes */200"), None);
        assert_eq!(
            resolve_location("https://r.io/v2/a/blobs/x", "/store/y?sig=1").unwrap(),
            "https://r.io/store/y?sig=1"
        );
        assert_eq!(
            resolve_location("https://r.io/v2/a/blobs/x", "https://s3.aws/y").unwrap(),
            "https://s3.aws/y"
        );
        assert_eq!(
            resolve_location("https://r.io/v2/a/b", "c").unwrap(),
            "https://r.io/v2/a/c"
        );
        assert_eq!(
            resolve_location("https://r.io/v2/a/b", "//cdn.io/z").unwrap(),
            "https://cdn.io/z"
        );
        assert_eq!(origin_of("https://R.io/x"), origin_of("https://r.io:443/y"));
        assert_ne!(
            origin_of("https://r.io/x"),
            origin_of("https://r.io:5000/x")
        );
        assert_ne!(origin_of("http://r.io/x"), origin_of("https://r.io/x"));
        assert_eq!(
            pct_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            basic_header("u", "p:~."),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("u:p:~.")
            )
        );
    }
}

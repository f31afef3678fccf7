//! An in-process fake registry (plain HTTP) for unit tests of this module and of `store`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::image::auth::Credentials;
use crate::image::reference::ImageRef;

use super::{client::*, http::*, tls::*};
use crate::image::oci::*;

type Manifests = HashMap<String, (String, Vec<u8>)>;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicUsize};

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic,
    Bearer,
}

pub struct Knobs {
    pub auth: Auth,
    pub user: &'static str,
    pub pass: &'static str,
    pub refresh_token: &'static str,
    /// Answer this many blob GETs with 503 + Retry-After: 0 first.
    pub fail_blobs: AtomicUsize,
    /// Cut the first response of each layer blob in half (declared length kept).
    pub truncate_once: bool,
    /// Redirect blob GETs to another origin (`localhost` instead of `127.0.0.1`).
    pub redirect_blobs: bool,
    /// Ignore `Range`.
    pub ignore_range: bool,
    /// Omit Docker-Content-Digest.
    pub no_digest_header: bool,
    /// Answer everything with 503.
    pub down: AtomicBool,
    /// The Bearer challenge's realm instead of this fake's own `/token`.
    pub realm: Option<String>,
    /// Answer every blob GET with 416, or (`206`) with a Content-Range that starts elsewhere.
    pub bad_range_status: AtomicU32,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            auth: Auth::None,
            user: "tester",
            pass: "s3cret",
            refresh_token: "refresh-123",
            fail_blobs: AtomicUsize::new(0),
            truncate_once: false,
            redirect_blobs: false,
            ignore_range: false,
            no_digest_header: false,
            down: AtomicBool::new(false),
            realm: None,
            bad_range_status: AtomicU32::new(0),
        }
    }
}

pub struct Fake {
    pub port: u16,
    pub log: Arc<Mutex<Vec<Logged>>>,
    pub manifests: Arc<Mutex<Manifests>>,
    pub blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    pub knobs: Arc<Knobs>,
    truncated: Arc<Mutex<Vec<String>>>,
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

impl Fake {
    pub fn start(knobs: Knobs) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = Fake {
            port,
            log: Arc::default(),
            manifests: Arc::default(),
            blobs: Arc::default(),
            knobs: Arc::new(knobs),
            truncated: Arc::default(),
        };
        let shared = fake.clone_handles();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = shared.clone_handles();
                std::thread::spawn(move || {
                    let _ = s.serve(conn);
                });
            }
        });
        fake
    }

    fn clone_handles(&self) -> Fake {
        Fake {
            port: self.port,
            log: self.log.clone(),
            manifests: self.manifests.clone(),
            blobs: self.blobs.clone(),
            knobs: self.knobs.clone(),
            truncated: self.truncated.clone(),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn add_blob(&self, data: &[u8]) -> String {
        let d = digest(data);
        self.blobs.lock().unwrap().insert(d.clone(), data.to_vec());
        d
    }

    /// Store a manifest under its digest and, if given, a tag.
    pub fn add_manifest(&self, tag: Option<&str>, media_type: &str, body: &[u8]) -> String {
        let d = digest(body);
        let mut m = self.manifests.lock().unwrap();
        m.insert(d.clone(), (media_type.to_string(), body.to_vec()));
        if let Some(t) = tag {
            m.insert(t.to_string(), (media_type.to_string(), body.to_vec()));
        }
        d
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    fn serve(&self, conn: TcpStream) -> std::io::Result<()> {
        let mut reader = std::io::BufReader::new(conn.try_clone()?);
        let mut conn = conn;
        if reader.fill_buf()?.first() == Some(&0x16) {
            // A TLS ClientHello on a plain-HTTP port: answer like Go's net/http does.
            conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")?;
            return Ok(());
        }
        let mut raw = Vec::new();
        reader.read_until(b'\n', &mut raw)?;
        let line = String::from_utf8_lossy(&raw).into_owned();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut raw = Vec::new();
            if reader.read_until(b'\n', &mut raw)? == 0 {
                break;
            }
            let h = String::from_utf8_lossy(&raw).into_owned();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut req = Logged {
            method,
            path,
            headers,
            body: String::new(),
        };
        if let Some(n) = req
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut b = vec![0; n];
            reader.read_exact(&mut b)?;
            req.body = String::from_utf8_lossy(&b).into_owned();
        }
        self.log.lock().unwrap().push(req.clone());
        let (status, hdrs, body, cut) = self.respond(&req);
        let reason = match status {
            200 => "OK",
            206 => "Partial Content",
            307 => "Temporary Redirect",
            401 => "Unauthorized",
            404 => "Not Found",
            503 => "Service Unavailable",
            _ => "X",
        };
        let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
        for (k, v) in &hdrs {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        conn.write_all(out.as_bytes())?;
        if req.method != "HEAD" {
            let n = cut.unwrap_or(body.len());
            conn.write_all(&body[..n])?;
        }
        conn.flush()?;
        let _ = conn.shutdown(std::net::Shutdown::Both);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn respond(&self, req: &Logged) -> (u16, Vec<(String, String)>, Vec<u8>, Option<usize>) {
        let k = &self.knobs;
        let path = req.path.clone();
        if k.down.load(Ordering::SeqCst) {
            return (503, vec![], vec![], None);
        }
        if path.starts_with("/token") {
            let ok = match req.method.as_str() {
                "POST" => {
                    req.body
                        .contains(&format!("refresh_token={}", k.refresh_token))
                        && req.body.contains("grant_type=refresh_token")
                }
                _ => match req.header("authorization") {
                    None => k.user.is_empty(),
                    Some(a) => a == basic_header(k.user, k.pass),
                },
            };
            if !ok {
                return (401, vec![], b"{}".to_vec(), None);
            }
            let field = if req.method == "POST" {
                "access_token"
            } else {
                "token"
            };
            return (
                200,
                vec![],
                format!("{{\"{field}\":\"tok-1\"}}").into_bytes(),
                None,
            );
        }
        if let Some(rest) = path.strip_prefix("/storage/") {
            if req.header("authorization").is_some() {
                return (400, vec![], b"authorization leaked".to_vec(), None);
            }
            return self.blob_response(req, rest);
        }
        // auth on /v2/
        let authorized = match k.auth {
            Auth::None => true,
            Auth::Basic => req.header("authorization") == Some(&basic_header(k.user, k.pass)),
            Auth::Bearer => req.header("authorization") == Some("Bearer tok-1"),
        };
        if !authorized {
            let ch = match k.auth {
                Auth::Basic => "Basic realm=\"test\"".to_string(),
                _ => format!(
                    "Bearer realm=\"{}\",service=\"fake, registry\",scope=\"repository:x:pull\"",
                    k.realm
                        .clone()
                        .unwrap_or_else(|| format!("http://127.0.0.1:{}/token", self.port))
                ),
            };
            return (
                401,
                vec![("WWW-Authenticate".into(), ch)],
                b"{}".to_vec(),
                None,
            );
        }
        if let Some((_, tail)) = path.split_once("/manifests/") {
            let m = self.manifests.lock().unwrap();
            return match m.get(tail) {
                Some((mt, body)) => {
                    let mut h = vec![("Content-Type".to_string(), mt.clone())];
                    if !k.no_digest_header {
                        h.push(("Docker-Content-Digest".into(), digest(body)));
                    }
                    (200, h, body.clone(), None)
                }
                None => (
                    404,
                    vec![],
                    br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#.to_vec(),
                    None,
                ),
            };
        }
        if let Some((_, d)) = path.split_once("/blobs/") {
            if k.fail_blobs.load(Ordering::SeqCst) > 0 {
                k.fail_blobs.fetch_sub(1, Ordering::SeqCst);
                return (503, vec![("Retry-After".into(), "0".into())], vec![], None);
            }
            if k.redirect_blobs {
                let loc = format!("http://localhost:{}/storage/{d}", self.port);
                return (307, vec![("Location".into(), loc)], vec![], None);
            }
            return self.blob_response(req, d);
        }
        (404, vec![], vec![], None)
    }

    #[allow(clippy::type_complexity)]
    fn blob_response(
        &self,
        req: &Logged,
        d: &str,
    ) -> (u16, Vec<(String, String)>, Vec<u8>, Option<usize>) {
        let Some(data) = self.blobs.lock().unwrap().get(d).cloned() else {
            return (404, vec![], vec![], None);
        };
        match self.knobs.bad_range_status.load(Ordering::SeqCst) {
            0 => {}
            416 => return (416, vec![], vec![], None),
            _ => {
                let hdr = format!("bytes 7-{}/{}", data.len() - 1, data.len());
                return (
                    206,
                    vec![("Content-Range".into(), hdr)],
                    data[7..].to_vec(),
                    None,
                );
            }
        }
        let range = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse::<usize>().ok());
        let (status, body, mut hdrs) = match range {
            Some(from) if !self.knobs.ignore_range && from < data.len() => (
                206,
                data[from..].to_vec(),
                vec![(
                    "Content-Range".to_string(),
                    format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
                )],
            ),
            _ => (200, data.clone(), vec![]),
        };
        hdrs.push(("Content-Type".into(), "application/octet-stream".into()));
        let mut cut = None;
        if self.knobs.truncate_once && data.len() > 1000 {
            let mut t = self.truncated.lock().unwrap();
            if !t.contains(&d.to_string()) {
                t.push(d.to_string());
                cut = Some(body.len() / 2);
            }
        }
        (status, hdrs, body, cut)
    }
}

/// A two-layer image (plus an index with arm64, amd64 and an attestation) in `fake`.
/// Returns (index digest, amd64 manifest digest, layer blobs).
pub fn push_image(fake: &Fake, tag: &str) -> (String, String, Vec<Vec<u8>>) {
    let ids = [digest(b"diff 1"), digest(b"diff 2")];
    push_image_with_diff_ids(fake, tag, &ids)
}

/// [`push_image`] whose configuration lists `diff_ids` (the layers are not tars: nothing
/// here unpacks them).
pub fn push_image_with_diff_ids(
    fake: &Fake,
    tag: &str,
    diff_ids: &[String],
) -> (String, String, Vec<Vec<u8>>) {
    let l1: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let l2: Vec<u8> = (0..5_000u32).map(|i| (i % 13) as u8).collect();
    let d1 = fake.add_blob(&l1);
    let d2 = fake.add_blob(&l2);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"User":"1000","WorkingDir":"/home/coder","Entrypoint":null,"Cmd":["sh"],"StopSignal":"SIGRTMIN+3"}},"rootfs":{{"type":"layers","diff_ids":{}}}}}"#,
        serde_json::to_string(diff_ids).unwrap()
    );
    let config = config.as_bytes();
    let dc = fake.add_blob(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_MANIFEST}","config":{{"mediaType":"{MT_OCI_CONFIG}","digest":"{dc}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d1}","size":{}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{d2}","size":{}}}]}}"#,
        config.len(),
        l1.len(),
        l2.len()
    );
    let dm = fake.add_manifest(None, MT_OCI_MANIFEST, manifest.as_bytes());
    let other = fake.add_manifest(
        None,
        MT_OCI_MANIFEST,
        b"{\"schemaVersion\":2,\"config\":{}}",
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT_OCI_INDEX}","manifests":[
          {{"mediaType":"{MT_OCI_MANIFEST}","digest":"{other}","size":30,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
          {{"mediaType":"{MT_OCI_MANIFEST}","digest":"{dm}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}},
          {{"mediaType":"{MT_OCI_MANIFEST}","digest":"{other}","size":30,"platform":{{"architecture":"unknown","os":"unknown"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#,
        manifest.len()
    );
    let di = fake.add_manifest(Some(tag), MT_OCI_INDEX, index.as_bytes());
    (di, dm, vec![l1, l2])
}

pub fn options() -> ClientOptions {
    ClientOptions {
        plain_http: true,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            max_total: Duration::from_secs(10),
            max_retry_after: Duration::from_millis(100),
        },
        platform: Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        },
        ..Default::default()
    }
}

pub fn roots() -> TlsRoots {
    TlsRoots {
        certs: Arc::new(Vec::new()),
        extra: Arc::new(Vec::new()),
        summary: "none".into(),
    }
}

pub fn client(fake: &Fake, reference: &str, creds: Credentials) -> RegistryClient {
    let r = ImageRef::parse(&format!("{}/{reference}", fake.host())).unwrap();
    RegistryClient::with_options(r, creds, &roots(), options())
}

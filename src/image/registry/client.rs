//! The registry client: manifest resolution (index → platform manifest), config and layer
//! blobs, resumable verified downloads.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::image::auth::Credentials;
use crate::image::reference::{validate_digest, ImageRef};
use crate::image::store::{BlobStore, BlobWriter, StoreError};

use super::*;
use super::{http::*, tls::*};
use crate::image::oci::*;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registry marked insecure: HTTPS without certificate verification, falling back to plain HTTP
    /// when the server does not speak TLS.
    pub insecure: bool,
    /// Talk plain HTTP from the start (implies insecure; mostly for tests and `localhost` mirrors).
    pub plain_http: bool,
    pub connect_timeout: Duration,
    /// Max wait for response headers and for each read of a body.
    pub read_timeout: Duration,
    pub retry: RetryPolicy,
    pub platform: Platform,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            plain_http: false,
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            platform: Platform::current(),
        }
    }
}

/// A client for one image reference on one registry.
pub struct RegistryClient {
    pub(super) image: ImageRef,
    pub(super) credentials: Credentials,
    pub(super) agent: ureq::Agent,
    pub(super) opts: ClientOptions,
    pub(super) use_http: AtomicBool,
    /// An HTTPS request has succeeded (no more plain-HTTP probing).
    pub(super) https_ok: AtomicBool,
    /// Cached `Authorization` header value for the registry origin.
    pub(super) auth_header: Mutex<Option<String>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("image", &self.image)
            .field("credentials", &self.credentials)
            .field("opts", &self.opts)
            .finish()
    }
}

impl RegistryClient {
    pub fn new(
        image: ImageRef,
        credentials: Credentials,
        roots: &TlsRoots,
        insecure: bool,
    ) -> RegistryClient {
        Self::with_options(
            image,
            credentials,
            roots,
            ClientOptions {
                insecure,
                ..Default::default()
            },
        )
    }

    pub fn with_options(
        image: ImageRef,
        credentials: Credentials,
        roots: &TlsRoots,
        opts: ClientOptions,
    ) -> RegistryClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_resolve(Some(opts.connect_timeout))
            .timeout_connect(Some(opts.connect_timeout))
            .timeout_send_request(Some(opts.read_timeout))
            .timeout_recv_response(Some(opts.read_timeout))
            .timeout_per_read(Some(opts.read_timeout))
            .user_agent(concat!("envbox/", env!("CARGO_PKG_VERSION")))
            .build();
        // Credentials from a credential helper were never registered as secrets anywhere else.
        match &credentials {
            Credentials::Basic { username, password } => {
                crate::secrets::register_value(password);
                crate::secrets::register_value(&basic_header(username, password)["Basic ".len()..]);
            }
            Credentials::IdentityToken(t) => crate::secrets::register_value(t),
            Credentials::Anonymous => {}
        }
        let tls = if opts.insecure || opts.plain_http {
            roots.insecure_rustls_config()
        } else {
            roots.rustls_config()
        };
        RegistryClient {
            use_http: AtomicBool::new(opts.plain_http),
            https_ok: AtomicBool::new(false),
            image,
            credentials,
            agent: ureq_agent(config, tls),
            opts,
            auth_header: Mutex::new(None),
        }
    }

    pub fn image(&self) -> &ImageRef {
        &self.image
    }

    pub(super) fn origin(&self) -> String {
        let scheme = if self.use_http.load(Ordering::Relaxed) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.image.api_host())
    }

    fn repo_path(&self, kind: &str, reference: &str) -> String {
        format!("/v2/{}/{kind}/{reference}", self.image.repository)
    }

    // ---- manifest resolution -------------------------------------------------------------

    /// Resolve the image over the network (no cache).
    pub fn resolve_manifest(&self) -> Result<ResolvedImage, RegistryError> {
        self.resolve(self.image.digest.as_deref(), None, false)
    }

    /// Resolve using `store` for manifests and config: blobs already stored are not fetched. With
    /// `top` (a digest) the reference's tag is not consulted.
    pub fn resolve_manifest_cached(
        &self,
        top: Option<&str>,
        store: &BlobStore,
    ) -> Result<ResolvedImage, RegistryError> {
        self.resolve(top.or(self.image.digest.as_deref()), Some(store), false)
    }

    /// Resolve purely from `store` (no request); fails if anything is missing.
    pub fn resolve_manifest_offline(
        &self,
        top: &str,
        store: &BlobStore,
    ) -> Result<ResolvedImage, RegistryError> {
        self.resolve(Some(top), Some(store), true)
    }

    /// `HEAD` the manifest for the reference: the registry's current digest, or `None` if it sent
    /// no (sha256) `Docker-Content-Digest`.
    pub fn head_manifest(&self) -> Result<Option<String>, RegistryError> {
        let reference = self.image.manifest_reference().to_string();
        let req = Req {
            method: Method::Head,
            path: self.repo_path("manifests", &reference),
            accept: Some(MANIFEST_ACCEPT),
            range_from: None,
        };
        let mut retry = Retry::new(&self.opts.retry);
        let resp = self.send(&req, &mut retry)?;
        self.check_status(&resp, None)?;
        Ok(header(&resp, "docker-content-digest").filter(|d| validate_digest(d).is_ok()))
    }

    fn resolve(
        &self,
        top: Option<&str>,
        store: Option<&BlobStore>,
        offline: bool,
    ) -> Result<ResolvedImage, RegistryError> {
        let reference = self.image.to_string();
        let (top_bytes, top_digest, top_ct) = match top {
            Some(d) => {
                let (b, ct) = self.manifest_by_digest(d, store, offline)?;
                (b, d.to_string(), ct)
            }
            None => self.get_manifest(self.image.manifest_reference())?,
        };
        if let (Some(s), None) = (store, top) {
            s.put(&top_digest, &top_bytes)?;
        }
        let (manifest_digest, index_digest, config, layers) =
            match parse_manifest(&top_bytes, top_ct.as_deref(), &reference)? {
                ParsedManifest::Index(entries) => {
                    let chosen =
                        select_platform(&entries, &self.opts.platform).map_err(|available| {
                            RegistryError::NoMatchingPlatform {
                                reference: reference.clone(),
                                wanted: self.opts.platform.to_string(),
                                available,
                            }
                        })?;
                    check_descriptor(chosen, "index entry", &reference)?;
                    let (bytes, ct) = self.manifest_by_digest(&chosen.digest, store, offline)?;
                    let ct = ct.or_else(|| Some(chosen.media_type.clone()));
                    match parse_manifest(&bytes, ct.as_deref(), &reference)? {
                        ParsedManifest::Image { config, layers } => {
                            (chosen.digest.clone(), Some(top_digest), config, layers)
                        }
                        ParsedManifest::Index(_) => {
                            return Err(RegistryError::Unsupported {
                                reference,
                                what: "nested image indexes are not supported".into(),
                            })
                        }
                    }
                }
                ParsedManifest::Image { config, layers } => (top_digest, None, config, layers),
            };

        let config_size = check_descriptor(&config, "config", &reference)?;
        if !config.media_type.is_empty()
            && config.media_type != MT_OCI_CONFIG
            && config.media_type != MT_DOCKER_CONFIG
        {
            return Err(RegistryError::Unsupported {
                reference,
                what: format!(
                    "not a container image (config media type {:?})",
                    config.media_type
                ),
            });
        }
        let layers = layers
            .iter()
            .map(|l| layer_desc(l, &reference))
            .collect::<Result<Vec<_>, _>>()?;
        let config_bytes = match store.map(|s| s.read(&config.digest)).transpose()?.flatten() {
            Some(b) => b,
            None if offline => return Err(self.offline_missing(&config.digest)),
            None => match store {
                Some(s) => self.small_blob_via_store(s, &config.digest, config_size)?,
                None => self.get_small_blob(&config.digest, config_size)?,
            },
        };
        let raw: RawConfigBlob =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::InvalidManifest {
                reference: reference.clone(),
                reason: format!("image config is not valid JSON: {e}"),
            })?;
        // Each layer is verified against its diff_id while it is unpacked; a shorter list would
        // leave the layers past its end unverified (Docker refuses such images as well).
        let diff_ids = raw
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.clone())
            .unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(RegistryError::InvalidManifest {
                reference: reference.clone(),
                reason: format!(
                    "the image configuration lists {} rootfs.diff_ids for {} layers; the image is \
                     malformed, rebuild or re-push it",
                    diff_ids.len(),
                    layers.len()
                ),
            });
        }
        let mut platform = format!("{}/{}", raw.os, raw.architecture);
        if let Some(v) = raw.variant.as_deref().filter(|v| !v.is_empty()) {
            platform.push('/');
            platform.push_str(v);
        }
        if raw.architecture != self.opts.platform.architecture && !raw.architecture.is_empty() {
            log::warn!(
                "{reference} is built for {platform}, this machine is {}",
                self.opts.platform
            );
        }
        Ok(ResolvedImage {
            manifest_digest,
            index_digest,
            config: raw.config.unwrap_or_default(),
            config_digest: config.digest.clone(),
            platform,
            diff_ids,
            layers,
        })
    }

    fn offline_missing(&self, digest: &str) -> RegistryError {
        RegistryError::InvalidManifest {
            reference: self.image.to_string(),
            reason: format!("{digest} is not in the local cache and the registry is unreachable"),
        }
    }

    fn manifest_by_digest(
        &self,
        digest: &str,
        store: Option<&BlobStore>,
        offline: bool,
    ) -> Result<(Vec<u8>, Option<String>), RegistryError> {
        if let Some(s) = store {
            if let Some(b) = s.read(digest)? {
                return Ok((b, None));
            }
        }
        if offline {
            return Err(self.offline_missing(digest));
        }
        let (b, _, ct) = self.get_manifest(digest)?;
        if let Some(s) = store {
            s.put(digest, &b)?;
        }
        Ok((b, ct))
    }

    /// GET a manifest by tag or digest; returns bytes, verified digest, content type.
    fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(Vec<u8>, String, Option<String>), RegistryError> {
        let req = Req {
            method: Method::Get,
            path: self.repo_path("manifests", reference),
            accept: Some(MANIFEST_ACCEPT),
            range_from: None,
        };
        let mut retry = Retry::new(&self.opts.retry);
        let (resp, bytes) = loop {
            let mut resp = self.send(&req, &mut retry)?;
            self.check_status(&resp, None)?;
            match resp
                .body_mut()
                .with_config()
                .limit(MAX_MANIFEST_BYTES)
                .read_to_vec()
            {
                Ok(b) => break (resp, b),
                Err(ureq::Error::BodyExceedsLimit(_)) => {
                    return Err(RegistryError::InvalidManifest {
                        reference: self.image.to_string(),
                        reason: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
                    })
                }
                Err(e) => self.retry_or_fail(&mut retry, &format!("reading manifest: {e}"))?,
            }
        };
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header(&resp, "docker-content-digest").filter(|d| d.starts_with("sha256:"))
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {} of {}", reference, self.image),
                    expected,
                    actual,
                });
            }
        }
        let ct = header(&resp, "content-type");
        Ok((bytes, actual, ct))
    }

    /// Fetch a small blob into `store` under its per-blob lock, so that concurrent pulls of one
    /// image (threads or processes) download it once; the others read what the first stored.
    fn small_blob_via_store(
        &self,
        store: &BlobStore,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        match store.writer(digest, Some(size))? {
            None => match store.read(digest)? {
                Some(b) => Ok(b),
                None => {
                    let b = self.get_small_blob(digest, size)?;
                    store.put(digest, &b)?;
                    Ok(b)
                }
            },
            Some(mut w) => {
                let b = self.get_small_blob(digest, size)?;
                w.reset()?;
                w.write_all(&b).map_err(|e| StoreError::Io {
                    op: "write blob",
                    path: w.partial_path().to_path_buf(),
                    source: e,
                })?;
                w.finish()?;
                Ok(b)
            }
        }
    }

    fn get_small_blob(&self, digest: &str, size: u64) -> Result<Vec<u8>, RegistryError> {
        if size > MAX_CONFIG_BYTES {
            return Err(RegistryError::InvalidManifest {
                reference: self.image.to_string(),
                reason: format!(
                    "config blob {digest} is {size} bytes, over the {MAX_CONFIG_BYTES} limit"
                ),
            });
        }
        let req = Req {
            method: Method::Get,
            path: self.repo_path("blobs", digest),
            accept: None,
            range_from: None,
        };
        let mut retry = Retry::new(&self.opts.retry);
        let bytes = loop {
            let mut resp = self.send(&req, &mut retry)?;
            self.check_status(&resp, Some(digest))?;
            match resp.body_mut().with_config().limit(size + 1).read_to_vec() {
                Ok(b) => break b,
                Err(e) => self.retry_or_fail(&mut retry, &format!("reading blob {digest}: {e}"))?,
            }
        };
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("config blob of {}", self.image),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    // ---- blobs ---------------------------------------------------------------------------

    /// Download a layer into `dest` (streaming, verified), resuming from what `dest` already holds.
    pub fn fetch_blob(
        &self,
        desc: &LayerDesc,
        dest: &mut BlobWriter,
    ) -> Result<PathBuf, RegistryError> {
        self.fetch_blob_with_progress(desc, dest, &mut |_| ControlFlow::Continue(()))
    }

    /// [`fetch_blob`](Self::fetch_blob) reporting the writer offset after each chunk; returning
    /// `Break` aborts with [`RegistryError::Aborted`] (the partial file is kept for resuming).
    pub fn fetch_blob_with_progress(
        &self,
        desc: &LayerDesc,
        dest: &mut BlobWriter,
        on_bytes: &mut dyn FnMut(u64) -> ControlFlow<()>,
    ) -> Result<PathBuf, RegistryError> {
        validate_digest(&desc.digest).map_err(|e| RegistryError::InvalidManifest {
            reference: self.image.to_string(),
            reason: e,
        })?;
        let mut retry = Retry::new(&self.opts.retry);
        // One clean restart is allowed when a resumed download fails verification.
        let mut may_restart = true;
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            if dest.offset() < desc.size {
                let from = dest.offset();
                let req = Req {
                    method: Method::Get,
                    path: self.repo_path("blobs", &desc.digest),
                    accept: None,
                    range_from: (from > 0).then_some(from),
                };
                let resp = self.send(&req, &mut retry)?;
                match resp.status().as_u16() {
                    200 if from > 0 => {
                        log::info!("registry ignored Range for {}; restarting it", desc.digest);
                        dest.reset()?;
                        if on_bytes(0).is_break() {
                            return Err(RegistryError::Aborted);
                        }
                    }
                    200 => {}
                    206 => {
                        let start = header(&resp, "content-range")
                            .and_then(|v| parse_content_range_start(&v));
                        if start != Some(from) {
                            self.restart_after_bad_answer(
                                &mut retry,
                                dest,
                                on_bytes,
                                &format!(
                                    "downloading {}: asked for bytes from {from}, got Content-Range {:?}",
                                    desc.digest,
                                    header(&resp, "content-range").unwrap_or_default()
                                ),
                            )?;
                            continue;
                        }
                    }
                    416 => {
                        self.restart_after_bad_answer(
                            &mut retry,
                            dest,
                            on_bytes,
                            &format!(
                                "downloading {}: HTTP 416 for bytes from {from}",
                                desc.digest
                            ),
                        )?;
                        continue;
                    }
                    _ => {
                        self.check_status(&resp, Some(&desc.digest))?;
                        return Err(RegistryError::Http {
                            url: format!("{}{}", self.origin(), req.path),
                            status: resp.status().as_u16(),
                            detail: String::new(),
                        });
                    }
                }
                let mut reader = resp.into_body().into_reader();
                let start_off = dest.offset();
                let mut read_err = None;
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            dest.write_all(&buf[..n]).map_err(|e| StoreError::Io {
                                op: "write blob",
                                path: dest.partial_path().to_path_buf(),
                                source: e,
                            })?;
                            if on_bytes(dest.offset()).is_break() {
                                return Err(RegistryError::Aborted);
                            }
                            if dest.offset() > desc.size {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            read_err = Some(e);
                            break;
                        }
                    }
                }
                if dest.offset() > start_off {
                    retry.progressed();
                }
                if let Some(e) = read_err {
                    self.retry_or_fail(&mut retry, &format!("downloading {}: {e}", desc.digest))?;
                    continue;
                }
                if dest.offset() < desc.size {
                    self.retry_or_fail(
                        &mut retry,
                        &format!(
                            "downloading {}: connection closed at {} of {} bytes",
                            desc.digest,
                            dest.offset(),
                            desc.size
                        ),
                    )?;
                    continue;
                }
            }
            match dest.finish() {
                Ok(p) => return Ok(p),
                Err(e @ (StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. })) => {
                    // A partial left by an earlier attempt may have been bad: try once from zero.
                    if may_restart && dest.resumed_from() > 0 {
                        log::warn!("{e}; downloading it again from the start");
                        may_restart = false;
                        dest.reset()?;
                        if on_bytes(0).is_break() {
                            return Err(RegistryError::Aborted);
                        }
                        continue;
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A 416, or a 206 for other bytes than asked: start the blob over, but count it against the
    /// retry budget (a server that always answers so would otherwise be asked forever) and give a
    /// stop request its chance.
    fn restart_after_bad_answer(
        &self,
        retry: &mut Retry,
        dest: &mut BlobWriter,
        on_bytes: &mut dyn FnMut(u64) -> ControlFlow<()>,
        why: &str,
    ) -> Result<(), RegistryError> {
        dest.reset()?;
        if on_bytes(0).is_break() {
            return Err(RegistryError::Aborted);
        }
        self.retry_or_fail(retry, &format!("{why}; starting it over"))
    }
}

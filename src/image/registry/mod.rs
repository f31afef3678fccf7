//! A small, synchronous OCI distribution client on ureq: manifests (index → platform manifest),
//! config and layer blobs, token/basic auth, retries, resumable verified blob downloads.
//!
//! Design notes:
//! - Redirects are followed by hand (ureq's own following is off), so `Authorization` is only ever
//!   sent to the registry's own scheme+host+port, `Range` survives the hop to blob storage, and an
//!   https → http downgrade is refused unless the registry is marked insecure.
//! - One retry policy (bounded exponential backoff honouring `Retry-After`, bounded attempts and total
//!   time) covers connection errors, 429 and 5xx. TLS certificate failures are never retried.
//! - A bearer token (or basic header) is cached per client and reused by every request of the pull;
//!   a 401 with a cached token refreshes it once.
//! - Trust roots: the system bundle plus `CODER_EXTRA_CERTS_PATH`, loaded once into [`TlsRoots`].
//!   ureq builds its rustls `ClientConfig` from the same certificate list with the same provider
//!   (ring) that [`TlsRoots::rustls_config`] uses, so the registry and the Coder log sender trust the
//!   same set.
//!
//! Layout: [`tls`] the trust store, [`challenge`] the `WWW-Authenticate` parser, `http` the retry,
//! redirect and auth plumbing, `client` manifest resolution and blobs; the pure OCI model and
//! platform selection live in [`crate::image::oci`].

pub mod challenge;
mod client;
mod http;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

use crate::image::store::StoreError;

pub use crate::image::oci::{
    ImageConfig, LayerDesc, Platform, ResolvedImage, MT_DOCKER_LIST, MT_DOCKER_MANIFEST,
    MT_OCI_INDEX, MT_OCI_MANIFEST,
};
pub use challenge::{parse_www_authenticate, Challenge};
pub use client::{ClientOptions, RegistryClient};
pub use http::RetryPolicy;
pub use tls::{tls_config, ureq_agent, TlsRoots, EXTRA_CERTS_ENV, SYSTEM_CA_BUNDLE};

const PULL_SECRET_ENV: &str = "CODER_IMAGE_PULL_SECRET";

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 32 << 20;
const MAX_REDIRECTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("authentication failed for registry {registry} (check {PULL_SECRET_ENV}){detail}")]
    AuthFailed { registry: String, detail: String },
    #[error("access to {reference} denied by registry {registry}: the credentials do not allow pulling it{detail}")]
    Denied {
        registry: String,
        reference: String,
        detail: String,
    },
    #[error("image or tag not found: {reference}{detail}")]
    NotFound { reference: String, detail: String },
    #[error("blob {digest} of {reference} not found in the registry")]
    BlobNotFound { reference: String, digest: String },
    #[error("TLS certificate of registry {registry} is not trusted ({detail}); if it uses a private CA, provide it with {EXTRA_CERTS_ENV}")]
    UnknownCa { registry: String, detail: String },
    #[error("TLS connection to registry {registry} failed: {detail}")]
    Tls { registry: String, detail: String },
    #[error(
        "registry {registry} unreachable after {attempts} attempts over {elapsed:?}: {detail}"
    )]
    Unreachable {
        registry: String,
        attempts: u32,
        elapsed: Duration,
        detail: String,
    },
    #[error("unexpected HTTP {status} from {url}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("request to {url} failed: {detail}")]
    Request { url: String, detail: String },
    #[error("token service {realm} failed: {detail}")]
    Token { realm: String, detail: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("no image for {wanted} in {reference}; the index has: {available}")]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("layer {digest} of {reference} is non-distributable ({media_type}); such \"foreign\" layers (e.g. Windows base layers) cannot be pulled from the registry")]
    NonDistributable {
        reference: String,
        digest: String,
        media_type: String,
    },
    #[error("{reference}: {what}")]
    Unsupported { reference: String, what: String },
    #[error("invalid manifest or config for {reference}: {reason}")]
    InvalidManifest { reference: String, reason: String },
    #[error("cannot load TLS roots from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("download aborted")]
    Aborted,
}

impl RegistryError {
    /// Errors that say "the registry could not be reached", as opposed to "the registry said no".
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. } | RegistryError::Request { .. }
        )
    }
}

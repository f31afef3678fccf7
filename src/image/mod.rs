//! Getting the workspace image: reference, credentials, registry, verified store, unpacked layers.

pub mod auth;
pub mod durable;
pub mod facts;
#[cfg(test)]
pub(crate) mod fuzz_rng;
pub mod gc;
pub mod oci;
pub mod persist;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod tarstream;
pub mod unpack;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ImageConfig;
use crate::pid1::supervisor::Supervisor;
use reference::ImageRef;
use registry::{ClientOptions, RegistryClient, TlsRoots};
use store::{BlobStore, Progress, PulledImage};

/// Concurrent layer downloads: enough to hide per-request latency, few enough for a 2-core node.
const PULL_PARALLELISM: usize = 3;
/// The build log gets at most one progress line this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Pull(#[from] store::PullError),
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("CODER_INNER_IMAGE: {0}")]
    Reference(#[from] reference::RefError),
}

/// What a pull reports to the user, besides the image itself.
pub struct PullOutcome {
    pub pulled: PulledImage,
    pub elapsed: Duration,
}

/// Resolves credentials, pulls every missing blob into the cache and reports progress through
/// `say`. `cancel` stops it between requests.
/// `sup`: envbox's supervisor when it runs as PID 1, so credential helpers are reaped by it.
pub fn pull(
    cfg: &ImageConfig,
    sup: Option<Arc<Supervisor>>,
    cancel: &AtomicBool,
    say: &(dyn Fn(&str) + Sync),
) -> Result<PullOutcome, ImageError> {
    let started = Instant::now();
    let image = ImageRef::parse(&cfg.reference)?;
    let resolved = auth::resolve_with(
        &image.registry,
        cfg.pull_secret.as_ref().map(|s| s.expose()),
        &cfg.docker_config,
        &auth::ExecHelper {
            path: None,
            supervisor: sup,
        },
    )?;
    log::info!("registry credentials: {}", resolved.description);
    for w in &resolved.warnings {
        say(w);
    }
    let roots = TlsRoots::load(cfg.extra_certs.as_deref())?;
    let plain_http = cfg.insecure_registries.iter().any(|r| r == &image.registry);
    let client = RegistryClient::with_options(
        image.clone(),
        resolved.credentials,
        &roots,
        ClientOptions {
            plain_http,
            ..Default::default()
        },
    );
    let store = BlobStore::open(&cfg.cache_dir)?;
    // Partial downloads nobody resumed within a day are not worth their disk space.
    match store.sweep_tmp(Duration::from_secs(86400)) {
        Ok(0) => {}
        Ok(n) => log::info!("removed {n} stale temporary files from the cache"),
        Err(e) => log::warn!("cleaning the cache's tmp/: {e}"),
    }
    say(&format!("Pulling image {image}..."));
    let last = Mutex::new(Instant::now());
    let name = image.to_string();
    let progress = |p: Progress| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            say(&format!(
                "Pulling {name}: {} of {} MiB, {}/{} layers",
                p.bytes_done >> 20,
                p.bytes_total >> 20,
                p.layers_done,
                p.layers_total
            ));
        }
    };
    let pulled = store::pull_cancellable(&client, &store, PULL_PARALLELISM, cancel, progress)?;
    // What this process pulled stays in use (safe from any cache GC) until it exits.
    gc::keep_for_process(pulled.holds.clone());
    Ok(PullOutcome {
        pulled,
        elapsed: started.elapsed(),
    })
}

/// The layer blobs of a pulled image, in application order.
pub fn layer_blobs(p: &PulledImage) -> Vec<rootfs::LayerBlob> {
    p.image
        .layers
        .iter()
        .zip(&p.layer_paths)
        .enumerate()
        .map(|(i, (d, path))| rootfs::LayerBlob {
            digest: d.digest.clone(),
            media_type: d.media_type.clone(),
            path: path.clone(),
            diff_id: p.image.diff_ids.get(i).cloned(),
        })
        .collect()
}

pub fn total_size(p: &PulledImage) -> u64 {
    p.image.layers.iter().map(|l| l.size).sum()
}

//! The workspace's root filesystem for one start.
//!
//! Each layer is unpacked once, uid-shifted, into an overlayfs lower directory under
//! `<cache>/layers/`, published by an atomic rename only when complete (an interrupted unpack is never
//! used). Every start mounts an overlay of those layers with a fresh upper and work directory under
//! the state directory, so a warm start copies nothing. Where overlay cannot be mounted, the layers are
//! applied into a flattened copy instead, and the build log says so.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bundle::spec::ID_MAP_HOST_START;
use crate::image::unpack::{apply_layer, apply_layer_overlay, Compression, IdShift, UnpackError};
use crate::sys::Kernel;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("unpacking layer {digest}: {source}")]
    Unpack { digest: String, source: UnpackError },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { op, path, source }
}

/// One layer blob, verified and stored, in application order (base first).
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: String,
    pub media_type: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    Overlay,
    Flattened,
}

#[derive(Debug)]
pub struct Rootfs {
    pub path: PathBuf,
    pub kind: RootfsKind,
    /// Layers unpacked by this start (0 on a warm start).
    pub unpacked_layers: usize,
}

/// Short directory names keep the overlay mount options under the kernel's page-size limit for
/// images of 100 and more layers (names are relative to the layers directory, see `mount_overlay`).
fn layer_dir_name(digest: &str) -> String {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    hex.chars().take(20).collect()
}

pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub fn open(cache_dir: &Path) -> Result<Self, RootfsError> {
        let dir = cache_dir.join("layers");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(LayerCache { dir })
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(layer_dir_name(digest))
    }

    /// Unpacks the layer into its lower directory unless a complete one exists. Returns whether it
    /// unpacked. Concurrent starts sharing the cache each unpack into a private directory; the first
    /// rename wins and the others discard theirs.
    pub fn ensure(&self, layer: &LayerBlob) -> Result<bool, RootfsError> {
        let done = self.path(&layer.digest);
        if done.is_dir() {
            return Ok(false);
        }
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            layer_dir_name(&layer.digest),
            std::process::id()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("remove stale", &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let tree = tmp.join("t");
        std::fs::create_dir(&tree).map_err(io("create", &tree))?;
        apply_blob(layer, |r, c| {
            apply_layer_overlay(&tree, r, c, &IdShift::ENVBOX)
        })?;
        std::fs::write(tmp.join("digest"), &layer.digest).map_err(io("write", &tmp))?;
        match std::fs::rename(&tmp, &done) {
            Ok(()) => Ok(true),
            Err(_) if done.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => Err(io("publish", &done)(e)),
        }
    }
}

fn apply_blob(
    layer: &LayerBlob,
    apply: impl FnOnce(
        BufReader<File>,
        Compression,
    ) -> Result<crate::image::unpack::LayerStats, UnpackError>,
) -> Result<(), RootfsError> {
    let f = File::open(&layer.path).map_err(io("open", &layer.path))?;
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let compression = match Compression::from_media_type(&layer.media_type) {
        Some(c) => c,
        None => Compression::sniff_reader(&mut r).map_err(io("read", &layer.path))?,
    };
    apply(r, compression)
        .map(|_| ())
        .map_err(|source| RootfsError::Unpack {
            digest: layer.digest.clone(),
            source,
        })
}

/// Builds `<state>/rootfs` for this start.
pub fn prepare(
    kernel: &dyn Kernel,
    cache_dir: &Path,
    state_dir: &Path,
    layers: &[LayerBlob],
    notice: &dyn Fn(&str),
) -> Result<Rootfs, RootfsError> {
    let target = state_dir.join("rootfs");
    clear_previous(kernel, state_dir, &target)?;
    match prepare_overlay(kernel, cache_dir, state_dir, &target, layers) {
        Ok(n) => Ok(Rootfs {
            path: target,
            kind: RootfsKind::Overlay,
            unpacked_layers: n,
        }),
        Err(OverlayFailure::Unpack(e)) => Err(e),
        Err(OverlayFailure::Mount(e)) => {
            notice(&format!(
                "Cannot mount an overlay root filesystem ({e}); unpacking a full copy instead, which is slower and uses more disk"
            ));
            flatten(state_dir, &target, layers)
        }
    }
}

enum OverlayFailure {
    Unpack(RootfsError),
    Mount(std::io::Error),
}

fn prepare_overlay(
    kernel: &dyn Kernel,
    cache_dir: &Path,
    state_dir: &Path,
    target: &Path,
    layers: &[LayerBlob],
) -> Result<usize, OverlayFailure> {
    let cache = LayerCache::open(cache_dir).map_err(OverlayFailure::Unpack)?;
    let mut unpacked = 0;
    for l in layers {
        if cache.ensure(l).map_err(OverlayFailure::Unpack)? {
            unpacked += 1;
        }
    }
    let upper = state_dir.join("upper");
    let work = state_dir.join("work");
    for d in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(OverlayFailure::Mount)?;
    }
    // sysbox decides whether to shift a rootfs by its top directory's owner: 100000 means "already
    // shifted", so it neither idmaps the lowers nor chowns the upper.
    kernel
        .chown(&upper, ID_MAP_HOST_START, ID_MAP_HOST_START)
        .map_err(OverlayFailure::Mount)?;
    kernel.chmod(&upper, 0o755).map_err(OverlayFailure::Mount)?;
    // overlayfs lists the uppermost lower directory first.
    let lowers: Vec<PathBuf> = layers
        .iter()
        .rev()
        .map(|l| PathBuf::from(layer_dir_name(&l.digest)).join("t"))
        .collect();
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount_relative(
        kernel,
        &cache_dir.join("layers"),
        &lower_refs,
        &upper,
        &work,
        target,
    )
    .map_err(OverlayFailure::Mount)?;
    Ok(unpacked)
}

/// Mounts with lower directories named relative to `base`: the kernel resolves relative lowerdir
/// paths against the caller's working directory, which keeps the option string short.
fn mount_relative(
    kernel: &dyn Kernel,
    base: &Path,
    lowers: &[&Path],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> std::io::Result<()> {
    let prev = std::env::current_dir()?;
    std::env::set_current_dir(base)?;
    let r = kernel.mount_overlay(lowers, upper, work, target);
    std::env::set_current_dir(prev)?;
    r
}

/// Undoes what a previous start (or a crash) left: the workspace always starts from the image.
fn clear_previous(kernel: &dyn Kernel, state_dir: &Path, target: &Path) -> Result<(), RootfsError> {
    if target.exists() {
        // Not mounted is the normal case; anything else shows up when removing below.
        let _ = kernel.unmount(target, true);
    }
    for d in ["rootfs", "upper", "work"] {
        let p = state_dir.join(d);
        if p.exists() {
            remove_tree(&p)?;
        }
    }
    Ok(())
}

fn remove_tree(p: &Path) -> Result<(), RootfsError> {
    std::fs::remove_dir_all(p).map_err(io("remove", p))
}

fn flatten(state_dir: &Path, target: &Path, layers: &[LayerBlob]) -> Result<Rootfs, RootfsError> {
    let t = Instant::now();
    let _ = state_dir;
    std::fs::create_dir_all(target).map_err(io("create", target))?;
    for l in layers {
        apply_blob(l, |r, c| apply_layer(target, r, c, &IdShift::ENVBOX))?;
    }
    std::os::unix::fs::chown(target, Some(ID_MAP_HOST_START), Some(ID_MAP_HOST_START))
        .map_err(io("chown", target))?;
    log::info!("flattened {} layers in {:.1?}", layers.len(), t.elapsed());
    Ok(Rootfs {
        path: target.to_path_buf(),
        kind: RootfsKind::Flattened,
        unpacked_layers: layers.len(),
    })
}

pub fn release(kernel: &dyn Kernel, rootfs: &Rootfs) {
    if rootfs.kind == RootfsKind::Overlay {
        if let Err(e) = kernel.unmount(&rootfs.path, false) {
            log::warn!("{e}; detaching it instead");
            let _ = kernel.unmount(&rootfs.path, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_dirs_are_short_and_stable() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(layer_dir_name(d), "0123456789abcdef0123");
        // 128 layers of "<20 chars>/t:" stay far below the 4096-byte option limit.
        assert!(128 * (layer_dir_name(d).len() + 3) < 3500);
    }
}

//! The workspace's root filesystem for one start.
//!
//! Each layer is unpacked once, uid-shifted, into an overlayfs lower directory under
//! `<cache>/layers/`, published by an atomic rename only when complete and its diff_id verified (an
//! interrupted unpack is never used, and its private `.tmp-*` directory is removed by the next start
//! once no live process holds its lock). Layers are named by their digest; a layer that hard-links
//! files of the layers below it is only valid on top of them and is named by its chain instead. Every
//! start mounts an overlay of those layers with a fresh upper and work directory under the state
//! directory, so a warm start copies nothing. Where overlay cannot be mounted, the layers are applied
//! into a flattened copy instead, and the build log says so; where the cache's file system is full,
//! the flattened copy goes to the ephemeral directory the caller names, and the build log says so.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};
use sha2::{Digest as _, Sha256};

use crate::bundle::spec::ID_MAP_HOST_START;
use crate::image::durable;
use crate::image::unpack::{
    apply_layer, apply_layer_overlay, Compression, IdShift, LayerStats, UnpackError,
};
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
    #[error("no space left for the root filesystem: {0}")]
    NoSpace(String),
    #[error("overlayfs refused the kept writable layer: {0}")]
    KeptUpperRefused(std::io::Error),
}

/// Whether the writable layer starts empty or is the one the last start left (CODER_PERSIST_ROOTFS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperMode {
    Fresh,
    Keep,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { op, path, source }
}

impl RootfsError {
    /// Whether the file system ran out of space (or quota) somewhere below this error.
    pub fn is_no_space(&self) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = e {
            if let Some(ioe) = err.downcast_ref::<std::io::Error>() {
                if matches!(ioe.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return true;
                }
            }
            e = err.source();
        }
        matches!(self, RootfsError::NoSpace(_))
    }
}

/// One layer blob, verified and stored, in application order (base first).
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: String,
    pub media_type: String,
    pub path: PathBuf,
    /// The image configuration's `rootfs.diff_ids` entry: the digest of the uncompressed layer,
    /// checked while unpacking when present.
    pub diff_id: Option<String>,
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

/// The full hex of a digest: the directory name used when the short one holds another layer.
fn full_hex(digest: &str) -> String {
    digest.rsplit(':').next().unwrap_or(digest).to_string()
}

/// Names a layer that depends on the layers below it (it hard-links files of theirs): sha256 over
/// the directory names below it and its digest, in hex; its first 20 digits are the short name.
fn chain_hash(below: &[CachedLayer], digest: &str) -> String {
    let mut h = Sha256::new();
    for b in below {
        h.update(b.name.as_bytes());
        h.update(b"\n");
    }
    h.update(digest.as_bytes());
    hex::encode(h.finalize())
}

/// The contents of a layer directory's `digest` file: the layer's full digest and, for a layer
/// valid only on top of the layers below it, their directory names.
fn layer_info(digest: &str, below: &[CachedLayer]) -> String {
    let mut info = format!("{digest}\n");
    for b in below {
        info.push_str(&format!("below {}\n", b.name));
    }
    info
}

/// Whether the layer directory `dir` holds exactly the layer `info` describes.
fn holds(dir: &Path, info: &str) -> bool {
    std::fs::read(dir.join("digest")).is_ok_and(|b| b == info.as_bytes())
}

/// A layer unpacked in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    /// Directory name under the layers directory; the overlay lower directory is `<name>/t`.
    pub name: String,
    /// Whether this call unpacked it (false: it was already there).
    pub unpacked: bool,
}

const TMP_PREFIX: &str = ".tmp-";

pub struct LayerCache {
    dir: PathBuf,
    swept: AtomicBool,
}

impl LayerCache {
    pub fn open(cache_dir: &Path) -> Result<Self, RootfsError> {
        crate::image::durable::private_dir(cache_dir, 0o700)
            .map_err(io("create cache directory (mode 0700)", cache_dir))?;
        let dir = cache_dir.join("layers");
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(LayerCache {
            dir,
            swept: AtomicBool::new(false),
        })
    }

    /// The layers directory (overlay lower directories are `<this>/<name>/t`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The overlay lower directory of a cached layer.
    pub fn lower_dir(&self, layer: &CachedLayer) -> PathBuf {
        self.dir.join(&layer.name).join("t")
    }

    /// Ensures every layer of one image, base first. Returns them in the same order.
    pub fn ensure_all(&self, layers: &[LayerBlob]) -> Result<Vec<CachedLayer>, RootfsError> {
        let mut done: Vec<CachedLayer> = Vec::with_capacity(layers.len());
        for l in layers {
            let c = self.ensure(l, &done)?;
            done.push(c);
        }
        Ok(done)
    }

    /// Unpacks the layer into its lower directory unless a complete one exists. `below` are the
    /// layers under it in the same image, base first, as returned by earlier calls: hard links to
    /// their files are resolved through them (a layer with such links is kept under a name of its
    /// own chain, since it is only valid on top of those layers).
    ///
    /// A layer is unpacked into a private `.tmp-*` directory, locked (`flock`) while in use, and
    /// published by an atomic rename only once complete and verified; on any error that directory
    /// is removed. Concurrent starts sharing the cache each unpack privately; the first rename wins
    /// and the others discard theirs. The first call removes `.tmp-*` directories left by
    /// processes that died (their lock is free), whatever their pid namespace.
    pub fn ensure(
        &self,
        layer: &LayerBlob,
        below: &[CachedLayer],
    ) -> Result<CachedLayer, RootfsError> {
        if !self.swept.swap(true, Ordering::Relaxed) {
            self.remove_stale_tmp();
        }
        // Each kind of name has a short form (kept short for the overlay mount options) and,
        // should the short one hold another layer, the full-length form. A directory is only
        // reused when its `digest` file names this very layer (and the layers below it).
        let plain = [layer_dir_name(&layer.digest), full_hex(&layer.digest)];
        let plain_info = layer_info(&layer.digest, &[]);
        let chained = {
            let h = chain_hash(below, &layer.digest);
            [h[..20].to_string(), h]
        };
        let chained_info = layer_info(&layer.digest, below);
        let plain_slot = self.slot(&plain, &plain_info)?;
        if plain_slot.1 {
            return Ok(CachedLayer {
                name: plain_slot.0,
                unpacked: false,
            });
        }
        let chained_slot = if below.is_empty() {
            None
        } else {
            let s = self.slot(&chained, &chained_info)?;
            if s.1 {
                return Ok(CachedLayer {
                    name: s.0,
                    unpacked: false,
                });
            }
            Some(s)
        };
        let tmp = TmpDir::create(&self.dir, &plain[0])?;
        let tree = tmp.path.join("t");
        let lowers: Vec<PathBuf> = below.iter().rev().map(|b| self.lower_dir(b)).collect();
        let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        let stats = std::fs::create_dir(&tree)
            .map_err(io("create", &tree))
            .and_then(|()| {
                apply_blob(layer, |r, c, d| {
                    apply_layer_overlay(&tree, &lower_refs, r, c, &IdShift::ENVBOX, d)
                })
            });
        let stats = match stats {
            Ok(s) => s,
            Err(e) => {
                tmp.discard();
                return Err(e);
            }
        };
        let (name, info) = if stats.lower_links > 0 {
            log::info!(
                "layer {} hard-links {} files of the layers below it; cached for this chain",
                layer.digest,
                stats.lower_links
            );
            // `lower_links > 0` needs lowers, so `below` is not empty.
            let slot = chained_slot.unwrap_or_else(|| (chained[0].clone(), false));
            (slot.0, chained_info)
        } else {
            (plain_slot.0, plain_info)
        };
        // Every pod sharing the cache trusts a published layer forever, so all of it (files,
        // metadata, the digest file) must be on disk before its name is: one syncfs of the cache's
        // file system is far cheaper than an fsync per file.
        let written = std::fs::write(tmp.path.join("digest"), &info)
            .map_err(io("write", &tmp.path))
            .and_then(|()| durable::syncfs(&tmp.path).map_err(io("syncfs", &tmp.path)));
        if let Err(e) = written {
            tmp.discard();
            return Err(e);
        }
        let done = self.dir.join(&name);
        match durable::publish_rename(&tmp.path, &done) {
            Ok(()) => {
                tmp.published();
                // The rename itself is durable only once the layers directory is.
                durable::fsync_dir(&self.dir).map_err(io("fsync", &self.dir))?;
                Ok(CachedLayer {
                    name,
                    unpacked: true,
                })
            }
            Err(_) if holds(&done, &info) => {
                // Another start published the same layer first.
                tmp.discard();
                Ok(CachedLayer {
                    name,
                    unpacked: false,
                })
            }
            Err(e) => {
                tmp.discard();
                Err(io("publish", &done)(e))
            }
        }
    }

    /// The first of `names` that holds the layer `info` describes (`true`), else the first that
    /// is free (`false`). A directory holding anything else is skipped: a prefix collision, or
    /// a directory whose `digest` file is missing or damaged.
    fn slot(&self, names: &[String], info: &str) -> Result<(String, bool), RootfsError> {
        for n in names {
            let p = self.dir.join(n);
            match std::fs::symlink_metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((n.clone(), false))
                }
                Err(e) => return Err(io("stat", &p)(e)),
                Ok(_) if holds(&p, info) => return Ok((n.clone(), true)),
                Ok(_) => log::warn!(
                    "layer directory {} does not hold layer {:?}; not using it",
                    p.display(),
                    info.lines().next().unwrap_or("")
                ),
            }
        }
        Err(RootfsError::Io {
            op: "find a free layer directory",
            path: self.dir.join(names.last().map_or("", String::as_str)),
            source: std::io::Error::other(
                "every candidate name holds another layer; remove those directories from the cache",
            ),
        })
    }

    /// Removes `.tmp-*` directories whose owner is gone: nobody holds their lock. Holding the
    /// layers directory's lock exclusively keeps out creators between `mkdir` and `flock`.
    fn remove_stale_tmp(&self) {
        let Ok(dir_lock) = File::open(&self.dir) else {
            return;
        };
        if rfs::flock(&dir_lock, FlockOperation::LockExclusive).is_err() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes()) {
                continue;
            }
            let p = e.path();
            let Ok(fd) = rfs::open(
                &p,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            match rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    log::info!("removing {}, left by an interrupted unpack", p.display());
                    if let Err(e) = std::fs::remove_dir_all(&p) {
                        log::warn!("removing {}: {e}", p.display());
                    }
                }
                Err(_) => log::debug!("{} is in use by another unpack", p.display()),
            }
        }
        drop(dir_lock);
    }
}

/// A private unpack directory, locked while this process uses it.
struct TmpDir {
    path: PathBuf,
    _lock: OwnedFd,
}

impl TmpDir {
    fn create(layers: &Path, name: &str) -> Result<Self, RootfsError> {
        // Random, not pid-based: every envbox is PID 1, so pids repeat across pods.
        let path = layers.join(format!(
            "{TMP_PREFIX}{name}-{}",
            crate::image::durable::random_hex()
        ));
        // Shared lock on the layers directory from mkdir to flock: a sweeper (exclusive) never
        // sees the new directory unlocked.
        let dir_lock = File::open(layers).map_err(io("open", layers))?;
        rfs::flock(&dir_lock, FlockOperation::LockShared)
            .map_err(|e| io("lock", layers)(e.into()))?;
        std::fs::create_dir(&path).map_err(io("create", &path))?;
        let lock = rfs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(|fd| rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive).map(|()| fd));
        drop(dir_lock);
        match lock {
            Ok(fd) => Ok(TmpDir { path, _lock: fd }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&path);
                Err(io("lock", &path)(e.into()))
            }
        }
    }

    fn discard(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            log::warn!("removing {}: {e}", self.path.display());
        }
    }

    fn published(self) {}
}

fn apply_blob(
    layer: &LayerBlob,
    apply: impl FnOnce(BufReader<File>, Compression, Option<&str>) -> Result<LayerStats, UnpackError>,
) -> Result<LayerStats, RootfsError> {
    let f = File::open(&layer.path).map_err(io("open", &layer.path))?;
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let compression = match Compression::from_media_type(&layer.media_type) {
        Some(c) => c,
        None => Compression::sniff_reader(&mut r).map_err(io("read", &layer.path))?,
    };
    apply(r, compression, layer.diff_id.as_deref()).map_err(|source| RootfsError::Unpack {
        digest: layer.digest.clone(),
        source,
    })
}

/// Builds the root filesystem for this start: normally `<state>/rootfs`, an overlay of the cached
/// layers.
///
/// When the cache has no space left to unpack a layer, and `ephemeral_dir` is given, the partial
/// layer is removed and the whole image is unpacked as a flattened copy into
/// `<ephemeral_dir>/rootfs` instead (one `notice` line says so); that copy is not kept for later
/// starts. A flattened copy left there by a previous start is removed first.
pub fn prepare(
    kernel: &dyn Kernel,
    cache_dir: &Path,
    state_dir: &Path,
    layers: &[LayerBlob],
    ephemeral_dir: Option<&Path>,
    upper_mode: UpperMode,
    notice: &dyn Fn(&str),
) -> Result<Rootfs, RootfsError> {
    let target = state_dir.join("rootfs");
    clear_previous(kernel, state_dir, &target, upper_mode)?;
    if let Some(eph) = ephemeral_dir {
        let old = eph.join("rootfs");
        if old.exists() {
            remove_tree(&old)?;
        }
    }
    match prepare_overlay(kernel, cache_dir, state_dir, &target, layers) {
        Ok(n) => Ok(Rootfs {
            path: target,
            kind: RootfsKind::Overlay,
            unpacked_layers: n,
        }),
        Err(OverlayFailure::Unpack(e)) if e.is_no_space() => {
            let Some(eph) = ephemeral_dir else {
                return Err(RootfsError::NoSpace(format!(
                    "the image cache {} is full ({e})",
                    cache_dir.display()
                )));
            };
            flatten_ephemeral(cache_dir, eph, layers, &e, notice)
        }
        Err(OverlayFailure::Unpack(e)) => Err(e),
        Err(OverlayFailure::Mount(e)) if upper_mode == UpperMode::Keep => {
            Err(RootfsError::KeptUpperRefused(e))
        }
        Err(OverlayFailure::Mount(e)) => {
            notice(&format!(
                "Cannot mount an overlay root filesystem ({e}); unpacking a full copy instead, which is slower and uses more disk"
            ));
            flatten(&target, layers)
        }
    }
}

fn flatten_ephemeral(
    cache_dir: &Path,
    eph: &Path,
    layers: &[LayerBlob],
    cause: &RootfsError,
    notice: &dyn Fn(&str),
) -> Result<Rootfs, RootfsError> {
    std::fs::create_dir_all(eph).map_err(io("create", eph))?;
    // The compressed size is a lower bound of what the copy needs.
    let needed: u64 = layers
        .iter()
        .filter_map(|l| std::fs::metadata(&l.path).ok())
        .map(|m| m.len())
        .sum();
    let available = rfs::statvfs(eph)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| io("statvfs", eph)(e.into()))?;
    let mib = |b: u64| b >> 20;
    if available < needed {
        return Err(RootfsError::NoSpace(format!(
            "the image cache {} is full and {} has only {} MiB free, less than the image's {} MiB of compressed layers",
            cache_dir.display(),
            eph.display(),
            mib(available),
            mib(needed)
        )));
    }
    notice(&format!(
        "The image cache {} has no space left; unpacking the image into ephemeral storage at {} instead ({} MiB free), which is slower and not kept for the next start",
        cache_dir.display(),
        eph.display(),
        mib(available)
    ));
    log::info!("cache unpack failed: {cause}");
    let target = eph.join("rootfs");
    match flatten(&target, layers) {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&target);
            if e.is_no_space() {
                Err(RootfsError::NoSpace(format!(
                    "the image cache {} is full, and so is {} ({e})",
                    cache_dir.display(),
                    eph.display()
                )))
            } else {
                Err(e)
            }
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
    let cached = cache.ensure_all(layers).map_err(OverlayFailure::Unpack)?;
    let unpacked = cached.iter().filter(|c| c.unpacked).count();
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
    let lowers: Vec<PathBuf> = cached
        .iter()
        .rev()
        .map(|c| PathBuf::from(&c.name).join("t"))
        .collect();
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    mount_relative(kernel, cache.dir(), &lower_refs, &upper, &work, target)
        .map_err(OverlayFailure::Mount)?;
    Ok(unpacked)
}

/// Mounts with lower directories named relative to `base`: the kernel resolves relative lowerdir
/// paths against the caller's working directory, which keeps the option string short.
///
/// PID 1 is multithreaded, and `chdir` changes the working directory of every thread sharing the
/// file-system context; so the mount runs on a thread of its own that first unshares that context
/// (`CLONE_FS`) and only then changes directory.
fn mount_relative(
    kernel: &dyn Kernel,
    base: &Path,
    lowers: &[&Path],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> std::io::Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(CLONE_FS) only gives this thread a private copy of its cwd, root
            // and umask; it touches no memory.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::env::set_current_dir(base)?;
            kernel.mount_overlay(lowers, upper, work, target)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Undoes what a previous start (or a crash) left: the workspace always starts from the image.
fn clear_previous(
    kernel: &dyn Kernel,
    state_dir: &Path,
    target: &Path,
    upper_mode: UpperMode,
) -> Result<(), RootfsError> {
    if target.exists() {
        // Not mounted is the normal case; anything else shows up when removing below.
        let _ = kernel.unmount(target, true);
    }
    // A kept upper goes with a work directory emptied, as overlayfs needs it after a crash (a
    // killed start leaves its work/work behind); the work directory is recreated below.
    let dirs: &[&str] = match upper_mode {
        UpperMode::Fresh => &["rootfs", "upper", "work"],
        UpperMode::Keep => &["rootfs", "work"],
    };
    for d in dirs {
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

fn flatten(target: &Path, layers: &[LayerBlob]) -> Result<Rootfs, RootfsError> {
    let t = Instant::now();
    std::fs::create_dir_all(target).map_err(io("create", target))?;
    for l in layers {
        apply_blob(l, |r, c, d| apply_layer(target, r, c, &IdShift::ENVBOX, d))?;
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

    /// A plain tar layer holding one file, stored under `dir`.
    fn tar_blob(dir: &Path, digest: &str, file: &str, data: &[u8]) -> LayerBlob {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, file, data).unwrap();
        let path = dir.join(digest.replace(':', "-"));
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        LayerBlob {
            digest: digest.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            path,
            diff_id: None,
        }
    }

    /// Issue 16 defect 9: the relative overlay mount changed the working directory of the whole
    /// multithreaded PID 1 (every thread resolving a relative path meanwhile saw the cache).
    #[test]
    fn relative_overlay_mount_keeps_the_process_cwd() {
        let tmp = tempfile::tempdir().unwrap();
        let k = crate::sys::fake::RecordingKernel::default();
        let before = std::fs::read_link("/proc/self/cwd").unwrap();
        let p = tmp.path();
        mount_relative(
            &k,
            p,
            &[Path::new("l/t")],
            &p.join("u"),
            &p.join("w"),
            &p.join("m"),
        )
        .unwrap();
        let cwds = k.overlay_cwds.lock().unwrap().clone();
        assert_eq!(cwds, [(p.to_path_buf(), before.clone())]);
        assert_eq!(std::fs::read_link("/proc/self/cwd").unwrap(), before);
    }

    /// Issue 16 defect 2: a published layer is trusted forever by every pod sharing the cache,
    /// so its files must be on disk before its name is (and the name before `ensure` returns).
    #[test]
    fn layers_reach_the_disk_before_they_are_published() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(&tmp.path().join("cache")).unwrap();
        let l = tar_blob(
            tmp.path(),
            &format!("sha256:{}", "c".repeat(64)),
            "f",
            b"data",
        );
        crate::image::durable::take_events();
        let c = cache.ensure(&l, &[]).unwrap();
        let ev = crate::image::durable::take_events();
        let done = cache.dir().join(&c.name);
        let publish = ev
            .iter()
            .position(|e| *e == format!("rename {}", done.display()))
            .unwrap_or_else(|| panic!("no publishing rename recorded: {ev:?}"));
        assert!(
            ev[..publish].iter().any(|e| e.starts_with("syncfs ")),
            "published without syncing the tree first: {ev:?}"
        );
        assert!(
            ev[publish..].contains(&format!("fsync_dir {}", cache.dir().display())),
            "layers/ not fsynced after the rename: {ev:?}"
        );
    }

    /// Issue 16 defect 6: two digests sharing the first 80 bits are different layers.
    #[test]
    fn layer_dirs_are_checked_against_the_full_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = LayerCache::open(&tmp.path().join("cache")).unwrap();
        let prefix = "sha256:0123456789abcdef0123";
        let a = tar_blob(
            tmp.path(),
            &format!("{prefix}{}", "a".repeat(44)),
            "a",
            b"A",
        );
        let b = tar_blob(
            tmp.path(),
            &format!("{prefix}{}", "b".repeat(44)),
            "b",
            b"B",
        );
        let ca = cache.ensure(&a, &[]).unwrap();
        assert!(ca.unpacked);
        let cb = cache.ensure(&b, &[]).unwrap();
        assert!(
            cb.unpacked,
            "layer {} reused the directory of {}",
            b.digest, a.digest
        );
        assert_ne!(ca.name, cb.name);
        assert_eq!(std::fs::read(cache.lower_dir(&cb).join("b")).unwrap(), b"B");
        // Both are found again, each in its own directory.
        assert_eq!(cache.ensure(&a, &[]).unwrap().name, ca.name);
        let again = cache.ensure(&b, &[]).unwrap();
        assert_eq!((again.name, again.unpacked), (cb.name, false));
        // A directory whose digest file is missing is never trusted.
        std::fs::remove_file(cache.dir().join(&ca.name).join("digest")).unwrap();
        assert_ne!(cache.ensure(&a, &[]).unwrap().name, ca.name);
    }
}

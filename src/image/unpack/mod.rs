//! Applying OCI/Docker image layers to a directory, safely, as root.
//!
//! The layer is untrusted input: it comes from whatever image the workspace names, and
//! we unpack it as root on the node. Everything here is built so that no entry can
//! touch anything outside the target directory:
//!
//! * The target directory is opened once. Every parent directory of an entry is
//!   resolved with `openat2(root, parent, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`,
//!   so `..` and absolute symlinks met during resolution stay inside the root, as
//!   they would inside the running container.
//! * The last component is created, replaced, chowned, chmodded and stamped with
//!   `*at` calls relative to that parent fd that never follow a symlink
//!   (`O_CREAT|O_EXCL|O_NOFOLLOW`, `mkdirat`, `symlinkat`, `mknodat`, `linkat` with
//!   flags 0, `fchownat(AT_SYMLINK_NOFOLLOW)`, `utimensat(AT_SYMLINK_NOFOLLOW)`), or on
//!   an fd of the object itself (`fchmod`, `fsetxattr`, `futimens`).
//! * Hard link targets are resolved the same way (parent `IN_ROOT`, final component
//!   not followed), so a link to `/etc/shadow` links the image's own `/etc/shadow`,
//!   and a link to a symlink links the symlink itself. In overlay format a target
//!   written by a lower layer is looked up through the merged view of the layer
//!   directories (see [`apply_layer_overlay`]) one `openat(O_NOFOLLOW)` at a time,
//!   and the lower directories are only ever read.
//! * Removal (replacements, whiteouts, opaque directories) walks directories by fd
//!   with `O_NOFOLLOW` and `unlinkat`, so a symlink is removed, never followed.
//!
//! # Decisions
//!
//! * **Names with `..`** are normalised lexically (`a/../b` is `b`). A name whose
//!   `..` components would climb above the root (`../etc/passwd`, `a/../../x`) is
//!   **rejected**: the unpack fails with [`UnpackError::Escape`] naming the entry. No
//!   image builder writes such names, so one is either corrupt or an attack, and
//!   silently writing the file somewhere other than where the archive says would hide
//!   that. This applies equally to hard link targets and whiteouts. Leading `/` and
//!   `./` are stripped, so absolute names are simply relative to the root.
//! * **Ids at or above [`IdShift::size`]** fail the unpack with
//!   [`UnpackError::IdOutOfRange`] naming the entry and the id. The container's user
//!   namespace only maps `offset..offset+size`; an on-disk owner outside that range
//!   would either belong to another pod's range or show up as `nobody` inside the
//!   container, and clamping to the overflow id would silently hand files (possibly
//!   setuid ones) to a different user. Docker with `userns-remap` refuses such images
//!   the same way.
//! * Extended attributes in the `trusted.overlay.` and `user.overlay.` namespaces are
//!   dropped with a warning: overlayfs would interpret them (`redirect`, `metacopy`,
//!   `opaque`) if the tree is used as a lower directory. Extended attributes on
//!   symlinks, devices and FIFOs are skipped with a warning, because they can only be
//!   set through a path (or by opening the device).
//! * A version 2 `security.capability` becomes version 3 with the container root's host id, and a
//!   version 3 one has its root id shifted like any other owner, so the capability applies inside the container's
//!   user namespace.
//! * Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) are applied when met,
//!   removing everything the layer has not itself written (tracked per layer), so
//!   their position in the archive does not matter (except for a hard link of the same
//!   layer to a whited-out path, which sees the whiteouts applied before it).
//! * The decompressed stream is checked against the image configuration's diff_id when
//!   the caller gives one; a mismatch fails the layer after its last byte.
//! * The archive is framed by [`crate::image::tarstream`], not the `tar` crate's reader:
//!   extension headers are capped (1 MiB), each layer has a budget of stream bytes and
//!   entries, and sparse entries (every GNU format) are refused rather than written with
//!   their holes filled.
//!
//! # Layout
//!
//! `pipeline` (decompression, diff_id, the entry loop), `resolve` (names, parents inside the root),
//! `apply` (the applier and entry creation), `meta` (owners, modes, times, xattrs, capabilities),
//! `overlay` (merged lower layers, cross-layer hard links, whiteouts, opaque directories).

use std::ffi::CStr;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use crate::image::tarstream::Limits;

mod apply;
#[cfg(test)]
mod fuzz;
mod meta;
mod overlay;
mod pipeline;
mod resolve;
#[cfg(test)]
mod tests;

use pipeline::*;
pub(crate) use resolve::open_in_root;

/// Size of the buffer file contents are copied through (reused for all entries).
const COPY_BUFFER: usize = 256 * 1024;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

/// `fchmodat2(2)`; the same number on every architecture (generic syscall table).
const SYS_FCHMODAT2: libc::c_long = 452;

/// How container ids map to ids on disk: container id `n` (for `n < size`) is stored
/// as `offset + n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdShift {
    pub offset: u32,
    pub size: u32,
}

impl IdShift {
    /// envbox's mapping: container 0 is host 100000, 65536 ids.
    pub const ENVBOX: IdShift = IdShift {
        offset: 100_000,
        size: 65_536,
    };

    /// No shift: ids are written as they are in the layer (all 32-bit ids allowed
    /// except the invalid `u32::MAX`).
    pub const IDENTITY: IdShift = IdShift {
        offset: 0,
        size: u32::MAX,
    };

    /// The on-disk id for container id `id`, or `None` when the container's range
    /// cannot represent it.
    pub fn map(&self, id: u64) -> Option<u32> {
        if id >= u64::from(self.size) {
            return None;
        }
        self.offset.checked_add(id as u32)
    }
}

impl Default for IdShift {
    fn default() -> Self {
        IdShift::ENVBOX
    }
}

/// Compression of a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// The compression named by an OCI or Docker layer media type; `None` when the
    /// media type is not a layer type we know (the caller should then [`sniff`]).
    ///
    /// [`sniff`]: Compression::sniff
    pub fn from_media_type(mt: &str) -> Option<Self> {
        let mt = mt.trim();
        let mt = mt.split(';').next().unwrap_or(mt).trim();
        match mt {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            _ if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") => Some(Compression::Gzip),
            _ if mt.ends_with("+zstd") || mt.ends_with(".tar.zstd") => Some(Compression::Zstd),
            _ if mt.starts_with("application/vnd.oci.image.layer.") && mt.ends_with(".tar") => {
                Some(Compression::None)
            }
            _ => None,
        }
    }

    /// Compression recognised by magic bytes: gzip `1f 8b`, zstd `28 b5 2f fd`,
    /// anything else is taken as a plain tar.
    pub fn sniff(first_bytes: &[u8]) -> Self {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// [`sniff`](Compression::sniff) the start of a buffered stream without
    /// consuming it.
    pub fn sniff_reader<R: BufRead>(reader: &mut R) -> io::Result<Self> {
        Ok(Compression::sniff(reader.fill_buf()?))
    }
}

/// What one layer wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Archive entries applied, whiteouts included.
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Hard links resolved through a lower layer (overlay format only): the layer
    /// directory then depends on the layers it was unpacked on.
    pub lower_links: u64,
}

/// Why a layer could not be applied. Entry names are the raw names from the archive.
#[derive(thiserror::Error, Debug)]
pub enum UnpackError {
    #[error("opening unpack target {root}: {source}")]
    OpenRoot { root: PathBuf, source: io::Error },

    #[error("reading the layer stream ({at}): {source}")]
    Read { at: String, source: io::Error },

    #[error("reading the layer ({at}): {source}")]
    Archive {
        at: String,
        source: crate::image::tarstream::TarError,
    },

    #[error("layer entry {entry:?}: {op}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        source: io::Error,
    },

    #[error("layer entry {entry:?}: its name or link target climbs above the root with '..'")]
    Escape { entry: String },

    #[error("layer entry {entry:?}: {kind} {id} is outside the container's id range 0..{size}")]
    IdOutOfRange {
        entry: String,
        kind: &'static str,
        id: u64,
        size: u32,
    },

    #[error("layer entry {entry:?}: unsupported tar entry type {type_flag:?}")]
    Unsupported { entry: String, type_flag: char },

    #[error("layer entry {entry:?}: {reason}")]
    Invalid { entry: String, reason: &'static str },

    #[error(
        "layer entry {entry:?}: hard link target {target:?} does not exist in this layer or \
         the layers below it (removed by a whiteout, or never written)"
    )]
    MissingLinkTarget { entry: String, target: String },

    #[error(
        "the layer's uncompressed content does not match the image configuration: \
         its digest is {actual}, the configuration's diff_id is {expected}"
    )]
    DiffIdMismatch { expected: String, actual: String },

    #[error("diff_id {0:?} in the image configuration is not a sha256 digest")]
    BadDiffId(String),
}

/// Applies one layer on top of the flattened root filesystem at `root`.
///
/// Layers are applied in order into the same directory. Whiteouts remove what lower
/// layers left in `root`; see the module documentation for the safety rules.
///
/// The stream is read to its end, so a digest-verifying reader sees every byte and the
/// gzip/zstd trailer is checked. With `expected_diff_id` (the image configuration's
/// `rootfs.diff_ids` entry, `sha256:<hex>`), the decompressed stream is hashed as it is
/// consumed and a mismatch fails with [`UnpackError::DiffIdMismatch`]. With more than
/// one CPU available, decompression (and hashing) run on the calling thread while a
/// scoped second thread parses the archive and writes files; no thread outlives the
/// call. Nothing is fsynced: sync once when every layer is in place. On error the tree
/// is partly written and should be discarded.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
    expected_diff_id: Option<&str>,
) -> Result<LayerStats, UnpackError> {
    apply(
        root,
        &[],
        layer,
        compression,
        shift,
        expected_diff_id,
        (Target::Flatten, Limits::default()),
    )
}

/// Writes one layer as an overlayfs lower directory at `layer_dir` (normally new and
/// empty): whiteouts become `c 0 0` device nodes, opaque markers become the
/// `trusted.overlay.opaque=y` xattr on their directory.
///
/// `lowers` are the directories of the layers below, uppermost first, exactly as they
/// will be stacked under this one. They are only read, to resolve hard links whose
/// target an earlier layer wrote: the target is looked up through the merged view
/// (overlayfs rules: the uppermost layer holding a name wins, a `c 0 0` whiteout or an
/// opaque directory hides everything below it; symlinks in the target's parent
/// directories are followed within that view, never above its root; the final
/// component is never followed). Every step is a single-name `openat(O_NOFOLLOW)` from
/// a directory of one layer, so the lookup cannot leave any layer's directory. The
/// link is made with `linkat` across the layer directories (lower directories are
/// immutable, so sharing the inode is what overlayfs would show), or, when that fails
/// (`EXDEV`, `EMLINK`), by copying the object with its owner, mode, xattrs and times.
/// [`LayerStats::lower_links`] counts those links: a layer with any depends on its
/// lowers and must only be reused on top of the same ones.
///
/// Nothing outside `layer_dir` is written. `expected_diff_id` as for [`apply_layer`].
pub fn apply_layer_overlay(
    layer_dir: &Path,
    lowers: &[&Path],
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
    expected_diff_id: Option<&str>,
) -> Result<LayerStats, UnpackError> {
    apply(
        layer_dir,
        lowers,
        layer,
        compression,
        shift,
        expected_diff_id,
        (Target::Overlay, Limits::default()),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Flatten,
    Overlay,
}

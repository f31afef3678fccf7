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

use std::collections::HashSet;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::image::tarstream::{Entry, Limits, TarError, TarReader};

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

/// Parses `sha256:<64 hex>`.
fn parse_diff_id(d: &str) -> Result<[u8; 32], UnpackError> {
    let bad = || UnpackError::BadDiffId(d.to_string());
    let hex_part = d.strip_prefix("sha256:").ok_or_else(bad)?;
    let mut out = [0u8; 32];
    if hex_part.len() != 64 {
        return Err(bad());
    }
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| bad())?;
    Ok(out)
}

/// The decompressed stream, hashed as it is read when a diff_id is to be checked.
struct Hashing<R> {
    inner: R,
    hasher: Option<Sha256>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.hasher {
            h.update(bytes);
        }
    }

    fn new(inner: R, verify: bool) -> Self {
        Hashing {
            inner,
            hasher: verify.then(Sha256::new),
        }
    }

    /// Compares what was read with the expected digest.
    fn check(self, expected: Option<[u8; 32]>) -> Result<(), UnpackError> {
        let (Some(expected), Some(h)) = (expected, self.hasher) else {
            return Ok(());
        };
        let actual: [u8; 32] = h.finalize().into();
        if actual == expected {
            return Ok(());
        }
        Err(UnpackError::DiffIdMismatch {
            expected: format!("sha256:{}", hex::encode(expected)),
            actual: format!("sha256:{}", hex::encode(actual)),
        })
    }
}

fn apply(
    root: &Path,
    lowers: &[&Path],
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
    expected_diff_id: Option<&str>,
    (target, limits): (Target, Limits),
) -> Result<LayerStats, UnpackError> {
    let expected = expected_diff_id.map(parse_diff_id).transpose()?;
    let open_dir = |p: &Path| {
        rfs::open(
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::OpenRoot {
            root: p.to_path_buf(),
            source: e.into(),
        })
    };
    let root_fd = open_dir(root)?;
    let lower_fds = lowers
        .iter()
        .map(|p| open_dir(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut applier = Applier::new(root_fd.as_fd(), &lower_fds, *shift, target, limits);
    let verify = expected.is_some();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        fn run_one<R: Read>(
            applier: &mut Applier<'_>,
            r: R,
            verify: bool,
            expected: Option<[u8; 32]>,
        ) -> Result<LayerStats, UnpackError> {
            let mut h = Hashing::new(r, verify);
            let stats = applier.run(&mut h)?;
            h.check(expected)?;
            Ok(stats)
        }
        return match compression {
            Compression::Gzip => run_one(
                &mut applier,
                flate2::read::MultiGzDecoder::new(layer),
                verify,
                expected,
            ),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => run_one(&mut applier, decoder, verify, expected),
                Err(source) => Err(UnpackError::Read {
                    at: "first entry".into(),
                    source,
                }),
            },
            Compression::None => run_one(
                &mut applier,
                io::BufReader::with_capacity(CHUNK_SIZE, layer),
                verify,
                expected,
            ),
        };
    }
    // Decompression runs on the calling thread (so `layer` need not be `Send`) while
    // a second thread parses the archive and writes the files: with more than one
    // CPU the two overlap, as `tar -xz` overlaps with its `gzip` child.
    let (chunks_tx, chunks_rx) = mpsc::sync_channel::<io::Result<Chunk>>(CHUNKS_IN_FLIGHT);
    let (spare_tx, spare_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    std::thread::scope(|scope| {
        // The diff_id is hashed on whichever thread has time to spare: gzip decompression
        // is slower than parsing and writing, so the parser hashes the chunks it receives;
        // zstd and plain tar come faster than they can be written, so the decompressing
        // thread hashes them.
        let on_parser = verify && compression == Compression::Gzip;
        let writer = scope.spawn(move || {
            let mut reader = ChunkReader {
                chunks: chunks_rx,
                spare: spare_tx,
                current: Vec::new(),
                len: 0,
                pos: 0,
                hasher: Hashing::new((), on_parser),
            };
            let stats = applier.run(&mut reader)?;
            // The parser read the stream to its end, so the whole of it was hashed.
            reader.hasher.check(expected)?;
            Ok(stats)
        });
        let on_producer = verify && !on_parser;
        fn produce_hashed<R: Read>(
            r: R,
            verify: bool,
            out: &mpsc::SyncSender<io::Result<Chunk>>,
            spare: &mpsc::Receiver<Vec<u8>>,
        ) -> io::Result<Hashing<R>> {
            let mut h = Hashing::new(r, verify);
            produce(&mut h, out, spare)?;
            Ok(h)
        }
        let produced = match compression {
            Compression::Gzip => produce_hashed(
                flate2::read::MultiGzDecoder::new(layer),
                on_producer,
                &chunks_tx,
                &spare_rx,
            )
            .map(|h| h.check(expected)),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => produce_hashed(decoder, on_producer, &chunks_tx, &spare_rx)
                    .map(|h| h.check(expected)),
                Err(e) => Err(e),
            },
            Compression::None => {
                produce_hashed(layer, on_producer, &chunks_tx, &spare_rx).map(|h| h.check(expected))
            }
        };
        let checked = match produced {
            Ok(checked) => checked,
            Err(e) => {
                // Hand the error to the parser, which names the entry it was reading.
                let _ = chunks_tx.send(Err(e));
                Ok(())
            }
        };
        drop(chunks_tx);
        let stats = match writer.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // The parser read the stream to its end, so the producer hashed all of it.
        checked?;
        Ok(stats)
    })
}

/// Decompressed bytes on their way to the parsing thread: a buffer and how much of
/// it is filled.
type Chunk = (Vec<u8>, usize);

/// Bytes per chunk handed from the decompressing to the writing thread.
const CHUNK_SIZE: usize = 256 * 1024;
const CHUNKS_IN_FLIGHT: usize = 4;

/// Reads `src` to its end in chunks, reusing the buffers the reader hands back. Stops
/// quietly when the reader is gone (it failed and reports its own error).
fn produce<R: Read>(
    src: &mut R,
    out: &mpsc::SyncSender<io::Result<Chunk>>,
    spare: &mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    loop {
        let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0; CHUNK_SIZE]);
        let mut filled = 0;
        while filled < buf.len() {
            match src.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        if out.send(Ok((buf, filled))).is_err() {
            return Ok(());
        }
    }
}

/// The parsing thread's view of the decompressed stream.
struct ChunkReader {
    chunks: mpsc::Receiver<io::Result<Chunk>>,
    spare: mpsc::SyncSender<Vec<u8>>,
    current: Vec<u8>,
    len: usize,
    pos: usize,
    hasher: Hashing<()>,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            match self.chunks.recv() {
                Ok(Ok((buf, len))) => {
                    self.hasher.update(&buf[..len]);
                    let old = std::mem::replace(&mut self.current, buf);
                    if !old.is_empty() {
                        let _ = self.spare.try_send(old);
                    }
                    self.len = len;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvError) => return Ok(0),
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The parent directory of the entry being applied.
enum Parent {
    Root,
    Dir(OwnedFd),
}

impl Parent {
    fn fd<'a>(&'a self, root: BorrowedFd<'a>) -> BorrowedFd<'a> {
        match self {
            Parent::Root => root,
            Parent::Dir(fd) => fd.as_fd(),
        }
    }
}

/// A hard link target found through the merged view of the layers.
struct Found {
    /// 0: this layer; `i`: the `i`th lower, uppermost first.
    layer: usize,
    /// The target's directory in that layer (None: the layer's root).
    parent: Option<OwnedFd>,
    name: Vec<u8>,
    st: rfs::Stat,
    /// Whether a lower layer decided the result (the target, or a symlink on the way).
    used_lower: bool,
}

enum LookupError {
    Missing,
    Directory,
    Io(io::Error),
}

/// Entry metadata, shifted and ready to apply.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    times: Timestamps,
}

enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

struct Applier<'r> {
    root: BorrowedFd<'r>,
    /// Extension header size, byte and entry budgets for this layer.
    limits: Limits,
    /// Directories of the layers below (overlay format), uppermost first.
    lowers: &'r [OwnedFd],
    shift: IdShift,
    target: Target,
    /// Paths this layer wrote, and all their ancestors: what whiteouts and opaque
    /// markers of this same layer must keep.
    written: HashSet<Box<[u8]>>,
    /// Directory mtimes, applied after the last entry.
    dir_times: Vec<(Box<[u8]>, Timestamps)>,
    /// The last resolved parent directory, keyed by its normalised path.
    cache_key: Vec<u8>,
    cache_fd: Option<OwnedFd>,
    /// Set when something was removed: cached resolutions may be stale.
    removed: bool,
    buf: Vec<u8>,
    raw_name: Vec<u8>,
    path: Vec<u8>,
    link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    stats: LayerStats,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

enum NameError {
    /// `..` climbs above the root.
    Escape,
    /// A NUL byte (possible in PAX names) cannot be passed to the kernel.
    Nul,
}

/// Normalises an archive name into `out`: no leading `/` or `./`, no `.` or empty
/// components, `..` applied lexically. Fails when `..` climbs above the root or the
/// name holds a NUL byte.
fn normalize(raw: &[u8], out: &mut Vec<u8>) -> Result<(), NameError> {
    out.clear();
    if raw.contains(&0) {
        return Err(NameError::Nul);
    }
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                if out.is_empty() {
                    return Err(NameError::Escape);
                }
                let cut = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
                out.truncate(cut);
            }
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(comp);
            }
        }
    }
    Ok(())
}

/// Splits a normalised path into its parent and final component.
fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn resolve_how() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// `openat2` inside `root`, retrying the rare `EAGAIN` a concurrent rename causes.
fn open_in_root(root: BorrowedFd<'_>, path: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match rfs::openat2(
            root,
            path,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_how(),
        ) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Opens the directory `path` (resolved inside `root`) for listing and xattrs.
fn open_dir_in_root(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    let path: &[u8] = if path.is_empty() { b"." } else { path };
    open_in_root(root, path, OFlags::RDONLY | OFlags::DIRECTORY)
}

fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// Removes `name` in `parent`, recursively when it is a directory, never following
/// symlinks. A missing entry is not an error.
fn remove_all(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match rfs::unlinkat(parent, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let dir = match rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for child in list_dir(&dir)? {
        remove_all(dir.as_fd(), &child)?;
    }
    match rfs::unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Names in a directory, without `.` and `..`.
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut iter = rfs::Dir::read_from(dir)?;
    while let Some(entry) = iter.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// `chmod` of a device node or FIFO without following a symlink and without opening
/// the device: through an `O_PATH` fd of the node itself.
fn chmod_special(parent: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let fd = rfs::openat(
        parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rfs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
        return Err(Errno::LOOP.into());
    }
    if st.st_mode & 0o7777 == mode {
        return Ok(());
    }
    // SAFETY: plain syscall with a valid fd and a NUL-terminated empty path.
    let r = unsafe {
        libc::syscall(
            SYS_FCHMODAT2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode as libc::c_uint,
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // Kernels before 6.6: the fd's magic link names exactly the inode checked above.
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rfs::chmod(proc_path.as_str(), Mode::from_raw_mode(mode)).map_err(io::Error::from)
}

fn parse_pax_time(value: &[u8]) -> Option<rfs::Timespec> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let negative = secs.starts_with('-');
    let sec: i64 = secs.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nsec += i64::from(c - b'0') * 10_i64.pow(8 - i as u32);
    }
    if negative && nsec > 0 {
        Some(rfs::Timespec {
            tv_sec: sec - 1,
            tv_nsec: 1_000_000_000 - nsec,
        })
    } else {
        Some(rfs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        })
    }
}

impl<'r> Applier<'r> {
    fn new(
        root: BorrowedFd<'r>,
        lowers: &'r [OwnedFd],
        shift: IdShift,
        target: Target,
        limits: Limits,
    ) -> Self {
        Applier {
            limits,
            root,
            lowers,
            shift,
            target,
            written: HashSet::new(),
            dir_times: Vec::new(),
            cache_key: Vec::new(),
            cache_fd: None,
            removed: false,
            buf: vec![0; COPY_BUFFER],
            raw_name: Vec::new(),
            path: Vec::new(),
            link: Vec::new(),
            xattrs: Vec::new(),
            stats: LayerStats::default(),
        }
    }

    fn run<R: Read>(&mut self, reader: R) -> Result<LayerStats, UnpackError> {
        let mut tar = TarReader::new(reader, self.limits);
        while let Some(entry) = tar.next_entry().map_err(|e| self.tar_error(e))? {
            self.apply_entry(&entry, &mut tar)?;
            self.stats.entries += 1;
        }
        // Read the stream to its end: trailing padding, and the gzip/zstd trailer
        // whose checksum a truncated or corrupt layer fails.
        tar.drain().map_err(|e| match e {
            TarError::Io(source) => UnpackError::Read {
                at: "after the end of the archive".into(),
                source,
            },
            other => UnpackError::Archive {
                at: "after the end of the archive".into(),
                source: other,
            },
        })?;
        self.finish_dir_times()?;
        Ok(self.stats)
    }

    fn tar_error(&self, e: TarError) -> UnpackError {
        match e {
            TarError::Io(source) => UnpackError::Read {
                at: self.position(),
                source,
            },
            other => UnpackError::Archive {
                at: self.position(),
                source: other,
            },
        }
    }

    fn position(&self) -> String {
        if self.stats.entries == 0 {
            "first entry".into()
        } else {
            format!("after entry {:?}", lossy(&self.raw_name))
        }
    }

    fn entry_name(&self) -> String {
        lossy(&self.raw_name)
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Io {
            entry: self.entry_name(),
            op,
            source,
        }
    }

    fn name_error(&self, e: NameError) -> UnpackError {
        match e {
            NameError::Escape => UnpackError::Escape {
                entry: self.entry_name(),
            },
            NameError::Nul => self.invalid("the name contains a NUL byte"),
        }
    }

    fn invalid(&self, reason: &'static str) -> UnpackError {
        UnpackError::Invalid {
            entry: self.entry_name(),
            reason,
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &Entry,
        data: &mut TarReader<R>,
    ) -> Result<(), UnpackError> {
        self.raw_name.clear();
        self.raw_name.extend_from_slice(&entry.path);
        let type_flag = entry.type_flag();
        if type_flag == b'g' {
            // PAX global header: nothing in it matters for unpacking.
            return Ok(());
        }
        if let Err(e) = normalize(&self.raw_name, &mut self.path) {
            return Err(self.name_error(e));
        }

        let (_, base) = split_parent(&self.path);
        if base.starts_with(WHITEOUT_PREFIX) {
            return self.apply_whiteout();
        }

        let kind = match type_flag {
            b'0' | b'\0' | b'7' | b'S' if self.raw_name.ends_with(b"/") => Kind::Dir,
            b'0' | b'\0' | b'7' | b'S' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' | b'D' => Kind::Dir,
            b'6' => Kind::Fifo,
            other => {
                return Err(UnpackError::Unsupported {
                    entry: self.entry_name(),
                    type_flag: other as char,
                })
            }
        };

        if matches!(kind, Kind::Hardlink | Kind::Symlink) {
            match entry.link.as_deref() {
                Some(l) if !l.is_empty() => {
                    self.link.clear();
                    self.link.extend_from_slice(l);
                }
                _ => return Err(self.invalid("link entry without a link target")),
            }
        }

        let meta = self.read_meta(entry)?;

        if self.path.is_empty() {
            // The root directory itself ("./").
            if !matches!(kind, Kind::Dir) {
                return Err(self.invalid("a non-directory entry names the root"));
            }
            let fd = open_dir_in_root(self.root, b"").map_err(self.io_err("open root"))?;
            self.set_meta_fd(fd.as_fd(), &meta, true)?;
            self.dir_times.push((Box::from(&b""[..]), meta.times));
            return Ok(());
        }

        let parent = self.parent_for_create()?;
        let path = std::mem::take(&mut self.path);
        let result = self.create(entry, data, &kind, &meta, parent.fd(self.root), &path);
        self.path = path;
        self.release_parent(parent);
        result?;
        self.mark_written();
        Ok(())
    }

    /// Reads owner, mode, times and xattrs of the entry, shifting the ids.
    fn read_meta(&mut self, entry: &Entry) -> Result<Meta, UnpackError> {
        let h = &entry.header;
        let mode = h.mode().map_err(self.io_err("parse mode"))? & 0o7777;
        let (uid, gid) = (entry.uid, entry.gid);
        let mtime = h.mtime().map_err(self.io_err("parse mtime"))?;
        let mut mtime = rfs::Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut atime = None;
        self.xattrs.clear();
        for (key, value) in &entry.pax {
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                self.xattrs.push((name.to_vec(), value.clone()));
            } else if key == b"mtime" {
                if let Some(t) = parse_pax_time(value) {
                    mtime = t;
                }
            } else if key == b"atime" {
                atime = parse_pax_time(value);
            }
        }
        let uid = self.map_id("uid", uid)?;
        let gid = self.map_id("gid", gid)?;
        Ok(Meta {
            uid,
            gid,
            mode,
            times: Timestamps {
                last_access: atime.unwrap_or(mtime),
                last_modification: mtime,
            },
        })
    }

    fn map_id(&self, kind: &'static str, id: u64) -> Result<u32, UnpackError> {
        self.shift.map(id).ok_or_else(|| UnpackError::IdOutOfRange {
            entry: self.entry_name(),
            kind,
            id,
            size: self.shift.size,
        })
    }

    /// Resolves (creating missing directories) the parent of `self.path`.
    fn parent_for_create(&mut self) -> Result<Parent, UnpackError> {
        let (parent, _) = split_parent(&self.path);
        if parent.is_empty() {
            return Ok(Parent::Root);
        }
        if let Some(fd) = self.cache_fd.take() {
            if self.cache_key == parent {
                return Ok(Parent::Dir(fd));
            }
        }
        let fd = match open_in_root(self.root, parent, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.create_parents(parent)?,
            Err(e) => return Err(self.io_err("resolve parent directory")(e)),
        };
        Ok(Parent::Dir(fd))
    }

    /// Keeps the parent fd for the next entry unless something was removed.
    ///
    /// A removal invalidates the cached fd whatever the parent of this entry was: an
    /// entry directly under the root (parent `Root`) can replace the symlink the cached
    /// directory was resolved through (`a -> x` with `a/b` cached as `x/b`).
    fn release_parent(&mut self, parent: Parent) {
        if self.removed {
            self.cache_fd = None;
        } else if let Parent::Dir(fd) = parent {
            let (p, _) = split_parent(&self.path);
            self.cache_key.clear();
            self.cache_key.extend_from_slice(p);
            self.cache_fd = Some(fd);
        }
        self.removed = false;
    }

    fn forget_cache(&mut self) {
        self.cache_fd = None;
        self.removed = false;
    }

    /// Creates the missing directories of `parent` (owned by the container's root,
    /// mode 0755), each resolved inside the root.
    fn create_parents(&self, parent: &[u8]) -> Result<OwnedFd, UnpackError> {
        let mut prev: Option<OwnedFd> = None;
        let mut end = 0;
        while end < parent.len() {
            let next = parent[end..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(parent.len(), |i| end + i);
            let prefix = &parent[..next];
            let comp = &parent[end..next];
            let fd = match open_in_root(self.root, prefix, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let dir = prev.as_ref().map_or(self.root, |f| f.as_fd());
                    match rfs::mkdirat(dir, comp, Mode::from_raw_mode(0o700)) {
                        Ok(()) => {
                            let created = rfs::openat(
                                dir,
                                comp,
                                OFlags::RDONLY
                                    | OFlags::DIRECTORY
                                    | OFlags::NOFOLLOW
                                    | OFlags::CLOEXEC,
                                Mode::empty(),
                            )
                            .map_err(|e| self.io_err("open created parent directory")(e.into()))?;
                            let meta = Meta {
                                uid: self.map_id("uid", 0)?,
                                gid: self.map_id("gid", 0)?,
                                mode: 0o755,
                                times: Timestamps {
                                    last_access: rfs::Timespec::default(),
                                    last_modification: rfs::Timespec::default(),
                                },
                            };
                            self.set_meta_fd(created.as_fd(), &meta, false)?;
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(self.io_err("create parent directory")(e.into()));
                        }
                    }
                    open_in_root(self.root, prefix, OFlags::PATH | OFlags::DIRECTORY)
                        .map_err(self.io_err("resolve created parent directory"))?
                }
                Err(e) => return Err(self.io_err("resolve parent directory")(e)),
            };
            prev = Some(fd);
            end = next + 1;
        }
        prev.ok_or_else(|| self.invalid("empty parent path"))
    }

    /// Removes whatever is at `name` in `parent` so a new entry can take its place.
    fn remove_existing(&mut self, parent: BorrowedFd<'_>, name: &[u8]) -> Result<(), UnpackError> {
        self.removed = true;
        remove_all(parent, name).map_err(self.io_err("remove existing entry"))
    }

    fn create<R: Read>(
        &mut self,
        entry: &Entry,
        data: &mut TarReader<R>,
        kind: &Kind,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        path: &[u8],
    ) -> Result<(), UnpackError> {
        let (_, name) = split_parent(path);
        match kind {
            Kind::File => self.create_file(data, meta, parent, name),
            Kind::Dir => self.create_dir(meta, parent, name, path),
            Kind::Symlink => self.create_symlink(meta, parent, name),
            Kind::Hardlink => self.create_hardlink(parent, name, path),
            Kind::Char | Kind::Block | Kind::Fifo => {
                self.create_special(entry, kind, meta, parent, name)
            }
        }
    }

    fn create_file<R: Read>(
        &mut self,
        entry: &mut TarReader<R>,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NOCTTY;
        let mode = Mode::from_raw_mode(0o600);
        let fd = match rfs::openat(parent, name, flags, mode) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => {
                self.remove_existing(parent, name)?;
                rfs::openat(parent, name, flags, mode)
                    .map_err(|e| self.io_err("create file")(e.into()))?
            }
            Err(e) => return Err(self.io_err("create file")(e.into())),
        };
        let file = File::from(fd);
        let written = self.copy_data(entry, &file)?;
        self.stats.bytes += written;
        self.set_meta_fd(file.as_fd(), meta, true)?;
        rfs::futimens(&file, &meta.times).map_err(|e| self.io_err("set times")(e.into()))?;
        Ok(())
    }

    /// Streams the entry's content into `file` through the reused buffer.
    fn copy_data<R: Read>(
        &mut self,
        entry: &mut TarReader<R>,
        file: &File,
    ) -> Result<u64, UnpackError> {
        let mut total = 0u64;
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| loop {
            let mut filled = 0;
            while filled < buf.len() {
                match entry.read_data(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(("read file content from the layer", e)),
                }
            }
            if filled == 0 {
                return Ok(total);
            }
            let mut out = file;
            out.write_all(&buf[..filled])
                .map_err(|e| ("write file content", e))?;
            total += filled as u64;
            if filled < buf.len() {
                return Ok(total);
            }
        })();
        self.buf = buf;
        result.map_err(|(op, source)| UnpackError::Io {
            entry: self.entry_name(),
            op,
            source,
        })
    }

    fn create_dir(
        &mut self,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
    ) -> Result<(), UnpackError> {
        let mut was_whiteout = false;
        match rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = rfs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err("stat existing entry")(e.into()))?;
                if !is_dir(&st) {
                    was_whiteout = FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                        && st.st_rdev == 0;
                    self.remove_existing(parent, name)?;
                    rfs::mkdirat(parent, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| self.io_err("create directory")(e.into()))?;
                }
            }
            Err(e) => return Err(self.io_err("create directory")(e.into())),
        }
        let fd = rfs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err("open directory")(e.into()))?;
        self.set_meta_fd(fd.as_fd(), meta, true)?;
        if was_whiteout && self.target == Target::Overlay {
            // A directory replacing this layer's own whiteout still hides the lower
            // directory of that name.
            rfs::fsetxattr(&fd, OVERLAY_OPAQUE_XATTR, b"y", rfs::XattrFlags::empty())
                .map_err(|e| self.io_err("set overlay opaque xattr")(e.into()))?;
        }
        self.dir_times.push((Box::from(path), meta.times.clone()));
        Ok(())
    }

    fn create_symlink(
        &mut self,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let target = std::mem::take(&mut self.link);
        let mut r = rfs::symlinkat(&target[..], parent, name);
        if r == Err(Errno::EXIST) {
            self.remove_existing(parent, name)?;
            r = rfs::symlinkat(&target[..], parent, name);
        }
        self.link = target;
        r.map_err(|e| self.io_err("create symlink")(e.into()))?;
        self.chown_nofollow(parent, name, meta)?;
        self.warn_unsettable_xattrs("symlink");
        rfs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("set symlink times")(e.into()))?;
        Ok(())
    }

    fn create_hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        path: &[u8],
    ) -> Result<(), UnpackError> {
        let raw = std::mem::take(&mut self.link);
        let mut target = Vec::with_capacity(raw.len());
        let norm = normalize(&raw, &mut target);
        self.link = raw;
        if let Err(e) = norm {
            return Err(self.name_error(e));
        }
        if target.is_empty() {
            return Err(self.invalid("hard link to the root directory"));
        }
        if target == path {
            log::debug!(
                "layer entry {:?}: hard link to itself, skipped",
                self.entry_name()
            );
            return Ok(());
        }
        if self.target == Target::Overlay {
            return self.create_overlay_hardlink(parent, name, &target);
        }
        let (tparent, tname) = split_parent(&target);
        let tparent_fd = if tparent.is_empty() {
            None
        } else {
            match open_in_root(self.root, tparent, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(fd) => Some(fd),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(self.missing_link_target(&target));
                }
                Err(e) => return Err(self.io_err("resolve hard link target directory")(e)),
            }
        };
        let tdir = tparent_fd.as_ref().map_or(self.root, |f| f.as_fd());
        // flags 0: a symlink as the target is linked itself, never followed.
        let mut r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        if r == Err(Errno::EXIST) {
            self.remove_existing(parent, name)?;
            r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        }
        match r {
            Ok(()) => Ok(()),
            Err(Errno::NOENT) => Err(self.missing_link_target(&target)),
            Err(e) => Err(self.io_err("create hard link")(e.into())),
        }
    }

    fn missing_link_target(&self, target: &[u8]) -> UnpackError {
        UnpackError::MissingLinkTarget {
            entry: self.entry_name(),
            target: lossy(target),
        }
    }

    /// The directory fd of layer `i` of the merged view: 0 is this layer.
    fn layer_root(&self, i: usize) -> BorrowedFd<'r> {
        let lowers: &'r [OwnedFd] = self.lowers;
        if i == 0 {
            self.root
        } else {
            lowers[i - 1].as_fd()
        }
    }

    /// The fast path of [`lookup_merged`](Self::lookup_merged): `path` resolved inside
    /// this layer alone. When every component is found here, the merged view finds the
    /// same (the uppermost layer wins at each step), so the result is that, or `None`
    /// when this layer does not have the path.
    fn lookup_own(&self, path: &[u8]) -> Option<Result<Found, LookupError>> {
        let (tparent, tname) = split_parent(path);
        let parent = if tparent.is_empty() {
            None
        } else {
            match open_in_root(self.root, tparent, OFlags::PATH | OFlags::DIRECTORY) {
                Ok(fd) => Some(fd),
                Err(_) => return None,
            }
        };
        let dfd = parent.as_ref().map_or(self.root, |f| f.as_fd());
        let st = match rfs::statat(dfd, tname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(_) => return None,
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        Some(if ft == FileType::CharacterDevice && st.st_rdev == 0 {
            Err(LookupError::Missing)
        } else if ft == FileType::Directory {
            Err(LookupError::Directory)
        } else {
            Ok(Found {
                layer: 0,
                parent,
                name: tname.to_vec(),
                st,
                used_lower: false,
            })
        })
    }

    /// Looks `path` (normalised) up through the merged view of this layer over its
    /// lowers, as overlayfs would, without following the final component.
    fn lookup_merged(&self, path: &[u8]) -> Result<Found, LookupError> {
        /// Symlinks followed in one lookup before giving up, as the kernel's limit.
        const MAX_SYMLINKS: u32 = 40;
        // Components still to walk, last first.
        let mut remaining: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        // The merged directory at each level of the walk: the layers that hold it,
        // uppermost first, with their directory (None: the layer's root).
        let root_stack: Vec<(usize, Option<OwnedFd>)> =
            (0..=self.lowers.len()).map(|i| (i, None)).collect();
        let mut levels = vec![root_stack];
        let mut symlinks = 0;
        let mut used_lower = false;
        while let Some(comp) = remaining.pop() {
            match &comp[..] {
                b"." => continue,
                b".." => {
                    if levels.len() > 1 {
                        levels.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let last = remaining.is_empty();
            let dir = levels.last().expect("the root level is never popped");
            let mut found: Option<(usize, rfs::Stat)> = None;
            let mut below: Vec<(usize, Option<OwnedFd>)> = Vec::new();
            for (layer, fd) in dir {
                let dfd = fd.as_ref().map_or(self.layer_root(*layer), |f| f.as_fd());
                let st = match rfs::statat(dfd, &comp[..], AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(LookupError::Io(e.into())),
                };
                let ft = FileType::from_raw_mode(st.st_mode);
                if ft == FileType::CharacterDevice && st.st_rdev == 0 {
                    // Whiteout: hides this name in every layer below.
                    break;
                }
                if ft != FileType::Directory {
                    if below.is_empty() {
                        found = Some((*layer, st));
                    }
                    // A non-directory ends the merge (a directory above hides it).
                    break;
                }
                let child = rfs::openat(
                    dfd,
                    &comp[..],
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| LookupError::Io(e.into()))?;
                let mut v = [0u8; 4];
                let opaque = matches!(
                    rfs::fgetxattr(&child, OVERLAY_OPAQUE_XATTR, &mut v[..]),
                    Ok(1) if v[0] == b'y'
                );
                below.push((*layer, Some(child)));
                if opaque {
                    break;
                }
            }
            if !below.is_empty() {
                if last {
                    return Err(LookupError::Directory);
                }
                if below[0].0 > 0 {
                    used_lower = true;
                }
                levels.push(below);
                continue;
            }
            let Some((layer, st)) = found else {
                return Err(LookupError::Missing);
            };
            used_lower |= layer > 0;
            let is_symlink = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
            if last {
                let mut dir = levels.pop().expect("the root level is never popped");
                let idx = dir
                    .iter()
                    .position(|(l, _)| *l == layer)
                    .expect("found in one of the directory's layers");
                let (_, parent) = dir.swap_remove(idx);
                return Ok(Found {
                    layer,
                    parent,
                    name: comp,
                    st,
                    used_lower,
                });
            }
            if !is_symlink {
                return Err(LookupError::Io(Errno::NOTDIR.into()));
            }
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return Err(LookupError::Io(Errno::LOOP.into()));
            }
            let (_, fd) = dir
                .iter()
                .find(|(l, _)| *l == layer)
                .expect("found in one of the directory's layers");
            let dfd = fd.as_ref().map_or(self.layer_root(layer), |f| f.as_fd());
            let link = rfs::readlinkat(dfd, &comp[..], Vec::new())
                .map_err(|e| LookupError::Io(e.into()))?;
            let link = link.as_bytes();
            if link.starts_with(b"/") {
                // Absolute links resolve from the merged root, as inside the container.
                levels.truncate(1);
            }
            remaining.extend(
                link.split(|&b| b == b'/')
                    .filter(|c| !c.is_empty())
                    .rev()
                    .map(<[u8]>::to_vec),
            );
        }
        // Only `.` and `..` components: the root itself.
        Err(LookupError::Directory)
    }

    /// A hard link in overlay format: the target may be in this layer or a lower one.
    fn create_overlay_hardlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        target: &[u8],
    ) -> Result<(), UnpackError> {
        let found = match self.lookup_own(target) {
            Some(Ok(f)) => Ok(f),
            Some(Err(e)) => Err(e),
            None => self.lookup_merged(target),
        };
        let found = match found {
            Ok(f) => f,
            Err(LookupError::Missing) => return Err(self.missing_link_target(target)),
            Err(LookupError::Directory) => {
                return Err(self.invalid("hard link to a directory"));
            }
            Err(LookupError::Io(e)) => {
                return Err(self.io_err("resolve hard link target")(e));
            }
        };
        let tdir = found
            .parent
            .as_ref()
            .map_or(self.layer_root(found.layer), |f| f.as_fd());
        let tname = &found.name[..];
        // flags 0: a symlink as the target is linked itself, never followed.
        let mut r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        if r == Err(Errno::EXIST) {
            self.remove_existing(parent, name)?;
            r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        }
        match r {
            Ok(()) => {}
            Err(Errno::XDEV | Errno::MLINK) if found.layer > 0 => {
                log::debug!(
                    "layer entry {:?}: cannot hard-link across layers, copying the target",
                    self.entry_name()
                );
                self.copy_object(tdir, tname, &found.st, parent, name)?;
            }
            Err(e) => return Err(self.io_err("create hard link")(e.into())),
        }
        if found.used_lower {
            self.stats.lower_links += 1;
        }
        Ok(())
    }

    /// Copies the object `sname` in `sdir` (of another layer, already uid-shifted) to
    /// `name` in `parent`, with owner, mode, xattrs and times.
    fn copy_object(
        &mut self,
        sdir: BorrowedFd<'_>,
        sname: &[u8],
        st: &rfs::Stat,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let ft = FileType::from_raw_mode(st.st_mode);
        let mode = st.st_mode & 0o7777;
        let times = Timestamps {
            last_access: rfs::Timespec {
                tv_sec: st.st_atime as _,
                tv_nsec: st.st_atime_nsec as _,
            },
            last_modification: rfs::Timespec {
                tv_sec: st.st_mtime as _,
                tv_nsec: st.st_mtime_nsec as _,
            },
        };
        let meta = Meta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode,
            times,
        };
        match ft {
            FileType::RegularFile => {
                let src = rfs::openat(
                    sdir,
                    sname,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.io_err("open hard link target to copy")(e.into()))?;
                let flags = OFlags::WRONLY
                    | OFlags::CREATE
                    | OFlags::EXCL
                    | OFlags::NOFOLLOW
                    | OFlags::CLOEXEC
                    | OFlags::NOCTTY;
                let dst = rfs::openat(parent, name, flags, Mode::from_raw_mode(0o600))
                    .map_err(|e| self.io_err("create copy of hard link target")(e.into()))?;
                let mut src = File::from(src);
                let mut dst = File::from(dst);
                let n =
                    io::copy(&mut src, &mut dst).map_err(self.io_err("copy hard link target"))?;
                self.stats.bytes += n;
                rfs::fchown(
                    &dst,
                    Some(rfs::Uid::from_raw(meta.uid)),
                    Some(rfs::Gid::from_raw(meta.gid)),
                )
                .map_err(|e| self.io_err("chown")(e.into()))?;
                rfs::fchmod(&dst, Mode::from_raw_mode(mode))
                    .map_err(|e| self.io_err("chmod")(e.into()))?;
                self.copy_xattrs(src.as_fd(), dst.as_fd())?;
                rfs::futimens(&dst, &meta.times).map_err(|e| self.io_err("set times")(e.into()))?;
                Ok(())
            }
            FileType::Symlink => {
                let link = rfs::readlinkat(sdir, sname, Vec::new())
                    .map_err(|e| self.io_err("read hard link target")(e.into()))?;
                rfs::symlinkat(link.as_c_str(), parent, name)
                    .map_err(|e| self.io_err("create symlink")(e.into()))?;
                self.chown_nofollow(parent, name, &meta)?;
                rfs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err("set symlink times")(e.into()))
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                rfs::mknodat(
                    parent,
                    name,
                    ft,
                    Mode::from_raw_mode(mode & 0o777),
                    st.st_rdev,
                )
                .map_err(|e| self.io_err("create special file")(e.into()))?;
                self.chown_nofollow(parent, name, &meta)?;
                chmod_special(parent, name, mode).map_err(self.io_err("chmod special file"))?;
                rfs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err("set times")(e.into()))
            }
            _ => Err(self.invalid("hard link target is neither a file, a symlink nor a device")),
        }
    }

    /// Copies the extended attributes of a file being copied from a lower layer
    /// (they were filtered and shifted when that layer was unpacked).
    fn copy_xattrs(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<(), UnpackError> {
        let mut names = vec![0u8; 64 * 1024];
        let n = match rfs::flistxattr(src, &mut names[..]) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(self.io_err("list xattrs")(e.into())),
        };
        let mut value = vec![0u8; 64 * 1024];
        for xname in names[..n].split(|&b| b == 0).filter(|x| !x.is_empty()) {
            let len = match rfs::fgetxattr(src, xname, &mut value[..]) {
                Ok(len) => len,
                Err(Errno::NODATA) => continue,
                Err(e) => return Err(self.io_err("read xattr")(e.into())),
            };
            match rfs::fsetxattr(dst, xname, &value[..len], rfs::XattrFlags::empty()) {
                Ok(()) => {}
                Err(e @ (Errno::NOTSUP | Errno::PERM)) => log::warn!(
                    "layer entry {:?}: xattr {:?} not copied: {}",
                    self.entry_name(),
                    lossy(xname),
                    io::Error::from(e)
                ),
                Err(e) => return Err(self.io_err("set xattr")(e.into())),
            }
        }
        Ok(())
    }

    fn create_special(
        &mut self,
        entry: &Entry,
        kind: &Kind,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let (file_type, dev) = match kind {
            Kind::Fifo => (FileType::Fifo, 0),
            _ => {
                let h = &entry.header;
                let major = h
                    .device_major()
                    .map_err(self.io_err("parse device major"))?
                    .unwrap_or(0);
                let minor = h
                    .device_minor()
                    .map_err(self.io_err("parse device minor"))?
                    .unwrap_or(0);
                let ft = if matches!(kind, Kind::Char) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                (ft, rfs::makedev(major, minor))
            }
        };
        let mode = Mode::from_raw_mode(meta.mode & 0o777);
        let mut r = rfs::mknodat(parent, name, file_type, mode, dev);
        if r == Err(Errno::EXIST) {
            self.remove_existing(parent, name)?;
            r = rfs::mknodat(parent, name, file_type, mode, dev);
        }
        r.map_err(|e| self.io_err("create special file")(e.into()))?;
        self.chown_nofollow(parent, name, meta)?;
        chmod_special(parent, name, meta.mode).map_err(self.io_err("chmod special file"))?;
        self.warn_unsettable_xattrs("device or FIFO");
        rfs::utimensat(parent, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err("set times")(e.into()))?;
        Ok(())
    }

    fn chown_nofollow(
        &self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        meta: &Meta,
    ) -> Result<(), UnpackError> {
        rfs::chownat(
            parent,
            name,
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("chown")(e.into()))
    }

    fn warn_unsettable_xattrs(&self, what: &str) {
        for (name, _) in &self.xattrs {
            log::warn!(
                "layer entry {:?}: xattr {:?} on a {what} skipped (cannot be set without following a path)",
                self.entry_name(),
                lossy(name)
            );
        }
    }

    /// chown → chmod → xattrs on an fd of the object (times are separate).
    fn set_meta_fd(
        &self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        with_xattrs: bool,
    ) -> Result<(), UnpackError> {
        rfs::fchown(
            fd,
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
        )
        .map_err(|e| self.io_err("chown")(e.into()))?;
        rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.io_err("chmod")(e.into()))?;
        if with_xattrs {
            for (name, value) in &self.xattrs {
                self.set_xattr(fd, name, value)?;
            }
        }
        Ok(())
    }

    fn set_xattr(&self, fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> Result<(), UnpackError> {
        if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
            log::warn!(
                "layer entry {:?}: overlayfs xattr {:?} dropped",
                self.entry_name(),
                lossy(name)
            );
            return Ok(());
        }
        let shifted;
        let value = if name == b"security.capability" {
            shifted = self.shift_capability(value)?;
            shifted.as_deref().unwrap_or(value)
        } else {
            value
        };
        match rfs::fsetxattr(fd, name, value, rfs::XattrFlags::empty()) {
            Ok(()) => Ok(()),
            Err(e @ (Errno::NOTSUP | Errno::PERM)) => {
                log::warn!(
                    "layer entry {:?}: xattr {:?} not set: {}",
                    self.entry_name(),
                    lossy(name),
                    io::Error::from(e)
                );
                Ok(())
            }
            Err(e) => Err(self.io_err("set xattr")(e.into())),
        }
    }

    /// Makes a file capability effective inside the container's user namespace. The kernel honours a
    /// capability there only when its root id is the namespace's root: a version 3 (namespaced)
    /// capability gets its root id shifted like any owner, and a version 2 one (what `setcap` writes
    /// as host root, e.g. Debian's `ping`) becomes version 3 with the container root's host id, as the
    /// kernel itself converts it when root inside a user namespace sets it. Without a shift both stay.
    fn shift_capability(&self, value: &[u8]) -> Result<Option<Vec<u8>>, UnpackError> {
        const REVISION_MASK: u32 = 0xff00_0000;
        const REVISION_2: u32 = 0x0200_0000;
        const REVISION_3: u32 = 0x0300_0000;
        if value.len() < 4 {
            return Ok(None);
        }
        let magic = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
        match (magic & REVISION_MASK, value.len()) {
            (REVISION_3, 24) => {
                let rootid = u32::from_le_bytes([value[20], value[21], value[22], value[23]]);
                let host = self.map_id("security.capability root id", u64::from(rootid))?;
                let mut out = value.to_vec();
                out[20..24].copy_from_slice(&host.to_le_bytes());
                Ok(Some(out))
            }
            (REVISION_2, 20) => {
                let host = self.map_id("security.capability root id", 0)?;
                if host == 0 {
                    return Ok(None);
                }
                let mut out = value.to_vec();
                out[0..4].copy_from_slice(&((magic & !REVISION_MASK) | REVISION_3).to_le_bytes());
                out.extend_from_slice(&host.to_le_bytes());
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }

    /// Records `self.path` and its ancestors as written by this layer.
    fn mark_written(&mut self) {
        if self.written.contains(&self.path[..]) {
            return;
        }
        self.written.insert(Box::from(&self.path[..]));
        let mut p: &[u8] = &self.path;
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            if self.written.contains(p) {
                break;
            }
            self.written.insert(Box::from(p));
        }
    }

    fn apply_whiteout(&mut self) -> Result<(), UnpackError> {
        self.forget_cache();
        let (parent, base) = split_parent(&self.path);
        let parent = parent.to_vec();
        if base.starts_with(WHITEOUT_META_PREFIX) {
            if base == WHITEOUT_OPAQUE {
                return self.apply_opaque(&parent);
            }
            log::debug!("layer entry {:?}: aufs metadata skipped", self.entry_name());
            return Ok(());
        }
        let name = base[WHITEOUT_PREFIX.len()..].to_vec();
        if name.is_empty() || name == b"." || name == b".." {
            return Err(self.invalid("whiteout without a name to remove"));
        }
        let mut target = parent.clone();
        if !target.is_empty() {
            target.push(b'/');
        }
        target.extend_from_slice(&name);

        match self.target {
            Target::Flatten => {
                let dir = match open_dir_in_root(self.root, &parent) {
                    Ok(fd) => fd,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                        return Ok(());
                    }
                    Err(e) => return Err(self.io_err("resolve whiteout directory")(e)),
                };
                self.remove_hidden(dir.as_fd(), &name, &mut target)
            }
            Target::Overlay => {
                if self.written.contains(&target[..]) {
                    // Whiteouts only hide lower layers, never this layer's own files.
                    return Ok(());
                }
                let saved = std::mem::replace(&mut self.path, target);
                let result = self.create_overlay_whiteout(&name);
                self.path = saved;
                result
            }
        }
    }

    fn create_overlay_whiteout(&mut self, name: &[u8]) -> Result<(), UnpackError> {
        let parent = self.parent_for_create()?;
        let pfd = parent.fd(self.root);
        let dev = rfs::makedev(0, 0);
        let mode = Mode::empty();
        let mut r = rfs::mknodat(pfd, name, FileType::CharacterDevice, mode, dev);
        if r == Err(Errno::EXIST) {
            self.remove_existing(pfd, name)?;
            r = rfs::mknodat(pfd, name, FileType::CharacterDevice, mode, dev);
        }
        r.map_err(|e| self.io_err("create overlay whiteout")(e.into()))?;
        let owner = self.map_id("uid", 0)?;
        let group = self.map_id("gid", 0)?;
        rfs::chownat(
            pfd,
            name,
            Some(rfs::Uid::from_raw(owner)),
            Some(rfs::Gid::from_raw(group)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("chown overlay whiteout")(e.into()))?;
        self.forget_cache();
        Ok(())
    }

    fn apply_opaque(&mut self, dir_path: &[u8]) -> Result<(), UnpackError> {
        match self.target {
            Target::Flatten => {
                let dir = match open_dir_in_root(self.root, dir_path) {
                    Ok(fd) => fd,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                        return Ok(());
                    }
                    Err(e) => return Err(self.io_err("open opaque directory")(e)),
                };
                let mut prefix = dir_path.to_vec();
                self.prune(&dir, &mut prefix)
            }
            Target::Overlay => {
                let dir = match open_dir_in_root(self.root, dir_path) {
                    Ok(fd) => fd,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        let parent = self.create_parents(dir_path)?;
                        drop(parent);
                        open_dir_in_root(self.root, dir_path)
                            .map_err(self.io_err("open opaque directory"))?
                    }
                    Err(e) => return Err(self.io_err("open opaque directory")(e)),
                };
                rfs::fsetxattr(&dir, OVERLAY_OPAQUE_XATTR, b"y", rfs::XattrFlags::empty())
                    .map_err(|e| self.io_err("set overlay opaque xattr")(e.into()))
            }
        }
    }

    /// Removes `name` in `dir` (lexical path `path`) except what this layer wrote.
    fn remove_hidden(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        path: &mut Vec<u8>,
    ) -> Result<(), UnpackError> {
        if !self.written.contains(&path[..]) {
            return remove_all(dir, name).map_err(self.io_err("remove whited-out entry"));
        }
        // This layer wrote the entry or something below it: keep those, clear the rest.
        match rfs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(child) => self.prune(&child, path),
            Err(Errno::NOTDIR) | Err(Errno::LOOP) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.io_err("open whited-out directory")(e.into())),
        }
    }

    /// Removes every child of `dir` (lexical path `prefix`) that this layer did not
    /// write, descending into the directories it did.
    fn prune(&mut self, dir: &OwnedFd, prefix: &mut Vec<u8>) -> Result<(), UnpackError> {
        let names = list_dir(dir).map_err(self.io_err("list directory"))?;
        let base_len = prefix.len();
        for name in names {
            prefix.truncate(base_len);
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(&name);
            self.remove_hidden(dir.as_fd(), &name, prefix)?;
        }
        prefix.truncate(base_len);
        Ok(())
    }

    /// Directory times, after every entry of the layer is in place.
    fn finish_dir_times(&mut self) -> Result<(), UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        for (path, ts) in times.iter().rev() {
            let (parent, name) = split_parent(path);
            let r = if path.is_empty() {
                rfs::utimensat(self.root, ".", ts, AtFlags::empty()).map_err(io::Error::from)
            } else {
                let pfd = if parent.is_empty() {
                    None
                } else {
                    match open_in_root(self.root, parent, OFlags::PATH | OFlags::DIRECTORY) {
                        Ok(fd) => Some(fd),
                        Err(_) => continue,
                    }
                };
                let pfd = pfd.as_ref().map_or(self.root, |f| f.as_fd());
                match rfs::statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if is_dir(&st) => {
                        rfs::utimensat(pfd, name, ts, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(io::Error::from)
                    }
                    // Replaced or removed later in the layer.
                    _ => continue,
                }
            };
            r.map_err(|source| UnpackError::Io {
                entry: lossy(path),
                op: "set directory times",
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use tar::{EntryType, Header};

    const SHIFT: IdShift = IdShift::ENVBOX;
    const MTIME: u64 = 1_600_000_000;

    /// A layer built in memory with the `tar` crate, plus raw headers for names the
    /// builder refuses.
    struct Layer {
        b: tar::Builder<Vec<u8>>,
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    impl Layer {
        fn new() -> Self {
            Layer {
                b: tar::Builder::new(Vec::new()),
            }
        }

        fn file_owned(&mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) {
            let mut h = header(EntryType::Regular, mode, uid, gid, data.len() as u64);
            self.b.append_data(&mut h, name, data).unwrap();
        }

        fn file(&mut self, name: &str, data: &[u8]) {
            self.file_owned(name, data, 0o644, 0, 0);
        }

        fn dir_mode(&mut self, name: &str, mode: u32) {
            let mut h = header(EntryType::Directory, mode, 0, 0, 0);
            self.b.append_data(&mut h, name, &[][..]).unwrap();
        }

        fn dir(&mut self, name: &str) {
            self.dir_mode(name, 0o755);
        }

        fn symlink(&mut self, name: &str, target: &str) {
            let mut h = header(EntryType::Symlink, 0o777, 0, 0, 0);
            self.b.append_link(&mut h, name, target).unwrap();
        }

        fn hardlink(&mut self, name: &str, target: &str) {
            let mut h = header(EntryType::Link, 0o644, 0, 0, 0);
            self.b.append_link(&mut h, name, target).unwrap();
        }

        fn device(&mut self, name: &str, kind: EntryType, major: u32, minor: u32, mode: u32) {
            let mut h = header(kind, mode, 0, 0, 0);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.b.append_data(&mut h, name, &[][..]).unwrap();
        }

        fn pax(&mut self, exts: &[(&str, &[u8])]) {
            self.b.append_pax_extensions(exts.iter().copied()).unwrap();
        }

        /// An entry whose name and link name are written into the header verbatim
        /// (at most 100 bytes each), bypassing the builder's path checks.
        fn raw(&mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) {
            let mut h = header(kind, 0o644, 0, 0, data.len() as u64);
            if kind == EntryType::Char {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            }
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
            h.set_cksum();
            self.b.append(&h, data).unwrap();
        }

        fn finish(self) -> Vec<u8> {
            self.b.into_inner().unwrap()
        }
    }

    /// A root directory and a canary directory next to it (outside the root).
    struct Scene {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        canary: PathBuf,
    }

    impl Scene {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            let canary = tmp.path().join("canary");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&canary).unwrap();
            fs::write(canary.join("file"), b"canary contents").unwrap();
            fs::create_dir(canary.join("sub")).unwrap();
            fs::write(canary.join("sub/inner"), b"inner").unwrap();
            Scene {
                _tmp: tmp,
                root,
                canary,
            }
        }

        fn apply(&self, layer: Vec<u8>) -> Result<LayerStats, UnpackError> {
            apply_layer(&self.root, &layer[..], Compression::None, &SHIFT, None)
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        /// The canary's path relative to `/`, for names that try to reach it.
        fn canary_rel(&self) -> String {
            self.canary
                .to_str()
                .unwrap()
                .trim_start_matches('/')
                .to_string()
        }

        fn canary_abs(&self) -> String {
            self.canary.to_str().unwrap().to_string()
        }
    }

    type Snapshot = BTreeMap<PathBuf, (u32, u32, u32, u64, u64, i64, i64, Vec<u8>)>;

    /// Everything observable about a tree except atimes.
    fn snapshot(dir: &Path) -> Snapshot {
        let mut out = BTreeMap::new();
        fn walk(p: &Path, out: &mut Snapshot) {
            let m = fs::symlink_metadata(p).unwrap();
            let content = if m.file_type().is_file() {
                fs::read(p).unwrap()
            } else if m.file_type().is_symlink() {
                fs::read_link(p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            out.insert(
                p.to_path_buf(),
                (
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.nlink(),
                    m.ino(),
                    m.mtime(),
                    m.ctime(),
                    content,
                ),
            );
            if m.file_type().is_dir() {
                for e in fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), out);
                }
            }
        }
        walk(dir, &mut out);
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn lmeta(p: &Path) -> fs::Metadata {
        fs::symlink_metadata(p).unwrap()
    }

    fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        match rfs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }

    #[test]
    fn every_entry_type() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir_mode("etc", 0o750);
        l.file_owned("etc/hosts", b"127.0.0.1 localhost\n", 0o640, 1000, 1001);
        l.symlink("etc/link", "/etc/hosts");
        l.hardlink("etc/hard", "etc/hosts");
        l.dir("dev");
        l.device("dev/null", EntryType::Char, 1, 3, 0o666);
        l.device("dev/loop0", EntryType::Block, 7, 0, 0o660);
        l.device("dev/fifo", EntryType::Fifo, 0, 0, 0o620);
        l.dir_mode("tmp", 0o1777);
        let stats = s.apply(l.finish()).unwrap();
        assert_eq!(stats.entries, 9);
        assert_eq!(stats.bytes, 20);

        let etc = lmeta(&s.p("etc"));
        assert!(etc.is_dir());
        assert_eq!(etc.mode() & 0o7777, 0o750);
        assert_eq!((etc.uid(), etc.gid()), (100_000, 100_000));
        assert_eq!(
            etc.mtime(),
            MTIME as i64,
            "directory mtime set after its children"
        );

        let hosts = lmeta(&s.p("etc/hosts"));
        assert_eq!(
            fs::read(s.p("etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        assert_eq!(hosts.mode() & 0o7777, 0o640);
        assert_eq!((hosts.uid(), hosts.gid()), (101_000, 101_001));
        assert_eq!(hosts.mtime(), MTIME as i64);
        assert_eq!(hosts.nlink(), 2);
        assert_eq!(lmeta(&s.p("etc/hard")).ino(), hosts.ino());

        let link = lmeta(&s.p("etc/link"));
        assert!(link.file_type().is_symlink());
        assert_eq!(
            fs::read_link(s.p("etc/link")).unwrap(),
            Path::new("/etc/hosts")
        );
        assert_eq!((link.uid(), link.gid()), (100_000, 100_000));
        assert_eq!(link.mtime(), MTIME as i64);

        let null = lmeta(&s.p("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rfs::makedev(1, 3));
        assert_eq!(null.mode() & 0o7777, 0o666);
        assert_eq!(null.uid(), 100_000);
        let lp = lmeta(&s.p("dev/loop0"));
        assert!(lp.file_type().is_block_device());
        assert_eq!(lp.rdev(), rfs::makedev(7, 0));
        assert_eq!(lp.mode() & 0o7777, 0o660);
        let fifo = lmeta(&s.p("dev/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o620);
        assert_eq!(lmeta(&s.p("tmp")).mode() & 0o7777, 0o1777);
    }

    #[test]
    fn whiteouts_remove_lower_entries() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("a");
        l.file("a/x", b"x");
        l.file("a/y", b"y");
        l.dir("tree");
        l.dir("tree/sub");
        l.file("tree/sub/f", b"f");
        l.file("keep", b"k");
        s.apply(l.finish()).unwrap();

        let mut l = Layer::new();
        l.file("a/.wh.x", b"");
        l.file(".wh.tree", b"");
        l.file(".wh.missing", b"");
        l.file("nodir/.wh.missing", b"");
        s.apply(l.finish()).unwrap();
        assert_eq!(names(&s.p("a")), ["y"]);
        assert_eq!(names(&s.root), ["a", "keep"]);
    }

    fn opaque_layer(marker_first: bool) -> Vec<u8> {
        let mut l = Layer::new();
        l.dir("d");
        if marker_first {
            l.file("d/.wh..wh..opq", b"");
        }
        l.file("d/new", b"new");
        l.dir("d/sub");
        l.file("d/sub/newdeep", b"nd");
        l.file("d/implicit/file", b"i");
        if !marker_first {
            l.file("d/.wh..wh..opq", b"");
        }
        l.finish()
    }

    fn opaque_case(marker_first: bool) {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("d");
        l.file("d/old1", b"1");
        l.file("d/old2", b"2");
        l.dir("d/sub");
        l.file("d/sub/deep", b"deep");
        l.dir("d/implicit");
        l.file("d/implicit/oldfile", b"o");
        l.file("outside", b"o");
        s.apply(l.finish()).unwrap();

        s.apply(opaque_layer(marker_first)).unwrap();
        assert_eq!(names(&s.p("d")), ["implicit", "new", "sub"]);
        assert_eq!(names(&s.p("d/sub")), ["newdeep"]);
        assert_eq!(names(&s.p("d/implicit")), ["file"]);
        assert_eq!(fs::read(s.p("d/new")).unwrap(), b"new");
        assert!(s.p("outside").exists());
        assert!(!s.p("d/.wh..wh..opq").exists());
    }

    #[test]
    fn opaque_marker_before_entries() {
        opaque_case(true);
    }

    #[test]
    fn opaque_marker_after_entries() {
        opaque_case(false);
    }

    #[test]
    fn whiteout_keeps_same_layer_entries() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("d");
        l.file("d/lower", b"l");
        s.apply(l.finish()).unwrap();
        let mut l = Layer::new();
        l.dir("d");
        l.file("d/mine", b"m");
        l.file(".wh.d", b"");
        s.apply(l.finish()).unwrap();
        assert_eq!(names(&s.p("d")), ["mine"]);
    }

    #[test]
    fn replace_rules() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.file("f2d", b"file");
        l.dir("d2f");
        l.dir("d2f/sub");
        l.file("d2f/sub/x", b"x");
        l.dir_mode("d2d", 0o700);
        l.file("d2d/kept", b"kept");
        l.symlink("s2d", "/");
        l.file("f2s", b"f");
        s.apply(l.finish()).unwrap();

        let mut l = Layer::new();
        l.dir("f2d");
        l.file("f2d/inside", b"in");
        l.file("d2f", b"now a file");
        l.dir_mode("d2d", 0o755);
        l.dir("s2d");
        l.symlink("f2s", "target");
        s.apply(l.finish()).unwrap();

        assert!(lmeta(&s.p("f2d")).is_dir());
        assert_eq!(names(&s.p("f2d")), ["inside"]);
        assert_eq!(fs::read(s.p("d2f")).unwrap(), b"now a file");
        assert_eq!(names(&s.p("d2d")), ["kept"]);
        assert_eq!(lmeta(&s.p("d2d")).mode() & 0o7777, 0o755);
        assert!(lmeta(&s.p("s2d")).is_dir());
        assert!(lmeta(&s.p("f2s")).file_type().is_symlink());
    }

    /// Issue 16 defect 4: replacing an entry directly under the root (here the symlink
    /// `a -> x` by a directory) must drop the cached parent fd resolved through it.
    #[test]
    fn replacing_a_root_entry_drops_the_cached_parent() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("x");
        l.symlink("a", "x");
        l.file("a/b/f1", b"1");
        l.dir("a");
        l.file("a/b/f2", b"2");
        s.apply(l.finish()).unwrap();
        assert_eq!(fs::read(s.p("x/b/f1")).unwrap(), b"1");
        assert!(lmeta(&s.p("a")).is_dir());
        assert_eq!(fs::read(s.p("a/b/f2")).unwrap(), b"2");
        assert!(
            !s.p("x/b/f2").exists(),
            "f2 was written through the old symlink"
        );
    }

    /// Issue 16 defect 5: a tiny layer must not be able to exhaust memory or disk.
    #[test]
    fn oversized_extension_headers_are_refused() {
        let s = Scene::new();
        let mut l = Layer::new();
        let comment = vec![b'c'; 8 << 20];
        l.pax(&[("comment", &comment[..])]);
        l.file("f", b"x");
        let e = s.apply(l.finish()).unwrap_err().to_string();
        assert!(e.contains("exceeds the limit of 1048576 bytes"), "{e}");
        let mut l = Layer::new();
        let long = "d/".repeat(600_000) + "f";
        // The builder writes the GNU long name header itself.
        let mut h = header(EntryType::Regular, 0o644, 0, 0, 1);
        l.b.append_data(&mut h, &long, &b"x"[..]).unwrap();
        l.file("short", b"x");
        let e = s.apply(l.finish()).unwrap_err().to_string();
        assert!(e.contains("GNU long name of 1200002 bytes exceeds"), "{e}");
        assert!(!s.p("short").exists());
    }

    /// Issue 16 defect 5: per-layer budgets of bytes and entries.
    #[test]
    fn layer_budgets_stop_the_unpack() {
        let s = Scene::new();
        let limits = Limits {
            max_bytes: 64 << 10,
            max_entries: 3,
            ..Limits::default()
        };
        let run = |layer: Vec<u8>| {
            apply(
                &s.root,
                &[],
                &layer[..],
                Compression::None,
                &SHIFT,
                None,
                (Target::Flatten, limits),
            )
        };
        let mut l = Layer::new();
        l.file("big", &vec![0u8; 128 << 10]);
        let e = run(l.finish()).unwrap_err().to_string();
        assert!(e.contains("exceeds its budget of 65536 bytes"), "{e}");
        let mut l = Layer::new();
        for i in 0..4 {
            l.file(&format!("f{i}"), b"");
        }
        let e = run(l.finish()).unwrap_err().to_string();
        assert!(e.contains("exceeds its budget of 3 entries"), "{e}");
    }

    /// Issue 16 defect 5: sparse entries were written with their holes filled (old GNU format)
    /// or as `GNUSparseFile.NNN/<name>` holding the raw map (PAX 1.0).
    #[test]
    fn sparse_entries_are_refused_clearly() {
        let s = Scene::new();
        let mut l = Layer::new();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_path("holes").unwrap();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(512);
        {
            let g = h.as_gnu_mut().unwrap();
            g.sparse[0].offset = *b"00000000000\0";
            g.sparse[0].numbytes = *b"00000001000\0";
            g.sparse[1].offset = *b"37777777777\0";
            g.sparse[1].numbytes = *b"00000000000\0";
            g.realsize = *b"37777777777\0";
        }
        h.set_cksum();
        l.b.append(&h, &[7u8; 512][..]).unwrap();
        let e = s.apply(l.finish()).unwrap_err().to_string();
        assert!(e.contains("\"holes\" is a sparse file (GNU format)"), "{e}");
        assert!(!s.p("holes").exists());

        let s = Scene::new();
        let mut l = Layer::new();
        l.pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"real"),
            ("GNU.sparse.realsize", b"4096"),
        ]);
        l.file("GNUSparseFile.0/real", b"1\n0\n512\n");
        let e = s.apply(l.finish()).unwrap_err().to_string();
        assert!(e.contains("sparse file (PAX format 1.0)"), "{e}");
        assert!(!s.p("GNUSparseFile.0").exists());
    }

    #[test]
    fn hardlink_to_lower_layer_file() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("bin");
        l.file_owned("bin/busybox", b"#!busybox", 0o755, 0, 0);
        s.apply(l.finish()).unwrap();
        let mut l = Layer::new();
        l.hardlink("bin/sh", "bin/busybox");
        l.raw(EntryType::Link, b"/bin/ls", b"/bin/busybox", b"");
        s.apply(l.finish()).unwrap();
        let bb = lmeta(&s.p("bin/busybox"));
        assert_eq!(bb.nlink(), 3);
        assert_eq!(lmeta(&s.p("bin/sh")).ino(), bb.ino());
        assert_eq!(lmeta(&s.p("bin/ls")).ino(), bb.ino());
    }

    #[test]
    fn long_names_and_link_names() {
        let s = Scene::new();
        let c150 = "c".repeat(150);
        let over100 = format!("dir/{c150}");
        let long_path = format!(
            "{}/{}/{}/file",
            "a".repeat(200),
            "b".repeat(200),
            "c".repeat(200)
        );
        let pax_path = format!("{}/{}/pax-file", "p".repeat(120), "q".repeat(250));
        let long_target = format!("/{}/{}", "t".repeat(200), "u".repeat(100));
        let mut l = Layer::new();
        l.file(&over100, b"gnu long name");
        l.file(&long_path, b"very long");
        l.symlink("longlink", &long_target);
        l.pax(&[("path", pax_path.as_bytes())]);
        l.file("short-placeholder", b"pax");
        l.pax(&[("linkpath", long_target.as_bytes())]);
        l.raw(EntryType::Symlink, b"paxlink", b"x", b"");
        let stats = s.apply(l.finish()).unwrap();
        assert_eq!(stats.entries, 5);
        assert_eq!(fs::read(s.p(&over100)).unwrap(), b"gnu long name");
        assert_eq!(fs::read(s.p(&long_path)).unwrap(), b"very long");
        assert_eq!(fs::read(s.p(&pax_path)).unwrap(), b"pax");
        assert!(!s.p("short-placeholder").exists());
        assert_eq!(
            fs::read_link(s.p("longlink")).unwrap(),
            Path::new(&long_target)
        );
        assert_eq!(
            fs::read_link(s.p("paxlink")).unwrap(),
            Path::new(&long_target)
        );
    }

    fn cap_v2() -> Vec<u8> {
        // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_RAW.
        let mut v = Vec::new();
        v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
        v.extend_from_slice(&(1u32 << 13).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    #[test]
    fn setuid_and_capabilities_survive_chown() {
        let s = Scene::new();
        let cap = cap_v2();
        let mut l = Layer::new();
        l.dir("bin");
        l.file_owned("bin/su", b"su", 0o4755, 0, 0);
        l.file_owned("bin/sg", b"sg", 0o2755, 0, 42);
        l.pax(&[
            ("SCHILY.xattr.security.capability", &cap[..]),
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ]);
        l.file_owned("bin/ping", b"ping", 0o4755, 0, 0);
        s.apply(l.finish()).unwrap();

        let su = lmeta(&s.p("bin/su"));
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.uid(), 100_000);
        let sg = lmeta(&s.p("bin/sg"));
        assert_eq!(sg.mode() & 0o7777, 0o2755);
        assert_eq!(sg.gid(), 100_042);
        let ping = lmeta(&s.p("bin/ping"));
        assert_eq!(ping.mode() & 0o7777, 0o4755);
        // Stored as a namespaced (v3) capability owned by the container's root, so it is honoured
        // inside the user namespace.
        let mut v3 = cap.clone();
        v3[3] = 0x03;
        v3.extend_from_slice(&100_000u32.to_le_bytes());
        assert_eq!(
            getxattr(&s.p("bin/ping"), "security.capability").as_deref(),
            Some(&v3[..])
        );
        assert_eq!(
            getxattr(&s.p("bin/ping"), "trusted.overlay.redirect"),
            None,
            "overlay xattrs from the image are dropped"
        );
        // user.* xattrs depend on the file system; set when supported.
        if let Some(v) = getxattr(&s.p("bin/ping"), "user.note") {
            assert_eq!(v, b"hello");
        }
    }

    #[test]
    fn namespaced_capability_root_id_is_shifted() {
        let s = Scene::new();
        let mut cap = cap_v2();
        cap[3] = 0x03;
        cap.extend_from_slice(&0u32.to_le_bytes());
        let mut l = Layer::new();
        l.pax(&[("SCHILY.xattr.security.capability", &cap[..])]);
        l.file("ping", b"p");
        s.apply(l.finish()).unwrap();
        let got = getxattr(&s.p("ping"), "security.capability").unwrap();
        assert_eq!(got.len(), 24);
        assert_eq!(&got[20..24], &100_000u32.to_le_bytes());
    }

    #[test]
    fn ids_are_shifted_and_out_of_range_ids_fail() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.file_owned("user", b"u", 0o644, 1000, 1000);
        l.file_owned("nobody", b"n", 0o644, 65534, 65534);
        s.apply(l.finish()).unwrap();
        let m = lmeta(&s.p("user"));
        assert_eq!((m.uid(), m.gid()), (101_000, 101_000));
        let m = lmeta(&s.p("nobody"));
        assert_eq!((m.uid(), m.gid()), (165_534, 165_534));

        for (uid, gid, kind, id) in [(65536, 0, "uid", 65536), (0, 70000, "gid", 70000)] {
            let mut l = Layer::new();
            l.file_owned("big", b"b", 0o644, uid, gid);
            match s.apply(l.finish()) {
                Err(UnpackError::IdOutOfRange {
                    entry,
                    kind: k,
                    id: i,
                    size,
                }) => {
                    assert_eq!(entry, "big");
                    assert_eq!((k, i, size), (kind, id, 65536));
                }
                other => panic!("expected IdOutOfRange, got {other:?}"),
            }
            assert!(!s.p("big").exists());
        }
        // Large ids through PAX headers.
        let mut l = Layer::new();
        l.pax(&[("uid", b"4000000000")]);
        l.file("pax-big", b"b");
        let err = s.apply(l.finish()).unwrap_err();
        assert!(err.to_string().contains("4000000000"), "{err}");
    }

    #[test]
    fn dot_dot_and_absolute_names() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        for name in [
            &b"../canary/file"[..],
            b"../../x",
            b"a/../../canary/evil",
            b"./../canary/sub/inner",
        ] {
            let mut l = Layer::new();
            l.raw(EntryType::Regular, name, b"", b"pwned");
            match s.apply(l.finish()) {
                Err(UnpackError::Escape { entry }) => assert_eq!(entry.as_bytes(), name),
                other => panic!("{}: expected Escape, got {other:?}", lossy(name)),
            }
        }
        // `..` that stays inside is fine, absolute names are relative to the root.
        let abs = format!("{}/file", s.canary_abs());
        let mut l = Layer::new();
        l.raw(EntryType::Regular, b"a/b/../c", b"", b"inside");
        l.pax(&[("path", abs.as_bytes())]);
        l.raw(EntryType::Regular, b"placeholder", b"", b"pwned");
        s.apply(l.finish()).unwrap();
        assert_eq!(fs::read(s.p("a/c")).unwrap(), b"inside");
        assert_eq!(
            fs::read(s.root.join(s.canary_rel()).join("file")).unwrap(),
            b"pwned"
        );
        assert_eq!(before, snapshot(&s.canary));
    }

    #[test]
    fn symlink_in_parent_stays_in_root() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        let host_probe = format!("envbox-unpack-probe-{}", std::process::id());
        let mut l = Layer::new();
        l.symlink("evil", "/");
        l.file(&format!("evil/{host_probe}"), b"pwned");
        l.symlink("tocanary", &s.canary_abs());
        l.symlink("a", "../../../../../..");
        l.symlink("b", "a");
        l.file("b/through-chain", b"chain");
        l.dir("real");
        l.symlink("real/up", "../../../../");
        l.file("real/up/via-dotdot", b"dd");
        s.apply(l.finish()).unwrap();
        assert_eq!(fs::read(s.p(&host_probe)).unwrap(), b"pwned");
        assert!(!Path::new("/").join(&host_probe).exists());
        assert_eq!(fs::read(s.p("through-chain")).unwrap(), b"chain");
        assert_eq!(fs::read(s.p("via-dotdot")).unwrap(), b"dd");

        // Writing through a link to the canary's absolute path: the link points at a
        // path that does not exist inside the root; either an error or a file inside
        // the root is acceptable, the canary must not change.
        let mut l = Layer::new();
        l.file("tocanary/file", b"pwned");
        let r = s.apply(l.finish());
        if r.is_ok() {
            assert_eq!(
                fs::read(s.root.join(s.canary_rel()).join("file")).unwrap(),
                b"pwned"
            );
        }
        let mut l = Layer::new();
        l.file(&format!("evil/{}/file", s.canary_rel()), b"pwned");
        l.file(&format!("b/{}/sub/inner", s.canary_rel()), b"pwned");
        s.apply(l.finish()).unwrap();
        assert_eq!(before, snapshot(&s.canary));
    }

    #[test]
    fn existing_symlink_is_replaced_not_followed() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        let mut l = Layer::new();
        l.symlink("f", &format!("{}/file", s.canary_abs()));
        l.symlink("d", &s.canary_abs());
        l.symlink("rel", "../canary/file");
        s.apply(l.finish()).unwrap();
        let mut l = Layer::new();
        l.file("f", b"pwned");
        l.dir_mode("d", 0o777);
        l.file("rel", b"pwned");
        l.device("f", EntryType::Fifo, 0, 0, 0o666);
        s.apply(l.finish()).unwrap();
        assert!(lmeta(&s.p("d")).is_dir());
        assert!(lmeta(&s.p("f")).file_type().is_fifo());
        assert_eq!(fs::read(s.p("rel")).unwrap(), b"pwned");
        assert_eq!(before, snapshot(&s.canary));
    }

    #[test]
    fn hardlinks_cannot_reach_outside() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        let shadow_links = fs::symlink_metadata("/etc/shadow").map(|m| m.nlink()).ok();
        let canary_file = format!("{}/file", s.canary_abs());
        let mut setup = Layer::new();
        setup.symlink("evil", "/");
        setup.symlink("up", "../../..");
        s.apply(setup.finish()).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("h1", b"/etc/shadow".to_vec()),
            ("h2", canary_file.clone().into_bytes()),
            ("h3", format!("evil{canary_file}").into_bytes()),
            ("h4", format!("up/{}/file", s.canary_rel()).into_bytes()),
            ("h5", b"../canary/file".to_vec()),
            ("h6", b"evil/../../canary/file".to_vec()),
        ];
        for (name, target) in &cases {
            let mut l = Layer::new();
            if target.len() < 100 {
                l.raw(EntryType::Link, name.as_bytes(), target, b"");
            } else {
                l.pax(&[("linkpath", &target[..])]);
                l.raw(EntryType::Link, name.as_bytes(), b"x", b"");
            }
            let err = s.apply(l.finish()).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            assert!(!s.p(name).exists());
        }
        // A hard link to a symlink links the symlink itself.
        let mut l = Layer::new();
        l.hardlink("evil2", "evil");
        s.apply(l.finish()).unwrap();
        let m = lmeta(&s.p("evil2"));
        assert!(m.file_type().is_symlink());
        assert_eq!(m.ino(), lmeta(&s.p("evil")).ino());

        assert_eq!(before, snapshot(&s.canary));
        assert_eq!(
            shadow_links,
            fs::symlink_metadata("/etc/shadow").map(|m| m.nlink()).ok()
        );
    }

    #[test]
    fn device_nodes_stay_inside_root() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        let mut l = Layer::new();
        l.symlink("evil", "/");
        l.raw(EntryType::Char, b"evil/dev-node", b"", b"");
        l.device(
            &format!("evil/{}/node", s.canary_rel()),
            EntryType::Block,
            8,
            0,
            0o600,
        );
        s.apply(l.finish()).unwrap();
        let m = lmeta(&s.p("dev-node"));
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), rfs::makedev(1, 3));
        assert_eq!((m.uid(), m.gid()), (100_000, 100_000));
        assert!(!Path::new("/dev-node").exists());
        let m = lmeta(&s.root.join(s.canary_rel()).join("node"));
        assert!(m.file_type().is_block_device());

        let mut l = Layer::new();
        l.raw(EntryType::Char, b"../canary/node2", b"", b"");
        assert!(matches!(
            s.apply(l.finish()),
            Err(UnpackError::Escape { .. })
        ));
        assert_eq!(before, snapshot(&s.canary));
    }

    #[test]
    fn whiteouts_cannot_reach_outside() {
        let s = Scene::new();
        let before = snapshot(&s.canary);
        let mut l = Layer::new();
        l.symlink("evil", "/");
        l.symlink("tocanary", &s.canary_abs());
        l.symlink("up", "../../../..");
        l.file("keep", b"k");
        s.apply(l.finish()).unwrap();

        for name in [&b"../../canary/.wh.file"[..], b"../.wh.canary"] {
            let mut l = Layer::new();
            l.raw(EntryType::Regular, name, b"", b"");
            assert!(matches!(
                s.apply(l.finish()),
                Err(UnpackError::Escape { .. })
            ));
        }
        let mut l = Layer::new();
        l.raw(EntryType::Regular, b".wh.", b"", b"");
        assert!(matches!(
            s.apply(l.finish()),
            Err(UnpackError::Invalid { .. })
        ));

        let mut l = Layer::new();
        l.file(&format!("evil/{}/.wh.file", s.canary_rel()), b"");
        l.file(&format!("up/{}/.wh.sub", s.canary_rel()), b"");
        l.file("tocanary/.wh.file", b"");
        l.file("tocanary/.wh..wh..opq", b"");
        l.file(&format!("evil/{}/.wh..wh..opq", s.canary_rel()), b"");
        s.apply(l.finish()).unwrap();
        assert_eq!(before, snapshot(&s.canary));
        assert!(s.p("keep").exists());
        assert!(lmeta(&s.p("tocanary")).file_type().is_symlink());

        // Whiting out the symlink itself removes the link, not its target.
        let mut l = Layer::new();
        l.file(".wh.tocanary", b"");
        l.file(".wh.evil", b"");
        s.apply(l.finish()).unwrap();
        assert!(!s.p("tocanary").exists());
        assert_eq!(before, snapshot(&s.canary));
    }

    #[test]
    fn compressed_layers() {
        let mut l = Layer::new();
        l.dir("d");
        l.file("d/one", b"first member");
        let first = l.finish();
        // Split the tar in two gzip members (as pigz or eStargz do).
        let cut = 1024;
        let mut gz = Vec::new();
        for part in [&first[..cut], &first[cut..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            gz.extend(e.finish().unwrap());
        }
        assert_eq!(Compression::sniff(&gz), Compression::Gzip);
        let s = Scene::new();
        apply_layer(&s.root, &gz[..], Compression::Gzip, &SHIFT, None).unwrap();
        assert_eq!(fs::read(s.p("d/one")).unwrap(), b"first member");

        let mut l = Layer::new();
        l.file("d/two", b"zstd");
        let zst = zstd::stream::encode_all(&l.finish()[..], 3).unwrap();
        assert_eq!(Compression::sniff(&zst), Compression::Zstd);
        apply_layer(&s.root, &zst[..], Compression::Zstd, &SHIFT, None).unwrap();
        assert_eq!(fs::read(s.p("d/two")).unwrap(), b"zstd");

        // A corrupt gzip trailer fails even though every entry was read.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 6] ^= 0xff;
        assert!(apply_layer(&s.root, &bad[..], Compression::Gzip, &SHIFT, None).is_err());
    }

    #[test]
    fn media_types_and_sniffing() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Some(None)),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Some(Zstd)),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Gzip),
            ),
            ("application/vnd.docker.image.rootfs.diff.tar", Some(None)),
            ("application/octet-stream", Option::None),
        ] {
            assert_eq!(Compression::from_media_type(mt), c, "{mt}");
        }
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Zstd);
        assert_eq!(Compression::sniff(b"etc/"), None);
        assert_eq!(Compression::sniff(&[]), None);
    }

    #[test]
    fn root_entry_and_pax_times() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.raw(EntryType::Directory, b"./", b"", b"");
        l.pax(&[("mtime", b"1700000000.25")]);
        l.file("precise", b"p");
        l.pax(&[("path", b"bad\0name")]);
        l.file("x", b"");
        let err = s.apply(l.finish()).unwrap_err();
        assert!(matches!(err, UnpackError::Invalid { .. }), "{err}");
        let root = lmeta(&s.root);
        assert_eq!((root.uid(), root.mode() & 0o7777), (100_000, 0o644));
        let p = lmeta(&s.p("precise"));
        assert_eq!((p.mtime(), p.mtime_nsec()), (1_700_000_000, 250_000_000));
    }

    #[test]
    fn overlay_layer_format() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.dir("d");
        l.file("d/.wh..wh..opq", b"");
        l.file("d/new", b"n");
        l.file("etc/.wh.passwd", b"");
        l.file("mine", b"m");
        l.file(".wh.mine", b"");
        let layer = l.finish();
        apply_layer_overlay(&s.root, &[], &layer[..], Compression::None, &SHIFT, None).unwrap();
        assert_eq!(
            getxattr(&s.p("d"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        let wh = lmeta(&s.p("etc/passwd"));
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(lmeta(&s.p("mine")).is_file());
        assert_eq!(names(&s.p("d")), ["new"]);
    }

    /// Layer directories side by side, unpacked in overlay format, base first.
    struct Stack {
        tmp: tempfile::TempDir,
        dirs: Vec<PathBuf>,
    }

    impl Stack {
        fn new() -> Self {
            Stack {
                tmp: tempfile::tempdir().unwrap(),
                dirs: Vec::new(),
            }
        }

        /// Unpacks `layer` into a new layer directory on top of the others.
        fn push(&mut self, layer: Vec<u8>) -> Result<LayerStats, UnpackError> {
            let dir = self.tmp.path().join(format!("l{}", self.dirs.len()));
            fs::create_dir(&dir).unwrap();
            let r = self.push_into(&dir, layer);
            self.dirs.push(dir);
            r
        }

        fn push_into(&self, dir: &Path, layer: Vec<u8>) -> Result<LayerStats, UnpackError> {
            let lowers: Vec<&Path> = self.dirs.iter().rev().map(PathBuf::as_path).collect();
            apply_layer_overlay(dir, &lowers, &layer[..], Compression::None, &SHIFT, None)
        }

        fn top(&self) -> &Path {
            self.dirs.last().unwrap()
        }
    }

    #[test]
    fn overlay_hardlink_to_lower_layers() {
        let mut st = Stack::new();
        let mut l = Layer::new();
        l.dir("usr");
        l.dir("usr/bin");
        l.file_owned("usr/bin/busybox", b"#!busybox", 0o4755, 0, 0);
        l.file("usr/bin/other", b"o");
        st.push(l.finish()).unwrap();
        let mut l = Layer::new();
        l.symlink("bin", "usr/bin");
        l.file("mid", b"m");
        st.push(l.finish()).unwrap();
        let mut l = Layer::new();
        l.hardlink("sh", "usr/bin/busybox");
        // Through a symlink of the middle layer to a file of the base.
        l.hardlink("ls", "/bin/busybox");
        l.hardlink("mid2", "mid");
        // The layer's own file: an ordinary link.
        l.file("own", b"own");
        l.hardlink("own2", "own");
        // A hard link to a symlink of a lower layer links the symlink itself.
        l.hardlink("binlink", "bin");
        let stats = st.push(l.finish()).unwrap();
        assert_eq!(stats.lower_links, 4);
        let base = lmeta(&st.dirs[0].join("usr/bin/busybox"));
        for name in ["sh", "ls"] {
            let m = lmeta(&st.top().join(name));
            assert_eq!(m.ino(), base.ino(), "{name}");
            assert_eq!(fs::read(st.top().join(name)).unwrap(), b"#!busybox");
            assert_eq!(m.mode() & 0o7777, 0o4755);
        }
        assert_eq!(
            lmeta(&st.top().join("mid2")).ino(),
            lmeta(&st.dirs[1].join("mid")).ino()
        );
        assert_eq!(
            lmeta(&st.top().join("own2")).ino(),
            lmeta(&st.top().join("own")).ino()
        );
        assert!(lmeta(&st.top().join("binlink")).file_type().is_symlink());
        // Nothing was created in the lower layers.
        assert_eq!(names(&st.dirs[0]), ["usr"]);
        assert_eq!(names(&st.dirs[1]), ["bin", "mid"]);
    }

    #[test]
    fn overlay_hardlink_honours_whiteouts_and_opaque_dirs() {
        let mut st = Stack::new();
        let mut l = Layer::new();
        l.dir("etc");
        l.file("etc/gone", b"g");
        l.file("etc/kept", b"k");
        l.dir("opq");
        l.file("opq/hidden", b"h");
        l.file("replaced", b"file");
        st.push(l.finish()).unwrap();
        let mut l = Layer::new();
        l.file("etc/.wh.gone", b"");
        l.dir("opq");
        l.file("opq/.wh..wh..opq", b"");
        l.file("opq/visible", b"v");
        l.dir("replaced");
        st.push(l.finish()).unwrap();

        for (name, target) in [
            ("link-to-gone", "etc/gone"),
            ("link-to-hidden", "opq/hidden"),
            ("link-below-dir", "replaced"),
            ("link-missing", "nowhere/at/all"),
        ] {
            let mut l = Layer::new();
            l.hardlink(name, target);
            let top = st.tmp.path().join(format!("t-{name}"));
            fs::create_dir(&top).unwrap();
            match st.push_into(&top, l.finish()) {
                Err(e @ UnpackError::MissingLinkTarget { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(name) && msg.contains(target), "{msg}");
                }
                Err(UnpackError::Invalid { entry, .. }) if name == "link-below-dir" => {
                    assert_eq!(entry, name);
                }
                other => panic!("{name}: expected an error, got {other:?}"),
            }
        }
        let mut l = Layer::new();
        l.hardlink("a", "etc/kept");
        l.hardlink("b", "opq/visible");
        let stats = st.push(l.finish()).unwrap();
        assert_eq!(stats.lower_links, 2);
        assert_eq!(fs::read(st.top().join("a")).unwrap(), b"k");
        assert_eq!(fs::read(st.top().join("b")).unwrap(), b"v");

        // This layer's own whiteout hides the lower file too.
        let mut l = Layer::new();
        l.file(".wh.a", b"");
        l.hardlink("c", "a");
        let top = st.tmp.path().join("own-whiteout");
        fs::create_dir(&top).unwrap();
        assert!(matches!(
            st.push_into(&top, l.finish()),
            Err(UnpackError::MissingLinkTarget { .. })
        ));
    }

    #[test]
    fn overlay_hardlink_symlinks_in_lowers_stay_inside() {
        let scene = Scene::new();
        let before = snapshot(&scene.canary);
        let mut st = Stack::new();
        let mut l = Layer::new();
        l.symlink("evil", "/");
        l.symlink("up", "../../../../../../..");
        l.symlink("abs", &scene.canary_abs());
        l.symlink("loop1", "loop2");
        l.symlink("loop2", "loop1");
        st.push(l.finish()).unwrap();
        let canary = scene.canary_rel();
        for (name, target) in [
            ("h1", format!("evil/{canary}/file")),
            ("h2", format!("up/{canary}/file")),
            ("h3", "abs/file".to_string()),
            ("h4", "loop1/x".to_string()),
        ] {
            let mut l = Layer::new();
            l.hardlink(name, &target);
            let top = st.tmp.path().join(format!("t-{name}"));
            fs::create_dir(&top).unwrap();
            let err = st.push_into(&top, l.finish()).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            assert!(!top.join(name).exists());
        }
        assert_eq!(before, snapshot(&scene.canary));
    }

    /// Mounts a small tmpfs at `dir` for the test's duration (None when not permitted).
    struct TmpfsMount(PathBuf);

    impl TmpfsMount {
        fn new(dir: &Path, size: &str) -> Option<Self> {
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok.then(|| TmpfsMount(dir.to_path_buf()))
        }
    }

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn overlay_hardlink_copies_across_file_systems() {
        let mut st = Stack::new();
        let cap = cap_v2();
        let mut l = Layer::new();
        l.dir("bin");
        l.pax(&[("SCHILY.xattr.security.capability", &cap[..])]);
        l.file_owned("bin/ping", b"ping binary", 0o4750, 0, 7);
        l.symlink("bin/sl", "ping");
        l.device("bin/fifo", EntryType::Fifo, 0, 0, 0o640);
        st.push(l.finish()).unwrap();
        let top = st.tmp.path().join("other-fs");
        fs::create_dir(&top).unwrap();
        let Some(_mount) = TmpfsMount::new(&top, "4m") else {
            eprintln!("skipped: cannot mount tmpfs");
            return;
        };
        let mut l = Layer::new();
        l.hardlink("ping2", "bin/ping");
        l.hardlink("sl2", "bin/sl");
        l.hardlink("fifo2", "bin/fifo");
        let stats = st.push_into(&top, l.finish()).unwrap();
        assert_eq!(stats.lower_links, 3);
        let src = lmeta(&st.dirs[0].join("bin/ping"));
        let copy = lmeta(&top.join("ping2"));
        assert_ne!(copy.dev(), src.dev());
        assert_eq!(fs::read(top.join("ping2")).unwrap(), b"ping binary");
        assert_eq!(copy.mode() & 0o7777, 0o4750);
        assert_eq!((copy.uid(), copy.gid()), (100_000, 100_007));
        assert_eq!(copy.mtime(), src.mtime());
        // The copy keeps the capability as the lower layer stored it (namespaced, see shift_capability).
        assert_eq!(
            getxattr(&top.join("ping2"), "security.capability"),
            getxattr(&st.dirs[0].join("bin/ping"), "security.capability")
        );
        assert!(getxattr(&top.join("ping2"), "security.capability")
            .is_some_and(|c| c.len() == 24 && c[..4] != cap[..4]));
        assert_eq!(fs::read_link(top.join("sl2")).unwrap(), Path::new("ping"));
        assert_eq!(lmeta(&top.join("sl2")).uid(), 100_000);
        let fifo = lmeta(&top.join("fifo2"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);
    }

    fn sha256_hex(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn diff_id_is_verified() {
        let mut l = Layer::new();
        l.file("a", &[5u8; 300_000]);
        let tar = l.finish();
        let good = sha256_hex(&tar);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        let gz = e.finish().unwrap();
        let zst = zstd::stream::encode_all(&tar[..], 1).unwrap();
        for (blob, c) in [
            (&tar, Compression::None),
            (&gz, Compression::Gzip),
            (&zst, Compression::Zstd),
        ] {
            let s = Scene::new();
            apply_layer(&s.root, &blob[..], c, &SHIFT, Some(&good)).unwrap();
            assert_eq!(fs::read(s.p("a")).unwrap().len(), 300_000);
            let wrong = sha256_hex(b"something else");
            let s = Scene::new();
            match apply_layer(&s.root, &blob[..], c, &SHIFT, Some(&wrong)) {
                Err(e @ UnpackError::DiffIdMismatch { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&wrong) && msg.contains(&good), "{msg}");
                }
                other => panic!("{c:?}: expected DiffIdMismatch, got {other:?}"),
            }
            let s = Scene::new();
            let r = apply_layer_overlay(&s.root, &[], &blob[..], c, &SHIFT, Some(&wrong));
            assert!(matches!(r, Err(UnpackError::DiffIdMismatch { .. })));
        }
        let s = Scene::new();
        for bad in ["sha512:abcd", "sha256:xyz", "sha256:", "deadbeef"] {
            assert!(matches!(
                apply_layer(&s.root, &tar[..], Compression::None, &SHIFT, Some(bad)),
                Err(UnpackError::BadDiffId(_))
            ));
        }
        assert!(!s.p("a").exists(), "a bad diff_id fails before writing");
    }

    #[test]
    fn stream_errors_name_the_position() {
        let s = Scene::new();
        let mut l = Layer::new();
        l.file("a", b"aaaa");
        l.file("b", &[7u8; 4096]);
        let mut t = l.finish();
        t.truncate(512 + 512 + 512 + 100);
        let err = s.apply(t).unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
    }
}

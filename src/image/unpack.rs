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
//!   and a link to a symlink links the symlink itself.
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
//! * A version 3 `security.capability` (namespaced file capabilities) has its root id
//!   shifted like any other owner, so the capability applies inside the container's
//!   user namespace; version 2 capabilities are written as they are.
//! * Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) are applied when met,
//!   removing everything the layer has not itself written (tracked per layer), so
//!   their position in the archive does not matter.

use std::collections::HashSet;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;

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
}

/// Why a layer could not be applied. Entry names are the raw names from the archive.
#[derive(thiserror::Error, Debug)]
pub enum UnpackError {
    #[error("opening unpack target {root}: {source}")]
    OpenRoot { root: PathBuf, source: io::Error },

    #[error("reading the layer stream ({at}): {source}")]
    Read { at: String, source: io::Error },

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
}

/// Applies one layer on top of the flattened root filesystem at `root`.
///
/// Layers are applied in order into the same directory. Whiteouts remove what lower
/// layers left in `root`; see the module documentation for the safety rules.
///
/// The stream is read to its end, so a digest-verifying reader sees every byte and the
/// gzip/zstd trailer is checked. With more than one CPU available, parsing and file
/// writes run on a scoped second thread while the calling thread decompresses; no
/// thread outlives the call. Nothing is fsynced: sync once when every layer is in
/// place. On error the tree is partly written and should be discarded.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
) -> Result<LayerStats, UnpackError> {
    apply(root, layer, compression, shift, Target::Flatten)
}

/// Writes one layer as an overlayfs lower directory at `layer_dir` (normally new and
/// empty): whiteouts become `c 0 0` device nodes, opaque markers become the
/// `trusted.overlay.opaque=y` xattr on their directory. Nothing outside `layer_dir`
/// is read or written.
pub fn apply_layer_overlay(
    layer_dir: &Path,
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
) -> Result<LayerStats, UnpackError> {
    apply(layer_dir, layer, compression, shift, Target::Overlay)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Flatten,
    Overlay,
}

fn apply(
    root: &Path,
    layer: impl Read,
    compression: Compression,
    shift: &IdShift,
    target: Target,
) -> Result<LayerStats, UnpackError> {
    let root_fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::OpenRoot {
        root: root.to_path_buf(),
        source: e.into(),
    })?;
    let mut applier = Applier::new(root_fd.as_fd(), *shift, target);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return match compression {
            Compression::Gzip => applier.run(flate2::read::MultiGzDecoder::new(layer)),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => applier.run(decoder),
                Err(source) => Err(UnpackError::Read {
                    at: "first entry".into(),
                    source,
                }),
            },
            Compression::None => applier.run(io::BufReader::with_capacity(CHUNK_SIZE, layer)),
        };
    }
    // Decompression runs on the calling thread (so `layer` need not be `Send`) while
    // a second thread parses the archive and writes the files: with more than one
    // CPU the two overlap, as `tar -xz` overlaps with its `gzip` child.
    let (chunks_tx, chunks_rx) = mpsc::sync_channel::<io::Result<Chunk>>(CHUNKS_IN_FLIGHT);
    let (spare_tx, spare_rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            applier.run(ChunkReader {
                chunks: chunks_rx,
                spare: spare_tx,
                current: Vec::new(),
                len: 0,
                pos: 0,
            })
        });
        let produced = match compression {
            Compression::Gzip => produce(
                flate2::read::MultiGzDecoder::new(layer),
                &chunks_tx,
                &spare_rx,
            ),
            Compression::Zstd => match zstd::stream::read::Decoder::new(layer) {
                Ok(decoder) => produce(decoder, &chunks_tx, &spare_rx),
                Err(e) => Err(e),
            },
            Compression::None => produce(layer, &chunks_tx, &spare_rx),
        };
        if let Err(e) = produced {
            // Hand the error to the parser, which names the entry it was reading.
            let _ = chunks_tx.send(Err(e));
        }
        drop(chunks_tx);
        match writer.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
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
    mut src: R,
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
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            match self.chunks.recv() {
                Ok(Ok((buf, len))) => {
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
    fn new(root: BorrowedFd<'r>, shift: IdShift, target: Target) -> Self {
        Applier {
            root,
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
        let mut archive = tar::Archive::new(reader);
        {
            let entries = archive.entries().map_err(|e| UnpackError::Read {
                at: "start of layer".into(),
                source: e,
            })?;
            for entry in entries {
                let mut entry = entry.map_err(|e| UnpackError::Read {
                    at: self.position(),
                    source: e,
                })?;
                self.apply_entry(&mut entry)?;
                self.stats.entries += 1;
            }
        }
        // Read the stream to its end: trailing padding, and the gzip/zstd trailer
        // whose checksum a truncated or corrupt layer fails.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| UnpackError::Read {
            at: "after the end of the archive".into(),
            source: e,
        })?;
        self.finish_dir_times()?;
        Ok(self.stats)
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

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.raw_name.clear();
        self.raw_name.extend_from_slice(&entry.path_bytes());
        let type_flag = entry.header().entry_type().as_byte();
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
            match entry.link_name_bytes() {
                Some(l) if !l.is_empty() => {
                    self.link.clear();
                    self.link.extend_from_slice(&l);
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
        let result = self.create(entry, &kind, &meta, parent.fd(self.root), &path);
        self.path = path;
        self.release_parent(parent);
        result?;
        self.mark_written();
        Ok(())
    }

    /// Reads owner, mode, times and xattrs of the entry, shifting the ids.
    fn read_meta<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let mode = h.mode().map_err(self.io_err("parse mode"))? & 0o7777;
        let uid = h.uid().map_err(self.io_err("parse uid"))?;
        let gid = h.gid().map_err(self.io_err("parse gid"))?;
        let mtime = h.mtime().map_err(self.io_err("parse mtime"))?;
        let mut mtime = rfs::Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
            tv_nsec: 0,
        };
        let mut atime = None;
        self.xattrs.clear();
        let pax = entry.pax_extensions().map_err(|e| UnpackError::Io {
            entry: lossy(&self.raw_name),
            op: "parse PAX header",
            source: e,
        })?;
        if let Some(pax) = pax {
            for ext in pax {
                let ext = ext.map_err(|e| UnpackError::Io {
                    entry: lossy(&self.raw_name),
                    op: "parse PAX header",
                    source: e,
                })?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    self.xattrs
                        .push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                } else if key == b"atime" {
                    atime = parse_pax_time(ext.value_bytes());
                }
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
    fn release_parent(&mut self, parent: Parent) {
        if let Parent::Dir(fd) = parent {
            if !self.removed {
                let (p, _) = split_parent(&self.path);
                self.cache_key.clear();
                self.cache_key.extend_from_slice(p);
                self.cache_fd = Some(fd);
            }
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
        entry: &mut tar::Entry<'_, R>,
        kind: &Kind,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        path: &[u8],
    ) -> Result<(), UnpackError> {
        let (_, name) = split_parent(path);
        match kind {
            Kind::File => self.create_file(entry, meta, parent, name),
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
        entry: &mut tar::Entry<'_, R>,
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
        entry: &mut tar::Entry<'_, R>,
        file: &File,
    ) -> Result<u64, UnpackError> {
        let mut total = 0u64;
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| loop {
            let mut filled = 0;
            while filled < buf.len() {
                match entry.read(&mut buf[filled..]) {
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
        let (tparent, tname) = split_parent(&target);
        let tparent_fd = if tparent.is_empty() {
            None
        } else {
            Some(
                open_in_root(self.root, tparent, OFlags::PATH | OFlags::DIRECTORY)
                    .map_err(self.io_err("resolve hard link target directory"))?,
            )
        };
        let tdir = tparent_fd.as_ref().map_or(self.root, |f| f.as_fd());
        // flags 0: a symlink as the target is linked itself, never followed.
        let mut r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        if r == Err(Errno::EXIST) {
            self.remove_existing(parent, name)?;
            r = rfs::linkat(tdir, tname, parent, name, AtFlags::empty());
        }
        r.map_err(|e| self.io_err("create hard link")(e.into()))
    }

    fn create_special<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        kind: &Kind,
        meta: &Meta,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        let (file_type, dev) = match kind {
            Kind::Fifo => (FileType::Fifo, 0),
            _ => {
                let h = entry.header();
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

    /// Shifts the root id of a version 3 (namespaced) file capability.
    fn shift_capability(&self, value: &[u8]) -> Result<Option<Vec<u8>>, UnpackError> {
        const REVISION_MASK: u32 = 0xff00_0000;
        const REVISION_3: u32 = 0x0300_0000;
        if value.len() != 24 {
            return Ok(None);
        }
        let magic = u32::from_le_bytes([value[0], value[1], value[2], value[3]]);
        if magic & REVISION_MASK != REVISION_3 {
            return Ok(None);
        }
        let rootid = u32::from_le_bytes([value[20], value[21], value[22], value[23]]);
        let host = self.map_id("security.capability root id", u64::from(rootid))?;
        let mut out = value.to_vec();
        out[20..24].copy_from_slice(&host.to_le_bytes());
        Ok(Some(out))
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
            apply_layer(&self.root, &layer[..], Compression::None, &SHIFT)
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
        assert_eq!(
            getxattr(&s.p("bin/ping"), "security.capability").as_deref(),
            Some(&cap[..])
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
        apply_layer(&s.root, &gz[..], Compression::Gzip, &SHIFT).unwrap();
        assert_eq!(fs::read(s.p("d/one")).unwrap(), b"first member");

        let mut l = Layer::new();
        l.file("d/two", b"zstd");
        let zst = zstd::stream::encode_all(&l.finish()[..], 3).unwrap();
        assert_eq!(Compression::sniff(&zst), Compression::Zstd);
        apply_layer(&s.root, &zst[..], Compression::Zstd, &SHIFT).unwrap();
        assert_eq!(fs::read(s.p("d/two")).unwrap(), b"zstd");

        // A corrupt gzip trailer fails even though every entry was read.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 6] ^= 0xff;
        assert!(apply_layer(&s.root, &bad[..], Compression::Gzip, &SHIFT).is_err());
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
        apply_layer_overlay(&s.root, &layer[..], Compression::None, &SHIFT).unwrap();
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

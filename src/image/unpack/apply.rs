//! Entry application: the applier's state and the creation of files, directories, links and nodes.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use crate::image::tarstream::{Entry, Limits, TarError, TarReader};

use super::*;
use super::{meta::*, resolve::*};

/// The parent directory of the entry being applied.
pub(super) enum Parent {
    Root,
    Dir(OwnedFd),
}

impl Parent {
    pub(super) fn fd<'a>(&'a self, root: BorrowedFd<'a>) -> BorrowedFd<'a> {
        match self {
            Parent::Root => root,
            Parent::Dir(fd) => fd.as_fd(),
        }
    }
}

/// A hard link target found through the merged view of the layers.
pub(super) struct Found {
    /// 0: this layer; `i`: the `i`th lower, uppermost first.
    pub(super) layer: usize,
    /// The target's directory in that layer (None: the layer's root).
    pub(super) parent: Option<OwnedFd>,
    pub(super) name: Vec<u8>,
    pub(super) st: rfs::Stat,
    /// Whether a lower layer decided the result (the target, or a symlink on the way).
    pub(super) used_lower: bool,
}

pub(super) enum LookupError {
    Missing,
    Directory,
    Io(io::Error),
}

/// Entry metadata, shifted and ready to apply.
pub(super) struct Meta {
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mode: u32,
    pub(super) times: Timestamps,
}

pub(super) enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

pub(super) struct Applier<'r> {
    pub(super) root: BorrowedFd<'r>,
    /// Extension header size, byte and entry budgets for this layer.
    pub(super) limits: Limits,
    /// Directories of the layers below (overlay format), uppermost first.
    pub(super) lowers: &'r [OwnedFd],
    pub(super) shift: IdShift,
    pub(super) target: Target,
    /// Paths this layer wrote, and all their ancestors: what whiteouts and opaque
    /// markers of this same layer must keep.
    pub(super) written: HashSet<Box<[u8]>>,
    /// Directory mtimes, applied after the last entry.
    pub(super) dir_times: Vec<(Box<[u8]>, Timestamps)>,
    /// The last resolved parent directory, keyed by its normalised path.
    pub(super) cache_key: Vec<u8>,
    pub(super) cache_fd: Option<OwnedFd>,
    /// Set when something was removed: cached resolutions may be stale.
    pub(super) removed: bool,
    pub(super) buf: Vec<u8>,
    raw_name: Vec<u8>,
    pub(super) path: Vec<u8>,
    pub(super) link: Vec<u8>,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub(super) stats: LayerStats,
}

impl<'r> Applier<'r> {
    pub(super) fn new(
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

    pub(super) fn run<R: Read>(&mut self, reader: R) -> Result<LayerStats, UnpackError> {
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

    pub(super) fn position(&self) -> String {
        if self.stats.entries == 0 {
            "first entry".into()
        } else {
            format!("after entry {:?}", lossy(&self.raw_name))
        }
    }

    pub(super) fn entry_name(&self) -> String {
        lossy(&self.raw_name)
    }

    pub(super) fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
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

    pub(super) fn invalid(&self, reason: &'static str) -> UnpackError {
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

    pub(super) fn create<R: Read>(
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

    pub(super) fn create_dir(
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

    pub(super) fn missing_link_target(&self, target: &[u8]) -> UnpackError {
        UnpackError::MissingLinkTarget {
            entry: self.entry_name(),
            target: lossy(target),
        }
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
}

//! Metadata: owners and id shifting, modes, times, extended attributes and capabilities.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use crate::image::tarstream::Entry;

use super::*;
use super::{apply::*, resolve::*};

/// `chmod` of a device node or FIFO without following a symlink and without opening
/// the device: through an `O_PATH` fd of the node itself.
pub(super) fn chmod_special(parent: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
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
    /// Reads owner, mode, times and xattrs of the entry, shifting the ids.
    pub(super) fn read_meta(&mut self, entry: &Entry) -> Result<Meta, UnpackError> {
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

    pub(super) fn map_id(&self, kind: &'static str, id: u64) -> Result<u32, UnpackError> {
        self.shift.map(id).ok_or_else(|| UnpackError::IdOutOfRange {
            entry: self.entry_name(),
            kind,
            id,
            size: self.shift.size,
        })
    }

    pub(super) fn chown_nofollow(
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

    pub(super) fn warn_unsettable_xattrs(&self, what: &str) {
        for (name, _) in &self.xattrs {
            log::warn!(
                "layer entry {:?}: xattr {:?} on a {what} skipped (cannot be set without following a path)",
                self.entry_name(),
                lossy(name)
            );
        }
    }

    /// chown → chmod → xattrs on an fd of the object (times are separate).
    pub(super) fn set_meta_fd(
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
    pub(super) fn shift_capability(&self, value: &[u8]) -> Result<Option<Vec<u8>>, UnpackError> {
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

    /// Directory times, after every entry of the layer is in place.
    pub(super) fn finish_dir_times(&mut self) -> Result<(), UnpackError> {
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

//! Name resolution: normalising entry names and opening parents inside the root.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;

use super::apply::*;
use super::*;

pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(super) enum NameError {
    /// `..` climbs above the root.
    Escape,
    /// A NUL byte (possible in PAX names) cannot be passed to the kernel.
    Nul,
}

/// Normalises an archive name into `out`: no leading `/` or `./`, no `.` or empty
/// components, `..` applied lexically. Fails when `..` climbs above the root or the
/// name holds a NUL byte.
pub(super) fn normalize(raw: &[u8], out: &mut Vec<u8>) -> Result<(), NameError> {
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
pub(super) fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn resolve_how() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// `openat2` inside `root`, retrying the rare `EAGAIN` a concurrent rename causes.
pub(crate) fn open_in_root(
    root: BorrowedFd<'_>,
    path: &[u8],
    flags: OFlags,
) -> io::Result<OwnedFd> {
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
pub(super) fn open_dir_in_root(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    let path: &[u8] = if path.is_empty() { b"." } else { path };
    open_in_root(root, path, OFlags::RDONLY | OFlags::DIRECTORY)
}

pub(super) fn is_dir(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// Removes `name` in `parent`, recursively when it is a directory, never following
/// symlinks. A missing entry is not an error.
pub(super) fn remove_all(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
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
pub(super) fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
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

impl<'r> Applier<'r> {
    /// Resolves (creating missing directories) the parent of `self.path`.
    pub(super) fn parent_for_create(&mut self) -> Result<Parent, UnpackError> {
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
    pub(super) fn release_parent(&mut self, parent: Parent) {
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

    pub(super) fn forget_cache(&mut self) {
        self.cache_fd = None;
        self.removed = false;
    }

    /// Creates the missing directories of `parent` (owned by the container's root,
    /// mode 0755), each resolved inside the root.
    pub(super) fn create_parents(&self, parent: &[u8]) -> Result<OwnedFd, UnpackError> {
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
    pub(super) fn remove_existing(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &[u8],
    ) -> Result<(), UnpackError> {
        self.removed = true;
        remove_all(parent, name).map_err(self.io_err("remove existing entry"))
    }
}

//! Overlay handling: the merged view of lower layers, hard links across layers, copy-up,
//! whiteouts and opaque directories.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use super::*;
use super::{apply::*, meta::*, resolve::*};

impl<'r> Applier<'r> {
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
    pub(super) fn create_overlay_hardlink(
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

    /// Records `self.path` and its ancestors as written by this layer.
    pub(super) fn mark_written(&mut self) {
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

    pub(super) fn apply_whiteout(&mut self) -> Result<(), UnpackError> {
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
}

//! What the shared image cache needs from the file system: private directories, writes that are
//! on disk before anyone can see them, and temporary names no other pod can pick.
//!
//! Every envbox is PID 1 of its own pod, so a pid (or a thread id) names the same temporary file in
//! every pod that shares a node's cache; temporary names here are random instead.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates `dir` (and missing parents) and leaves it with exactly `mode`: a directory that an
/// older envbox created world-readable is closed as well.
pub fn private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} exists and is not a directory",
            dir.display()
        )));
    }
    // The umask may have narrowed the mode at creation; an old directory may be wider.
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// 128 random bits in hex, for temporary names.
pub fn random_hex() -> String {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail on Linux ≥ 3.17 with a valid buffer; a clock-and-counter
            // name is still unique enough to avoid an EEXIST loop in that impossible case.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            b.copy_from_slice(&t.to_le_bytes());
            break;
        }
    }
    hex::encode(b)
}

/// fsync of a directory: makes the names created or renamed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    record("fsync_dir", dir);
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to` (a publication), recorded for tests so they can check what was synced
/// before it.
pub fn publish_rename(from: &Path, to: &Path) -> io::Result<()> {
    record("rename", to);
    fs::rename(from, to)
}

#[cfg(test)]
thread_local! {
    static EVENTS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tests read back, in order, the syncs and publications this thread made.
#[cfg(test)]
pub fn take_events() -> Vec<String> {
    EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()))
}

#[cfg_attr(not(test), allow(unused_variables))]
fn record(what: &str, path: &Path) {
    #[cfg(test)]
    EVENTS.with(|e| e.borrow_mut().push(format!("{what} {}", path.display())));
}

/// syncfs(2) of the file system holding `path`: every file written under a freshly unpacked
/// tree reaches the disk with one call instead of one fsync per file.
pub fn syncfs(path: &Path) -> io::Result<()> {
    record("syncfs", path);
    let f = File::open(path)?;
    rustix::fs::syncfs(f.as_fd()).map_err(io::Error::from)
}

/// Writes `bytes` to `dest` so that readers see either the old file or the whole new one, and so
/// that the new one is on disk before its name is: a randomly named temporary file in `tmp_dir`
/// (same file system as `dest`) is written, fsynced and renamed over `dest`, then `dest`'s
/// directory is fsynced.
pub fn atomic_write(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let stem = dest
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(64).collect::<String>())
        .unwrap_or_default();
    let tmp = tmp_dir.join(format!("{stem}.{}.tmp", random_hex()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        record("fsync", &tmp);
        f.sync_all()?;
        publish_rename(&tmp, dest)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// `tmp_dir`'s temporary files are named `<dest name>.<32 hex>.tmp`.
pub fn is_atomic_tmp(name: &str) -> bool {
    name.strip_suffix(".tmp")
        .and_then(|s| s.rsplit_once('.'))
        .is_some_and(|(_, r)| r.len() == 32 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The parent of `p`, for fsyncing after a rename into it.
pub fn parent_of(p: &Path) -> PathBuf {
    p.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Whether `file` (locked by the caller) is still the file at `path`: a lock file may be removed
/// (and re-created) by its holder between someone's open and their lock, and a lock on the removed
/// file protects nothing. A missing path is "not current".
pub fn is_current(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let ours = file.metadata()?;
    match fs::metadata(path) {
        Ok(m) => Ok(m.ino() == ours.ino() && m.dev() == ours.dev()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The lock-then-verify loop: `open` the lock file at `path`, `lock` it (`Ok(false)`: give up,
/// giving `None`), and start over while the locked file is no longer the one at `path`.
/// `stat_err` maps a failure of that check.
pub fn lock_current<E>(
    path: &Path,
    mut open: impl FnMut() -> Result<File, E>,
    mut lock: impl FnMut(&File) -> Result<bool, E>,
    stat_err: impl Fn(io::Error) -> E,
) -> Result<Option<File>, E> {
    loop {
        let file = open()?;
        if !lock(&file)? {
            return Ok(None);
        }
        if is_current(&file, path).map_err(&stat_err)? {
            return Ok(Some(file));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names_differ_and_tmp_names_are_recognised() {
        let a = random_hex();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex());
        assert!(is_atomic_tmp(&format!("x.{a}.tmp")));
        assert!(!is_atomic_tmp("abc.partial"));
    }

    #[test]
    fn private_dir_sets_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        private_dir(&p, 0o711).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o711
        );
        fs::write(d.path().join("f"), b"").unwrap();
        assert!(private_dir(&d.path().join("f"), 0o700).is_err());
    }
}

//! Facts about an unpacked image, read from its files without running anything:
//! the workspace user (`/etc/passwd`, `/etc/group`), whether `/sbin/init` exists, and
//! the distribution (`os-release`).
//!
//! The image is untrusted. Every file is opened with
//! `openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so symlinks inside
//! the image (`/etc/passwd -> /etc/shadow`, `/sbin -> usr/sbin`) resolve as they would
//! inside the container and never reach the host's files. Only regular files are
//! read (a FIFO or device named `/etc/passwd` is refused, never opened for reading),
//! and at most [`MAX_FILE_SIZE`] bytes of each.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, FileType, Mode, OFlags};

/// Larger account or os-release files are refused.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// An account from the image's `/etc/passwd` (ids as seen inside the container).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    /// Primary group, from `/etc/passwd` (authoritative even when `/etc/group` lacks it).
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Name of the primary group in `/etc/group`, when it has one.
    pub group: Option<String>,
    /// Other groups listing the user as a member in `/etc/group`, sorted.
    pub additional_gids: Vec<u32>,
}

impl UserInfo {
    /// Root as used when the image has no account database.
    pub fn default_root() -> Self {
        UserInfo {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
            shell: "/bin/sh".into(),
            group: None,
            additional_gids: Vec::new(),
        }
    }
}

/// `ID` and `ID_LIKE` from os-release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OsRelease {
    pub id: String,
    pub id_like: Vec<String>,
}

impl Default for OsRelease {
    /// os-release(5): a missing `ID` means `linux`.
    fn default() -> Self {
        OsRelease {
            id: "linux".into(),
            id_like: Vec::new(),
        }
    }
}

/// What `/sbin/init` is in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SbinInit {
    Missing,
    /// Resolves (inside the image) to a file named `systemd`.
    Systemd,
    /// Another init (busybox, sysvinit, openrc...), by the path it resolves to inside the image.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFacts {
    pub user: UserInfo,
    pub has_init: bool,
    pub init: SbinInit,
    pub os: OsRelease,
}

#[derive(thiserror::Error, Debug)]
pub enum FactsError {
    #[error("opening the image root {root}: {source}")]
    OpenRoot { root: PathBuf, source: io::Error },

    #[error("reading the image's {file}{}: {source}", for_user(.user))]
    Read {
        file: &'static str,
        user: Option<String>,
        source: io::Error,
    },

    #[error("user {user:?} not found in the image's {file}")]
    UnknownUser { user: String, file: &'static str },

    #[error("checking the image's {file}: {source}")]
    Probe {
        file: &'static str,
        source: io::Error,
    },
}

fn for_user(user: &Option<String>) -> String {
    match user {
        Some(u) => format!(" (looking up user {u:?})"),
        None => String::new(),
    }
}

/// Everything envbox needs to know about the image before creating the container.
pub fn read_facts(root: &Path, username: &str) -> Result<ImageFacts, FactsError> {
    let image = ImageRoot::open(root)?;
    let init = image.sbin_init()?;
    Ok(ImageFacts {
        user: image.lookup_user(username)?,
        has_init: init != SbinInit::Missing,
        init,
        os: image.os_release()?,
    })
}

/// Looks `username` up in the image's `/etc/passwd` (by name, then, when the name is
/// numeric, by uid) and its groups in `/etc/group`.
///
/// An empty `username` means root (uid 0); an image without `/etc/passwd` or without a
/// uid 0 entry then gets [`UserInfo::default_root`]. Any other user that is not in
/// `/etc/passwd` is an error, numeric ones included: the workspace needs a home
/// directory and shell that only the account database can give.
pub fn lookup_user(root: &Path, username: &str) -> Result<UserInfo, FactsError> {
    ImageRoot::open(root)?.lookup_user(username)
}

/// Whether `/sbin/init` exists as a regular file, following symlinks inside the
/// image (`/sbin -> usr/sbin`, `/sbin/init -> /lib/systemd/systemd`). A dangling or
/// looping link is `false`.
pub fn has_sbin_init(root: &Path) -> Result<bool, FactsError> {
    ImageRoot::open(root)?.has_sbin_init()
}

/// `ID` and `ID_LIKE` from `/etc/os-release`, falling back to
/// `/usr/lib/os-release`; `ID` is `linux` when neither file (or key) exists.
pub fn os_release(root: &Path) -> Result<OsRelease, FactsError> {
    ImageRoot::open(root)?.os_release()
}

/// The content of a regular file of the image (`None` when it does not exist), read inside the root.
pub fn read_image_file(root: &Path, path: &'static str) -> Result<Option<String>, FactsError> {
    ImageRoot::open(root)?
        .read_file(path)
        .map_err(|source| FactsError::Read {
            file: path,
            user: None,
            source,
        })
}

/// Whether `path` exists in the image (symlinks followed inside the root).
pub fn image_has(root: &Path, path: &str) -> bool {
    ImageRoot::open(root)
        .ok()
        .is_some_and(|r| open_in_root(r.fd.as_fd(), path, OFlags::PATH).is_ok())
}

struct ImageRoot {
    fd: OwnedFd,
}

/// `openat2` of `path` (leading `/` stripped) inside `root`: the unpacker's one helper.
fn open_in_root(root: BorrowedFd<'_>, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    crate::image::unpack::open_in_root(root, path.trim_start_matches('/').as_bytes(), flags)
}

fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

impl ImageRoot {
    fn open(root: &Path) -> Result<Self, FactsError> {
        let fd = rfs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FactsError::OpenRoot {
            root: root.to_path_buf(),
            source: e.into(),
        })?;
        Ok(ImageRoot { fd })
    }

    /// Reads a regular file of the image; `Ok(None)` when it does not exist (or is a
    /// dangling link).
    fn read_file(&self, path: &str) -> io::Result<Option<String>> {
        // Look first without opening for reading: a FIFO would block and a device
        // node could do anything on open.
        let probe = match open_in_root(self.fd.as_fd(), path, OFlags::PATH) {
            Ok(fd) => fd,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let st = rfs::fstat(&probe)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let fd = open_in_root(
            self.fd.as_fd(),
            path,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        )?;
        let st2 = rfs::fstat(&fd)?;
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file changed while being opened",
            ));
        }
        let mut data = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut data)?;
        if data.len() as u64 > MAX_FILE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_FILE_SIZE} bytes"),
            ));
        }
        Ok(Some(String::from_utf8_lossy(&data).into_owned()))
    }

    fn lookup_user(&self, username: &str) -> Result<UserInfo, FactsError> {
        let read_err = |file, source| FactsError::Read {
            file,
            user: Some(username.to_string()),
            source,
        };
        let passwd = self.read_file(PASSWD).map_err(|e| read_err(PASSWD, e))?;
        let found = passwd.as_deref().and_then(|p| find_passwd(p, username));
        let mut user = match found {
            Some(u) => u,
            None if username.is_empty() => UserInfo::default_root(),
            None => {
                return Err(FactsError::UnknownUser {
                    user: username.to_string(),
                    file: PASSWD,
                })
            }
        };
        if let Some(group) = self.read_file(GROUP).map_err(|e| read_err(GROUP, e))? {
            apply_groups(&group, &mut user);
        }
        Ok(user)
    }

    fn has_sbin_init(&self) -> Result<bool, FactsError> {
        Ok(self.sbin_init()? != SbinInit::Missing)
    }

    /// Follows `/sbin/init` inside the image and names what it resolves to: the kernel reports the
    /// resolved path of an O_PATH descriptor, which is relative to the image root after stripping it.
    fn sbin_init(&self) -> Result<SbinInit, FactsError> {
        const INIT: &str = "/sbin/init";
        let fd = match open_in_root(self.fd.as_fd(), INIT, OFlags::PATH) {
            Ok(fd) => fd,
            Err(e) if is_missing(&e) => return Ok(SbinInit::Missing),
            Err(source) => return Err(FactsError::Probe { file: INIT, source }),
        };
        let st = rfs::fstat(&fd).map_err(|e| FactsError::Probe {
            file: INIT,
            source: e.into(),
        })?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Ok(SbinInit::Missing);
        }
        let link =
            |fd: BorrowedFd<'_>| std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let (target, root) = match (link(fd.as_fd()), link(self.fd.as_fd())) {
            (Ok(t), Ok(r)) => (t, r),
            // Without /proc the name cannot be told; treat it as an unknown init.
            _ => return Ok(SbinInit::Other(INIT.into())),
        };
        let inside = target
            .strip_prefix(&root)
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|_| INIT.into());
        if target.file_name().is_some_and(|n| n == "systemd") {
            Ok(SbinInit::Systemd)
        } else {
            Ok(SbinInit::Other(inside))
        }
    }

    fn os_release(&self) -> Result<OsRelease, FactsError> {
        for file in ["/etc/os-release", "/usr/lib/os-release"] {
            let content = self.read_file(file).map_err(|source| FactsError::Read {
                file,
                user: None,
                source,
            })?;
            if let Some(content) = content {
                return Ok(parse_os_release(&content));
            }
        }
        Ok(OsRelease::default())
    }
}

/// One `/etc/passwd` line split into its seven fields; `None` for comments, NIS
/// entries and malformed lines.
fn passwd_fields(line: &str) -> Option<[&str; 7]> {
    let line = line.trim_end_matches('\r');
    if line.is_empty() || line.starts_with('#') || line.starts_with('+') || line.starts_with('-') {
        return None;
    }
    let mut fields = line.split(':');
    let mut out = [""; 7];
    for slot in out.iter_mut() {
        *slot = fields.next()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(out)
}

fn user_from_fields(f: [&str; 7]) -> Option<UserInfo> {
    let uid = f[2].parse().ok()?;
    let gid = f[3].parse().ok()?;
    Some(UserInfo {
        name: f[0].to_string(),
        uid,
        gid,
        home: if f[5].is_empty() { "/" } else { f[5] }.to_string(),
        shell: if f[6].is_empty() { "/bin/sh" } else { f[6] }.to_string(),
        group: None,
        additional_gids: Vec::new(),
    })
}

/// Finds `username` by name, or by uid when it is numeric (or empty: uid 0).
fn find_passwd(passwd: &str, username: &str) -> Option<UserInfo> {
    let wanted_uid: Option<u32> = if username.is_empty() {
        Some(0)
    } else if username.bytes().all(|b| b.is_ascii_digit()) {
        username.parse().ok()
    } else {
        None
    };
    let mut by_uid = None;
    for line in passwd.lines() {
        let Some(f) = passwd_fields(line) else {
            continue;
        };
        if !username.is_empty() && f[0] == username {
            if let Some(u) = user_from_fields(f) {
                return Some(u);
            }
            log::warn!("malformed /etc/passwd entry for {username:?} in the image");
        }
        if by_uid.is_none() && wanted_uid.is_some() && f[2].parse::<u32>().ok() == wanted_uid {
            by_uid = user_from_fields(f);
        }
    }
    by_uid
}

/// Primary group name and supplementary groups from `/etc/group`.
fn apply_groups(group: &str, user: &mut UserInfo) {
    let mut extra = Vec::new();
    for line in group.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with('+')
            || line.starts_with('-')
        {
            continue;
        }
        let f: Vec<&str> = line.split(':').collect();
        if f.len() != 4 {
            continue;
        }
        let Ok(gid) = f[2].parse::<u32>() else {
            continue;
        };
        if gid == user.gid {
            if user.group.is_none() {
                user.group = Some(f[0].to_string());
            }
        } else if f[3].split(',').any(|m| m.trim() == user.name) {
            extra.push(gid);
        }
    }
    extra.sort_unstable();
    extra.dedup();
    user.additional_gids = extra;
}

/// Parses os-release(5) assignments, unquoting shell-style values.
fn parse_os_release(content: &str) -> OsRelease {
    let mut os = OsRelease::default();
    for line in content.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key.trim() {
            "ID" if !value.is_empty() => os.id = value,
            "ID_LIKE" => os.id_like = value.split_whitespace().map(str::to_string).collect(),
            _ => {}
        }
    }
    os
}

fn unquote(v: &str) -> String {
    let b = v.as_bytes();
    if b.len() >= 2 && b[0] == b'\'' && b[b.len() - 1] == b'\'' {
        return v[1..v.len() - 1].to_string();
    }
    if b.len() >= 2 && b[0] == b'"' && b[b.len() - 1] == b'"' {
        let mut out = String::with_capacity(v.len());
        let mut chars = v[1..v.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n @ ('"' | '\\' | '$' | '`')) => out.push(n),
                    Some(n) => {
                        out.push('\\');
                        out.push(n);
                    }
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        (tmp, root)
    }

    const PASSWD_TEXT: &str = "\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken:x:notanumber:0::/:/bin/sh
coder:x:1000:1000:Coder,,,:/home/coder:/bin/zsh
nohome:x:1001:1001:::
+nisuser::::::
";
    const GROUP_TEXT: &str = "\
root:x:0:
sudo:x:27:coder
docker:x:998:other,coder
coder:x:1000:
";

    fn write_accounts(root: &Path) {
        fs::write(root.join("etc/passwd"), PASSWD_TEXT).unwrap();
        fs::write(root.join("etc/group"), GROUP_TEXT).unwrap();
    }

    #[test]
    fn passwd_and_group() {
        let (_t, root) = image();
        write_accounts(&root);
        let u = lookup_user(&root, "coder").unwrap();
        assert_eq!(
            u,
            UserInfo {
                name: "coder".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/coder".into(),
                shell: "/bin/zsh".into(),
                group: Some("coder".into()),
                additional_gids: vec![27, 998],
            }
        );
        let by_uid = lookup_user(&root, "1000").unwrap();
        assert_eq!(by_uid.name, "coder");
        let r = lookup_user(&root, "").unwrap();
        assert_eq!(
            (r.name.as_str(), r.uid, r.home.as_str()),
            ("root", 0, "/root")
        );
        assert_eq!(r.shell, "/bin/bash");
        let n = lookup_user(&root, "nohome").unwrap();
        assert_eq!((n.home.as_str(), n.shell.as_str()), ("/", "/bin/sh"));
        assert_eq!(n.group, None);
    }

    #[test]
    fn gid_from_passwd_is_authoritative() {
        let (_t, root) = image();
        fs::write(
            root.join("etc/passwd"),
            "dev:x:1500:4242::/home/dev:/bin/sh\n",
        )
        .unwrap();
        fs::write(root.join("etc/group"), "dev:x:1500:\nteam:x:4242:\n").unwrap();
        let u = lookup_user(&root, "dev").unwrap();
        assert_eq!(u.gid, 4242);
        assert_eq!(u.group.as_deref(), Some("team"));
    }

    #[test]
    fn unknown_user() {
        let (_t, root) = image();
        write_accounts(&root);
        for name in ["ghost", "4242", "nisuser", "broken"] {
            let err = lookup_user(&root, name).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("user \"{name}\" not found in the image's /etc/passwd")
            );
        }
        // No account database at all: only root works.
        let (_t2, bare) = image();
        assert_eq!(lookup_user(&bare, "").unwrap(), UserInfo::default_root());
        assert!(matches!(
            lookup_user(&bare, "coder"),
            Err(FactsError::UnknownUser { .. })
        ));
    }

    #[test]
    fn hostile_passwd_symlink_stays_in_image() {
        let (tmp, root) = image();
        // A "host" file outside the image that must never be read.
        let host = tmp.path().join("host-passwd");
        fs::write(&host, "coder:x:0:0:host:/:/bin/sh\n").unwrap();
        symlink(&host, root.join("etc/passwd")).unwrap();
        symlink("/etc/shadow", root.join("etc/group")).unwrap();
        // The absolute link resolves inside the image, where it does not exist.
        assert!(matches!(
            lookup_user(&root, "coder"),
            Err(FactsError::UnknownUser { .. })
        ));
        // Relative escapes are clamped at the image root too.
        fs::remove_file(root.join("etc/passwd")).unwrap();
        symlink(
            "../../../../../../../../etc/passwd",
            root.join("etc/passwd"),
        )
        .unwrap();
        assert!(matches!(
            lookup_user(&root, "coder"),
            Err(FactsError::UnknownUser { .. })
        ));
        // When the target exists inside the image, that file is used.
        let inner = root.join(host.strip_prefix("/").unwrap());
        fs::create_dir_all(inner.parent().unwrap()).unwrap();
        fs::write(&inner, "coder:x:1000:1000::/home/coder:/bin/sh\n").unwrap();
        fs::remove_file(root.join("etc/passwd")).unwrap();
        symlink(&host, root.join("etc/passwd")).unwrap();
        assert_eq!(lookup_user(&root, "coder").unwrap().uid, 1000);
    }

    #[test]
    fn special_files_are_not_opened() {
        let (_t, root) = image();
        rfs::mknodat(
            rfs::CWD,
            root.join("etc/passwd"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let err = lookup_user(&root, "coder").unwrap_err();
        assert!(err.to_string().contains("/etc/passwd"), "{err}");
        assert!(err.to_string().contains("coder"), "{err}");
    }

    #[test]
    fn sbin_init_through_symlinks() {
        let (_t, root) = image();
        assert!(!has_sbin_init(&root).unwrap());
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::create_dir_all(root.join("lib/systemd")).unwrap();
        symlink("usr/sbin", root.join("sbin")).unwrap();
        // Absolute link: must resolve inside the image, not on the host.
        symlink("/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
        assert!(!has_sbin_init(&root).unwrap(), "dangling link");
        fs::write(root.join("lib/systemd/systemd"), b"\x7fELF").unwrap();
        assert!(has_sbin_init(&root).unwrap());
        assert_eq!(
            ImageRoot::open(&root).unwrap().sbin_init().unwrap(),
            SbinInit::Systemd
        );
        // A link escaping with .. is clamped at the root.
        fs::remove_file(root.join("usr/sbin/init")).unwrap();
        symlink(
            "../../../../../../lib/systemd/systemd",
            root.join("usr/sbin/init"),
        )
        .unwrap();
        assert!(has_sbin_init(&root).unwrap());
        // A loop is "no init".
        fs::remove_file(root.join("usr/sbin/init")).unwrap();
        symlink("init", root.join("usr/sbin/init")).unwrap();
        assert!(!has_sbin_init(&root).unwrap());
        // busybox's init is an init, but not systemd.
        fs::remove_file(root.join("usr/sbin/init")).unwrap();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/busybox"), b"\x7fELF").unwrap();
        symlink("../../bin/busybox", root.join("usr/sbin/init")).unwrap();
        assert_eq!(
            ImageRoot::open(&root).unwrap().sbin_init().unwrap(),
            SbinInit::Other("/bin/busybox".into())
        );
    }

    #[test]
    fn os_release_parsing() {
        let (_t, root) = image();
        assert_eq!(os_release(&root).unwrap(), OsRelease::default());
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::write(
            root.join("usr/lib/os-release"),
            "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n",
        )
        .unwrap();
        symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
        let os = os_release(&root).unwrap();
        assert_eq!(os.id, "ubuntu");
        assert_eq!(os.id_like, ["debian"]);

        fs::remove_file(root.join("etc/os-release")).unwrap();
        fs::write(
            root.join("etc/os-release"),
            "# comment\nNAME='Rocky Linux'\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n\
             VERSION=\"9.3 (Blue \\\"Onyx\\\")\"\n",
        )
        .unwrap();
        let os = os_release(&root).unwrap();
        assert_eq!(os.id, "rocky");
        assert_eq!(os.id_like, ["rhel", "centos", "fedora"]);
        assert_eq!(
            unquote("\"9.3 (Blue \\\"Onyx\\\")\""),
            "9.3 (Blue \"Onyx\")"
        );
        assert_eq!(unquote("'single'"), "single");

        // Missing /etc/os-release falls back to /usr/lib/os-release.
        fs::remove_file(root.join("etc/os-release")).unwrap();
        assert_eq!(os_release(&root).unwrap().id, "ubuntu");
    }

    #[test]
    fn all_facts_together() {
        let (_t, root) = image();
        write_accounts(&root);
        fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
        let facts = read_facts(&root, "coder").unwrap();
        assert_eq!(facts.user.uid, 1000);
        assert!(!facts.has_init);
        assert_eq!(facts.os.id, "debian");
        assert!(facts.os.id_like.is_empty());
        let err = read_facts(&root.join("missing"), "coder").unwrap_err();
        assert!(matches!(err, FactsError::OpenRoot { .. }));
    }
}

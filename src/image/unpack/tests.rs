use super::*;
use super::{pipeline::*, resolve::*};
use rustix::fs as rfs;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
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

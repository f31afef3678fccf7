//! The layer cache end to end, as root: layers unpacked once into overlay lower directories
//! (hard links across layers included), mounted with overlayfs, and the fall back to
//! ephemeral storage when the cache's file system is full.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use envbox::image::rootfs::{self, LayerBlob, LayerCache, RootfsKind};
use envbox::sys::real::RealKernel;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A layer under construction.
struct L(tar::Builder<Vec<u8>>);

impl L {
    fn new() -> Self {
        L(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h
    }

    fn file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, 0o755, data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    fn dir(mut self, name: &str) -> Self {
        let mut h = Self::header(EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }

    fn hardlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    /// Writes the layer as a gzip blob named by its digest under `dir`.
    fn blob(self, dir: &Path) -> LayerBlob {
        let tar = self.0.into_inner().unwrap();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &tar).unwrap();
        let gz = e.finish().unwrap();
        let digest = sha(&gz);
        let path = dir.join(digest.replace(':', "-"));
        fs::write(&path, &gz).unwrap();
        LayerBlob {
            digest,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            path,
            diff_id: Some(sha(&tar)),
        }
    }
}

fn overlay_mount(lowers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> bool {
    let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            upper.display(),
            work.display()
        ))
        .arg(target)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn umount(target: &Path) {
    let _ = Command::new("umount").arg(target).status();
}

#[test]
fn hardlink_to_lower_layer_through_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    fs::create_dir(&blobs).unwrap();
    let base = L::new()
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/busybox", b"#!busybox\n")
        .file("usr/bin/gone", b"old")
        .blob(&blobs);
    let middle = L::new().file("usr/bin/.wh.gone", b"").blob(&blobs);
    let top = L::new()
        .hardlink("usr/bin/sh", "usr/bin/busybox")
        .file("etc/top", b"t")
        .blob(&blobs);
    let layers = vec![base.clone(), middle.clone(), top.clone()];

    let cache = LayerCache::open(&tmp.path().join("cache")).unwrap();
    let cached = cache.ensure_all(&layers).unwrap();
    assert!(cached.iter().all(|c| c.unpacked));
    // Base and middle are keyed by their digest; the top depends on its lowers.
    assert_eq!(cached[0].name, base.digest[7..27]);
    assert_eq!(cached[1].name, middle.digest[7..27]);
    assert_ne!(cached[2].name, top.digest[7..27]);
    let again = cache.ensure_all(&layers).unwrap();
    assert!(again.iter().all(|c| !c.unpacked));
    assert_eq!(
        again.iter().map(|c| &c.name).collect::<Vec<_>>(),
        cached.iter().map(|c| &c.name).collect::<Vec<_>>()
    );

    // The lower tree: the link shares the base's inode.
    let base_bb =
        fs::symlink_metadata(cache.lower_dir(&cached[0]).join("usr/bin/busybox")).unwrap();
    let sh = fs::symlink_metadata(cache.lower_dir(&cached[2]).join("usr/bin/sh")).unwrap();
    assert_eq!(sh.ino(), base_bb.ino());

    // Mounted: the link shows the base's content; the whited-out file is gone.
    let (upper, work, merged) = (
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    let lowers: Vec<PathBuf> = cached.iter().rev().map(|c| cache.lower_dir(c)).collect();
    assert!(
        overlay_mount(&lowers, &upper, &work, &merged),
        "mount overlay"
    );
    let seen = (
        fs::read(merged.join("usr/bin/sh")),
        fs::read(merged.join("usr/bin/busybox")),
        merged.join("usr/bin/gone").exists(),
        fs::read(merged.join("etc/top")),
    );
    // Writing through the link copies it up; the cache is untouched.
    fs::write(merged.join("usr/bin/sh"), b"changed").unwrap();
    umount(&merged);
    assert_eq!(seen.0.unwrap(), b"#!busybox\n");
    assert_eq!(seen.1.unwrap(), b"#!busybox\n");
    assert!(!seen.2);
    assert_eq!(seen.3.unwrap(), b"t");
    assert_eq!(
        fs::read(cache.lower_dir(&cached[0]).join("usr/bin/busybox")).unwrap(),
        b"#!busybox\n"
    );

    // The same top layer on another base is unpacked again, under another name.
    let other_base = L::new()
        .dir("usr")
        .dir("usr/bin")
        .file("usr/bin/busybox", b"#!other\n")
        .blob(&blobs);
    let other = cache.ensure_all(&[other_base, top.clone()]).unwrap();
    assert!(other[1].unpacked);
    assert_ne!(other[1].name, cached[2].name);
    assert_eq!(
        fs::read(cache.lower_dir(&other[1]).join("usr/bin/sh")).unwrap(),
        b"#!other\n"
    );

    // A link to the file the middle layer whited out fails, naming the entry.
    let bad = L::new()
        .hardlink("usr/bin/ghost", "usr/bin/gone")
        .blob(&blobs);
    let err = cache
        .ensure_all(&[base, middle, bad])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("usr/bin/ghost") && err.contains("usr/bin/gone"),
        "{err}"
    );
    assert_no_tmp(&cache);
}

#[test]
fn wrong_diff_id_is_not_published() {
    let tmp = tempfile::tempdir().unwrap();
    let mut blob = L::new().file("a", b"content").blob(tmp.path());
    let right = blob.diff_id.replace(sha(b"not the layer"));
    let cache = LayerCache::open(&tmp.path().join("cache")).unwrap();
    let err = cache.ensure(&blob, &[]).unwrap_err().to_string();
    assert!(
        err.contains(right.as_deref().unwrap()) && err.contains(&sha(b"not the layer")),
        "{err}"
    );
    assert_no_tmp(&cache);
    assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), 0);
    blob.diff_id = right;
    assert!(cache.ensure(&blob, &[]).unwrap().unpacked);
}

fn assert_no_tmp(cache: &LayerCache) {
    let left: Vec<_> = fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Mounts a size-limited tmpfs for the test's duration.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount(&self.0);
    }
}

/// A layer of `n` MiB of incompressible-ish content.
fn big_layer(dir: &Path, n: usize) -> LayerBlob {
    let mut l = L::new().dir("data");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..n {
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        l = l.file(&format!("data/f{i}"), &chunk);
    }
    l.blob(dir)
}

#[test]
fn full_cache_falls_back_to_ephemeral_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let _cache_fs = Tmpfs::mount(&cache_dir, "2m");
    let state = tmp.path().join("state");
    let eph = tmp.path().join("ephemeral");
    fs::create_dir_all(&state).unwrap();
    let small = L::new().file("etc/hostname", b"box").blob(tmp.path());
    let big = big_layer(tmp.path(), 4);
    let layers = vec![small.clone(), big.clone()];

    // Without a fall back: a clear error, nothing corrupt left in the cache.
    let err = rootfs::prepare(
        &RealKernel,
        &cache_dir,
        &state,
        &layers,
        None,
        rootfs::UpperMode::Fresh,
        &|_| {},
    )
    .unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    let cache = LayerCache::open(&cache_dir).unwrap();
    assert_no_tmp(&cache);

    // With one: one notice line, a flattened copy under the ephemeral directory.
    let notices = std::cell::RefCell::new(Vec::new());
    let r = rootfs::prepare(
        &RealKernel,
        &cache_dir,
        &state,
        &layers,
        Some(&eph),
        rootfs::UpperMode::Fresh,
        &|m| notices.borrow_mut().push(m.to_string()),
    )
    .unwrap();
    let notices = notices.into_inner();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("no space left") && notices[0].contains(&eph.display().to_string()),
        "{notices:?}"
    );
    assert_eq!(r.kind, RootfsKind::Flattened);
    assert_eq!(r.path, eph.join("rootfs"));
    assert_eq!(fs::read(r.path.join("etc/hostname")).unwrap(), b"box");
    assert_eq!(fs::metadata(r.path.join("data/f3")).unwrap().len(), 1 << 20);
    assert_eq!(fs::metadata(&r.path).unwrap().uid(), 100_000);
    assert_no_tmp(&cache);
    // The layer that fitted is cached and complete; the big one is absent, not partial.
    let names: Vec<String> = fs::read_dir(cache.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [small.digest[7..27].to_string()]);

    // An ephemeral directory too small, known before unpacking (8 MiB compressed) or found
    // while unpacking (8 MiB of zeros): a clear error, and no partial copy left behind.
    let eph_small = tmp.path().join("eph-small");
    let _eph_fs = Tmpfs::mount(&eph_small, "6m");
    let zeros = L::new().file("zeros", &vec![0u8; 8 << 20]).blob(tmp.path());
    for (layer, when) in [(big_layer(tmp.path(), 8), "before"), (zeros, "while")] {
        let err = rootfs::prepare(
            &RealKernel,
            &cache_dir,
            &state,
            &[small.clone(), layer],
            Some(&eph_small),
            rootfs::UpperMode::Fresh,
            &|_| {},
        )
        .unwrap_err();
        assert!(err.is_no_space(), "{when}: {err}");
        assert!(
            err.to_string().contains(&eph_small.display().to_string()),
            "{err}"
        );
        assert!(!eph_small.join("rootfs").exists(), "{when}");
        assert_no_tmp(&cache);
    }
}

/// Not a test: times a cold unpack of a real tree into the layer cache (issue 16 asks what the
/// sync before publishing costs). `ENVBOX_BENCH_TREE=/usr/lib/python3.11 cargo test --release
/// --test unpack_cache -- --ignored --nocapture cold_unpack_cost`; the cache goes under
/// `ENVBOX_BENCH_DIR` (default /var/tmp) so it is on a disk, not tmpfs.
#[test]
#[ignore]
fn cold_unpack_cost() {
    let tree = std::env::var("ENVBOX_BENCH_TREE").unwrap_or_else(|_| "/usr/lib/python3".into());
    let base = std::env::var("ENVBOX_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let work = tempfile::tempdir_in(&base).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all("t", &tree).unwrap();
    let tar = b.into_inner().unwrap();
    let path = work.path().join("layer.tar");
    fs::write(&path, &tar).unwrap();
    let files = walk_count(Path::new(&tree));
    let layer = LayerBlob {
        digest: sha(&tar),
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        path,
        diff_id: Some(sha(&tar)),
    };
    for run in 0..3 {
        // Start with no dirty data, so each measurement pays only for its own.
        Command::new("sync").status().unwrap();
        // Without the sync: the bare unpack into a directory on the same file system.
        let bare = work.path().join(format!("bare{run}"));
        fs::create_dir(&bare).unwrap();
        let t = std::time::Instant::now();
        let f = std::io::BufReader::new(fs::File::open(&layer.path).unwrap());
        envbox::image::unpack::apply_layer_overlay(
            &bare,
            &[],
            f,
            envbox::image::unpack::Compression::None,
            &envbox::image::unpack::IdShift::ENVBOX,
            layer.diff_id.as_deref(),
        )
        .unwrap();
        let unpack = t.elapsed();
        let t = std::time::Instant::now();
        envbox::image::durable::syncfs(&bare).unwrap();
        let sync = t.elapsed();
        Command::new("sync").status().unwrap();
        // What a cold start does: unpack, sync, publish.
        let cache = LayerCache::open(&work.path().join(format!("cache{run}"))).unwrap();
        let t = std::time::Instant::now();
        cache.ensure(&layer, &[]).unwrap();
        println!(
            "run {run}: {files} entries, {} MiB: unpack alone {unpack:?} + its syncfs {sync:?}; \
             LayerCache::ensure (unpack + syncfs + publish) {:?}",
            tar.len() >> 20,
            t.elapsed()
        );
    }
}

fn walk_count(p: &Path) -> usize {
    let mut n = 1;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += walk_count(&e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

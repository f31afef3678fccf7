//! An unpack killed half-way (SIGKILL: no destructor runs) is never used: the next
//! `LayerCache::ensure` removes what it left, unpacks the layer again and publishes it complete.
//!
//! The child is this test binary run again with `CHILD_ENV` set, so it unpacks with the library
//! API. Its layer is read from a FIFO that the parent stops feeding half-way, so the kill lands
//! mid-unpack every time, however fast the machine.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envbox::image::rootfs::{LayerBlob, LayerCache};
use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};
use sha2::{Digest, Sha256};

const CHILD_ENV: &str = "ENVBOX_TEST_UNPACK_CHILD";
const FILES: usize = 1200;
const FILE_SIZE: usize = 16 * 1024;
const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Distinct per file (its index at both ends), cheap to build in a debug build.
fn content(i: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; FILE_SIZE];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v[FILE_SIZE - 8..].copy_from_slice(&(i as u64).to_be_bytes());
    v
}

fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(FILES * (FILE_SIZE + 512) + 4096));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(0);
    b.append_data(&mut h, "data", &[][..]).unwrap();
    for i in 0..FILES {
        let data = content(i);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("data/f{i:05}"), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Runs only in the child: unpacks the layer described by `CHILD_ENV` (`cache\nblob\ndigest\ndiff_id`).
#[test]
fn child_unpack() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.lines().collect();
    let cache = LayerCache::open(Path::new(parts[0])).unwrap();
    let blob = LayerBlob {
        path: PathBuf::from(parts[1]),
        digest: parts[2].into(),
        media_type: MEDIA_TYPE.into(),
        diff_id: Some(parts[3].into()),
    };
    cache.ensure(&blob, &[]).unwrap();
    // Never reached: the parent kills this process while it waits for the rest of the layer.
    std::process::exit(3);
}

fn tmp_dirs(layers: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(layers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".tmp-")
        })
        .collect();
    v.sort();
    v
}

fn count(dir: &Path) -> usize {
    fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn killed_unpack_is_never_used() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache_dir = tmp.path().join("cache");
    let tar = layer_tar();
    let digest = sha(&tar);
    let diff_id = digest.clone();
    let blob_path = tmp.path().join("blob");
    fs::write(&blob_path, &tar).unwrap();
    let fifo = tmp.path().join("fifo");
    rfs::mknodat(
        rfs::CWD,
        &fifo,
        rfs::FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();

    let cache = LayerCache::open(&cache_dir).unwrap();
    let layers = cache.dir().to_path_buf();
    // A directory another (live) unpack is using: locked, so it must survive the sweep.
    let live = layers.join(".tmp-0123456789abcdef0123-1-live");
    fs::create_dir(&live).unwrap();
    let live_lock = rfs::open(
        &live,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap();
    rfs::flock(&live_lock, FlockOperation::NonBlockingLockExclusive).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_unpack", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!(
                "{}\n{}\n{digest}\n{diff_id}",
                cache_dir.display(),
                fifo.display()
            ),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // Feed half of the layer once the child has opened the FIFO.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut w = loop {
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("opening the FIFO for the child: {e}"),
        }
    };
    let flags = rfs::fcntl_getfl(&w).unwrap();
    rfs::fcntl_setfl(&w, flags - OFlags::NONBLOCK).unwrap();
    let half = tar.len() / 2;
    w.write_all(&tar[..half]).unwrap();

    // Wait until the child has written (nearly) everything it was given, then kill it.
    let child_tmp = loop {
        let mine: Vec<PathBuf> = tmp_dirs(&layers)
            .into_iter()
            .filter(|p| *p != live)
            .collect();
        if let [t] = &mine[..] {
            if count(&t.join("t/data")) >= FILES / 2 - 100 {
                break t.clone();
            }
        }
        assert!(Instant::now() < deadline, "the child made no progress");
        std::thread::sleep(Duration::from_millis(10));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    drop(w);
    assert!(!status.success());
    let name = child_tmp
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // Temporary names are random, not the pid: every envbox is PID 1 of its pod (issue 16).
    assert!(
        name.starts_with(".tmp-"),
        "{name} is not an unpack directory"
    );
    let partial = count(&child_tmp.join("t/data"));
    assert!(partial < FILES, "killed mid-way ({partial} files)");
    eprintln!(
        "child {} killed with {partial} of {FILES} files written",
        child.id()
    );
    let published = layers.join(&digest[7..27]);
    assert!(!published.exists(), "a killed unpack publishes nothing");

    // The next start: the stale directory goes, the live one stays, the layer is complete.
    let cache = LayerCache::open(&cache_dir).unwrap();
    let blob = LayerBlob {
        digest: digest.clone(),
        media_type: MEDIA_TYPE.into(),
        path: blob_path,
        diff_id: Some(diff_id),
    };
    let c = cache.ensure(&blob, &[]).unwrap();
    assert!(c.unpacked);
    assert_eq!(c.name, &digest[7..27]);
    assert_eq!(tmp_dirs(&layers), vec![live.clone()]);
    let data = cache.lower_dir(&c).join("data");
    assert_eq!(count(&data), FILES);
    for i in 0..FILES {
        let got = fs::read(data.join(format!("f{i:05}"))).unwrap();
        assert!(got == content(i), "f{i:05} differs");
    }
    assert_eq!(
        fs::read_to_string(published.join("digest")).unwrap().trim(),
        digest
    );
    drop(live_lock);
}

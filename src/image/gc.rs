//! Garbage collection of the image cache under a size budget (`CODER_CACHE_MAX_SIZE`).
//!
//! The unit of collection is a digest. What a digest occupies: its verified blob
//! (`blobs/sha256/<hex>`) and every unpacked layer directory under `layers/` whose `digest` file
//! names it (the plain one and any chain variants, see `rootfs`). Next to them:
//!
//! ```text
//! use/<hex>    access marker and in-use lock of one digest: its mtime is the last use; every envbox
//!              process that uses the digest (pulled it, unpacks or runs on it) holds a shared flock
//!              on it for as long as it runs
//! ```
//!
//! A collection sums the footprint of every digest and, while the cache is over budget, removes the
//! least recently used digests first. It takes each entry's lock exclusively without waiting and
//! skips entries that are busy, so nothing another pod (or this one) uses is ever removed. A layer
//! directory is first renamed to a private `.tmp-gc-*` name (locked, so the layer cache's sweeper
//! leaves it alone) and then removed, so a reader never sees half of one.
//!
//! Users take their shared lock *before* checking that what they need is present ([`hold`]); a
//! holder that finds its marker unlinked (a collection removed the entry just before) takes a fresh
//! one, and then finds the content missing and fetches it again.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustix::fs::{self as rfs, FlockOperation, Mode, OFlags};

use crate::image::reference::validate_digest;

const USE_DIR: &str = "use";
const GC_TMP_PREFIX: &str = ".tmp-gc-";

fn use_path(cache_dir: &Path, hex: &str) -> PathBuf {
    cache_dir.join(USE_DIR).join(hex)
}

/// Shared locks on digests of the cache, held while this value lives.
pub struct Holds {
    held: Vec<(String, File)>,
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.held.iter().map(|(d, _)| d))
            .finish()
    }
}

impl Holds {
    pub fn empty() -> Holds {
        Holds { held: Vec::new() }
    }

    /// The digests held.
    pub fn digests(&self) -> impl Iterator<Item = &str> {
        self.held.iter().map(|(d, _)| d.as_str())
    }
}

/// Marks `digests` as in use by this process (shared lock on each `use/<hex>`, blocking while a
/// collection removes that entry) and records the use (the marker's mtime). Duplicates and invalid
/// digests are skipped.
pub fn hold<'a>(cache_dir: &Path, digests: impl IntoIterator<Item = &'a str>) -> io::Result<Holds> {
    let dir = cache_dir.join(USE_DIR);
    fs::create_dir_all(&dir)?;
    let mut held: Vec<(String, File)> = Vec::new();
    for d in digests {
        let Ok(hex) = validate_digest(d) else {
            continue;
        };
        if held.iter().any(|(h, _)| h == d) {
            continue;
        }
        let path = dir.join(hex);
        // A collection may have removed the marker between our open and our lock.
        let Some(file) = crate::image::durable::lock_current(
            &path,
            || {
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
            },
            |f| {
                rfs::flock(f, FlockOperation::LockShared)
                    .map(|()| true)
                    .map_err(io::Error::from)
            },
            |e| e,
        )?
        else {
            continue; // a blocking lock never gives up
        };
        touch(&file);
        held.push((d.to_string(), file));
    }
    Ok(Holds { held })
}

fn touch(f: &File) {
    let now = SystemTime::now();
    let times = fs::FileTimes::new().set_accessed(now).set_modified(now);
    if let Err(e) = f.set_times(times) {
        log::debug!("touching a cache use marker: {e}");
    }
}

static PROCESS_HOLDS: Mutex<Vec<Arc<Holds>>> = Mutex::new(Vec::new());

/// Keeps `holds` until the process exits (an envbox process uses its image for its whole life).
pub fn keep_for_process(holds: Arc<Holds>) {
    PROCESS_HOLDS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(holds);
}

/// One digest's footprint in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub hex: String,
    pub bytes: u64,
    pub last_use: SystemTime,
    pub blob: Option<PathBuf>,
    pub layer_dirs: Vec<PathBuf>,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub budget: u64,
    pub before: u64,
    pub after: u64,
    pub removed: usize,
    pub removed_bytes: u64,
    /// Entries that had to go by the policy but were in use.
    pub busy: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        write!(
            f,
            "cache GC: {:.1} MiB before, budget {:.1} MiB; removed {} entries ({:.1} MiB); {} in use kept; {:.1} MiB now",
            mib(self.before),
            mib(self.budget),
            self.removed,
            mib(self.removed_bytes),
            self.busy,
            mib(self.after)
        )?;
        if self.after > self.budget {
            write!(f, " (over budget: the rest is in use)")?;
        }
        Ok(())
    }
}

/// The policy: least recently used first (ties by name, for a stable order), until the total is
/// within `budget`. `take` tries to claim an entry for removal (false: it is in use, skip it).
/// Returns the indices removed and the number of busy entries skipped.
pub fn plan(
    entries: &[Entry],
    budget: u64,
    mut take: impl FnMut(&Entry) -> bool,
) -> (Vec<usize>, usize) {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| {
        (entries[a].last_use, &entries[a].hex).cmp(&(entries[b].last_use, &entries[b].hex))
    });
    let (mut removed, mut busy) = (Vec::new(), 0);
    for i in order {
        if total <= budget {
            break;
        }
        if take(&entries[i]) {
            total = total.saturating_sub(entries[i].bytes);
            removed.push(i);
        } else {
            busy += 1;
        }
    }
    (removed, busy)
}

/// Apparent size of a tree: regular files and symlinks by length, each inode once.
fn tree_bytes(p: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        let mut n = m.len();
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                n += tree_bytes(&e.path(), seen);
            }
        }
        n
    } else if seen.insert((m.dev(), m.ino())) {
        m.len()
    } else {
        0
    }
}

/// Reads the cache: one entry per digest found among blobs and unpacked layers.
pub fn scan(cache_dir: &Path) -> io::Result<Vec<Entry>> {
    let mut map: HashMap<String, Entry> = HashMap::new();
    let new_entry = |hex: &str| Entry {
        hex: hex.to_string(),
        bytes: 0,
        last_use: SystemTime::UNIX_EPOCH,
        blob: None,
        layer_dirs: Vec::new(),
    };
    let blobs = cache_dir.join("blobs/sha256");
    if let Ok(rd) = fs::read_dir(&blobs) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_digest(&format!("sha256:{name}")).is_err() {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            let ent = map.entry(name.clone()).or_insert_with(|| new_entry(&name));
            ent.bytes += m.len();
            ent.last_use = ent
                .last_use
                .max(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
            ent.blob = Some(e.path());
        }
    }
    let layers = cache_dir.join("layers");
    if let Ok(rd) = fs::read_dir(&layers) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let p = e.path();
            let Ok(info) = fs::read_to_string(p.join("digest")) else {
                continue;
            };
            let Some(hex) = info
                .lines()
                .next()
                .and_then(|d| validate_digest(d.trim()).ok())
                .map(str::to_string)
            else {
                continue;
            };
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let bytes = tree_bytes(&p, &mut Default::default());
            let ent = map.entry(hex.clone()).or_insert_with(|| new_entry(&hex));
            ent.bytes += bytes;
            ent.last_use = ent.last_use.max(mtime);
            ent.layer_dirs.push(p);
        }
    }
    // The use marker, when there is one, is the authoritative last use.
    for ent in map.values_mut() {
        if let Ok(m) = fs::metadata(use_path(cache_dir, &ent.hex)) {
            if let Ok(t) = m.modified() {
                ent.last_use = t;
            }
        }
    }
    let mut v: Vec<Entry> = map.into_values().collect();
    v.sort_by(|a, b| a.hex.cmp(&b.hex));
    Ok(v)
}

/// An entry claimed for removal: the exclusive lock on its use marker.
struct Claim {
    marker: PathBuf,
    file: File,
}

fn claim(cache_dir: &Path, hex: &str) -> io::Result<Option<Claim>> {
    let dir = cache_dir.join(USE_DIR);
    fs::create_dir_all(&dir)?;
    let marker = dir.join(hex);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&marker)?;
    match rfs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    // Another collection may have removed (and someone re-created) the marker meanwhile.
    match crate::image::durable::is_current(&file, &marker) {
        Ok(true) => Ok(Some(Claim { marker, file })),
        _ => Ok(None),
    }
}

fn remove_entry(cache_dir: &Path, e: &Entry, c: Claim) -> io::Result<()> {
    let layers = cache_dir.join("layers");
    for (i, d) in e.layer_dirs.iter().enumerate() {
        let name = d.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = layers.join(format!(
            "{GC_TMP_PREFIX}{}-{}-{i}",
            name.unwrap_or_default(),
            // Not the pid: every envbox is PID 1, so pids repeat across the pods sharing the cache.
            crate::image::durable::random_hex()
        ));
        // Locked like the layer cache's private directories, so its sweeper leaves it to us.
        let lock = rfs::open(
            d,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(|fd| rfs::flock(&fd, FlockOperation::NonBlockingLockExclusive).map(|()| fd));
        let Ok(_lock) = lock else {
            continue;
        };
        match fs::rename(d, &tmp) {
            Ok(()) => {
                if let Err(err) = fs::remove_dir_all(&tmp) {
                    log::warn!("removing {}: {err}", tmp.display());
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    if let Some(b) = &e.blob {
        match fs::remove_file(b) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    // Last, while still locked: a waiting holder then sees the marker gone and takes a new one.
    let _ = fs::remove_file(&c.marker);
    drop(c.file);
    Ok(())
}

/// Collects the cache at `cache_dir` down to `budget` bytes where possible.
pub fn collect(cache_dir: &Path, budget: u64) -> io::Result<Report> {
    let entries = scan(cache_dir)?;
    let before: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut report = Report {
        budget,
        before,
        after: before,
        ..Default::default()
    };
    if before <= budget {
        return Ok(report);
    }
    let mut failure: Option<io::Error> = None;
    let (removed, busy) = plan(&entries, budget, |e| {
        if failure.is_some() {
            return false;
        }
        match claim(cache_dir, &e.hex) {
            Ok(Some(c)) => match remove_entry(cache_dir, e, c) {
                Ok(()) => true,
                Err(err) => {
                    failure = Some(err);
                    false
                }
            },
            Ok(None) => false,
            Err(err) => {
                failure = Some(err);
                false
            }
        }
    });
    report.removed = removed.len();
    report.removed_bytes = removed.iter().map(|&i| entries[i].bytes).sum();
    report.after = before - report.removed_bytes;
    report.busy = busy;
    if let Some(e) = failure {
        log::warn!("cache GC stopped early: {e}");
    }
    Ok(report)
}

/// Runs a collection when a budget is set and logs what it did. Errors are logged, not returned:
/// the cache is only over budget then.
pub fn run(cache_dir: &Path, budget: Option<u64>) {
    let Some(budget) = budget else { return };
    match collect(cache_dir, budget) {
        Ok(r) => log::info!("{r}"),
        Err(e) => log::warn!("cache GC of {}: {e}", cache_dir.display()),
    }
}

/// [`run`] on a thread of its own, so a large cache does not delay anything else.
pub fn spawn(cache_dir: PathBuf, budget: Option<u64>) {
    if budget.is_none() {
        return;
    }
    if let Err(e) = std::thread::Builder::new()
        .name("cache-gc".into())
        .spawn(move || run(&cache_dir, budget))
    {
        log::warn!("cannot start the cache GC: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(hex: &str, bytes: u64, age_s: u64) -> Entry {
        Entry {
            hex: hex.into(),
            bytes,
            last_use: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            blob: None,
            layer_dirs: vec![],
        }
    }

    #[test]
    fn policy_removes_least_recently_used_until_within_budget() {
        let es = vec![
            entry("a", 100, 10),
            entry("b", 100, 30), // oldest
            entry("c", 100, 20),
            entry("d", 100, 0),
        ];
        let (removed, busy) = plan(&es, 250, |_| true);
        assert_eq!(removed, vec![1, 2]);
        assert_eq!(busy, 0);
        // Within budget: nothing.
        assert_eq!(plan(&es, 400, |_| true), (vec![], 0));
        // Budget 0: everything, oldest first.
        assert_eq!(plan(&es, 0, |_| true).0, vec![1, 2, 0, 3]);
    }

    #[test]
    fn policy_skips_busy_entries_and_takes_the_next() {
        let es = vec![
            entry("a", 100, 10),
            entry("b", 100, 30),
            entry("c", 100, 20),
        ];
        let (removed, busy) = plan(&es, 150, |e| e.hex != "b");
        assert_eq!(removed, vec![2, 0]);
        assert_eq!(busy, 1);
        // All busy: nothing removed, over budget.
        assert_eq!(plan(&es, 0, |_| false), (vec![], 3));
    }

    #[test]
    fn policy_ties_are_broken_by_name() {
        let es = vec![entry("z", 10, 5), entry("a", 10, 5)];
        assert_eq!(plan(&es, 10, |_| true).0, vec![1]);
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn put_blob(cache: &Path, d: &str, len: usize) {
        let p = cache.join("blobs/sha256");
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join(&d[7..]), vec![0u8; len]).unwrap();
    }

    fn put_layer(cache: &Path, name: &str, d: &str, len: usize) {
        let p = cache.join("layers").join(name);
        fs::create_dir_all(p.join("t/etc")).unwrap();
        fs::write(p.join("t/etc/file"), vec![1u8; len]).unwrap();
        fs::write(p.join("digest"), format!("{d}\n")).unwrap();
    }

    fn set_last_use(cache: &Path, d: &str, secs_ago: u64) {
        let h = hold(cache, [d]).unwrap();
        drop(h);
        let f = File::options()
            .write(true)
            .open(cache.join("use").join(&d[7..]))
            .unwrap();
        let t = SystemTime::now() - Duration::from_secs(secs_ago);
        f.set_modified(t).unwrap();
    }

    #[test]
    fn scan_sums_blob_and_layer_dirs_per_digest() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        put_blob(c, D1, 1000);
        put_layer(c, "11111111111111111111", D1, 3000);
        put_layer(c, "chain-of-d1", D1, 500);
        put_blob(c, D2, 10);
        fs::create_dir_all(c.join("layers/.tmp-xyz")).unwrap();
        let es = scan(c).unwrap();
        assert_eq!(es.len(), 2);
        assert_eq!(es[0].hex, &D1[7..]);
        assert!(
            es[0].bytes >= 4500 && es[0].bytes < 4500 + 4 * 8192,
            "{}",
            es[0].bytes
        );
        assert_eq!(es[0].layer_dirs.len(), 2);
        assert_eq!(es[1].bytes, 10);
    }

    #[test]
    fn collect_removes_idle_lru_entries_and_keeps_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        for (d, name) in [(D1, "d1"), (D2, "d2"), (D3, "d3")] {
            put_blob(c, d, 10_000);
            put_layer(c, name, d, 10_000);
        }
        // D1 is in use (holding it records a use; its marker is then aged to be the oldest).
        let busy = hold(c, [D1]).unwrap();
        set_last_use(c, D1, 300);
        set_last_use(c, D2, 200);
        set_last_use(c, D3, 100);
        let total: u64 = scan(c).unwrap().iter().map(|e| e.bytes).sum();
        // Room for about two of the three.
        let r = collect(c, total * 2 / 3).unwrap();
        assert_eq!(r.removed, 1, "{r}");
        assert_eq!(r.busy, 1, "{r}");
        assert!(r.after <= r.budget, "{r}");
        assert!(c.join("blobs/sha256").join(&D1[7..]).exists());
        assert!(c.join("layers/d1/t/etc/file").exists());
        assert!(!c.join("blobs/sha256").join(&D2[7..]).exists());
        assert!(!c.join("layers/d2").exists());
        assert!(!c.join("use").join(&D2[7..]).exists());
        assert!(c.join("layers/d3").exists());
        // No private GC directories are left behind.
        let left: Vec<_> = fs::read_dir(c.join("layers"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // Budget 0: everything idle goes, the held digest stays.
        let r = collect(c, 0).unwrap();
        assert_eq!((r.removed, r.busy), (1, 1), "{r}");
        assert!(r.to_string().contains("over budget"), "{r}");
        assert!(c.join("layers/d1").exists());
        assert!(!c.join("layers/d3").exists());
        drop(busy);
        let r = collect(c, 0).unwrap();
        assert_eq!((r.removed, r.after), (1, 0), "{r}");
    }

    #[test]
    fn hold_recovers_from_a_marker_removed_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path();
        put_blob(c, D1, 10);
        // A collection claims the entry; a holder waits on the claimed marker meanwhile.
        let claimed = claim(c, &D1[7..]).unwrap().unwrap();
        let waiter = {
            let c = c.to_path_buf();
            std::thread::spawn(move || hold(&c, [D1]).unwrap())
        };
        std::thread::sleep(Duration::from_millis(100));
        let e = scan(c).unwrap().remove(0);
        remove_entry(c, &e, claimed).unwrap();
        let h = waiter.join().unwrap();
        assert_eq!(h.digests().collect::<Vec<_>>(), vec![D1]);
        // The waiter holds a fresh marker, so a collection cannot claim it.
        assert!(c.join("use").join(&D1[7..]).exists());
        assert!(claim(c, &D1[7..]).unwrap().is_none());
    }

    #[test]
    fn report_reads_well() {
        let r = Report {
            budget: 10 << 20,
            before: 30 << 20,
            after: 8 << 20,
            removed: 2,
            removed_bytes: 22 << 20,
            busy: 1,
        };
        assert_eq!(
            r.to_string(),
            "cache GC: 30.0 MiB before, budget 10.0 MiB; removed 2 entries (22.0 MiB); 1 in use kept; 8.0 MiB now"
        );
    }
}

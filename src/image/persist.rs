//! `CODER_PERSIST_ROOTFS`: the workspace's writable layer kept on `CODER_STATE_DIR` across stops,
//! like a VM's disk. What a start does with the layer the last one left is decided by [`decide`]
//! from the record kept beside it (pure); [`prepare`] applies that decision around the usual
//! root filesystem preparation.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bundle::spec::ID_MAP_HOST_START;
use crate::image::rootfs::{self, LayerBlob, Rootfs, RootfsError, UpperMode};
use crate::sys::Kernel;

/// The record of the kept layer, next to it in the state directory.
pub const RECORD: &str = "upper.json";
/// Where layers made on another image are kept aside.
pub const KEPT_ASIDE: &str = "kept-layers";
/// Layers kept aside beyond this many are removed, oldest first.
pub const MAX_KEPT_ASIDE: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistRootfs {
    /// Today's default: a fresh writable layer at every start.
    Off,
    /// Kept; set aside (not deleted) when the image changes.
    On,
    /// Kept and reused even on another image, at the user's own risk.
    KeepOnImageChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    /// The image config digest the layer was made on.
    pub image: String,
    pub reference: String,
    /// Host uid the layer's root belongs to (the workspace's id range).
    pub uid: u32,
    /// Files envbox itself wrote through the root at the last start (per-start facts such as the
    /// inner Docker's MTU): removed from the kept layer so that this start writes them afresh.
    #[serde(default)]
    pub envbox_files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No kept layer (or persistence off): a fresh one.
    Fresh,
    Reuse,
    /// Made on another image: keep it aside under this name, start fresh.
    SetAside {
        name: String,
        previous: KeptRecord,
    },
    /// Made on another image, reused anyway (`keep-on-image-change`).
    ReuseOnNewImage {
        previous: KeptRecord,
    },
}

/// What the start does with the layer a previous start left. `upper_exists` without a record is a
/// layer of a start that died before it could write one (or of persistence turned on now): it is
/// set aside, never deleted silently.
pub fn decide(
    mode: PersistRootfs,
    record: Option<&KeptRecord>,
    upper_exists: bool,
    image: &str,
    now_unix: u64,
) -> Decision {
    if mode == PersistRootfs::Off || !upper_exists {
        return Decision::Fresh;
    }
    let unknown = KeptRecord {
        image: "unknown".into(),
        reference: "unknown".into(),
        uid: ID_MAP_HOST_START,
        envbox_files: Vec::new(),
    };
    match record {
        Some(r) if r.image == image => Decision::Reuse,
        Some(r) if mode == PersistRootfs::KeepOnImageChange => Decision::ReuseOnNewImage {
            previous: r.clone(),
        },
        r => {
            let previous = r.cloned().unwrap_or(unknown);
            Decision::SetAside {
                name: aside_name(&previous.image, now_unix),
                previous,
            }
        }
    }
}

/// `<12 hex of the digest>-<UTC date and time>`: which image, and when it was set aside.
fn aside_name(digest: &str, now_unix: u64) -> String {
    let hex: String = digest
        .rsplit(':')
        .next()
        .unwrap_or(digest)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    let (days, secs) = (now_unix / 86_400, now_unix % 86_400);
    let (y, m, d) = crate::buildlog::civil_from_days(days as i64);
    format!(
        "{hex}-{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Which of `aside` (names from [`aside_name`], so sorted by date within one image, and compared by
/// modification time across images) go, so that at most `max` stay.
fn to_prune(mut aside: Vec<(PathBuf, SystemTime)>, max: usize) -> Vec<PathBuf> {
    aside.sort_by_key(|(_, t)| *t);
    let n = aside.len().saturating_sub(max);
    aside.into_iter().take(n).map(|(p, _)| p).collect()
}

/// What a start asks of the writable layer: the mode, and the image it runs (as far as keeping its
/// writable layer is concerned).
pub struct Persistence<'a> {
    pub mode: PersistRootfs,
    pub config_digest: &'a str,
    pub reference: &'a str,
}

pub struct Prepared {
    pub rootfs: Rootfs,
    /// What the build log says about the kept layer, if anything.
    pub notes: Vec<String>,
}

/// The root filesystem with the writable layer kept as `mode` says. Persistence off is exactly
/// [`rootfs::prepare`] with a fresh layer.
pub fn prepare(
    kernel: &dyn Kernel,
    cache_dir: &Path,
    state_dir: &Path,
    layers: &[LayerBlob],
    ephemeral_dir: Option<&Path>,
    image: &Persistence,
    notice: &dyn Fn(&str),
) -> Result<Prepared, RootfsError> {
    let mode = image.mode;
    let fresh = |notes: Vec<String>| {
        rootfs::prepare(
            kernel,
            cache_dir,
            state_dir,
            layers,
            ephemeral_dir,
            UpperMode::Fresh,
            notice,
        )
        .map(|rootfs| Prepared { rootfs, notes })
    };
    if mode == PersistRootfs::Off {
        let mut notes = Vec::new();
        if read_record(state_dir).is_some() {
            let _ = std::fs::remove_file(state_dir.join(RECORD));
            notes.push(
                "CODER_PERSIST_ROOTFS is off: the writable layer an earlier start kept is replaced by a fresh one"
                    .to_string(),
            );
        }
        return fresh(notes);
    }
    let upper = state_dir.join("upper");
    let record = read_record(state_dir);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut notes = Vec::new();
    let decision = decide(
        mode,
        record.as_ref(),
        upper.is_dir(),
        image.config_digest,
        now,
    );
    match &decision {
        Decision::Fresh => {}
        Decision::SetAside { name, previous } => {
            let to = set_aside(state_dir, name)?;
            notes.push(format!(
                "The image changed ({} → {}): the previous writable layer is kept at {}; copy files out \
                 of it (it is owned by the workspace's id range, uid {ID_MAP_HOST_START} = root inside) \
                 or set CODER_PERSIST_ROOTFS=keep-on-image-change to reuse it on the new image",
                previous.reference,
                image.reference,
                to.display()
            ));
        }
        Decision::Reuse | Decision::ReuseOnNewImage { .. } => {
            check_owner(&upper)?;
            if let Some(r) = &record {
                remove_envbox_files(&upper, &r.envbox_files);
            }
            if let Decision::ReuseOnNewImage { previous } = &decision {
                notes.push(format!(
                    "Reusing the writable layer made on {} on the new image {} \
                     (CODER_PERSIST_ROOTFS=keep-on-image-change): files the new image changed may conflict",
                    previous.reference, image.reference
                ));
            }
        }
    }
    let keep = matches!(decision, Decision::Reuse | Decision::ReuseOnNewImage { .. });
    let prepared = if keep {
        match rootfs::prepare(
            kernel,
            cache_dir,
            state_dir,
            layers,
            ephemeral_dir,
            UpperMode::Keep,
            notice,
        ) {
            Ok(rootfs) => Prepared { rootfs, notes },
            // overlayfs refuses an upper made with other lowers or index settings: keep it aside.
            Err(RootfsError::KeptUpperRefused(e)) => {
                let to = set_aside(state_dir, &aside_name(image.config_digest, now))?;
                notes.push(format!(
                    "The kept writable layer could not be mounted ({e}); it is kept at {} and a fresh one is used",
                    to.display()
                ));
                fresh(notes)?
            }
            Err(e) => return Err(e),
        }
    } else {
        fresh(notes)?
    };
    write_record(
        state_dir,
        &KeptRecord {
            image: image.config_digest.to_string(),
            reference: image.reference.to_string(),
            uid: ID_MAP_HOST_START,
            envbox_files: Vec::new(),
        },
    )?;
    let mut prepared = prepared;
    let size = tree_size(&upper);
    prepared.notes.push(format!(
        "Writable layer {} ({} MiB kept across restarts on CODER_STATE_DIR)",
        if keep { "reused" } else { "created" },
        size >> 20
    ));
    prune_aside(state_dir);
    Ok(prepared)
}

/// Records the per-start files envbox wrote through the root, so the next start removes them first.
pub fn record_envbox_files(state_dir: &Path, files: &[&str]) {
    let Some(mut r) = read_record(state_dir) else {
        return;
    };
    r.envbox_files = files.iter().map(|f| f.to_string()).collect();
    if let Err(e) = write_record(state_dir, &r) {
        log::warn!("{e}");
    }
}

fn read_record(state_dir: &Path) -> Option<KeptRecord> {
    let p = state_dir.join(RECORD);
    let text = std::fs::read(&p).ok()?;
    match serde_json::from_slice(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            log::warn!("ignoring {}: {e}", p.display());
            None
        }
    }
}

fn write_record(state_dir: &Path, r: &KeptRecord) -> Result<(), RootfsError> {
    let p = state_dir.join(RECORD);
    let json = serde_json::to_vec(r).expect("a record serialises");
    crate::image::durable::atomic_write(state_dir, &p, &json).map_err(|source| RootfsError::Io {
        op: "write",
        path: p,
        source,
    })
}

fn set_aside(state_dir: &Path, name: &str) -> Result<PathBuf, RootfsError> {
    let dir = state_dir.join(KEPT_ASIDE);
    std::fs::create_dir_all(&dir).map_err(|source| RootfsError::Io {
        op: "create",
        path: dir.clone(),
        source,
    })?;
    let to = dir.join(name);
    let from = state_dir.join("upper");
    std::fs::rename(&from, &to).map_err(|source| RootfsError::Io {
        op: "rename",
        path: from,
        source,
    })?;
    let _ = std::fs::remove_file(state_dir.join(RECORD));
    Ok(to)
}

fn prune_aside(state_dir: &Path) {
    let dir = state_dir.join(KEPT_ASIDE);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let aside: Vec<(PathBuf, SystemTime)> = entries
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
        .collect();
    for p in to_prune(aside, MAX_KEPT_ASIDE) {
        match std::fs::remove_dir_all(&p) {
            Ok(()) => log::info!(
                "removed the oldest kept-aside writable layer {}",
                p.display()
            ),
            Err(e) => log::warn!("removing {}: {e}", p.display()),
        }
    }
}

/// A kept layer owned by another id range (a changed id setting) would give the workspace files it
/// cannot use: refused, with what to do.
fn check_owner(upper: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(upper).map_err(|source| RootfsError::Io {
        op: "stat",
        path: upper.to_path_buf(),
        source,
    })?;
    if md.uid() == ID_MAP_HOST_START {
        return Ok(());
    }
    Err(RootfsError::Io {
        op: "reuse the kept writable layer",
        path: upper.to_path_buf(),
        source: std::io::Error::other(format!(
            "it belongs to uid {}, not to the workspace's id range starting at {ID_MAP_HOST_START}; \
             move it away (or set CODER_PERSIST_ROOTFS=false) to start with a fresh one",
            md.uid()
        )),
    })
}

fn remove_envbox_files(upper: &Path, files: &[String]) {
    for f in files {
        let rel = Path::new(f.trim_start_matches('/'));
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let p = upper.join(rel);
        match std::fs::remove_file(&p) {
            Ok(()) => log::debug!("removed last start's {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("removing last start's {}: {e}", p.display()),
        }
    }
}

/// Bytes allocated below `dir` (without following symlinks).
fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(image: &str) -> KeptRecord {
        KeptRecord {
            image: image.into(),
            reference: format!("reg/img@{image}"),
            uid: ID_MAP_HOST_START,
            envbox_files: vec![],
        }
    }

    #[test]
    fn decisions() {
        use PersistRootfs::*;
        let r = rec("sha256:aaaa");
        assert_eq!(
            decide(Off, Some(&r), true, "sha256:aaaa", 0),
            Decision::Fresh
        );
        assert_eq!(
            decide(On, Some(&r), false, "sha256:aaaa", 0),
            Decision::Fresh
        );
        assert_eq!(
            decide(On, Some(&r), true, "sha256:aaaa", 0),
            Decision::Reuse
        );
        assert_eq!(
            decide(KeepOnImageChange, Some(&r), true, "sha256:bbbb", 0),
            Decision::ReuseOnNewImage {
                previous: r.clone()
            }
        );
        match decide(On, Some(&r), true, "sha256:bbbb", 86_400 + 3661) {
            Decision::SetAside { name, previous } => {
                assert_eq!(name, "aaaa-19700102T010101Z");
                assert_eq!(previous, r);
            }
            d => panic!("{d:?}"),
        }
        // A layer without its record (a start killed before writing one): set aside, not reused.
        assert!(matches!(
            decide(KeepOnImageChange, None, true, "sha256:aaaa", 0),
            Decision::SetAside { .. }
        ));
    }

    #[test]
    fn the_oldest_kept_aside_layers_go_first() {
        let t = |s| UNIX_EPOCH + std::time::Duration::from_secs(s);
        let aside = vec![
            (PathBuf::from("c"), t(30)),
            (PathBuf::from("a"), t(10)),
            (PathBuf::from("d"), t(40)),
            (PathBuf::from("b"), t(20)),
        ];
        assert_eq!(to_prune(aside.clone(), 3), vec![PathBuf::from("a")]);
        assert!(to_prune(aside, 4).is_empty());
    }

    #[test]
    fn per_start_files_are_removed_only_inside_the_layer() {
        let upper = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(upper.path().join("etc/docker")).unwrap();
        std::fs::write(upper.path().join("etc/docker/daemon.json"), "{}").unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        remove_envbox_files(
            upper.path(),
            &[
                "/etc/docker/daemon.json".into(),
                format!("../{}", victim.display()),
            ],
        );
        assert!(!upper.path().join("etc/docker/daemon.json").exists());
        assert!(victim.exists());
    }
}

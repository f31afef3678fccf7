//! Bind mounts from the pod into the workspace and the ownership of their sources.
//!
//! Ownership follows the Go envbox, minus its bugs: non-recursive, the user's home owned by
//! 100000+uid:gid so the user can write it, other writable sources by the workspace's root (100000).
//! The one recursive change is the once-only shift of a root-owned default volume that already has
//! content and that sysbox will not ID-map (see [`VolumeShift`]).
//! A read-only source is mounted read-only and left exactly as it is: never remounted read-write in
//! the pod (envbox#55) and never chowned.

use std::path::{Path, PathBuf};

use crate::bundle::spec::{BindMount, ID_MAP_HOST_START};
use crate::config::MountSpec;
use crate::image::facts::UserInfo;
use crate::sys::Kernel;

/// Inner Docker and Podman storage, persisted on the template's PVC across restarts.
pub const DEFAULT_MOUNTS: &[(&str, &str)] = &[
    ("/var/lib/coder/docker", "/var/lib/docker"),
    ("/var/lib/coder/containers", "/var/lib/containers"),
];

/// Targets whose sources belong to the node or to envbox: a user mount onto them keeps its owner.
pub const PRIVATE_TARGETS: &[&str] = &[
    "/var/lib/containers",
    "/var/lib/docker",
    "/var/lib/sysbox",
    "/lib/modules",
    "/usr/src",
    "/var/lib/coder",
];

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "CODER_MOUNTS: source {0} does not exist in the pod; mount a volume there or fix the path"
    )]
    MissingSource(PathBuf),
    #[error("preparing mount source {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    Keep,
    Chown {
        uid: u32,
        gid: u32,
    },
    /// A default source envbox created or that is still root-owned: give it to the workspace's root.
    DefaultVolume,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMount {
    pub bind: BindMount,
    pub ownership: Ownership,
    pub is_default: bool,
}

fn is_private(target: &Path) -> bool {
    PRIVATE_TARGETS.iter().any(|p| target == Path::new(p))
}

/// Defaults first (a user mount onto the same target replaces one), parents before children.
pub fn plan(user: &UserInfo, user_mounts: &[MountSpec]) -> Vec<PlannedMount> {
    let mut out: Vec<PlannedMount> = DEFAULT_MOUNTS
        .iter()
        .filter(|(_, dst)| !user_mounts.iter().any(|m| m.target == Path::new(dst)))
        .map(|(src, dst)| PlannedMount {
            bind: BindMount {
                source: src.into(),
                target: dst.into(),
                read_only: false,
            },
            ownership: Ownership::DefaultVolume,
            is_default: true,
        })
        .collect();
    let home = Path::new(&user.home);
    for m in user_mounts {
        let ownership = if m.read_only || is_private(&m.target) {
            Ownership::Keep
        } else if m.target == home
            || m.source.starts_with("/home")
            || m.source == Path::new("/root")
        {
            Ownership::Chown {
                uid: ID_MAP_HOST_START + user.uid,
                gid: ID_MAP_HOST_START + user.gid,
            }
        } else {
            Ownership::Chown {
                uid: ID_MAP_HOST_START,
                gid: ID_MAP_HOST_START,
            }
        };
        out.push(PlannedMount {
            bind: BindMount {
                source: m.source.clone(),
                target: m.target.clone(),
                read_only: m.read_only,
            },
            ownership,
            is_default: false,
        });
    }
    out.sort_by_key(|m| m.bind.target.components().count());
    out
}

/// How a default volume that is root-owned and not empty is made usable. The Go envbox ran sysbox
/// with ID-mapped binds of `/var/lib/coder/{docker,containers}`, so the inner dockerd's files on
/// those PVCs belong to host uid 0; handing only the top directory to 100000 (as for a fresh volume)
/// makes sysbox bind it plainly, and everything below shows as `nobody` inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeShift {
    /// sysbox ID-maps a root-owned bind source (kernel and sysbox-mgr support it, not disabled):
    /// the volume stays exactly as it is.
    IdMappedBySysbox,
    /// No ID-mapped binds (runc, crun, an old kernel, CODER_DISABLE_IDMAPPED_MOUNT): every entry is
    /// shifted by 100000 once, recorded by [`SHIFT_MARKER`].
    Shift,
}

/// Written at the top of a volume once its content is shifted, so that it is done once.
pub const SHIFT_MARKER: &str = ".envbox-uid-shifted";

/// Creates missing default sources, checks user sources exist, and sets ownership.
pub fn prepare(
    kernel: &dyn Kernel,
    planned: &[PlannedMount],
) -> Result<Vec<BindMount>, MountError> {
    prepare_volumes(kernel, planned, VolumeShift::Shift).map(|(binds, _)| binds)
}

/// [`prepare`], with what to do about root-owned volumes that have content; also returns what was
/// done to them, for the build log.
pub fn prepare_volumes(
    kernel: &dyn Kernel,
    planned: &[PlannedMount],
    shift: VolumeShift,
) -> Result<(Vec<BindMount>, Vec<String>), MountError> {
    use std::os::unix::fs::MetadataExt;
    let mut notes = Vec::new();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MountError::Io { path, source }
    };
    for m in planned {
        let src = &m.bind.source;
        let meta = std::fs::metadata(src);
        match (&m.ownership, meta) {
            (Ownership::DefaultVolume, Err(_)) => {
                kernel.create_dir_all(src).map_err(io(src))?;
                kernel
                    .chown(src, ID_MAP_HOST_START, ID_MAP_HOST_START)
                    .map_err(io(src))?;
                kernel.chmod(src, 0o711).map_err(io(src))?;
            }
            (Ownership::DefaultVolume, Ok(md)) => {
                // Root-owned means never handed over (a fresh volume, or one of the Go envbox's);
                // anything else was set deliberately, by us on an earlier start or by the
                // platform team.
                if md.uid() == 0 && md.gid() == 0 {
                    let has_content = std::fs::read_dir(src)
                        .map(|mut d| d.next().is_some())
                        .unwrap_or(false);
                    let shifted = src.join(SHIFT_MARKER).exists();
                    match (has_content && !shifted, shift) {
                        (false, _) => {}
                        (true, VolumeShift::IdMappedBySysbox) => {
                            notes.push(format!(
                                "{} has content owned by root: left as it is, sysbox ID-maps it into the workspace",
                                src.display()
                            ));
                            continue;
                        }
                        (true, VolumeShift::Shift) => {
                            let n = shift_tree(kernel, src, md.dev()).map_err(io(src))?;
                            kernel
                                .write_file(&src.join(SHIFT_MARKER), b"")
                                .map_err(io(src))?;
                            notes.push(format!(
                                "{} had content owned by root (written through an ID-mapped mount, as by the Go envbox) and no ID-mapped mount to show it inside: shifted {n} entries by {ID_MAP_HOST_START}, once (marked by {SHIFT_MARKER})",
                                src.display()
                            ));
                        }
                    }
                    // The top directory last: a shift cut short is resumed at the next start.
                    kernel
                        .chown(src, ID_MAP_HOST_START, ID_MAP_HOST_START)
                        .map_err(io(src))?;
                }
            }
            (_, Err(_)) => return Err(MountError::MissingSource(src.clone())),
            (Ownership::Keep, Ok(_)) => {}
            (Ownership::Chown { uid, gid }, Ok(md)) => {
                if md.uid() != *uid || md.gid() != *gid {
                    kernel.chown(src, *uid, *gid).map_err(io(src))?;
                }
            }
        }
    }
    Ok((planned.iter().map(|m| m.bind.clone()).collect(), notes))
}

/// Adds 100000 to every owner and group below `top` that is not in the workspace's range yet,
/// depth first, never following symlinks nor leaving `top`'s file system. chown clears setuid and
/// setgid bits, so they are put back. Returns how many entries were changed.
fn shift_tree(kernel: &dyn Kernel, top: &Path, dev: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let shift = |id: u32| {
        if id < ID_MAP_HOST_START {
            id + ID_MAP_HOST_START
        } else {
            id
        }
    };
    let mut changed = 0;
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            let md = std::fs::symlink_metadata(&p)?;
            if md.dev() != dev {
                continue; // a mount point: not this volume's
            }
            if md.is_dir() {
                stack.push(p.clone());
            }
            let (uid, gid) = (shift(md.uid()), shift(md.gid()));
            if (uid, gid) == (md.uid(), md.gid()) {
                continue;
            }
            kernel.chown(&p, uid, gid)?;
            let special = md.mode() & 0o6000;
            if special != 0 && !md.file_type().is_symlink() {
                kernel.chmod(&p, md.mode() & 0o7777)?;
            }
            changed += 1;
        }
    }
    Ok(changed)
}

/// Read-only sources are left as they are (see the module comment), so their files keep their owner
/// on disk, and one outside the workspace's id range shows as `nobody` inside. The Go envbox hid
/// that by chowning the source to 100000; here the build log says it, once per such mount, with
/// what to do. (An id-mapped bind would fix it where kernel and filesystem allow; not done yet.)
pub fn read_only_owner_notes(user_mounts: &[MountSpec]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let range = ID_MAP_HOST_START..ID_MAP_HOST_START + crate::bundle::spec::ID_MAP_SIZE;
    user_mounts
        .iter()
        .filter(|m| m.read_only)
        .filter_map(|m| {
            let md = std::fs::metadata(&m.source).ok()?;
            (!range.contains(&md.uid())).then(|| {
                format!(
                    "Read-only mount {} -> {}: its files appear as nobody inside (owner uid {} is outside \
                     the workspace's ids {}-{}); envbox leaves read-only sources untouched. To own them \
                     inside, give them owner 100000+uid on the volume",
                    m.source.display(),
                    m.target.display(),
                    md.uid(),
                    range.start,
                    range.end - 1
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, RecordingKernel};

    fn coder() -> UserInfo {
        UserInfo {
            name: "coder".into(),
            uid: 1000,
            gid: 1001,
            home: "/home/coder".into(),
            shell: "/bin/sh".into(),
            group: None,
            additional_gids: Vec::new(),
        }
    }

    fn m(s: &str, t: &str, ro: bool) -> MountSpec {
        MountSpec {
            source: s.into(),
            target: t.into(),
            read_only: ro,
        }
    }

    #[test]
    fn ownership_rules() {
        let p = plan(
            &coder(),
            &[
                m("/home/coder", "/home/coder", false),
                m("/var/secrets", "/var/secrets", true),
                m("/data", "/data", false),
                m("/node/modules", "/lib/modules", false),
            ],
        );
        let own = |t: &str| {
            p.iter()
                .find(|x| x.bind.target == Path::new(t))
                .unwrap()
                .ownership
                .clone()
        };
        assert_eq!(
            own("/home/coder"),
            Ownership::Chown {
                uid: 101000,
                gid: 101001
            }
        );
        assert_eq!(own("/var/secrets"), Ownership::Keep);
        assert_eq!(
            own("/data"),
            Ownership::Chown {
                uid: 100000,
                gid: 100000
            }
        );
        assert_eq!(own("/lib/modules"), Ownership::Keep);
        assert_eq!(own("/var/lib/docker"), Ownership::DefaultVolume);
    }

    #[test]
    fn user_mount_replaces_default_and_parents_come_first() {
        let p = plan(
            &coder(),
            &[
                m("/x/deep", "/home/coder/deep", false),
                m("/v/docker", "/var/lib/docker", false),
                m("/home/coder", "/home/coder", false),
            ],
        );
        let targets: Vec<_> = p
            .iter()
            .map(|x| x.bind.target.display().to_string())
            .collect();
        assert_eq!(
            targets.iter().filter(|t| *t == "/var/lib/docker").count(),
            1
        );
        let home = targets.iter().position(|t| t == "/home/coder").unwrap();
        let deep = targets
            .iter()
            .position(|t| t == "/home/coder/deep")
            .unwrap();
        assert!(home < deep);
    }

    #[test]
    fn missing_source_is_an_error_and_defaults_are_created() {
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = prepare(
            &k,
            &plan(&coder(), &[m(missing.to_str().unwrap(), "/data", false)]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let fresh = dir.path().join("docker");
        let planned = vec![PlannedMount {
            bind: BindMount {
                source: fresh.clone(),
                target: "/var/lib/docker".into(),
                read_only: false,
            },
            ownership: Ownership::DefaultVolume,
            is_default: true,
        }];
        prepare(&k, &planned).unwrap();
        let calls = k.calls();
        assert!(calls.contains(&Call::Mkdir(fresh.clone())));
        assert!(calls.contains(&Call::Chown {
            path: fresh.clone(),
            uid: 100000,
            gid: 100000
        }));
    }

    fn default_volume(src: &Path) -> Vec<PlannedMount> {
        vec![PlannedMount {
            bind: BindMount {
                source: src.into(),
                target: "/var/lib/docker".into(),
                read_only: false,
            },
            ownership: Ownership::DefaultVolume,
            is_default: true,
        }]
    }

    /// A volume the Go envbox's sysbox wrote through an ID-mapped bind: owned by host root.
    fn go_envbox_volume(dir: &Path) -> PathBuf {
        let v = dir.join("docker");
        std::fs::create_dir_all(v.join("image/overlay2")).unwrap();
        std::fs::write(v.join("image/overlay2/repositories.json"), "{}").unwrap();
        std::os::unix::fs::symlink("image", v.join("link")).unwrap();
        v
    }

    fn chowns(k: &RecordingKernel) -> Vec<(PathBuf, u32)> {
        k.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Chown { path, uid, .. } => Some((path, uid)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_non_empty_root_owned_volume_is_left_to_sysbox_where_it_id_maps_binds() {
        if !rustix::process::geteuid().is_root() {
            return; // the files must be owned by root, as on the volume
        }
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let v = go_envbox_volume(dir.path());
        let (_, notes) =
            prepare_volumes(&k, &default_volume(&v), VolumeShift::IdMappedBySysbox).unwrap();
        assert_eq!(chowns(&k), vec![], "never chowned");
        assert!(notes.iter().any(|n| n.contains("ID-maps")), "{notes:?}");
    }

    #[test]
    fn without_id_mapped_binds_a_non_empty_root_owned_volume_is_shifted_once_recursively() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let v = go_envbox_volume(dir.path());
        let (_, notes) = prepare_volumes(&k, &default_volume(&v), VolumeShift::Shift).unwrap();
        let c = chowns(&k);
        // Every entry, the symlink itself included, by 100000; the top directory last, so an
        // interrupted shift is resumed at the next start.
        for p in [
            "image",
            "image/overlay2",
            "image/overlay2/repositories.json",
            "link",
        ] {
            assert!(c.contains(&(v.join(p), 100000)), "{p} in {c:?}");
        }
        assert_eq!(c.last(), Some(&(v.clone(), 100000)));
        assert!(k
            .calls()
            .iter()
            .any(|x| matches!(x, Call::Write { path, .. } if *path == v.join(SHIFT_MARKER))));
        assert!(notes.iter().any(|n| n.contains("shifted")), "{notes:?}");
        // With the marker there (an earlier start did it), nothing is shifted again.
        std::fs::write(v.join(SHIFT_MARKER), "").unwrap();
        let k = RecordingKernel::default();
        prepare_volumes(&k, &default_volume(&v), VolumeShift::Shift).unwrap();
        assert!(chowns(&k).iter().all(|(p, _)| p == &v), "{:?}", chowns(&k));
    }

    #[test]
    fn an_empty_root_owned_volume_only_has_its_top_directory_handed_over() {
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("docker");
        std::fs::create_dir(&v).unwrap();
        let md = std::fs::metadata(&v).unwrap();
        use std::os::unix::fs::MetadataExt;
        if md.uid() != 0 {
            return;
        }
        prepare_volumes(&k, &default_volume(&v), VolumeShift::Shift).unwrap();
        assert_eq!(chowns(&k), vec![(v, 100000)]);
    }

    #[test]
    fn read_only_sources_owned_outside_the_id_range_get_a_note() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let m = |src: &Path, ro: bool| MountSpec {
            source: src.to_path_buf(),
            target: "/data".into(),
            read_only: ro,
        };
        let uid = std::fs::metadata(&outside).unwrap().uid();
        let in_range = (ID_MAP_HOST_START..ID_MAP_HOST_START + 65_536).contains(&uid);
        let notes = read_only_owner_notes(&[m(&outside, true), m(&outside, false)]);
        // Run as an ordinary user or root, the test's files are owned outside 100000-165535.
        assert!(!in_range);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("nobody") && notes[0].contains("/data"),
            "{}",
            notes[0]
        );
        if rustix::process::geteuid().is_root() {
            rustix::fs::chown(&outside, Some(rustix::fs::Uid::from_raw(101_000)), None).unwrap();
            assert!(read_only_owner_notes(&[m(&outside, true)]).is_empty());
        }
    }

    #[test]
    fn read_only_sources_are_never_touched() {
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        prepare(
            &k,
            &plan(
                &coder(),
                &[m(dir.path().to_str().unwrap(), "/secrets", true)],
            )
            .into_iter()
            .filter(|p| !p.is_default)
            .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(k.calls().is_empty(), "{:?}", k.calls());
    }
}

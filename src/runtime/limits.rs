//! Limits the workspace can read at its own cgroup root under sysbox-runc.
//!
//! sysbox runs the container's init one cgroup below `linux.cgroupsPath`: `syscont-cgroup-root` on
//! cgroup v1 (the delegation boundary it exposes inside), `init.scope` on cgroup v2. It copies the
//! memory limit there but no CPU quota (sysbox#582), so inside, `cpu.cfs_quota_us` reads -1 (v1) or
//! `cpu.max` reads `max` (v2), and JVMs, Go's automaxprocs and `nproc`-sized builds take the whole
//! node. After `create` and before `start`, envbox writes the quota and period into that child. The
//! limit still holds from the parent either way; the copy only makes it visible.
//!
//! The container's cgroup directories come from the runtime's own state (`<root>/<id>/state.json`,
//! `cgroup_paths`, as runc and its fork sysbox-runc write it), not from a guess of the layout. Under
//! runc and crun the init runs in `cgroupsPath` itself, which already has the limits: nothing is done.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::MilliCpus;

/// Only sysbox-runc moves the init below `cgroupsPath`; runc and crun are left alone.
pub fn needs_copy(kind: crate::config::RuntimeKind) -> bool {
    kind == crate::config::RuntimeKind::SysboxRunc
}

/// Where sysbox puts the init below the container's cgroup, per cgroup version.
pub const V1_INIT_CHILD: &str = "syscont-cgroup-root";
pub const V2_INIT_CHILD: &str = "init.scope";

/// The cgroup file system seam: reads and writes of single control files.
pub trait CgroupFiles {
    fn read(&self, path: &Path) -> io::Result<String>;
    fn write(&self, path: &Path, contents: &str) -> io::Result<()>;
}

/// The real cgroup file system.
pub struct RealCgroupFiles;

impl CgroupFiles for RealCgroupFiles {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
    }
    fn write(&self, path: &Path, contents: &str) -> io::Result<()> {
        std::fs::write(path, contents)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("reading the runtime's state {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error("the runtime's state {path} has no usable cgroup_paths ({why}); the workspace's CPU limit holds but reads as unlimited inside")]
    NoPaths { path: PathBuf, why: String },
    #[error("{0}; the workspace's CPU limit holds but reads as unlimited inside")]
    Write(io::Error),
}

/// The container's cgroup directories as the runtime recorded them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerCgroups {
    /// cgroup v1: one directory per controller (the `cpu` one, and the `memory` one).
    V1 {
        cpu: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
    /// cgroup v2 (runc records it under the empty key).
    V2 { dir: PathBuf },
}

/// `cgroup_paths` of a runc-style `state.json`.
pub fn parse_state(path: &Path, text: &str) -> Result<ContainerCgroups, LimitsError> {
    #[derive(serde::Deserialize)]
    struct State {
        #[serde(default)]
        cgroup_paths: BTreeMap<String, PathBuf>,
    }
    let no_paths = |why: String| LimitsError::NoPaths {
        path: path.into(),
        why,
    };
    let st: State = serde_json::from_str(text).map_err(|e| no_paths(e.to_string()))?;
    if let Some(dir) = st.cgroup_paths.get("") {
        return Ok(ContainerCgroups::V2 { dir: dir.clone() });
    }
    let cpu = st.cgroup_paths.get("cpu").cloned();
    let memory = st.cgroup_paths.get("memory").cloned();
    if cpu.is_none() && memory.is_none() {
        return Err(no_paths(format!(
            "neither a cgroup v2 path nor v1 cpu/memory paths among {:?}",
            st.cgroup_paths.keys().collect::<Vec<_>>()
        )));
    }
    Ok(ContainerCgroups::V1 { cpu, memory })
}

/// The runtime's state file for container `id` under its `--root`.
pub fn state_file(runtime_root: &Path, id: &str) -> PathBuf {
    runtime_root.join(id).join("state.json")
}

/// The writes that make `cpus` visible in the init's cgroup, in order (v1: the period first, so the
/// quota is accepted against the period it was computed for).
pub fn cpu_writes(
    cg: &ContainerCgroups,
    cpus: MilliCpus,
    period_us: u64,
) -> Vec<(PathBuf, String)> {
    let quota = cpus.quota(period_us);
    match cg {
        ContainerCgroups::V1 { cpu: Some(dir), .. } => {
            let child = dir.join(V1_INIT_CHILD);
            vec![
                (child.join("cpu.cfs_period_us"), period_us.to_string()),
                (child.join("cpu.cfs_quota_us"), quota.to_string()),
            ]
        }
        ContainerCgroups::V1 { cpu: None, .. } => Vec::new(),
        ContainerCgroups::V2 { dir } => vec![(
            dir.join(V2_INIT_CHILD).join("cpu.max"),
            format!("{quota} {period_us}"),
        )],
    }
}

/// The memory limit the workspace reads at its cgroup root: the file, and how it spells "no limit".
fn memory_file(cg: &ContainerCgroups) -> Option<PathBuf> {
    match cg {
        ContainerCgroups::V1 {
            memory: Some(dir), ..
        } => Some(dir.join(V1_INIT_CHILD).join("memory.limit_in_bytes")),
        ContainerCgroups::V1 { memory: None, .. } => None,
        ContainerCgroups::V2 { dir } => Some(dir.join(V2_INIT_CHILD).join("memory.max")),
    }
}

/// A memory limit as the kernel prints it; None for "no limit" (`max`, or v1's page-rounded
/// maximum, which is far above any real memory size).
fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse::<u64>().ok().filter(|&n| n < (1 << 62))
}

/// What [`copy_limits`] did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub cpu_written: bool,
    /// Set when the workspace does not read `CODER_MEMORY` at its root: what it reads instead.
    pub memory_mismatch: Option<String>,
}

/// Writes the CPU quota into the init's cgroup and checks the memory limit there. `cpus`/`memory`
/// are `CODER_CPUS`/`CODER_MEMORY`; with neither set nothing is read or written.
pub fn copy_limits(
    files: &dyn CgroupFiles,
    state: &Path,
    cpus: Option<MilliCpus>,
    memory: Option<u64>,
    period_us: u64,
) -> Result<Copied, LimitsError> {
    let mut copied = Copied {
        cpu_written: false,
        memory_mismatch: None,
    };
    if cpus.is_none() && memory.is_none() {
        return Ok(copied);
    }
    let text = files.read(state).map_err(|source| LimitsError::State {
        path: state.into(),
        source,
    })?;
    let cg = parse_state(state, &text)?;
    if let Some(c) = cpus.filter(|c| c.0 > 0) {
        for (p, v) in cpu_writes(&cg, c, period_us) {
            files.write(&p, &v).map_err(LimitsError::Write)?;
            copied.cpu_written = true;
        }
    }
    if let (Some(want), Some(file)) = (memory, memory_file(&cg)) {
        let seen = files.read(&file).map(|t| parse_memory(&t));
        match seen {
            Ok(Some(got)) if got == want => {}
            Ok(got) => {
                copied.memory_mismatch = Some(format!(
                    "{} reads {} instead of CODER_MEMORY ({want} bytes); the limit holds from the parent cgroup, but tools inside size themselves to what they read",
                    file.display(),
                    got.map_or("no limit".to_string(), |g| format!("{g} bytes"))
                ))
            }
            Err(e) => copied.memory_mismatch = Some(format!("cannot check the memory limit: {e}")),
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Files in memory; every write recorded in order.
    #[derive(Default)]
    struct FakeCgroupFiles {
        files: Mutex<BTreeMap<PathBuf, String>>,
        writes: Mutex<Vec<(PathBuf, String)>>,
    }

    impl FakeCgroupFiles {
        fn with(files: &[(&str, &str)]) -> Self {
            let f = FakeCgroupFiles::default();
            for (p, c) in files {
                f.files.lock().unwrap().insert(p.into(), c.to_string());
            }
            f
        }
        fn writes(&self) -> Vec<(String, String)> {
            self.writes
                .lock()
                .unwrap()
                .iter()
                .map(|(p, c)| (p.display().to_string(), c.clone()))
                .collect()
        }
    }

    impl CgroupFiles for FakeCgroupFiles {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files
                .lock()
                .unwrap()
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.display().to_string()))
        }
        fn write(&self, path: &Path, contents: &str) -> io::Result<()> {
            self.writes
                .lock()
                .unwrap()
                .push((path.into(), contents.to_string()));
            self.files
                .lock()
                .unwrap()
                .insert(path.into(), contents.to_string());
            Ok(())
        }
    }

    const STATE: &str = "/run/sysbox-runc/ws-1/state.json";

    /// Shaped like sysbox-runc's state.json on a v1 hybrid host (abridged).
    const V1_STATE: &str = r#"{"id":"ws-1","init_process_pid":4242,"cgroup_paths":{
        "cpu":"/sys/fs/cgroup/cpu,cpuacct/ws-1","cpuacct":"/sys/fs/cgroup/cpu,cpuacct/ws-1",
        "memory":"/sys/fs/cgroup/memory/ws-1","pids":"/sys/fs/cgroup/pids/ws-1"},"config":{}}"#;
    const V2_STATE: &str =
        r#"{"id":"ws-1","init_process_pid":4242,"cgroup_paths":{"":"/sys/fs/cgroup/ws-1"}}"#;

    #[test]
    fn v1_the_quota_and_period_go_into_syscont_cgroup_root_and_the_memory_limit_is_checked() {
        let f = FakeCgroupFiles::with(&[
            (STATE, V1_STATE),
            (
                "/sys/fs/cgroup/memory/ws-1/syscont-cgroup-root/memory.limit_in_bytes",
                "2147483648\n",
            ),
        ]);
        let c = copy_limits(
            &f,
            Path::new(STATE),
            Some(MilliCpus(1500)),
            Some(2 << 30),
            100_000,
        )
        .unwrap();
        assert_eq!(
            f.writes(),
            vec![
                (
                    "/sys/fs/cgroup/cpu,cpuacct/ws-1/syscont-cgroup-root/cpu.cfs_period_us".into(),
                    "100000".into()
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct/ws-1/syscont-cgroup-root/cpu.cfs_quota_us".into(),
                    "150000".into()
                ),
            ]
        );
        assert_eq!(
            c,
            Copied {
                cpu_written: true,
                memory_mismatch: None
            }
        );
    }

    #[test]
    fn v2_cpu_max_goes_into_init_scope_and_a_memory_limit_that_reads_max_is_reported() {
        let f = FakeCgroupFiles::with(&[
            (STATE, V2_STATE),
            ("/sys/fs/cgroup/ws-1/init.scope/memory.max", "max\n"),
        ]);
        let c = copy_limits(
            &f,
            Path::new(STATE),
            Some(MilliCpus(500)),
            Some(1 << 30),
            100_000,
        )
        .unwrap();
        assert_eq!(
            f.writes(),
            vec![(
                "/sys/fs/cgroup/ws-1/init.scope/cpu.max".into(),
                "50000 100000".into()
            )]
        );
        let m = c.memory_mismatch.expect("a mismatch");
        assert!(m.contains("no limit") && m.contains("1073741824"), "{m}");
    }

    #[test]
    fn only_sysbox_runc_needs_the_copy() {
        use crate::config::RuntimeKind;
        assert!(needs_copy(RuntimeKind::SysboxRunc));
        assert!(!needs_copy(RuntimeKind::Runc));
        assert!(!needs_copy(RuntimeKind::Crun));
    }

    #[test]
    fn without_limits_nothing_is_read_or_written_and_a_stateless_runtime_is_an_error() {
        let f = FakeCgroupFiles::default();
        let c = copy_limits(&f, Path::new(STATE), None, None, 100_000).unwrap();
        assert!(!c.cpu_written && f.writes().is_empty());
        // Limits set but no state: said, never guessed.
        let e =
            copy_limits(&f, Path::new(STATE), Some(MilliCpus(1000)), None, 100_000).unwrap_err();
        assert!(matches!(e, LimitsError::State { .. }), "{e}");
        let f = FakeCgroupFiles::with(&[(STATE, r#"{"cgroup_paths":{}}"#)]);
        let e =
            copy_limits(&f, Path::new(STATE), Some(MilliCpus(1000)), None, 100_000).unwrap_err();
        assert!(e.to_string().contains("unlimited inside"), "{e}");
        assert!(f.writes().is_empty());
    }
}

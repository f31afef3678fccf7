//! The OCI bundle: `config.json` plus the files and device nodes it refers to.

pub mod devices;
pub mod env;
pub mod gpu;
pub mod mounts;
pub mod spec;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::image::facts::ImageFacts;
use crate::pid1::signals;
use crate::sys::Kernel;
use spec::{BindMount, WorkspaceInit, WorkspaceSpec, ID_MAP_HOST_START, WANTED_NOFILE};

/// Where envbox's own binary appears inside a workspace that uses it as init.
pub const INIT_PATH_INSIDE: &str = "/.envbox/envbox";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Mounts(#[from] mounts::MountError),
    #[error(transparent)]
    Devices(#[from] devices::DeviceError),
    #[error("GPU passthrough (CODER_ADD_GPU): {0}")]
    Gpu(#[from] gpu::GpuError),
}

/// The parts of the image configuration the workspace takes over.
#[derive(Debug, Clone, Default)]
pub struct ImageSettings {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub stop_signal: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub init: WorkspaceInit,
    /// What stops the workspace's PID 1: SIGRTMIN+3 for systemd, else the image's StopSignal.
    pub stop_signal: i32,
    pub env: Vec<String>,
    pub cgroups_path: String,
}

pub struct BundleInput<'a> {
    pub config: &'a Config,
    pub facts: &'a ImageFacts,
    pub image: &'a ImageSettings,
    pub rootfs: &'a Path,
    pub dir: &'a Path,
    pub envbox_binary: &'a Path,
    pub container_id: &'a str,
}

pub fn prepare(kernel: &dyn Kernel, input: &BundleInput) -> Result<Bundle, BundleError> {
    let cfg = input.config;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    kernel.create_dir_all(input.dir).map_err(io(input.dir))?;

    let etc = input.dir.join("etc");
    kernel.create_dir_all(&etc).map_err(io(&etc))?;
    let pod_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let files = [
        ("hosts", "/etc/hosts", hosts_file(cfg)),
        ("resolv.conf", "/etc/resolv.conf", resolv_conf(&pod_resolv)),
        ("hostname", "/etc/hostname", format!("{}\n", cfg.hostname)),
    ];
    let mut binds = Vec::new();
    for (name, inside, content) in files {
        let p = etc.join(name);
        kernel.write_file(&p, content.as_bytes()).map_err(io(&p))?;
        // Owned by the workspace's root, so it can edit them like any container's.
        kernel
            .chown(&p, ID_MAP_HOST_START, ID_MAP_HOST_START)
            .map_err(io(&p))?;
        binds.push(BindMount {
            source: p,
            target: inside.into(),
            read_only: false,
        });
    }

    // The image's /sbin/init is PID 1 whenever it exists, as in the Go envbox, except busybox's:
    // its default inittab starts gettys on consoles the workspace lacks, and it does not stop on the
    // container's stop signal.
    let init = choose_init(input.facts);
    if let WorkspaceInit::Envbox { .. } = init {
        binds.push(BindMount {
            source: input.envbox_binary.to_path_buf(),
            target: INIT_PATH_INSIDE.into(),
            read_only: true,
        });
    }
    let init = match init {
        WorkspaceInit::Envbox { .. } => WorkspaceInit::Envbox {
            path_inside: INIT_PATH_INSIDE.into(),
            // The whole stop must fit CODER_SHUTDOWN_TIMEOUT; a second is left for envbox's own steps.
            grace_secs: cfg.shutdown_timeout.as_secs().saturating_sub(1).max(1),
        },
        other => other,
    };
    let planned = mounts::plan(&input.facts.user, &cfg.mounts);
    let mut all_binds = mounts::prepare(kernel, &planned)?;
    all_binds.extend(binds);

    let devices = devices::prepare(kernel, &input.dir.join("dev"), cfg.add_tun, cfg.add_fuse)?;
    let (mut gpu_devices, mut gpu_env) = (Vec::new(), Vec::new());
    if let (true, Some(lib)) = (cfg.add_gpu, cfg.usr_lib_dir.as_deref()) {
        let inputs = gpu::gather(&gpu::GatherOptions {
            usr_lib_dir: lib,
            inner_usr_lib_dir: cfg.inner_usr_lib_dir.as_deref(),
            os: &input.facts.os,
            reserved_targets: all_binds.iter().map(|b| b.target.clone()).collect(),
        })?;
        let plan = gpu::plan(&inputs)?;
        for w in &plan.warnings {
            log::warn!("GPU: {w}");
        }
        all_binds.extend(plan.binds);
        gpu_devices = plan.devices;
        gpu_env = plan.env;
    }
    let token = cfg
        .agent_token
        .as_ref()
        .map(|t| t.expose())
        .unwrap_or_default();
    let env = env::workspace_env(&input.image.env, token, &cfg.passed_env, &gpu_env);
    let cwd = cfg
        .work_dir
        .clone()
        .or_else(|| {
            input
                .image
                .working_dir
                .clone()
                .filter(|w| w.starts_with('/'))
        })
        .unwrap_or_else(|| "/".into());
    let stop_signal = match init {
        WorkspaceInit::Systemd => signals::sigrtmin_plus_3(),
        WorkspaceInit::Envbox { .. } | WorkspaceInit::Image => input
            .image
            .stop_signal
            .as_deref()
            .and_then(signals::parse_stop_signal)
            .unwrap_or(libc::SIGTERM),
    };
    let cgroups_path = format!("/{}", input.container_id);
    let ws = WorkspaceSpec {
        rootfs: input.rootfs.to_path_buf(),
        hostname: cfg.hostname.clone(),
        init: init.clone(),
        env: env.clone(),
        cwd,
        mounts: all_binds,
        devices,
        gpu_devices,
        cpus: cfg.cpus,
        memory: cfg.memory,
        cgroups_path: cgroups_path.clone(),
        nofile: nofile_limit(),
    };
    let spec = spec::build(&ws)?;
    let path = input.dir.join("config.json");
    write_private_json(&path, &spec).map_err(io(&path))?;
    Ok(Bundle {
        dir: input.dir.to_path_buf(),
        init,
        stop_signal,
        env,
        cgroups_path,
    })
}

/// What runs as the workspace's PID 1 for an image (grace and path of envbox's init are filled in by
/// [`prepare`]).
fn choose_init(facts: &ImageFacts) -> WorkspaceInit {
    use crate::image::facts::SbinInit;
    match &facts.init {
        SbinInit::Systemd => WorkspaceInit::Systemd,
        SbinInit::Other(target) if !is_busybox(target) => WorkspaceInit::Image,
        _ => WorkspaceInit::Envbox {
            path_inside: INIT_PATH_INSIDE.into(),
            grace_secs: 0,
        },
    }
}

fn is_busybox(target: &str) -> bool {
    Path::new(target)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("busybox"))
}

/// The build-log line naming the workspace's init, so that a template author can tell why their
/// services did (not) start.
pub fn init_log_line(facts: &ImageFacts) -> String {
    use crate::image::facts::SbinInit;
    match (&facts.init, choose_init(facts)) {
        (_, WorkspaceInit::Systemd) => "Workspace init: /sbin/init (systemd)".into(),
        (SbinInit::Other(t), WorkspaceInit::Image) if t != "/sbin/init" => {
            format!("Workspace init: /sbin/init (the image's own, {t})")
        }
        (_, WorkspaceInit::Image) => "Workspace init: /sbin/init (the image's own)".into(),
        (SbinInit::Other(t), _) => format!(
            "Workspace init: envbox's: the image's /sbin/init is busybox's ({t}), which would start \
             gettys and does not stop on the container's stop signal"
        ),
        _ => "Workspace init: envbox's (the image has no /sbin/init)".into(),
    }
}

/// systemd needs `/etc/machine-id` to exist: without it, it stays in `starting` for minutes
/// (sysbox.md §10.6). An empty file makes it generate a transient id at boot.
pub const MACHINE_ID: &str = "/etc/machine-id";

/// Whether the workspace needs an empty `/etc/machine-id` added: its init is systemd and the image
/// has none.
pub fn needs_machine_id(facts: &ImageFacts, rootfs: &Path) -> bool {
    facts.init == crate::image::facts::SbinInit::Systemd
        && !crate::image::facts::image_has(rootfs, MACHINE_ID)
}

/// Adds an empty `/etc/machine-id` through the mounted root (so into this start's writable layer)
/// when [`needs_machine_id`]. The image itself is never changed; a failure is only a warning, as
/// systemd still boots, slowly.
pub fn add_machine_id(facts: &ImageFacts, rootfs: &Path) {
    if !needs_machine_id(facts, rootfs) {
        return;
    }
    match create_empty_in_root(rootfs, MACHINE_ID, (ID_MAP_HOST_START, ID_MAP_HOST_START)) {
        Ok(()) => log::info!("the image has no {MACHINE_ID}; added an empty one for systemd"),
        Err(e) => log::warn!(
            "cannot add an empty {MACHINE_ID} for systemd ({e}); it may wait minutes in `starting`"
        ),
    }
}

/// Creates an empty file at `inner` inside `root`, resolving its parent directory inside the root
/// (an image's symlinks cannot lead out of it) and never following or replacing an existing entry.
fn create_empty_in_root(root: &Path, inner: &str, owner: (u32, u32)) -> std::io::Result<()> {
    use rustix::fs::{self as rfs, Gid, Mode, OFlags, ResolveFlags, Uid};
    let inner = Path::new(inner.trim_start_matches('/'));
    let (parent, name) = match (inner.parent(), inner.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(std::io::Error::other(format!(
                "bad path {}",
                inner.display()
            )))
        }
    };
    let root_fd = rfs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let dir = rfs::openat2(
        &root_fd,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?;
    let fd = rfs::openat(
        &dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o444),
    )?;
    rfs::fchown(
        &fd,
        Some(Uid::from_raw(owner.0)),
        Some(Gid::from_raw(owner.1)),
    )?;
    Ok(())
}

/// Writes JSON readable by root only: config.json carries the agent token.
pub fn write_private_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    serde_json::to_writer(&mut f, value).map_err(std::io::Error::other)?;
    f.flush()?;
    std::fs::rename(&tmp, path)
}

/// RLIMIT_NOFILE cannot exceed the pod's hard limit: raising it needs CAP_SYS_RESOURCE in the initial
/// user namespace, which the workspace never has.
fn nofile_limit() -> u64 {
    match rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum {
        Some(hard) if hard < WANTED_NOFILE => {
            log::info!("RLIMIT_NOFILE for the workspace is {hard}, the pod's hard limit (dockerd would use {WANTED_NOFILE})");
            hard
        }
        _ => WANTED_NOFILE,
    }
}

pub fn hosts_file(cfg: &Config) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n{}\thost.docker.internal\n",
        cfg.bridge.workspace_addr, cfg.hostname, cfg.bridge.pod_addr
    )
}

/// The pod's resolver configuration without loopback nameservers, which would point at the
/// workspace's own loopback.
pub fn resolv_conf(pod: &str) -> String {
    let mut out = String::new();
    for line in pod.lines() {
        let mut f = line.split_whitespace();
        if f.next() == Some("nameserver") {
            if let Some(addr) = f.next() {
                if addr.starts_with("127.") || addr == "::1" {
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(init: crate::image::facts::SbinInit) -> ImageFacts {
        ImageFacts {
            user: crate::image::facts::UserInfo::default_root(),
            has_init: init != crate::image::facts::SbinInit::Missing,
            init,
            os: Default::default(),
        }
    }

    #[test]
    fn any_sbin_init_but_busybox_is_pid_1() {
        use crate::image::facts::SbinInit;
        assert_eq!(
            choose_init(&facts(SbinInit::Systemd)),
            WorkspaceInit::Systemd
        );
        for own in [
            "/sbin/init",
            "/usr/bin/tini",
            "/package/admin/s6/command/s6-svscan",
        ] {
            assert_eq!(
                choose_init(&facts(SbinInit::Other(own.into()))),
                WorkspaceInit::Image,
                "{own}"
            );
            assert!(init_log_line(&facts(SbinInit::Other(own.into())))
                .starts_with("Workspace init: /sbin/init (the image's own"));
        }
        for envbox in [SbinInit::Missing, SbinInit::Other("/bin/busybox".into())] {
            assert!(matches!(
                choose_init(&facts(envbox.clone())),
                WorkspaceInit::Envbox { .. }
            ));
            assert!(init_log_line(&facts(envbox)).starts_with("Workspace init: envbox's"));
        }
        assert!(init_log_line(&facts(SbinInit::Other("/bin/busybox".into()))).contains("busybox"));
    }

    #[test]
    fn machine_id_only_for_systemd_images_without_one() {
        use crate::image::facts::SbinInit;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        assert!(needs_machine_id(&facts(SbinInit::Systemd), root.path()));
        assert!(!needs_machine_id(&facts(SbinInit::Missing), root.path()));
        assert!(!needs_machine_id(
            &facts(SbinInit::Other("/bin/busybox".into())),
            root.path()
        ));
        std::fs::write(root.path().join("etc/machine-id"), "").unwrap();
        assert!(!needs_machine_id(&facts(SbinInit::Systemd), root.path()));
    }

    #[test]
    fn resolv_conf_drops_loopback_nameservers() {
        let pod = "search svc.cluster.local\nnameserver 127.0.0.53\nnameserver 10.96.0.10\nnameserver ::1\noptions ndots:5\n";
        assert_eq!(
            resolv_conf(pod),
            "search svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }
}

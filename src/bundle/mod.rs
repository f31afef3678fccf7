//! The OCI bundle: `config.json` plus the files and device nodes it refers to.

pub mod devices;
pub mod env;
pub mod gpu;
pub mod mounts;
pub mod spec;

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
    /// What was done to the volumes, for the build log.
    pub notes: Vec<String>,
}

pub struct BundleInput<'a> {
    pub config: &'a Config,
    pub facts: &'a ImageFacts,
    pub image: &'a ImageSettings,
    pub rootfs: &'a Path,
    pub dir: &'a Path,
    pub envbox_binary: &'a Path,
    pub container_id: &'a str,
    /// The workspace init's `oom_score_adj`: the pod's own (see `pod::OomOrder`).
    pub oom_score_adj: i32,
    /// What a root-owned default volume with content needs (see `mounts::VolumeShift`).
    pub volume_shift: mounts::VolumeShift,
}

/// What a bundle will hold, decided from the configuration, the image and the pod's resolver
/// configuration alone: no file is read or written here, so every decision is unit-testable.
#[derive(Debug, Clone)]
pub struct BundlePlan {
    /// Files made in the bundle's `etc/` (name, path inside, content), bound over the image's.
    pub etc_files: Vec<(&'static str, &'static str, String)>,
    pub init: WorkspaceInit,
    /// envbox's own binary, bound in when it is the init.
    pub init_bind: Option<BindMount>,
    pub volumes: Vec<mounts::PlannedMount>,
    pub cwd: String,
    pub stop_signal: i32,
    pub cgroups_path: String,
    /// Said in the pod log (the DNS fallback).
    pub warnings: Vec<String>,
}

pub fn plan(input: &BundleInput, pod_resolv: &str) -> BundlePlan {
    let cfg = input.config;
    let (resolv, notice) = resolv_conf_with_fallback(pod_resolv);
    let etc_files = vec![
        ("hosts", "/etc/hosts", hosts_file(cfg)),
        ("resolv.conf", "/etc/resolv.conf", resolv),
        ("hostname", "/etc/hostname", format!("{}\n", cfg.hostname)),
    ];
    // The image's /sbin/init is PID 1 whenever it exists, as in the Go envbox, except busybox's:
    // its default inittab starts gettys on consoles the workspace lacks, and it does not stop on the
    // container's stop signal.
    let (init, init_bind) = match choose_init(input.facts) {
        WorkspaceInit::Envbox { .. } => (
            WorkspaceInit::Envbox {
                path_inside: INIT_PATH_INSIDE.into(),
                // The whole stop must fit CODER_SHUTDOWN_TIMEOUT; a second is left for envbox's own steps.
                grace_secs: cfg.shutdown_timeout.as_secs().saturating_sub(1).max(1),
            },
            Some(BindMount {
                source: input.envbox_binary.to_path_buf(),
                target: INIT_PATH_INSIDE.into(),
                read_only: true,
            }),
        ),
        other => (other, None),
    };
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
    BundlePlan {
        etc_files,
        init,
        init_bind,
        volumes: mounts::plan(&input.facts.user, &cfg.mounts),
        cwd,
        stop_signal,
        cgroups_path: format!("/{}", input.container_id),
        warnings: notice.into_iter().collect(),
    }
}

/// Plans and applies: the bundle for `input`, with the pod's own `/etc/resolv.conf`.
pub fn prepare(kernel: &dyn Kernel, input: &BundleInput) -> Result<Bundle, BundleError> {
    let pod_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    apply(kernel, input, plan(input, &pod_resolv))
}

/// Makes what `plan` decided: the `etc/` files, the volumes' ownership, the device nodes, the GPU
/// binds (which depend on the node's files), and `config.json`.
pub fn apply(
    kernel: &dyn Kernel,
    input: &BundleInput,
    plan: BundlePlan,
) -> Result<Bundle, BundleError> {
    let cfg = input.config;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    kernel.create_dir_all(input.dir).map_err(io(input.dir))?;
    let etc = input.dir.join("etc");
    kernel.create_dir_all(&etc).map_err(io(&etc))?;
    let mut binds = Vec::new();
    for (name, inside, content) in &plan.etc_files {
        let p = etc.join(name);
        kernel.write_file(&p, content.as_bytes()).map_err(io(&p))?;
        // Owned by the workspace's root, so it can edit them like any container's.
        kernel
            .chown(&p, ID_MAP_HOST_START, ID_MAP_HOST_START)
            .map_err(io(&p))?;
        binds.push(BindMount {
            source: p,
            target: (*inside).into(),
            read_only: false,
        });
    }
    binds.extend(plan.init_bind);
    let (mut all_binds, volume_notes) =
        mounts::prepare_volumes(kernel, &plan.volumes, input.volume_shift)?;
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
        let gpu_plan = gpu::plan(&inputs)?;
        for w in &gpu_plan.warnings {
            log::warn!("GPU: {w}");
        }
        all_binds.extend(gpu_plan.binds);
        gpu_devices = gpu_plan.devices;
        gpu_env = gpu_plan.env;
    }
    let token = cfg
        .agent_token
        .as_ref()
        .map(|t| t.expose())
        .unwrap_or_default();
    let env = env::workspace_env(&input.image.env, token, &cfg.passed_env, &gpu_env);
    let ws = WorkspaceSpec {
        rootfs: input.rootfs.to_path_buf(),
        hostname: cfg.hostname.clone(),
        init: plan.init.clone(),
        env: env.clone(),
        cwd: plan.cwd,
        mounts: all_binds,
        devices,
        gpu_devices,
        cpus: cfg.cpus,
        memory: cfg.memory,
        cgroups_path: plan.cgroups_path.clone(),
        nofile: nofile_limit(),
        oom_score_adj: Some(input.oom_score_adj),
    };
    let spec = spec::build(&ws)?;
    let path = input.dir.join("config.json");
    write_private_json(&path, &spec).map_err(io(&path))?;
    Ok(Bundle {
        dir: input.dir.to_path_buf(),
        init: plan.init,
        stop_signal: plan.stop_signal,
        env,
        cgroups_path: plan.cgroups_path,
        notes: volume_notes,
    })
}

/// What runs as the workspace's PID 1 for an image (grace and path of envbox's init are filled in by
/// [`plan`]).
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
/// Returns whether it added one.
pub fn add_machine_id(facts: &ImageFacts, rootfs: &Path) -> bool {
    if !needs_machine_id(facts, rootfs) {
        return false;
    }
    match create_empty_in_root(rootfs, MACHINE_ID, (ID_MAP_HOST_START, ID_MAP_HOST_START)) {
        Ok(()) => {
            log::info!("the image has no {MACHINE_ID}; added an empty one for systemd");
            true
        }
        Err(e) => {
            log::warn!(
                "cannot add an empty {MACHINE_ID} for systemd ({e}); it may wait minutes in `starting`"
            );
            false
        }
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
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let dir = crate::image::durable::parent_of(path);
    crate::image::durable::atomic_write(&dir, path, &bytes)
}

/// RLIMIT_NOFILE cannot exceed the pod's hard limit: raising it needs CAP_SYS_RESOURCE in the initial
/// user namespace, which the workspace never has. A privileged pod's envbox has it, so it first raises
/// its own hard limit (engines give pods 1024–4096, and systemd's dbus-daemon then fails to raise its
/// own and the workspace boots degraded); without the capability the pod's limit stays.
fn nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    if current.maximum.is_some_and(|hard| hard < WANTED_NOFILE) {
        let raised = Rlimit {
            current: current.current,
            maximum: Some(WANTED_NOFILE),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            log::debug!("raising envbox's RLIMIT_NOFILE to {WANTED_NOFILE}: {e}");
        }
    }
    match getrlimit(Resource::Nofile).maximum {
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

/// What dockerd gives a container whose host has no usable nameserver (libnetwork's IPv4 defaults).
pub const FALLBACK_NAMESERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// [`resolv_conf`], and when no nameserver is left (the pod has only a loopback stub such as
/// systemd-resolved's 127.0.0.53, or none at all) dockerd's public fallback servers are added, with a
/// notice to say so: a workspace without DNS fails in ways that do not point at the cause.
pub fn resolv_conf_with_fallback(pod: &str) -> (String, Option<String>) {
    let mut conf = resolv_conf(pod);
    let has_nameserver = conf
        .lines()
        .any(|l| l.split_whitespace().next() == Some("nameserver"));
    if has_nameserver {
        return (conf, None);
    }
    let dropped: Vec<&str> = pod
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver")).then(|| f.next()).flatten()
        })
        .collect();
    for ns in FALLBACK_NAMESERVERS {
        conf.push_str(&format!("nameserver {ns}\n"));
    }
    let why = if dropped.is_empty() {
        "the pod's /etc/resolv.conf has no nameserver".to_string()
    } else {
        format!(
            "the pod's /etc/resolv.conf has only loopback nameservers ({}), which the workspace cannot reach",
            dropped.join(", ")
        )
    };
    let notice = format!(
        "{why}; the workspace uses {} instead, as Docker does. Set the pod's dnsPolicy/dnsConfig to give it a reachable resolver",
        FALLBACK_NAMESERVERS.join(" and ")
    );
    (conf, Some(notice))
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

    fn config(work_dir: Option<&str>) -> Config {
        use crate::cli::{DockerArgs, ImageArgs};
        use std::os::unix::fs::PermissionsExt;
        // Configuration checks that the runtime is an executable named like one.
        let bin = tempfile::tempdir().unwrap();
        let runc = bin.path().join("runc");
        std::fs::write(&runc, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o755)).unwrap();
        Config::from_args(&DockerArgs {
            image: ImageArgs {
                image: Some("busybox".into()),
                ..Default::default()
            },
            runtime: Some(runc.display().to_string()),
            work_dir: work_dir.map(String::from),
            ..Default::default()
        })
        .unwrap()
    }

    fn input<'a>(
        cfg: &'a Config,
        facts: &'a ImageFacts,
        image: &'a ImageSettings,
    ) -> BundleInput<'a> {
        BundleInput {
            config: cfg,
            facts,
            image,
            rootfs: Path::new("/state/rootfs"),
            dir: Path::new("/state/bundle"),
            envbox_binary: Path::new("/envbox"),
            container_id: "ws-1",
            oom_score_adj: 0,
            volume_shift: mounts::VolumeShift::Shift,
        }
    }

    #[test]
    fn the_plan_picks_the_init_stop_signal_and_working_directory_without_touching_anything() {
        use crate::image::facts::SbinInit;
        let image = ImageSettings {
            working_dir: Some("relative".into()),
            stop_signal: Some("SIGQUIT".into()),
            ..Default::default()
        };
        let cfg = config(None);
        let f = facts(SbinInit::Missing);
        let p = plan(&input(&cfg, &f, &image), "nameserver 10.0.0.10\n");
        assert!(matches!(p.init, WorkspaceInit::Envbox { .. }));
        assert_eq!(p.init_bind.as_ref().unwrap().source, Path::new("/envbox"));
        assert_eq!(p.stop_signal, libc::SIGQUIT);
        // A relative WorkingDir is not a directory the runtime can use.
        assert_eq!(p.cwd, "/");
        assert_eq!(p.cgroups_path, "/ws-1");
        assert!(p.warnings.is_empty());

        let cfg = config(Some("/work"));
        let f = facts(SbinInit::Systemd);
        let p = plan(&input(&cfg, &f, &image), "nameserver 127.0.0.53\n");
        assert_eq!(p.init, WorkspaceInit::Systemd);
        assert!(p.init_bind.is_none());
        assert_eq!(p.stop_signal, signals::sigrtmin_plus_3());
        assert_eq!(p.cwd, "/work");
        assert_eq!(p.warnings.len(), 1, "the DNS fallback is said once");
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
    fn resolv_conf_without_a_usable_nameserver_falls_back_as_dockerd_does() {
        // systemd-resolved's stub only: unreachable from the workspace's own loopback.
        let (conf, notice) = resolv_conf_with_fallback(
            "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n",
        );
        assert_eq!(
            conf,
            "options edns0 trust-ad\nsearch corp.example\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        let notice = notice.expect("a fallback is said");
        assert!(
            notice.contains("8.8.8.8") && notice.contains("127.0.0.53"),
            "{notice}"
        );
        // Nothing at all (an empty or missing file).
        let (conf, notice) = resolv_conf_with_fallback("");
        assert_eq!(conf, "nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
        assert!(notice.is_some());
        // A usable one: kept as it is, nothing said.
        let (conf, notice) =
            resolv_conf_with_fallback("nameserver 127.0.0.53\nnameserver 10.96.0.10\n");
        assert_eq!(conf, "nameserver 10.96.0.10\n");
        assert_eq!(notice, None);
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

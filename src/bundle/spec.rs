//! `config.json` for the workspace, built with oci-spec's builders.
//!
//! The spec is the same for sysbox-runc and for runc/crun: a user namespace mapping container 0 to host
//! 100000 over 65536 ids (the Go envbox's `--userns-remap=coder` range, so existing volumes keep their
//! owners), fresh namespaces, the full capability set inside that user namespace (dockerd needs it),
//! and `noNewPrivileges` false so `sudo` works.

use std::path::PathBuf;
use std::str::FromStr;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxDeviceType, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::bundle::gpu::GpuDevice;
use crate::config::MilliCpus;
use crate::sys::NodeKind;

pub const ID_MAP_HOST_START: u32 = 100_000;
pub const ID_MAP_SIZE: u32 = 65_536;
pub const CPU_PERIOD_US: u64 = 100_000;
/// dockerd's default for containers; clamped to the pod's hard limit, which cannot be raised from
/// inside a user namespace.
pub const WANTED_NOFILE: u64 = 1_048_576;

/// Every capability the kernel knows as of 5.9; granted inside the workspace's user namespace only.
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("building config.json: {0}")]
    Build(#[from] oci_spec::OciSpecError),
    #[error("unknown capability {0}")]
    Capability(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the workspace.
    pub path: &'static str,
    pub major: i64,
    pub minor: i64,
}

/// A device node made by envbox in the pod and bind-mounted into the workspace. Runtimes cannot create
/// nodes inside a user namespace (they would bind the pod's own `/dev` path, whose owner shows as
/// `nobody` inside); ours is owned by the workspace's root and allowed in the device cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBind {
    pub node: DeviceNode,
    pub host_path: PathBuf,
}

pub const TUN: DeviceNode = DeviceNode {
    path: "/dev/net/tun",
    major: 10,
    minor: 200,
};
pub const FUSE: DeviceNode = DeviceNode {
    path: "/dev/fuse",
    major: 10,
    minor: 229,
};

/// What runs as the workspace's PID 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkspaceInit {
    /// The image's systemd; sysbox recognises it only by this exact `args[0]`.
    Systemd,
    /// The image's own `/sbin/init` that is not systemd (s6-overlay, tini, openrc, a script): the Go
    /// envbox ran it as PID 1, and such images depend on it to start their services.
    Image,
    /// envbox's own reaper, bind-mounted read-only at this path inside the workspace.
    /// `grace`: how long it lets the workspace's processes finish after forwarding a stop signal.
    Envbox {
        path_inside: String,
        grace_secs: u64,
    },
}

impl WorkspaceInit {
    pub fn args(&self) -> Vec<String> {
        match self {
            WorkspaceInit::Systemd | WorkspaceInit::Image => vec!["/sbin/init".into()],
            WorkspaceInit::Envbox {
                path_inside,
                grace_secs,
            } => vec![
                path_inside.clone(),
                "init".into(),
                "--grace".into(),
                grace_secs.to_string(),
            ],
        }
    }
}

#[derive(Debug, Clone)]
pub struct WorkspaceSpec {
    pub rootfs: PathBuf,
    pub hostname: String,
    pub init: WorkspaceInit,
    pub env: Vec<String>,
    pub cwd: String,
    pub mounts: Vec<BindMount>,
    pub devices: Vec<DeviceBind>,
    /// NVIDIA nodes (CODER_ADD_GPU), bound from the pod's own nodes.
    pub gpu_devices: Vec<GpuDevice>,
    pub cpus: Option<MilliCpus>,
    pub memory: Option<u64>,
    pub cgroups_path: String,
    pub nofile: u64,
    /// `process.oomScoreAdj`; None inherits the runtime's (envbox's) value.
    pub oom_score_adj: Option<i32>,
}

pub fn capabilities() -> Result<std::collections::HashSet<Capability>, SpecError> {
    ALL_CAPABILITIES
        .iter()
        .map(|c| {
            Capability::from_str(c.trim_start_matches("CAP_"))
                .map_err(|_| SpecError::Capability(c.to_string()))
        })
        .collect()
}

fn mount(dest: &str, typ: &str, source: &str, opts: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()?)
}

fn system_mounts(systemd: bool) -> Result<Vec<Mount>, SpecError> {
    let mut m = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev"])?,
        // Writable, so the inner dockerd and systemd can create their cgroups (delegated by chown).
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime"],
        )?,
    ];
    if systemd {
        // systemd mounts debugfs and tracefs at boot, which a user namespace may not: the units fail
        // and the workspace comes up "degraded". An empty read-only tmpfs already mounted there makes
        // systemd see the units as active and leave them alone.
        for dir in ["/sys/kernel/debug", "/sys/kernel/tracing"] {
            m.push(mount(
                dir,
                "tmpfs",
                "tmpfs",
                &["ro", "nosuid", "nodev", "noexec", "size=4k"],
            )?);
        }
        // systemd expects tmpfs on /run and /run/lock, as sysbox would add for it.
        m.push(mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=755", "size=65536k"],
        )?);
        m.push(mount(
            "/run/lock",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "noexec", "size=5120k"],
        )?);
    }
    Ok(m)
}

pub fn build(ws: &WorkspaceSpec) -> Result<Spec, SpecError> {
    let caps = capabilities()?;
    let systemd = ws.init == WorkspaceInit::Systemd;
    let mut env = ws.env.clone();
    if systemd && !env.iter().any(|e| e.starts_with("container=")) {
        // Tells systemd it runs in a container (it then skips hardware units).
        env.push("container=envbox".into());
    }
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(ws.init.args())
        .env(env)
        .cwd(ws.cwd.clone())
        .no_new_privileges(false)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .build()?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(ws.nofile)
            .soft(ws.nofile)
            .build()?])
        .build()?;
    process.set_oom_score_adj(ws.oom_score_adj);

    let mut mounts = system_mounts(systemd)?;
    for b in &ws.mounts {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if b.read_only { "ro" } else { "rw" });
        mounts.push(
            MountBuilder::default()
                .destination(&b.target)
                .typ("bind")
                .source(&b.source)
                .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()?,
        );
    }

    let id_map = |_| {
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(ID_MAP_HOST_START)
            .size(ID_MAP_SIZE)
            .build()
    };
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::User,
    ]
    .into_iter()
    .map(|t| LinuxNamespaceBuilder::default().typ(t).build())
    .collect::<Result<Vec<_>, _>>()?;

    let mut resources = LinuxResourcesBuilder::default();
    let mut device_rules = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    // The defaults every container gets (null, zero, full, random, urandom, tty, console, ptmx, pts).
    for (typ, major, minor) in [
        (LinuxDeviceType::C, Some(1), Some(3)),
        (LinuxDeviceType::C, Some(1), Some(5)),
        (LinuxDeviceType::C, Some(1), Some(7)),
        (LinuxDeviceType::C, Some(1), Some(8)),
        (LinuxDeviceType::C, Some(1), Some(9)),
        (LinuxDeviceType::C, Some(5), Some(0)),
        (LinuxDeviceType::C, Some(5), Some(1)),
        (LinuxDeviceType::C, Some(5), Some(2)),
        (LinuxDeviceType::C, Some(136), None),
    ] {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(typ)
            .access("rwm");
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        device_rules.push(b.build()?);
    }
    for d in &ws.devices {
        device_rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(d.node.major)
                .minor(d.node.minor)
                .access("rwm")
                .build()?,
        );
        mounts.push(
            MountBuilder::default()
                .destination(d.node.path)
                .typ("bind")
                .source(&d.host_path)
                .options(vec!["bind".to_string(), "rw".to_string()])
                .build()?,
        );
    }
    for d in &ws.gpu_devices {
        device_rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(match d.kind {
                    NodeKind::Char => LinuxDeviceType::C,
                    NodeKind::Block => LinuxDeviceType::B,
                })
                .major(d.major)
                .minor(d.minor)
                .access("rwm")
                .build()?,
        );
        mounts.push(
            MountBuilder::default()
                .destination(&d.path)
                .typ("bind")
                .source(&d.source)
                .options(vec!["bind".to_string(), "rw".to_string()])
                .build()?,
        );
    }
    resources = resources.devices(device_rules);
    if let Some(c) = ws.cpus {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .period(CPU_PERIOD_US)
                .quota(c.quota(CPU_PERIOD_US) as i64)
                .build()?,
        );
    }
    if let Some(m) = ws.memory {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(m as i64).build()?);
    }

    let linux = LinuxBuilder::default()
        .uid_mappings(vec![id_map(())?])
        .gid_mappings(vec![id_map(())?])
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(&ws.cgroups_path))
        .resources(resources.build()?)
        // oci-spec's default makes /proc/sys read-only, where the inner dockerd must enable IP
        // forwarding in its own network namespace; these are the paths Docker keeps read-only.
        .readonly_paths(
            ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"]
                .map(String::from)
                .to_vec(),
        )
        .masked_paths(
            [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>(),
        )
        .build()?;

    Ok(SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(&ws.rootfs)
                .readonly(false)
                .build()?,
        )
        .hostname(ws.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkspaceSpec {
        WorkspaceSpec {
            rootfs: "/state/rootfs".into(),
            hostname: "ws".into(),
            init: WorkspaceInit::Envbox {
                path_inside: "/.envbox/envbox".into(),
                grace_secs: 24,
            },
            env: vec!["PATH=/bin".into(), "CODER_AGENT_TOKEN=t".into()],
            cwd: "/".into(),
            mounts: vec![BindMount {
                source: "/home/coder".into(),
                target: "/home/coder".into(),
                read_only: true,
            }],
            devices: vec![
                DeviceBind {
                    node: TUN,
                    host_path: "/state/dev/tun".into(),
                },
                DeviceBind {
                    node: FUSE,
                    host_path: "/state/dev/fuse".into(),
                },
            ],
            gpu_devices: vec![GpuDevice {
                path: "/dev/nvidia0".into(),
                source: "/dev/nvidia0".into(),
                kind: NodeKind::Char,
                major: 195,
                minor: 0,
            }],
            cpus: Some(MilliCpus(1500)),
            memory: Some(1 << 30),
            cgroups_path: "/envbox/ws-1".into(),
            nofile: 20000,
            oom_score_adj: Some(500),
        }
    }

    #[test]
    fn spec_has_userns_mapping_namespaces_and_sudo() {
        let spec = build(&sample()).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            v["linux"]["uidMappings"],
            serde_json::json!([{"containerID":0,"hostID":100000,"size":65536}])
        );
        assert_eq!(v["linux"]["gidMappings"], v["linux"]["uidMappings"]);
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for t in ["pid", "network", "ipc", "uts", "mount", "cgroup", "user"] {
            assert!(ns.contains(&t), "{t} in {ns:?}");
        }
        assert_eq!(v["process"]["noNewPrivileges"], false);
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(
            v["process"]["args"],
            serde_json::json!(["/.envbox/envbox", "init", "--grace", "24"])
        );
        assert_eq!(v["process"]["rlimits"][0]["hard"], 20000);
        // The pod's own value: the workspace is where the memory is, so it goes first.
        assert_eq!(v["process"]["oomScoreAdj"], 500);
        assert_eq!(v["hostname"], "ws");
        assert_eq!(v["root"]["readonly"], false);
        let ro = v["linux"]["readonlyPaths"].as_array().unwrap();
        assert!(
            !ro.iter().any(|p| p == "/proc/sys"),
            "dockerd needs /proc/sys: {ro:?}"
        );
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), ALL_CAPABILITIES.len());
        assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
    }

    #[test]
    fn limits_devices_and_mounts() {
        let v = serde_json::to_value(build(&sample()).unwrap()).unwrap();
        assert_eq!(v["linux"]["resources"]["cpu"]["period"], 100000);
        assert_eq!(v["linux"]["resources"]["cpu"]["quota"], 150000);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 1073741824);
        assert!(
            v["linux"]["devices"].is_null(),
            "nodes are bound, not created by the runtime"
        );
        let rules = v["linux"]["resources"]["devices"].as_array().unwrap();
        assert!(rules
            .iter()
            .any(|r| r["major"] == 195 && r["minor"] == 0 && r["allow"] == true));
        assert!(v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/dev/nvidia0"));
        assert!(rules
            .iter()
            .any(|r| r["major"] == 10 && r["minor"] == 200 && r["allow"] == true));
        let m = v["mounts"].as_array().unwrap();
        let home = m
            .iter()
            .find(|m| m["destination"] == "/home/coder")
            .unwrap();
        assert!(home["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro"));
        let tun = m
            .iter()
            .find(|m| m["destination"] == "/dev/net/tun")
            .unwrap();
        assert_eq!(tun["source"], "/state/dev/tun");
        assert!(!tun["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "nodev"));
    }

    #[test]
    fn an_image_init_is_run_as_is_without_systemd_extras() {
        let mut ws = sample();
        ws.init = WorkspaceInit::Image;
        let v = serde_json::to_value(build(&ws).unwrap()).unwrap();
        assert_eq!(v["process"]["args"], serde_json::json!(["/sbin/init"]));
        assert!(!v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "container=envbox"));
    }

    #[test]
    fn systemd_gets_its_args_env_and_run_tmpfs() {
        let mut ws = sample();
        ws.init = WorkspaceInit::Systemd;
        let v = serde_json::to_value(build(&ws).unwrap()).unwrap();
        assert_eq!(v["process"]["args"], serde_json::json!(["/sbin/init"]));
        assert!(v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "container=envbox"));
        assert!(v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["destination"] == "/run/lock"));
    }
}

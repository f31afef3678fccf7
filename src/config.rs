//! Validated configuration. Every input is checked here, before envbox touches anything, so a typo in a
//! template fails in milliseconds with one line that names the variable (exit status 2) instead of
//! minutes later, after daemons were started (the Go envbox's behaviour).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{DockerArgs, ImageArgs};
use crate::secrets::Secret;

mod parse;
use parse::{
    optional_abs_path, parse_cache_max_size, parse_cpus, parse_env_filters, parse_hostname,
    parse_memory, parse_mounts, parse_persist_rootfs, parse_seconds, parse_url, parse_work_dir,
};
pub use parse::{parse_bool, parse_bridge_cidr, BOOL_FORMS};

pub const DEFAULT_BRIDGE_CIDR: &str = "172.19.0.1/30";
/// On the stock template's PVC (`envbox/docker` sub-path), which the Go envbox used for dockerd's image
/// store: the cache survives pod restarts exactly where images used to.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/docker/envbox";
/// On the stock template's PVC (`envbox/containers` sub-path): disk-backed, never overlayfs or tmpfs.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/containers/envbox";
pub const DEFAULT_DOCKER_CONFIG: &str = "/root/.docker/config.json";
/// Leaves 5 s of Kubernetes' default 30 s grace period for kubelet's own teardown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);
pub const DEFAULT_HOSTNAME: &str = "workspace";
const AGENT_SUBSYSTEM: &str = "CODER_AGENT_SUBSYSTEM";

/// A configuration problem: which variable, what it held (masked for secrets), what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: Option<String>,
    pub expected: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "invalid {}={:?}: {}", self.variable, v, self.expected),
            None => write!(f, "{} is not set: {}", self.variable, self.expected),
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(variable: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        value: Some(value.to_string()),
        expected: expected.into(),
    }
}

/// Like `invalid`, for values that must never be printed.
fn invalid_secret(variable: &'static str, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        value: Some("<redacted>".to_string()),
        expected: expected.into(),
    }
}

/// An empty variable counts as unset, as in the Go envbox.
fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MilliCpus(pub u64);

impl MilliCpus {
    /// CFS quota for a period, rounded up so a limit never becomes zero.
    pub fn quota(self, period_us: u64) -> u64 {
        (self.0 * period_us).div_ceil(1000)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeCidr {
    /// The pod's side of the link; also `host.docker.internal` inside the workspace.
    pub pod_addr: Ipv4Addr,
    pub workspace_addr: Ipv4Addr,
    pub prefix: u8,
}

impl BridgeCidr {
    pub fn network(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.pod_addr) & mask)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvFilter {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    SysboxRunc,
    Runc,
    Crun,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeChoice {
    pub kind: RuntimeKind,
    pub binary: PathBuf,
}

/// Where and how to pull from; shared by `envbox docker` and `envbox pull`.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub reference: String,
    pub pull_secret: Option<Secret>,
    pub docker_config: PathBuf,
    pub extra_certs: Option<PathBuf>,
    pub insecure_registries: Vec<String>,
    pub cache_dir: PathBuf,
    /// `CODER_CACHE_MAX_SIZE` in bytes; `None`: unbounded.
    pub cache_max_size: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub image: ImageConfig,
    pub username: Option<String>,
    pub agent_token: Option<Secret>,
    pub agent_url: Option<String>,
    pub inner_envs: Vec<EnvFilter>,
    /// The pod variables `CODER_INNER_ENVS` selects, read once at start.
    pub passed_env: Vec<(String, String)>,
    pub work_dir: Option<String>,
    pub hostname: String,
    pub bridge: BridgeCidr,
    pub bootstrap_script: Option<Secret>,
    pub mounts: Vec<MountSpec>,
    pub usr_lib_dir: Option<PathBuf>,
    pub inner_usr_lib_dir: Option<PathBuf>,
    pub add_tun: bool,
    pub add_fuse: bool,
    pub add_gpu: bool,
    pub cpus: Option<MilliCpus>,
    pub memory: Option<u64>,
    pub disable_idmapped_mount: bool,
    /// CODER_PERSIST_ROOTFS.
    pub persist_rootfs: crate::image::persist::PersistRootfs,
    pub debug: bool,
    pub runtime: RuntimeChoice,
    pub state_dir: PathBuf,
    pub shutdown_timeout: Duration,
    pub ethlink: String,
    /// Accepted values that do something other than what they seem to (e.g. a `CODER_MOUNTS` option
    /// the Go envbox ignored): logged once at start.
    pub warnings: Vec<String>,
}

impl Config {
    pub fn from_args(a: &DockerArgs) -> Result<Config, ConfigError> {
        let image = ImageConfig::from_args(&a.image, None)?;
        let add_gpu = parse_bool("CODER_ADD_GPU", &a.add_gpu)?;
        let usr_lib_dir = optional_abs_path("CODER_USR_LIB_DIR", &a.usr_lib_dir)?;
        if add_gpu && usr_lib_dir.is_none() {
            return Err(ConfigError {
                variable: "CODER_USR_LIB_DIR",
                value: None,
                expected: "it is required when CODER_ADD_GPU is true: set it to where the node's \
                           library directory is mounted in the pod"
                    .into(),
            });
        }
        let state_dir = optional_abs_path("CODER_STATE_DIR", &a.state_dir)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        check_disk_backed("CODER_STATE_DIR", &state_dir)?;
        let inner_envs = parse_env_filters(&a.inner_envs);
        let pod_env: Vec<(String, String)> = std::env::vars().collect();
        let mut passed_env = crate::bundle::env::select_pod_env(&inner_envs, &pod_env);
        // The Go envbox merged the pod's CODER_AGENT_SUBSYSTEM into the workspace's whether or not
        // CODER_INNER_ENVS named it (`envbox,<theirs>`); the merge itself is in bundle::env.
        if let Some(sub) = pod_env.iter().find(|(k, _)| k == AGENT_SUBSYSTEM) {
            if !passed_env.iter().any(|(k, _)| k == AGENT_SUBSYSTEM) {
                passed_env.push(sub.clone());
            }
        }
        let (mounts, warnings) = parse_mounts(&a.mounts)?;
        if let Some((name, why)) = crate::bundle::env::sysbox_rejects(&passed_env) {
            return Err(invalid("CODER_INNER_ENVS", &name, why));
        }
        Ok(Config {
            username: present(&a.username).map(str::to_string),
            agent_token: present(&a.agent_token).map(Secret::new),
            agent_url: parse_url("CODER_AGENT_URL", &a.agent_url)?,
            inner_envs,
            passed_env,
            work_dir: parse_work_dir(&a.work_dir)?,
            hostname: parse_hostname(&a.hostname)?,
            bridge: parse_bridge_cidr(present(&a.bridge_cidr).unwrap_or(DEFAULT_BRIDGE_CIDR))?,
            bootstrap_script: present(&a.bootstrap_script).map(Secret::new),
            mounts,
            usr_lib_dir,
            inner_usr_lib_dir: optional_abs_path("CODER_INNER_USR_LIB_DIR", &a.inner_usr_lib_dir)?,
            add_tun: parse_bool("CODER_ADD_TUN", &a.add_tun)?,
            add_fuse: parse_bool("CODER_ADD_FUSE", &a.add_fuse)?,
            add_gpu,
            cpus: parse_cpus(&a.cpus)?,
            memory: parse_memory(&a.memory)?,
            disable_idmapped_mount: parse_bool(
                "CODER_DISABLE_IDMAPPED_MOUNT",
                &a.disable_idmapped_mount,
            )?,
            persist_rootfs: parse_persist_rootfs(&a.persist_rootfs)?,
            debug: parse_bool("CODER_DEBUG", &a.debug)?,
            runtime: parse_runtime(&a.runtime)?,
            state_dir,
            shutdown_timeout: parse_seconds("CODER_SHUTDOWN_TIMEOUT", &a.shutdown_timeout)?
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            ethlink: present(&a.ethlink).unwrap_or("eth0").to_string(),
            warnings,
            image,
        })
    }

    /// Every secret value, so output sinks can scrub them even from child output.
    pub fn secrets(&self) -> Vec<&Secret> {
        [
            self.agent_token.as_ref(),
            self.bootstrap_script.as_ref(),
            self.image.pull_secret.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl ImageConfig {
    /// `reference_override` is `envbox pull IMAGE`'s positional argument.
    pub fn from_args(a: &ImageArgs, reference_override: Option<&str>) -> Result<Self, ConfigError> {
        let reference = match reference_override.filter(|s| !s.is_empty()) {
            Some(r) => r.to_string(),
            None => present(&a.image)
                .ok_or(ConfigError {
                    variable: "CODER_INNER_IMAGE",
                    value: None,
                    expected: "set it to the workspace image, e.g. codercom/enterprise-base:ubuntu"
                        .into(),
                })?
                .to_string(),
        };
        validate_reference(&reference)?;
        let pull_secret = present(&a.pull_secret).map(Secret::new);
        // Checked as the pull will read it, so a broken secret is a configuration error (exit 2, nothing
        // created) rather than a failure after the state directory exists.
        if let Some(s) = &pull_secret {
            if let Err(why) = crate::image::auth::check_pull_secret(s.expose()) {
                return Err(invalid_secret("CODER_IMAGE_PULL_SECRET", why));
            }
        }
        let extra_certs = optional_abs_path("CODER_EXTRA_CERTS_PATH", &a.extra_certs_path)?;
        if let Some(p) = &extra_certs {
            if !p.exists() {
                return Err(invalid(
                    "CODER_EXTRA_CERTS_PATH",
                    &p.display().to_string(),
                    "the file or directory does not exist",
                ));
            }
        }
        Ok(ImageConfig {
            reference,
            pull_secret,
            docker_config: present(&a.docker_config)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_CONFIG)),
            extra_certs,
            insecure_registries: present(&a.insecure_registries)
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            cache_dir: optional_abs_path("CODER_CACHE_DIR", &a.cache_dir)?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR)),
            cache_max_size: parse_cache_max_size(&a.cache_max_size)?,
        })
    }
}

fn validate_reference(r: &str) -> Result<(), ConfigError> {
    crate::image::reference::ImageRef::parse(r)
        .map(|_| ())
        .map_err(|e| invalid("CODER_INNER_IMAGE", r, e.to_string()))
}

fn parse_runtime(v: &Option<String>) -> Result<RuntimeChoice, ConfigError> {
    const VAR: &str = "CODER_RUNTIME";
    let name = present(v).unwrap_or("sysbox-runc");
    let binary = if name.contains('/') {
        let p = PathBuf::from(name);
        if !p.is_file() {
            return Err(invalid(
                VAR,
                name,
                "no such file; give sysbox-runc, runc, crun or a path to one of them",
            ));
        }
        p
    } else {
        find_on_path(name).ok_or_else(|| {
            invalid(
                VAR,
                name,
                if name == "sysbox-runc" {
                    "sysbox-runc is not on PATH: use the envbox image that ships sysbox, or set CODER_RUNTIME=runc on machines without sysbox"
                } else {
                    "not found on PATH; give sysbox-runc, runc, crun or a path to one of them"
                },
            )
        })?
    };
    let file = binary
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let kind = if file.starts_with("sysbox-runc") {
        RuntimeKind::SysboxRunc
    } else if file.starts_with("crun") {
        RuntimeKind::Crun
    } else if file.starts_with("runc") {
        RuntimeKind::Runc
    } else {
        return Err(invalid(
            VAR,
            name,
            "cannot tell which runtime this is: the file name must start with sysbox-runc, runc or crun",
        ));
    };
    Ok(RuntimeChoice { kind, binary })
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// A regular file with an execute bit: what PATH lookups accept.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The state directory holds the writable layer and the bundle: overlayfs cannot host an upper dir,
/// and sysbox refuses tmpfs. The nearest existing ancestor tells the filesystem without creating anything.
fn check_disk_backed(var: &'static str, dir: &Path) -> Result<(), ConfigError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => return Ok(()),
        }
    }
    let fs = match crate::sys::fs_kind(probe) {
        Some(k @ (crate::sys::FsKind::Overlay | crate::sys::FsKind::Tmpfs)) => k.name(),
        _ => return Ok(()),
    };
    Err(invalid(
        var,
        &dir.display().to_string(),
        format!(
            "{} is on {fs}; use a disk-backed volume (emptyDir on node disk, hostPath or PVC)",
            probe.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn cache_max_size_reaches_the_image_config() {
        let args = ImageArgs {
            image: s("busybox"),
            cache_max_size: s("1Gi"),
            ..Default::default()
        };
        assert_eq!(
            ImageConfig::from_args(&args, None).unwrap().cache_max_size,
            Some(1 << 30)
        );
    }

    #[test]
    fn secret_is_masked_in_errors() {
        for bad in [
            "not-json-TOPSECRET",
            "[\"TOPSECRET\"]",
            "{}",
            r#"{"auths":{"r.example":{"auth":"!!TOPSECRET"}}}"#,
            // base64 of "TOPSECRET" (no colon)
            r#"{"auths":{"r.example":{"auth":"VE9QU0VDUkVU"}}}"#,
        ] {
            let args = ImageArgs {
                image: s("busybox"),
                pull_secret: s(bad),
                ..Default::default()
            };
            let e = ImageConfig::from_args(&args, None).unwrap_err();
            assert_eq!(e.variable, "CODER_IMAGE_PULL_SECRET", "{bad}");
            let text = e.to_string();
            assert!(
                !text.contains("TOPSECRET") && !text.contains("VE9Q"),
                "{text}"
            );
        }
        let ok = ImageArgs {
            image: s("busybox"),
            // base64 of "u:p"
            pull_secret: s(r#"{"auths":{"r.example":{"auth":"dTpw"}}}"#),
            ..Default::default()
        };
        assert!(ImageConfig::from_args(&ok, None).is_ok());
    }

    #[test]
    fn gpu_requires_lib_dir() {
        let a = DockerArgs {
            image: ImageArgs {
                image: s("busybox"),
                ..Default::default()
            },
            add_gpu: s("true"),
            runtime: s("/bin/sh"),
            ..Default::default()
        };
        assert_eq!(
            Config::from_args(&a).unwrap_err().variable,
            "CODER_USR_LIB_DIR"
        );
    }
}

//! Validated configuration. Every input is checked here, before envbox touches anything, so a typo in a
//! template fails in milliseconds with one line that names the variable (exit status 2) instead of
//! minutes later, after daemons were started (the Go envbox's behaviour).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{DockerArgs, ImageArgs};
use crate::secrets::Secret;

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
    pub debug: bool,
    pub runtime: RuntimeChoice,
    pub state_dir: PathBuf,
    pub shutdown_timeout: Duration,
    pub ethlink: String,
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
        let passed_env = crate::bundle::env::select_pod_env(&inner_envs, &pod_env);
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
            mounts: parse_mounts(&a.mounts)?,
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
            debug: parse_bool("CODER_DEBUG", &a.debug)?,
            runtime: parse_runtime(&a.runtime)?,
            state_dir,
            shutdown_timeout: parse_seconds("CODER_SHUTDOWN_TIMEOUT", &a.shutdown_timeout)?
                .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            ethlink: present(&a.ethlink).unwrap_or("eth0").to_string(),
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
        if let Some(s) = &pull_secret {
            if serde_json::from_str::<serde_json::Value>(s.expose()).is_err() {
                return Err(invalid_secret(
                    "CODER_IMAGE_PULL_SECRET",
                    "expected the JSON content of a .dockerconfigjson secret ({\"auths\":{...}})",
                ));
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

pub fn parse_bool(var: &'static str, v: &Option<String>) -> Result<bool, ConfigError> {
    match present(v) {
        None => Ok(false),
        Some("true") | Some("1") | Some("TRUE") | Some("True") => Ok(true),
        Some("false") | Some("0") | Some("FALSE") | Some("False") => Ok(false),
        Some(other) => Err(invalid(var, other, "expected true, false, 1 or 0")),
    }
}

fn parse_cpus(v: &Option<String>) -> Result<Option<MilliCpus>, ConfigError> {
    const VAR: &str = "CODER_CPUS";
    const EXPECTED: &str =
        "expected a Kubernetes CPU quantity such as 2, 1.5 or 500m (0 = no limit)";
    let Some(s) = present(v) else { return Ok(None) };
    let milli = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>().map_err(|_| invalid(VAR, s, EXPECTED))?
    } else {
        parse_decimal_milli(s).ok_or_else(|| invalid(VAR, s, EXPECTED))?
    };
    Ok((milli > 0).then_some(MilliCpus(milli)))
}

/// "1.5" → 1500; at most three decimals, no sign, no exponent.
fn parse_decimal_milli(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 3 {
        return None;
    }
    let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_milli: u64 = format!("{frac:0<3}").parse().ok()?;
    int.checked_mul(1000)?.checked_add(frac_milli)
}

fn parse_memory(v: &Option<String>) -> Result<Option<u64>, ConfigError> {
    const VAR: &str = "CODER_MEMORY";
    const EXPECTED: &str =
        "expected bytes or a Kubernetes quantity such as 4Gi, 512Mi or 512M (0 = no limit)";
    let Some(s) = present(v) else { return Ok(None) };
    let bytes = parse_byte_quantity(s).ok_or_else(|| invalid(VAR, s, EXPECTED))?;
    Ok((bytes > 0).then_some(bytes))
}

fn parse_cache_max_size(v: &Option<String>) -> Result<Option<u64>, ConfigError> {
    const VAR: &str = "CODER_CACHE_MAX_SIZE";
    const EXPECTED: &str = "expected a size in bytes or a Kubernetes quantity such as 20Gi or \
                            500M, greater than 0 (unset: no limit)";
    let Some(s) = present(v) else { return Ok(None) };
    match parse_byte_quantity(s) {
        Some(n) if n > 0 => Ok(Some(n)),
        _ => Err(invalid(VAR, s, EXPECTED)),
    }
}

/// Bytes, or a Kubernetes quantity with a k/M/G/T or Ki/Mi/Gi/Ti suffix (integers only).
fn parse_byte_quantity(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn parse_seconds(var: &'static str, v: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    let Some(s) = present(v) else { return Ok(None) };
    let digits = s.strip_suffix('s').unwrap_or(s);
    match digits.parse::<u64>() {
        Ok(n) if n > 0 && n <= 3600 => Ok(Some(Duration::from_secs(n))),
        _ => Err(invalid(
            var,
            s,
            "expected whole seconds between 1 and 3600, e.g. 25 or 25s",
        )),
    }
}

pub fn parse_bridge_cidr(s: &str) -> Result<BridgeCidr, ConfigError> {
    const VAR: &str = "CODER_DOCKER_BRIDGE_CIDR";
    const EXPECTED: &str = "expected an IPv4 CIDR with a prefix of at most /30, e.g. 172.19.0.1/30";
    let (addr, prefix) = s.split_once('/').ok_or_else(|| invalid(VAR, s, EXPECTED))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| invalid(VAR, s, EXPECTED))?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid(VAR, s, EXPECTED))?;
    if prefix == 0 || prefix > 30 {
        return Err(invalid(VAR, s, EXPECTED));
    }
    let mask = u32::MAX << (32 - u32::from(prefix));
    let network = u32::from(addr) & mask;
    // Same rule as the Go envbox's `--bip`: the first host address is the pod's side.
    let pod = network + 1;
    let workspace = network + 2;
    Ok(BridgeCidr {
        pod_addr: Ipv4Addr::from(pod),
        workspace_addr: Ipv4Addr::from(workspace),
        prefix,
    })
}

fn parse_mounts(v: &Option<String>) -> Result<Vec<MountSpec>, ConfigError> {
    const VAR: &str = "CODER_MOUNTS";
    let Some(s) = present(v) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        let bad = |why: &str| {
            invalid(
                VAR,
                s,
                format!("{why} in {item:?}; expected comma-separated src:dst[:ro|:rw] with absolute paths"),
            )
        };
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            [_, _, opt] => return Err(bad(&format!("unknown option {opt:?}"))),
            _ => return Err(bad("wrong number of fields")),
        };
        if !src.starts_with('/') || !dst.starts_with('/') {
            return Err(bad("relative path"));
        }
        if dst.split('/').any(|c| c == "..") || src.split('/').any(|c| c == "..") {
            return Err(bad("\"..\" in a path"));
        }
        out.push(MountSpec {
            source: PathBuf::from(src),
            target: PathBuf::from(dst),
            read_only: ro,
        });
    }
    Ok(out)
}

fn parse_env_filters(v: &Option<String>) -> Vec<EnvFilter> {
    let Some(s) = present(v) else {
        return Vec::new();
    };
    let mut out: Vec<EnvFilter> = Vec::new();
    for f in s.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let filter = match f.strip_suffix('*') {
            Some(prefix) => EnvFilter::Prefix(prefix.to_string()),
            None => EnvFilter::Exact(f.to_string()),
        };
        if !out.contains(&filter) {
            out.push(filter);
        }
    }
    out
}

fn parse_hostname(v: &Option<String>) -> Result<String, ConfigError> {
    let Some(h) = present(v) else {
        return Ok(DEFAULT_HOSTNAME.to_string());
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if h.len() > 253 || !h.split('.').all(label_ok) {
        return Err(invalid(
            "CODER_INNER_HOSTNAME",
            h,
            "expected an RFC 1123 host name: letters, digits and '-', dot-separated labels of at most 63 characters",
        ));
    }
    Ok(h.to_string())
}

fn parse_work_dir(v: &Option<String>) -> Result<Option<String>, ConfigError> {
    match present(v) {
        None => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(p.to_string())),
        Some(p) => Err(invalid(
            "CODER_INNER_WORK_DIR",
            p,
            "expected an absolute path inside the workspace",
        )),
    }
}

fn parse_url(var: &'static str, v: &Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(u) = present(v) else { return Ok(None) };
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty() && !host.starts_with('/') && !u.contains(char::is_whitespace) =>
        {
            Ok(Some(u.trim_end_matches('/').to_string()))
        }
        _ => Err(invalid(
            var,
            u,
            "expected an http:// or https:// URL such as https://coder.example.com",
        )),
    }
}

fn optional_abs_path(
    var: &'static str,
    v: &Option<String>,
) -> Result<Option<PathBuf>, ConfigError> {
    match present(v) {
        None => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
        Some(p) => Err(invalid(var, p, "expected an absolute path")),
    }
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
    fn cpus_quantities() {
        assert_eq!(parse_cpus(&s("2")).unwrap(), Some(MilliCpus(2000)));
        assert_eq!(parse_cpus(&s("1.5")).unwrap(), Some(MilliCpus(1500)));
        assert_eq!(parse_cpus(&s("500m")).unwrap(), Some(MilliCpus(500)));
        assert_eq!(parse_cpus(&s("0")).unwrap(), None);
        assert_eq!(parse_cpus(&s("")).unwrap(), None);
        assert_eq!(MilliCpus(1500).quota(100_000), 150_000);
        for bad in ["abc", "-1", "1.2345", "1e3", "m", "1.5m", "."] {
            let e = parse_cpus(&s(bad)).unwrap_err();
            assert_eq!(e.variable, "CODER_CPUS", "{bad}");
        }
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory(&s("4Gi")).unwrap(), Some(4 << 30));
        assert_eq!(parse_memory(&s("512M")).unwrap(), Some(512_000_000));
        assert_eq!(parse_memory(&s("1073741824")).unwrap(), Some(1 << 30));
        for bad in ["12XB", "-5", "Gi", "1.5Gi", "99999999999999999999"] {
            assert!(parse_memory(&s(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_max_size() {
        assert_eq!(parse_cache_max_size(&s("20Gi")).unwrap(), Some(20 << 30));
        assert_eq!(parse_cache_max_size(&s("500M")).unwrap(), Some(500_000_000));
        assert_eq!(parse_cache_max_size(&s("4096")).unwrap(), Some(4096));
        assert_eq!(parse_cache_max_size(&s("")).unwrap(), None);
        assert_eq!(parse_cache_max_size(&None).unwrap(), None);
        for bad in ["0", "lots", "20GB", "-1", "1.5Gi", "99999999999999999999Ti"] {
            let e = parse_cache_max_size(&s(bad)).unwrap_err();
            assert_eq!(e.variable, "CODER_CACHE_MAX_SIZE", "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
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
    fn booleans() {
        assert!(parse_bool("CODER_ADD_TUN", &s("true")).unwrap());
        assert!(parse_bool("CODER_ADD_TUN", &s("1")).unwrap());
        assert!(!parse_bool("CODER_ADD_TUN", &s("0")).unwrap());
        assert!(!parse_bool("CODER_ADD_TUN", &s("")).unwrap());
        let e = parse_bool("CODER_ADD_TUN", &s("yes")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid CODER_ADD_TUN=\"yes\": expected true, false, 1 or 0"
        );
    }

    #[test]
    fn bridge_cidr() {
        let b = parse_bridge_cidr("172.19.0.1/30").unwrap();
        assert_eq!(b.pod_addr, Ipv4Addr::new(172, 19, 0, 1));
        assert_eq!(b.workspace_addr, Ipv4Addr::new(172, 19, 0, 2));
        assert_eq!(b.network(), Ipv4Addr::new(172, 19, 0, 0));
        let b = parse_bridge_cidr("172.31.0.129/30").unwrap();
        assert_eq!(b.pod_addr, Ipv4Addr::new(172, 31, 0, 129));
        let b = parse_bridge_cidr("10.213.0.0/30").unwrap();
        assert_eq!(b.pod_addr, Ipv4Addr::new(10, 213, 0, 1));
        for bad in [
            "10.0.0.0/31",
            "fe80::/64",
            "nonsense",
            "10.0.0.0",
            "10.0.0.0/0",
            "300.1.1.1/24",
        ] {
            assert_eq!(
                parse_bridge_cidr(bad).unwrap_err().variable,
                "CODER_DOCKER_BRIDGE_CIDR"
            );
        }
    }

    #[test]
    fn mounts() {
        let m = parse_mounts(&s("/home/coder:/home/coder,/data:/data:ro,/x:/y:rw")).unwrap();
        assert_eq!(m.len(), 3);
        assert!(m[1].read_only);
        assert!(!m[2].read_only);
        for bad in [
            "relative:/x",
            "/a",
            "/a:/b:rx",
            "/a:b",
            "/a:/b:ro:x",
            "/a/../b:/c",
        ] {
            assert_eq!(
                parse_mounts(&s(bad)).unwrap_err().variable,
                "CODER_MOUNTS",
                "{bad}"
            );
        }
    }

    #[test]
    fn env_filters_dedup() {
        let f = parse_env_filters(&s("FOO, BAR_*,FOO,BAR_*"));
        assert_eq!(
            f,
            vec![
                EnvFilter::Exact("FOO".into()),
                EnvFilter::Prefix("BAR_".into())
            ]
        );
    }

    #[test]
    fn hostname_rules() {
        assert_eq!(parse_hostname(&None).unwrap(), "workspace");
        assert_eq!(parse_hostname(&s("my-ws.dev")).unwrap(), "my-ws.dev");
        assert!(parse_hostname(&s("workspace_cvm")).is_err());
        assert!(parse_hostname(&s("-bad")).is_err());
    }

    #[test]
    fn shutdown_timeout() {
        assert_eq!(
            parse_seconds("X", &s("10")).unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_seconds("X", &s("10s")).unwrap(),
            Some(Duration::from_secs(10))
        );
        assert!(parse_seconds("X", &s("soon")).is_err());
        assert!(parse_seconds("X", &s("0")).is_err());
    }

    #[test]
    fn secret_is_masked_in_errors() {
        let args = ImageArgs {
            image: s("busybox"),
            pull_secret: s("not-json-TOPSECRET"),
            ..Default::default()
        };
        let e = ImageConfig::from_args(&args, None).unwrap_err();
        assert_eq!(e.variable, "CODER_IMAGE_PULL_SECRET");
        assert!(!e.to_string().contains("TOPSECRET"));
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

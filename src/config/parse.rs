//! Parsers of single values, each returning a [`ConfigError`] that names the variable and says what is
//! accepted. Where the Go envbox accepted a form and it worked, it is accepted here too (Go's
//! `strconv.ParseBool` forms, any third `CODER_MOUNTS` token, underscores in host names); where Go
//! silently ignored a bad value, it is still an error.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use super::{invalid, present, BridgeCidr, ConfigError, EnvFilter, MilliCpus, MountSpec};

/// What `strconv.ParseBool` accepts, which is what the Go envbox read its boolean variables with.
pub const BOOL_FORMS: &str = "expected 1, t, T, TRUE, true, True, 0, f, F, FALSE, false or False";

pub fn parse_bool(var: &'static str, v: &Option<String>) -> Result<bool, ConfigError> {
    match present(v) {
        None => Ok(false),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(other) => Err(invalid(var, other, BOOL_FORMS)),
    }
}

pub(super) fn parse_cpus(v: &Option<String>) -> Result<Option<MilliCpus>, ConfigError> {
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

pub(super) fn parse_memory(v: &Option<String>) -> Result<Option<u64>, ConfigError> {
    const VAR: &str = "CODER_MEMORY";
    const EXPECTED: &str =
        "expected bytes or a Kubernetes quantity such as 4Gi, 512Mi or 512M (0 = no limit)";
    let Some(s) = present(v) else { return Ok(None) };
    let bytes = parse_byte_quantity(s).ok_or_else(|| invalid(VAR, s, EXPECTED))?;
    Ok((bytes > 0).then_some(bytes))
}

pub(super) fn parse_cache_max_size(v: &Option<String>) -> Result<Option<u64>, ConfigError> {
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

pub(super) fn parse_seconds(
    var: &'static str,
    v: &Option<String>,
) -> Result<Option<Duration>, ConfigError> {
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

/// `CODER_MOUNTS`, plus a warning for each third token other than `ro`/`rw`: the Go envbox made those
/// read-write without a word, and templates that rely on it (`:z`, `:rx`, `:delegated`) must keep
/// working, but the author should learn that the token does nothing.
pub(super) fn parse_mounts(
    v: &Option<String>,
) -> Result<(Vec<MountSpec>, Vec<String>), ConfigError> {
    const VAR: &str = "CODER_MOUNTS";
    let Some(s) = present(v) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let (mut out, mut warnings) = (Vec::new(), Vec::new());
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
            [src, dst, opt] => {
                warnings.push(format!(
                    "CODER_MOUNTS: option {opt:?} of {item:?} is not ro or rw; the mount is read-write, \
                     as the Go envbox made it (write :ro or :rw to silence this)"
                ));
                (*src, *dst, false)
            }
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
    Ok((out, warnings))
}

pub(super) fn parse_env_filters(v: &Option<String>) -> Vec<EnvFilter> {
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

/// The kernel's limit on a UTS host name (`HOST_NAME_MAX`).
const HOSTNAME_MAX: usize = 64;

/// Docker passed any host name to the kernel, so Coder workspace names with `_` worked in the Go
/// envbox and must here. What the kernel or resolvers cannot take is refused, saying why.
pub(super) fn parse_hostname(v: &Option<String>) -> Result<String, ConfigError> {
    const VAR: &str = "CODER_INNER_HOSTNAME";
    const ACCEPTED: &str = "letters, digits, '-', '_' and '.'";
    let Some(h) = present(v) else {
        return Ok(super::DEFAULT_HOSTNAME.to_string());
    };
    if h.len() > HOSTNAME_MAX {
        return Err(invalid(
            VAR,
            h,
            format!(
                "{} bytes, but the kernel takes host names of at most {HOSTNAME_MAX} bytes",
                h.len()
            ),
        ));
    }
    if let Some(c) = h
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(
            VAR,
            h,
            format!("{c:?} cannot be part of a host name that /etc/hosts and resolvers read; use {ACCEPTED}"),
        ));
    }
    if h.starts_with(['-', '.']) || h.ends_with('-') || h.contains("..") {
        return Err(invalid(
            VAR,
            h,
            format!("a host name cannot start with '-' or '.', end with '-' or have an empty label (\"..\"); use {ACCEPTED}"),
        ));
    }
    Ok(h.to_string())
}

pub(super) fn parse_work_dir(v: &Option<String>) -> Result<Option<String>, ConfigError> {
    match present(v) {
        None => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(p.to_string())),
        Some(p) => Err(invalid(
            "CODER_INNER_WORK_DIR",
            p,
            "a relative path cannot work: the OCI runtime (like Docker for the Go envbox, which \
             refused it at container creation) needs an absolute path inside the workspace, e.g. /home/coder",
        )),
    }
}

/// An http(s) URL; the scheme is matched case-insensitively, as Go's `url.Parse` does.
pub(super) fn parse_url(
    var: &'static str,
    v: &Option<String>,
) -> Result<Option<String>, ConfigError> {
    let Some(u) = present(v) else { return Ok(None) };
    let (scheme, rest) = match u.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => {
            return Err(invalid(
                var,
                u,
                "it has no scheme, so no request can be made (the Go envbox accepted it and then \
                 sent no start-up logs); write it as https://HOST[:PORT][/PATH], e.g. https://coder.example.com",
            ))
        }
    };
    if scheme != "http" && scheme != "https" {
        return Err(invalid(
            var,
            u,
            format!("scheme {scheme:?} cannot carry Coder's API; use https:// (or http://)"),
        ));
    }
    if rest.is_empty() || rest.starts_with('/') || u.contains(char::is_whitespace) {
        return Err(invalid(
            var,
            u,
            "expected a host after the scheme and no spaces, e.g. https://coder.example.com",
        ));
    }
    Ok(Some(format!("{scheme}://{}", rest.trim_end_matches('/'))))
}

pub(super) fn optional_abs_path(
    var: &'static str,
    v: &Option<String>,
) -> Result<Option<PathBuf>, ConfigError> {
    match present(v) {
        None => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(PathBuf::from(p))),
        Some(p) => Err(invalid(var, p, "expected an absolute path")),
    }
}

/// `CODER_PERSIST_ROOTFS`: a boolean, or `keep-on-image-change`.
pub(super) fn parse_persist_rootfs(
    v: &Option<String>,
) -> Result<crate::image::persist::PersistRootfs, ConfigError> {
    use crate::image::persist::PersistRootfs;
    const VAR: &str = "CODER_PERSIST_ROOTFS";
    match present(v) {
        Some("keep-on-image-change") => Ok(PersistRootfs::KeepOnImageChange),
        Some(other) => match parse_bool(VAR, v) {
            Ok(true) => Ok(PersistRootfs::On),
            Ok(false) => Ok(PersistRootfs::Off),
            Err(_) => Err(invalid(
                VAR,
                other,
                format!("{BOOL_FORMS}, or keep-on-image-change"),
            )),
        },
        None => Ok(PersistRootfs::Off),
    }
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
    }

    #[test]
    fn booleans_take_go_parse_bool_forms() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert!(parse_bool("CODER_ADD_TUN", &s(t)).unwrap(), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False", ""] {
            assert!(!parse_bool("CODER_ADD_TUN", &s(f)).unwrap(), "{f}");
        }
        for bad in ["yes", "tRUE", "on", "2"] {
            let e = parse_bool("CODER_ADD_TUN", &s(bad)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("invalid CODER_ADD_TUN=\"{bad}\": {BOOL_FORMS}")
            );
        }
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
        let (m, w) = parse_mounts(&s("/home/coder:/home/coder,/data:/data:ro,/x:/y:rw")).unwrap();
        assert_eq!(m.len(), 3);
        assert!(m[1].read_only);
        assert!(!m[2].read_only);
        assert!(w.is_empty());
        for bad in ["relative:/x", "/a", "/a:b", "/a:/b:ro:x", "/a/../b:/c"] {
            assert_eq!(
                parse_mounts(&s(bad)).unwrap_err().variable,
                "CODER_MOUNTS",
                "{bad}"
            );
        }
    }

    #[test]
    fn other_mount_options_are_read_write_with_a_warning_like_go() {
        let (m, w) = parse_mounts(&s("/a:/b:rx,/c:/d:ro")).unwrap();
        assert!(!m[0].read_only);
        assert!(m[1].read_only);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("\"rx\"") && w[0].contains("read-write"),
            "{}",
            w[0]
        );
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
        // Go passed these through (Coder workspace names, the Go default).
        assert_eq!(
            parse_hostname(&s("workspace_cvm")).unwrap(),
            "workspace_cvm"
        );
        assert_eq!(parse_hostname(&s("Dev_Box-1")).unwrap(), "Dev_Box-1");
        let long = "a".repeat(65);
        assert!(parse_hostname(&s(&long))
            .unwrap_err()
            .to_string()
            .contains("at most 64 bytes"));
        assert!(parse_hostname(&s(&"a".repeat(64))).is_ok());
        for bad in ["-bad", "my host", "a/b", "a..b", ".a"] {
            let e = parse_hostname(&s(bad)).unwrap_err();
            assert_eq!(e.variable, "CODER_INNER_HOSTNAME");
            assert!(e.to_string().contains("'_'"), "{e}");
        }
    }

    #[test]
    fn agent_url_forms() {
        let u = |v: &str| parse_url("CODER_AGENT_URL", &s(v));
        assert_eq!(
            u("HTTPS://coder.example.com/").unwrap().unwrap(),
            "https://coder.example.com"
        );
        assert_eq!(
            u("https://c.example:8443/prefix/").unwrap().unwrap(),
            "https://c.example:8443/prefix"
        );
        assert!(u("coder.example.com")
            .unwrap_err()
            .to_string()
            .contains("no scheme"));
        assert!(u("ftp://x").unwrap_err().to_string().contains("\"ftp\""));
        assert!(u("https:///x").is_err());
    }

    #[test]
    fn work_dir_must_be_absolute_and_says_why() {
        assert_eq!(
            parse_work_dir(&s("/home/coder")).unwrap().as_deref(),
            Some("/home/coder")
        );
        let e = parse_work_dir(&s("project")).unwrap_err().to_string();
        assert!(e.contains("relative path cannot work"), "{e}");
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
}

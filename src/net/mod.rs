//! Workspace networking: a veth pair between the pod and the workspace, NAT in the pod's
//! network namespace, and the MTU decisions that go with it (envbox#167).
//!
//! The workspace's network namespace is created by the OCI runtime and owned by the
//! container's user namespace (so the inner dockerd can create bridges and iptables
//! rules). Between the runtime's `create` and `start`, [`setup`]:
//!
//! 1. removes a stale pod-side link and stale NAT rules left by an earlier, crashed start
//!    in the same pod network namespace;
//! 2. creates a veth pair over netlink (pod side [`LinkPlan::host_ifname`], peer with a
//!    temporary name), both ends with the uplink's MTU, and moves the peer into
//!    `/proc/<pid>/ns/net` (`IFLA_NET_NS_FD`);
//! 3. addresses the pod side and brings it up;
//! 4. from a dedicated thread that `setns(CLONE_NEWNET)`s into the workspace netns (the
//!    thread exits afterwards; the calling thread never changes namespace) renames the
//!    peer to `eth0`, addresses it, sets its MTU, brings it and `lo` up and adds the
//!    default route via the pod side;
//! 5. enables `net.ipv4.ip_forward` in the pod netns and adds MASQUERADE and FORWARD
//!    rules with `iptables -w`, each tagged `-m comment --comment envbox` and only added
//!    when `iptables -C` says it is missing.
//!
//! All kernel access goes through [`NetSys`] / [`LinkOps`] and all `iptables` runs go
//! through [`CommandRunner`], so the sequencing is unit-tested without root.

mod daemon_json;
mod nat;
pub mod netlink;

#[cfg(test)]
mod fake;

use std::fmt;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use daemon_json::{
    inner_docker_daemon_json, write_daemon_json, DaemonJsonDecision, DAEMON_JSON_PATH,
};
pub use netlink::NetlinkRoute;

/// Pod interface whose MTU and route the workspace uses unless `CODER_ETHLINK` says otherwise.
pub const DEFAULT_UPLINK: &str = "eth0";
/// Default name of the pod-side end of the veth pair.
pub const DEFAULT_HOST_IFNAME: &str = "envbox0";
/// Name of the workspace-side end of the veth pair inside the workspace.
pub const WORKSPACE_IFNAME: &str = "eth0";
/// Comment that tags every iptables rule envbox adds (`-m comment --comment envbox`).
pub const RULE_COMMENT: &str = "envbox";
/// Smallest and largest MTU a veth accepts.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;
/// Linux `IFNAMSIZ - 1`.
const MAX_IFNAME_LEN: usize = 15;

const BRIDGE_CIDR_VAR: &str = "CODER_DOCKER_BRIDGE_CIDR";
const ETHLINK_VAR: &str = "CODER_ETHLINK";

/// Errors of the networking module. Every variant names what it was doing and on what.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid workspace network settings: {0}")]
    InvalidPlan(String),
    #[error(
        "pod network interface {ifname:?} not found ({detail}); set {ETHLINK_VAR} (--ethlink) \
         to the pod interface whose MTU the workspace should use"
    )]
    UplinkMissing { ifname: String, detail: String },
    #[error("read the MTU of pod interface {ifname:?} from {path}: {source}")]
    MtuRead {
        ifname: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "MTU of pod interface {ifname:?} (from {path}) is not a usable MTU \
         ({MIN_MTU}-{MAX_MTU}): {value:?}"
    )]
    MtuParse {
        ifname: String,
        path: PathBuf,
        value: String,
    },
    #[error(
        "{BRIDGE_CIDR_VAR} {cidr} overlaps the pod's network {existing} ({source_kind} on \
         {ifname}); set {BRIDGE_CIDR_VAR} to a range the pod does not use"
    )]
    Overlap {
        cidr: Ipv4Cidr,
        existing: Ipv4Cidr,
        source_kind: PodNetSource,
        ifname: String,
    },
    #[error("netlink: {op} {ifname:?}: {source}")]
    Netlink {
        op: String,
        ifname: String,
        source: io::Error,
    },
    #[error("open the network namespace of the workspace (pid {pid}, {path}): {source}")]
    OpenNetns {
        pid: i32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("enter the workspace network namespace: {0}")]
    EnterNetns(io::Error),
    #[error("the thread configuring the workspace network namespace panicked")]
    NetnsThreadPanicked,
    #[error("write {path}: {source}")]
    Sysctl { path: PathBuf, source: io::Error },
    #[error(
        "iptables not found on PATH ({path}); the envbox image must ship iptables \
         (sysbox needs it too)"
    )]
    IptablesMissing { path: String },
    #[error("{argv}: {message}")]
    Iptables { argv: String, message: String },
}

impl NetError {
    pub(crate) fn netlink(op: impl Into<String>, ifname: &str, source: io::Error) -> Self {
        NetError::Netlink {
            op: op.into(),
            ifname: ifname.to_string(),
            source,
        }
    }

    /// The OS error number of a netlink error, if it is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetError::Netlink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Runs a command to completion. envbox implements it with its process supervisor (it is
/// PID 1 and owns `waitpid`, so this module never spawns processes itself).
pub trait CommandRunner {
    /// Runs `argv` (argv[0] is the program, an absolute path here). `Ok(stdout)` when the
    /// command exits 0, otherwise `Err` with a message that includes stderr.
    fn run(&self, argv: &[&str]) -> Result<String, String>;
}

/// An IPv4 network or interface address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        Ipv4Cidr {
            addr,
            prefix: prefix.min(32),
        }
    }

    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Two networks overlap when one contains the other's network address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The same prefix with the host bits cleared.
    pub fn to_network(self) -> Ipv4Cidr {
        Ipv4Cidr::new(self.network(), self.prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a prefix length 0-32"))?;
        Ok(Ipv4Cidr { addr, prefix })
    }
}

/// How the pod and the workspace are wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPlan {
    /// The pod's end of the link (the workspace's default gateway and `host.docker.internal`).
    pub pod_addr: Ipv4Addr,
    /// The workspace's `eth0` address.
    pub workspace_addr: Ipv4Addr,
    /// Prefix length of the link network (from `CODER_DOCKER_BRIDGE_CIDR`).
    pub prefix: u8,
    /// The pod's main interface (`CODER_ETHLINK`, default `eth0`), whose MTU the link takes. NAT is not
    /// limited to it: the workspace's traffic is masqueraded out of every interface but its own link.
    pub uplink: String,
    /// Pod-side veth name (at most 15 bytes), default `envbox0`.
    pub host_ifname: String,
}

impl LinkPlan {
    /// A plan with the default uplink (`eth0`) and pod-side name (`envbox0`).
    pub fn new(pod_addr: Ipv4Addr, workspace_addr: Ipv4Addr, prefix: u8) -> Self {
        LinkPlan {
            pod_addr,
            workspace_addr,
            prefix,
            uplink: DEFAULT_UPLINK.to_string(),
            host_ifname: DEFAULT_HOST_IFNAME.to_string(),
        }
    }

    /// The link network, host bits cleared (e.g. `172.19.0.0/30`).
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr::new(self.pod_addr, self.prefix).to_network()
    }

    /// Name the peer carries between its creation in the pod netns and its rename to
    /// `eth0` in the workspace netns. Derived from `host_ifname` so a stale one is found.
    pub fn temp_peer_name(&self) -> String {
        let mut base: String = self.host_ifname.chars().take(MAX_IFNAME_LEN - 2).collect();
        while base.len() > MAX_IFNAME_LEN - 2 {
            base.pop();
        }
        format!("{base}-p")
    }

    /// Checks everything before any side effect.
    pub fn validate(&self) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::InvalidPlan(m));
        if self.prefix == 0 || self.prefix > 30 {
            return bad(format!(
                "{BRIDGE_CIDR_VAR}: prefix /{} must be between /1 and /30",
                self.prefix
            ));
        }
        let net = self.network();
        for (what, a) in [("pod", self.pod_addr), ("workspace", self.workspace_addr)] {
            if !net.contains(a) {
                return bad(format!("{what} address {a} is outside {net}"));
            }
            if a == net.network() || a == net.broadcast() {
                return bad(format!(
                    "{what} address {a} is the network or broadcast address of {net}"
                ));
            }
        }
        if self.pod_addr == self.workspace_addr {
            return bad(format!(
                "pod and workspace addresses are the same ({})",
                self.pod_addr
            ));
        }
        validate_ifname("uplink interface", &self.uplink)?;
        validate_ifname("pod-side link name", &self.host_ifname)?;
        if self.host_ifname == self.uplink {
            return bad(format!(
                "pod-side link name {:?} is the uplink's name",
                self.host_ifname
            ));
        }
        Ok(())
    }
}

fn validate_ifname(what: &str, name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidPlan(format!(
            "{what} {name:?} is not a valid interface name (1-{MAX_IFNAME_LEN} bytes, no '/', ':' or spaces)"
        )))
    }
}

fn validate_mtu(mtu: u32) -> Result<(), NetError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(NetError::InvalidPlan(format!(
            "MTU {mtu} is outside {MIN_MTU}-{MAX_MTU}"
        )))
    }
}

// ---------------------------------------------------------------------------------------
// MTU

/// The MTU of a pod interface, asked over netlink in the caller's network namespace.
///
/// Not from `/sys/class/net`: sysfs shows the network namespace of whoever mounted it,
/// which is not the pod's when `/sys` was not remounted in the pod (the node's `eth0`
/// would then answer).
pub fn uplink_mtu(ifname: &str) -> Result<u32, NetError> {
    validate_ifname(&format!("{ETHLINK_VAR} interface"), ifname)?;
    let mtu = NetlinkRoute::open()?
        .link_mtu(ifname)?
        .ok_or_else(|| NetError::UplinkMissing {
            ifname: ifname.to_string(),
            detail: "no such link in the pod's network namespace".into(),
        })?;
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(NetError::MtuParse {
            ifname: ifname.to_string(),
            path: PathBuf::from("netlink"),
            value: mtu.to_string(),
        })
    }
}

/// [`uplink_mtu`] below another sysfs `class/net` directory (tests).
pub fn uplink_mtu_in(class_net: &Path, ifname: &str) -> Result<u32, NetError> {
    validate_ifname(&format!("{ETHLINK_VAR} interface"), ifname)?;
    let dir = class_net.join(ifname);
    let path = dir.join("mtu");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NetError::UplinkMissing {
                ifname: ifname.to_string(),
                detail: format!("no {}", dir.display()),
            })
        }
        Err(source) => {
            return Err(NetError::MtuRead {
                ifname: ifname.to_string(),
                path,
                source,
            })
        }
    };
    parse_mtu(&text).ok_or_else(|| NetError::MtuParse {
        ifname: ifname.to_string(),
        path,
        value: text.trim().to_string(),
    })
}

/// Parses the content of a sysfs `mtu` file; `None` unless it is a usable MTU.
pub fn parse_mtu(text: &str) -> Option<u32> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
}

// ---------------------------------------------------------------------------------------
// Overlap with the pod's own networks

/// Where a pod network was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetSource {
    Address,
    Route,
}

impl fmt::Display for PodNetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodNetSource::Address => "address",
            PodNetSource::Route => "route",
        })
    }
}

/// An IPv4 address (with its prefix) or a route of one of the pod's interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub ifname: String,
    pub cidr: Ipv4Cidr,
    pub source: PodNetSource,
}

/// The pure comparison: fails when the plan's network overlaps any of `existing`.
/// Default routes (`/0`) and anything on the plan's own pod-side link (left from a
/// crashed start; [`setup`] replaces it) are ignored.
pub fn check_overlap(plan: &LinkPlan, existing: &[PodNet]) -> Result<(), NetError> {
    let cidr = plan.network();
    for n in existing {
        if n.cidr.prefix == 0 || n.ifname == plan.host_ifname {
            continue;
        }
        if cidr.overlaps(&n.cidr) {
            return Err(NetError::Overlap {
                cidr,
                existing: n.cidr.to_network(),
                source_kind: n.source,
                ifname: n.ifname.clone(),
            });
        }
    }
    Ok(())
}

/// The IPv4 addresses and main-table unicast routes of the current network namespace.
pub fn pod_networks() -> Result<Vec<PodNet>, NetError> {
    NetlinkRoute::open()?.ipv4_networks()
}

/// [`pod_networks`] + [`check_overlap`]: run in the pod netns before [`setup`].
pub fn check_pod_overlap(plan: &LinkPlan) -> Result<(), NetError> {
    check_overlap(plan, &pod_networks()?)
}

// ---------------------------------------------------------------------------------------
// Kernel access behind traits

/// Link-level netlink operations in one network namespace. Interfaces are named; the
/// implementation resolves indexes. Errors name the operation and the interface.
pub trait LinkOps {
    /// The index of `name`, or `None` when there is no such link.
    fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetError>;
    /// Creates a veth pair `name` <-> `peer`, both with `mtu`, both down.
    fn create_veth(&mut self, name: &str, peer: &str, mtu: u32) -> Result<(), NetError>;
    fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<(), NetError>;
    fn set_up(&mut self, name: &str) -> Result<(), NetError>;
    /// Adds `addr/prefix`; an address that is already there is not an error.
    fn add_addr(&mut self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError>;
    /// Adds (or replaces) the IPv4 default route via `gateway` on `dev`.
    fn add_default_route(&mut self, gateway: Ipv4Addr, dev: &str) -> Result<(), NetError>;
    /// Moves `name` into the network namespace `netns` refers to.
    fn move_to_netns_fd(&mut self, name: &str, netns: BorrowedFd<'_>) -> Result<(), NetError>;
    fn rename(&mut self, name: &str, new_name: &str) -> Result<(), NetError>;
    /// Deletes `name`; `Ok(false)` when it did not exist.
    fn delete_link(&mut self, name: &str) -> Result<bool, NetError>;
}

/// Work to run with the [`LinkOps`] of another network namespace.
pub type NetnsWork<'a> = dyn Fn(&mut dyn LinkOps) -> Result<(), NetError> + Sync + 'a;

/// Everything [`setup_with`] and [`teardown_with`] need from the system.
pub trait NetSys {
    /// Netlink operations in the caller's (the pod's) network namespace.
    fn pod_links(&mut self) -> Result<Box<dyn LinkOps>, NetError>;
    /// Opens `/proc/<pid>/ns/net`.
    fn open_netns(&mut self, pid: i32) -> Result<OwnedFd, NetError>;
    /// Runs `work` with netlink operations inside `netns`, on a thread that enters it
    /// and then exits; the calling thread's namespace never changes.
    fn in_netns(&mut self, netns: BorrowedFd<'_>, work: &NetnsWork<'_>) -> Result<(), NetError>;
    /// `net.ipv4.ip_forward = 1` in the caller's network namespace.
    fn enable_ip_forward(&mut self) -> Result<(), NetError>;
    /// Absolute path of the `iptables` to run.
    fn iptables(&mut self) -> Result<String, NetError>;
}

/// The real [`NetSys`]: netlink, `/proc`, `setns` on a dedicated thread, `$PATH`.
#[derive(Debug, Default)]
pub struct HostNet;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl NetSys for HostNet {
    fn pod_links(&mut self) -> Result<Box<dyn LinkOps>, NetError> {
        Ok(Box::new(NetlinkRoute::open()?))
    }

    fn open_netns(&mut self, pid: i32) -> Result<OwnedFd, NetError> {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        fs::File::open(&path)
            .map(OwnedFd::from)
            .map_err(|source| NetError::OpenNetns { pid, path, source })
    }

    fn in_netns(&mut self, netns: BorrowedFd<'_>, work: &NetnsWork<'_>) -> Result<(), NetError> {
        std::thread::scope(|s| {
            let worker = std::thread::Builder::new()
                .name("envbox-netns".into())
                .spawn_scoped(s, move || -> Result<(), NetError> {
                    // setns(CLONE_NEWNET) only changes this thread; it exits right after.
                    nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetError::EnterNetns(io::Error::from(e)))?;
                    let mut ops = NetlinkRoute::open()?;
                    work(&mut ops)
                })
                .map_err(NetError::EnterNetns)?;
            worker.join().map_err(|_| NetError::NetnsThreadPanicked)?
        })
    }

    fn enable_ip_forward(&mut self) -> Result<(), NetError> {
        let path = Path::new(IP_FORWARD);
        if fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            return Ok(());
        }
        fs::write(path, b"1\n").map_err(|source| NetError::Sysctl {
            path: path.to_path_buf(),
            source,
        })
    }

    fn iptables(&mut self) -> Result<String, NetError> {
        let path = std::env::var("PATH").unwrap_or_default();
        find_in_path("iptables", &path).ok_or(NetError::IptablesMissing { path })
    }
}

/// The first executable `prog` in the colon-separated `path`.
pub fn find_in_path(prog: &str, path: &str) -> Option<String> {
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(prog))
        .find(|p| crate::config::is_executable(p))
        .map(|p| p.to_string_lossy().into_owned())
}

// ---------------------------------------------------------------------------------------
// setup / teardown

/// Wires the workspace whose init is `workspace_pid` (between the runtime's `create` and
/// `start`). Call it from the pod's network namespace. Safe to repeat after a crash.
pub fn setup(
    plan: &LinkPlan,
    workspace_pid: i32,
    mtu: u32,
    cmd: &dyn CommandRunner,
) -> Result<(), NetError> {
    setup_with(&mut HostNet, plan, workspace_pid, mtu, cmd)
}

/// [`setup`] with an explicit [`NetSys`].
pub fn setup_with(
    sys: &mut dyn NetSys,
    plan: &LinkPlan,
    workspace_pid: i32,
    mtu: u32,
    cmd: &dyn CommandRunner,
) -> Result<(), NetError> {
    plan.validate()?;
    validate_mtu(mtu)?;
    if workspace_pid <= 0 {
        return Err(NetError::InvalidPlan(format!(
            "workspace pid {workspace_pid} is not a process id"
        )));
    }
    // Fail on a missing iptables before touching anything.
    let iptables = sys.iptables()?;
    let netns = sys.open_netns(workspace_pid)?;
    let mut pod = sys.pod_links()?;

    let host = plan.host_ifname.as_str();
    let peer = plan.temp_peer_name();
    // A crashed earlier start may have left either end behind (deleting one end of a veth
    // deletes the other).
    for stale in [host, peer.as_str()] {
        if pod.delete_link(stale)? {
            log::info!("removed stale link {stale} from an earlier start");
        }
    }

    pod.create_veth(host, &peer, mtu)?;
    let wired = (|| {
        pod.move_to_netns_fd(&peer, netns.as_fd())?;
        pod.add_addr(host, plan.pod_addr, plan.prefix)?;
        pod.set_up(host)?;
        sys.in_netns(netns.as_fd(), &|ws| {
            configure_workspace_side(ws, plan, &peer, mtu)
        })
    })();
    if let Err(e) = wired {
        if let Err(cleanup) = pod.delete_link(host) {
            log::warn!("after a failed setup, removing {host} failed too: {cleanup}");
        }
        return Err(e);
    }

    sys.enable_ip_forward()?;
    nat::ensure_rules(cmd, &iptables, plan)?;
    log::info!(
        "workspace network: {host} {}/{} <-> eth0 {}/{} (mtu {mtu} from {}), NAT out of every other interface",
        plan.pod_addr,
        plan.prefix,
        plan.workspace_addr,
        plan.prefix,
        plan.uplink
    );
    Ok(())
}

fn configure_workspace_side(
    ws: &mut dyn LinkOps,
    plan: &LinkPlan,
    peer: &str,
    mtu: u32,
) -> Result<(), NetError> {
    ws.rename(peer, WORKSPACE_IFNAME)?;
    ws.set_mtu(WORKSPACE_IFNAME, mtu)?;
    ws.add_addr(WORKSPACE_IFNAME, plan.workspace_addr, plan.prefix)?;
    ws.set_up(WORKSPACE_IFNAME)?;
    ws.set_up("lo")?;
    ws.add_default_route(plan.pod_addr, WORKSPACE_IFNAME)
}

/// Removes the pod-side link (and with it the workspace end) and every `envbox`-tagged
/// NAT/FORWARD rule. Idempotent.
pub fn teardown(plan: &LinkPlan, cmd: &dyn CommandRunner) -> Result<(), NetError> {
    teardown_with(&mut HostNet, plan, cmd)
}

/// [`teardown`] with an explicit [`NetSys`].
pub fn teardown_with(
    sys: &mut dyn NetSys,
    plan: &LinkPlan,
    cmd: &dyn CommandRunner,
) -> Result<(), NetError> {
    validate_ifname("pod-side link name", &plan.host_ifname)?;
    let mut pod = sys.pod_links()?;
    pod.delete_link(&plan.host_ifname)?;
    pod.delete_link(&plan.temp_peer_name())?;
    match sys.iptables() {
        Ok(iptables) => {
            nat::remove_rules(cmd, &iptables, &[])?;
            Ok(())
        }
        // setup cannot have added rules without iptables.
        Err(e @ NetError::IptablesMissing { .. }) => {
            log::warn!("teardown: {e}; no NAT rules to remove");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;

/// An iptables call that takes longer is stuck (the xtables lock held by a wedged process).
const IPTABLES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// envbox runs iptables through its supervisor, which owns `waitpid` as PID 1.
impl CommandRunner for crate::pid1::supervisor::Supervisor {
    fn run(&self, argv: &[&str]) -> Result<String, String> {
        run_bounded(self, argv, IPTABLES_TIMEOUT)
    }
}

/// The supervisor's runner with every call bounded by what is left of one deadline (the shutdown's).
pub struct UntilDeadline<'a> {
    pub sup: &'a crate::pid1::supervisor::Supervisor,
    pub deadline: std::time::Instant,
}

impl CommandRunner for UntilDeadline<'_> {
    fn run(&self, argv: &[&str]) -> Result<String, String> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(format!(
                "`{}` was not run: the shutdown deadline has passed",
                argv.join(" ")
            ));
        }
        run_bounded(self.sup, argv, left.min(IPTABLES_TIMEOUT))
    }
}

fn run_bounded(
    sup: &crate::pid1::supervisor::Supervisor,
    argv: &[&str],
    timeout: std::time::Duration,
) -> Result<String, String> {
    {
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args);
        let out = sup
            .output("iptables", &mut cmd, b"", timeout)
            .map_err(|e| format!("{}: {e}", argv.join(" ")))?;
        if out.exit.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{}` failed ({}): {}",
                argv.join(" "),
                out.exit,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

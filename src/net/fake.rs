//! Recording fakes for [`NetSys`], [`LinkOps`] and an `iptables` [`CommandRunner`]. The
//! link fake keeps a small model of two namespaces (pod and workspace) with veth pairs,
//! so repeated setups and teardowns behave as on a kernel: deleting one end of a veth
//! deletes the other, renaming onto an existing name fails, and so on.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::{CommandRunner, LinkOps, NetError, NetSys, NetnsWork};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    Pod,
    Ws,
}

impl Ns {
    fn tag(self) -> &'static str {
        match self {
            Ns::Pod => "pod",
            Ns::Ws => "ws",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FakeLink {
    pub id: u32,
    pub peer: Option<u32>,
    pub mtu: u32,
    pub up: bool,
    pub addrs: Vec<(Ipv4Addr, u8)>,
}

#[derive(Debug, Default)]
pub(crate) struct World {
    /// Every call, as "<ns>: <op> <args>".
    pub log: Vec<String>,
    pub pod: BTreeMap<String, FakeLink>,
    pub ws: BTreeMap<String, FakeLink>,
    pub ws_default_route: Option<(Ipv4Addr, String)>,
    pub ip_forward: bool,
    /// `None`: no iptables on PATH.
    pub iptables: Option<String>,
    /// A call whose log line starts with this fails with EPERM.
    pub fail: Option<String>,
    next_id: u32,
}

impl World {
    fn links(&mut self, ns: Ns) -> &mut BTreeMap<String, FakeLink> {
        match ns {
            Ns::Pod => &mut self.pod,
            Ns::Ws => &mut self.ws,
        }
    }
}

#[derive(Clone)]
pub(crate) struct FakeSys {
    pub world: Arc<Mutex<World>>,
}

impl FakeSys {
    /// A pod namespace with `lo` and `eth0`, a workspace namespace with `lo`.
    pub fn new() -> Self {
        let mut w = World {
            iptables: Some("/usr/sbin/iptables".into()),
            ..World::default()
        };
        for (ns, name) in [(Ns::Pod, "lo"), (Ns::Pod, "eth0"), (Ns::Ws, "lo")] {
            w.next_id += 1;
            let link = FakeLink {
                id: w.next_id,
                peer: None,
                mtu: if name == "lo" { 65536 } else { 1450 },
                up: ns == Ns::Pod,
                addrs: vec![],
            };
            w.links(ns).insert(name.into(), link);
        }
        FakeSys {
            world: Arc::new(Mutex::new(w)),
        }
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.world().log)
    }
}

pub(crate) struct FakeLinks {
    world: Arc<Mutex<World>>,
    ns: Ns,
}

fn enodev(op: &str, name: &str) -> NetError {
    NetError::netlink(op, name, io::Error::from_raw_os_error(libc::ENODEV))
}

impl FakeLinks {
    /// Logs the call, then applies the injected failure if it matches.
    fn record(&self, w: &mut World, line: String, op: &str, name: &str) -> Result<(), NetError> {
        let line = format!("{}: {line}", self.ns.tag());
        let fail = w
            .fail
            .as_ref()
            .is_some_and(|f| line.starts_with(f.as_str()));
        w.log.push(line);
        if fail {
            return Err(NetError::netlink(
                op,
                name,
                io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        Ok(())
    }

    fn with_link<T>(
        &mut self,
        line: String,
        op: &str,
        name: &str,
        f: impl FnOnce(&mut FakeLink) -> T,
    ) -> Result<T, NetError> {
        let mut w = self.world.lock().unwrap();
        self.record(&mut w, line, op, name)?;
        let link = w
            .links(self.ns)
            .get_mut(name)
            .ok_or_else(|| enodev(op, name))?;
        Ok(f(link))
    }
}

impl LinkOps for FakeLinks {
    fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetError> {
        let mut w = self.world.lock().unwrap();
        Ok(w.links(self.ns).get(name).map(|l| l.id))
    }

    fn create_veth(&mut self, name: &str, peer: &str, mtu: u32) -> Result<(), NetError> {
        let mut w = self.world.lock().unwrap();
        let op = "create veth pair";
        self.record(
            &mut w,
            format!("create_veth {name} {peer} mtu={mtu}"),
            op,
            name,
        )?;
        if w.links(self.ns).contains_key(name) || w.links(self.ns).contains_key(peer) {
            return Err(NetError::netlink(
                op,
                name,
                io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let (a, b) = (w.next_id + 1, w.next_id + 2);
        w.next_id += 2;
        let mk = |id, peer| FakeLink {
            id,
            peer: Some(peer),
            mtu,
            up: false,
            addrs: vec![],
        };
        w.links(self.ns).insert(name.into(), mk(a, b));
        w.links(self.ns).insert(peer.into(), mk(b, a));
        Ok(())
    }

    fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<(), NetError> {
        self.with_link(format!("set_mtu {name} {mtu}"), "set mtu", name, |l| {
            l.mtu = mtu
        })
    }

    fn set_up(&mut self, name: &str) -> Result<(), NetError> {
        self.with_link(format!("set_up {name}"), "set up", name, |l| l.up = true)
    }

    fn add_addr(&mut self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        self.with_link(
            format!("add_addr {name} {addr}/{prefix}"),
            "add address",
            name,
            |l| {
                if !l.addrs.contains(&(addr, prefix)) {
                    l.addrs.push((addr, prefix))
                }
            },
        )
    }

    fn add_default_route(&mut self, gateway: Ipv4Addr, dev: &str) -> Result<(), NetError> {
        let mut w = self.world.lock().unwrap();
        let op = "add default route";
        self.record(
            &mut w,
            format!("add_default_route via {gateway} dev {dev}"),
            op,
            dev,
        )?;
        if !w.links(self.ns).get(dev).is_some_and(|l| l.up) {
            return Err(enodev(op, dev));
        }
        w.ws_default_route = Some((gateway, dev.to_string()));
        Ok(())
    }

    fn move_to_netns_fd(&mut self, name: &str, _netns: BorrowedFd<'_>) -> Result<(), NetError> {
        let mut w = self.world.lock().unwrap();
        let op = "move to netns";
        self.record(&mut w, format!("move_to_netns {name}"), op, name)?;
        let mut link = w
            .links(self.ns)
            .remove(name)
            .ok_or_else(|| enodev(op, name))?;
        link.up = false;
        if w.ws.contains_key(name) {
            return Err(NetError::netlink(
                op,
                name,
                io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        w.ws.insert(name.into(), link);
        Ok(())
    }

    fn rename(&mut self, name: &str, new_name: &str) -> Result<(), NetError> {
        let mut w = self.world.lock().unwrap();
        let op = "rename";
        self.record(&mut w, format!("rename {name} {new_name}"), op, name)?;
        let links = w.links(self.ns);
        if links.contains_key(new_name) {
            return Err(NetError::netlink(
                op,
                name,
                io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        let link = links.remove(name).ok_or_else(|| enodev(op, name))?;
        links.insert(new_name.into(), link);
        Ok(())
    }

    fn delete_link(&mut self, name: &str) -> Result<bool, NetError> {
        let mut w = self.world.lock().unwrap();
        let op = "delete link";
        let present = w.links(self.ns).contains_key(name);
        self.record(&mut w, format!("delete_link {name} ({present})"), op, name)?;
        let Some(link) = w.links(self.ns).remove(name) else {
            return Ok(false);
        };
        if let Some(peer) = link.peer {
            for ns in [Ns::Pod, Ns::Ws] {
                w.links(ns).retain(|_, l| l.id != peer);
            }
            if w.ws_default_route
                .as_ref()
                .is_some_and(|(_, d)| !w.ws.contains_key(d))
            {
                w.ws_default_route = None;
            }
        }
        Ok(true)
    }
}

impl NetSys for FakeSys {
    fn pod_links(&mut self) -> Result<Box<dyn LinkOps>, NetError> {
        Ok(Box::new(FakeLinks {
            world: self.world.clone(),
            ns: Ns::Pod,
        }))
    }

    fn open_netns(&mut self, pid: i32) -> Result<OwnedFd, NetError> {
        self.world().log.push(format!("sys: open_netns {pid}"));
        Ok(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
    }

    fn in_netns(&mut self, _netns: BorrowedFd<'_>, work: &NetnsWork<'_>) -> Result<(), NetError> {
        self.world().log.push("sys: enter workspace netns".into());
        let mut ops = FakeLinks {
            world: self.world.clone(),
            ns: Ns::Ws,
        };
        let r = work(&mut ops);
        self.world().log.push("sys: leave workspace netns".into());
        r
    }

    fn enable_ip_forward(&mut self) -> Result<(), NetError> {
        let mut w = self.world();
        w.log.push("sys: ip_forward=1".into());
        w.ip_forward = true;
        Ok(())
    }

    fn iptables(&mut self) -> Result<String, NetError> {
        self.world()
            .iptables
            .clone()
            .ok_or_else(|| NetError::IptablesMissing {
                path: "/usr/bin:/bin".into(),
            })
    }
}

/// A tiny `iptables` model: `-C`, `-A`, `-I <chain> 1`, `-D`, `-S` on (table, chain).
#[derive(Default)]
pub(crate) struct FakeIptables {
    pub rules: RefCell<Vec<(String, String, Vec<String>)>>,
    pub calls: RefCell<Vec<String>>,
    /// Any call containing this word fails with this stderr.
    pub fail: RefCell<Option<(String, String)>>,
}

impl FakeIptables {
    pub fn rules_in(&self, table: &str, chain: &str) -> Vec<String> {
        self.rules
            .borrow()
            .iter()
            .filter(|(t, c, _)| t == table && c == chain)
            .map(|(_, _, s)| s.join(" "))
            .collect()
    }

    pub fn add(&self, table: &str, chain: &str, spec: &str) {
        self.rules.borrow_mut().push((
            table.into(),
            chain.into(),
            spec.split_whitespace().map(String::from).collect(),
        ));
    }
}

impl CommandRunner for FakeIptables {
    fn run(&self, argv: &[&str]) -> Result<String, String> {
        self.calls.borrow_mut().push(argv.join(" "));
        if let Some((word, stderr)) = self.fail.borrow().as_ref() {
            if argv.contains(&word.as_str()) {
                return Err(format!("exit status 1: {stderr}"));
            }
        }
        assert!(argv[0].ends_with("iptables"), "not iptables: {argv:?}");
        assert_eq!(argv[1], "-w", "iptables without -w: {argv:?}");
        assert_eq!(argv[2], "-t", "iptables without -t: {argv:?}");
        let table = argv[3].to_string();
        let (op, chain) = (argv[4], argv[5].to_string());
        let mut rest: Vec<String> = argv[6..].iter().map(|s| s.to_string()).collect();
        let mut rules = self.rules.borrow_mut();
        let pos = rules
            .iter()
            .position(|(t, c, s)| *t == table && *c == chain && *s == rest);
        match op {
            "-S" => {
                let mut out = format!("-P {chain} ACCEPT\n");
                for (_, _, s) in rules.iter().filter(|(t, c, _)| *t == table && *c == chain) {
                    let words: Vec<String> = s
                        .iter()
                        .map(|w| {
                            if w.contains(' ') {
                                format!("\"{w}\"")
                            } else {
                                w.clone()
                            }
                        })
                        .collect();
                    out.push_str(&format!("-A {chain} {}\n", words.join(" ")));
                }
                Ok(out)
            }
            "-C" => pos.map(|_| String::new()).ok_or_else(|| {
                "exit status 1: iptables: Bad rule (does a matching rule exist in that chain?)."
                    .into()
            }),
            "-A" => {
                rules.push((table, chain, rest));
                Ok(String::new())
            }
            "-I" => {
                assert_eq!(rest.remove(0), "1");
                let first = rules
                    .iter()
                    .position(|(t, c, _)| *t == table && *c == chain)
                    .unwrap_or(rules.len());
                rules.insert(first, (table, chain, rest));
                Ok(String::new())
            }
            "-D" => match pos {
                Some(i) => {
                    rules.remove(i);
                    Ok(String::new())
                }
                None => Err("exit status 1: iptables: Bad rule.".into()),
            },
            other => panic!("unexpected iptables op {other}"),
        }
    }
}

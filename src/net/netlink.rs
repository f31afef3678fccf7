//! A small blocking rtnetlink client: one `NETLINK_ROUTE` socket, requests with
//! `NLM_F_REQUEST|NLM_F_ACK`, replies matched by sequence number, `NLMSG_ERROR` codes
//! turned into [`NetError::Netlink`] naming the operation and the interface.
//!
//! A netlink socket belongs to the network namespace of the thread that opened it.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::{Ipv4Cidr, LinkOps, NetError, PodNet, PodNetSource};

const REPLY_TIMEOUT_SECS: libc::time_t = 10;

/// Blocking rtnetlink socket in the namespace of the thread that opened it.
pub struct NetlinkRoute {
    socket: Socket,
    seq: u32,
}

impl std::fmt::Debug for NetlinkRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkRoute")
            .field("fd", &self.socket.as_raw_fd())
            .field("seq", &self.seq)
            .finish()
    }
}

impl NetlinkRoute {
    /// Opens, binds and connects a `NETLINK_ROUTE` socket.
    pub fn open() -> Result<Self, NetError> {
        let err = |op: &str, e: io::Error| NetError::netlink(op, "", e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| err("open socket", e))?;
        socket.bind_auto().map_err(|e| err("bind socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| err("connect socket", e))?;
        // The kernel always answers; the timeout only keeps a bug from hanging PID 1.
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: a valid socket fd and a `timeval` of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err("set receive timeout", io::Error::last_os_error()));
        }
        Ok(NetlinkRoute { socket, seq: 0 })
    }

    /// Sends one request and collects the replies up to the ACK (or `NLMSG_DONE` for a
    /// dump). Kernel error codes come back as `io::Error`s.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        let sent = self.socket.send(&buf, 0)?;
        if sent != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write on the netlink socket",
            ));
        }

        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(|e| {
                if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no reply from the kernel within {REPLY_TIMEOUT_SECS} s"),
                    )
                } else {
                    e
                }
            })?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }

    fn link_request(
        &mut self,
        op: &str,
        ifname: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        self.request(msg, flags)
            .map_err(|e| NetError::netlink(op, ifname, e))
    }

    fn index(&mut self, op: &str, name: &str) -> Result<u32, NetError> {
        self.link_index(name)?
            .ok_or_else(|| NetError::netlink(op, name, io::Error::from_raw_os_error(libc::ENODEV)))
    }

    fn set_link(
        &mut self,
        op: &str,
        name: &str,
        fill: impl FnOnce(&mut LinkMessage),
    ) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = self.index(op, name)?;
        fill(&mut msg);
        self.link_request(op, name, RouteNetlinkMessage::SetLink(msg), 0)?;
        Ok(())
    }

    /// The MTU of link `name` in this namespace; `None` when there is no such link.
    pub fn link_mtu(&mut self, name: &str) -> Result<Option<u32>, NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                }),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::netlink("read the MTU of", name, e)),
        }
    }

    /// Names of all links by index.
    pub fn links(&mut self) -> Result<Vec<(u32, String)>, NetError> {
        let replies = self.link_request(
            "list links",
            "",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                }
                _ => None,
            })
            .collect())
    }

    /// IPv4 addresses (with prefix) and main-table unicast routes of this namespace.
    pub fn ipv4_networks(&mut self) -> Result<Vec<PodNet>, NetError> {
        let links = self.links()?;
        let name_of = |index: u32| {
            links
                .iter()
                .find(|(i, _)| *i == index)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| format!("ifindex {index}"))
        };
        let mut out = Vec::new();

        let mut get_addr = AddressMessage::default();
        get_addr.header.family = AddressFamily::Inet;
        let replies = self.link_request(
            "list addresses",
            "",
            RouteNetlinkMessage::GetAddress(get_addr),
            NLM_F_DUMP,
        )?;
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let ip = a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                out.push(PodNet {
                    ifname: name_of(a.header.index),
                    cidr: Ipv4Cidr::new(ip, a.header.prefix_len),
                    source: PodNetSource::Address,
                });
            }
        }

        let mut get_route = RouteMessage::default();
        get_route.header.address_family = AddressFamily::Inet;
        let replies = self.link_request(
            "list routes",
            "",
            RouteNetlinkMessage::GetRoute(get_route),
            NLM_F_DUMP,
        )?;
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if r.header.address_family != AddressFamily::Inet || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            let dst = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            out.push(PodNet {
                ifname: oif.map(name_of).unwrap_or_default(),
                cidr: Ipv4Cidr::new(dst, r.header.destination_prefix_length),
                source: PodNetSource::Route,
            });
        }
        Ok(out)
    }
}

impl LinkOps for NetlinkRoute {
    fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetError::netlink("look up link", name, e)),
        }
    }

    fn create_veth(&mut self, name: &str, peer: &str, mtu: u32) -> Result<(), NetError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.link_request(
            &format!("create veth pair (peer {peer:?}, mtu {mtu})"),
            name,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    fn set_mtu(&mut self, name: &str, mtu: u32) -> Result<(), NetError> {
        self.set_link(&format!("set mtu {mtu}"), name, |m| {
            m.attributes.push(LinkAttribute::Mtu(mtu))
        })
    }

    fn set_up(&mut self, name: &str) -> Result<(), NetError> {
        self.set_link("set up", name, |m| {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        })
    }

    fn add_addr(&mut self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let op = format!("add address {addr}/{prefix}");
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = self.index(&op, name)?;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        if prefix <= 30 {
            let brd = Ipv4Cidr::new(addr, prefix).broadcast();
            msg.attributes.push(AddressAttribute::Broadcast(brd));
        }
        match self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(NetError::netlink(op, name, e)),
        }
    }

    fn add_default_route(&mut self, gateway: Ipv4Addr, dev: &str) -> Result<(), NetError> {
        let op = format!("add default route via {gateway}");
        let index = self.index(&op, dev)?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.link_request(
            &op,
            dev,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    fn move_to_netns_fd(&mut self, name: &str, netns: BorrowedFd<'_>) -> Result<(), NetError> {
        self.set_link("move to the workspace network namespace", name, |m| {
            m.attributes.push(LinkAttribute::NetNsFd(netns.as_raw_fd()))
        })
    }

    fn rename(&mut self, name: &str, new_name: &str) -> Result<(), NetError> {
        self.set_link(&format!("rename to {new_name:?}"), name, |m| {
            m.attributes
                .push(LinkAttribute::IfName(new_name.to_string()))
        })
    }

    fn delete_link(&mut self, name: &str) -> Result<bool, NetError> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(msg), 0) {
            Ok(_) => Ok(true),
            // Gone in between (e.g. its veth peer's namespace went away).
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(NetError::netlink("delete link", name, e)),
        }
    }
}

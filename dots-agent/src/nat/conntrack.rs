//! The kernel's conntrack table over ctnetlink: a full dump
//! (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`) and the stream of new and
//! destroyed entries (multicast groups `NFNLGRP_CONNTRACK_NEW` and
//! `NFNLGRP_CONNTRACK_DESTROY`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tokio::sync::mpsc;

use super::NatError;
use crate::netlink;

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `NFNLGRP_CONNTRACK_NEW` is group 1, i.e. bit 0 of the bind mask.
const NFNLGRP_CONNTRACK_NEW_MASK: u32 = 1;
/// `NFNLGRP_CONNTRACK_DESTROY` is group 3, i.e. bit 2 of the bind mask.
const NFNLGRP_CONNTRACK_DESTROY_MASK: u32 = 1 << 2;
const NFGENMSG_LEN: usize = 4;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_FILTER_FLAG_IP_DST: u32 = 1 << 1;
const CTA_FILTER_FLAG_PROTO_NUM: u32 = 1 << 3;
const NLA_F_NESTED: u16 = 0x8000;

/// A kernel-side filter for a dump (`CTA_FILTER`, Linux 5.8+): only entries
/// whose reply goes to `reply_dst` (and, when set, whose original
/// destination and protocol are these) are formatted and sent. Exact values
/// only; ranges and prefixes are matched in user space afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DumpFilter {
    pub reply_dst: IpAddr,
    /// Ignored unless of the same family as `reply_dst`.
    pub orig_dst: Option<IpAddr>,
    pub protocol: Option<u8>,
}

fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(netlink::align4(out.len()), 0);
}

fn addr_bytes(a: IpAddr) -> (u16, Vec<u8>) {
    match a {
        IpAddr::V4(v4) => (CTA_IP_V4_DST, v4.octets().to_vec()),
        IpAddr::V6(v6) => (CTA_IP_V6_DST, v6.octets().to_vec()),
    }
}

/// `CTA_TUPLE_*` holding a destination address and maybe a protocol.
fn filter_tuple(ty: u16, dst: IpAddr, protocol: Option<u8>) -> Vec<u8> {
    let (aty, addr) = addr_bytes(dst);
    let mut ip = Vec::new();
    put_attr(&mut ip, aty, &addr);
    let mut inner = Vec::new();
    put_attr(&mut inner, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    if let Some(p) = protocol {
        let mut proto = Vec::new();
        put_attr(&mut proto, CTA_PROTO_NUM, &[p]);
        put_attr(&mut inner, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    }
    let mut out = Vec::new();
    put_attr(&mut out, ty | NLA_F_NESTED, &inner);
    out
}

impl DumpFilter {
    /// The attributes after nfgenmsg, and the family to put in nfgenmsg.
    fn encode(&self) -> (u8, Vec<u8>) {
        let family = match self.reply_dst {
            IpAddr::V4(_) => libc::AF_INET as u8,
            IpAddr::V6(_) => libc::AF_INET6 as u8,
        };
        let orig_dst = self
            .orig_dst
            .filter(|d| d.is_ipv4() == self.reply_dst.is_ipv4());
        let mut out = Vec::new();
        let mut orig_flags = 0;
        if orig_dst.is_some() || self.protocol.is_some() {
            // Without a destination the protocol alone cannot be given in
            // the tuple: filter on the destination only when known.
            if let Some(d) = orig_dst {
                orig_flags |= CTA_FILTER_FLAG_IP_DST;
                if self.protocol.is_some() {
                    orig_flags |= CTA_FILTER_FLAG_PROTO_NUM;
                }
                out.extend(filter_tuple(CTA_TUPLE_ORIG, d, self.protocol));
            }
        }
        out.extend(filter_tuple(CTA_TUPLE_REPLY, self.reply_dst, None));
        let mut flags = Vec::new();
        put_attr(&mut flags, CTA_FILTER_ORIG_FLAGS, &orig_flags.to_ne_bytes());
        put_attr(
            &mut flags,
            CTA_FILTER_REPLY_FLAGS,
            &CTA_FILTER_FLAG_IP_DST.to_ne_bytes(),
        );
        put_attr(&mut out, CTA_FILTER | NLA_F_NESTED, &flags);
        (family, out)
    }
}

/// Protocols whose conntrack tuples carry ports.
pub(crate) fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 33 | 132 | 136)
}

/// One direction of a connection as conntrack records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Source and destination ports, for TCP, UDP, UDP-Lite, SCTP and DCCP.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

/// A conntrack entry: the original direction (as the internal device sent
/// it) and the reply direction (as the outside answers, i.e. addressed to the
/// translated source when NAT applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtEntry {
    pub original: Tuple,
    pub reply: Tuple,
}

impl CtEntry {
    /// True when the source was translated: the reply does not go back to
    /// the address (or port) the device sent from.
    pub fn is_source_nat(&self) -> bool {
        self.reply.dst != self.original.src || self.reply.dst_port != self.original.src_port
    }
}

fn parse_addr(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

fn be16(b: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(0..2)?.try_into().ok()?))
}

fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port) = (None, None);
    for (ty, payload) in netlink::attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (t, p) in netlink::attrs(payload) {
                    match t {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = parse_addr(p),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = parse_addr(p),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, p) in netlink::attrs(payload) {
                    match t {
                        CTA_PROTO_NUM => protocol = p.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = be16(p),
                        CTA_PROTO_DST_PORT => dst_port = be16(p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = protocol?;
    let ports = has_ports(protocol);
    Some(Tuple {
        src: src?,
        dst: dst?,
        protocol,
        src_port: src_port.filter(|_| ports),
        dst_port: dst_port.filter(|_| ports),
    })
}

/// Parses the payload of one ctnetlink message (nfgenmsg + attributes);
/// `None` when it lacks a tuple.
pub fn parse_entry(payload: &[u8]) -> Option<CtEntry> {
    let attrs = payload.get(NFGENMSG_LEN..)?;
    let (mut original, mut reply) = (None, None);
    for (ty, p) in netlink::attrs(attrs) {
        match ty {
            CTA_TUPLE_ORIG => original = parse_tuple(p),
            CTA_TUPLE_REPLY => reply = parse_tuple(p),
            _ => {}
        }
    }
    Some(CtEntry {
        original: original?,
        reply: reply?,
    })
}

/// The message type of ctnetlink message `msg`.
const fn ct_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

/// A ctnetlink socket for dumps, in the network namespace of the thread that
/// opened it.
#[derive(Debug)]
pub struct Conntrack {
    sock: netlink::Socket,
}

impl Conntrack {
    pub fn open() -> Result<Conntrack, NatError> {
        let sock = netlink::Socket::open(NETLINK_NETFILTER, 0).map_err(NatError::Open)?;
        sock.set_rcvbuf(4 << 20);
        Ok(Conntrack { sock })
    }

    /// Every entry of the table, IPv4 and IPv6.
    pub fn dump(&mut self) -> Result<Vec<CtEntry>, NatError> {
        let mut out = Vec::new();
        self.dump_each(|e| out.push(e))?;
        Ok(out)
    }

    /// Hands every entry of the table to `each`, without collecting them.
    pub fn dump_each(&mut self, each: impl FnMut(CtEntry)) -> Result<(), NatError> {
        self.dump_raw(libc::AF_UNSPEC as u8, &[], each)
    }

    /// The entries passing `filter` (kernel-side); a superset of what a
    /// scope with that external address, target and protocol matches.
    pub fn dump_filtered(&mut self, filter: &DumpFilter) -> Result<Vec<CtEntry>, NatError> {
        let (family, attrs) = filter.encode();
        let mut out = Vec::new();
        self.dump_raw(family, &attrs, |e| out.push(e))?;
        Ok(out)
    }

    fn dump_raw(
        &mut self,
        family: u8,
        attrs: &[u8],
        mut each: impl FnMut(CtEntry),
    ) -> Result<(), NatError> {
        let seq = self.sock.next_seq();
        let len = NFGENMSG_LEN + attrs.len();
        let mut req = Vec::with_capacity(netlink::NLMSG_HDRLEN + len);
        netlink::put_header(
            &mut req,
            ct_type(IPCTNL_MSG_CT_GET),
            netlink::NLM_F_REQUEST | netlink::NLM_F_DUMP,
            seq,
            len,
        );
        // nfgenmsg: family (AF_UNSPEC: both), NFNETLINK_V0, res_id 0.
        req.extend_from_slice(&[family, 0, 0, 0]);
        req.extend_from_slice(attrs);
        self.sock
            .dump(&req, seq, |m| {
                if m.ty == ct_type(IPCTNL_MSG_CT_NEW) {
                    if let Some(e) = parse_entry(m.payload) {
                        each(e);
                    }
                }
            })
            .map_err(NatError::Dump)
    }
}

/// What the event stream delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtEvent {
    /// A new conntrack entry (already NATed: events fire at confirmation).
    New(CtEntry),
    /// An entry left the table (expiry, `conntrack -D`, flush). Only for
    /// entries created while someone listened: with the default sysctl
    /// `net.netfilter.nf_conntrack_events=2` the kernel attaches the event
    /// extension at creation only when a listener exists, so entries older
    /// than the subscription go silently.
    Destroy(CtEntry),
    /// The kernel dropped events (socket buffer overrun): the receiver must
    /// re-read the table with a dump to catch up.
    Resync,
}

/// A subscription to new and destroyed conntrack entries, in the network
/// namespace of the thread that opened it. Subscribe before dumping so no
/// flow falls between.
#[derive(Debug)]
pub struct EventSocket {
    sock: netlink::Socket,
    buf: Vec<u8>,
}

impl EventSocket {
    pub fn open() -> Result<EventSocket, NatError> {
        let sock = netlink::Socket::open(
            NETLINK_NETFILTER,
            NFNLGRP_CONNTRACK_NEW_MASK | NFNLGRP_CONNTRACK_DESTROY_MASK,
        )
        .map_err(NatError::Open)?;
        sock.set_rcvbuf(8 << 20);
        Ok(EventSocket {
            sock,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Waits up to `timeout` for events; returns those of one datagram
    /// (empty on timeout).
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<CtEvent>, NatError> {
        if !self.sock.wait_readable(timeout).map_err(NatError::Events)? {
            return Ok(Vec::new());
        }
        let n = match self.sock.recv(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(vec![CtEvent::Resync]),
            Err(e) => return Err(NatError::Events(e)),
        };
        Ok(netlink::messages(&self.buf[..n])
            .filter_map(|m| {
                let ev: fn(CtEntry) -> CtEvent = match m.ty {
                    t if t == ct_type(IPCTNL_MSG_CT_NEW) => CtEvent::New,
                    t if t == ct_type(IPCTNL_MSG_CT_DELETE) => CtEvent::Destroy,
                    _ => return None,
                };
                parse_entry(m.payload).map(ev)
            })
            .collect())
    }

    /// Moves the subscription to a thread of its own that forwards events
    /// to the returned channel (usable from tokio with `recv().await`, or
    /// blocking with `blocking_recv`). The thread ends when the receiver is
    /// dropped (noticed within `poll`), or after a socket error, sent as
    /// `Err`.
    pub fn spawn(
        mut self,
        poll: Duration,
    ) -> io::Result<mpsc::UnboundedReceiver<Result<CtEvent, NatError>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("dots-ct-events".into())
            .spawn(move || {
                while !tx.is_closed() {
                    match self.recv(poll) {
                        Ok(events) => {
                            for ev in events {
                                if tx.send(Ok(ev)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
            })?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::netlink::test_attr as attr;

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | 0x8000, &parts.concat())
    }

    fn tuple(ty: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        nested(
            ty,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[17]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn parses_a_masqueraded_udp_entry() {
        let mut p = vec![2, 0, 0, 0];
        p.extend(tuple(
            CTA_TUPLE_ORIG,
            [192, 0, 2, 2],
            [198, 51, 100, 10],
            5000,
            53,
        ));
        p.extend(tuple(
            CTA_TUPLE_REPLY,
            [198, 51, 100, 10],
            [203, 0, 113, 1],
            53,
            40000,
        ));
        p.extend(attr(3 | 0x4000, &8u32.to_be_bytes())); // CTA_STATUS, ignored
        let e = parse_entry(&p).unwrap();
        assert_eq!(e.original.src, "192.0.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.original.src_port, Some(5000));
        assert_eq!(e.reply.dst, "203.0.113.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.reply.dst_port, Some(40000));
        assert!(e.is_source_nat());
        // Without a reply tuple, nothing.
        let mut q = vec![2, 0, 0, 0];
        q.extend(tuple(
            CTA_TUPLE_ORIG,
            [192, 0, 2, 2],
            [198, 51, 100, 10],
            5000,
            53,
        ));
        assert!(parse_entry(&q).is_none());
        assert!(parse_entry(&[2]).is_none());
    }
}

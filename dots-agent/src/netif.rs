//! The router's own addresses, for the local domain.
//!
//! Requests name attack sources inside the agent's domain; behind a NAT the
//! ISP sees, and names, the router's own external address. So the domain is
//! the configured prefixes plus every address of the router's interfaces,
//! each as a host prefix (`/32`, `/128`): never the interface's whole
//! network, as a WAN interface's subnet holds other customers.
//!
//! The addresses change while the agent runs (a PPPoE reconnect, DHCP
//! renumbering): [`watch_addresses`] follows them with rtnetlink address
//! events (`RTM_NEWADDR` / `RTM_DELADDR` of the `RTNLGRP_IPV4_IFADDR` and
//! `RTNLGRP_IPV6_IFADDR` groups, rtnetlink(7)), and the runtime applies
//! each change to the local domain and to NAT correlation.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;
use tokio::sync::watch;

use crate::netlink;

/// Which special addresses to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceFilter {
    /// Keep loopback addresses (127.0.0.0/8, ::1).
    pub loopback: bool,
    /// Keep link-local addresses (169.254.0.0/16, fe80::/10).
    pub link_local: bool,
}

/// Addresses of all local interfaces as host prefixes, sorted, without
/// duplicates; loopback and link-local addresses are left out (see
/// [`interface_prefixes`] to keep them). Unspecified, multicast and broadcast
/// addresses are always left out. Empty if the interfaces cannot be read
/// (logged).
pub fn local_interface_prefixes() -> Vec<IpNet> {
    interface_prefixes(InterfaceFilter::default())
}

/// Addresses of all local interfaces as host prefixes, filtered.
pub fn interface_prefixes(filter: InterfaceFilter) -> Vec<IpNet> {
    filtered(&all_prefixes(), filter)
}

/// The host prefixes of `all` that `filter` keeps.
pub fn filtered(all: &[IpNet], filter: InterfaceFilter) -> Vec<IpNet> {
    all.iter()
        .copied()
        .filter(|p| keep(p.addr(), filter))
        .collect()
}

/// Every address of the local interfaces as a host prefix, sorted, without
/// duplicates, loopback and link-local included.
fn all_prefixes() -> Vec<IpNet> {
    let mut out: Vec<IpNet> = read_addresses().into_iter().map(IpNet::from).collect();
    out.sort();
    out.dedup();
    out
}

/// `RTMGRP_IPV4_IFADDR` and `RTMGRP_IPV6_IFADDR`: the multicast groups
/// `RTNLGRP_IPV4_IFADDR` (5) and `RTNLGRP_IPV6_IFADDR` (9) as bind(2) bits.
const ADDRESS_GROUPS: u32 = (1 << (5 - 1)) | (1 << (9 - 1));
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;

/// Whether a datagram from the address groups announces a change.
fn announces_change(buf: &[u8]) -> bool {
    netlink::messages(buf).any(|m| m.ty == RTM_NEWADDR || m.ty == RTM_DELADDR)
}

/// The router's addresses (every address as a host prefix, sorted,
/// loopback and link-local included: filter with [`filtered`]), kept
/// current by rtnetlink address events. The set is read again on each
/// event burst (and after lost events), and published when it differs.
/// A thread follows the events until every receiver is gone.
pub fn watch_addresses() -> io::Result<watch::Receiver<Vec<IpNet>>> {
    let sock = netlink::Socket::open(libc::NETLINK_ROUTE, ADDRESS_GROUPS)?;
    sock.set_rcvbuf(1 << 20);
    // Subscribed first, then read: no change falls between.
    let (tx, rx) = watch::channel(all_prefixes());
    std::thread::Builder::new()
        .name("dots-addr-events".into())
        .spawn(move || follow_addresses(&sock, &tx))?;
    Ok(rx)
}

fn follow_addresses(sock: &netlink::Socket, tx: &watch::Sender<Vec<IpNet>>) {
    let mut buf = vec![0u8; 64 * 1024];
    while !tx.is_closed() {
        let mut changed = false;
        let mut wait = Duration::from_millis(500);
        // Read the whole burst (an interface coming up brings several
        // addresses), then the set once.
        loop {
            match sock.wait_readable(wait) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "address events stopped; the router's addresses are no longer followed");
                    return;
                }
            }
            match sock.recv(&mut buf) {
                Ok(n) => changed |= announces_change(&buf[..n]),
                // Events were lost: read the set again.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                Err(e) => {
                    tracing::warn!(error = %e, "address events stopped; the router's addresses are no longer followed");
                    return;
                }
            }
            wait = Duration::from_millis(20);
        }
        if changed {
            let now = all_prefixes();
            tx.send_if_modified(|cur| {
                if *cur == now {
                    return false;
                }
                *cur = now;
                true
            });
        }
    }
}

fn keep(a: IpAddr, f: InterfaceFilter) -> bool {
    if a.is_unspecified() || a.is_multicast() {
        return false;
    }
    match a {
        IpAddr::V4(v4) => {
            !v4.is_broadcast()
                && (f.loopback || !v4.is_loopback())
                && (f.link_local || !v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            (f.loopback || !v6.is_loopback()) && (f.link_local || !is_unicast_link_local(v6))
        }
    }
}

fn is_unicast_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// Every IPv4 and IPv6 address `getifaddrs(3)` reports.
fn read_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot read the interfaces' addresses (getifaddrs)"
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(
                    sin.sin_addr.s_addr.to_ne_bytes(),
                )));
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_special_addresses() {
        let none = InterfaceFilter::default();
        let all = InterfaceFilter {
            loopback: true,
            link_local: true,
        };
        for (a, default, with_all) in [
            ("192.0.2.1", true, true),
            ("2001:db8::1", true, true),
            ("127.0.0.1", false, true),
            ("::1", false, true),
            ("169.254.1.1", false, true),
            ("fe80::1", false, true),
            ("0.0.0.0", false, false),
            ("::", false, false),
            ("255.255.255.255", false, false),
            ("ff02::1", false, false),
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(keep(ip, none), default, "{a}");
            assert_eq!(keep(ip, all), with_all, "{a}");
        }
    }

    #[test]
    fn address_messages_announce_changes() {
        let msg = |ty: u16| {
            let mut b = Vec::new();
            netlink::put_header(&mut b, ty, 0, 0, 8);
            b.extend_from_slice(&[0; 8]);
            b
        };
        assert!(announces_change(&msg(RTM_NEWADDR)));
        assert!(announces_change(&[msg(16), msg(RTM_DELADDR)].concat()));
        assert!(!announces_change(&msg(16))); // RTM_NEWLINK
        assert!(!announces_change(&[1, 2, 3]));
    }

    #[tokio::test]
    async fn the_watch_starts_with_the_current_addresses() {
        let rx = watch_addresses().expect("rtnetlink");
        assert_eq!(*rx.borrow(), all_prefixes());
        assert_eq!(
            filtered(&rx.borrow(), InterfaceFilter::default()),
            local_interface_prefixes()
        );
    }

    #[test]
    fn reads_interfaces_as_host_prefixes() {
        // Every Linux machine (and network namespace) has lo; with loopback
        // kept, 127.0.0.1/32 is there unless lo is down without addresses.
        let all = interface_prefixes(InterfaceFilter {
            loopback: true,
            link_local: true,
        });
        for p in &all {
            assert_eq!(p.prefix_len(), p.max_prefix_len(), "{p}");
        }
        let default = local_interface_prefixes();
        assert!(default.iter().all(|p| !p.addr().is_loopback()));
        assert!(default.iter().all(|p| all.contains(p)));
        let mut sorted = default.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, default);
    }
}

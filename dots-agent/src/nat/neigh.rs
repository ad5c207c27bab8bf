//! The neighbour table (ARP / NDP) over rtnetlink (`RTM_GETNEIGH` dump):
//! the MAC address of an internal device, for the operator only.

use std::{collections::HashMap, fmt, net::IpAddr};

use super::NatError;
use crate::netlink;

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// NUD_INCOMPLETE | NUD_FAILED: entries without a usable link-layer address.
const NUD_UNUSABLE: u16 = 0x01 | 0x20;

/// A 48-bit MAC address, shown as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses the payload of one `RTM_NEWNEIGH` message.
fn parse_neigh(payload: &[u8]) -> Option<(IpAddr, Mac)> {
    let state = u16::from_ne_bytes(payload.get(8..10)?.try_into().ok()?);
    if state & NUD_UNUSABLE != 0 {
        return None;
    }
    let (mut dst, mut mac) = (None, None);
    for (ty, p) in netlink::attrs(payload.get(NDMSG_LEN..)?) {
        match ty {
            NDA_DST => {
                dst = match p.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(p).ok()?)),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(p).ok()?)),
                    _ => None,
                }
            }
            NDA_LLADDR => mac = <[u8; 6]>::try_from(p).ok().map(Mac),
            _ => {}
        }
    }
    Some((dst?, mac?))
}

/// The IPv4 and IPv6 neighbours of the current network namespace that have
/// a usable MAC address.
pub fn neighbours() -> Result<HashMap<IpAddr, Mac>, NatError> {
    let mut sock = netlink::Socket::open(NETLINK_ROUTE, 0).map_err(NatError::Open)?;
    let seq = sock.next_seq();
    let mut req = Vec::new();
    netlink::put_header(
        &mut req,
        RTM_GETNEIGH,
        netlink::NLM_F_REQUEST | netlink::NLM_F_DUMP,
        seq,
        NDMSG_LEN,
    );
    // ndmsg with family AF_UNSPEC: every family.
    req.extend_from_slice(&[0u8; NDMSG_LEN]);
    let mut out = HashMap::new();
    sock.dump(&req, seq, |m| {
        if m.ty == RTM_NEWNEIGH {
            if let Some((ip, mac)) = parse_neigh(m.payload) {
                out.insert(ip, mac);
            }
        }
    })
    .map_err(NatError::Neighbours)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::netlink::test_attr as attr;

    #[test]
    fn parses_a_neighbour() {
        let mut p = vec![2, 0, 0, 0, 5, 0, 0, 0];
        p.extend_from_slice(&0x02u16.to_ne_bytes()); // NUD_REACHABLE
        p.extend_from_slice(&[0, 0]);
        p.extend(attr(NDA_DST, &[192, 0, 2, 2]));
        p.extend(attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 0xab]));
        let (ip, mac) = parse_neigh(&p).unwrap();
        assert_eq!(ip, "192.0.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(mac.to_string(), "02:00:00:00:00:ab");
        // An incomplete entry is left out.
        p[8..10].copy_from_slice(&0x01u16.to_ne_bytes());
        assert!(parse_neigh(&p).is_none());
    }
}

//! The few netlink primitives the agent needs, written by hand over a
//! raw `AF_NETLINK` socket: message framing, attribute walking, a dump loop.
//!
//! Kept deliberately small; see docs/nat.md for why no netlink crate. Used
//! by NAT correlation (conntrack, neighbours) and by the address watch of
//! [`crate::netif`].

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

/// Rounds up to the 4-byte netlink alignment.
pub(crate) const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message: its type, flags, sequence number and payload (after
/// the 16-byte header).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub ty: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Walks the messages of one datagram. Stops at the first malformed header.
pub(crate) fn messages(mut buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg = Msg {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().ok()?),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align4(len).min(buf.len())..];
        Some(msg)
    })
}

/// Walks a run of netlink attributes: `(type without flag bits, payload)`.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        if len < 4 || len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, payload))
    })
}

/// Appends a netlink header for a message of `payload_len` bytes.
pub(crate) fn put_header(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, payload_len: usize) {
    out.extend_from_slice(&((NLMSG_HDRLEN + payload_len) as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
}

/// A raw netlink socket of one protocol, in the network namespace of the
/// thread that opened it.
#[derive(Debug)]
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens and binds a socket of `protocol`, joined to the multicast
    /// `groups` bitmask (0: none).
    pub(crate) fn open(protocol: i32, groups: u32) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        // SAFETY: `sa` is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 0 })
    }

    /// Asks for a receive buffer of `bytes` (beyond rmem_max when permitted).
    pub(crate) fn set_rcvbuf(&self, bytes: usize) {
        let v = bytes.min(i32::MAX as usize) as libc::c_int;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with an int option value.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &v as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc == 0 {
                return;
            }
        }
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: buffer valid for its length; the kernel is the default peer.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram into `buf`, returning its length.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buffer valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Waits until the socket is readable; false on timeout.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        loop {
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc >= 0 {
                return Ok(rc > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `request` (a complete message with sequence `seq` and
    /// NLM_F_DUMP) and hands every answer message to `each` until the dump
    /// ends.
    pub(crate) fn dump(
        &self,
        request: &[u8],
        seq: u32,
        mut each: impl FnMut(Msg<'_>),
    ) -> io::Result<()> {
        self.send(request)?;
        // Dump datagrams are at most 32 KiB; leave room.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "netlink socket closed",
                ));
            }
            for m in messages(&buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => each(m),
                }
            }
        }
    }
}

/// One attribute (header, payload, padding): the tests build messages with it.
#[cfg(test)]
pub(crate) fn test_attr(ty: u16, p: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + p.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(p);
    v.resize(align4(v.len()), 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_messages_and_attributes() {
        let mut buf = Vec::new();
        // One attribute of type 3 (with the nested flag) carrying 5 bytes,
        // then one of type 1 with 2 bytes.
        let mut payload = Vec::new();
        payload.extend_from_slice(&9u16.to_ne_bytes());
        payload.extend_from_slice(&(3u16 | 0x8000).to_ne_bytes());
        payload.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        payload.extend_from_slice(&6u16.to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(&[7, 8, 0, 0]);
        put_header(&mut buf, 0x100, 0, 42, payload.len());
        buf.extend_from_slice(&payload);
        put_header(&mut buf, NLMSG_DONE, 0, 42, 0);
        let msgs: Vec<_> = messages(&buf).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].ty, msgs[0].seq), (0x100, 42));
        assert_eq!(msgs[1].ty, NLMSG_DONE);
        let a: Vec<_> = attrs(msgs[0].payload).collect();
        assert_eq!(a, vec![(3, &[1u8, 2, 3, 4, 5][..]), (1, &[7u8, 8][..])]);
    }

    #[test]
    fn malformed_input_stops_cleanly() {
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
        // Length field larger than the buffer.
        let mut buf = Vec::new();
        put_header(&mut buf, 1, 0, 1, 100);
        assert_eq!(messages(&buf).count(), 0);
        // Attribute of length 2 (< header).
        assert_eq!(attrs(&[2, 0, 1, 0, 9, 9]).count(), 0);
    }
}

//! Shared helpers of the integration tests: network namespaces that clean up
//! after themselves, raw packet sockets, and a private bpffs directory.
//!
//! Every namespace and directory gets a unique name (process id + counter),
//! and is removed on drop, so a failing test leaves nothing behind.

use std::{
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod bench;
pub mod detector;
pub mod lab;
pub mod packet;
pub mod procs;

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, failing with its stderr when it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("could not start {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(&format!("dots-{tag}-"));
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip netns exec <ns> ...`
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there stay in the namespace wherever they are used afterwards.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.name);
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd only affects this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {path} panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Connects `a` in namespace `na` to `b` in namespace `nb` with a veth pair,
/// both ends up.
pub fn veth(na: &Netns, a: &str, nb: &Netns, b: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", a, "netns", &na.name, "type", "veth", "peer", "name", b, "netns",
        &nb.name,
    ])?;
    na.ip(&["link", "set", "dev", a, "up"])?;
    nb.ip(&["link", "set", "dev", b, "up"])?;
    Ok(())
}

/// A private bpffs directory for one test, torn down (with everything pinned
/// in it) on drop.
pub struct BpffsDir {
    pub path: PathBuf,
}

impl BpffsDir {
    pub fn new() -> Result<BpffsDir> {
        ensure_bpffs()?;
        Ok(BpffsDir {
            path: PathBuf::from(format!("/sys/fs/bpf/{}", unique("dots-test-"))),
        })
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = dots_agent::enforce::Dataplane::teardown(&self.path);
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}

/// An AF_PACKET socket bound to one interface: sends raw frames, receives
/// every frame the interface sees.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

/// An AF_PACKET socket (`flags` added to `SOCK_RAW`) bound to `iface`,
/// receiving every frame; with the interface index. Call inside
/// [`Netns::enter`] of the interface's namespace.
pub fn packet_socket(iface: &str, flags: i32) -> Result<(OwnedFd, i32)> {
    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | flags, proto) };
    if raw < 0 {
        bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    if ifindex == 0 {
        bail!("no interface {iface}");
    }
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto as u16;
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "bind AF_PACKET to {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok((fd, ifindex))
}

impl PacketSocket {
    /// Opens the socket; call inside [`Netns::enter`] of the interface's namespace.
    pub fn open(iface: &str) -> Result<PacketSocket> {
        let (fd, ifindex) = packet_socket(iface, libc::SOCK_NONBLOCK)?;
        Ok(PacketSocket { fd, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: buffer and address are valid for the sizes given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frames received (incoming only) until `quiet` passes with nothing new
    /// or `max` elapses.
    pub fn drain(&self, quiet: Duration, max: Duration) -> Vec<Vec<u8>> {
        let start = Instant::now();
        let mut last = Instant::now();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < max && last.elapsed() < quiet {
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffers valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n > 0 {
                if from.sll_pkttype != libc::PACKET_OUTGOING {
                    out.push(buf[..n as usize].to_vec());
                }
                last = Instant::now();
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        out
    }
}

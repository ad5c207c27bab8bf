//! systemd's service notification protocol (sd_notify(3)), for units of
//! `Type=notify`: `READY=1` once the daemon serves, `STATUS=` lines that
//! `systemctl status` shows, `WATCHDOG=1` keep-alives when the unit sets
//! `WatchdogSec=`, and `RELOADING=1` / `STOPPING=1`.
//!
//! The protocol is one Unix datagram of newline-separated assignments to
//! the socket named by `$NOTIFY_SOCKET`: a path, or an abstract address
//! written with a leading `@`. Without the variable (not started by
//! systemd) every call does nothing.

use std::{
    ffi::OsStr,
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    sync::Arc,
    time::Duration,
};

/// The notification socket of the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a notifier that does nothing when it is unset
    /// or unusable (logged at debug).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) => Notifier::to(&v).unwrap_or_else(|e| {
                tracing::debug!(socket = ?v, error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                Notifier::disabled()
            }),
            None => Notifier::disabled(),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// Notifies the socket at `addr`: a path, or `@name` for an abstract
    /// address.
    pub fn to(addr: &OsStr) -> io::Result<Notifier> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = addr.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(addr)?,
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])?
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "only path and abstract (@) addresses are supported",
                ))
            }
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((sock, target)),
        })
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::debug!(error = %e, "could not notify systemd");
        }
    }

    /// The daemon serves: `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send_logged(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// The status line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.send_logged(&format!("STATUS={}", one_line(status)));
    }

    /// A reload starts; [`Notifier::ready`] ends it. Carries the monotonic
    /// time `Type=notify-reload` asks for.
    pub fn reloading(&self) {
        self.send_logged(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// The daemon is stopping.
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1");
    }

    /// The watchdog keep-alive.
    pub fn watchdog(&self) {
        self.send_logged("WATCHDOG=1");
    }
}

/// A status may not span lines: the protocol is line-based.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The watchdog period systemd expects (`$WATCHDOG_USEC`), when it is meant
/// for this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_period() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_period_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_period_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let us = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(us))
}

/// Sends `WATCHDOG=1` at half the period systemd expects, while the
/// runtime runs; nothing when no watchdog is set.
pub fn spawn_watchdog(n: Arc<Notifier>) {
    let Some(period) = watchdog_period().filter(|_| n.is_enabled()) else {
        return;
    };
    tracing::debug!(period = ?period, "systemd watchdog: pinging at half the period");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            n.watchdog();
        }
    });
}

/// Keeps the `STATUS=` line current: `status` is read every second and
/// sent when it changed (so at most once a second).
pub fn spawn_status(n: Arc<Notifier>, status: impl Fn() -> String + Send + 'static) {
    if !n.is_enabled() {
        return;
    }
    tokio::spawn(async move {
        let mut last = String::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = status();
            if now != last {
                n.status(&now);
                last = now;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifies_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("dots-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.as_os_str()).unwrap();
        assert!(n.is_enabled());
        n.ready("1/1 sessions up\n0 mitigations");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=1/1 sessions up 0 mitigations");
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1");
        n.reloading();
        let r = recv(&sock);
        assert!(r.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{r}");
        let usec: u64 = r.rsplit('=').next().unwrap().parse().unwrap();
        assert!(usec > 0);
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("dots-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(OsStr::new(&format!("@{name}"))).unwrap();
        n.status("serving");
        assert_eq!(recv(&sock), "STATUS=serving");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("x");
        assert!(n.send("READY=1").is_ok());
        assert!(Notifier::to(OsStr::new("vsock:2:1234")).is_err());
        assert!(Notifier::to(OsStr::new("")).is_err());
    }

    #[test]
    fn watchdog_period_is_for_this_process_only() {
        assert_eq!(
            watchdog_period_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_period_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_period_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period_from(None, None, 7), None);
        assert_eq!(watchdog_period_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_period_from(Some("x"), None, 7), None);
    }
}

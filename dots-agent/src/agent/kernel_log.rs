//! The XDP program's own log (aya-log) in the agent's log: the program
//! reports each slot it ended at its expiry, which happens when the agent
//! was not there (or not quick enough) to remove it.

use std::os::fd::AsRawFd;

use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::warn;

/// Reads the program's log records as they arrive and writes them to the
/// `log` facade, which the agent's tracing subscriber picks up.
pub(crate) async fn forward<T: log::Log + Send + 'static>(reader: EbpfLogger<T>)
where
    EbpfLogger<T>: AsRawFd,
{
    // SAFETY: the reader owns its ring buffer's descriptor, which stays open
    // and the same for as long as the reader lives, and the AsyncFd owns
    // the reader.
    let registered = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e.into_parts().1, "the XDP program's own log is not read");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

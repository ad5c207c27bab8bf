//! The DTLS calls that the `openssl` crate does not wrap: the
//! retransmission timer (DTLSv1_get_timeout / DTLSv1_handle_timeout, which
//! are SSL_ctrl macros) and the stateless cookie exchange (DTLSv1_listen).

use std::{
    io,
    os::raw::{c_int, c_long, c_void},
    ptr,
    time::Duration,
};

use foreign_types::ForeignTypeRef;
use openssl::{error::ErrorStack, ssl::SslRef};

const DTLS_CTRL_GET_TIMEOUT: c_int = 73;
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

extern "C" {
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut c_void) -> c_int;
    fn BIO_ADDR_new() -> *mut c_void;
    fn BIO_ADDR_free(a: *mut c_void);
}

/// DTLSv1_get_timeout: the time left on the retransmission timer, if running.
pub(super) fn dtls_timeout(ssl: &SslRef) -> Option<Duration> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: valid SSL pointer; parg points to a timeval as the ctrl expects.
    let r = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            &mut tv as *mut _ as *mut c_void,
        )
    };
    (r == 1).then(|| {
        Duration::new(
            tv.tv_sec.max(0) as u64,
            (tv.tv_usec.clamp(0, 999_999) as u32) * 1000,
        )
    })
}

/// DTLSv1_handle_timeout: retransmits the last flight if the timer expired.
pub(super) fn dtls_handle_timeout(ssl: &SslRef) -> io::Result<()> {
    // SAFETY: valid SSL pointer; the ctrl takes no argument.
    let r: c_long = unsafe {
        openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, ptr::null_mut())
    };
    tracing::trace!(result = r, "DTLSv1_handle_timeout");
    if r < 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "DTLS retransmission limit reached",
        ));
    }
    Ok(())
}

/// DTLSv1_listen: answers a ClientHello without a valid cookie with a
/// HelloVerifyRequest and keeps no state; true when the ClientHello carried
/// a valid cookie (the peer's address is verified).
pub(super) fn dtls_listen(ssl: &SslRef) -> Result<bool, ErrorStack> {
    // SAFETY: plain FFI calls on a live SSL whose BIOs are set; the address
    // is allocated and freed here.
    let r = unsafe {
        let addr = BIO_ADDR_new();
        if addr.is_null() {
            return Err(ErrorStack::get());
        }
        let r = DTLSv1_listen(ssl.as_ptr(), addr);
        BIO_ADDR_free(addr);
        r
    };
    Ok(r == 1)
}

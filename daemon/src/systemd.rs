//! `sd_notify(3)` without libsystemd: one datagram to `$NOTIFY_SOCKET`.
//!
//! Used for `READY=1` once the listener is bound and the store migrated, `STOPPING=1`
//! when shutdown starts, and `STATUS=` lines (which also tell tests the bound address).

use std::os::unix::net::UnixDatagram;

/// Sends `state` to the service manager if one is listening; otherwise does nothing.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract namespace socket.
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(cause = %e, "sd_notify failed");
    }
}

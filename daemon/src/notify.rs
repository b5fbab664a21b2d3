//! systemd's notify protocol (`Type=notify`): readiness, status, stopping, and watchdog pings,
//! sent as datagrams to `$NOTIFY_SOCKET`. Without that variable (not under systemd) every call
//! does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification, e.g. `READY=1` or `STATUS=3 tunnels`. Errors are ignored: systemd's
/// absence must never stop the daemon.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any: ping at half of it.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// Tells systemd the daemon is ready and pings its watchdog until `shutdown`, then says stopping.
pub fn ready_and_watchdog(shutdown: tokio_util::sync::CancellationToken) {
    notify("READY=1");
    tokio::spawn(async move {
        let every = watchdog_interval();
        loop {
            let tick = async {
                match every {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick => notify("WATCHDOG=1"),
            }
        }
        notify("STOPPING=1");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("burrow-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in this binary touching these variables.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &path);
            std::env::set_var("WATCHDOG_USEC", "30000000");
        }
        notify("READY=1");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

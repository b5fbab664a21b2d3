//! The agent's flow-control window on a QUIC tunnel.
//!
//! A window is credit, not memory: it is what the peer may send before the receiver reads, so
//! it is what a receiver may have to hold when it reads slower than the link delivers. A device
//! wants it no larger than its transfers need. SSH, the tunnel's traffic, never has more than
//! its channel window in flight (2 MB for OpenSSH), so a larger stream window buys SSH nothing.

/// How much one stream of a QUIC tunnel may have in flight towards the agent; four times that
/// is the whole tunnel's receive window and the most the agent keeps unacknowledged towards the
/// proxy. TLS + yamux tunnels size their windows themselves (yamux starts a stream at 256 KiB
/// and grows it with the round trip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(u32);

#[derive(Debug, thiserror::Error)]
#[error("{0} bytes is outside 64 KiB to 16 MiB")]
pub struct WindowError(u64);

impl Window {
    pub const MIN: u32 = 64 * 1024;
    pub const MAX: u32 = 16 * 1024 * 1024;
    /// OpenSSH's channel window.
    pub const DEFAULT: Window = Window(2 * 1024 * 1024);

    pub fn new(bytes: u64) -> Result<Window, WindowError> {
        match u32::try_from(bytes) {
            Ok(b) if (Self::MIN..=Self::MAX).contains(&b) => Ok(Window(b)),
            _ => Err(WindowError(bytes)),
        }
    }

    /// One stream's receive window, in bytes.
    pub fn stream(self) -> u32 {
        self.0
    }

    /// The tunnel's receive window and the agent's send window, in bytes.
    pub fn tunnel(self) -> u32 {
        self.0 * 4
    }
}

impl Default for Window {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_between_64_kib_and_16_mib() {
        assert!(Window::new(64 * 1024 - 1).is_err());
        assert!(Window::new(16 * 1024 * 1024 + 1).is_err());
        assert!(Window::new(u64::MAX).is_err());
        let w = Window::new(512 * 1024).unwrap();
        assert_eq!((w.stream(), w.tunnel()), (512 * 1024, 2 * 1024 * 1024));
        assert_eq!(Window::default().stream(), 2 * 1024 * 1024);
    }
}

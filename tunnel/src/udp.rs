//! The agent's UDP socket for QUIC: quinn's own, without receive offload.
//!
//! quinn sizes an endpoint's receive buffer for the largest batch its socket can hand over at
//! once, and touches all of it: 32 datagrams × 64 GRO segments × 1,472 bytes = 2.9 MB, as much
//! as the rest of an idle agent's heap and code together. A device's tunnel never needs that
//! batch; without GRO the buffer is 32 × 1,472 = 46 KB and each datagram arrives on its own.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// `socket` as quinn's runtime wraps it, with GRO turned off again where the wrapper turned it
/// on. Where it cannot be turned off, quinn's own socket, buffer and all.
pub(crate) fn without_gro(
    socket: std::net::UdpSocket,
    runtime: &dyn Runtime,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    // The same socket under a second descriptor: options set on one are the socket's.
    let twin = socket.try_clone()?;
    let quinn = runtime.wrap_udp_socket(socket)?;
    if quinn.max_receive_segments() == 1 {
        return Ok(quinn);
    }
    match nix::sys::socket::setsockopt(&twin, nix::sys::socket::sockopt::UdpGroSegment, &false) {
        Ok(()) => Ok(Arc::new(NoGro(quinn))),
        Err(e) => {
            tracing::debug!(error = %e, "cannot turn UDP GRO off; QUIC keeps its large buffer");
            Ok(quinn)
        }
    }
}

/// quinn's socket, saying that it hands over one datagram per receive slot (which it does once
/// GRO is off).
struct NoGro(Arc<dyn AsyncUdpSocket>);

impl fmt::Debug for NoGro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NoGro").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for NoGro {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

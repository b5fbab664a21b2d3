//! The agent's UDP socket for QUIC: quinn's own, without receive offload, and with the
//! proxies' restart nudges taken out.
//!
//! quinn sizes an endpoint's receive buffer for the largest batch its socket can hand over at
//! once, and touches all of it: 32 datagrams × 64 GRO segments × 1,472 bytes = 2.9 MB, as much
//! as the rest of an idle agent's heap and code together. A device's tunnel never needs that
//! batch; without GRO the buffer is 32 × 1,472 = 46 KB and each datagram arrives on its own.
//! A restart nudge ([`crate::nudge`]) is not QUIC: it is handed to [`Nudges`] instead.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use crate::nudge::Nudges;

/// `socket` as quinn's runtime wraps it, with GRO turned off again where the wrapper turned it
/// on (where it cannot be, quinn's large buffer stays), and nudges handed to `nudges`.
pub(crate) fn agent_socket(
    socket: std::net::UdpSocket,
    runtime: &dyn Runtime,
    nudges: Arc<Nudges>,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    // The same socket under a second descriptor: options set on one are the socket's.
    let twin = socket.try_clone()?;
    let quinn = runtime.wrap_udp_socket(socket)?;
    let mut segments = quinn.max_receive_segments();
    if segments > 1 {
        match nix::sys::socket::setsockopt(&twin, nix::sys::socket::sockopt::UdpGroSegment, &false)
        {
            Ok(()) => segments = 1,
            Err(e) => {
                tracing::debug!(error = %e, "cannot turn UDP GRO off; QUIC keeps its large buffer")
            }
        }
    }
    Ok(Arc::new(AgentSocket {
        quinn,
        segments,
        nudges,
    }))
}

/// quinn's socket, saying how many datagrams it hands over per receive slot (one once GRO is
/// off), and keeping nudges from QUIC.
struct AgentSocket {
    quinn: Arc<dyn AsyncUdpSocket>,
    segments: usize,
    nudges: Arc<Nudges>,
}

impl fmt::Debug for AgentSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AgentSocket").field(&self.quinn).finish()
    }
}

impl AsyncUdpSocket for AgentSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.quinn.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.quinn.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let received = ready!(self.quinn.poll_recv(cx, bufs, meta))?;
            // Nudges out; the datagrams after one move up a slot.
            let mut kept = 0;
            for i in 0..received {
                let len = meta[i].len;
                if self.nudges.take(&bufs[i][..len]) {
                    continue;
                }
                if kept != i {
                    let (head, tail) = bufs.split_at_mut(i);
                    head[kept][..len].copy_from_slice(&tail[0][..len]);
                    meta[kept] = meta[i];
                }
                kept += 1;
            }
            // Nothing but nudges: wait for the next datagram (the socket registers the waker).
            if kept > 0 || received == 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.quinn.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.quinn.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.segments
    }

    fn may_fragment(&self) -> bool {
        self.quinn.may_fragment()
    }
}

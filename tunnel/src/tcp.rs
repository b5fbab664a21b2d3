//! TLS 1.3 + yamux over TCP: the tunnel where UDP does not get through.
//!
//! A yamux connection is owned by one driver task that polls it; opens reach it over a channel
//! and inbound streams leave it over another, so a [`Session`] is a cheap, cloneable handle. The
//! TCP socket under it carries the agent's keep-alive as kernel probes ([`Keepalive::apply_tcp`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::keepalive::{self, Keepalive};
use crate::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, Inner, MAX_STREAMS, Peer, Session, Transport,
    TransportError, TunnelStream, YamuxHandle, server_name,
};

impl Session {
    /// Runs yamux over an established TLS stream (`transport`: TCP or Upgrade).
    pub(crate) fn from_tls<S>(tls: S, peer: Peer, (server, transport): (bool, Transport)) -> Self
    where
        S: TcpBacked + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mode = if server {
            yamux::Mode::Server
        } else {
            yamux::Mode::Client
        };
        let keepalive = keepalive::Requested::default();
        let heard = Heard::default();
        heard.mark();
        let io = Tuned {
            io: tls,
            keepalive: keepalive.clone(),
            heard: heard.clone(),
        };
        // Boxed: the driver's future would otherwise hold the connection (1.5 KB) twice, as its
        // argument and as its local (an async fn keeps both), in every idle tunnel.
        let conn = Box::new(yamux::Connection::new(io.compat(), yamux_config(), mode));
        let (open_tx, open_rx) = mpsc::channel(64);
        let (inbound_tx, inbound_rx) = mpsc::channel(256);
        let closed = CancellationToken::new();
        tokio::spawn(drive_yamux(conn, open_rx, inbound_tx, closed.clone()));
        Self {
            remote: peer.remote,
            inner: Inner::Yamux(Arc::new(YamuxHandle {
                open: open_tx,
                inbound: Mutex::new(inbound_rx),
                closed,
                keepalive,
                transport,
                heard,
            })),
            peer_certs: Arc::new(peer.certs),
            resumed: peer.resumed,
        }
    }
}

fn yamux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // yamux insists on at least 256 KiB per stream: set the stream count first.
    cfg.set_max_num_streams(MAX_STREAMS as usize)
        .set_max_connection_receive_window(Some(CONNECTION_WINDOW as usize));
    cfg
}

type OpenRequest = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// The one task that owns a yamux connection: it polls inbound streams, serves open requests,
/// and closes the connection when asked.
async fn drive_yamux<T>(
    mut conn: Box<yamux::Connection<T>>,
    mut opens: mpsc::Receiver<OpenRequest>,
    inbound: mpsc::Sender<TunnelStream>,
    closed: CancellationToken,
) where
    T: futures_io::AsyncRead + futures_io::AsyncWrite + Unpin,
{
    use std::task::Poll;
    let mut pending_open: Option<OpenRequest> = None;
    let result = std::future::poll_fn(|cx| {
        if closed.is_cancelled() {
            return Poll::Ready(Ok(()));
        }
        // Serve open requests, one at a time.
        loop {
            if pending_open.is_none() {
                match opens.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => pending_open = Some(tx),
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(r) => {
                    if let Some(tx) = pending_open.take() {
                        let _ = tx.send(r);
                    }
                }
                Poll::Pending => break,
            }
        }
        // Drive the connection and take inbound streams; this also moves all stream I/O.
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // A peer that opens streams faster than they are handled gets them dropped
                    // (reset) rather than queued without bound.
                    if inbound.try_send(Box::new(stream.compat())).is_err() {
                        tracing::debug!("dropping an inbound stream: too many waiting");
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let result = tokio::select! {
        r = result => r,
        _ = closed.cancelled() => Ok(()),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "yamux connection ended");
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        std::future::poll_fn(|cx| conn.poll_close(cx)),
    )
    .await;
    closed.cancel();
}

/// The server side of a TLS + yamux tunnel on an accepted, handshaken connection.
pub fn accept_tls(tls: tokio_rustls::server::TlsStream<TcpStream>, remote: SocketAddr) -> Session {
    let peer = Peer::of(tls.get_ref().1, remote);
    Session::from_tls(tls, peer, (true, Transport::Tcp))
}

/// Dials a TLS + yamux tunnel.
pub async fn connect_tcp(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    keepalive: Keepalive,
) -> Result<Session, TransportError> {
    let (tcp, remote) = dial_tcp(addr, keepalive).await?;
    let name = server_name(addr);
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .map_err(|_| TransportError::Handshake {
        addr: addr.to_string(),
        reason: "timed out".into(),
    })?
    .map_err(|e| TransportError::Handshake {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    // What answered is not a proxy's tunnel port: a balancer that terminates TLS, say (its
    // certificate can pass where public roots are trusted). Said now, not by a yamux timeout.
    if stream.get_ref().1.alpn_protocol() != Some(crate::ALPN_TUNNEL) {
        return Err(TransportError::Handshake {
            addr: addr.to_string(),
            reason: "the server did not take the tunnel protocol (ALPN burrow-tunnel/1): a balancer that terminates TLS?".into(),
        });
    }
    let peer = Peer::of(stream.get_ref().1, remote);
    Ok(Session::from_tls(stream, peer, (false, Transport::Tcp)))
}

/// The TCP connection under a tunnel to `addr` (through the egress proxy where one applies),
/// with its keep-alive, and the address it reached.
pub(crate) async fn dial_tcp(
    addr: &str,
    keepalive: Keepalive,
) -> Result<(TcpStream, SocketAddr), TransportError> {
    let fail = |reason: String| TransportError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, burrow_net::egress::connect(addr))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    set_tcp_keepalive(&tcp, keepalive);
    let remote = tcp.peer_addr().map_err(|e| fail(e.to_string()))?;
    Ok((tcp, remote))
}

/// TCP keep-alives under the tunnel: the kernel notices a dead peer even when yamux is idle.
pub fn set_tcp_keepalive(tcp: &TcpStream, k: Keepalive) {
    k.apply_tcp(socket2::SockRef::from(tcp));
}

/// A stream over TCP (TLS over TCP, TLS inside TLS over TCP), whose socket options can still
/// be set.
pub trait TcpBacked {
    fn tcp(&self) -> &TcpStream;
}

impl TcpBacked for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl<S: TcpBacked> TcpBacked for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<S: TcpBacked> TcpBacked for tokio_rustls::client::TlsStream<S> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

/// A tunnel's TLS stream inside its yamux driver, applying a keep-alive asked for through
/// [`Session::set_keepalive`] at its next read or write.
struct Tuned<S> {
    io: S,
    keepalive: keepalive::Requested,
    heard: Heard,
}

/// When a yamux tunnel last read bytes from its peer, whatever stream they were for: a busy
/// tunnel whose control stream waits behind bulk data is still heard from.
#[derive(Clone, Default)]
pub(crate) struct Heard(Arc<std::sync::atomic::AtomicU64>);

impl Heard {
    /// Milliseconds since this process's first tunnel, on the monotonic clock.
    fn now() -> u64 {
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        BASE.get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    fn mark(&self) {
        self.0
            .store(Self::now(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How long ago bytes last came in (since the tunnel began, if none yet).
    pub(crate) fn idle(&self) -> Duration {
        let last = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_millis(Self::now().saturating_sub(last))
    }
}

impl<S: TcpBacked> Tuned<S> {
    fn tune(&self) {
        if let Some(k) = self.keepalive.take() {
            set_tcp_keepalive(self.io.tcp(), k);
        }
    }
}

impl<S: TcpBacked + AsyncRead + Unpin> AsyncRead for Tuned<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.tune();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.heard.mark();
        }
        polled
    }
}

write_through!(Tuned where [TcpBacked + AsyncWrite + Unpin], tune);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yamux_config_is_accepted() {
        // yamux asserts its invariants at configuration time; a bad constant panics here.
        let _ = yamux_config();
    }
}

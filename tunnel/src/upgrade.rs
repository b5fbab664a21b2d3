//! TLS + yamux inside an HTTP/1.1 Upgrade: tunnels for nodes that reach the cluster through a
//! balancer that terminates TLS and forwards HTTP (an L7 load balancer, a reverse proxy, an
//! ingress), where neither ALPN nor a client certificate gets through.
//!
//! The agent opens HTTPS to the web address (the balancer's certificate, checked as the web API
//! checks it), sends `GET /v1/webapi/tunnel` with `Upgrade: burrow-tunnel/1`, and once the proxy
//! answers `101 Switching Protocols` runs a second TLS 1.3 handshake inside the upgraded stream:
//! the same mutual TLS as a TCP tunnel, the node's certificate and key against the proxy's
//! cluster certificate, then yamux. The balancer relays the inner handshake and the tunnel as
//! ciphertext: it can neither read them nor pass for either end.

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_net::web::{HeadError, MAX_HEAD};
use bytes::{Buf, Bytes};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tunnel_proto::api::{TUNNEL_UPGRADE, TUNNEL_UPGRADE_PATH};

use crate::tcp::{TcpBacked, dial_tcp};
use crate::{CONNECT_TIMEOUT, Keepalive, Peer, Session, Transport, TransportError};

/// The two TLS configurations of an upgraded tunnel: `web` for the HTTPS connection to the web
/// address (whatever certificate the web API trusts there, no client certificate), `tunnel`
/// for the mutual TLS inside it (the node's identity; only the cluster's host CA).
pub struct TunnelTls {
    pub web: Arc<ClientConfig>,
    pub tunnel: Arc<ClientConfig>,
}

/// Dials a tunnel through the web address `addr`: HTTPS, the Upgrade, then mutual TLS and yamux
/// inside it.
pub async fn connect_upgrade(
    addr: &str,
    tls: &TunnelTls,
    keepalive: Keepalive,
) -> Result<Session, TransportError> {
    let handshake = |reason: String| TransportError::Handshake {
        addr: addr.to_string(),
        reason,
    };
    let (tcp, remote) = dial_tcp(addr, keepalive).await?;
    let name = crate::server_name(addr);
    let steps = async {
        let mut web = tokio_rustls::TlsConnector::from(tls.web.clone())
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| handshake(e.to_string()))?;
        web.write_all(request(addr).as_bytes())
            .await
            .map_err(|e| upgrade_error(addr, e.to_string()))?;
        web.flush()
            .await
            .map_err(|e| upgrade_error(addr, e.to_string()))?;
        let head = read_head(&mut web)
            .await
            .map_err(|e| upgrade_error(addr, e))?;
        check_switch(&head).map_err(|e| upgrade_error(addr, e))?;
        tokio_rustls::TlsConnector::from(tls.tunnel.clone())
            .connect(name, web)
            .await
            .map_err(|e| handshake(format!("inside the upgraded connection: {e}")))
    };
    let inner = tokio::time::timeout(CONNECT_TIMEOUT, steps)
        .await
        .map_err(|_| upgrade_error(addr, "timed out".into()))??;
    let peer = Peer::of(inner.get_ref().1, remote);
    Ok(Session::from_tls(inner, peer, (false, Transport::Upgrade)))
}

/// The server side: the mutual TLS handshake inside a stream the web port upgraded, `prefix`
/// being what the HTTP server had read of it already.
pub async fn accept_upgraded<S>(
    io: S,
    prefix: Bytes,
    tls: Arc<ServerConfig>,
    remote: SocketAddr,
) -> Result<Session, TransportError>
where
    S: TcpBacked + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Prefixed { prefix, io };
    let inner = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(tls).accept(io),
    )
    .await
    .map_err(|_| TransportError::Handshake {
        addr: remote.to_string(),
        reason: "timed out".into(),
    })?
    .map_err(|e| TransportError::Handshake {
        addr: remote.to_string(),
        reason: e.to_string(),
    })?;
    let peer = Peer::of(inner.get_ref().1, remote);
    Ok(Session::from_tls(inner, peer, (true, Transport::Upgrade)))
}

fn upgrade_error(addr: &str, reason: String) -> TransportError {
    TransportError::Upgrade {
        addr: addr.to_string(),
        reason,
    }
}

fn request(addr: &str) -> String {
    format!(
        "GET {TUNNEL_UPGRADE_PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {TUNNEL_UPGRADE}\r\nUser-Agent: burrow-agent/{}\r\n\r\n",
        tunnel_proto::VERSION
    )
}

/// Reads the answer's head, up to its blank line and not a byte further (what follows is the
/// inner TLS handshake).
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> Result<String, String> {
    burrow_net::web::read_head(io).await.map_err(|e| match e {
        HeadError::TooLong => format!("an answer head longer than {MAX_HEAD} bytes"),
        HeadError::Closed { partial } if partial.is_empty() => {
            "the connection closed without an answer".into()
        }
        HeadError::Closed { partial } => format!(
            "the connection closed in the answer: {:?}",
            first_line(&partial)
        ),
        HeadError::Io(e) => e.to_string(),
    })
}

fn first_line(head: &str) -> &str {
    head.lines().next().unwrap_or("").trim()
}

/// Whether an answer head switches to the tunnel protocol; else what it said instead.
fn check_switch(head: &str) -> Result<(), String> {
    let status = first_line(head);
    let code = status.split_whitespace().nth(1);
    if !status.starts_with("HTTP/1.") || code != Some("101") {
        return Err(format!(
            "the web address answered {status:?} instead of switching to a tunnel (a proxy older than this agent, or a balancer that does not pass Upgrade requests on)"
        ));
    }
    let upgrade = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("upgrade")
            .then(|| value.trim())
    });
    match upgrade {
        Some(p) if p.eq_ignore_ascii_case(TUNNEL_UPGRADE) => Ok(()),
        other => Err(format!(
            "the web address switched to {:?}, not {TUNNEL_UPGRADE}",
            other.unwrap_or("nothing")
        )),
    }
}

/// A stream whose first bytes were read already (by the HTTP server that took the Upgrade):
/// they are read again first.
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S: TcpBacked> TcpBacked for Prefixed<S> {
    fn tcp(&self) -> &TcpStream {
        self.io.tcp()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

write_through!(Prefixed where [AsyncWrite + Unpin]);

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn only_a_switch_to_the_tunnel_protocol_passes() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nUPGRADE: Burrow-Tunnel/1\r\n\r\n";
        assert_eq!(check_switch(ok), Ok(()));
        let e = check_switch("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").unwrap_err();
        assert!(e.contains("\"HTTP/1.1 404 Not Found\""), "{e}");
        assert!(e.contains("does not pass Upgrade"), "{e}");
        let e = check_switch("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
            .unwrap_err();
        assert!(e.contains("\"websocket\""), "{e}");
        assert!(check_switch("HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
        assert!(check_switch("SSH-2.0-OpenSSH_9.2\r\n\r\n").is_err());
        assert!(check_switch("").is_err());
    }

    #[test]
    fn the_request_asks_for_the_upgrade() {
        let r = request("lb.example:443");
        assert!(r.starts_with("GET /v1/webapi/tunnel HTTP/1.1\r\n"), "{r}");
        assert!(r.contains("\r\nHost: lb.example:443\r\n"));
        assert!(r.contains("\r\nConnection: Upgrade\r\nUpgrade: burrow-tunnel/1\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }

    #[tokio::test]
    async fn the_head_is_read_to_its_blank_line_and_not_further() {
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"HTTP/1.1 101 OK\r\nUpgrade: x\r\n\r\nTLS-BYTES")
            .await
            .unwrap();
        drop(b);
        let head = read_head(&mut a).await.unwrap();
        assert_eq!(head, "HTTP/1.1 101 OK\r\nUpgrade: x\r\n\r\n");
        let mut rest = String::new();
        a.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "TLS-BYTES");

        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"HTTP/1.1 502 Bad Gateway\r\n").await.unwrap();
        drop(b);
        let e = read_head(&mut a).await.unwrap_err();
        assert!(
            e.contains("closed in the answer: \"HTTP/1.1 502 Bad Gateway\""),
            "{e}"
        );

        let (mut a, mut b) = tokio::io::duplex(MAX_HEAD * 2);
        let writer = tokio::spawn(async move {
            let _ = b.write_all(&vec![b'x'; MAX_HEAD + 10]).await;
        });
        let e = read_head(&mut a).await.unwrap_err();
        assert!(e.contains("longer than"), "{e}");
        writer.abort();
    }

    #[tokio::test]
    async fn a_prefix_is_read_before_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut p = Prefixed {
            prefix: Bytes::from_static(b"hello"),
            io: a,
        };
        let mut all = String::new();
        p.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}

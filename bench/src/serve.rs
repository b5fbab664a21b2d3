//! What a simulated agent answers dials with, in place of the node's SSH server.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use burrow_agent::pool::{DialInfo, DialService};
use burrow_tunnel::TunnelStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Served = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Sends back every byte, then closes its side when the client closes its own.
pub struct Echo;

impl DialService for Echo {
    fn serve(self: Arc<Self>, stream: TunnelStream, _: DialInfo) -> Served {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }
}

/// Says an SSH-style banner first, as the node's SSH server does, then echoes: what a dial's
/// latency is measured to.
pub struct Banner;

/// The line [`Banner`] sends on every dial.
pub const BANNER: &[u8] = b"SSH-2.0-burrow-bench\r\n";

impl DialService for Banner {
    fn serve(self: Arc<Self>, mut stream: TunnelStream, dial: DialInfo) -> Served {
        Box::pin(async move {
            if stream.write_all(BANNER).await.is_ok() && stream.flush().await.is_ok() {
                Arc::new(Echo).serve(stream, dial).await;
            }
        })
    }
}

/// Reads and drops every byte.
pub struct Sink;

impl DialService for Sink {
    fn serve(self: Arc<Self>, mut stream: TunnelStream, _: DialInfo) -> Served {
        Box::pin(async move {
            let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
            let _ = stream.shutdown().await;
        })
    }
}

/// Sends zeros until the client goes away.
pub struct Source;

impl DialService for Source {
    fn serve(self: Arc<Self>, stream: TunnelStream, _: DialInfo) -> Served {
        Box::pin(async move {
            let (mut r, mut w) = tokio::io::split(stream);
            let chunk = vec![0u8; 64 * 1024];
            let mut scratch = [0u8; 1];
            loop {
                tokio::select! {
                    // The client closing its side (or anything it sends) ends the source.
                    _ = r.read(&mut scratch) => break,
                    written = w.write_all(&chunk) => if written.is_err() { break },
                }
            }
            let _ = w.shutdown().await;
        })
    }
}

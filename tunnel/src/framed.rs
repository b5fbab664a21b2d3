//! [`Message`] frames on a byte stream: the control stream's and a dial's first exchange.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tunnel_proto::wire::{self, Message, WireError};

/// Reads and writes [`Message`] frames on a stream.
pub struct Framed<S> {
    stream: S,
    buf: BytesMut,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            // Control messages are small; the buffer grows for a large one. Every tunnel holds
            // one at each end, so its idle size counts at 10,000 tunnels.
            buf: BytesMut::with_capacity(512),
        }
    }

    /// The next message; `None` when the peer closed the stream cleanly between frames.
    pub async fn read(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            if let Some((msg, used)) = wire::decode(&self.buf)? {
                self.buf.advance(used);
                return Ok(Some(msg));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    pub async fn write(&mut self, msg: &Message) -> Result<(), FrameError> {
        let mut out = Vec::new();
        wire::encode(msg, &mut out)?;
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The stream, with any bytes read past the last frame.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }
}

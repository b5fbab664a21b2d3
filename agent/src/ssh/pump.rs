//! Moving a session's bytes: client input to the program, and the program's output to the
//! client through a queue with a byte budget, so that a program blocked on its input never
//! stalls the session loop that delivers it (russh blocks its loop on a full channel).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use russh::ChannelId;
use russh::server::Handle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::record::Recorder;

/// Output on its way to the client: (extended stream, bytes).
type Chunk = (Option<u32>, Vec<u8>);

/// Most output bytes a session holds in memory when the client reads slower than the program
/// writes (beyond russh's own queue, `CHANNEL_QUEUE` packets). The client's SSH window (2 MB for
/// OpenSSH) is what keeps a link busy; this only decouples the program from the session loop.
const OUTPUT_BUDGET: usize = 256 * 1024;

/// Forwards output to the client in order. Readers hand chunks over without waiting for the SSH
/// session (whose loop may be busy pushing input the program has not read yet: waiting there
/// could deadlock), within a byte budget.
fn output_forwarder(handle: Handle, id: ChannelId) -> (OutputSender, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Chunk, tokio::sync::OwnedSemaphorePermit)>();
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTPUT_BUDGET));
    let task = tokio::spawn(async move {
        while let Some(((ext, bytes), _permit)) = rx.recv().await {
            let sent = match ext {
                None => handle.data(id, bytes).await,
                Some(e) => handle.extended_data(id, e, bytes).await,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    (OutputSender { tx, budget }, task)
}

#[derive(Clone)]
struct OutputSender {
    tx: mpsc::UnboundedSender<(Chunk, tokio::sync::OwnedSemaphorePermit)>,
    budget: Arc<tokio::sync::Semaphore>,
}

impl OutputSender {
    async fn send(&self, ext: Option<u32>, bytes: Vec<u8>) -> bool {
        let n = u32::try_from(bytes.len().min(OUTPUT_BUDGET)).unwrap_or(u32::MAX);
        let Ok(permit) = self.budget.clone().acquire_many_owned(n).await else {
            return false;
        };
        self.tx.send(((ext, bytes), permit)).is_ok()
    }
}

pub async fn pump_pty(
    master: Arc<OwnedFd>,
    mut input: mpsc::Receiver<Vec<u8>>,
    handle: Handle,
    id: ChannelId,
    recorder: Option<Arc<Recorder>>,
) {
    let (Ok(r), Ok(w)) = (master.try_clone(), master.try_clone()) else {
        return;
    };
    let mut reader = tokio::fs::File::from_std(std::fs::File::from(r));
    let mut writer = tokio::fs::File::from_std(std::fs::File::from(w));
    let writing = tokio::spawn(async move {
        while let Some(bytes) = input.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
            let _ = writer.flush().await;
        }
    });
    let (out, forwarding) = output_forwarder(handle, id);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break, // EIO once the last process on the terminal is gone
            Ok(n) => {
                if let Some(r) = &recorder {
                    r.output(&buf[..n]);
                }
                if !out.send(None, buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    }
    writing.abort();
    drop(out);
    let _ = forwarding.await;
}

pub async fn pump_pipes(
    stdin: Option<tokio::process::ChildStdin>,
    stdout: Option<tokio::process::ChildStdout>,
    stderr: Option<tokio::process::ChildStderr>,
    mut input: mpsc::Receiver<Vec<u8>>,
    (handle, id): (Handle, ChannelId),
    recorder: Option<Arc<Recorder>>,
) {
    let writing = tokio::spawn(async move {
        let Some(mut stdin) = stdin else { return };
        while let Some(bytes) = input.recv().await {
            if stdin.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The client sent EOF: the program sees its stdin end.
        let _ = stdin.shutdown().await;
    });
    let (sender, forwarding) = output_forwarder(handle, id);
    // A recording shows stdout and stderr as the one terminal a user would have seen.
    let out = {
        let sender = sender.clone();
        let recorder = recorder.clone();
        async move {
            let Some(mut stdout) = stdout else { return };
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Some(r) = &recorder {
                    r.output(&buf[..n]);
                }
                if !sender.send(None, buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    };
    let err = {
        let sender = sender.clone();
        async move {
            let Some(mut stderr) = stderr else { return };
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Some(r) = &recorder {
                    r.output(&buf[..n]);
                }
                if !sender.send(Some(1), buf[..n].to_vec()).await {
                    break;
                }
            }
        }
    };
    tokio::join!(out, err);
    drop(sender);
    let _ = forwarding.await;
    drop(writing);
}

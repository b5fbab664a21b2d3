//! The proxy's heap, where the C library's allocator is glibc's.
//!
//! A proxy's memory is mostly idle tunnels, each small and long-lived, set up by TLS or QUIC
//! handshakes that allocate and free several times as much on their way. glibc keeps what a
//! burst of handshakes freed (between the tunnels it left behind) in its arenas: measured with
//! `scripts/heap-profile.sh`, 1,000 idle TCP tunnels held about 18 KB of heap each and 36 KB of
//! resident memory. Two settings close most of that gap:
//! - fewer arenas ([`tune`]): glibc's default, eight per core, spreads a burst's garbage over
//!   many heaps that each keep their own;
//! - handing free pages back ([`trim_when_quiet`]) once a burst of tunnels coming or going is
//!   over.
//!
//! Elsewhere (musl, other systems) both do nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long tunnels must have stopped coming and going before the heap is trimmed.
pub const QUIET: Duration = Duration::from_secs(5);

/// Limits glibc to one arena per core (unless `MALLOC_ARENA_MAX` says otherwise). Call it before
/// the runtime starts its threads.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a parameter of the allocator; any value is accepted.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

/// Gives the heap's free pages back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; it frees nothing in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims the heap ([`trim`]) each time `churn` (a count of tunnels come and gone) has moved and
/// then stood still for [`QUIET`], until `shutdown`.
pub async fn trim_when_quiet(churn: impl Fn() -> u64, shutdown: CancellationToken) {
    let mut trimmed_at = churn();
    let mut last = trimmed_at;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(QUIET) => {}
        }
        let now = churn();
        if now == last && now != trimmed_at {
            // It walks every arena, holding its lock: not on a worker thread.
            let _ = tokio::task::spawn_blocking(trim).await;
            tracing::debug!(churn = now, "heap trimmed");
            trimmed_at = now;
        }
        last = now;
    }
}

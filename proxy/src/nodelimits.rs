//! What one joined node may make the proxy do: decisions without I/O or a clock of their own
//! (`now` is passed in), tested under made-up times. A node holds a valid certificate, but it
//! runs on a machine the cluster does not control: everything it sends is bounded here.

use std::time::{Duration, Instant};

use tunnel_proto::api::Labels;
use tunnel_proto::wire::AuditEvent;

/// Tunnels one host id may hold to one proxy at once (one per transport, plus one being
/// replaced).
pub const MAX_TUNNELS_PER_NODE: usize = 4;
/// Streams a node may open besides its control stream before the tunnel is closed (each is reset
/// at once; a well-behaved agent opens none).
const MAX_UNEXPECTED_STREAMS: u32 = 8;
/// Control messages: a burst, then a steady rate (agents send a ping every few seconds).
const MESSAGE_BURST: f64 = 200.0;
const MESSAGES_PER_SEC: f64 = 20.0;
/// Audit events: a burst, then a steady rate; beyond it events are dropped (and counted).
const AUDIT_BURST: f64 = 500.0;
const AUDIT_PER_SEC: f64 = 50.0;
/// Presence is written at most this often, whatever the heartbeats say.
pub const PRESENCE_MIN_INTERVAL: Duration = Duration::from_secs(5);

const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 512;
const MAX_AUDIT_FIELDS: usize = 32;
const MAX_AUDIT_NAME: usize = 64;
const MAX_AUDIT_VALUE: usize = 4096;

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64, per_sec: f64, now: Instant) -> Self {
        Self {
            burst,
            per_sec,
            tokens: burst,
            updated: now,
        }
    }

    /// Takes one token, going into debt if there is none: returns how long until the debt is
    /// paid, the time to wait before acting.
    pub fn take_paced(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Recording chunks (up to 24 KiB each): a burst, then a steady rate, paced rather than refused.
const RECORDING_BURST: f64 = 64.0;
const RECORDING_PER_SEC: f64 = 40.0;

/// The budget of one tunnel's node.
pub struct NodeBudget {
    messages: TokenBucket,
    audit: TokenBucket,
    recording: TokenBucket,
    unexpected_streams: u32,
    /// Audit events dropped for the rate, for the log.
    pub audit_dropped: u64,
}

impl NodeBudget {
    pub fn new(now: Instant) -> Self {
        Self {
            messages: TokenBucket::new(MESSAGE_BURST, MESSAGES_PER_SEC, now),
            audit: TokenBucket::new(AUDIT_BURST, AUDIT_PER_SEC, now),
            recording: TokenBucket::new(RECORDING_BURST, RECORDING_PER_SEC, now),
            unexpected_streams: 0,
            audit_dropped: 0,
        }
    }

    /// Any control message; `false`: the node floods its control stream, close the tunnel.
    pub fn message(&mut self, now: Instant) -> bool {
        self.messages.take(now)
    }

    /// An audit event; `false`: drop it.
    pub fn audit(&mut self, now: Instant) -> bool {
        let ok = self.audit.take(now);
        if !ok {
            self.audit_dropped += 1;
        }
        ok
    }

    /// A recording chunk: how long to wait before taking it, so that a node's recordings arrive
    /// at most at the steady rate whatever it sends (chunks are taken one after another).
    pub fn recording(&mut self, now: Instant) -> Duration {
        self.recording.take_paced(now)
    }

    /// A stream the node opened that nobody asked for (it is reset); `false`: close the tunnel.
    pub fn unexpected_stream(&mut self) -> bool {
        self.unexpected_streams += 1;
        self.unexpected_streams <= MAX_UNEXPECTED_STREAMS
    }
}

/// Checks labels a node reports (in its hello or a heartbeat).
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("more than {MAX_LABELS} labels"));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY || k.chars().any(char::is_control) {
            return Err(format!("label key {:?} is invalid", truncated(k, 64)));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(format!(
                "the value of label {k:?} is too long or has control characters"
            ));
        }
    }
    Ok(())
}

/// An audit event as the proxy will log it: a known-shape name, at most 32 fields, values cut at
/// 4 KiB. `None`: not an event at all.
pub fn sanitize_audit(mut event: AuditEvent) -> Option<AuditEvent> {
    let name_ok = !event.event.is_empty()
        && event.event.len() <= MAX_AUDIT_NAME
        && event
            .event
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_');
    if !name_ok {
        return None;
    }
    event.fields = event
        .fields
        .into_iter()
        .filter(|(k, _)| !k.is_empty() && k.len() <= MAX_LABEL_KEY)
        .take(MAX_AUDIT_FIELDS)
        .map(|(k, v)| {
            let v = truncated(&v, MAX_AUDIT_VALUE).to_string();
            (k, v)
        })
        .collect();
    Some(event)
}

/// A short, printable copy of text a node sent (a version, a reason), for records, logs and
/// users' terminals: control characters dropped, at most 64 characters.
pub fn short(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_node_runs_out_then_refills() {
        let t0 = Instant::now();
        let mut b = NodeBudget::new(t0);
        let sent = (0..1000).take_while(|_| b.message(t0)).count();
        assert_eq!(sent, 200);
        assert!(!b.message(t0 + Duration::from_millis(10)));
        assert!(b.message(t0 + Duration::from_secs(1)));
        let kept = (0..1000).filter(|_| b.audit(t0)).count();
        assert_eq!(kept, 500);
        assert_eq!(b.audit_dropped, 500);
        assert!((0..8).all(|_| b.unexpected_stream()));
        assert!(!b.unexpected_stream());
    }

    #[test]
    fn labels_and_audit_events_are_bounded() {
        let mut labels = Labels::new();
        labels.insert("env".into(), "prod".into());
        check_labels(&labels).unwrap();
        labels.insert("big".into(), "x".repeat(600));
        assert!(check_labels(&labels).is_err());
        let many: Labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_labels(&many).is_err());

        let mut fields = Labels::new();
        for i in 0..40 {
            fields.insert(format!("f{i:02}"), "é".repeat(3000));
        }
        let e = sanitize_audit(AuditEvent {
            event: "exec".into(),
            time: u64::MAX,
            fields,
        })
        .unwrap();
        assert_eq!(e.fields.len(), 32);
        assert!(e.fields.values().all(|v| v.len() <= 4096));
        assert_eq!(short("v1\x1b[2J\r\n"), "v1[2J");
        assert_eq!(short(&"x".repeat(100)).len(), 64);
        for bad in ["", "Exec", "a b", "x\n"] {
            let e = AuditEvent {
                event: bad.into(),
                time: 0,
                fields: Labels::new(),
            };
            assert!(sanitize_audit(e).is_none(), "{bad:?}");
        }
    }
}

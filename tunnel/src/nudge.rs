//! Restart nudges: how a proxy that crashed and came back tells its former QUIC agents at once.
//!
//! A QUIC agent learns that its proxy restarted only when it next sends a packet (the restarted
//! proxy answers it with a stateless reset), which over a quiet tunnel is its next keep-alive:
//! 25 s by default, minutes on a metered link. So each QUIC tunnel is given a random 128-bit
//! token in its welcome, which the proxy keeps in the node's presence record; a proxy starting
//! again sends each agent of its former presence records one datagram, from its QUIC port to the
//! agent's address: a marker and that token. The agent's UDP socket takes such datagrams out
//! before QUIC sees them, compares the token in constant time with those of its tunnels, and the
//! matching tunnel ends at once; the agent comes back within the return window the proxy gave it.
//! A datagram that only looks like a nudge is dropped: QUIC would have dropped it too (its first
//! byte has QUIC's fixed bit clear).

use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

/// How many bytes a nudge token has.
pub const NUDGE_TOKEN_LEN: usize = 16;

const MARKER: &[u8; 16] = b"\0burrow-restart\0";

/// A nudge on the wire: the marker, then the token.
pub const NUDGE_LEN: usize = MARKER.len() + NUDGE_TOKEN_LEN;

pub type NudgeToken = [u8; NUDGE_TOKEN_LEN];

/// The datagram that nudges the tunnel holding `token`.
pub fn nudge_datagram(token: &NudgeToken) -> [u8; NUDGE_LEN] {
    let mut datagram = [0; NUDGE_LEN];
    datagram[..MARKER.len()].copy_from_slice(MARKER);
    datagram[MARKER.len()..].copy_from_slice(token);
    datagram
}

/// A fresh random token.
pub fn new_nudge_token() -> NudgeToken {
    let mut token = [0; NUDGE_TOKEN_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
        .expect("the system's random source works");
    token
}

/// A token as the welcome and presence records carry it (lowercase hex); `None` if malformed.
pub fn parse_nudge_token(text: &str) -> Option<NudgeToken> {
    if text.len() != 2 * NUDGE_TOKEN_LEN || !text.is_ascii() {
        return None;
    }
    let mut token = [0; NUDGE_TOKEN_LEN];
    for (i, byte) in token.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(token)
}

/// The tokens of an agent's QUIC tunnels, each with the switch a nudge flips.
#[derive(Default)]
pub struct Nudges {
    armed: Mutex<Vec<(NudgeToken, CancellationToken)>>,
}

impl Nudges {
    /// Watches for `token`: its nudge cancels `switch` (the tunnel's stop switch). Disarm when
    /// the tunnel ends.
    pub fn arm(&self, token: NudgeToken, switch: CancellationToken) {
        self.lock().push((token, switch));
    }

    pub fn disarm(&self, token: &NudgeToken) {
        self.lock().retain(|(t, _)| t != token);
    }

    /// Whether `datagram` is a nudge (to be kept from QUIC); flips the switch of the tunnel it
    /// names, if any.
    pub(crate) fn take(&self, datagram: &[u8]) -> bool {
        if datagram.len() != NUDGE_LEN || !datagram.starts_with(MARKER) {
            return false;
        }
        let given = &datagram[MARKER.len()..];
        for (token, switch) in self.lock().iter() {
            if bool::from(subtle::ConstantTimeEq::ct_eq(&token[..], given)) {
                tracing::warn!("the proxy restarted (it says so); reconnecting");
                switch.cancel();
            }
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(NudgeToken, CancellationToken)>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nudge_flips_its_tunnels_switch_only() {
        let nudges = Nudges::default();
        let (a, b) = (new_nudge_token(), new_nudge_token());
        let (switch_a, switch_b) = (CancellationToken::new(), CancellationToken::new());
        nudges.arm(a, switch_a.clone());
        nudges.arm(b, switch_b.clone());
        assert!(nudges.take(&nudge_datagram(&a)));
        assert!(switch_a.is_cancelled() && !switch_b.is_cancelled());
        nudges.disarm(&b);
        assert!(nudges.take(&nudge_datagram(&b)));
        assert!(!switch_b.is_cancelled());
    }

    #[test]
    fn quic_packets_and_strangers_pass() {
        let nudges = Nudges::default();
        let switch = CancellationToken::new();
        nudges.arm(new_nudge_token(), switch.clone());
        // A short-header QUIC packet has the fixed bit (0x40) set in its first byte.
        let mut quic = nudge_datagram(&new_nudge_token());
        quic[0] = 0x40;
        assert!(!nudges.take(&quic));
        // Marker and length right, token wrong: kept from QUIC, nothing flipped.
        assert!(nudges.take(&nudge_datagram(&new_nudge_token())));
        assert!(!nudges.take(&nudge_datagram(&[0; 16])[..NUDGE_LEN - 1]));
        assert!(!switch.is_cancelled());
    }

    #[test]
    fn tokens_round_trip_as_hex() {
        let token = new_nudge_token();
        assert_eq!(parse_nudge_token(&tunnel_proto::hex(&token)), Some(token));
        assert_eq!(parse_nudge_token("zz"), None);
        assert_eq!(parse_nudge_token(&"é".repeat(16)), None);
    }
}

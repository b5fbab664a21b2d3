//! TLS 1.3 session tickets that a restarted proxy still reads: a fleet that comes back after a
//! restart resumes its sessions instead of running full handshakes (no certificate signature,
//! no chain to check, on either end), which is most of what a returning tunnel costs.
//!
//! A ticket carries the session's secret and the node's certificate chain, sealed
//! (ChaCha20-Poly1305) with a key that only this proxy can make: derived from its QUIC secret
//! (`DATA_DIR/quic-secret`, 0600, kept across restarts), the time epoch the ticket was made in,
//! and the cluster's host CA pins. So a ticket
//! - resumes only at the proxy that issued it (other proxies derive other keys);
//! - lives one to two epochs ([`EPOCH`]; the key of an older epoch is never derived again, which
//!   is how rustls expects lifetimes to be kept);
//! - dies with any change of the host CAs (a rotation's every phase), so a session begun under a
//!   CA the cluster no longer trusts is never resumed.
//!
//! What a full handshake checks about the node and a resumption does not (its certificate's
//! validity now) is checked again on every tunnel by [`crate::tunnel`] (`node_identity`), and
//! revocation is checked there in both cases.

use std::sync::RwLock;

use burrow_daemon::unix_now;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf};
use tunnel_proto::pin::CaPin;

/// How long a ticket key is used for new tickets; a ticket is read for up to two.
pub const EPOCH: u64 = 6 * 3600;

pub struct Tickets {
    secret: [u8; 32],
    /// A digest of the host CA pins the keys are bound to.
    binding: RwLock<[u8; 32]>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// Ticket keys from the proxy's long-lived `secret`, bound to the host CA `pins`.
    pub fn new(secret: &[u8], pins: &[CaPin]) -> Self {
        let mut derived = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"burrow tls session tickets")
            .extract(secret)
            .expand(&[b"ticket secret"], Len32)
            .and_then(|okm| okm.fill(&mut derived))
            .expect("32 bytes from HKDF-SHA256");
        Self {
            secret: derived,
            binding: RwLock::new(binding(pins)),
            rng: SystemRandom::new(),
        }
    }

    /// The host CAs changed: tickets issued before are not read any more.
    pub fn bind(&self, pins: &[CaPin]) {
        *self.binding.write().unwrap_or_else(|p| p.into_inner()) = binding(pins);
    }

    fn key(&self, epoch: u64) -> LessSafeKey {
        let binding = *self.binding.read().unwrap_or_else(|p| p.into_inner());
        let epoch = epoch.to_be_bytes();
        let info: [&[u8]; 2] = [b"ticket key", &epoch];
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &binding).extract(&self.secret);
        let okm = prk
            .expand(&info, &CHACHA20_POLY1305)
            .expect("a ChaCha20-Poly1305 key from HKDF-SHA256");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    pub(crate) fn seal(&self, plain: &[u8], epoch: u64) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let tag = [epoch as u8];
        let mut body = plain.to_vec();
        self.key(epoch)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(tag),
                &mut body,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(1 + NONCE_LEN + body.len());
        ticket.push(tag[0]);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    /// A ticket's plaintext if it was sealed in epoch `now_epoch` or the one before (by its tag
    /// byte) with the current binding; `None` for anything else, whatever the bytes.
    pub(crate) fn open(&self, ticket: &[u8], now_epoch: u64) -> Option<Vec<u8>> {
        let (&tag, rest) = ticket.split_first()?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let epoch = [now_epoch, now_epoch.checked_sub(1)?]
            .into_iter()
            .find(|e| *e as u8 == tag)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = self
            .key(epoch)
            .open_in_place(nonce, Aad::from([tag]), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        EPOCH as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, unix_now() / EPOCH)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, unix_now() / EPOCH)
    }
}

fn binding(pins: &[CaPin]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for pin in pins {
        ctx.update(pin.to_string().as_bytes());
        ctx.update(b"\n");
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// HKDF output of 32 bytes.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(hex: &str) -> CaPin {
        format!("sha256:{}", hex.repeat(32)).parse().unwrap()
    }

    #[test]
    fn a_ticket_opens_for_two_epochs_at_its_proxy_only_and_not_after_a_ca_change() {
        let t = Tickets::new(&[7; 64], &[pin("ab")]);
        let ticket = t.seal(b"session", 100).unwrap();
        assert_eq!(t.open(&ticket, 100).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.open(&ticket, 101).as_deref(), Some(&b"session"[..]));
        assert_eq!(t.open(&ticket, 102), None, "two epochs at most");
        assert_eq!(t.open(&ticket, 99), None, "not from the future");
        // The same proxy after a restart (same secret) reads it; another proxy does not.
        let restarted = Tickets::new(&[7; 64], &[pin("ab")]);
        assert!(restarted.open(&ticket, 100).is_some());
        let other = Tickets::new(&[8; 64], &[pin("ab")]);
        assert_eq!(other.open(&ticket, 100), None);
        // Any change of the host CAs retires every ticket.
        restarted.bind(&[pin("ab"), pin("cd")]);
        assert_eq!(restarted.open(&ticket, 100), None);
        // Tampering, truncation and garbage are refused, never a panic.
        let mut bad = ticket.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(t.open(&bad, 100), None);
        for n in 0..ticket.len() {
            assert_eq!(t.open(&ticket[..n], 100), None);
        }
        assert_eq!(t.open(&[0xff; 200], 100), None);
        assert_eq!(t.open(&ticket, 0), None);
    }
}

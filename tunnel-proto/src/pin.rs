//! CA pins: `sha256:` + hex(sha256(DER SubjectPublicKeyInfo of the host CA's TLS certificate)).
//!
//! The agent checks the certificates it got from `find` against the pins it was given before it
//! sends a token anywhere, so a pin mismatch must be told apart from a malformed pin.

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;

const PREFIX: &str = "sha256:";

/// A parsed CA pin.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CaPin([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    #[error("CA pin {0:?} is malformed: expected sha256: followed by 64 hex digits")]
    Malformed(String),
    #[error("certificate is not valid DER X.509: {0}")]
    BadCertificate(String),
}

impl CaPin {
    /// The pin of a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Result<Self, PinError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PinError::BadCertificate(e.to_string()))?;
        Ok(Self::of_spki(cert.public_key().raw))
    }

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// Constant-time comparison: how long it takes says nothing about where two pins differ.
    pub fn matches(&self, other: &CaPin) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl FromStr for CaPin {
    type Err = PinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || PinError::Malformed(s.to_string());
        let hex = s.trim().strip_prefix(PREFIX).ok_or_else(malformed)?;
        if hex.len() != 64 {
            return Err(malformed());
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|_| malformed())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| malformed())?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        f.write_str(&crate::hex(&self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let pin: CaPin = text.parse().unwrap();
        assert_eq!(pin.to_string(), text);
        let upper: CaPin = format!("sha256:{}", "AB".repeat(32)).parse().unwrap();
        assert!(pin.matches(&upper));
    }

    #[test]
    fn rejects_malformed_pins() {
        for bad in [
            "",
            "sha256:",
            "abcd",
            &format!("sha1:{}", "ab".repeat(32)),
            &format!("sha256:{}", "ab".repeat(31)),
            &format!("sha256:{}", "zz".repeat(32)),
            &format!("sha256:{}é", "ab".repeat(31)),
        ] {
            assert!(
                matches!(bad.parse::<CaPin>(), Err(PinError::Malformed(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn pin_is_sha256_of_the_spki() {
        // The SPKI bytes are hashed as-is; a known SHA-256 vector checks the plumbing.
        let pin = CaPin::of_spki(b"abc");
        assert_eq!(
            pin.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!pin.matches(&CaPin::of_spki(b"abd")));
    }

    #[test]
    fn garbage_certificate_is_an_error_not_a_panic() {
        assert!(matches!(
            CaPin::of_certificate(b"\x30\x03garbage"),
            Err(PinError::BadCertificate(_))
        ));
    }
}

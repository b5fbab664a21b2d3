//! OpenSSH key revocation lists (KRL, OpenSSH's `PROTOCOL.krl`) of removed nodes, for users'
//! `RevokedHostKeys`: a removed node's host certificate is otherwise still valid under the
//! `@cert-authority` line every user trusts.
//!
//! The list revokes certificates by key ID: every node's host certificate is issued with the key
//! ID `host:<host id>` ([`tunnel_proto::api::host_cert_key_id`]), and host ids are random and
//! never reused, so one entry per removed node, under each host CA key, covers every certificate
//! that node was ever given, whatever its host key. The format is binary; `ssh-keygen -Q -f FILE`
//! reads it.

/// "SSHKRL\n\0".
const MAGIC: &[u8; 8] = b"SSHKRL\n\0";
const FORMAT_VERSION: u32 = 1;
const SECTION_CERTIFICATES: u8 = 1;
const CERT_SECTION_KEY_ID: u8 = 0x23;

/// A KRL revoking the certificates signed by `ca_blobs` (each CA's public key in SSH wire
/// format) whose key IDs are in `key_ids`. `version` should grow with every new list (the
/// number of revocations, say); `generated` is in Unix seconds.
pub fn build(
    ca_blobs: &[Vec<u8>],
    key_ids: &[String],
    version: u64,
    generated: u64,
    comment: &str,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&generated.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes()); // flags
    put_string(&mut out, b""); // reserved
    put_string(&mut out, comment.as_bytes());
    if key_ids.is_empty() {
        return out;
    }
    let mut ids = Vec::new();
    for id in key_ids {
        put_string(&mut ids, id.as_bytes());
    }
    for ca in ca_blobs {
        let mut section = Vec::new();
        put_string(&mut section, ca);
        put_string(&mut section, b""); // reserved
        section.push(CERT_SECTION_KEY_ID);
        put_string(&mut section, &ids);
        out.push(SECTION_CERTIFICATES);
        put_string(&mut out, &section);
    }
    out
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_is_the_header_alone() {
        let krl = build(&[vec![1, 2]], &[], 7, 1_700_000_000, "c");
        assert_eq!(&krl[..8], b"SSHKRL\n\0");
        assert_eq!(&krl[8..12], &[0, 0, 0, 1]);
        assert_eq!(&krl[12..20], &7u64.to_be_bytes());
        assert_eq!(&krl[20..28], &1_700_000_000u64.to_be_bytes());
        assert_eq!(&krl[28..36], &[0; 8]);
        assert_eq!(&krl[36..], &[0, 0, 0, 0, 0, 0, 0, 1, b'c']);
    }

    #[test]
    fn each_ca_gets_a_section_of_the_key_ids() {
        let krl = build(
            &[vec![0xca]],
            &["host:a".into(), "host:bc".into()],
            2,
            0,
            "",
        );
        let header = 8 + 4 + 8 + 8 + 8 + 4 + 4;
        let ids: Vec<u8> = [&[0, 0, 0, 6][..], b"host:a", &[0, 0, 0, 7], b"host:bc"].concat();
        let mut section = vec![0, 0, 0, 1, 0xca, 0, 0, 0, 0, CERT_SECTION_KEY_ID];
        section.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        section.extend_from_slice(&ids);
        let mut want = vec![SECTION_CERTIFICATES];
        want.extend_from_slice(&(section.len() as u32).to_be_bytes());
        want.extend_from_slice(&section);
        assert_eq!(&krl[header..], &want[..]);
    }
}

//! File transfers as the node sees them, for the audit log: legacy `scp` (a command, `scp -t
//! PATH` to receive, `scp -f PATH` to send) and the SFTP subsystem (its requests read from the
//! client's side of the stream: opens for reading or writing, removes, renames, directories).
//! Only what the protocol shows is reported: the paths as the client asked for them.

/// The direction and path of a legacy scp command (`scp -t` receives: an upload to the node;
/// `scp -f` sends: a download), if `command` is one.
pub fn scp(command: &str) -> Option<(&'static str, String)> {
    let mut words = command.split_whitespace();
    if words.next()? != "scp" {
        return None;
    }
    let mut direction = None;
    let mut path = Vec::new();
    let mut options = true;
    for word in words {
        if options && word == "--" {
            options = false;
        } else if options && word.starts_with('-') && path.is_empty() {
            if word.contains('t') {
                direction = Some("upload");
            } else if word.contains('f') {
                direction = Some("download");
            }
        } else {
            options = false;
            path.push(word);
        }
    }
    Some((direction?, path.join(" ")))
}

const FXP_OPEN: u8 = 3;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
/// Extensions: OpenSSH renames with `posix-rename@openssh.com` when the server offers it.
const FXP_EXTENDED: u8 = 200;
const FXF_WRITE: u32 = 0x02;
/// The largest request looked into; bigger ones (writes) are skipped unread.
const MAX_WATCHED: usize = 16 * 1024;
/// An SFTP packet longer than this is not one: the watch gives up on the stream.
const MAX_PACKET: usize = 1024 * 1024;

/// One file operation an SFTP client asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct SftpOp {
    /// `upload`, `download`, `remove`, `rename`, `mkdir` or `rmdir`.
    pub op: &'static str,
    pub path: String,
    /// `rename`: the new path.
    pub to: Option<String>,
}

/// Reads an SFTP client's requests from the bytes it sends, in pieces as they come.
#[derive(Default)]
pub struct SftpWatch {
    /// The start of a packet not complete yet (only packets worth reading are kept).
    buf: Vec<u8>,
    /// Bytes of a packet to pass over.
    skip: usize,
    /// The stream does not look like SFTP: nothing more is read.
    lost: bool,
}

impl SftpWatch {
    /// The operations in `bytes` (with what came before).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<SftpOp> {
        let mut ops = Vec::new();
        while !self.lost && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // The length and type first.
            let need = 5usize.saturating_sub(self.buf.len());
            if need > 0 {
                let n = need.min(bytes.len());
                self.buf.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.buf.len() < 5 {
                    break;
                }
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            let kind = self.buf[4];
            if len == 0 || len > MAX_PACKET {
                self.lost = true;
                break;
            }
            let watched = matches!(
                kind,
                FXP_OPEN | FXP_REMOVE | FXP_MKDIR | FXP_RMDIR | FXP_RENAME | FXP_EXTENDED
            );
            if !watched || len > MAX_WATCHED {
                self.skip = len - 1;
                self.buf.clear();
                continue;
            }
            let total = 4 + len;
            let n = (total - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == total {
                if let Some(op) = parse(kind, &self.buf[5..]) {
                    ops.push(op);
                }
                self.buf.clear();
            }
        }
        ops
    }
}

/// A watched request's body (after its type): request id, then its fields.
fn parse(kind: u8, body: &[u8]) -> Option<SftpOp> {
    let mut r = Reader(body);
    r.u32()?; // request id
    if kind == FXP_EXTENDED && r.string()? != "posix-rename@openssh.com" {
        return None;
    }
    let path = r.string()?;
    let (op, to) = match kind {
        FXP_OPEN => {
            let flags = r.u32()?;
            let op = if flags & FXF_WRITE != 0 {
                "upload"
            } else {
                "download"
            };
            (op, None)
        }
        FXP_REMOVE => ("remove", None),
        FXP_MKDIR => ("mkdir", None),
        FXP_RMDIR => ("rmdir", None),
        FXP_RENAME | FXP_EXTENDED => ("rename", Some(r.string()?)),
        _ => return None,
    };
    Some(SftpOp { op, path, to })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        let bytes = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(String::from_utf8_lossy(bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
        let body: Vec<u8> = fields.concat();
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(kind);
        p.extend_from_slice(&body);
        p
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn scp_commands_say_their_direction_and_path() {
        assert_eq!(scp("scp -t /tmp/x"), Some(("upload", "/tmp/x".into())));
        assert_eq!(scp("scp -v -f -- a b"), Some(("download", "a b".into())));
        assert_eq!(scp("scp -r -d -t ."), Some(("upload", ".".into())));
        assert_eq!(scp("echo scp -t x"), None);
        assert_eq!(scp("scp"), None);
    }

    #[test]
    fn sftp_requests_are_read_across_pieces_and_writes_are_skipped() {
        let id = 7u32.to_be_bytes();
        let init = packet(1, &[&3u32.to_be_bytes()]);
        let put = packet(
            FXP_OPEN,
            &[&id, &string("/tmp/up"), &0x1au32.to_be_bytes(), &[0; 4]],
        );
        let write = packet(
            6,
            &[
                &id,
                &string("h"),
                &0u64.to_be_bytes(),
                &string(&"x".repeat(40_000)),
            ],
        );
        let get = packet(
            FXP_OPEN,
            &[&id, &string("/etc/hostname"), &1u32.to_be_bytes(), &[0; 4]],
        );
        let mv = packet(FXP_RENAME, &[&id, &string("a"), &string("b")]);
        let posix_mv = packet(
            FXP_EXTENDED,
            &[
                &id,
                &string("posix-rename@openssh.com"),
                &string("c"),
                &string("d"),
            ],
        );
        let statvfs = packet(
            FXP_EXTENDED,
            &[&id, &string("statvfs@openssh.com"), &string("/")],
        );
        let all = [init, put, write, get, mv, posix_mv, statvfs].concat();
        let mut watch = SftpWatch::default();
        let mut ops = Vec::new();
        // In pieces of 7 bytes: every boundary falls somewhere awkward.
        for piece in all.chunks(7) {
            ops.extend(watch.feed(piece));
        }
        assert_eq!(
            ops,
            vec![
                SftpOp {
                    op: "upload",
                    path: "/tmp/up".into(),
                    to: None
                },
                SftpOp {
                    op: "download",
                    path: "/etc/hostname".into(),
                    to: None
                },
                SftpOp {
                    op: "rename",
                    path: "a".into(),
                    to: Some("b".into())
                },
                SftpOp {
                    op: "rename",
                    path: "c".into(),
                    to: Some("d".into())
                },
            ]
        );
        // A stream that is not SFTP is given up on, not buffered.
        let mut junk = SftpWatch::default();
        assert!(junk.feed(&[0xff; 64]).is_empty());
        assert!(junk.lost && junk.buf.len() <= 5);
    }
}

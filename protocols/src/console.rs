//! The debug console's wire format, on vsock port [`AGENT_CONSOLE_PORT`]: frames of
//! `[kind: u8][length: u32 big-endian][payload]`, at most [`MAX_PAYLOAD`] bytes of payload.
//!
//! The host opens a session with one [`Kind::Request`] frame (what to run, with or without a
//! terminal), then sends [`Kind::Stdin`] (an empty one closes the process's stdin) and
//! [`Kind::Resize`] frames; the guest sends [`Kind::Stdout`], [`Kind::Stderr`] (none with a
//! terminal) and one [`Kind::Exit`] last. Either side treats a malformed frame as the end.
//!
//! [`AGENT_CONSOLE_PORT`]: crate::AGENT_CONSOLE_PORT

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest payload of one frame (a request's arguments included).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Host → guest, first: a [`Request`].
    Request,
    /// Host → guest: input; empty closes stdin.
    Stdin,
    /// Guest → host: output (the terminal's, with one).
    Stdout,
    /// Guest → host: error output (without a terminal).
    Stderr,
    /// Host → guest: the terminal's size, rows then columns (u16 big-endian each).
    Resize,
    /// Guest → host, last: the exit status as a shell reports it (128 + signal for a signal),
    /// i32 big-endian.
    Exit,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Request => 0,
            Kind::Stdin => 1,
            Kind::Stdout => 2,
            Kind::Stderr => 3,
            Kind::Resize => 4,
            Kind::Exit => 5,
        }
    }

    fn of(byte: u8) -> Option<Kind> {
        Some(match byte {
            0 => Kind::Request,
            1 => Kind::Stdin,
            2 => Kind::Stdout,
            3 => Kind::Stderr,
            4 => Kind::Resize,
            5 => Kind::Exit,
            _ => return None,
        })
    }
}

/// What a session runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command and its arguments; empty: the guest's shell.
    pub argv: Vec<String>,
    /// Run it on a terminal of this size (rows, columns).
    pub tty: Option<(u16, u16)>,
}

fn invalid(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.into())
}

impl Request {
    /// Its payload: `tty` (u8), rows, columns (u16 each), argument count (u16), then each
    /// argument as a u16 length and its bytes.
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let (tty, rows, cols) = match self.tty {
            Some((r, c)) => (1, r, c),
            None => (0, 0, 0),
        };
        let mut out = vec![tty];
        out.extend_from_slice(&rows.to_be_bytes());
        out.extend_from_slice(&cols.to_be_bytes());
        let argc = u16::try_from(self.argv.len()).map_err(|_| invalid("too many arguments"))?;
        out.extend_from_slice(&argc.to_be_bytes());
        for arg in &self.argv {
            let len = u16::try_from(arg.len()).map_err(|_| invalid("an argument is too long"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(arg.as_bytes());
        }
        if out.len() > MAX_PAYLOAD {
            return Err(invalid("the command line is longer than one frame"));
        }
        Ok(out)
    }

    /// Parses a payload of [`Self::encode`]; anything malformed or left over is an error.
    pub fn decode(payload: &[u8]) -> std::io::Result<Request> {
        let mut rest = payload;
        let mut take = |n: usize| -> std::io::Result<&[u8]> {
            if rest.len() < n {
                return Err(invalid("truncated console request"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u16_of = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let tty = take(1)?[0];
        let rows = u16_of(take(2)?);
        let cols = u16_of(take(2)?);
        let argc = u16_of(take(2)?);
        let mut argv = Vec::with_capacity(usize::from(argc).min(256));
        for _ in 0..argc {
            let len = usize::from(u16_of(take(2)?));
            let arg = std::str::from_utf8(take(len)?).map_err(|_| invalid("argument not UTF-8"))?;
            argv.push(arg.to_string());
        }
        if !rest.is_empty() {
            return Err(invalid("trailing bytes after the console request"));
        }
        let tty = match tty {
            0 => None,
            1 => Some((rows, cols)),
            other => return Err(invalid(format!("tty flag {other}"))),
        };
        Ok(Request { argv, tty })
    }
}

/// Writes one frame.
///
/// # Errors
/// A payload over [`MAX_PAYLOAD`], or the write failed.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_PAYLOAD)
        .ok_or_else(|| invalid("console frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind.byte();
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Reads one frame; None at a clean end of the stream (before a frame began).
///
/// # Errors
/// An unknown kind, a length over [`MAX_PAYLOAD`], a stream that ends inside a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(invalid("the stream ended inside a frame header"))
            };
        }
        got += n;
    }
    let kind = Kind::of(head[0]).ok_or_else(|| invalid(format!("frame kind {}", head[0])))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(invalid(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_malformed_ones_are_refused() {
        for r in [
            Request {
                argv: vec![],
                tty: Some((24, 80)),
            },
            Request {
                argv: vec!["sh".into(), "-c".into(), "echo é; exit 3".into()],
                tty: None,
            },
        ] {
            assert_eq!(
                Request::decode(&r.encode().expect("encode")).expect("decode"),
                r
            );
        }
        let good = Request {
            argv: vec!["ls".into()],
            tty: None,
        }
        .encode()
        .expect("encode");
        assert!(
            Request::decode(&good[..good.len() - 1]).is_err(),
            "truncated"
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Request::decode(&trailing).is_err(), "trailing");
        let mut flag = good;
        flag[0] = 7;
        assert!(Request::decode(&flag).is_err(), "flag");
        // A huge argument count with no arguments behind it is refused, not allocated.
        assert!(Request::decode(&[0, 0, 0, 0, 0, 0xff, 0xff]).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_hostile_ones_end_the_stream() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Stdout, b"hello")
            .await
            .expect("write");
        write_frame(&mut buf, Kind::Exit, &3i32.to_be_bytes())
            .await
            .expect("write");
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).await.expect("read"),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).await.expect("read"),
            Some((Kind::Exit, 3i32.to_be_bytes().to_vec()))
        );
        assert_eq!(read_frame(&mut r).await.expect("end"), None);
        let huge = [2u8, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).await.is_err(), "over the bound");
        let unknown = [9u8, 0, 0, 0, 0];
        assert!(read_frame(&mut &unknown[..]).await.is_err(), "unknown kind");
        let cut = [2u8, 0, 0];
        assert!(read_frame(&mut &cut[..]).await.is_err(), "cut header");
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(write_frame(&mut Vec::new(), Kind::Stdin, &big)
            .await
            .is_err());
    }
}

//! The host's Unix sockets: the hybrid handshake and nonblocking connects.
//!
//! A host client connects to the device's socket and writes one line, `CONNECT <port>\n`, where
//! `<port>` is the guest port in decimal. The device reads that line byte by byte (anything after
//! the newline belongs to the connection's stream), bounded by [`MAX_LINE`]; anything malformed
//! closes the client. Guest-initiated connections go to `<uds_path>_<port>`, connected without
//! ever blocking the event loop (a full backlog is a refusal, not a wait).

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest accepted `CONNECT` line, newline included ("CONNECT 4294967295\n" is 19 bytes).
pub const MAX_LINE: usize = 32;

/// What reading a client's `CONNECT` line gave so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LineOutcome {
    /// A complete, valid line for this guest port.
    Port(u32),
    /// No complete line yet; wait for more bytes.
    Pending,
    /// Malformed, overlong, or the client went away: close it.
    Rejected,
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct PendingClient {
    /// The accepted stream (nonblocking).
    pub stream: UnixStream,
    /// When the client is dropped if the line is still incomplete.
    pub deadline: Instant,
    line: Vec<u8>,
}

impl PendingClient {
    /// Wraps a freshly accepted client.
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        Self {
            stream,
            deadline,
            line: Vec::with_capacity(MAX_LINE),
        }
    }

    /// Reads what is available of the line, one byte at a time so no stream byte is consumed.
    pub fn read_line(&mut self) -> LineOutcome {
        // Bounded: each iteration either returns or grows `line`, which is capped.
        loop {
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return LineOutcome::Rejected,
                Ok(_) if byte[0] == b'\n' => {
                    return parse_connect(&self.line)
                        .map_or(LineOutcome::Rejected, LineOutcome::Port)
                }
                Ok(_) if self.line.len() + 1 >= MAX_LINE => return LineOutcome::Rejected,
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineOutcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return LineOutcome::Rejected,
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline; a trailing `\r` is tolerated).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The Unix socket a guest connection to `port` goes to: `<uds_path>_<port>`.
pub fn guest_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to a Unix stream socket without blocking: a listener with a full backlog fails
/// with `WouldBlock` instead of stalling the caller. The stream is nonblocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() returned a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call and `len` does not exceed it.
    let ret = unsafe { libc::connect(fd, std::ptr::from_ref(&addr).cast::<libc::sockaddr>(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_utils::TempDir;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"connect 5",
            b"CONNECT 5 6",
            b"CONNECT\t5",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn line_reader_stops_at_newline_and_bounds_the_line() {
        let (mut a, b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nb");
        let mut c = PendingClient::new(b, Instant::now());
        assert_eq!(c.read_line(), LineOutcome::Pending);
        a.write_all(b"CONNECT 5").expect("w");
        assert_eq!(c.read_line(), LineOutcome::Pending);
        a.write_all(b"2\nrest").expect("w");
        assert_eq!(c.read_line(), LineOutcome::Port(52));
        let mut rest = [0u8; 4];
        c.stream
            .read_exact(&mut rest)
            .expect("rest stays in the stream");
        assert_eq!(&rest, b"rest");

        let (mut a, b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nb");
        let mut c = PendingClient::new(b, Instant::now());
        a.write_all(&[b'7'; 64]).expect("w");
        assert_eq!(c.read_line(), LineOutcome::Rejected, "overlong");

        let (a, b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nb");
        let mut c = PendingClient::new(b, Instant::now());
        drop(a);
        assert_eq!(c.read_line(), LineOutcome::Rejected, "closed");
    }

    #[test]
    fn nonblocking_connect_reaches_listeners_and_reports_absent_ones() {
        let dir = TempDir::new();
        let base = dir.path().join("v.sock");
        let path = guest_port_path(&base, 52);
        assert!(path.to_string_lossy().ends_with("v.sock_52"));
        assert!(connect_nonblocking(&path).is_err(), "nothing listens");
        let listener = UnixListener::bind(&path).expect("bind");
        let s = connect_nonblocking(&path).expect("connect");
        let (mut peer, _) = listener.accept().expect("accept");
        peer.write_all(b"x").expect("w");
        let mut s = s;
        let mut got = [0u8; 1];
        // Nonblocking: wait until the byte is there.
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match s.read(&mut got) {
                Ok(1) => break,
                _ if Instant::now() < deadline => std::thread::yield_now(),
                other => panic!("read: {other:?}"),
            }
        }
        let long = dir.path().join("x".repeat(200));
        assert!(connect_nonblocking(&long).is_err());
    }
}

//! A container process's standard streams, as the agent holds them.
//!
//! Without a terminal each stream is a pipe: the process gets one end at spawn time, the agent
//! keeps the other. With a terminal the process gets the pty slave and the agent keeps the
//! master (received from libcontainer over a console socket), used for both directions.
//! The host pulls output with ReadStdout/ReadStderr and pushes input with WriteStdin.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

/// The master side of a container's pseudo-terminal.
pub struct Pty {
    fd: AsyncFd<OwnedFd>,
}

impl Pty {
    /// Wraps a pty master for async use.
    pub fn new(master: OwnedFd) -> io::Result<Pty> {
        let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
        fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the OwnedFd keeps its fd open and unchanged until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        Ok(Pty { fd })
    }

    /// Reads output; `Ok(0)` once the slave side is closed for good.
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: every slave fd is closed (the processes exited).
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write(&self, data: &[u8]) -> io::Result<usize> {
        let mut written = 0;
        while written < data.len() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| {
                nix::unistd::write(fd.get_ref(), &data[written..]).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => written += n,
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(written)
    }

    /// Sets the terminal's window size (the process gets SIGWINCH).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let ws = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the fd is a live pty master owned by self and `ws` outlives the call.
        unsafe { set_winsize(self.fd.get_ref().as_raw_fd(), &ws) }.map_err(io::Error::from)?;
        Ok(())
    }
}

/// Where the host's input for a process goes.
pub enum Input {
    /// A pipe to the process's stdin.
    Pipe(pipe::Sender),
    /// The terminal master.
    Pty(Arc<Pty>),
}

impl Input {
    /// Writes all of `data`.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Input::Pipe(tx) => tx.write_all(data).await.map(|()| data.len()),
            Input::Pty(pty) => pty.write(data).await,
        }
    }
}

/// Where a process's output comes from.
pub enum Output {
    /// A pipe from the process's stdout or stderr.
    Pipe(pipe::Receiver),
    /// The terminal master (stdout and stderr are merged by the terminal).
    Pty(Arc<Pty>),
}

impl Output {
    /// Reads at most `buf.len()` bytes; 0 means end of stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Output::Pipe(rx) => rx.read(buf).await,
            Output::Pty(pty) => pty.read(buf).await,
        }
    }

    /// Reads what is buffered now, without waiting; 0 when nothing is (or the stream ended).
    /// A raw non-blocking read: the reactor's readiness may lag behind the pipe's contents.
    pub fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = match self {
            Output::Pipe(rx) => rx.as_raw_fd(),
            Output::Pty(pty) => pty.fd.get_ref().as_raw_fd(),
        };
        // SAFETY: `fd` belongs to `self` (a pipe receiver or the pty master), stays open for the
        // call, and `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                // EIO: every slave fd of the pty is closed.
                e if e.raw_os_error() == Some(libc::EIO) => Ok(0),
                e => Err(e),
            },
        }
    }
}

/// The process's ends of its streams, handed to the spawned helper as fds 0, 1, 2.
pub struct ChildStdio {
    /// stdin: a pipe read end or /dev/null.
    pub stdin: OwnedFd,
    /// stdout: a pipe write end or /dev/null.
    pub stdout: OwnedFd,
    /// stderr: a pipe write end or /dev/null.
    pub stderr: OwnedFd,
}

/// The agent's ends of a process's streams.
pub struct HostStdio {
    /// None: the process has no stdin (or it was closed).
    pub stdin: Option<Input>,
    /// stdout (or the terminal).
    pub stdout: Option<Output>,
    /// stderr (None with a terminal).
    pub stderr: Option<Output>,
}

fn devnull(write: bool) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")?;
    Ok(OwnedFd::from(file))
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn nonblocking_receiver(fd: OwnedFd) -> io::Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd)
}

fn nonblocking_sender(fd: OwnedFd) -> io::Result<pipe::Sender> {
    pipe::Sender::from_owned_fd(fd)
}

/// Pipes for a process without a terminal.
pub fn pipes(with_stdin: bool) -> io::Result<(ChildStdio, HostStdio)> {
    let (stdin_child, stdin_host) = if with_stdin {
        let (r, w) = pipe_pair()?;
        (r, Some(Input::Pipe(nonblocking_sender(w)?)))
    } else {
        (devnull(false)?, None)
    };
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let child = ChildStdio {
        stdin: stdin_child,
        stdout: out_w,
        stderr: err_w,
    };
    let host = HostStdio {
        stdin: stdin_host,
        stdout: Some(Output::Pipe(nonblocking_receiver(out_r)?)),
        stderr: Some(Output::Pipe(nonblocking_receiver(err_r)?)),
    };
    Ok((child, host))
}

/// /dev/null for all three: the process's stdio is the terminal set up by libcontainer.
pub fn null_stdio() -> io::Result<ChildStdio> {
    Ok(ChildStdio {
        stdin: devnull(false)?,
        stdout: devnull(true)?,
        stderr: devnull(true)?,
    })
}

/// The agent's side of a terminal process.
pub fn pty_host(pty: Arc<Pty>, with_stdin: bool) -> HostStdio {
    HostStdio {
        stdin: with_stdin.then(|| Input::Pty(pty.clone())),
        stdout: Some(Output::Pty(pty)),
        stderr: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipes_carry_bytes_and_end_of_stream() {
        let (child, mut host) = pipes(true).expect("pipes");
        let mut stdin = host.stdin.take().expect("stdin");
        stdin.write(b"hello").await.expect("write");
        drop(stdin);
        let mut buf = [0u8; 16];
        let n = nix::unistd::read(&child.stdin, &mut buf).expect("read");
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(nix::unistd::read(&child.stdin, &mut buf).expect("eof"), 0);

        nix::unistd::write(&child.stdout, b"out").expect("write out");
        drop(child);
        let mut out = host.stdout.take().expect("stdout");
        let n = out.read(&mut buf).await.expect("read out");
        assert_eq!(&buf[..n], b"out");
        assert_eq!(out.read(&mut buf).await.expect("eof"), 0);
    }

    #[tokio::test]
    async fn pty_reports_eof_when_the_slave_closes() {
        let pair = nix::pty::openpty(None, None).expect("openpty");
        let pty = Arc::new(Pty::new(pair.master).expect("pty"));
        pty.resize(30, 100).expect("resize");
        nix::unistd::write(&pair.slave, b"x").expect("write");
        drop(pair.slave);
        let mut out = Output::Pty(pty);
        let mut buf = [0u8; 8];
        let mut seen = Vec::new();
        loop {
            let n = out.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(seen, b"x");
    }
}

//! Test helpers: a minimal vhost-user daemon ([`FakeBackend`]: accepts one connection, records
//! every message (code, body, number of fds), answers the `GET_*` requests, keeps the call
//! eventfds so a test can play the daemon signalling a used buffer, and hangs up on
//! [`FakeBackend::finish`]), a device connected to it, and queues to activate it with.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestAddress;

use super::handshake::{PROTOCOL_FEATURES_BIT, VIRTIO_RING_F_EVENT_IDX};
use super::{VhostUserFs, QUEUE_SIZE};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::memory::GuestMemoryMmap;

/// vhost-user request codes the tests look at.
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
}

/// One message the frontend sent.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub body: Vec<u8>,
    pub fds: usize,
}

impl Message {
    /// The body as one u64, if it is one.
    pub fn u64_body(&self) -> Option<u64> {
        Some(u64::from_le_bytes(self.body.get(..8)?.try_into().ok()?))
    }
}

/// The daemon thread and what it shares with the test.
pub struct FakeBackend {
    path: PathBuf,
    conn: Arc<Mutex<Option<UnixStream>>>,
    calls: Arc<Mutex<HashMap<u64, OwnedFd>>>,
    thread: Option<JoinHandle<Vec<Message>>>,
}

impl FakeBackend {
    /// Listens on a fresh socket; the daemon offers `features` (all protocol features) and serves
    /// `queues` queues.
    pub fn start(features: u64, queues: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "pangolin-fake-vu-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let conn = Arc::new(Mutex::new(None));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let (conn2, calls2) = (conn.clone(), calls.clone());
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            *conn2.lock().expect("lock") = Some(stream.try_clone().expect("clone"));
            serve(stream, features, queues, &calls2)
        });
        Self {
            path,
            conn,
            calls,
            thread: Some(thread),
        }
    }

    /// The socket to connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Signals the call eventfd the frontend gave for `queue` (waiting for the daemon thread to
    /// have read it: no reply acknowledges `SET_VRING_CALL`).
    pub fn signal_call(&self, queue: u64) {
        let mut tries = 0;
        let calls = loop {
            let calls = self.calls.lock().expect("lock");
            if calls.contains_key(&queue) {
                break calls;
            }
            drop(calls);
            tries += 1;
            assert!(tries < 500, "no SET_VRING_CALL for queue {queue}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let fd = calls.get(&queue).expect("call fd").as_raw_fd();
        let one = 1u64.to_ne_bytes();
        // SAFETY: fd is an eventfd we own; the buffer is 8 valid bytes.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        assert_eq!(n, 8);
    }

    /// Hangs up (after reading what was already sent) and returns the message log.
    pub fn finish(mut self) -> Vec<Message> {
        if let Some(c) = self.conn.lock().expect("lock").as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let log = self
            .thread
            .take()
            .expect("thread")
            .join()
            .expect("daemon thread");
        // Drop our clone so the socket really closes.
        self.conn.lock().expect("lock").take();
        log
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        if let Some(c) = self.conn.lock().expect("lock").take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(
    mut stream: UnixStream,
    features: u64,
    queues: u64,
    calls: &Mutex<HashMap<u64, OwnedFd>>,
) -> Vec<Message> {
    let mut log = Vec::new();
    loop {
        let mut hdr = [0u8; 12];
        let Some(fds) = recv_with_fds(stream.as_raw_fd(), &mut hdr) else {
            return log;
        };
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().expect("4"));
        let (request, size) = (word(0), word(8));
        let mut body = vec![0u8; usize::try_from(size).expect("size")];
        if stream.read_exact(&mut body).is_err() {
            return log;
        }
        let msg = Message {
            request,
            body,
            fds: fds.len(),
        };
        let reply = match request {
            req::GET_FEATURES => Some(features),
            req::GET_PROTOCOL_FEATURES => Some(0xffff),
            req::GET_QUEUE_NUM => Some(queues),
            _ => None,
        };
        if request == req::SET_VRING_CALL {
            if let (Some(index), Some(fd)) = (msg.u64_body(), fds.into_iter().next()) {
                calls.lock().expect("lock").insert(index & 0xff, fd);
            }
        }
        log.push(msg);
        if let Some(value) = reply {
            let mut out = Vec::with_capacity(20);
            out.extend_from_slice(&request.to_le_bytes());
            out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
            if std::io::Write::write_all(&mut stream, &out).is_err() {
                return log;
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes (the header, which carries the message's fds); `None` at EOF.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> Option<Vec<OwnedFd>> {
    let mut cmsg = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: msg points at live buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 || usize::try_from(n).ok()? != buf.len() {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the libc helpers.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some(fds)
}

/// What the fake daemon offers unless a test says otherwise.
pub const BACKEND_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | VIRTIO_RING_F_EVENT_IDX;

/// A device connected to a fresh fake daemon offering `features`, with 4 MiB of guest RAM.
pub fn connect(features: u64) -> (VhostUserFs, FakeBackend, GuestMemoryMmap) {
    let mem = crate::memory::create(4).expect("memory");
    let backend = FakeBackend::start(features, 2);
    let fs = VhostUserFs::new(backend.path(), "myfs", &mem).expect("connect");
    (fs, backend, mem)
}

/// Both queues of the device, in `mem`.
pub fn queues(mem: &GuestMemoryMmap) -> Vec<Queue> {
    [0x10_0000u64, 0x20_0000]
        .iter()
        .map(|&base| {
            MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE)
                .create_queue::<Queue>()
                .expect("queue")
        })
        .collect()
}

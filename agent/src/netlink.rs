//! A blocking route-netlink client for the few changes the guest's network needs: one request
//! at a time, each acknowledged (`NLM_F_ACK`) before the next, matched by sequence number.
//!
//! It uses the netlink crates (and versions) libcontainer already links into the agent for its
//! `netDevices` support, so it adds only this file's code to the static binary; the async
//! `rtnetlink` stack the shim uses would add a second copy and a futures layer. The messages
//! themselves are built in `net.rs`.

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Receive buffer: an acknowledgement echoes the request's header only (ours are < 200 bytes).
const RECV_BUF: usize = 8192;
/// Datagrams read while waiting for one acknowledgement (others' are skipped).
const MAX_READS: usize = 64;

/// A netlink socket bound to the kernel.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a route-netlink socket.
    pub fn open() -> std::io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `message` as a create-or-replace request (`ip ... replace`, so a repeated setup
    /// is no error) and waits for its acknowledgement: the kernel's errno on refusal.
    pub fn replace(&mut self, message: RouteNetlinkMessage) -> std::io::Result<()> {
        self.request(message, NLM_F_CREATE | NLM_F_REPLACE)
    }

    /// Sends `message` with `flags` (besides REQUEST and ACK) and waits for its ack.
    pub fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(message);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut rx = Vec::with_capacity(RECV_BUF);
        for _ in 0..MAX_READS {
            rx.clear();
            let n = self.socket.recv(&mut rx, 0)?;
            if let Some(result) = ack(rx.get(..n).unwrap_or_default(), self.seq)? {
                return result;
            }
        }
        Err(std::io::Error::other("no netlink acknowledgement"))
    }
}

/// The acknowledgement for `seq` in one datagram, if it holds one: Ok(()) or the errno.
fn ack(mut data: &[u8], seq: u32) -> std::io::Result<Option<std::io::Result<()>>> {
    while !data.is_empty() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let len = usize::try_from(msg.header.length).unwrap_or(usize::MAX);
        if msg.header.sequence_number == seq {
            if let NetlinkPayload::Error(e) = msg.payload {
                return Ok(Some(e.code.map_or(Ok(()), |_| Err(e.to_io()))));
            }
        }
        // Messages are 4-byte aligned; a zero length would never advance.
        let next = len.checked_next_multiple_of(4).filter(|&l| l > 0);
        data = next.and_then(|l| data.get(l..)).unwrap_or_default();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::ErrorMessage;

    use super::*;

    fn datagram(seq: u32, code: i32) -> Vec<u8> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(code);
        let mut header = netlink_packet_core::NetlinkHeader::default();
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(e));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence_and_carry_the_errno() {
        assert!(matches!(ack(&datagram(7, 0), 7), Ok(Some(Ok(())))));
        let refused = ack(&datagram(7, -libc::EEXIST), 7)
            .expect("parses")
            .expect("is the ack");
        assert_eq!(
            refused.expect_err("refused").raw_os_error(),
            Some(libc::EEXIST)
        );
        // Someone else's ack, then ours, in one datagram.
        let mut two = datagram(6, -libc::EPERM);
        two.extend(datagram(7, 0));
        assert!(matches!(ack(&two, 7), Ok(Some(Ok(())))));
        assert!(matches!(ack(&datagram(6, 0), 7), Ok(None)));
        assert!(ack(&[1, 2, 3], 7).is_err());
    }
}

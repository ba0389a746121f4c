//! Who is at the other end of a loopback TCP connection: the owner uid of the peer's socket,
//! read from the kernel's socket tables `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! TCP has no `SO_PEERCRED`. But both ends of a loopback connection are sockets of this host,
//! and the kernel lists each with the uid that created it: the peer's socket is the entry whose
//! local address is our connection's peer address and whose remote address is our local one.
//!
//! A line of those files (the kernel's `tcp4_seq_show`/`tcp6_seq_show`):
//!
//! ```text
//!   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//!    0: 0100007F:1F90 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000     0        0 4242 ...
//! ```
//!
//! An IPv4 address is the 32-bit word in network order printed as a host-order number (so
//! `0100007F` is 127.0.0.1 on a little-endian host), an IPv6 address four such words; a port
//! is four hex digits in host order. Only the columns up to `inode` are read.
//!
//! An entry whose inode is 0 belongs to no open file: a closed socket still in the table
//! (TIME_WAIT, or FIN_WAIT2 kept as a time-wait entry, which the kernel lists with uid 0) or
//! an orphan. Its uid says nothing about who holds the connection, so such entries never
//! identify a peer: a client that connects and closes at once is not taken for root.

use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The kernel's socket tables, IPv4 then IPv6.
pub const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// One socket of a `/proc/net/tcp` or `/proc/net/tcp6` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The socket's own address.
    pub local: SocketAddr,
    /// The address it is connected to (0 for a listener).
    pub remote: SocketAddr,
    /// The TCP state (`01` established, `0A` listen, ...).
    pub state: u8,
    /// The uid that created the socket.
    pub uid: u32,
    /// The socket's inode; 0 when no open file holds it.
    pub inode: u64,
}

/// `127.0.0.1` for `::ffff:127.0.0.1`, so that both families compare alike.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// One 32-bit word of an address: its bytes as they lie in memory, i.e. in network order.
fn word(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes)
}

/// `ADDR:PORT` in the kernel's notation.
fn address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses one line; `None` for the header and anything that is not an entry.
pub fn parse_line(line: &str) -> Option<Entry> {
    let mut fields = line.split_ascii_whitespace();
    let slot = fields.next()?;
    if !slot.ends_with(':') || slot[..slot.len() - 1].parse::<u64>().is_err() {
        return None;
    }
    let local = address(fields.next()?)?;
    let remote = address(fields.next()?)?;
    let state = fields.next()?;
    if state.len() != 2 {
        return None;
    }
    let state = u8::from_str_radix(state, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt.
    let _ = (fields.next()?, fields.next()?, fields.next()?);
    let uid = fields.next()?.parse().ok()?;
    let _timeout = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    Some(Entry {
        local,
        remote,
        state,
        uid,
        inode,
    })
}

/// The uid of the socket at `peer` connected to `ours`, among `lines`: the first live entry
/// (inode not 0) whose local address is `peer` and remote address `ours`.
pub fn find_owner<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    peer: SocketAddr,
    ours: SocketAddr,
) -> Option<u32> {
    let (peer, ours) = (canonical(peer), canonical(ours));
    lines.into_iter().find_map(|line| {
        let e = parse_line(line)?;
        (e.inode != 0 && canonical(e.local) == peer && canonical(e.remote) == ours).then_some(e.uid)
    })
}

/// The owner uid of the peer socket of our connection from `ours` to `peer`, read from
/// [`TABLES`] line by line (one line in memory, however many sockets the host has); `None`
/// when no open socket matches (the peer is not on this host, or already closed). A table
/// that does not exist (no IPv6) is skipped.
pub fn peer_uid(peer: SocketAddr, ours: SocketAddr) -> io::Result<Option<u32>> {
    for table in TABLES {
        let file = match std::fs::File::open(table) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{table}: {e}"))),
        };
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if let Some(uid) = find_owner([line.as_str()], peer, ours) {
                return Ok(Some(uid));
            }
        }
    }
    Ok(None)
}

/// This process's effective uid, from `/proc/self/status` (`Uid:` real, effective, saved,
/// filesystem).
pub fn own_uid() -> io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_ascii_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| io::Error::other("no effective uid in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `addr` as the kernel prints it.
    fn kernel(addr: SocketAddr) -> String {
        let hex = |bytes: &[u8]| {
            bytes
                .chunks_exact(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect::<String>()
        };
        let ip = match addr.ip() {
            IpAddr::V4(v4) => hex(&v4.octets()),
            IpAddr::V6(v6) => hex(&v6.octets()),
        };
        format!("{ip}:{:04X}", addr.port())
    }

    fn line(local: SocketAddr, remote: SocketAddr, state: u8, uid: u32, inode: u64) -> String {
        format!(
            "  12: {} {} {state:02X} 00000000:00000000 00:00000000 00000000 {uid:>5}        0 \
             {inode} 1 0000000000000000 20 4 30 10 -1",
            kernel(local),
            kernel(remote)
        )
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_line_as_a_little_endian_kernel_prints_it() {
        let l = "   3: 0100007F:A2C4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 \
                 65534        0 98765 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_line(l),
            Some(Entry {
                local: sa("127.0.0.1:41668"),
                remote: sa("127.0.0.1:8080"),
                state: 1,
                uid: 65534,
                inode: 98765,
            })
        );
        let v6 = "   0: 00000000000000000000000001000000:1F90 \
                  00000000000000000000000001000000:A2C4 01 00000000:00000000 00:00000000 \
                  00000000   107        0 4242 1 0000000000000000 20 4 30 10 -1";
        let e = parse_line(v6).unwrap();
        assert_eq!(
            (e.local, e.remote, e.uid),
            (sa("[::1]:8080"), sa("[::1]:41668"), 107)
        );
    }

    #[test]
    fn the_header_and_broken_lines_are_not_entries() {
        assert_eq!(
            parse_line(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   \
                 uid  timeout inode"
            ),
            None
        );
        let good = line(sa("127.0.0.1:1"), sa("127.0.0.1:2"), 1, 0, 7);
        assert!(parse_line(&good).is_some());
        for cut in [10, 20, 40, 70, 90] {
            assert_eq!(parse_line(&good[..cut]), None, "{:?}", &good[..cut]);
        }
        assert_eq!(parse_line(""), None);
        // A state of one digit, an address without its port.
        assert_eq!(parse_line(&good.replace(" 01 ", " 1 ")), None);
        assert_eq!(parse_line(&good.replacen(":0001", "", 1)), None);
    }

    #[test]
    fn the_owner_is_the_live_socket_at_the_peer_address_connected_to_ours() {
        let ours = sa("127.0.0.1:9003");
        let peer = sa("127.0.0.1:50000");
        let table = [
            "  sl  local_address rem_address ...".to_owned(),
            // Our listener and our accepted socket (uid 0): not the peer.
            line(ours, sa("0.0.0.0:0"), 0x0A, 0, 11),
            line(ours, peer, 1, 0, 12),
            // Another connection from the same port number elsewhere.
            line(peer, sa("127.0.0.1:9004"), 1, 5, 13),
            // The peer.
            line(peer, ours, 1, 107, 14),
        ];
        let lines = || table.iter().map(String::as_str);
        assert_eq!(find_owner(lines(), peer, ours), Some(107));
        assert_eq!(find_owner(lines(), sa("127.0.0.1:50001"), ours), None);
        // IPv4 seen through a dual-stack socket.
        assert_eq!(
            find_owner(
                lines(),
                sa("[::ffff:127.0.0.1]:50000"),
                sa("[::ffff:127.0.0.1]:9003")
            ),
            Some(107)
        );
        let v6 = line(sa("[::1]:50000"), sa("[::1]:9003"), 1, 108, 15);
        assert_eq!(
            find_owner([v6.as_str()], sa("[::1]:50000"), sa("[::1]:9003")),
            Some(108)
        );
    }

    /// A peer that connected and closed at once leaves a time-wait entry listed with uid 0:
    /// it identifies nobody (else any user could pass for root).
    #[test]
    fn a_closed_socket_identifies_nobody() {
        let ours = sa("127.0.0.1:9003");
        let peer = sa("127.0.0.1:50000");
        let time_wait = line(peer, ours, 0x06, 0, 0);
        let fin_wait2 = line(peer, ours, 0x05, 0, 0);
        assert_eq!(
            find_owner([time_wait.as_str(), fin_wait2.as_str()], peer, ours),
            None
        );
    }

    /// Against the real kernel: a connection this test makes is owned by this process's uid.
    #[test]
    fn a_real_loopback_connection_is_owned_by_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (served, peer) = listener.accept().unwrap();
        let ours = served.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(peer_uid(peer, ours).unwrap(), Some(own_uid().unwrap()));
        // The listener's own side is not mistaken for a peer: nothing is at ours → peer.
        assert_eq!(peer_uid(sa("127.0.0.1:1"), ours).unwrap(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a line holds, parsing it returns; it never panics.
        #[test]
        fn arbitrary_lines_never_panic(s in "\\PC{0,200}") {
            let _ = parse_line(&s);
            let _ = find_owner([s.as_str()], sa("127.0.0.1:1"), sa("127.0.0.1:2"));
        }

        /// Lines made of the table's own alphabet (hex, colons, spaces), so that the parser
        /// goes deep into them.
        #[test]
        fn table_like_lines_never_panic(s in "[0-9A-Fa-f: ]{0,200}") {
            let _ = parse_line(&s);
        }

        /// Every entry the kernel could print reads back as itself.
        #[test]
        fn printed_entries_read_back(
            a in any::<[u8; 16]>(), b in any::<[u8; 4]>(), pa in any::<u16>(), pb in any::<u16>(),
            state in any::<u8>(), uid in any::<u32>(), inode in any::<u64>(),
        ) {
            let local = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), pa);
            let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), pb);
            for (l, r) in [(local, local), (remote, remote)] {
                let e = parse_line(&line(l, r, state, uid, inode));
                prop_assert_eq!(e, Some(Entry { local: l, remote: r, state, uid, inode }));
            }
        }
    }
}

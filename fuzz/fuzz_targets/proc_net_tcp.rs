//! Arbitrary bytes, split into lines, through colo-proxyd's reader of the kernel's socket
//! tables (`colo_proxyd::daemon::peer_uid`: `/proc/net/tcp` and `/proc/net/tcp6`, which decide
//! who may connect to colo-proxyd secondary's QEMU ports). Checks, besides "never panics":
//! * an entry comes only from a line shaped like the table's (a `N:` slot, at least ten
//!   fields, addresses of 8 or 32 hex digits and a 4-digit port, a two-digit state);
//! * every entry printed back in the kernel's format (`tcp4_seq_show`/`tcp6_seq_show`) parses
//!   to the same entry, so nothing the parser accepts is read differently from what the kernel
//!   would have meant;
//! * `find_owner` over the lines, asked for an entry's own addresses, names a uid exactly when
//!   a live entry (inode not 0) has them: the first such entry's.
#![no_main]

use colo_proxyd::daemon::peer_uid::{Entry, find_owner, parse_line};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, SocketAddr};

/// `addr` as the kernel prints it: each 32-bit word of the address in memory order, printed
/// as a host-order number, then the port in host order.
fn kernel_address(addr: SocketAddr) -> String {
    let words = |bytes: &[u8]| {
        bytes
            .chunks_exact(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect::<String>()
    };
    let ip = match addr.ip() {
        IpAddr::V4(v4) => words(&v4.octets()),
        IpAddr::V6(v6) => words(&v6.octets()),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// `e` as a line of the table, in `tcp4_seq_show`'s format (the trailing columns as a live
/// established socket has them).
fn kernel_line(slot: usize, e: &Entry) -> String {
    format!(
        "{slot:4}: {} {} {:02X} 00000000:00000000 00:00000000 00000000 {:5} {:8} {} 1 \
         000000003e88925f 20 4 30 10 -1",
        kernel_address(e.local),
        kernel_address(e.remote),
        e.state,
        e.uid,
        0,
        e.inode
    )
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    for (slot, line) in lines.iter().enumerate() {
        let Some(entry) = parse_line(line) else {
            continue;
        };
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        assert!(fields.len() >= 10, "{line:?} -> {entry:?}");
        assert!(fields[0].ends_with(':'), "{line:?}");
        assert_eq!(fields[3].len(), 2, "{line:?}");
        // The kernel's widths: 8 hex digits for IPv4, 32 for IPv6, 4 for the port; the
        // family follows the width.
        for (field, addr) in [(fields[1], entry.local), (fields[2], entry.remote)] {
            let (ip, port) = field.split_once(':').unwrap();
            assert!(ip.len() == 8 || ip.len() == 32, "{line:?}");
            assert_eq!(port.len(), 4, "{line:?}");
            assert_eq!(ip.len() == 8, addr.is_ipv4(), "{line:?}");
        }

        let printed = kernel_line(slot, &entry);
        assert_eq!(
            parse_line(&printed),
            Some(entry),
            "{line:?} printed as {printed:?}"
        );

        let first_live = lines
            .iter()
            .filter_map(|l| parse_line(l))
            .find(|e| e.inode != 0 && same(e.local, entry.local) && same(e.remote, entry.remote));
        assert_eq!(
            find_owner(lines.iter().copied(), entry.local, entry.remote),
            first_live.map(|e| e.uid),
            "{line:?}"
        );
    }
});

/// Equal once an IPv4-mapped IPv6 address is taken as its IPv4 address (as `find_owner`
/// compares them).
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(s, |v4| SocketAddr::new(IpAddr::V4(v4), s.port())),
        IpAddr::V4(_) => s,
    };
    canonical(a) == canonical(b)
}

//! Which comparator a frame goes to.

use std::borrow::Cow;

use crate::compare::Segment;
use crate::packet::{FlowKey, Network, Transport, parse_ethernet};

/// ICMPv6 types 133–137: router/neighbour solicitation and advertisement, redirect. Each VM
/// sends these on its own schedule, so they are not compared.
const ND_TYPES: std::ops::RangeInclusive<u8> = 133..=137;

/// How a frame is compared.
#[derive(Debug)]
pub(super) enum Class<'a> {
    /// A TCP segment of a connection.
    Stream(FlowKey, Segment<'a>),
    /// A UDP datagram (its payload) or an ICMP message (type, code and body).
    Datagram(FlowKey, Cow<'a, [u8]>),
    /// Not compared: ARP, neighbour discovery, fragments, unknown or malformed frames.
    Uncompared,
}

pub(super) fn classify(ethernet: &[u8]) -> Class<'_> {
    let Ok(parsed) = parse_ethernet(ethernet) else {
        return Class::Uncompared;
    };
    let Network::Ip(ip) = parsed.network else {
        return Class::Uncompared;
    };
    let Some(key) = ip.flow_key() else {
        return Class::Uncompared;
    };
    match ip.transport {
        Transport::Tcp(tcp) => Class::Stream(key, Segment::from(&tcp)),
        Transport::Udp(udp) => Class::Datagram(key, Cow::Borrowed(udp.payload)),
        Transport::Icmpv6(icmp) if ND_TYPES.contains(&icmp.icmp_type) => Class::Uncompared,
        Transport::Icmp(icmp) | Transport::Icmpv6(icmp) => {
            let mut bytes = Vec::with_capacity(2 + icmp.body.len());
            bytes.extend_from_slice(&[icmp.icmp_type, icmp.code]);
            bytes.extend_from_slice(icmp.body);
            Class::Datagram(key, Cow::Owned(bytes))
        }
        Transport::Fragment { .. } | Transport::Other { .. } => Class::Uncompared,
    }
}

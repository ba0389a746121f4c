//! IPv4 and IPv6 headers, IPv6 extension headers, and fragment detection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::bytes::Reader;
use super::transport::{self, Transport};
use super::{IpPacket, Layer, ParseError};

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

// IPv6 extension headers (RFC 8200 §4) that may precede the upper-layer header.
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;
const EXT_MOBILITY: u8 = 135;
const EXT_HIP: u8 = 139;
const EXT_SHIM6: u8 = 140;

pub(super) fn parse_ipv4(packet: &[u8]) -> Result<IpPacket<'_>, ParseError> {
    let mut reader = Reader::new(packet, Layer::Ipv4);
    let version_ihl = reader.u8()?;
    if version_ihl >> 4 != 4 {
        return Err(malformed4("version is not 4"));
    }
    let header_len = usize::from(version_ihl & 0x0F) * 4;
    if header_len < IPV4_MIN_HEADER {
        return Err(malformed4("header length below 20"));
    }
    let _tos = reader.u8()?;
    let total_len = usize::from(reader.u16()?);
    let _id = reader.u16()?;
    let flags_fragment = reader.u16()?;
    let ttl = reader.u8()?;
    let protocol = reader.u8()?;
    let _checksum = reader.u16()?;
    let src = Ipv4Addr::from(reader.array::<4>()?);
    let dst = Ipv4Addr::from(reader.array::<4>()?);
    if total_len < header_len {
        return Err(malformed4("total length below header length"));
    }
    if total_len > packet.len() {
        return Err(ParseError::Truncated { layer: Layer::Ipv4 });
    }
    // Slicing is safe: header_len <= total_len <= packet.len() was checked above.
    let payload = &packet[header_len..total_len];
    let more_fragments = flags_fragment & 0x2000 != 0;
    let fragment_offset = flags_fragment & 0x1FFF;
    let transport = if more_fragments || fragment_offset != 0 {
        Transport::Fragment { protocol, payload }
    } else {
        transport::parse(protocol, payload)?
    };
    Ok(IpPacket {
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        protocol,
        ttl,
        transport,
    })
}

fn malformed4(what: &'static str) -> ParseError {
    ParseError::Malformed {
        layer: Layer::Ipv4,
        what,
    }
}

pub(super) fn parse_ipv6(packet: &[u8]) -> Result<IpPacket<'_>, ParseError> {
    let mut reader = Reader::new(packet, Layer::Ipv6);
    let version_class_flow = reader.u32()?;
    if version_class_flow >> 28 != 6 {
        return Err(ParseError::Malformed {
            layer: Layer::Ipv6,
            what: "version is not 6",
        });
    }
    let payload_len = usize::from(reader.u16()?);
    let mut next_header = reader.u8()?;
    let hop_limit = reader.u8()?;
    let src = Ipv6Addr::from(reader.array::<16>()?);
    let dst = Ipv6Addr::from(reader.array::<16>()?);
    // A jumbogram (payload length 0 plus a hop-by-hop option) cannot cross Ethernet, so 0
    // simply means an empty payload.
    let end = IPV6_HEADER + payload_len;
    if end > packet.len() {
        return Err(ParseError::Truncated { layer: Layer::Ipv6 });
    }
    let mut reader = Reader::new(&packet[IPV6_HEADER..end], Layer::Ipv6);
    let mut fragmented = false;
    // Each extension header consumes at least 8 bytes, so this loop ends with the payload.
    loop {
        match next_header {
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_MOBILITY | EXT_HIP | EXT_SHIM6 => {
                let following = reader.u8()?;
                let len_units = usize::from(reader.u8()?);
                reader.take((len_units + 1) * 8 - 2)?;
                next_header = following;
            }
            EXT_AUTH => {
                let following = reader.u8()?;
                let len_units = usize::from(reader.u8()?);
                // AH counts 4-byte units minus 2 (RFC 4302 §2.2).
                reader.take((len_units + 2) * 4 - 2)?;
                next_header = following;
            }
            EXT_FRAGMENT => {
                let following = reader.u8()?;
                let _reserved = reader.u8()?;
                let offset_flags = reader.u16()?;
                let _identification = reader.u32()?;
                // An atomic fragment (offset 0, no more fragments) is a whole packet.
                fragmented |= offset_flags & 0xFFF9 != 0;
                next_header = following;
            }
            _ => break,
        }
    }
    let payload = reader.rest();
    let transport = if fragmented {
        Transport::Fragment {
            protocol: next_header,
            payload,
        }
    } else {
        transport::parse(next_header, payload)?
    };
    Ok(IpPacket {
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        protocol: next_header,
        ttl: hop_limit,
        transport,
    })
}

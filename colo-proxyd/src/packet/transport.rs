//! TCP, UDP, ICMP and ICMPv6 headers.

use super::bytes::Reader;
use super::{Layer, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ParseError};

const TCP_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// The upper-layer content of an IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport<'a> {
    /// A TCP segment.
    Tcp(TcpSegment<'a>),
    /// A UDP datagram.
    Udp(UdpDatagram<'a>),
    /// An ICMP (IPv4) message.
    Icmp(IcmpMessage<'a>),
    /// An ICMPv6 message (including neighbour discovery).
    Icmpv6(IcmpMessage<'a>),
    /// A piece of a fragmented IP packet; its transport header is not (or not wholly) here.
    Fragment {
        /// The protocol of the fragmented packet.
        protocol: u8,
        /// This fragment's bytes.
        payload: &'a [u8],
    },
    /// A protocol this parser does not read.
    Other {
        /// The IP protocol number.
        protocol: u8,
        /// Everything after the IP header(s).
        payload: &'a [u8],
    },
}

/// The TCP header bits the comparator looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags {
    /// FIN: the sender's last byte.
    pub fin: bool,
    /// SYN: the sender's initial sequence number.
    pub syn: bool,
    /// RST: the connection is aborted.
    pub rst: bool,
    /// PSH.
    pub psh: bool,
    /// ACK: the acknowledgement number is valid.
    pub ack: bool,
    /// URG.
    pub urg: bool,
}

impl TcpFlags {
    fn from_bits(bits: u8) -> Self {
        TcpFlags {
            fin: bits & 0x01 != 0,
            syn: bits & 0x02 != 0,
            rst: bits & 0x04 != 0,
            psh: bits & 0x08 != 0,
            ack: bits & 0x10 != 0,
            urg: bits & 0x20 != 0,
        }
    }
}

/// A TCP segment. Of the options only the window scale is read (on SYNs, the only segments
/// that may carry it): the secondary paces the client's segments by the SVM's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful only with the ACK flag).
    pub ack: u32,
    /// Control flags.
    pub flags: TcpFlags,
    /// Receive window.
    pub window: u16,
    /// Length of the header including options (the data offset in bytes).
    pub header_len: usize,
    /// The window scale option's shift count (RFC 7323, capped at 14), on a SYN that carries
    /// one; `None` on every other segment.
    pub window_scale: Option<u8>,
    /// Segment data, after the options.
    pub payload: &'a [u8],
}

/// A UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Datagram data, trimmed to the UDP length field.
    pub payload: &'a [u8],
}

/// An ICMP or ICMPv6 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpMessage<'a> {
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub code: u8,
    /// Everything after the 4-byte type/code/checksum header.
    pub body: &'a [u8],
}

pub(super) fn parse(protocol: u8, payload: &[u8]) -> Result<Transport<'_>, ParseError> {
    Ok(match protocol {
        PROTO_TCP => Transport::Tcp(parse_tcp(payload)?),
        PROTO_UDP => Transport::Udp(parse_udp(payload)?),
        PROTO_ICMP => Transport::Icmp(parse_icmp(payload)?),
        PROTO_ICMPV6 => Transport::Icmpv6(parse_icmp(payload)?),
        _ => Transport::Other { protocol, payload },
    })
}

fn parse_tcp(segment: &[u8]) -> Result<TcpSegment<'_>, ParseError> {
    let mut reader = Reader::new(segment, Layer::Tcp);
    let src_port = reader.u16()?;
    let dst_port = reader.u16()?;
    let seq = reader.u32()?;
    let ack = reader.u32()?;
    let offset_flags = reader.u16()?;
    let window = reader.u16()?;
    let header_len = usize::from(offset_flags >> 12) * 4;
    if header_len < TCP_MIN_HEADER {
        return Err(ParseError::Malformed {
            layer: Layer::Tcp,
            what: "data offset below 20",
        });
    }
    let payload = segment
        .get(header_len..)
        .ok_or(ParseError::Truncated { layer: Layer::Tcp })?;
    let flags = TcpFlags::from_bits((offset_flags & 0xFF) as u8);
    let window_scale = if flags.syn {
        window_scale(&segment[TCP_MIN_HEADER..header_len])
    } else {
        None
    };
    Ok(TcpSegment {
        src_port,
        dst_port,
        seq,
        ack,
        flags,
        window,
        header_len,
        window_scale,
        payload,
    })
}

/// TCP option kinds (RFC 9293, RFC 7323).
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_WINDOW_SCALE: u8 = 3;
/// RFC 7323 2.3: a larger shift count is used as 14.
const MAX_WINDOW_SCALE: u8 = 14;

/// The window scale option among `options`, if present and well formed. A malformed option
/// list (a length that runs past the header, or below 2) ends the search: the segment's
/// data is still read, only the scale is unknown.
fn window_scale(mut options: &[u8]) -> Option<u8> {
    loop {
        match options {
            [] | [OPTION_END, ..] => return None,
            [OPTION_NOP, rest @ ..] => options = rest,
            [OPTION_WINDOW_SCALE, 3, shift, ..] => return Some((*shift).min(MAX_WINDOW_SCALE)),
            [_, len, ..] if usize::from(*len) >= 2 && usize::from(*len) <= options.len() => {
                options = &options[usize::from(*len)..];
            }
            _ => return None,
        }
    }
}

fn parse_udp(datagram: &[u8]) -> Result<UdpDatagram<'_>, ParseError> {
    let mut reader = Reader::new(datagram, Layer::Udp);
    let src_port = reader.u16()?;
    let dst_port = reader.u16()?;
    let length = usize::from(reader.u16()?);
    if length < UDP_HEADER {
        return Err(ParseError::Malformed {
            layer: Layer::Udp,
            what: "length below 8",
        });
    }
    let payload = datagram
        .get(UDP_HEADER..length)
        .ok_or(ParseError::Truncated { layer: Layer::Udp })?;
    Ok(UdpDatagram {
        src_port,
        dst_port,
        payload,
    })
}

fn parse_icmp(message: &[u8]) -> Result<IcmpMessage<'_>, ParseError> {
    let mut reader = Reader::new(message, Layer::Icmp);
    let icmp_type = reader.u8()?;
    let code = reader.u8()?;
    let _checksum = reader.u16()?;
    Ok(IcmpMessage {
        icmp_type,
        code,
        body: reader.rest(),
    })
}

//! Reading the headers of one Ethernet frame into a borrowed view: Ethernet (with up to two
//! 802.1Q/802.1ad tags), ARP, IPv4, IPv6 (with its extension headers), TCP, UDP, ICMP and
//! ICMPv6.
//!
//! The input comes from the guests and the network, so nothing here trusts a length field:
//! every read is bounds-checked and a malformed frame is a [`ParseError`], never a panic.
//! Payloads are trimmed to the IP header's own length, because Ethernet pads short frames to
//! 60 bytes and that padding is not stream data.

mod bytes;
mod ip;
mod transport;

use std::net::IpAddr;

use thiserror::Error;

use bytes::Reader;
pub use transport::{IcmpMessage, TcpFlags, TcpSegment, Transport, UdpDatagram};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88A8;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Most VLAN tags read before the frame is called malformed (802.1ad stacks two).
const MAX_VLAN_TAGS: usize = 2;

/// Which header a [`ParseError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The Ethernet header or a VLAN tag.
    Ethernet,
    /// An ARP packet.
    Arp,
    /// The IPv4 header.
    Ipv4,
    /// The IPv6 header or one of its extension headers.
    Ipv6,
    /// The TCP header.
    Tcp,
    /// The UDP header.
    Udp,
    /// The ICMP or ICMPv6 header.
    Icmp,
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// The frame ends inside a header.
    #[error("{layer:?} header truncated")]
    Truncated {
        /// The header that was cut short.
        layer: Layer,
    },
    /// A header field contradicts the frame (bad version, length out of range, ...).
    #[error("malformed {layer:?} header: {what}")]
    Malformed {
        /// The header with the bad field.
        layer: Layer,
        /// Which field is wrong.
        what: &'static str,
    },
}

/// The headers of one Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFrame<'a> {
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// The outermost VLAN id, if the frame is tagged.
    pub vlan: Option<u16>,
    /// The EtherType after any VLAN tags.
    pub ethertype: u16,
    /// What the frame carries.
    pub network: Network<'a>,
}

/// The network-layer content of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network<'a> {
    /// An ARP packet (Ethernet/IPv4 or anything else ARP can carry).
    Arp(ArpPacket<'a>),
    /// An IPv4 or IPv6 packet.
    Ip(IpPacket<'a>),
    /// An EtherType this parser does not read; left to the configured policy.
    Other {
        /// Everything after the EtherType.
        payload: &'a [u8],
    },
}

/// An ARP packet; the addresses stay raw because their sizes are in the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArpPacket<'a> {
    /// Hardware type (1 = Ethernet).
    pub hardware_type: u16,
    /// Protocol type (0x0800 = IPv4).
    pub protocol_type: u16,
    /// 1 = request, 2 = reply.
    pub operation: u16,
    /// Sender hardware address.
    pub sender_hw: &'a [u8],
    /// Sender protocol address.
    pub sender_proto: &'a [u8],
    /// Target hardware address.
    pub target_hw: &'a [u8],
    /// Target protocol address.
    pub target_proto: &'a [u8],
}

/// An IPv4 or IPv6 packet with the fields the comparator and the policies need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPacket<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The upper-layer protocol after any IPv6 extension headers.
    pub protocol: u8,
    /// Time to live / hop limit.
    pub ttl: u8,
    /// The upper-layer content.
    pub transport: Transport<'a>,
}

impl IpPacket<'_> {
    /// The connection this packet belongs to, in its direction of travel. `None` for a
    /// non-first fragment or a protocol without ports; ICMP has no ports and keys on addresses
    /// alone (ports 0).
    pub fn flow_key(&self) -> Option<FlowKey> {
        let (src_port, dst_port) = match &self.transport {
            Transport::Tcp(tcp) => (tcp.src_port, tcp.dst_port),
            Transport::Udp(udp) => (udp.src_port, udp.dst_port),
            Transport::Icmp(_) | Transport::Icmpv6(_) => (0, 0),
            Transport::Fragment { .. } | Transport::Other { .. } => return None,
        };
        Some(FlowKey {
            protocol: self.protocol,
            src: self.src,
            src_port,
            dst: self.dst,
            dst_port,
        })
    }
}

/// A connection key (5-tuple) in one direction, for both IP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// IP protocol number.
    pub protocol: u8,
    /// Source address.
    pub src: IpAddr,
    /// Source port (0 for ICMP).
    pub src_port: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (0 for ICMP).
    pub dst_port: u16,
}

impl std::hash::Hash for FlowKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The flow table hashes every frame's key with a keyed hash (the key comes from the
        // network), whose cost grows with the bytes and the writes fed to it: an IPv4 key goes
        // in as one 13-byte write, any other as one 39-byte write, rather than one write per
        // field (`docs/benchmarks.md`). Equal keys give equal bytes, which is all `Hash` must
        // guarantee.
        if let (IpAddr::V4(src), IpAddr::V4(dst)) = (self.src, self.dst) {
            let mut bytes = [0u8; 13];
            bytes[0] = self.protocol;
            bytes[1..5].copy_from_slice(&src.octets());
            bytes[5..7].copy_from_slice(&self.src_port.to_be_bytes());
            bytes[7..11].copy_from_slice(&dst.octets());
            bytes[11..13].copy_from_slice(&self.dst_port.to_be_bytes());
            state.write(&bytes);
            return;
        }
        fn put(out: &mut [u8], address: IpAddr) {
            match address {
                IpAddr::V4(v4) => {
                    out[0] = 4;
                    out[1..5].copy_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    out[0] = 6;
                    out[1..17].copy_from_slice(&v6.octets());
                }
            }
        }
        let mut bytes = [0u8; 39];
        bytes[0] = self.protocol;
        put(&mut bytes[1..18], self.src);
        bytes[18..20].copy_from_slice(&self.src_port.to_be_bytes());
        put(&mut bytes[20..37], self.dst);
        bytes[37..39].copy_from_slice(&self.dst_port.to_be_bytes());
        state.write(&bytes);
    }
}

/// `tcp 10.0.0.2:80 > 10.0.0.9:40000` (`[…]:port` for IPv6; addresses only for ICMP), for
/// logs.
impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (src, dst) = (
            std::net::SocketAddr::new(self.src, self.src_port),
            std::net::SocketAddr::new(self.dst, self.dst_port),
        );
        match self.protocol {
            PROTO_TCP => write!(f, "tcp {src} > {dst}"),
            PROTO_UDP => write!(f, "udp {src} > {dst}"),
            PROTO_ICMP => write!(f, "icmp {} > {}", self.src, self.dst),
            PROTO_ICMPV6 => write!(f, "icmpv6 {} > {}", self.src, self.dst),
            other => write!(f, "ip-proto-{other} {src} > {dst}"),
        }
    }
}

impl FlowKey {
    /// The same connection seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            protocol: self.protocol,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }
}

/// Reads an Ethernet frame (without a vnet header; see [`crate::codec::Frame::ethernet_bytes`]).
pub fn parse_ethernet(frame: &[u8]) -> Result<ParsedFrame<'_>, ParseError> {
    let mut reader = Reader::new(frame, Layer::Ethernet);
    let dst_mac = reader.array::<6>()?;
    let src_mac = reader.array::<6>()?;
    let mut ethertype = reader.u16()?;
    let mut vlan = None;
    let mut tags = 0;
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Err(ParseError::Malformed {
                layer: Layer::Ethernet,
                what: "more than two VLAN tags",
            });
        }
        let tci = reader.u16()?;
        vlan.get_or_insert(tci & 0x0FFF);
        ethertype = reader.u16()?;
    }
    let payload = reader.rest();
    let network = match ethertype {
        ETHERTYPE_IPV4 => Network::Ip(ip::parse_ipv4(payload)?),
        ETHERTYPE_IPV6 => Network::Ip(ip::parse_ipv6(payload)?),
        ETHERTYPE_ARP => Network::Arp(parse_arp(payload)?),
        _ => Network::Other { payload },
    };
    Ok(ParsedFrame {
        dst_mac,
        src_mac,
        vlan,
        ethertype,
        network,
    })
}

fn parse_arp(packet: &[u8]) -> Result<ArpPacket<'_>, ParseError> {
    let mut reader = Reader::new(packet, Layer::Arp);
    let hardware_type = reader.u16()?;
    let protocol_type = reader.u16()?;
    let hw_len = usize::from(reader.u8()?);
    let proto_len = usize::from(reader.u8()?);
    let operation = reader.u16()?;
    Ok(ArpPacket {
        hardware_type,
        protocol_type,
        operation,
        sender_hw: reader.take(hw_len)?,
        sender_proto: reader.take(proto_len)?,
        target_hw: reader.take(hw_len)?,
        target_proto: reader.take(proto_len)?,
    })
}

#[cfg(test)]
pub(crate) mod tests;

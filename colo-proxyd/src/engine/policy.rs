//! What is compared and what is not: per-flow bypass rules for traffic known to differ
//! between the VMs, and the policy for frames no comparator understands.

use std::net::IpAddr;

use crate::packet::FlowKey;

/// What to do with PVM frames that are not compared: ARP, IPv6 neighbour discovery, IP
/// fragments, unknown EtherTypes and protocols, malformed frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UncomparedPolicy {
    /// Release them at once, as the primary sent them (the default: the network keeps
    /// working, and this traffic carries no client data a failover could lose).
    #[default]
    ReleasePrimary,
    /// Hold them until the next checkpoint.
    HoldUntilCheckpoint,
}

/// A flow whose PVM output is released uncompared. Every field left `None` matches anything;
/// the address and port match either end of the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BypassRule {
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub protocol: Option<u8>,
    /// An address at either end.
    pub address: Option<IpAddr>,
    /// A port at either end.
    pub port: Option<u16>,
}

impl BypassRule {
    /// Whether `flow` is covered by this rule.
    pub fn matches(&self, flow: &FlowKey) -> bool {
        self.protocol.is_none_or(|p| p == flow.protocol)
            && self.address.is_none_or(|a| a == flow.src || a == flow.dst)
            && self
                .port
                .is_none_or(|p| p == flow.src_port || p == flow.dst_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_either_end_and_empty_fields_match_anything() {
        let flow = FlowKey {
            protocol: 17,
            src: "10.0.0.2".parse().unwrap(),
            src_port: 123,
            dst: "10.0.0.9".parse().unwrap(),
            dst_port: 40000,
        };
        let ntp = BypassRule {
            protocol: Some(17),
            port: Some(123),
            ..BypassRule::default()
        };
        assert!(ntp.matches(&flow));
        assert!(ntp.matches(&flow.reversed()));
        assert!(
            !BypassRule {
                protocol: Some(6),
                ..ntp
            }
            .matches(&flow)
        );
        let host = BypassRule {
            address: Some("10.0.0.9".parse().unwrap()),
            ..BypassRule::default()
        };
        assert!(host.matches(&flow));
        assert!(BypassRule::default().matches(&flow));
    }
}

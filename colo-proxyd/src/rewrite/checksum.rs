//! Incremental update of the Internet checksum when one 32-bit field changes (RFC 1624,
//! equation 3), so a rewritten sequence number does not cost a pass over the payload.

/// What the TCP checksum field of a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumState {
    /// A complete checksum: it must be updated with the field.
    Complete,
    /// Only the pseudo-header sum, the device or the peer's stack finishes it
    /// (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the field covers no header bytes yet and must be left
    /// alone.
    Partial,
}

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`, bit 0 of the virtio-net header's first byte.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

impl ChecksumState {
    /// Reads the state from a frame's virtio-net header (empty: no header, so complete).
    pub fn from_vnet_header(vnet_header: &[u8]) -> Self {
        match vnet_header.first() {
            Some(flags) if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 => ChecksumState::Partial,
            _ => ChecksumState::Complete,
        }
    }
}

/// The checksum after a covered 32-bit word changed from `old` to `new`.
pub(super) fn update_for_u32(checksum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!checksum);
    for (old_half, new_half) in [(old >> 16, new >> 16), (old & 0xFFFF, new & 0xFFFF)] {
        sum += u32::from(!(old_half as u16)) + new_half;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The Internet checksum of `words`, computed from scratch.
    pub(crate) fn internet_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u64 = bytes
            .chunks(2)
            .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn partial_checksums_are_recognised_from_the_vnet_header() {
        assert_eq!(
            ChecksumState::from_vnet_header(&[1, 0]),
            ChecksumState::Partial
        );
        assert_eq!(
            ChecksumState::from_vnet_header(&[0, 0]),
            ChecksumState::Complete
        );
        assert_eq!(
            ChecksumState::from_vnet_header(&[]),
            ChecksumState::Complete
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn incremental_update_equals_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 4..64),
            at in any::<usize>(),
            new in any::<u32>(),
        ) {
            let at = (at % (data.len() / 2 - 1)) * 2; // 16-bit aligned, as header fields are
            let old = u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
            let before = internet_checksum(&data);
            data[at..at + 4].copy_from_slice(&new.to_be_bytes());
            let after = internet_checksum(&data);
            let updated = update_for_u32(before, old, new);
            // 0x0000 and 0xFFFF are the same value in one's complement.
            prop_assert!(updated == after || (updated ^ after) == 0xFFFF && (after == 0 || after == 0xFFFF));
        }
    }
}

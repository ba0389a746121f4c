//! A bounds-checked cursor over header bytes: every read that would run past the end is a
//! [`ParseError::Truncated`] for the layer being read, so the parsers never index directly.

use super::{Layer, ParseError};

#[derive(Debug)]
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    layer: Layer,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8], layer: Layer) -> Self {
        Reader { bytes, layer }
    }

    pub(super) fn take(&mut self, len: usize) -> Result<&'a [u8], ParseError> {
        if len > self.bytes.len() {
            return Err(ParseError::Truncated { layer: self.layer });
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

//! Frames for the unit tests of the daemon's pure parts: one TCP/IPv4 segment between the VM
//! (10.0.0.2:80) and a client (10.0.0.9), its checksum left 0 (nothing here reads it).

/// One segment; [`Tcp::frame`] builds its Ethernet frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tcp {
    /// From the VM to the client, else the reverse.
    pub from_vm: bool,
    /// The client's port.
    pub port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The window field.
    pub window: u16,
    /// A window scale option with this shift count.
    pub scale: Option<u8>,
    /// Bytes of data, each a function of its sequence number so that frames differ.
    pub len: usize,
}

impl Tcp {
    /// A segment with no options and no data, the window field at its maximum.
    pub(crate) fn new(from_vm: bool, port: u16, seq: u32, ack: u32, flags: u8) -> Self {
        Tcp {
            from_vm,
            port,
            seq,
            ack,
            flags,
            window: u16::MAX,
            scale: None,
            len: 0,
        }
    }

    /// The Ethernet frame.
    pub(crate) fn frame(&self) -> Vec<u8> {
        let (src, dst, sport, dport) = if self.from_vm {
            ([10, 0, 0, 2], [10, 0, 0, 9], 80u16, self.port)
        } else {
            ([10, 0, 0, 9], [10, 0, 0, 2], self.port, 80)
        };
        let options: Vec<u8> = match self.scale {
            Some(shift) => vec![1, 3, 3, shift],
            None => Vec::new(),
        };
        let total = 20 + 20 + options.len() + self.len;
        let mut f = vec![0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push((((20 + options.len()) / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&self.window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(&options);
        f.extend((0..self.len).map(|i| (self.seq as usize + i) as u8));
        f
    }
}

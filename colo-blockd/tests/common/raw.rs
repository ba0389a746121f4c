//! A deliberately minimal, blocking NBD client that can also misbehave:
//! it sends whatever bytes a test asks for and decodes the server's answers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use colo_blockd::proto::consts::{
    IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, opt, rep,
};
use colo_blockd::proto::handshake::OptionHeader;
use colo_blockd::proto::request::RequestHeader;

/// A server that stops answering would otherwise hang the test forever;
/// this only turns a hang into a failure, it measures nothing.
const STUCK: Duration = Duration::from_secs(60);

pub struct RawClient {
    pub stream: UnixStream,
}

/// One structured reply chunk.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl RawClient {
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(STUCK)).unwrap();
        RawClient { stream }
    }

    /// Reads the greeting and answers with `client_flags`.
    pub fn greet(&mut self, client_flags: u32) -> u16 {
        let g = self.read_exact(18);
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBD_MAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        self.send(&client_flags.to_be_bytes());
        u16::from_be_bytes([g[16], g[17]])
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends bytes, tolerating a server that already closed.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            length: data.len() as u32,
        };
        self.send(&h.encode());
        self.send(data);
    }

    /// (option, reply type, data)
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_exact(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (option, kind, self.read_exact(len as usize))
    }

    /// `NBD_OPT_GO` for `name`: returns (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(opt::GO, &data);
        let mut export = None;
        loop {
            let (option, kind, data) = self.read_option_reply();
            assert_eq!(option, opt::GO);
            match kind {
                rep::INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
                rep::INFO => {}
                rep::ACK => return export.expect("GO acknowledged without NBD_INFO_EXPORT"),
                other => panic!(
                    "GO failed with reply {other:#x}: {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// Connects, negotiates (structured replies if asked) and enters
    /// transmission on `name`.
    pub fn open(socket: &Path, name: &str, structured: bool) -> (RawClient, u64) {
        let mut c = RawClient::connect(socket);
        c.greet(3);
        if structured {
            c.send_option(opt::STRUCTURED_REPLY, &[]);
            assert_eq!(c.read_option_reply().1, rep::ACK);
        }
        let (size, _) = c.go(name);
        (c, size)
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let h = RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.send(&h.encode());
    }

    /// A simple reply: (error, handle), then `data_len` bytes of data if the
    /// error is 0.
    pub fn read_simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let h = self.read_exact(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let data = if error == 0 {
            self.read_exact(data_len)
        } else {
            Vec::new()
        };
        (error, handle, data)
    }

    pub fn read_chunk(&mut self) -> Chunk {
        let h = self.read_exact(20);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload: self.read_exact(len as usize),
        }
    }

    /// Whether the server closed the connection (reads end of stream).
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("waiting for the server to close: {e}"),
            }
        }
    }
}

//! The handshake of fixed-newstyle NBD: the greeting, the client's flags, the
//! option haggling and the replies to it. Parsing takes untrusted bytes and
//! returns errors, never panics; encoding builds whole messages so the I/O
//! layer writes each with one call.

use super::ProtoError;
use super::consts::{
    IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, client_flags, handshake_flags, info, opt,
};

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option header (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest option data the server reads. Export names are at most 4096 bytes
/// by the specification, so anything longer is a broken or hostile client.
pub const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Longest string (export name, description) the specification allows.
pub const MAX_STRING: usize = 4096;

/// The greeting: `NBDMAGIC`, `IHAVEOPT` and our handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    let flags = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    out[16..].copy_from_slice(&flags.to_be_bytes());
    out
}

/// What the client announced in its 32-bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client wants no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Unknown bits end the handshake: the specification says the client
    /// then expects something this server cannot give.
    pub fn parse(raw: u32) -> Result<ClientFlags, ProtoError> {
        if raw & !client_flags::KNOWN != 0 {
            return Err(ProtoError::UnknownClientFlags(raw));
        }
        Ok(ClientFlags {
            fixed_newstyle: raw & client_flags::FIXED_NEWSTYLE != 0,
            no_zeroes: raw & client_flags::NO_ZEROES != 0,
        })
    }
}

/// The fixed part of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses the first [`OPTION_HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<OptionHeader, ProtoError> {
        let mut r = Reader::new(bytes);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = r.u32()?;
        let length = r.u32()?;
        Ok(OptionHeader { option, length })
    }

    /// Whether the server reads the data; longer data ends the connection
    /// rather than letting a client make the server buffer gigabytes.
    pub fn check_length(&self) -> Result<(), ProtoError> {
        if self.length > MAX_OPTION_DATA {
            return Err(ProtoError::OptionTooLong(self.length));
        }
        Ok(())
    }

    /// The header as sent on the wire (used by tests and fuzzers).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The body of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name; empty means the default export.
    pub name: String,
    /// The `NBD_INFO_*` items the client asked for, in its order.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Whether the client asked for `item`.
    pub fn wants(&self, item: u16) -> bool {
        self.requests.contains(&item)
    }
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission, no reply on success.
    ExportName(String),
    /// `NBD_OPT_ABORT`: acknowledge and close.
    Abort,
    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export.
    List,
    /// `NBD_OPT_INFO`: describe an export, stay in the handshake.
    Info(InfoRequest),
    /// `NBD_OPT_GO`: describe an export and enter transmission.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies from now on.
    StructuredReply,
    /// `NBD_OPT_STARTTLS`: upgrade the socket to TLS, then haggle again
    /// (refused where no TLS is configured, and inside TLS).
    StartTls,
    /// Anything else (meta contexts, extended headers, ...): answered
    /// `NBD_REP_ERR_UNSUP`, the haggling continues.
    Unsupported(u32),
}

/// What a server that requires TLS does with an option received before
/// `NBD_OPT_STARTTLS` succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeTls {
    /// Handle it: `NBD_OPT_STARTTLS` itself, `NBD_OPT_ABORT`.
    Handle,
    /// Answer `NBD_REP_ERR_TLS_REQD` and go on haggling; nothing about the
    /// exports is read or said.
    TlsRequired,
    /// Close: `NBD_OPT_EXPORT_NAME` has no error reply.
    Close,
}

/// The gate in front of export selection while TLS is required and not yet
/// started. Decided by the option number alone, before its data is parsed,
/// so a malformed option cannot slip past it either.
pub fn before_tls(option: u32) -> BeforeTls {
    match option {
        opt::STARTTLS | opt::ABORT => BeforeTls::Handle,
        opt::EXPORT_NAME => BeforeTls::Close,
        _ => BeforeTls::TlsRequired,
    }
}

/// Why an option's data was refused; answered `NBD_REP_ERR_INVALID` with
/// this text (`NBD_OPT_EXPORT_NAME` has no error reply: the server closes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub &'static str);

/// Parses the data of option number `option`.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    match option {
        opt::EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data)?)),
        // The specification says ABORT carries no data, but also that the
        // server should answer it anyway: a client that is leaving gets its
        // acknowledgement either way.
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => expect_empty(data).map(|()| ClientOption::List),
        opt::STRUCTURED_REPLY => expect_empty(data).map(|()| ClientOption::StructuredReply),
        opt::STARTTLS => expect_empty(data).map(|()| ClientOption::StartTls),
        opt::INFO => parse_info_request(data).map(ClientOption::Info),
        opt::GO => parse_info_request(data).map(ClientOption::Go),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

fn expect_empty(data: &[u8]) -> Result<(), InvalidOption> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(InvalidOption("this option carries no data"))
    }
}

fn parse_string(bytes: &[u8]) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING {
        return Err(InvalidOption("export name longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption("export name contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption("export name is not UTF-8"))
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let bad = |_| InvalidOption("malformed NBD_OPT_INFO/GO data");
    let mut r = Reader::new(data);
    let name_len = r.u32().map_err(bad)? as usize;
    let name = parse_string(r.take(name_len).map_err(bad)?)?;
    let count = r.u16().map_err(bad)? as usize;
    let mut requests = Vec::with_capacity(count.min(r.remaining() / 2));
    for _ in 0..count {
        requests.push(r.u16().map_err(bad)?);
    }
    if r.remaining() != 0 {
        return Err(InvalidOption("trailing bytes after NBD_OPT_INFO/GO data"));
    }
    Ok(InfoRequest { name, requests })
}

/// Encodes one option reply: header and data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Every caller sends at most a name and a description (4 KiB each) or
    // a short message; saturating keeps a bug from wrapping the length.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`: the name, then the
/// description as the implementation-defined rest.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// Data of `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// Data of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` (`item`).
pub fn info_string(item: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&item.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Block-size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit; 1 means any byte offset works.
    pub minimum: u32,
    /// Size below which requests get slow (read-modify-write).
    pub preferred: u32,
    /// Largest payload of a single request.
    pub maximum: u32,
}

impl BlockSizes {
    /// Data of `NBD_INFO_BLOCK_SIZE`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14);
        out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        out.extend_from_slice(&self.minimum.to_be_bytes());
        out.extend_from_slice(&self.preferred.to_be_bytes());
        out.extend_from_slice(&self.maximum.to_be_bytes());
        out
    }
}

/// What the server sends after a successful `NBD_OPT_EXPORT_NAME`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A bounds-checked big-endian reader over untrusted bytes.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(ProtoError::Truncated {
                need: n,
                have: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::consts::rep;

    fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_refuse_unknown_bits() {
        assert_eq!(
            ClientFlags::parse(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            ClientFlags::parse(4),
            Err(ProtoError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header_round_trips_and_checks_magic() {
        let h = OptionHeader {
            option: opt::GO,
            length: 12,
        };
        assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            OptionHeader::parse(&h.encode()[..15]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn go_parses_name_and_info_items() {
        let d = info_data("replica", &[info::BLOCK_SIZE, info::NAME]);
        assert_eq!(
            parse_option(opt::GO, &d),
            Ok(ClientOption::Go(InfoRequest {
                name: "replica".into(),
                requests: vec![info::BLOCK_SIZE, info::NAME],
            }))
        );
    }

    #[test]
    fn go_with_a_lying_name_length_or_trailing_bytes_is_invalid() {
        let mut d = info_data("x", &[]);
        d[3] = 200;
        assert!(parse_option(opt::GO, &d).is_err());
        let mut d = info_data("x", &[1]);
        d.push(0);
        assert!(parse_option(opt::INFO, &d).is_err());
        // A request count promising more items than the data holds.
        let mut d = info_data("", &[]);
        d[5] = 0xff;
        assert!(parse_option(opt::GO, &d).is_err());
    }

    #[test]
    fn unknown_options_are_unsupported_not_errors() {
        for o in [0, opt::SET_META_CONTEXT, opt::EXTENDED_HEADERS, 0xdead_beef] {
            assert_eq!(parse_option(o, b"junk"), Ok(ClientOption::Unsupported(o)));
        }
    }

    #[test]
    fn starttls_carries_no_data() {
        assert_eq!(parse_option(opt::STARTTLS, b""), Ok(ClientOption::StartTls));
        assert!(parse_option(opt::STARTTLS, b"x").is_err());
    }

    #[test]
    fn before_tls_only_starttls_and_abort_pass_and_export_name_closes() {
        assert_eq!(before_tls(opt::STARTTLS), BeforeTls::Handle);
        assert_eq!(before_tls(opt::ABORT), BeforeTls::Handle);
        assert_eq!(before_tls(opt::EXPORT_NAME), BeforeTls::Close);
        for o in [
            opt::GO,
            opt::INFO,
            opt::LIST,
            opt::STRUCTURED_REPLY,
            0,
            0xdead_beef,
        ] {
            assert_eq!(before_tls(o), BeforeTls::TlsRequired, "option {o}");
        }
    }

    #[test]
    fn list_and_structured_reply_refuse_data() {
        assert!(parse_option(opt::LIST, b"x").is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, b"x").is_err());
        assert_eq!(parse_option(opt::LIST, b""), Ok(ClientOption::List));
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(opt::LIST, rep::ACK, b"");
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &opt::LIST.to_be_bytes());
        assert_eq!(&r[12..16], &rep::ACK.to_be_bytes());
        assert_eq!(&r[16..20], &[0, 0, 0, 0]);
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
    }
}

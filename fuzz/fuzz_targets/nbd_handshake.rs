//! Arbitrary bytes as what an NBD client sends colo-blockd after the greeting: a 32-bit flags
//! word, then options (16-byte header, then its data), read the way the server's handshake loop
//! reads them (`colo_blockd::server::negotiate`, which is private: this target replays its
//! reading and its decisions on the public parsers of `colo_blockd::proto::handshake`).
//! Checks, besides "never panics":
//! * `ClientFlags::parse` accepts exactly the known bits and reports the raw word otherwise;
//! * `OptionHeader::parse` looks at the first 16 bytes only, an accepted header re-encodes to
//!   them, a refused one names the magic that came (or is truncated);
//! * `check_length` refuses exactly the lengths over `MAX_OPTION_DATA`;
//! * `parse_option` agrees with an independent reading of each option's data (export names:
//!   at most 4,096 bytes of UTF-8 without NUL; `INFO`/`GO`: name, count, items, nothing after;
//!   `LIST`/`STRUCTURED_REPLY`/`STARTTLS`: no data; unknown numbers: `Unsupported`, never an
//!   error), and a
//!   parsed `INFO`/`GO` re-encodes to the data it came from. Every option's data is also read as
//!   each of the options colo-blockd knows, so the data parsers see every input;
//! * the option replies the server would send have the documented layout;
//! * the same bytes again with TLS required (a TCP socket with `--tls-dir`): until
//!   `NBD_OPT_STARTTLS` succeeds, `before_tls` lets only `STARTTLS` and `ABORT` through, every
//!   other option is answered `NBD_REP_ERR_TLS_REQD` (`EXPORT_NAME` closes) and export
//!   selection is never reached; after it the haggling restarts as without TLS (the bytes
//!   standing for what the TLS layer delivers).
#![no_main]

use colo_blockd::proto::ProtoError;
use colo_blockd::proto::consts::{IHAVEOPT, OPTION_REPLY_MAGIC, client_flags, info, opt, rep};
use colo_blockd::proto::handshake::{
    BeforeTls, ClientFlags, ClientOption, InfoRequest, MAX_OPTION_DATA, MAX_STRING,
    OPTION_HEADER_LEN, OptionHeader, before_tls, info_string, option_reply, parse_option,
};
use libfuzzer_sys::fuzz_target;

/// The server's limit on options per connection (`MAX_OPTIONS` in
/// colo-blockd/src/server/negotiate.rs, private there).
const MAX_OPTIONS: usize = 256;

/// The exports of the modelled server: the first is the default (the empty name).
const EXPORTS: [&str; 2] = ["disk", "replica"];

fn find_export(name: &str) -> bool {
    name.is_empty() || EXPORTS.contains(&name)
}

/// An export name as the specification allows it, read independently of the library.
fn reference_name(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// The data of `NBD_OPT_INFO`/`NBD_OPT_GO`, read independently of the library:
/// be32 name length, name, be16 count, count be16 items, nothing after.
fn reference_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (name, rest) = rest.split_at(len);
    let (count, items) = rest.split_first_chunk::<2>()?;
    if items.len() != 2 * usize::from(u16::from_be_bytes(*count)) {
        return None;
    }
    let items = items
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((reference_name(name)?, items))
}

fn encode_info(req: &InfoRequest) -> Vec<u8> {
    let mut out = (req.name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
    for item in &req.requests {
        out.extend_from_slice(&item.to_be_bytes());
    }
    out
}

/// Checks `parse_option(option, data)` against the reference readings and returns it.
fn check_option(option: u32, data: &[u8]) -> Result<ClientOption, &'static str> {
    let parsed = parse_option(option, data).map_err(|invalid| invalid.0);
    if let Err(message) = &parsed {
        assert!(!message.is_empty());
    }
    match option {
        opt::EXPORT_NAME => match (&parsed, reference_name(data)) {
            (Ok(ClientOption::ExportName(name)), Some(expected)) => assert_eq!(name, expected),
            (Err(_), None) => {}
            (got, expected) => panic!("EXPORT_NAME: parsed {got:?}, expected {expected:?}"),
        },
        opt::ABORT => assert_eq!(parsed, Ok(ClientOption::Abort)),
        opt::LIST | opt::STRUCTURED_REPLY if !data.is_empty() => assert!(parsed.is_err()),
        opt::LIST => assert_eq!(parsed, Ok(ClientOption::List)),
        opt::STRUCTURED_REPLY => assert_eq!(parsed, Ok(ClientOption::StructuredReply)),
        opt::STARTTLS if !data.is_empty() => assert!(parsed.is_err()),
        opt::STARTTLS => assert_eq!(parsed, Ok(ClientOption::StartTls)),
        opt::INFO | opt::GO => match (&parsed, reference_info(data)) {
            (Ok(ClientOption::Info(req) | ClientOption::Go(req)), Some((name, items))) => {
                assert_eq!(matches!(parsed, Ok(ClientOption::Go(_))), option == opt::GO);
                assert_eq!(req.name, name);
                assert_eq!(req.requests, items);
                assert_eq!(encode_info(req), data);
                for item in [
                    info::EXPORT,
                    info::NAME,
                    info::DESCRIPTION,
                    info::BLOCK_SIZE,
                ] {
                    assert_eq!(req.wants(item), items.contains(&item));
                }
            }
            (Err(_), None) => {}
            (got, expected) => panic!("INFO/GO: parsed {got:?}, expected {expected:?}"),
        },
        other => assert_eq!(parsed, Ok(ClientOption::Unsupported(other))),
    }
    parsed
}

/// An option reply as the server builds it: magic, option, type, be32 length, data.
fn check_reply(option: u32, reply_type: u32, data: &[u8]) {
    let reply = option_reply(option, reply_type, data);
    assert_eq!(reply.len(), 20 + data.len());
    assert_eq!(reply[..8], OPTION_REPLY_MAGIC.to_be_bytes());
    assert_eq!(reply[8..12], option.to_be_bytes());
    assert_eq!(reply[12..16], reply_type.to_be_bytes());
    assert_eq!(reply[16..20], (data.len() as u32).to_be_bytes());
    assert_eq!(&reply[20..], data);
}

/// Where the modelled connection stands with TLS (`TlsState` in
/// colo-blockd/src/server/negotiate.rs, private there).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    NotOffered,
    Required,
    Established,
}

fuzz_target!(|input: &[u8]| {
    handshake(input, Tls::NotOffered);
    handshake(input, Tls::Required);
});

/// The server's handshake over `input` (the client's bytes after the greeting), starting in
/// TLS state `tls`.
fn handshake(input: &[u8], mut tls: Tls) {
    // Layout: exactly the client's bytes after the server's greeting.
    let Some((flags, mut rest)) = input.split_first_chunk::<4>() else {
        return;
    };
    let raw = u32::from_be_bytes(*flags);
    match ClientFlags::parse(raw) {
        Ok(flags) => {
            assert_eq!(raw & !client_flags::KNOWN, 0);
            assert_eq!(
                flags.fixed_newstyle,
                raw & client_flags::FIXED_NEWSTYLE != 0
            );
            assert_eq!(flags.no_zeroes, raw & client_flags::NO_ZEROES != 0);
        }
        Err(error) => {
            assert_ne!(raw & !client_flags::KNOWN, 0);
            assert_eq!(error, ProtoError::UnknownClientFlags(raw));
            // The server closes the connection.
            return;
        }
    }

    for _ in 0..MAX_OPTIONS {
        let parsed = OptionHeader::parse(rest);
        if rest.len() >= OPTION_HEADER_LEN {
            // Only the header's 16 bytes count, whatever follows.
            assert_eq!(parsed, OptionHeader::parse(&rest[..OPTION_HEADER_LEN]));
        }
        let header = match parsed {
            Ok(header) => header,
            Err(ProtoError::BadMagic { expected, found }) => {
                assert_eq!(expected, IHAVEOPT);
                assert_ne!(found, IHAVEOPT);
                assert_eq!(found.to_be_bytes()[..], rest[..8]);
                // The server closes the connection (in a complete header) or sees the end.
                return;
            }
            Err(ProtoError::Truncated { need, have }) => {
                assert!(rest.len() < OPTION_HEADER_LEN);
                assert!(have < need);
                // The client hung up inside (or before) a header: the handshake ends.
                return;
            }
            Err(other) => panic!("OptionHeader::parse: unexpected error {other:?}"),
        };
        assert_eq!(header.encode()[..], rest[..OPTION_HEADER_LEN]);
        assert_eq!(OptionHeader::parse(&header.encode()), Ok(header));
        match header.check_length() {
            Ok(()) => assert!(header.length <= MAX_OPTION_DATA),
            Err(error) => {
                assert!(header.length > MAX_OPTION_DATA);
                assert_eq!(error, ProtoError::OptionTooLong(header.length));
                return;
            }
        }
        rest = &rest[OPTION_HEADER_LEN..];
        let length = header.length as usize;
        if rest.len() < length {
            // The client hung up inside the option's data: a read error ends the handshake.
            // Its data parsers still see what did arrive.
            for option in [opt::EXPORT_NAME, opt::INFO, opt::GO] {
                let _ = check_option(option, rest);
            }
            return;
        }
        let (data, after) = rest.split_at(length);
        rest = after;

        // The data as every option colo-blockd knows, and as one it does not.
        for option in [
            opt::EXPORT_NAME,
            opt::ABORT,
            opt::LIST,
            opt::INFO,
            opt::GO,
            opt::STRUCTURED_REPLY,
            opt::STARTTLS,
        ] {
            if option != header.option {
                let _ = check_option(option, data);
            }
        }

        // What the server does with it.
        let option = header.option;
        if tls == Tls::Required {
            // The gate, by the option's number alone, before its data is parsed.
            match before_tls(option) {
                BeforeTls::Handle => {
                    assert!(option == opt::STARTTLS || option == opt::ABORT);
                }
                BeforeTls::TlsRequired => {
                    assert!(!matches!(
                        option,
                        opt::STARTTLS | opt::ABORT | opt::EXPORT_NAME
                    ));
                    check_reply(
                        option,
                        rep::ERR_TLS_REQD,
                        b"TLS required: NBD_OPT_STARTTLS first",
                    );
                    continue;
                }
                BeforeTls::Close => {
                    assert_eq!(option, opt::EXPORT_NAME);
                    return;
                }
            }
        }
        if tls == Tls::NotOffered && option == opt::STARTTLS {
            check_reply(option, rep::ERR_UNSUP, b"TLS is not offered on this socket");
            continue;
        }
        match check_option(option, data) {
            Err(_) if option == opt::EXPORT_NAME => return,
            Err(message) => check_reply(option, rep::ERR_INVALID, message.as_bytes()),
            Ok(ClientOption::ExportName(_)) => {
                assert!(tls != Tls::Required, "EXPORT_NAME passed the TLS gate");
                // Transmission (or, for an unknown export, the connection closes); the rest
                // of the stream would be requests (target `nbd_requests`).
                return;
            }
            Ok(ClientOption::Abort) => {
                check_reply(option, rep::ACK, &[]);
                return;
            }
            Ok(ClientOption::List) => {
                assert!(tls != Tls::Required, "LIST passed the TLS gate");
                check_reply(option, rep::ACK, &[]);
            }
            Ok(ClientOption::Info(req) | ClientOption::Go(req)) => {
                assert!(tls != Tls::Required, "INFO/GO passed the TLS gate");
                if find_export(&req.name) {
                    if req.wants(info::NAME) {
                        let data = info_string(info::NAME, &req.name);
                        assert_eq!(data.len(), 2 + req.name.len());
                        check_reply(option, rep::INFO, &data);
                    }
                    check_reply(option, rep::ACK, &[]);
                    if option == opt::GO {
                        return;
                    }
                } else {
                    let message = format!("no export named {:?}", req.name);
                    check_reply(option, rep::ERR_UNKNOWN, message.as_bytes());
                }
            }
            Ok(ClientOption::StructuredReply) => check_reply(option, rep::ACK, &[]),
            Ok(ClientOption::StartTls) => match tls {
                Tls::Required => {
                    check_reply(option, rep::ACK, &[]);
                    // The TLS handshake, then the haggling from scratch inside TLS.
                    tls = Tls::Established;
                }
                Tls::Established => {
                    check_reply(option, rep::ERR_INVALID, b"TLS is already started")
                }
                Tls::NotOffered => unreachable!("answered ERR_UNSUP above"),
            },
            Ok(ClientOption::Unsupported(number)) => {
                assert_eq!(number, option);
                check_reply(option, rep::ERR_UNSUP, b"option not supported");
            }
        }
    }
    // More than MAX_OPTIONS options: the server gives up on the client.
}

//! Properties of the pure protocol code on untrusted input: random bytes,
//! every truncation, absurd lengths and random chunking never panic, and
//! whatever passes the request check really lies inside the export.

mod common;

use bytes::BytesMut;
use colo_blockd::export::Export;
use colo_blockd::proto::consts::{cmd, cmd_flags, opt};
use colo_blockd::proto::handshake::{self, ClientFlags, OptionHeader};
use colo_blockd::proto::request::{self, RequestHeader};
use colo_blockd::proto::{Command, ExportLimits, NbdErrno, ProtoError, RequestDecoder};
use colo_blockd::server::{NbdServer, ServerConfig};
use common::{Op, Recording};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn header_strategy() -> impl Strategy<Value = RequestHeader> {
    (
        prop_oneof![Just(0u16), any::<u16>(), 0u16..(1 << 6)],
        prop_oneof![0u16..9, any::<u16>()],
        any::<u64>(),
        prop_oneof![0u64..(1 << 21), any::<u64>(), Just(u64::MAX)],
        prop_oneof![0u32..(1 << 17), any::<u32>(), Just(u32::MAX)],
    )
        .prop_map(|(flags, command, handle, offset, length)| RequestHeader {
            flags,
            command,
            handle,
            offset,
            length,
        })
}

/// A stream of requests whose write payloads stay small.
fn request_stream() -> impl Strategy<Value = Vec<(RequestHeader, Vec<u8>)>> {
    prop::collection::vec(
        (header_strategy(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(mut h, p)| {
            if h.command == cmd::WRITE {
                h.length = p.len() as u32;
                (h, p)
            } else {
                (h, Vec::new())
            }
        }),
        0..12,
    )
}

proptest! {
    #[test]
    fn parsers_never_panic_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), option in any::<u32>()) {
        let _ = OptionHeader::parse(&bytes);
        let _ = RequestHeader::parse(&bytes);
        let _ = handshake::parse_option(option, &bytes);
        for known in [opt::EXPORT_NAME, opt::GO, opt::INFO, opt::LIST, opt::STRUCTURED_REPLY, opt::ABORT] {
            let _ = handshake::parse_option(known, &bytes);
        }
        if bytes.len() >= 4 {
            let _ = ClientFlags::parse(u32::from_be_bytes(bytes[..4].try_into().unwrap()));
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let mut decoder = RequestDecoder::new(1 << 16);
        // Garbage yields at most one request per header's worth of bytes.
        let mut decoded = 0;
        while let Ok(Some(_)) = decoder.decode(&mut buf) {
            decoded += 1;
            prop_assert!(decoded <= bytes.len() / request::REQUEST_HEADER_LEN);
        }
    }

    #[test]
    fn every_truncation_of_a_header_is_reported_as_truncated(h in header_strategy(), option in any::<u32>(), length in any::<u32>()) {
        let req = h.encode();
        prop_assert_eq!(RequestHeader::parse(&req), Ok(h));
        for cut in 0..req.len() {
            let truncated = matches!(RequestHeader::parse(&req[..cut]), Err(ProtoError::Truncated { .. }));
            prop_assert!(truncated, "cut at {}", cut);
        }
        let oh = OptionHeader { option, length };
        let enc = oh.encode();
        prop_assert_eq!(OptionHeader::parse(&enc), Ok(oh));
        prop_assert_eq!(oh.check_length().is_ok(), length <= handshake::MAX_OPTION_DATA);
        for cut in 0..enc.len() {
            let truncated = matches!(OptionHeader::parse(&enc[..cut]), Err(ProtoError::Truncated { .. }));
            prop_assert!(truncated, "cut at {}", cut);
        }
    }

    #[test]
    fn go_data_at_every_truncation_is_refused_not_misread(name in "[a-z]{0,12}", items in prop::collection::vec(any::<u16>(), 0..5)) {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in &items {
            data.extend_from_slice(&i.to_be_bytes());
        }
        let parsed = handshake::parse_option(opt::GO, &data);
        prop_assert_eq!(
            parsed,
            Ok(handshake::ClientOption::Go(handshake::InfoRequest { name, requests: items }))
        );
        for cut in 0..data.len() {
            prop_assert!(handshake::parse_option(opt::GO, &data[..cut]).is_err(), "cut at {}", cut);
        }
    }

    #[test]
    fn decoding_does_not_depend_on_how_the_stream_is_cut(
        requests in request_stream(),
        cuts in prop::collection::vec(1usize..40, 1..64),
    ) {
        let mut wire = Vec::new();
        for (h, p) in &requests {
            wire.extend_from_slice(&h.encode());
            wire.extend_from_slice(p);
        }
        let mut decoder = RequestDecoder::new(1 << 16);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(r) = decoder.decode(&mut buf).unwrap() {
                got.push((r.header, r.payload.to_vec()));
            }
        }
        prop_assert_eq!(decoder.decode_eof(&mut buf), Ok(None));
        prop_assert_eq!(got, requests);
    }

    #[test]
    fn accepted_requests_lie_inside_the_export(h in header_strategy(), size in 0u64..(1 << 21), read_only in any::<bool>()) {
        let limits = ExportLimits { size, max_length: 1 << 16, read_only };
        match request::validate(&h, &limits) {
            Ok(Command::Disconnect) => prop_assert_eq!(h.command, cmd::DISC),
            Ok(Command::Flush) => prop_assert_eq!((h.command, h.offset, h.length), (cmd::FLUSH, 0, 0)),
            Ok(Command::Read { offset, length }) => {
                prop_assert!(offset + u64::from(length) <= size);
                prop_assert!(length <= limits.max_length);
                prop_assert_eq!(h.flags, 0);
            }
            Ok(Command::Write { offset, .. }) => {
                prop_assert!(!read_only);
                prop_assert!(offset + u64::from(h.length) <= size);
                prop_assert!(h.length <= limits.max_length);
            }
            Ok(Command::Trim { offset, length, .. }) | Ok(Command::WriteZeroes { offset, length, .. }) => {
                prop_assert!(!read_only);
                prop_assert!(offset + u64::from(length) <= size);
            }
            Err(e) => {
                if e == NbdErrno::Perm {
                    prop_assert!(read_only);
                }
            }
        }
        // A flag outside the command's set is never accepted.
        if h.command == cmd::READ && h.flags != 0 {
            prop_assert!(request::validate(&h, &limits).is_err());
        }
        if h.command == cmd::WRITE && h.flags & !cmd_flags::FUA != 0 {
            prop_assert!(request::validate(&h, &limits).is_err());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The whole server on random input after a valid handshake prefix
    /// (and, after GO, well-framed random requests): the connection ends
    /// with an error or cleanly, never a panic, and nothing but reads and
    /// flushes reaches the backend.
    #[test]
    fn server_survives_random_input_and_writes_nothing(
        prefix in 0usize..3,
        requests in request_stream(),
        garbage in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = common::patterned_image(dir.path(), "a.raw", 65536);
        let backend = Recording::new(colo_blockd::backend::FileBackend::open(&img, false).unwrap());
        let exports = colo_blockd::export::ExportSet::new(vec![Export::new("a", backend.clone())]).unwrap();
        let server = NbdServer::new(exports, ServerConfig::default());
        let mut input = Vec::new();
        if prefix >= 1 {
            input.extend_from_slice(&3u32.to_be_bytes());
        }
        if prefix >= 2 {
            let mut data = 1u32.to_be_bytes().to_vec();
            data.extend_from_slice(b"a");
            data.extend_from_slice(&0u16.to_be_bytes());
            input.extend_from_slice(&OptionHeader { option: opt::GO, length: data.len() as u32 }.encode());
            input.extend_from_slice(&data);
        }
        if prefix >= 2 {
            // Well-framed requests of every kind, with modifications moved
            // past the end of the 64 KiB export: each must be refused.
            for (mut h, p) in requests {
                if matches!(h.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES) {
                    h.offset = h.offset.max(65537);
                }
                if h.command == cmd::DISC {
                    continue;
                }
                input.extend_from_slice(&h.encode());
                input.extend_from_slice(&p);
            }
        }
        input.extend_from_slice(&garbage);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, server_end) = tokio::io::duplex(1 << 20);
            let serving = tokio::spawn(async move { server.serve_stream(server_end).await });
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
            // Ok or a ServeError; a panic would make the join fail.
            prop_assert!(serving.await.is_ok());
            Ok(())
        })?;
        let only_reads = backend.ops().iter().all(|op| matches!(op, Op::Read { .. } | Op::Flush));
        prop_assert!(only_reads, "backend saw {:?}", backend.ops());
        let original: Vec<u8> = (0..65536).map(|i| (i % 251) as u8).collect();
        prop_assert_eq!(std::fs::read(&img).unwrap(), original);
    }
}

/// The pair's identities for the STARTTLS properties, made once (key generation is slow).
fn tls_acceptor() -> colo_tls::PeerAcceptor {
    use std::sync::OnceLock;
    static PKI: OnceLock<(tempfile::TempDir, colo_tls::PeerAcceptor)> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["secondary", "primary"].map(String::from);
        colo_tls::pki::create_pair(dir.path(), &hosts, colo_tls::pki::Validity::days(1)).unwrap();
        let identity = colo_tls::HostIdentity::load(dir.path().join("secondary")).unwrap();
        let acceptor = colo_tls::PeerAcceptor::new(
            &identity,
            &["primary".into()],
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        (dir, acceptor)
    })
    .1
    .clone()
}

/// An option a client might send before `NBD_OPT_STARTTLS`: every option colo-blockd knows
/// (with well-formed data for the export `a`, none, or random data) and any number.
fn option_before_tls() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let go_a = {
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"a");
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    };
    (
        prop_oneof![
            Just(opt::GO),
            Just(opt::INFO),
            Just(opt::LIST),
            Just(opt::EXPORT_NAME),
            Just(opt::STRUCTURED_REPLY),
            Just(opt::ABORT),
            Just(opt::STARTTLS),
            Just(opt::SET_META_CONTEXT),
            any::<u32>(),
        ],
        prop_oneof![
            Just(go_a),
            Just(b"a".to_vec()),
            Just(Vec::new()),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
    )
}

/// What the server must answer to `(option, data)` while TLS is required and not started:
/// the reply type, and whether the plaintext conversation ends there.
fn expected_before_tls(option: u32, data: &[u8]) -> (Option<u32>, bool) {
    use colo_blockd::proto::consts::rep;
    match option {
        opt::EXPORT_NAME => (None, true),
        opt::ABORT => (Some(rep::ACK), true),
        opt::STARTTLS if data.is_empty() => (Some(rep::ACK), true),
        opt::STARTTLS => (Some(rep::ERR_INVALID), false),
        _ => (Some(rep::ERR_TLS_REQD), false),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// With TLS required, options before `NBD_OPT_STARTTLS` never reach export selection:
    /// the server's replies are exactly `ERR_TLS_REQD` for each (ACK for ABORT and STARTTLS,
    /// a close for EXPORT_NAME), nothing describes an export, the requests that follow are
    /// never answered, and the backend sees no operation.
    #[test]
    fn options_before_starttls_never_reach_an_export(
        options in prop::collection::vec(option_before_tls(), 1..10),
        garbage in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        use colo_blockd::proto::consts::OPTION_REPLY_MAGIC;
        let dir = tempfile::tempdir().unwrap();
        let img = common::patterned_image(dir.path(), "a.raw", 65536);
        let backend = Recording::new(colo_blockd::backend::FileBackend::open(&img, false).unwrap());
        let exports = colo_blockd::export::ExportSet::new(vec![Export::new("a", backend.clone())]).unwrap();
        let server = NbdServer::new(exports, ServerConfig::default()).with_tls(tls_acceptor());
        let mut input = 3u32.to_be_bytes().to_vec();
        let mut expected = Vec::new();
        for (option, data) in &options {
            input.extend_from_slice(&OptionHeader { option: *option, length: data.len() as u32 }.encode());
            input.extend_from_slice(data);
            let (reply, ends) = expected_before_tls(*option, data);
            if let Some(reply) = reply {
                expected.push((*option, reply));
            }
            if ends {
                break;
            }
        }
        // As if an export had been chosen: a read of the whole export, then garbage.
        let read = RequestHeader { flags: 0, command: cmd::READ, handle: 7, offset: 0, length: 65536 };
        input.extend_from_slice(&read.encode());
        input.extend_from_slice(&garbage);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let output = rt.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut client, server_end) = tokio::io::duplex(1 << 20);
            let serving = tokio::spawn(async move {
                server.serve_stream_tls_until(server_end, &tokio_util::sync::CancellationToken::new()).await
            });
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            let mut output = Vec::new();
            let _ = client.read_to_end(&mut output).await;
            assert!(serving.await.is_ok(), "the server panicked");
            output
        });
        prop_assert!(output.len() >= handshake::GREETING_LEN);
        let mut rest = &output[handshake::GREETING_LEN..];
        let mut replies = Vec::new();
        while replies.len() < expected.len() {
            prop_assert!(rest.len() >= 20, "replies end early: {:?} of {:?}", replies, expected);
            prop_assert_eq!(&rest[..8], &OPTION_REPLY_MAGIC.to_be_bytes()[..]);
            let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            replies.push((option, kind));
            rest = &rest[(20 + len).min(rest.len())..];
        }
        prop_assert_eq!(&replies, &expected);
        // After STARTTLS's ACK only TLS (an alert for the garbage) may follow; otherwise
        // nothing at all: no reply to the read request, no export data.
        let started_tls = expected.last().is_some_and(|&(o, k)| {
            o == opt::STARTTLS && k == colo_blockd::proto::consts::rep::ACK
        });
        if !started_tls {
            prop_assert!(rest.is_empty(), "{} bytes after the last reply", rest.len());
        }
        prop_assert_eq!(backend.ops(), vec![]);
        let original: Vec<u8> = (0..65536).map(|i| (i % 251) as u8).collect();
        prop_assert_eq!(std::fs::read(&img).unwrap(), original);
    }
}

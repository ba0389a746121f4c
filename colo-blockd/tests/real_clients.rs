//! colo-blockd against the real NBD clients: QEMU's `qemu-io` and `qemu-img`
//! (package qemu-utils) and libnbd's `nbdinfo` (package libnbd-bin). Every
//! command is checked by reading back through NBD *and* by looking at the
//! image file itself, including the bytes around the range, which must keep
//! their original pattern.

mod common;

use colo_blockd::proto::ZeroMode;
use common::{Op, TestServer, file_bytes, require_tool, run, run_ok};

const MIB: usize = 1024 * 1024;

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    require_tool("qemu-io", "qemu-utils");
    // Writeback, so that only `-f` asks for FUA (qemu-io's default,
    // writethrough, sets FUA on every write).
    let mut args = vec!["-t", "writeback", "-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args);
    // qemu-io reports a failed command on stdout and still exits 0.
    for bad in ["Pattern verification failed", "failed:", "error", "Error"] {
        assert!(
            !out.contains(bad),
            "qemu-io {commands:?} reported a failure:\n{out}"
        );
    }
    out
}

fn original(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

fn assert_untouched(server: &TestServer, offset: usize, len: usize) {
    assert_eq!(
        file_bytes(&server.images[0], offset as u64, len),
        original(offset, len),
        "bytes {offset}..{} changed",
        offset + len
    );
}

fn assert_filled(server: &TestServer, offset: usize, len: usize, byte: u8) {
    let got = file_bytes(&server.images[0], offset as u64, len);
    assert!(
        got.iter().all(|&b| b == byte),
        "bytes {offset}..{} are not all {byte:#x}",
        offset + len
    );
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_io_write_and_read_patterns_over_unix_socket() {
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    qemu_io(
        &s.unix_uri("export"),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Unaligned offset and length: minimum block size is 1.
            "write -P 0x11 100001 777",
            "read -P 0x11 100001 777",
            "read -P 0xab 0 64k",
        ],
    );
    assert_filled(&s, 0, 65536, 0xab);
    assert_untouched(&s, 65536, 100001 - 65536);
    assert_filled(&s, 100001, 777, 0x11);
    assert_untouched(&s, 100001 + 777, 4 * MIB - 100001 - 777);
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_io_over_tcp() {
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    qemu_io(
        &s.tcp_uri("export"),
        &["write -P 0x5c 1M 128k", "read -P 0x5c 1M 128k"],
    );
    assert_untouched(&s, 0, MIB);
    assert_filled(&s, MIB, 128 * 1024, 0x5c);
    assert_untouched(&s, MIB + 128 * 1024, 4 * MIB - MIB - 128 * 1024);
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn write_zeroes_with_and_without_no_hole_and_trim_read_back_as_zero() {
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    qemu_io(
        &s.unix_uri("export"),
        &[
            // Without -u qemu forbids unmapping: NBD_CMD_FLAG_NO_HOLE.
            "write -z 64k 64k",
            // With -u it may unmap: WRITE_ZEROES without NO_HOLE.
            "write -z -u 256k 64k",
            "discard 512k 64k",
            "read -P 0 64k 64k",
            "read -P 0 256k 64k",
            "read -P 0 512k 64k",
        ],
    );
    assert_untouched(&s, 0, 65536);
    assert_filled(&s, 65536, 65536, 0);
    assert_untouched(&s, 131072, 131072);
    assert_filled(&s, 262144, 65536, 0);
    assert_untouched(&s, 327680, 196608);
    assert_filled(&s, 524288, 65536, 0);
    assert_untouched(&s, 589824, 4 * MIB - 589824);
    // The commands arrived as NBD commands with their flags, not emulated
    // by qemu as writes of zero buffers.
    let ops = s.ops(0);
    let zero = |offset, may_trim| Op::Zero {
        offset,
        length: 65536,
        fua: false,
        mode: ZeroMode {
            may_trim,
            fast_only: false,
        },
    };
    assert!(ops.contains(&zero(65536, false)), "{ops:?}");
    assert!(ops.contains(&zero(262144, true)), "{ops:?}");
    assert!(
        ops.contains(&Op::Trim {
            offset: 524288,
            length: 65536,
            fua: false
        }),
        "{ops:?}"
    );
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn fua_writes_and_flush() {
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    qemu_io(
        &s.unix_uri("export"),
        &[
            "write -f -P 0x21 0 4k",
            "write -z -f 8k 4k",
            "write -P 0x22 16k 4k",
            "flush",
            "read -P 0x21 0 4k",
            "read -P 0 8k 4k",
            "read -P 0x22 16k 4k",
        ],
    );
    assert_filled(&s, 0, 4096, 0x21);
    assert_untouched(&s, 4096, 4096);
    assert_filled(&s, 8192, 4096, 0);
    assert_filled(&s, 16384, 4096, 0x22);
    let ops = s.ops(0);
    for op in [
        Op::Write {
            offset: 0,
            length: 4096,
            fua: true,
        },
        Op::Write {
            offset: 16384,
            length: 4096,
            fua: false,
        },
        Op::Flush,
    ] {
        assert!(ops.contains(&op), "{op:?} missing from {ops:?}");
    }
    assert!(
        ops.iter().any(|op| matches!(
            op,
            Op::Zero {
                offset: 8192,
                fua: true,
                ..
            }
        )),
        "{ops:?}"
    );
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_io_aio_requests_in_flight_land_where_they_belong() {
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    let writes: Vec<String> = (0..32)
        .map(|i| format!("aio_write -P {} {}k 64k", i + 1, i * 64))
        .collect();
    let reads: Vec<String> = (0..32)
        .map(|i| format!("aio_read -P {} {}k 64k", i + 1, i * 64))
        .collect();
    let mut cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    cmds.push("aio_flush");
    cmds.extend(reads.iter().map(String::as_str));
    cmds.push("aio_flush");
    qemu_io(&s.unix_uri("export"), &cmds);
    for i in 0..32 {
        assert_filled(&s, i * 65536, 65536, (i + 1) as u8);
    }
    assert_untouched(&s, 2 * MIB, 2 * MIB);
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_img_bench_with_queue_depth_16() {
    require_tool("qemu-img", "qemu-utils");
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    let uri = s.unix_uri("export");
    let out = run_ok(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-d",
            "16",
            "-c",
            "512",
            "-s",
            "4k",
            "--pattern=0xcd",
            &uri,
        ],
    );
    assert!(out.contains("16 in parallel"), "{out}");
    assert_filled(&s, 0, 2 * MIB, 0xcd);
    assert_untouched(&s, 2 * MIB, 2 * MIB);
    // And reads at the same depth see what was written.
    run_ok(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-d", "16", "-c", "512", "-s", "4k", &uri,
        ],
    );
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_img_info_convert_and_compare() {
    require_tool("qemu-img", "qemu-utils");
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    let uri = s.unix_uri("export");
    let info = run_ok("qemu-img", &["info", "-f", "raw", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");

    // A source with data and a zero hole in the middle.
    let src = s.dir.path().join("src.raw");
    let mut data = vec![0u8; 4 * MIB];
    for (i, b) in data.iter_mut().enumerate() {
        if !(MIB..2 * MIB).contains(&i) {
            *b = (i % 7) as u8 + 1;
        }
    }
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    );
    assert_eq!(file_bytes(&s.images[0], 0, 4 * MIB), data);
    // The hole went over as one WRITE_ZEROES, not as 1 MiB of zero data.
    let ops = s.ops(0);
    assert!(
        ops.iter().any(|op| matches!(
            op,
            Op::Zero {
                offset: 1048576,
                length: 1048576,
                ..
            }
        )),
        "{ops:?}"
    );
    assert!(
        !ops.iter()
            .any(|op| matches!(op, Op::Write { offset, .. } if (MIB as u64..2 * MIB as u64).contains(offset))),
        "{ops:?}"
    );
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn several_clients_at_once_each_get_their_own_data() {
    require_tool("qemu-io", "qemu-utils");
    let s = TestServer::start(&[("export", 4 * MIB, false)]);
    let uri = s.unix_uri("export");
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {}k 256k", 0x40 + i, i * 512);
                let r = format!("read -P {} {}k 256k", 0x40 + i, i * 512);
                qemu_io(&uri, &[&w, &r, &w, &r]);
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    for i in 0..4 {
        assert_filled(&s, i * 512 * 1024, 256 * 1024, 0x40 + i as u8);
        assert_untouched(&s, i * 512 * 1024 + 256 * 1024, 256 * 1024);
    }
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn nbdcopy_over_four_connections_with_many_requests_each() {
    // nbdcopy opens several connections only when the server sets
    // CAN_MULTI_CONN, and keeps many requests in flight on each.
    require_tool("nbdcopy", "libnbd-bin");
    let s = TestServer::start(&[("export", 8 * MIB, false)]);
    let uri = s.unix_uri("export");
    let src = s.dir.path().join("src.raw");
    let data: Vec<u8> = (0..8 * MIB)
        .map(|i| (i / 4096 % 253) as u8 ^ 0x5a)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            "--request-size=65536",
            "--flush",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(file_bytes(&s.images[0], 0, 8 * MIB), data);
    assert!(s.ops(0).contains(&Op::Flush));
    // And back out again, through NBD reads on four connections.
    let back = s.dir.path().join("back.raw");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            &uri,
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn nbdinfo_lists_every_export_with_its_description() {
    require_tool("nbdinfo", "libnbd-bin");
    let s = TestServer::start(&[("replica", 2 * MIB, false), ("svm", 3 * MIB, true)]);
    let out = run_ok("nbdinfo", &["--list", &s.unix_uri("")]);
    for needle in [
        "export=\"replica\"",
        "export=\"svm\"",
        "test image replica",
        "test image svm",
        "export-size: 2097152",
        "export-size: 3145728",
    ] {
        assert!(
            out.contains(needle),
            "nbdinfo --list lacks {needle:?}:\n{out}"
        );
    }
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn nbdinfo_sees_the_negotiated_features() {
    require_tool("nbdinfo", "libnbd-bin");
    let s = TestServer::start(&[("replica", 2 * MIB, false), ("svm", 3 * MIB, true)]);
    let out = run_ok("nbdinfo", &["--json", &s.unix_uri("replica")]);
    for needle in [
        "\"protocol\": \"newstyle-fixed\"",
        "\"structured\": true",
        "\"is_read_only\": false",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"can_multi_conn\": true",
        "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
        "\"export-size\": 2097152",
    ] {
        assert!(
            out.contains(needle),
            "nbdinfo --json lacks {needle}:\n{out}"
        );
    }
    // The empty name is the default export (the first), over TCP too.
    let out = run_ok("nbdinfo", &["--size", &s.tcp_uri("")]);
    assert_eq!(out.trim(), "2097152");
    let out = run_ok("nbdinfo", &["--json", &s.unix_uri("svm")]);
    assert!(out.contains("\"is_read_only\": true"), "{out}");
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn unknown_export_is_refused_and_the_server_carries_on() {
    require_tool("nbdinfo", "libnbd-bin");
    let s = TestServer::start(&[("export", MIB, false)]);
    let out = run("nbdinfo", &[&s.unix_uri("nope")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");
    qemu_io(&s.unix_uri("export"), &["read -P 0 0 0"]);
    assert_untouched(&s, 0, MIB);
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn read_only_export_refuses_qemu_io_writes_and_keeps_the_image() {
    require_tool("qemu-io", "qemu-utils");
    let s = TestServer::start(&[("ro", MIB, true)]);
    let uri = s.unix_uri("ro");
    // qemu opens a read-only export only read-only.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-io opened a read-only export for writing"
    );
    assert!(err.contains("Permission denied"), "{err}");
    run_ok("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read 0 4k"]);
    assert_untouched(&s, 0, MIB);
    assert_eq!(
        s.ops(0),
        vec![Op::Read {
            offset: 0,
            length: 4096
        }]
    );
}

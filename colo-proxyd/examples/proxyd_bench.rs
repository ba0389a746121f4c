//! `proxyd_bench`: colo-proxyd's benchmark, an example of the colo-proxyd package rather than
//! a subcommand of the shipped daemon:
//!
//! ```sh
//! cargo run --release -p colo-proxyd --example proxyd_bench -- [OPTIONS]
//! ```
//!
//! It generates TCP traffic of many connections as the two VMs' net-filter sockets would carry
//! it, runs it through the pure path (frame codec, packet parser, comparison engine) and reports
//! the throughput as a ratio to a raw `memcmp` of the same payload bytes, measured in the same
//! run, plus the per-frame processing time; then the latency through the primary daemon over
//! loopback sockets ([`loopback`]). It uses colo-proxyd's public API only.
//!
//! Timings depend on the machine and on whatever else runs on it, so this is a command, not a
//! test; every pass is repeated and the best round is reported, and every pass checks that the
//! comparison released every PVM packet and asked for no checkpoint (otherwise the numbers
//! would be of the wrong work).
//!
//! Exit codes: 0 the report was printed; 1 the benchmark failed (a pass did not release every
//! PVM packet, a socket or the CPU pinning failed, ...); 2 bad command line.

// A crate root's modules are looked up beside it (examples/loopback.rs), where Cargo would
// take them for examples of their own: this one lives in the directory named after the example.
#[path = "proxyd_bench/loopback.rs"]
mod loopback;

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::{BufMut, Bytes};
use clap::Parser;
use colo_proxyd::codec::{Frame, FrameDecoder, MAX_FRAME_LEN, encode};
use colo_proxyd::compare::{Action, ComparatorLimits, PacketId, Segment, StreamComparator};
use colo_proxyd::engine::{ComparisonEngine, EngineConfig};
use colo_proxyd::packet::{Network, Transport, parse_ethernet};

use crate::loopback::LoopbackCpus;

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    // The bench runs a daemon in process against fakes (no QEMU, no QMP monitor): its
    // info-level life story would bury the numbers, so only errors show unless RUST_LOG says.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs in files and journals stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxyd_bench: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Largest TCP payload in an IPv4 packet (total length 65,535 minus two 20-byte headers).
const MAX_SEGMENT: usize = 65_535 - 40;
/// Ethernet, IPv4 and TCP headers without options.
const HEADERS: usize = 14 + 20 + 20;
/// What a net-filter socket read returns at most in one go, as the daemon will read it.
const READ_CHUNK: usize = 64 * 1024;
const VNET_HDR_LEN: usize = 12;
const SYN_ACK: u8 = 0x12;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;

/// Measure the comparison path on generated traffic (colo-proxyd's benchmark).
///
/// Generates TCP connections as the PVM's and the SVM's net-filter sockets carry them
/// (other ISNs, other segmentation, the SVM behind or ahead), runs them through the frame
/// codec, the packet parser and the comparison engine, and prints the throughput as a
/// ratio to a raw memcmp of the same payload bytes measured in the same run, and the
/// per-frame processing time (p50, p99) of that in-process path; then the latency through
/// the primary daemon over loopback sockets (in process, on its own two-worker runtime,
/// against fake QEMU chardevs and a fake secondary), interleaved packet by packet with the
/// floor of the same sockets through a task that only copies the bytes, and what the
/// daemon adds over that floor (per percentile), with the machine's raw one-way thread
/// wake-up as context. By default every thread of that measurement is pinned to one CPU
/// (--loopback-cpus same): on a VM a wake-up across vCPUs is an inter-processor interrupt
/// through the hypervisor, which would swamp the daemon's own cost (docs/benchmarks.md has
/// the numbers); --loopback-cpus spread measures with the wake-ups. Every pass must release
/// every PVM packet with no checkpoint, or the command fails. Timings vary with the machine
/// and its load; use a release build.
#[derive(Debug, Parser)]
#[command(name = "proxyd_bench")]
struct BenchArgs {
    /// TCP connections, interleaved frame by frame.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections: u32,
    /// Payload bytes each VM sends on each connection (suffixes K, M, G are powers of 1024).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    bytes_per_connection: usize,
    /// Comma-separated TCP payload sizes. The PVM cuts its stream into these sizes in turn;
    /// the SVM uses the same list starting from its second entry, so with two or more sizes
    /// the two VMs segment the same stream differently, as they do with real TCP stacks.
    /// Up to 65495 (a GSO frame from a guest with TCP segmentation offload).
    #[arg(long, value_delimiter = ',', default_value = "1448,536")]
    segment_sizes: Vec<usize>,
    /// How many bytes the SVM's output trails the PVM's (negative: the SVM runs ahead).
    #[arg(long, default_value_t = 16 * 1024, allow_negative_numbers = true)]
    svm_lag: i64,
    /// Frames carry a 12-byte virtio-net header (filters with vnet_hdr_support=on).
    #[arg(long)]
    vnet_hdr: bool,
    /// Times each pass is run; the fastest round counts.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Packets per case of the loopback latency measurement (the primary daemon in process,
    /// fake QEMU chardevs and a fake secondary over loopback sockets); 0 skips it.
    #[arg(long, default_value_t = 2000)]
    loopback_packets: usize,
    /// Where the loopback measurement's threads run. `same` (the default) pins all of them
    /// (the daemon's two workers, the fakes, the wake-up threads) to one CPU, the first the
    /// bench may run on, so the numbers show the daemon's work rather than the machine's
    /// cross-CPU wake-ups (on a VM an inter-processor interrupt through the hypervisor, several
    /// per packet; docs/benchmarks.md has their cost); `spread` lets the scheduler place them,
    /// as in production, wake-ups included.
    #[arg(long, value_enum, default_value_t = LoopbackCpus::Same)]
    loopback_cpus: LoopbackCpus,
}

fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let number: usize = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count such as 65536, 64K or 1M"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    Pvm,
    Svm,
}

/// Both VMs' output as their sockets carry it, and the order in which the engine sees it.
struct Traffic {
    pvm_wire: Vec<u8>,
    svm_wire: Vec<u8>,
    /// Which socket the next frame comes from.
    schedule: Vec<Vm>,
    pvm_frames: usize,
    svm_frames: usize,
    /// Payload bytes each VM sends in total.
    payload_bytes: usize,
}

/// Pseudo-random payload (xorshift), so that no pass can profit from repeated patterns.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A frame of connection `conn` from the VM (10.0.0.2:80) to its client.
fn tcp_frame(conn: u32, seq: u32, flags: u8, data: &[u8], vnet_hdr: bool) -> Frame {
    let vnet = if vnet_hdr { VNET_HDR_LEN } else { 0 };
    let mut frame = Vec::with_capacity(vnet + HEADERS + data.len());
    frame.resize(vnet, 0);
    frame.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&((40 + data.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2]);
    // Clients 10.1.x.y, each on its own port: one flow per connection.
    frame.extend_from_slice(&[10, 1, (conn >> 16) as u8, (conn >> 8) as u8]);
    frame.extend_from_slice(&80u16.to_be_bytes());
    frame.extend_from_slice(&(1024 + (conn & 0xff) as u16 * 200).to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(&7001u32.to_be_bytes());
    frame.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    frame.extend_from_slice(data);
    if frame.len() < vnet + 60 {
        frame.resize(vnet + 60, 0); // Ethernet padding, not stream data
    }
    Frame {
        vnet_hdr_len: vnet as u32,
        data: frame,
    }
}

/// `(offset, len)` of each segment when `total` bytes are cut into `sizes` in turn, starting
/// with `sizes[first]`.
fn cut(total: usize, sizes: &[usize], first: usize) -> Vec<(usize, usize)> {
    let mut pieces = Vec::new();
    let mut offset = 0;
    let mut which = first;
    while offset < total {
        let len = sizes[which % sizes.len()].min(total - offset);
        pieces.push((offset, len));
        offset += len;
        which += 1;
    }
    pieces
}

fn generate(args: &BenchArgs) -> anyhow::Result<Traffic> {
    ensure!(!args.segment_sizes.is_empty(), "--segment-sizes is empty");
    for &size in &args.segment_sizes {
        ensure!(
            (1..=MAX_SEGMENT).contains(&size),
            "segment size {size} is outside 1..={MAX_SEGMENT}"
        );
    }
    let bytes = args.bytes_per_connection;
    let connections = args.connections;
    let data = payload(bytes, 0x9e37_79b9_7f4a_7c15);
    let pvm_cuts = cut(bytes, &args.segment_sizes, 0);
    let svm_cuts = cut(bytes, &args.segment_sizes, 1);
    let mut traffic = Traffic {
        pvm_wire: Vec::new(),
        svm_wire: Vec::new(),
        schedule: Vec::new(),
        pvm_frames: 0,
        svm_frames: 0,
        payload_bytes: bytes
            .checked_mul(connections as usize)
            .context("traffic too large")?,
    };
    // Another ISN on each side and on each connection: offsets count from each side's SYN.
    let isn = |vm: Vm, conn: u32| match vm {
        Vm::Pvm => 1_000u32.wrapping_add(conn.wrapping_mul(7919)),
        Vm::Svm => 3_000_000_000u32.wrapping_add(conn.wrapping_mul(104_729)),
    };
    let emit = |traffic: &mut Traffic, vm: Vm, frame: Frame| -> anyhow::Result<()> {
        let (wire, count) = match vm {
            Vm::Pvm => (&mut traffic.pvm_wire, &mut traffic.pvm_frames),
            Vm::Svm => (&mut traffic.svm_wire, &mut traffic.svm_frames),
        };
        debug_assert!(frame.data.len() <= MAX_FRAME_LEN);
        encode(&frame, args.vnet_hdr, wire)?;
        *count += 1;
        traffic.schedule.push(vm);
        Ok(())
    };
    for vm in [Vm::Pvm, Vm::Svm] {
        for conn in 0..connections {
            emit(
                &mut traffic,
                vm,
                tcp_frame(conn, isn(vm, conn), SYN_ACK, b"", args.vnet_hdr),
            )?;
        }
    }
    // Both sides advance through the stream; the SVM stays `svm_lag` bytes behind (or
    // ahead), and each step sends the next segment of every connection.
    let (mut p, mut s) = (0, 0);
    while p < pvm_cuts.len() || s < svm_cuts.len() {
        let pvm_turn = p < pvm_cuts.len()
            && (s >= svm_cuts.len() || pvm_cuts[p].0 as i64 <= svm_cuts[s].0 as i64 + args.svm_lag);
        let (vm, (offset, len)) = if pvm_turn {
            p += 1;
            (Vm::Pvm, pvm_cuts[p - 1])
        } else {
            s += 1;
            (Vm::Svm, svm_cuts[s - 1])
        };
        for conn in 0..connections {
            let seq = isn(vm, conn).wrapping_add(1 + offset as u32);
            let frame = tcp_frame(
                conn,
                seq,
                PSH_ACK,
                &data[offset..offset + len],
                args.vnet_hdr,
            );
            emit(&mut traffic, vm, frame)?;
        }
    }
    for vm in [Vm::Pvm, Vm::Svm] {
        for conn in 0..connections {
            let seq = isn(vm, conn).wrapping_add(1 + bytes as u32);
            emit(
                &mut traffic,
                vm,
                tcp_frame(conn, seq, FIN_ACK, b"", args.vnet_hdr),
            )?;
        }
    }
    Ok(traffic)
}

/// The Ethernet frames on `wire`, each in a buffer of its own as the daemon holds a packet.
fn decode_all(wire: &[u8], vnet_hdr: bool) -> anyhow::Result<Vec<Bytes>> {
    let mut decoder = FrameDecoder::new(vnet_hdr);
    decoder.feed(wire);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame_ref()? {
        frames.push(Bytes::copy_from_slice(frame.ethernet_bytes()));
    }
    decoder.finish()?;
    Ok(frames)
}

/// The TCP segment of a generated frame, and its connection (from the client's address and
/// port), without the engine.
fn segment_of(ethernet: &[u8]) -> anyhow::Result<(u32, Segment<'_>)> {
    let parsed = parse_ethernet(ethernet)?;
    let Network::Ip(ip) = parsed.network else {
        bail!("generated frame is not IP");
    };
    let Transport::Tcp(tcp) = &ip.transport else {
        bail!("generated frame is not TCP");
    };
    let std::net::IpAddr::V4(client) = ip.dst else {
        bail!("generated frame is not IPv4");
    };
    let [_, _, high, mid] = client.octets();
    let low = u32::from((tcp.dst_port - 1024) / 200);
    let conn = (u32::from(high) << 16) | (u32::from(mid) << 8) | low;
    Ok((conn, Segment::from(tcp)))
}

/// Counts what a pass's actions said; the numbers of a pass that did not release everything
/// would not be the comparator's.
#[derive(Default)]
struct Outcome {
    released: usize,
    checkpoints: usize,
}

impl Outcome {
    fn take(&mut self, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Release(_) | Action::ReleaseLoweredAck { .. } => self.released += 1,
                // Identical output never supersedes a handshake: counted as not released.
                Action::Discard(_) => {}
                Action::CheckpointNeeded(_) => self.checkpoints += 1,
            }
        }
    }

    fn check(&self, pass: &str, traffic: &Traffic) -> anyhow::Result<()> {
        ensure!(
            self.checkpoints == 0 && self.released == traffic.pvm_frames,
            "{pass}: released {} of {} PVM frames and asked for {} checkpoints on identical \
             output; the comparison is broken",
            self.released,
            traffic.pvm_frames,
            self.checkpoints
        );
        Ok(())
    }
}

/// Raw `memcmp` of the same payload bytes, where they lie in the decoded frames: each
/// connection's PVM payloads against its SVM payloads, piece by piece where the two
/// segmentations overlap.
fn memcmp_pass(pvm: &[Vec<&[u8]>], svm: &[Vec<&[u8]>]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut equal = true;
    for (pvm, svm) in pvm.iter().zip(svm) {
        let (mut pvm, mut svm) = (pvm.iter(), svm.iter());
        let (mut a, mut b): (&[u8], &[u8]) = (&[], &[]);
        loop {
            if a.is_empty() {
                match pvm.next() {
                    Some(next) => a = next,
                    None => break,
                }
            }
            if b.is_empty() {
                match svm.next() {
                    Some(next) => b = next,
                    None => break,
                }
            }
            let n = a.len().min(b.len());
            equal &= black_box(a[..n] == b[..n]);
            (a, b) = (&a[n..], &b[n..]);
        }
    }
    let elapsed = start.elapsed();
    ensure!(equal, "generated streams differ");
    Ok(elapsed)
}

/// One [`StreamComparator`] per connection, fed the already parsed segments (and the PVM's
/// packets they lie in, which the comparator references instead of copying).
fn comparator_pass(
    connections: u32,
    segments: &[(Vm, u32, Segment<'_>, &Bytes)],
    traffic: &Traffic,
) -> anyhow::Result<Duration> {
    let mut comparators: Vec<StreamComparator> = (0..connections)
        .map(|_| StreamComparator::new(ComparatorLimits::default()))
        .collect();
    let mut actions = Vec::new();
    let mut outcome = Outcome::default();
    let mut next_id = 0;
    let start = Instant::now();
    for (vm, conn, segment, frame) in segments {
        let comparator = &mut comparators[*conn as usize];
        match vm {
            Vm::Pvm => {
                comparator.push_pvm(PacketId(next_id), segment, frame, &mut actions);
                next_id += 1;
            }
            Vm::Svm => comparator.push_svm(segment, &mut actions),
        }
        outcome.take(&mut actions);
    }
    let elapsed = start.elapsed();
    outcome.check("comparator", traffic)?;
    Ok(elapsed)
}

/// The engine fed the decoded frames: parsing, flow lookup, comparison.
fn engine_pass(pvm: &[Bytes], svm: &[Bytes], traffic: &Traffic) -> anyhow::Result<Duration> {
    let mut engine = ComparisonEngine::new(EngineConfig::default());
    let mut actions = Vec::new();
    let mut outcome = Outcome::default();
    let (mut pvm, mut svm) = (pvm.iter(), svm.iter());
    let mut next_id = 0;
    let start = Instant::now();
    for vm in &traffic.schedule {
        match vm {
            Vm::Pvm => {
                let frame = pvm.next().context("schedule longer than PVM frames")?;
                let id = PacketId(next_id);
                next_id += 1;
                engine.push_pvm(id, frame, Duration::ZERO, &mut actions);
            }
            Vm::Svm => {
                let frame = svm.next().context("schedule longer than SVM frames")?;
                engine.push_svm(frame, &mut actions);
            }
        }
        outcome.take(&mut actions);
    }
    let elapsed = start.elapsed();
    outcome.check("engine", traffic)?;
    Ok(elapsed)
}

/// One net-filter socket as the daemon reads it: straight into the decoder's buffer, up to
/// [`READ_CHUNK`] bytes at a time (`FrameDecoder::read_with`, as the daemon's
/// `FrameDecoder::read_from` does).
struct Socket<'a> {
    wire: &'a [u8],
    decoder: FrameDecoder,
}

impl Socket<'_> {
    /// The next PVM frame as the daemon's primary takes it: split off the decoder's buffer
    /// (no copy), to be shared by the comparison and the release. Also returns how long
    /// reading took (zero without a read).
    fn next_shared_frame(&mut self) -> anyhow::Result<(Bytes, Duration)> {
        let mut read_time = Duration::ZERO;
        loop {
            if let Some(frame) = self.decoder.next_frame_bytes()? {
                return Ok((frame, read_time));
            }
            read_time += self.read()?;
        }
    }

    /// Hands the next frame's Ethernet bytes to `handle`, borrowed from the decoder's
    /// buffer; returns how long reading took.
    fn next_frame(&mut self, handle: impl FnOnce(&[u8])) -> anyhow::Result<Duration> {
        let mut read_time = Duration::ZERO;
        loop {
            if let Some(frame) = self.decoder.next_frame_ref()? {
                handle(frame.ethernet_bytes());
                return Ok(read_time);
            }
            read_time += self.read()?;
        }
    }

    /// One socket read: as many bytes as the decoder has room for, at most [`READ_CHUNK`].
    fn read(&mut self) -> anyhow::Result<Duration> {
        ensure!(!self.wire.is_empty(), "socket ended before the schedule");
        let start = Instant::now();
        let wire = &mut self.wire;
        self.decoder.read_with(|space| {
            let n = wire.len().min(space.remaining_mut()).min(READ_CHUNK);
            space.put_slice(&wire[..n]);
            *wire = &wire[n..];
        });
        Ok(start.elapsed())
    }
}

/// Per-frame processing times of the pure path, and the times of the socket reads (each a
/// copy of up to [`READ_CHUNK`] bytes into a decoder) that some frames had to wait for.
#[derive(Default)]
struct Latencies {
    frames: Vec<Duration>,
    reads: Vec<Duration>,
}

/// The whole pure path: socket bytes → codec → parser → engine. With `latencies`, every
/// frame's processing time is recorded (which slows the pass by the clock readings).
fn pure_path_pass(
    traffic: &Traffic,
    vnet_hdr: bool,
    mut latencies: Option<&mut Latencies>,
) -> anyhow::Result<Duration> {
    let mut engine = ComparisonEngine::new(EngineConfig::default());
    let mut actions = Vec::new();
    let mut outcome = Outcome::default();
    let mut pvm = Socket {
        wire: &traffic.pvm_wire,
        decoder: FrameDecoder::new(vnet_hdr),
    };
    let mut svm = Socket {
        wire: &traffic.svm_wire,
        decoder: FrameDecoder::new(vnet_hdr),
    };
    let mut next_id = 0;
    let start = Instant::now();
    for vm in &traffic.schedule {
        let frame_start = latencies.is_some().then(Instant::now);
        let read_time = match vm {
            Vm::Pvm => {
                let id = PacketId(next_id);
                next_id += 1;
                // The daemon holds each PVM packet, until its release, in the read buffer
                // it was split off: no copy.
                let (frame, read_time) = pvm.next_shared_frame()?;
                engine.push_pvm(id, &frame, Duration::ZERO, &mut actions);
                read_time
            }
            Vm::Svm => svm.next_frame(|ethernet| engine.push_svm(ethernet, &mut actions))?,
        };
        outcome.take(&mut actions);
        if let (Some(latencies), Some(frame_start)) = (latencies.as_deref_mut(), frame_start) {
            latencies
                .frames
                .push(frame_start.elapsed().saturating_sub(read_time));
            if !read_time.is_zero() {
                latencies.reads.push(read_time);
            }
        }
    }
    let elapsed = start.elapsed();
    outcome.check("pure path", traffic)?;
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Runs the benchmark and prints its report.
fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let traffic = generate(args)?;
    let pvm_frames = decode_all(&traffic.pvm_wire, args.vnet_hdr)?;
    let svm_frames = decode_all(&traffic.svm_wire, args.vnet_hdr)?;
    let connections = args.connections as usize;
    // Each connection's payloads in stream order, for the memcmp baseline, and the parsed
    // segments in the engine's order, for the comparator alone.
    let mut pvm_payloads: Vec<Vec<&[u8]>> = vec![Vec::new(); connections];
    let mut svm_payloads: Vec<Vec<&[u8]>> = vec![Vec::new(); connections];
    let mut segments = Vec::with_capacity(traffic.schedule.len());
    let (mut pvm_iter, mut svm_iter) = (pvm_frames.iter(), svm_frames.iter());
    for vm in &traffic.schedule {
        let (frame, payloads) = match vm {
            Vm::Pvm => (pvm_iter.next(), &mut pvm_payloads),
            Vm::Svm => (svm_iter.next(), &mut svm_payloads),
        };
        let frame = frame.context("fewer frames than scheduled")?;
        let (conn, segment) = segment_of(frame)?;
        if !segment.payload.is_empty() {
            payloads[conn as usize].push(segment.payload);
        }
        segments.push((*vm, conn, segment, frame));
    }

    println!(
        "proxyd_bench: {} connections x {} bytes; PVM segments {:?}, SVM segments the \
         same sizes from the second; SVM {} {} bytes; vnet header {}",
        args.connections,
        args.bytes_per_connection,
        args.segment_sizes,
        if args.svm_lag >= 0 {
            "behind by"
        } else {
            "ahead by"
        },
        args.svm_lag.unsigned_abs(),
        if args.vnet_hdr { "on" } else { "off" },
    );
    println!(
        "{} PVM and {} SVM frames, {} payload bytes per VM; best of {} rounds",
        traffic.pvm_frames, traffic.svm_frames, traffic.payload_bytes, args.rounds
    );

    // The passes take turns, round after round, so that a change in the machine's load
    // (this is often a shared VM) falls on all of them alike rather than on one.
    let (mut memcmp, mut comparator, mut engine, mut pure) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..args.rounds {
        memcmp = memcmp.min(memcmp_pass(&pvm_payloads, &svm_payloads)?);
        comparator = comparator.min(comparator_pass(args.connections, &segments, &traffic)?);
        engine = engine.min(engine_pass(&pvm_frames, &svm_frames, &traffic)?);
        pure = pure.min(pure_path_pass(&traffic, args.vnet_hdr, None)?);
    }
    let mut latencies = Latencies {
        frames: Vec::with_capacity(traffic.schedule.len()),
        reads: Vec::new(),
    };
    // One warm-up round first: the first round's allocations fault pages in, which the
    // daemon pays once at start, not per packet.
    pure_path_pass(&traffic, args.vnet_hdr, Some(&mut latencies))?;
    latencies.frames.clear();
    latencies.reads.clear();
    pure_path_pass(&traffic, args.vnet_hdr, Some(&mut latencies))?;
    latencies.frames.sort_unstable();
    latencies.reads.sort_unstable();

    let bytes = traffic.payload_bytes as f64;
    let line = |name: &str, time: Duration| {
        println!(
            "  {name:<46} {:>8.0} MB/s   ratio to memcmp {:.2}",
            bytes / time.as_secs_f64() / 1e6,
            memcmp.as_secs_f64() / time.as_secs_f64()
        );
    };
    println!("throughput (payload bytes of one VM per second):");
    line("raw memcmp of the same payload bytes", memcmp);
    line("comparator (StreamComparator, parsed segments)", comparator);
    line("engine (parse, flow lookup, comparator)", engine);
    line("pure path (codec, parse, engine)", pure);
    println!(
        "added processing time per frame, pure path (codec, parse, engine) in process: not \
         through loopback sockets (see below), not counting the time a PVM packet waits for \
         the SVM's output, nor the socket reads:"
    );
    let summary = |times: &[Duration]| {
        if times.is_empty() {
            return "none".to_string();
        }
        format!(
            "p50 {:.2} µs   p99 {:.2} µs   p99.9 {:.2} µs   max {:.2} µs   ({} samples)",
            micros(percentile(times, 0.50)),
            micros(percentile(times, 0.99)),
            micros(percentile(times, 0.999)),
            micros(percentile(times, 1.0)),
            times.len()
        )
    };
    println!("  {}", summary(&latencies.frames));
    println!(
        "socket reads ({} KiB copied into a frame decoder, paid once per read by the frame \
         that needs it):",
        READ_CHUNK / 1024
    );
    println!("  {}", summary(&latencies.reads));
    if args.loopback_packets > 0 {
        print_loopback(args, &summary)?;
    }
    Ok(())
}

/// The loopback latency section of the report: the primary daemon in process, its floor and
/// the machine's raw thread wake-up, measured in the same run.
fn print_loopback(args: &BenchArgs, summary: &dyn Fn(&[Duration]) -> String) -> anyhow::Result<()> {
    let loopback = loopback::run(args.loopback_packets, args.loopback_cpus)?;
    let placement = match loopback.cpu {
        Some(cpu) => format!(
            "every thread on CPU {cpu} (--loopback-cpus same: without the machine's cross-CPU \
             wake-ups)"
        ),
        None => "threads on any CPU (--loopback-cpus spread: the machine's cross-CPU wake-ups \
                 included)"
            .to_string(),
    };
    println!(
        "latency through the primary daemon over loopback sockets ({} packets per case, one \
         packet in flight, the cases interleaved packet by packet; from the write of the later \
         of the two copies to QEMU's socket until the release is read from compare_out; \
         {placement}):",
        args.loopback_packets
    );
    println!(
        "  machine: one thread waking another over a Unix socketpair (round trip / 2, no \
         daemon):"
    );
    println!(
        "                                   {}",
        summary(&loopback.wake_up)
    );
    println!("  floor (the same sockets and runtimes, a task that only copies the bytes across):");
    println!(
        "                                   {}",
        summary(&loopback.floor)
    );
    println!(
        "  SVM ahead (PVM frame in → out):  {}",
        summary(&loopback.svm_ahead)
    );
    println!(
        "    added over the floor:          {}",
        added_over(&loopback.svm_ahead, &loopback.floor)
    );
    println!(
        "  SVM behind (SVM frame in → out): {}",
        summary(&loopback.svm_behind)
    );
    println!(
        "    added over the floor:          {}",
        added_over(&loopback.svm_behind, &loopback.floor)
    );
    println!(
        "  added: the case's percentile minus the floor's same percentile, i.e. what the \
         daemon's own work (decoding, comparing, its tasks and channels) adds to moving the \
         bytes through the same sockets and runtime; a difference of two percentiles, not a \
         percentile of per-packet differences, so a negative value is the run's noise (a tail \
         percentile rests on a few samples)"
    );
    Ok(())
}

/// Each percentile of `case` minus the same percentile of `floor`, signed.
fn added_over(case: &[Duration], floor: &[Duration]) -> String {
    if case.is_empty() || floor.is_empty() {
        return "none".to_string();
    }
    let at = |fraction| micros(percentile(case, fraction)) - micros(percentile(floor, fraction));
    format!(
        "p50 {:+.2} µs   p99 {:+.2} µs   p99.9 {:+.2} µs",
        at(0.50),
        at(0.99),
        at(0.999)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("lots").is_err());
    }

    /// A tiny run of every pass: the generated traffic is released whole, with no
    /// checkpoint, whatever the lag (the numbers themselves are not checked).
    #[test]
    fn every_pass_releases_all_of_a_small_run() {
        for (svm_lag, sizes) in [
            (4096, vec![1448, 536]),
            (-3000, vec![100]),
            (0, vec![9000, 1]),
        ] {
            let args = BenchArgs {
                connections: 3,
                bytes_per_connection: 20_000,
                segment_sizes: sizes,
                svm_lag,
                vnet_hdr: svm_lag == 0,
                rounds: 1,
                // The loopback measurement once, briefly: it starts a daemon.
                loopback_packets: if svm_lag == 0 { 20 } else { 0 },
                loopback_cpus: LoopbackCpus::Same,
            };
            run(&args).unwrap();
        }
    }
}

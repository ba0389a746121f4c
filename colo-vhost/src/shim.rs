//! The shim: sits between QEMU's socket and the crate's request handler, on a socket pair's
//! worth of plumbing, and applies [`crate::policy`] to every message.
//!
//! Two threads, one per direction, blocking I/O. QEMU to back-end: read a header (with its file
//! descriptors), validate it ([`crate::wire`]), read the payload, record it in the trace, let
//! the policy decide, send. Back-end to QEMU: read, let the policy see replies (the answer to
//! `SET_LOG_BASE` opens the log gate), send. Either side hanging up ends both directions.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::gate::LogGate;
use crate::policy::{Message, Out, Policy};
use crate::trace::{Trace, TraceEntry};
use crate::wire::{self, Decoded, HEADER_LEN, MAX_FDS};

/// Why a direction of the shim stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The peer hung up between messages (the normal end).
    #[error("peer closed the connection")]
    Closed,
    /// The peer hung up inside a message.
    #[error("peer closed the connection inside a message")]
    Truncated,
    /// The header was refused.
    #[error("refused a message header")]
    Header(#[from] wire::WireError),
    /// More file descriptors than a message may carry.
    #[error("a message carried more than {MAX_FDS} file descriptors")]
    TooManyFds,
    /// Socket error.
    #[error("socket error")]
    Io(#[from] io::Error),
}

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) as usize }
}

/// Receives up to `buf.len()` bytes and any file descriptors that ride on them.
fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ShimError> {
    let mut cmsg = vec![0u64; cmsg_space().div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cmsg.as_mut_ptr().cast();
    hdr.msg_controllen = cmsg.len() * 8;
    let n = loop {
        // SAFETY: hdr points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    // Take ownership of every descriptor first, so none leaks whatever happens next.
    // SAFETY: hdr was filled in by recvmsg; the CMSG_* macros walk its control buffer.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
    while !c.is_null() {
        // SAFETY: c points at a complete cmsghdr inside the control buffer.
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is the header's size.
            let data_len = len - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the data of an SCM_RIGHTS message is an array of ints.
            let data = unsafe { libc::CMSG_DATA(c) } as *const RawFd;
            for i in 0..data_len / size_of::<RawFd>() {
                // SAFETY: inside the array; each descriptor is new and ours alone.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: see above.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: walking the same control buffer.
        c = unsafe { libc::CMSG_NXTHDR(&hdr, c) };
    }
    if hdr.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(ShimError::TooManyFds);
    }
    Ok(n)
}

/// Fills `buf` completely (collecting descriptors); `Closed` if the peer hung up before the
/// first byte, `Truncated` after it.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), ShimError> {
    let mut done = 0;
    while done < buf.len() {
        let n = recv_with_fds(sock, &mut buf[done..], fds)?;
        if n == 0 {
            return Err(if done == 0 {
                ShimError::Closed
            } else {
                ShimError::Truncated
            });
        }
        done += n;
    }
    Ok(())
}

/// Reads one message: header (validated), payload, descriptors. The bytes go through
/// [`wire::decode`], which says how many to read next: the header, then (once it is valid, so
/// at most [`wire::MAX_PAYLOAD`]) the payload; never a byte of the next message.
pub fn recv_message(sock: &UnixStream) -> Result<Message<OwnedFd>, ShimError> {
    let mut fds = Vec::new();
    let mut buf = Vec::with_capacity(HEADER_LEN);
    loop {
        match wire::decode(&buf)? {
            Decoded::Message { header, payload } => {
                return Ok(Message {
                    header,
                    payload: payload.to_vec(),
                    fds,
                });
            }
            Decoded::Incomplete { needed } => {
                let have = buf.len();
                buf.resize(needed, 0);
                match recv_exact(sock, &mut buf[have..], &mut fds) {
                    Err(ShimError::Closed) if have > 0 => return Err(ShimError::Truncated),
                    other => other?,
                }
            }
        }
    }
}

/// Sends one message with its descriptors (on the first byte, as vhost-user wants them).
pub fn send_message(sock: &UnixStream, msg: &Message<OwnedFd>) -> Result<(), ShimError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + msg.payload.len());
    bytes.extend_from_slice(&msg.header.encode());
    bytes.extend_from_slice(&msg.payload);
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let mut cmsg = vec![0u64; cmsg_space().div_ceil(8)];
        // SAFETY: all-zero is a valid msghdr.
        let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if sent == 0 && !raw.is_empty() {
            let data_len = raw.len() * size_of::<RawFd>();
            hdr.msg_control = cmsg.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
            // SAFETY: the control buffer holds CMSG_SPACE(MAX_FDS ints) ≥ what we write.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr(),
                    libc::CMSG_DATA(c) as *mut RawFd,
                    raw.len(),
                );
            }
        }
        // SAFETY: hdr points at live buffers of the lengths it states.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        sent += n as usize;
    }
    Ok(())
}

/// How the shim treats the messages beyond the policy. The default is the only safe setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShimOptions {
    /// **Test only, breaks migration.** Hand the crate a private scratch file in place of the
    /// dirty log of every `SET_LOG_BASE`, so the device marks its writes into memory nobody
    /// reads and QEMU's log stays clean: a migrated guest misses the pages the device wrote
    /// during the migration. Exists so the dirty-log test can show that it sees a broken log
    /// (`colo-vhost-net --unsafe-no-dirty-log`, docs/vhost-user.md).
    pub unsafe_no_dirty_log: bool,
}

/// A scratch stand-in for QEMU's log: a memfd of the size the `SET_LOG_BASE` payload maps
/// (`mmap_size` + `mmap_offset`), so the crate's mapping succeeds and its marks land here.
fn scratch_log(payload: &[u8]) -> io::Result<OwnedFd> {
    let field = |i: usize| {
        payload
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(size), Some(offset)) = (field(0), field(8)) else {
        return Err(io::Error::other("SET_LOG_BASE payload is not 16 bytes"));
    };
    let len = size
        .checked_add(offset)
        .and_then(|l| libc::off_t::try_from(l).ok())
        .ok_or_else(|| io::Error::other("SET_LOG_BASE size overflows"))?;
    // SAFETY: the name is a NUL-terminated literal; the call only creates a descriptor.
    let fd = unsafe { libc::memfd_create(c"colo-vhost-scratch-log".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A running shim.
#[derive(Debug)]
pub struct Shim {
    threads: Vec<std::thread::JoinHandle<Result<(), ShimError>>>,
}

impl Shim {
    /// Starts relaying between `frontend` (QEMU's connection) and `backend` (the crate's end).
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        gate: LogGate,
        trace: Trace,
    ) -> io::Result<Shim> {
        Self::start_with(frontend, backend, gate, trace, ShimOptions::default())
    }

    /// [`Shim::start`] with options.
    pub fn start_with(
        frontend: UnixStream,
        backend: UnixStream,
        gate: LogGate,
        trace: Trace,
        options: ShimOptions,
    ) -> io::Result<Shim> {
        let policy = Arc::new(Mutex::new(Policy::<OwnedFd>::new()));
        let front_tx = Arc::new(Mutex::new(frontend.try_clone()?));
        let start = Instant::now();

        let down = {
            let (policy, gate, trace, front_tx) = (
                policy.clone(),
                gate.clone(),
                trace.clone(),
                front_tx.clone(),
            );
            let (frontend, backend) = (frontend.try_clone()?, backend.try_clone()?);
            std::thread::Builder::new()
                .name("vhost-shim-in".into())
                .spawn(move || {
                    let result = relay_down(
                        &frontend, &backend, &policy, &gate, &trace, &front_tx, start, options,
                    );
                    let _ = backend.shutdown(std::net::Shutdown::Both);
                    let _ = frontend.shutdown(std::net::Shutdown::Both);
                    gate.shut();
                    result
                })?
        };
        let up = std::thread::Builder::new()
            .name("vhost-shim-out".into())
            .spawn(move || {
                let result = relay_up(&backend, &front_tx, &policy, &gate);
                let _ = backend.shutdown(std::net::Shutdown::Both);
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                gate.shut();
                result
            })?;
        Ok(Shim {
            threads: vec![down, up],
        })
    }

    /// Waits for both directions to end; the first error that is not a plain hang-up.
    pub fn join(self) -> Result<(), ShimError> {
        let mut first = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(ShimError::Io(io::Error::other("shim thread panicked"))));
            if let Err(e) = r
                && !matches!(e, ShimError::Closed)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[allow(clippy::too_many_arguments)] // one call site, the thread's body
fn relay_down(
    frontend: &UnixStream,
    backend: &UnixStream,
    policy: &Mutex<Policy<OwnedFd>>,
    gate: &LogGate,
    trace: &Trace,
    front_tx: &Mutex<UnixStream>,
    start: Instant,
    options: ShimOptions,
) -> Result<(), ShimError> {
    loop {
        let mut msg = recv_message(frontend)?;
        if options.unsafe_no_dirty_log
            && msg.header.request == wire::req::SET_LOG_BASE
            && msg.fds.len() == 1
        {
            msg.fds = vec![scratch_log(&msg.payload)?];
            tracing::error!(
                "UNSAFE --unsafe-no-dirty-log: QEMU's dirty log replaced by a scratch file; \
                 pages this device writes will be missing after migration (test use only)"
            );
        }
        let mut entry = TraceEntry::of(&msg.header, &msg.payload, msg.fds.len(), start.elapsed());
        let (disposition, outs, open) = {
            let mut p = lock(policy);
            let (d, outs) = p.on_frontend(msg);
            (d, outs, p.gate_open())
        };
        // Close the gate before the message reaches the back-end, open it only after.
        if !open {
            gate.set(false);
        }
        entry.disposition = disposition;
        trace.push(entry);
        for out in outs {
            match out {
                Out::ToBackend(m) => send_message(backend, &m)?,
                Out::ToFrontend(m) => send_message(&lock(front_tx), &m)?,
            }
        }
        if open {
            gate.set(true);
        }
    }
}

fn relay_up(
    backend: &UnixStream,
    front_tx: &Mutex<UnixStream>,
    policy: &Mutex<Policy<OwnedFd>>,
    gate: &LogGate,
) -> Result<(), ShimError> {
    loop {
        let msg = recv_message(backend)?;
        let open = {
            let mut p = lock(policy);
            p.on_backend(&msg).then(|| p.gate_open())
        };
        send_message(&lock(front_tx), &msg)?;
        if let Some(open) = open {
            gate.set(open);
        }
    }
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    #[test]
    fn scratch_log_is_as_large_as_the_mapping_and_refuses_bad_payloads() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&8192u64.to_le_bytes()); // mmap_size
        payload.extend_from_slice(&4096u64.to_le_bytes()); // mmap_offset
        let fd = scratch_log(&payload).unwrap();
        let file = std::fs::File::from(fd);
        assert_eq!(file.metadata().unwrap().len(), 8192 + 4096);
        assert!(scratch_log(&payload[..15]).is_err());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&1u64.to_le_bytes());
        assert!(scratch_log(&huge).is_err());
    }
}

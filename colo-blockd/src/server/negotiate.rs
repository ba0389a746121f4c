//! The handshake phase on a socket: greeting, client flags, then options
//! until the client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`)
//! or leaves. Every option the server does not implement is answered
//! `NBD_REP_ERR_UNSUP` and the haggling goes on, as fixed newstyle requires.
//!
//! With TLS required (a TCP socket of a server with `--tls-dir`), every
//! option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered
//! `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME` by closing) before its data
//! is even parsed; `NBD_OPT_STARTTLS` ends this haggling
//! ([`Handshake::StartTls`]), the caller runs the TLS handshake on the same
//! socket and haggles again from scratch inside TLS ([`TlsState::Established`]).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ServeError;
use crate::backend::BlockBackend;
use crate::export::{Export, ExportSet};
use crate::metrics::{Metrics, TlsRefusal};
use crate::proto::ReplyStyle;
use crate::proto::consts::{info, opt, rep};
use crate::proto::handshake::{
    self, BeforeTls, ClientFlags, ClientOption, InfoRequest, OPTION_HEADER_LEN, OptionHeader,
};

/// How many options one client may send before the server gives up on it;
/// real clients send fewer than ten.
const MAX_OPTIONS: usize = 256;

/// The text of `NBD_REP_ERR_UNSUP` to `NBD_OPT_STARTTLS` where TLS is not offered.
const NO_TLS: &[u8] = b"TLS is not offered on this socket";

/// Where the handshake ended.
#[derive(Debug)]
pub(crate) enum Handshake<B> {
    /// Enter transmission on this export.
    Transmit {
        export: Arc<Export<B>>,
        style: ReplyStyle,
    },
    /// The client aborted (or only listed/inspected exports and left).
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next on
    /// this socket (only where TLS is [`TlsState::Required`]).
    StartTls,
}

/// Where the connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsState {
    /// This socket offers no TLS (a Unix socket, or no `--tls-dir`):
    /// `NBD_OPT_STARTTLS` is unsupported, everything else is served.
    NotOffered,
    /// TLS is required and not started: only `STARTTLS` and `ABORT` are
    /// served.
    Required,
    /// Inside TLS: everything is served, a second `STARTTLS` is invalid.
    Established,
}

/// The greeting and the client's flags.
pub(crate) async fn greet<S>(stream: &mut S) -> Result<ClientFlags, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&handshake::greeting()).await?;
    Ok(ClientFlags::parse(stream.read_u32().await?)?)
}

/// The option haggling, after [`greet`] or after the TLS handshake (which
/// resets it: structured replies asked for before TLS are forgotten, as the
/// specification requires).
pub(crate) async fn haggle<S, B>(
    stream: &mut S,
    exports: &ExportSet<B>,
    flags: ClientFlags,
    tls: TlsState,
    metrics: &Metrics,
) -> Result<Handshake<B>, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: BlockBackend,
{
    let mut style = ReplyStyle::Simple;
    let mut refused_for_tls = false;
    let mut refuse_for_tls = |metrics: &Metrics| {
        if !std::mem::replace(&mut refused_for_tls, true) {
            metrics.tls_refused(TlsRefusal::NoStartTls);
        }
    };
    for _ in 0..MAX_OPTIONS {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        match stream.read_exact(&mut raw).await {
            Ok(_) => {}
            // Hanging up without NBD_OPT_ABORT once a client has what it
            // came for (a listing, an INFO) is rude but harmless; a cut
            // inside a header lands here too and changes nothing either.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Handshake::Aborted);
            }
            Err(e) => return Err(e.into()),
        }
        let header = OptionHeader::parse(&raw)?;
        header.check_length()?;
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data).await?;
        let option = header.option;
        let send = |reply_type: u32, data: &[u8]| handshake::option_reply(option, reply_type, data);
        if tls == TlsState::Required {
            match handshake::before_tls(option) {
                BeforeTls::Handle => {}
                BeforeTls::TlsRequired => {
                    refuse_for_tls(metrics);
                    stream
                        .write_all(&send(
                            rep::ERR_TLS_REQD,
                            b"TLS required: NBD_OPT_STARTTLS first",
                        ))
                        .await?;
                    continue;
                }
                BeforeTls::Close => {
                    refuse_for_tls(metrics);
                    return Err(ServeError::TlsRequired);
                }
            }
        }
        if tls == TlsState::NotOffered && option == opt::STARTTLS {
            // Unsupported here whatever its data, as before STARTTLS was implemented.
            stream.write_all(&send(rep::ERR_UNSUP, NO_TLS)).await?;
            continue;
        }
        match handshake::parse_option(option, &data) {
            Err(invalid) if option == opt::EXPORT_NAME => {
                // EXPORT_NAME has no error reply: closing is the answer.
                return Err(ServeError::BadExportName(invalid.to_string()));
            }
            Err(invalid) => {
                stream
                    .write_all(&send(rep::ERR_INVALID, invalid.0.as_bytes()))
                    .await?;
            }
            Ok(ClientOption::ExportName(name)) => {
                let Some(export) = exports.find(&name) else {
                    return Err(ServeError::UnknownExport(name));
                };
                let reply = handshake::export_name_reply(
                    export.backend().size(),
                    export.transmission_flags(),
                    flags.no_zeroes,
                );
                stream.write_all(&reply).await?;
                return Ok(Handshake::Transmit {
                    export: Arc::clone(export),
                    style,
                });
            }
            Ok(ClientOption::Abort) => {
                // The client may already be gone; it asked to leave anyway.
                let _ = stream.write_all(&send(rep::ACK, &[])).await;
                return Ok(Handshake::Aborted);
            }
            Ok(ClientOption::List) => {
                let mut out = Vec::new();
                for e in exports.iter() {
                    let entry = handshake::server_entry(e.name(), e.description());
                    out.extend_from_slice(&send(rep::SERVER, &entry));
                }
                out.extend_from_slice(&send(rep::ACK, &[]));
                stream.write_all(&out).await?;
            }
            Ok(ClientOption::Info(req)) => {
                stream.write_all(&describe(option, &req, exports)).await?;
            }
            Ok(ClientOption::Go(req)) => {
                stream.write_all(&describe(option, &req, exports)).await?;
                if let Some(export) = exports.find(&req.name) {
                    return Ok(Handshake::Transmit {
                        export: Arc::clone(export),
                        style,
                    });
                }
            }
            Ok(ClientOption::StructuredReply) => {
                style = ReplyStyle::Structured;
                stream.write_all(&send(rep::ACK, &[])).await?;
            }
            Ok(ClientOption::StartTls) => match tls {
                TlsState::Required => {
                    stream.write_all(&send(rep::ACK, &[])).await?;
                    stream.flush().await?;
                    return Ok(Handshake::StartTls);
                }
                TlsState::NotOffered => stream.write_all(&send(rep::ERR_UNSUP, NO_TLS)).await?,
                TlsState::Established => {
                    let msg: &[u8] = b"TLS is already started";
                    stream.write_all(&send(rep::ERR_INVALID, msg)).await?;
                }
            },
            Ok(ClientOption::Unsupported(_)) => {
                stream
                    .write_all(&send(rep::ERR_UNSUP, b"option not supported"))
                    .await?;
            }
        }
    }
    Err(ServeError::TooManyOptions)
}

/// The replies to `NBD_OPT_INFO`/`NBD_OPT_GO`: the export's size and flags,
/// its block sizes (always: a minimum of 1 constrains nothing, and clients
/// benefit from the maximum), name and description if asked, then `ACK`.
fn describe<B: BlockBackend>(option: u32, req: &InfoRequest, exports: &ExportSet<B>) -> Vec<u8> {
    let Some(export) = exports.find(&req.name) else {
        let msg = format!("no export named {:?}", req.name);
        return handshake::option_reply(option, rep::ERR_UNKNOWN, msg.as_bytes());
    };
    let info_reply = |data: &[u8]| handshake::option_reply(option, rep::INFO, data);
    let mut out = info_reply(&handshake::info_export(
        export.backend().size(),
        export.transmission_flags(),
    ));
    out.extend_from_slice(&info_reply(&export.block_sizes().encode()));
    if req.wants(info::NAME) {
        out.extend_from_slice(&info_reply(&handshake::info_string(
            info::NAME,
            export.name(),
        )));
    }
    if req.wants(info::DESCRIPTION) && !export.description().is_empty() {
        out.extend_from_slice(&info_reply(&handshake::info_string(
            info::DESCRIPTION,
            export.description(),
        )));
    }
    out.extend_from_slice(&handshake::option_reply(option, rep::ACK, &[]));
    out
}

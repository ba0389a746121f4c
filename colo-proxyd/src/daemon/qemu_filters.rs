//! Keeping QEMU's net filters working when colo-proxyd's chardev connections drop, over QMP.
//!
//! Two facts of QEMU 10.0.2 (`net/filter-mirror.c`, `net/net.c`) make a dropped connection
//! more than a gap:
//!
//! * a `filter-redirector` with an `indev` removes its read handlers when that chardev closes
//!   (`redirector_chr_event`, `CHR_EVENT_CLOSED`) and never installs them again: after a
//!   reconnection QEMU no longer reads what colo-proxyd writes. The only cure is a new filter
//!   object: [`recreate`] sends `object-del` and `object-add` with the same properties at the
//!   same place in the netdev's filter list (`position=id=<next>`, `insert=before`; the order
//!   decides which filters a re-injected packet still passes). [`recreate_on_connect`] does
//!   this at every connection of the port, the first included (a restarted colo-proxyd's
//!   first connection is a reconnection for QEMU), before anything is written to it;
//! * while the primary's `compare0` (the PVM's output, redirector `redire1`) has no peer, the
//!   PVM's output must not reach the network uncompared. (In 10.0.2 `redire1`'s write then
//!   fails with EIO and `net/net.c` drops the packet on the filter's error return; the guard
//!   makes the cut explicit and independent of that.) [`guard_guest_link`] sets the link
//!   of the netdev down (`set_link`) while COLO runs and `compare0` is not connected, and up
//!   again when it is back. `qmp_set_link` on the netdev's id (`hn0`) marks the tap and its
//!   peer NIC `link_down`: QEMU then drops the NIC's packets before any filter
//!   (`qemu_send_packet_async_with_flags`) and the network's before the NIC, and the guest
//!   sees its carrier go down. The PVM's TCP retransmits what was dropped; nothing it had
//!   acknowledged is lost.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::attachment::OnConnect;
use super::gate::Protection;
use super::metrics::Metrics;
use colo_daemon::qmp_session::QmpSession;

/// At the start, how long the guest-link guard waits for colo-proxyd's first connection to
/// `compare0` before it decides (and possibly sets the link down): a daemon starting during
/// COLO should not flap the guest's link just because the relay answered first.
pub const STARTUP_GRACE: Duration = Duration::from_secs(1);

/// Retries of a failed QMP step: from this, doubling ...
const RETRY_MIN: Duration = Duration::from_millis(200);
/// ... up to this.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A `filter-redirector` that reads a chardev (`indev`) and hands its frames to a netdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndevRedirector {
    /// The filter's id (`redire0` on the primary, `f1` and after a failover `f3` on the
    /// secondary).
    pub id: String,
    /// The netdev it is attached to (`hn0`).
    pub netdev: String,
    /// `rx` (the primary's released packets, or the SVM's after a failover, to the network)
    /// or `tx` (the secondary's, into the SVM).
    pub queue: String,
    /// The chardev it reads (`compare_out`, `red0`, `red2`).
    pub indev: String,
    /// The filter it is inserted before (`redire1`, `f2`): its place in the generated
    /// command line (for `f3`, where qmp-driver adds it at the failover).
    pub before: String,
}

impl IndevRedirector {
    /// The primary's `redire0`: released packets from `compare_out` to the network.
    pub fn release(netdev: &str, id: &str, indev: &str, before: &str) -> Self {
        Self::new(id, netdev, "rx", indev, before)
    }

    /// The secondary's `f1`: packets from `red0` into the SVM.
    pub fn svm_input(netdev: &str, id: &str, indev: &str, before: &str) -> Self {
        Self::new(id, netdev, "tx", indev, before)
    }

    /// The secondary's `f3` after a failover: the SVM's rewritten output from `red2` to the
    /// network.
    pub fn network_output(netdev: &str, id: &str, indev: &str, before: &str) -> Self {
        Self::new(id, netdev, "rx", indev, before)
    }

    fn new(id: &str, netdev: &str, queue: &str, indev: &str, before: &str) -> Self {
        IndevRedirector {
            id: id.to_owned(),
            netdev: netdev.to_owned(),
            queue: queue.to_owned(),
            indev: indev.to_owned(),
            before: before.to_owned(),
        }
    }

    /// The arguments of its `object-add`.
    pub fn object_add_arguments(&self) -> Value {
        json!({
            "qom-type": "filter-redirector",
            "id": self.id,
            "netdev": self.netdev,
            "queue": self.queue,
            "indev": self.indev,
            "position": format!("id={}", self.before),
            "insert": "before",
        })
    }

    /// The commands an operator types on the monitor when colo-proxyd cannot.
    pub fn by_hand(&self) -> String {
        format!(
            "object_del {id}; object_add filter-redirector,id={id},netdev={netdev},queue={queue},\
             indev={indev},position=id={before},insert=before",
            id = self.id,
            netdev = self.netdev,
            queue = self.queue,
            indev = self.indev,
            before = self.before,
        )
    }
}

/// What [`recreate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recreated {
    /// The filter was there: deleted and added again.
    Replaced,
    /// QEMU had no such filter: only added.
    Added,
}

/// Replaces `filter` by a new one with the same properties: `object-del`, then `object-add`.
/// A filter that is already gone is only added.
pub async fn recreate(qmp: &QmpSession, filter: &IndevRedirector) -> Result<Recreated, String> {
    let id = filter.id.clone();
    let props = filter.object_add_arguments();
    qmp.with_client(|c| async move {
        let found = match c.object_del(&id).await {
            Ok(()) => Recreated::Replaced,
            Err(err) if err.to_string().contains("not found") => Recreated::Added,
            Err(err) => return Err(format!("object-del {id}: {err}")),
        };
        match c.object_add(props).await {
            Ok(()) => Ok(found),
            // Added by someone else since the object-del: qmp-driver adds f3 at a failover
            // while red2 connects, with the same properties. A fresh filter is there either way.
            Err(err) if err.to_string().contains("duplicate") => Ok(found),
            Err(err) => Err(format!("object-add {id}: {err}")),
        }
    })
    .await
}

/// The hook of the output port whose chardev `filter` reads: at each connection of the port,
/// re-creates the filter over `qmp`, so QEMU reads the new connection; the port writes
/// nothing before. After a reconnection it retries until it succeeds (or `shutdown`); at the
/// first connection it tries once (QEMU's filter reads it unless an earlier colo-proxyd was
/// connected). Without `qmp`, a reconnection is logged as an error naming the commands to
/// type.
pub fn recreate_on_connect(
    qmp: Option<QmpSession>,
    filter: IndevRedirector,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> OnConnect {
    OnConnect::new(move |connection| {
        let qmp = qmp.clone();
        let filter = filter.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        Box::pin(async move {
            let Some(qmp) = qmp else {
                if connection > 0 {
                    tracing::error!(
                        filter = %filter.id,
                        chardev = %filter.indev,
                        by_hand = %filter.by_hand(),
                        "QEMU's {} reconnected, but its filter {} no longer reads it (QEMU drops \
                         an indev's handlers when it closes) and colo-proxyd has no --qmp to \
                         re-create it: frames written to {} are lost until the filter is \
                         re-created by hand on this QEMU's monitor",
                        filter.indev,
                        filter.id,
                        filter.indev,
                    );
                }
                return;
            };
            let mut retry = RETRY_MIN;
            loop {
                match recreate(&qmp, &filter).await {
                    // At a failover qmp-driver adds f3 while red2 connects: whoever comes
                    // first adds it, the other finds it there.
                    Ok(Recreated::Added) if connection == 0 => {
                        metrics.filter_recreated(&filter.id);
                        tracing::info!(
                            filter = %filter.id,
                            chardev = %filter.indev,
                            "added QEMU filter {} for colo-proxyd's first connection to {} \
                             (QEMU had none yet)",
                            filter.id,
                            filter.indev,
                        );
                        return;
                    }
                    Ok(found) => {
                        metrics.filter_recreated(&filter.id);
                        if found == Recreated::Added {
                            tracing::warn!(
                                filter = %filter.id,
                                chardev = %filter.indev,
                                "QEMU had no filter {} reading {}; added it",
                                filter.id,
                                filter.indev,
                            );
                        } else if connection == 0 {
                            tracing::info!(
                                filter = %filter.id,
                                chardev = %filter.indev,
                                "re-created QEMU filter {} on colo-proxyd's first connection to {} \
                                 (QEMU may have seen an earlier connection close)",
                                filter.id,
                                filter.indev,
                            );
                        } else {
                            tracing::warn!(
                                filter = %filter.id,
                                chardev = %filter.indev,
                                "re-created QEMU filter {} after {} reconnected",
                                filter.id,
                                filter.indev,
                            );
                        }
                        return;
                    }
                    // On a fresh QEMU the filter still reads its first connection: the
                    // re-creation is a precaution then, and writing goes on without it.
                    Err(err) if connection == 0 => {
                        tracing::warn!(
                            filter = %filter.id,
                            chardev = %filter.indev,
                            qmp = %qmp.address(),
                            %err,
                            "cannot re-create QEMU's filter on colo-proxyd's first connection to \
                             {}; writing to it anyway (if an earlier colo-proxyd was connected, \
                             QEMU does not read it)",
                            filter.indev,
                        );
                        return;
                    }
                    Err(err) => tracing::error!(
                        filter = %filter.id,
                        chardev = %filter.indev,
                        qmp = %qmp.address(),
                        %err,
                        retry_in = ?retry,
                        "cannot re-create QEMU's filter: frames for {} are dropped until it is",
                        filter.indev,
                    ),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        })
    })
}

/// Whether the guest's link may be up: not while COLO protects (or holds, or fences) the PVM's
/// output and the socket that carries it to colo-proxyd is down.
pub fn link_may_be_up(protection: Protection, pvm_output_connected: bool) -> bool {
    pvm_output_connected || protection == Protection::Unprotected
}

/// Sends `set_link` for `netdev`.
pub async fn set_link(qmp: &QmpSession, netdev: &str, up: bool) -> Result<(), String> {
    let args = json!({ "name": netdev, "up": up });
    qmp.with_client(|c| async move {
        c.execute_raw("set_link", Some(args))
            .await
            .map(drop)
            .map_err(|e| format!("set_link {up}: {e}"))
    })
    .await
}

/// Keeps the link of `netdev` down while [`link_may_be_up`] says so, until `shutdown`.
/// `pvm_output` is whether `compare0` has a peer, `protection` the role loop's state. The
/// first decision, taken when `compare0` first connected or after [`STARTUP_GRACE`], is
/// applied whatever it is (a colo-proxyd that stopped with the link down left it down);
/// after that, only changes are.
pub async fn guard_guest_link(
    qmp: QmpSession,
    netdev: String,
    pvm_output_name: String,
    mut pvm_output: watch::Receiver<bool>,
    mut protection: watch::Receiver<Protection>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::timeout(STARTUP_GRACE, pvm_output.wait_for(|up| *up)) => {}
    }
    let mut applied: Option<bool> = None;
    let mut retry = RETRY_MIN;
    loop {
        let connected = *pvm_output.borrow_and_update();
        let state = *protection.borrow_and_update();
        let up = link_may_be_up(state, connected);
        let mut failed = false;
        if applied != Some(up) {
            match set_link(&qmp, &netdev, up).await {
                Ok(()) => {
                    metrics.set_guest_link(up);
                    retry = RETRY_MIN;
                    if !up {
                        tracing::error!(
                            netdev = %netdev,
                            chardev = %pvm_output_name,
                            protection = ?state,
                            "QEMU's {pvm_output_name} has no colo-proxyd connection: set the link \
                             of {netdev} down; the VM is cut off from the network until \
                             colo-proxyd has its socket back (its TCP retransmits what was dropped)"
                        );
                    } else if applied == Some(false) {
                        tracing::warn!(
                            netdev = %netdev,
                            chardev = %pvm_output_name,
                            "{pvm_output_name} is connected again: set the link of {netdev} up"
                        );
                    } else {
                        tracing::info!(netdev = %netdev, "the link of {netdev} is up");
                    }
                    applied = Some(up);
                }
                Err(err) => {
                    failed = true;
                    tracing::error!(
                        netdev = %netdev,
                        up,
                        qmp = %qmp.address(),
                        %err,
                        retry_in = ?retry,
                        "cannot set the guest's link"
                    );
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pvm_output.changed() => if r.is_err() { return },
            r = protection.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry), if failed => {
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_testkit::fake_qmp::{Answer, FakeMonitor};
    use colo_types::Address;

    /// A QMP monitor that answers `{}`, or the error `refuse` gives.
    fn fake_qmp(
        path: &std::path::Path,
        refuse: fn(&str, &Value) -> Option<&'static str>,
    ) -> FakeMonitor {
        FakeMonitor::serve_unix(path, &[], move |cmd| match refuse(&cmd.name, &cmd.args) {
            Some(desc) => Answer::generic_error(desc),
            None => Answer::ok(),
        })
    }

    /// The next command the monitor got: its name and arguments.
    async fn next(seen: &mut FakeMonitor) -> (String, Value) {
        let cmd = seen.recv().await;
        (cmd.name, cmd.args)
    }

    fn redire0() -> IndevRedirector {
        IndevRedirector::release("hn0", "redire0", "compare_out", "redire1")
    }

    #[test]
    fn object_add_keeps_the_filter_at_its_place() {
        assert_eq!(
            redire0().object_add_arguments(),
            json!({"qom-type": "filter-redirector", "id": "redire0", "netdev": "hn0",
                   "queue": "rx", "indev": "compare_out", "position": "id=redire1",
                   "insert": "before"})
        );
        let f1 = IndevRedirector::svm_input("hn0", "f1", "red0", "f2");
        assert_eq!(f1.object_add_arguments()["queue"], "tx");
        assert_eq!(
            f1.by_hand(),
            "object_del f1; object_add filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0,\
             position=id=f2,insert=before"
        );
    }

    #[test]
    fn the_link_goes_down_only_while_compare0_is_down_and_the_output_matters() {
        use Protection::*;
        for state in [Unprotected, Protected, Exited, Fenced] {
            assert!(link_may_be_up(state, true), "{state:?}");
        }
        assert!(link_may_be_up(Unprotected, false));
        for state in [Protected, Exited, Fenced] {
            assert!(!link_may_be_up(state, false), "{state:?}");
        }
    }

    #[tokio::test]
    async fn recreate_deletes_then_adds_and_tolerates_a_missing_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut seen = fake_qmp(&path, |name, args| {
            (name == "object-del" && args["id"] == "gone").then_some("object 'gone' not found")
        });
        let qmp = QmpSession::new(Address::Unix(path));
        assert_eq!(recreate(&qmp, &redire0()).await, Ok(Recreated::Replaced));
        assert_eq!(
            next(&mut seen).await,
            ("object-del".into(), json!({"id": "redire0"}))
        );
        assert_eq!(
            next(&mut seen).await,
            ("object-add".into(), redire0().object_add_arguments())
        );
        let gone = IndevRedirector::release("hn0", "gone", "compare_out", "redire1");
        assert_eq!(recreate(&qmp, &gone).await, Ok(Recreated::Added));
        assert_eq!(next(&mut seen).await.0, "object-del");
        assert_eq!(next(&mut seen).await.0, "object-add");
    }

    /// At a failover qmp-driver adds f3 between colo-proxyd's object-del and object-add.
    #[tokio::test]
    async fn a_filter_added_meanwhile_by_someone_else_is_there_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut seen = fake_qmp(&path, |name, _| match name {
            "object-del" => Some("object 'f3' not found"),
            "object-add" => Some("attempt to add duplicate property 'f3' to object"),
            _ => None,
        });
        let qmp = QmpSession::new(Address::Unix(path));
        let f3 = IndevRedirector::network_output("hn0", "f3", "red2", "f2");
        assert_eq!(recreate(&qmp, &f3).await, Ok(Recreated::Added));
        assert_eq!(next(&mut seen).await.0, "object-del");
        assert_eq!(
            next(&mut seen).await,
            ("object-add".into(), f3.object_add_arguments())
        );
    }

    #[tokio::test]
    async fn a_refused_object_add_is_an_error_and_the_hook_retries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut seen = fake_qmp(&path, |name, _| {
            (name == "object-add").then_some("filter 'redire1' not found")
        });
        let qmp = QmpSession::new(Address::Unix(path));
        let err = recreate(&qmp, &redire0()).await.unwrap_err();
        assert!(
            err.contains("object-add redire0") && err.contains("redire1"),
            "{err}"
        );
        while seen.try_recv().is_some() {}
        // The hook keeps trying; it ends with the shutdown.
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new("primary");
        let hook = recreate_on_connect(Some(qmp), redire0(), metrics.clone(), shutdown.clone());
        let task = tokio::spawn(hook.run(1));
        for _ in 0..2 {
            assert_eq!(next(&mut seen).await.0, "object-del");
            assert_eq!(next(&mut seen).await.0, "object-add");
        }
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(metrics.filters_recreated("redire0"), 0);
    }

    #[tokio::test]
    async fn the_guard_sets_the_link_down_and_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut seen = fake_qmp(&path, |_, _| None);
        let qmp = QmpSession::new(Address::Unix(path));
        let (connected, pvm_output) = watch::channel(true);
        let (protection_tx, protection) = watch::channel(Protection::Unprotected);
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new("primary");
        let task = tokio::spawn(guard_guest_link(
            qmp,
            "hn0".into(),
            "compare0".into(),
            pvm_output,
            protection,
            metrics.clone(),
            shutdown.clone(),
        ));
        let link = |up: bool| ("set_link".to_owned(), json!({"name": "hn0", "up": up}));
        // The first decision is applied: whatever an earlier daemon left.
        assert_eq!(next(&mut seen).await, link(true));
        // COLO runs and compare0 drops: down; back: up.
        connected.send_replace(false);
        protection_tx.send_replace(Protection::Protected);
        assert_eq!(next(&mut seen).await, link(false));
        connected.send_replace(true);
        assert_eq!(next(&mut seen).await, link(true));
        shutdown.cancel();
        task.await.unwrap();
        assert!(seen.try_recv().is_none());
        assert!(
            metrics
                .render()
                .contains("colo_proxyd_guest_link_downs_total 1")
        );
    }
}

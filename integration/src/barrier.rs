//! Scenarios for the checkpoint-barrier relay: the stock pair migrating through
//! `qmp-driver relay`, with test subscribers on its control socket.
//!
//! - [`epochs`]: every checkpoint gives exactly one `svm-epoch-closed`, `checkpoint-adopted`
//!   and `checkpoint-complete`, in order and in step with both QEMUs' STOP/RESUME events; and
//!   the pause the relay adds, against pairs without relay in the same run.
//! - [`barrier`]: a subscriber that acknowledges late lengthens every checkpoint by its delay
//!   (the barrier holds the checkpoint); one that never acknowledges ends COLO on both sides
//!   (`colo-exit`, reason `barrier-timeout`), and the primary then carries on alone.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_control::protocol::{Event, EventKind};
use serde::Serialize;
use serde_json::json;

use crate::relay_watch::{AckPolicy, EventRecorder};
use crate::stats::{median, quantile};
use crate::stock::driver::relay_control_path;
use crate::stock::{PairConfig, Role, StockPair, pause_windows};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(pauses: &[Duration]) -> Option<f64> {
    median(pauses).map(ms)
}

/// One pair's checkpoints in [`epochs`].
#[derive(Debug, Clone, Serialize)]
pub struct PairPauses {
    /// Whether the pair migrated through the relay.
    pub relay: bool,
    /// The primary's checkpoints (STOP/RESUME pairs) counted.
    pub checkpoints: usize,
    /// Their median primary pause (ms).
    pub median_ms: Option<f64>,
}

/// What [`epochs`] saw.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// Every pair in the order it ran: without relay, with, with, without.
    pub pairs: Vec<PairPauses>,
    /// Checkpoints of the pairs without relay (primary's STOP/RESUME pairs), together.
    pub direct_checkpoints: usize,
    /// Median primary pause over all of them (ms).
    pub direct_pause_median_ms: Option<f64>,
    /// Checkpoints of the relayed pairs, by the primary's STOP/RESUME pairs, together.
    pub primary_checkpoints: usize,
    /// The same by the secondary's.
    pub secondary_checkpoints: usize,
    /// `svm-epoch-closed`, `checkpoint-adopted`, `checkpoint-complete` events received.
    pub closed: usize,
    /// See `closed`.
    pub adopted: usize,
    /// See `closed`.
    pub complete: usize,
    /// Every way the events broke the expected order; empty when all is well.
    pub violations: Vec<String>,
    /// Median primary pause over all the relayed pairs' checkpoints (ms).
    pub relay_pause_median_ms: Option<f64>,
    /// 90th percentile of the same (ms).
    pub relay_pause_p90_ms: Option<f64>,
    /// Median with relay minus median without, both over all of their pairs (ms).
    pub added_pause_ms: Option<f64>,
}

impl EpochReport {
    /// A human summary.
    pub fn render(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let pairs: Vec<String> = self
            .pairs
            .iter()
            .map(|p| {
                format!(
                    "{} {} ({})",
                    if p.relay { "with" } else { "without" },
                    opt(p.median_ms),
                    p.checkpoints
                )
            })
            .collect();
        format!(
            "scenario relay-epochs\n  \
             pairs in order     {} (median pause in ms, checkpoints)\n  \
             without relay      {} checkpoints, primary pause median {} ms\n  \
             with relay         {} primary / {} secondary checkpoints, pause median {} ms, \
             p90 {} ms\n  \
             epoch events       {} svm-epoch-closed, {} checkpoint-adopted, {} \
             checkpoint-complete\n  \
             relay added pause  {} ms per checkpoint (median with - median without, over all \
             the pairs of each kind)\n  \
             order violations   {}\n",
            pairs.join(", "),
            self.direct_checkpoints,
            opt(self.direct_pause_median_ms),
            self.primary_checkpoints,
            self.secondary_checkpoints,
            opt(self.relay_pause_median_ms),
            opt(self.relay_pause_p90_ms),
            self.closed,
            self.adopted,
            self.complete,
            opt(self.added_pause_ms),
            if self.violations.is_empty() {
                "none".to_string()
            } else {
                self.violations.join("; ")
            }
        )
    }
}

/// Checkpoints both sides completed over the pair's whole life (not only since the guest
/// booted): the relay numbers epochs from the first one.
fn all_windows(pair: &StockPair, role: Role) -> Result<Vec<(i64, i64)>> {
    Ok(pause_windows(&pair.vm(role)?.events.snapshot()))
}

/// Sets a checkpoint period of an hour (which checkpoints once more at once) and waits until
/// neither QEMU nor the relay reports anything new for a second.
async fn quiesce(pair: &StockPair, recorder: &EventRecorder) -> Result<()> {
    pair.vm(Role::Primary)?
        .qmp
        .migrate_set_parameters(json!({ "x-checkpoint-delay": 3_600_000 }))
        .await?;
    let sample = || -> Result<(usize, usize, usize)> {
        Ok((
            all_windows(pair, Role::Primary)?.len(),
            all_windows(pair, Role::Secondary)?.len(),
            recorder.events().len(),
        ))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = sample()?;
    let mut stable_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = sample()?;
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_secs(1) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pair did not settle after the checkpoint period was raised: {now:?}");
        }
    }
}

/// Checks the epoch events against the QEMUs' pauses and returns every violation.
///
/// For checkpoint `i` (epoch `i`), causally: the secondary stops and replies
/// (`svm-epoch-closed`), the primary stops, the secondary receives the state
/// (`checkpoint-adopted`), the primary resumes after the secondary loaded it
/// (`checkpoint-complete` is published right after that message is forwarded, so it may
/// follow the primary's RESUME). All timestamps are this host's wall clock.
pub fn check_epoch_order(
    events: &[Event],
    primary: &[(i64, i64)],
    secondary: &[(i64, i64)],
) -> Vec<String> {
    let mut violations = Vec::new();
    let epoch_events: Vec<&Event> = events
        .iter()
        .filter(|e| {
            matches!(
                e.event,
                EventKind::SvmEpochClosed
                    | EventKind::CheckpointAdopted
                    | EventKind::CheckpointComplete
            )
        })
        .collect();
    if !epoch_events.len().is_multiple_of(3) {
        violations.push(format!(
            "{} epoch events is not a whole number of checkpoints",
            epoch_events.len()
        ));
    }
    let mut previous_epoch = None;
    for (i, triple) in epoch_events.chunks(3).enumerate() {
        let kinds: Vec<EventKind> = triple.iter().map(|e| e.event).collect();
        let expected = [
            EventKind::SvmEpochClosed,
            EventKind::CheckpointAdopted,
            EventKind::CheckpointComplete,
        ];
        if kinds != expected[..kinds.len()] || kinds.len() != 3 {
            violations.push(format!("checkpoint {}: events {kinds:?}", i + 1));
            continue;
        }
        let epoch = triple[0].epoch;
        if triple.iter().any(|e| e.epoch != epoch) {
            violations.push(format!(
                "checkpoint {}: epochs {:?} differ within one checkpoint",
                i + 1,
                triple.iter().map(|e| e.epoch).collect::<Vec<_>>()
            ));
        }
        if let Some(prev) = previous_epoch
            && epoch != prev + 1
        {
            violations.push(format!("checkpoint {}: epoch {epoch} after {prev}", i + 1));
        }
        previous_epoch = Some(epoch);
        let (closed, adopted) = (triple[0].time_us as i64, triple[1].time_us as i64);
        if let Some(&(p_stop, p_resume)) = primary.get(i)
            && !(closed <= p_stop && p_stop <= adopted && adopted <= p_resume)
        {
            violations.push(format!(
                "checkpoint {}: primary STOP {p_stop} / RESUME {p_resume} do not enclose \
                 checkpoint-adopted {adopted} after svm-epoch-closed {closed}",
                i + 1
            ));
        }
        if let Some(&(s_stop, _)) = secondary.get(i)
            && s_stop > closed
        {
            violations.push(format!(
                "checkpoint {}: svm-epoch-closed {closed} before the secondary's STOP {s_stop}",
                i + 1
            ));
        }
    }
    let n = epoch_events.len() / 3;
    if primary.len() != n || secondary.len() != n {
        violations.push(format!(
            "{n} checkpoints by the relay's events, {} by the primary's STOP/RESUME, {} by the \
             secondary's",
            primary.len(),
            secondary.len()
        ));
    }
    violations
}

/// Pairs without and with relay, in the order without, with, with, without, `checkpoints`
/// checkpoints each at `cfg.checkpoint_delay_ms`; see the module doc.
///
/// Pairs booted one after the other differ by about as much as the relay adds (where QEMU's
/// threads land on two busy cores, what the guest did first); two pairs of each kind, in an
/// order that cancels a steady drift of the machine, make the difference of the pooled
/// medians an estimate one pair of each could not give.
pub async fn epochs(tag: &str, cfg: PairConfig, checkpoints: usize) -> Result<EpochReport> {
    let mut direct_pauses = Vec::new();
    let mut relay_pauses = Vec::new();
    let mut pairs = Vec::new();
    let mut relayed = Vec::new();
    for (index, relay) in [false, true, true, false].into_iter().enumerate() {
        let pauses = if relay {
            let run = relayed_pair(&format!("{tag}r{index}"), cfg.clone(), checkpoints).await?;
            let pauses = run.pauses.clone();
            relayed.push(run);
            pauses
        } else {
            direct_pair(&format!("{tag}d{index}"), cfg.clone(), checkpoints).await?
        };
        pairs.push(PairPauses {
            relay,
            checkpoints: pauses.len(),
            median_ms: median_ms(&pauses),
        });
        if relay {
            relay_pauses.extend(pauses);
        } else {
            direct_pauses.extend(pauses);
        }
    }
    let sum = |f: fn(&RelayedRun) -> usize| relayed.iter().map(f).sum::<usize>();
    let report = EpochReport {
        pairs,
        direct_checkpoints: direct_pauses.len(),
        direct_pause_median_ms: median_ms(&direct_pauses),
        primary_checkpoints: sum(|r| r.primary_checkpoints),
        secondary_checkpoints: sum(|r| r.secondary_checkpoints),
        closed: sum(|r| r.closed),
        adopted: sum(|r| r.adopted),
        complete: sum(|r| r.complete),
        violations: relayed.iter().flat_map(|r| r.violations.clone()).collect(),
        relay_pause_median_ms: median_ms(&relay_pauses),
        relay_pause_p90_ms: quantile(&relay_pauses, 0.9).map(ms),
        added_pause_ms: median_ms(&relay_pauses)
            .zip(median_ms(&direct_pauses))
            .map(|(with, without)| with - without),
    };
    let dir = crate::artifacts::run_dir("relay-epochs")?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

fn within(cfg: &PairConfig, checkpoints: usize) -> Duration {
    let period = Duration::from_millis(u64::from(cfg.checkpoint_delay_ms));
    period * (checkpoints as u32) * 4 + Duration::from_secs(60)
}

/// A pair without relay: its primary's pauses over `checkpoints` checkpoints.
async fn direct_pair(tag: &str, cfg: PairConfig, checkpoints: usize) -> Result<Vec<Duration>> {
    let dir = crate::artifacts::run_dir("relay-epochs-direct")?;
    let within = within(&cfg, checkpoints);
    let pair = StockPair::start(
        tag,
        dir,
        PairConfig {
            relay: false,
            ..cfg
        },
    )
    .await?;
    pair.wait_checkpoints(checkpoints, within).await?;
    Ok(pair.checkpoint_pauses(Role::Primary))
}

/// What one relayed pair of [`epochs`] showed.
struct RelayedRun {
    pauses: Vec<Duration>,
    primary_checkpoints: usize,
    secondary_checkpoints: usize,
    closed: usize,
    adopted: usize,
    complete: usize,
    violations: Vec<String>,
}

/// A pair through the relay, with a subscriber that acknowledges at once: its primary's
/// pauses over `checkpoints` checkpoints, and its epoch events checked against both QEMUs'.
async fn relayed_pair(tag: &str, cfg: PairConfig, checkpoints: usize) -> Result<RelayedRun> {
    let dir = crate::artifacts::run_dir("relay-epochs-relayed")?;
    let within = within(&cfg, checkpoints);
    let mut pair = StockPair::launch(tag, dir.clone(), PairConfig { relay: true, ..cfg }).await?;
    let recorder = EventRecorder::connect(
        &relay_control_path(&dir),
        "epoch-test",
        AckPolicy::Immediately,
    )
    .await?;
    pair.enter_colo().await?;
    pair.wait_checkpoints(checkpoints, within).await?;
    let pauses = pair.checkpoint_pauses(Role::Primary);
    quiesce(&pair, &recorder).await?;

    let primary = all_windows(&pair, Role::Primary)?;
    let secondary = all_windows(&pair, Role::Secondary)?;
    let events = recorder.events();
    let violations = check_epoch_order(&events, &primary, &secondary)
        .into_iter()
        .map(|v| format!("{tag}: {v}"))
        .collect();
    Ok(RelayedRun {
        pauses,
        primary_checkpoints: primary.len(),
        secondary_checkpoints: secondary.len(),
        closed: recorder.of_kind(EventKind::SvmEpochClosed).len(),
        adopted: recorder.of_kind(EventKind::CheckpointAdopted).len(),
        complete: recorder.of_kind(EventKind::CheckpointComplete).len(),
        violations,
    })
}

/// What [`barrier`] saw.
#[derive(Debug, Clone, Serialize)]
pub struct BarrierReport {
    /// The slow subscriber's delay (ms).
    pub ack_delay_ms: f64,
    /// Primary pauses with only the fast subscriber (ms).
    pub fast_primary_ms: Vec<f64>,
    /// Primary pauses while the slow subscriber was registered (ms).
    pub slow_primary_ms: Vec<f64>,
    /// Secondary pauses while the slow subscriber was registered (ms).
    pub slow_secondary_ms: Vec<f64>,
    /// The relay's ack bound (ms).
    pub ack_timeout_ms: u64,
    /// The `colo-exit` event the first subscriber received after the stuck one joined.
    pub colo_exit_reason: Option<String>,
    /// Its detail text.
    pub colo_exit_detail: Option<String>,
    /// From the stuck subscriber's registration to COLO_EXIT on both QEMUs (ms).
    pub exit_after_ms: Option<f64>,
    /// The COLO_EXIT reasons QEMU reported (primary, secondary).
    pub qemu_exit_reasons: Vec<String>,
    /// The relay's status afterwards: failed barriers.
    pub relay_barrier_timeouts: u64,
    /// Requests the primary answered on its own afterwards.
    pub served_after: usize,
}

impl BarrierReport {
    /// A human summary.
    pub fn render(&self) -> String {
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).map_or("-".into(), |m| format!("{m:.1}"))
        };
        format!(
            "scenario relay-barrier\n  \
             fast subscriber    primary pause median {} ms over {} checkpoints\n  \
             +{:.0} ms subscriber primary pause median {} ms, secondary {} ms over {} \
             checkpoints\n  \
             stuck subscriber   colo-exit reason {:?} after {} ms (ack bound {} ms); QEMU \
             COLO_EXIT reasons {:?}\n  \
             afterwards         {} requests served by the primary alone\n",
            med(&self.fast_primary_ms),
            self.fast_primary_ms.len(),
            self.ack_delay_ms,
            med(&self.slow_primary_ms),
            med(&self.slow_secondary_ms),
            self.slow_primary_ms.len(),
            self.colo_exit_reason,
            self.exit_after_ms.map_or("-".into(), |v| format!("{v:.0}")),
            self.ack_timeout_ms,
            self.qemu_exit_reasons,
            self.served_after,
        )
    }
}

fn ms_list(pauses: &[Duration]) -> Vec<f64> {
    pauses.iter().copied().map(ms).collect()
}

/// Waits until both sides completed `more` checkpoints beyond the given counts.
async fn wait_more(pair: &StockPair, from: (usize, usize), more: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pair.checkpoint_pauses(Role::Primary).len();
        let s = pair.checkpoint_pauses(Role::Secondary).len();
        if p >= from.0 + more && s >= from.1 + more {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {p}/{s} checkpoints, waiting for {more} beyond {from:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// See the module doc. `per_phase` checkpoints with the fast subscriber alone, then as many
/// with a subscriber that acknowledges after `ack_delay`, then a subscriber that never does.
pub async fn barrier(
    tag: &str,
    cfg: PairConfig,
    per_phase: usize,
    ack_delay: Duration,
) -> Result<BarrierReport> {
    let dir = crate::artifacts::run_dir("relay-barrier")?;
    let ack_timeout_ms = cfg.relay_ack_timeout_ms;
    let mut pair = StockPair::launch(tag, dir.clone(), PairConfig { relay: true, ..cfg }).await?;
    let control = relay_control_path(&dir);
    let fast = EventRecorder::connect(&control, "fast", AckPolicy::Immediately).await?;
    pair.enter_colo().await?;
    pair.wait_checkpoints(per_phase, Duration::from_secs(120))
        .await?;
    let fast_primary = pair.checkpoint_pauses(Role::Primary);

    // The slow subscriber: checkpoints from the first one that starts after it joined.
    let slow = EventRecorder::connect(&control, "slow", AckPolicy::After(ack_delay)).await?;
    // A checkpoint already under way when it joined does not wait for it: skip one.
    let mark = (
        pair.checkpoint_pauses(Role::Primary).len() + 1,
        pair.checkpoint_pauses(Role::Secondary).len() + 1,
    );
    wait_more(&pair, mark, per_phase).await?;
    let slow_primary = pair.checkpoint_pauses(Role::Primary)[mark.0..].to_vec();
    let slow_secondary = pair.checkpoint_pauses(Role::Secondary)[mark.1..].to_vec();
    // Done with it: it answers at once from now on (leaving would end COLO, by design).
    slow.set_policy(AckPolicy::Immediately);

    // The stuck subscriber.
    let exits_before: Vec<usize> = [Role::Primary, Role::Secondary]
        .iter()
        .map(|r| colo_exits(&pair, *r).map(|v| v.len()))
        .collect::<Result<_>>()?;
    let stuck_at = Instant::now();
    let _stuck = EventRecorder::connect(&control, "stuck", AckPolicy::Never).await?;
    let deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_millis(ack_timeout_ms) * 2;
    let exit_reasons = loop {
        let now: Vec<Vec<String>> = [Role::Primary, Role::Secondary]
            .iter()
            .map(|r| colo_exits(&pair, *r))
            .collect::<Result<_>>()?;
        if now
            .iter()
            .zip(&exits_before)
            .all(|(v, before)| v.len() > *before)
        {
            break now
                .iter()
                .zip(&exits_before)
                .map(|(v, before)| v[*before].clone())
                .collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            bail!(
                "COLO did not end after a subscriber stopped acknowledging (COLO_EXIT so far: \
                 {now:?}); relay log: {}",
                pair.relay
                    .as_ref()
                    .map(|r| r.log_tail())
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exit_after = stuck_at.elapsed();
    let exit_event = fast.of_kind(EventKind::ColoExit).into_iter().next_back();
    let relay_status = colo_control::client::query_status(&control)
        .await
        .context("asking the relay for its status")?;

    // The operator's decision: the primary carries on alone.
    pair.failover_to_primary().await?;
    let client =
        crate::client::HttpClient::new(&pair.topology.client, crate::scenario::guest_server());
    let mut served_after = 0;
    for _ in 0..5 {
        if crate::scenario::probe(&client, Duration::from_secs(5))
            .await
            .is_ok()
        {
            served_after += 1;
        }
    }

    let report = BarrierReport {
        ack_delay_ms: ms(ack_delay),
        fast_primary_ms: ms_list(&fast_primary),
        slow_primary_ms: ms_list(&slow_primary),
        slow_secondary_ms: ms_list(&slow_secondary),
        ack_timeout_ms,
        colo_exit_reason: exit_event.as_ref().and_then(|e| e.reason.clone()),
        colo_exit_detail: exit_event.as_ref().and_then(|e| e.detail.clone()),
        exit_after_ms: Some(ms(exit_after)),
        qemu_exit_reasons: exit_reasons,
        relay_barrier_timeouts: relay_status.barrier_timeouts,
        served_after,
    };
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

/// The `reason` of every COLO_EXIT event of `role` so far.
fn colo_exits(pair: &StockPair, role: Role) -> Result<Vec<String>> {
    Ok(pair
        .vm(role)?
        .events
        .snapshot()
        .iter()
        .filter(|e| e.name == "COLO_EXIT")
        .map(|e| e.data["reason"].as_str().unwrap_or("?").to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, epoch: u64, time_us: u64) -> Event {
        Event {
            seq: 0,
            event: kind,
            epoch,
            sync: false,
            time_us,
            reason: None,
            survivor: None,
            detail: None,
        }
    }

    /// Checkpoint `i` (from 1): secondary stops at i*1000, closed at +10, primary stops at
    /// +20, adopted at +30, primary resumes at +50, complete at +60.
    type Windows = Vec<(i64, i64)>;

    fn good(n: u64) -> (Vec<Event>, Windows, Windows) {
        let mut events = vec![event(EventKind::ColoStarted, 1, 0)];
        let (mut p, mut s) = (Vec::new(), Vec::new());
        for i in 1..=n {
            let t = i * 1000;
            events.push(event(EventKind::SvmEpochClosed, i, t + 10));
            events.push(event(EventKind::CheckpointAdopted, i, t + 30));
            events.push(event(EventKind::CheckpointComplete, i, t + 60));
            p.push((t as i64 + 20, t as i64 + 50));
            s.push((t as i64, t as i64 + 55));
        }
        (events, p, s)
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let (events, p, s) = good(5);
        assert_eq!(check_epoch_order(&events, &p, &s), Vec::<String>::new());
    }

    #[test]
    fn a_missing_event_a_skipped_epoch_and_a_count_mismatch_are_reported() {
        let (mut events, p, s) = good(3);
        events.remove(2); // checkpoint 1 loses checkpoint-adopted
        assert!(!check_epoch_order(&events, &p, &s).is_empty());

        let (mut events, p, s) = good(3);
        for e in events.iter_mut().skip(4) {
            e.epoch += 1; // epoch 2 becomes 3
        }
        let v = check_epoch_order(&events, &p, &s);
        assert!(v.iter().any(|v| v.contains("epoch 3 after 1")), "{v:?}");

        let (events, mut p, s) = good(3);
        p.pop();
        let v = check_epoch_order(&events, &p, &s);
        assert!(v.iter().any(|v| v.contains("3 checkpoints")), "{v:?}");
    }

    #[test]
    fn an_event_outside_the_qemu_pause_is_reported() {
        let (mut events, p, s) = good(2);
        events[2].time_us = 1000 + 70; // adopted after the primary resumed
        let v = check_epoch_order(&events, &p, &s);
        assert!(v.iter().any(|v| v.contains("checkpoint 1")), "{v:?}");

        let (events, p, mut s) = good(2);
        s[1].0 = 2000 + 15; // the secondary stopped after it replied
        let v = check_epoch_order(&events, &p, &s);
        assert!(v.iter().any(|v| v.contains("checkpoint 2")), "{v:?}");
    }
}

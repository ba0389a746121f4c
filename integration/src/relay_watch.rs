//! Test subscribers on the relay's control socket: they record every epoch event and answer
//! the synchronous ones at once, after a delay, or never, so the tests can see what the
//! checkpoint barrier does with a fast, a slow and a stuck daemon.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use colo_control::client::Subscriber;
use colo_control::protocol::{Event, EventKind};
use tokio::task::JoinHandle;

/// How a recorder answers synchronous events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// Acknowledge as soon as the event arrives.
    Immediately,
    /// Acknowledge after this long (a slow daemon).
    After(Duration),
    /// Never acknowledge (a stuck daemon).
    Never,
}

/// A subscriber that records every event it receives.
#[derive(Debug)]
pub struct EventRecorder {
    events: Arc<Mutex<Vec<Event>>>,
    policy: Arc<Mutex<Option<AckPolicy>>>,
    task: JoinHandle<Result<()>>,
}

impl EventRecorder {
    /// Connects to the relay's control socket as the synchronous subscriber `name`, which
    /// answers by `policy`, and starts recording.
    pub async fn connect(control: &Path, name: &str, policy: AckPolicy) -> Result<Self> {
        Self::start(control, name, Some(policy)).await
    }

    /// An asynchronous subscriber: it sees every event, and the relay never waits for it.
    pub async fn observer(control: &Path, name: &str) -> Result<Self> {
        Self::start(control, name, None).await
    }

    async fn start(control: &Path, name: &str, policy: Option<AckPolicy>) -> Result<Self> {
        let mut sub = Subscriber::connect(control, name, policy.is_some())
            .await
            .with_context(|| format!("subscribing to {} as {name}", control.display()))?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let policy = Arc::new(Mutex::new(policy));
        let current = policy.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = sub.next_event().await? {
                let (sync, seq) = (event.sync, event.seq);
                sink.lock().expect("recorder lock").push(event);
                if !sync {
                    continue;
                }
                let policy = *current.lock().expect("recorder lock");
                match policy {
                    Some(AckPolicy::Immediately) => sub.ack(seq).await?,
                    Some(AckPolicy::After(delay)) => {
                        tokio::time::sleep(delay).await;
                        sub.ack(seq).await?;
                    }
                    Some(AckPolicy::Never) | None => {}
                }
            }
            Ok(())
        });
        Ok(EventRecorder {
            events,
            policy,
            task,
        })
    }

    /// Changes how it answers from the next synchronous event on. A synchronous subscriber
    /// cannot leave a COLO session cleanly (the relay fails the next barrier: a daemon that
    /// vanished may hold state COLO depends on), so a test that is done with a slow subscriber
    /// makes it fast instead.
    pub fn set_policy(&self, policy: AckPolicy) {
        *self.policy.lock().expect("recorder lock") = Some(policy);
    }

    /// Every event so far, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("recorder lock").clone()
    }

    /// The events of one kind so far.
    pub fn of_kind(&self, kind: EventKind) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.event == kind)
            .collect()
    }

    /// Disconnects.
    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

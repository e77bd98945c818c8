//! The daemon's event log: a bounded ring for `GET /v1/events` and a broadcast for
//! followers. Events are what an operator reads after an incident, so every reconcile
//! action, readiness change, crash and rejected manifest lands here, never env values.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use clusterd_core::event::EventKind;
use tokio::sync::broadcast;

use crate::api_types::Event;

const KEEP: usize = 2000;

/// Shared between the reconcile loop (writer) and the API (readers).
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Mutex<Ring>>,
    tx: broadcast::Sender<Event>,
}

struct Ring {
    seq: u64,
    events: VecDeque<Event>,
}

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        EventLog {
            inner: Arc::new(Mutex::new(Ring {
                seq: 0,
                events: VecDeque::new(),
            })),
            tx,
        }
    }

    /// Records an event and mirrors it to the daemon's own log.
    pub fn push(&self, app: Option<&str>, instance: Option<u32>, kind: EventKind, message: String) {
        tracing::info!(
            app = app.unwrap_or("-"),
            instance,
            kind = kind.as_str(),
            "{message}"
        );
        let mut ring = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.seq += 1;
        let event = Event {
            seq: ring.seq,
            // Milliseconds: the events of one reload happen within the same second, and
            // their order matters after an incident.
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            app: app.map(str::to_string),
            instance,
            kind,
            message,
        };
        if ring.events.len() == KEEP {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        let _ = self.tx.send(event);
    }

    /// Everything kept, oldest first.
    pub fn snapshot(&self) -> Vec<Event> {
        let ring = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.events.iter().cloned().collect()
    }

    /// A receiver of future events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// RFC 3339 in UTC with second precision (status times, as DESIGN.md shows them).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

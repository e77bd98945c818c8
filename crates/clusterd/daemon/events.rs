//! The daemon's event log: a bounded ring for `GET /v1/events` and a broadcast for
//! followers. Events are what an operator reads after an incident, so every reconcile
//! action, readiness change, crash and rejected manifest lands here, never env values.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
    pub fn push(&self, app: Option<&str>, instance: Option<u32>, kind: &str, message: String) {
        tracing::info!(app = app.unwrap_or("-"), instance, kind, "{message}");
        let mut ring = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.seq += 1;
        let event = Event {
            seq: ring.seq,
            time: rfc3339_millis(SystemTime::now()),
            app: app.map(str::to_string),
            instance,
            kind: kind.to_string(),
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

/// RFC 3339 in UTC with second precision (status: start times).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RFC 3339 in UTC with millisecond precision (event times): a rollout's drain, signal
/// and exit happen within one second, and an operator reading events after an incident
/// needs their order and the gaps between them.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{rfc3339_millis, EventLog};

    #[test]
    fn event_times_have_millisecond_resolution() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_601_200_123);
        assert_eq!(rfc3339_millis(t), "2025-12-01T15:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_764_601_200);
        assert_eq!(rfc3339_millis(t), "2025-12-01T15:00:00.000Z");
        let log = EventLog::new();
        log.push(Some("web"), Some(0), "spawn", "pid 1".into());
        let time = &log.snapshot()[0].time;
        assert_eq!(time.len(), "2025-12-01T15:00:00.000Z".len(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    }
}

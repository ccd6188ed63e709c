use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Liveness and readiness of a service, as its loop reports them.
///
/// Live: the loop called [`Health::beat`] within the liveness timeout (a
/// loop stuck in a call that never returns stops beating). Ready: the
/// service said so with [`Health::set_ready`] and has not taken it back
/// with [`Health::set_not_ready`]; a service starts not ready.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the last beat.
    last_beat: AtomicU64,
    live_timeout_ms: AtomicU64,
    /// `None` when ready, else why not.
    not_ready: Mutex<Option<String>>,
}

impl Health {
    pub(crate) fn new() -> Self {
        Health {
            started: Instant::now(),
            last_beat: AtomicU64::new(0),
            live_timeout_ms: AtomicU64::new(60_000),
            not_ready: Mutex::new(Some("starting".into())),
        }
    }

    /// How long the loop may go without a beat before it is reported dead.
    pub fn set_live_timeout(&self, timeout: Duration) {
        self.live_timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn beat(&self) {
        self.last_beat.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    pub fn set_ready(&self) {
        *self.lock() = None;
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
    }

    /// Ok, or how long ago the last beat was.
    pub fn live(&self) -> Result<(), String> {
        let silent = self.elapsed_ms().saturating_sub(self.last_beat.load(Ordering::Relaxed));
        if silent <= self.live_timeout_ms.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(format!("no progress of the service loop for {silent} ms"))
        }
    }

    /// Ok when live and ready, else the reason.
    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        match self.lock().as_ref() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.not_ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_live_but_not_ready_and_dies_without_beats() {
        let h = Health::new();
        h.beat();
        assert!(h.live().is_ok());
        assert_eq!(h.ready(), Err("starting".into()));
        h.set_ready();
        assert!(h.ready().is_ok());
        h.set_not_ready("restoring state");
        assert_eq!(h.ready(), Err("restoring state".into()));
        h.set_ready();
        h.set_live_timeout(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.live().is_err());
        assert!(h.ready().is_err(), "a dead service is not ready");
        h.beat();
        assert!(h.ready().is_ok());
    }
}

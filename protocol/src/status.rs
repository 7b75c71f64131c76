//! The presence status model (ported from claude-intercom, §4.5 of the contract).
//!
//! A status comes from one of three sources ranked `hook` > `manual` > `inferred`. A
//! lower-ranked source cannot overwrite a fresher, higher-ranked one. `working` decays to
//! `idle` after a TTL, whoever set it, as in the reference broker: hooks miss `Stop`
//! events and agents forget to reset a manual `working`, and a peer stuck in `working`
//! silently stops receiving `next` messages. `dnd` never decays.

use crate::routing::Status;

/// Who last set a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusSource {
    /// Inferred by the broker (initial state, TTL decay). The reference calls it `jsonl`.
    Inferred,
    /// A `set_status` frame from the peer.
    Manual,
    /// A Claude Code hook (`POST /hook/set-status`).
    Hook,
}

impl StatusSource {
    /// The reference's spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inferred => "jsonl",
            Self::Manual => "manual",
            Self::Hook => "hook",
        }
    }
}

/// Status, its source, and when it was last confirmed (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusState {
    /// Current status.
    pub status: Status,
    /// Who set it.
    pub source: StatusSource,
    /// Last write or confirmation, in ms since the epoch.
    pub updated_at: i64,
}

impl StatusState {
    /// A new presence starts `idle`, inferred.
    pub const fn new(now: i64) -> Self {
        Self {
            status: Status::Idle,
            source: StatusSource::Inferred,
            updated_at: now,
        }
    }

    /// Applies a status report. Returns `true` when the status value changed.
    ///
    /// `fresh_window_ms` is how long a higher-ranked source keeps priority over a
    /// lower-ranked one reporting the same status (the reference uses 30 s).
    /// Hooks cannot change `dnd`: only the peer itself can clear it.
    pub fn write(
        &mut self,
        status: Status,
        source: StatusSource,
        now: i64,
        fresh_window_ms: i64,
    ) -> bool {
        if source == StatusSource::Hook && self.status == Status::Dnd {
            return false;
        }
        if status != self.status {
            *self = Self {
                status,
                source,
                updated_at: now,
            };
            return true;
        }
        let fresh = now - self.updated_at <= fresh_window_ms;
        if source >= self.source || !fresh {
            self.source = source;
        }
        self.updated_at = now;
        false
    }

    /// Decays a `working` not confirmed for `ttl_ms` to `idle`.
    /// Returns `true` when it did, so the caller can release held messages.
    pub fn expire(&mut self, now: i64, ttl_ms: i64) -> bool {
        if self.status == Status::Working && now - self.updated_at > ttl_ms {
            *self = Self {
                status: Status::Idle,
                source: StatusSource::Inferred,
                updated_at: now,
            };
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH: i64 = 30_000;

    #[test]
    fn change_is_always_written() {
        let mut s = StatusState::new(0);
        assert!(s.write(Status::Working, StatusSource::Manual, 10, FRESH));
        assert_eq!(
            (s.status, s.source, s.updated_at),
            (Status::Working, StatusSource::Manual, 10)
        );
    }

    #[test]
    fn lower_source_does_not_downgrade_a_fresh_higher_one() {
        let mut s = StatusState::new(0);
        s.write(Status::Working, StatusSource::Hook, 0, FRESH);
        assert!(!s.write(Status::Working, StatusSource::Manual, 1_000, FRESH));
        assert_eq!(s.source, StatusSource::Hook);
        // …but does once the hook report is stale.
        s.write(Status::Working, StatusSource::Manual, 40_000, FRESH);
        assert_eq!(s.source, StatusSource::Manual);
    }

    #[test]
    fn hooks_cannot_clear_dnd() {
        let mut s = StatusState::new(0);
        s.write(Status::Dnd, StatusSource::Manual, 0, FRESH);
        assert!(!s.write(Status::Idle, StatusSource::Hook, 1, FRESH));
        assert_eq!(s.status, Status::Dnd);
        assert!(s.write(Status::Idle, StatusSource::Manual, 2, FRESH));
    }

    #[test]
    fn working_decays_dnd_does_not() {
        for source in [StatusSource::Hook, StatusSource::Manual] {
            let mut s = StatusState::new(0);
            s.write(Status::Working, source, 0, FRESH);
            assert!(!s.expire(59_000, 60_000));
            // Re-confirming refreshes the clock.
            s.write(Status::Working, source, 50_000, FRESH);
            assert!(!s.expire(100_000, 60_000));
            assert!(s.expire(111_000, 60_000));
            assert_eq!(s.status, Status::Idle);
        }
        let mut dnd = StatusState::new(0);
        dnd.write(Status::Dnd, StatusSource::Manual, 0, FRESH);
        assert!(!dnd.expire(10_000_000, 60_000));
        assert_eq!(dnd.status, Status::Dnd);
    }
}

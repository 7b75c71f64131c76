//! Simulation clocks: one per mesh, in memory, as the reference keeps them. A running
//! clock ticks every `60 s / speed` of real time; each tick adds a simulated minute and
//! pushes a `system`/`tick` event to every connection of the mesh (the setter too). A
//! clock pauses by itself when the last peer of its mesh leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_protocol::broker::ClockStatus;
use meshd_protocol::time::iso8601_ms;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::system_push;
use crate::hub::{MeshHub, lock};
use crate::time::now_ms;

/// A simulated minute.
const SIM_STEP_MS: i64 = 60_000;

#[derive(Debug)]
struct Clock {
    speed: u32,
    paused: bool,
    tick: u64,
    sim_ms: i64,
    started_at: i64,
    /// The last change: (when, by which broker); a peer's older change is ignored.
    changed: (i64, String),
    /// Stops the running ticker (a new one replaces it on every speed change).
    ticker: Option<CancellationToken>,
}

impl Clock {
    fn status(&self, req_id: Option<String>) -> ClockStatus {
        ClockStatus {
            speed: self.speed,
            paused: self.paused,
            tick: self.tick,
            sim_time: iso8601_ms(self.sim_ms),
            started_at: iso8601_ms(self.started_at),
            req_id,
        }
    }

    fn to_set(&self, mesh_id: &str) -> meshd_protocol::fed::ClockSet {
        meshd_protocol::fed::ClockSet {
            mesh_id: mesh_id.to_owned(),
            speed: self.speed,
            paused: self.paused,
            tick: self.tick,
            sim_ms: self.sim_ms,
            started_at: self.started_at,
            changed_at: self.changed.0,
            broker: self.changed.1.clone(),
        }
    }

    fn stop_ticker(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.cancel();
        }
    }
}

/// A change's time: now, but after the change it supersedes even if a peer's clock ran
/// ahead (so a newer change here is never taken for an older one).
fn next_change(prev: &(i64, String), now: i64) -> i64 {
    now.max(prev.0.saturating_add(1))
}

/// Latest a peer's change time may be ahead of ours, and the range of simulated time.
const MAX_AHEAD_MS: i64 = 5 * 60_000;
const MAX_SIM_MS: i64 = 100 * 366 * 86_400_000;

/// Every mesh's clock. In a mesh shared across brokers each broker runs the ticker for
/// its own peers; changes (`set_clock`, pause, resume, auto-pause) go to the other
/// brokers and the newest change wins, so every broker's peers see one clock.
#[derive(Debug, Default)]
pub(crate) struct Clocks {
    clocks: Arc<Mutex<HashMap<String, Clock>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// This broker's name (ties between changes made in the same millisecond).
    broker: String,
}

impl Clocks {
    /// Clocks of a broker called `broker` (empty without federation).
    pub(crate) fn new(broker: &str) -> Self {
        Self {
            broker: broker.to_owned(),
            ..Self::default()
        }
    }

    /// The mesh's clock as a federation frame (after a change, or for a peer whose link
    /// came up).
    pub(crate) fn set_of(&self, mesh_id: &str) -> Option<meshd_protocol::fed::ClockSet> {
        lock(&self.clocks).get(mesh_id).map(|c| c.to_set(mesh_id))
    }

    /// A peer broker's change: applied if newer than ours. Times from the future (beyond
    /// a few minutes of skew) and absurd simulated times are refused.
    pub(crate) fn apply_remote(
        &self,
        mesh: &Arc<MeshHub>,
        c: meshd_protocol::fed::ClockSet,
    ) -> bool {
        let now = now_ms();
        if c.changed_at > now.saturating_add(MAX_AHEAD_MS)
            || c.sim_ms.unsigned_abs() > MAX_SIM_MS.unsigned_abs()
            || c.started_at.unsigned_abs() > MAX_SIM_MS.unsigned_abs()
        {
            return false;
        }
        let mut clocks = lock(&self.clocks);
        if let Some(ours) = clocks.get(&mesh.row.id)
            && (ours.changed.0, ours.changed.1.as_str()) >= (c.changed_at, c.broker.as_str())
        {
            return true;
        }
        let clock = clocks.entry(mesh.row.id.clone()).or_insert_with(|| Clock {
            speed: 1,
            paused: true,
            tick: 0,
            sim_ms: c.sim_ms,
            started_at: c.started_at,
            changed: (0, String::new()),
            ticker: None,
        });
        clock.speed = c.speed.clamp(1, 100);
        clock.paused = c.paused;
        clock.tick = c.tick;
        clock.sim_ms = c.sim_ms;
        clock.started_at = c.started_at;
        clock.changed = (c.changed_at, c.broker);
        if clock.paused {
            clock.stop_ticker();
        } else {
            self.start(mesh, clock);
        }
        true
    }

    /// `set_clock`: creates the clock (simulated time starts at the real time) or
    /// changes its speed; restarts the ticker unless paused.
    pub(crate) fn set(
        &self,
        mesh: &Arc<MeshHub>,
        speed: u32,
        req_id: Option<String>,
    ) -> ClockStatus {
        let now = now_ms();
        let mut clocks = lock(&self.clocks);
        let clock = clocks.entry(mesh.row.id.clone()).or_insert_with(|| Clock {
            speed,
            paused: false,
            tick: 0,
            sim_ms: now,
            started_at: now,
            changed: (now, self.broker.clone()),
            ticker: None,
        });
        clock.speed = speed.clamp(1, 100);
        clock.changed = (next_change(&clock.changed, now), self.broker.clone());
        if !clock.paused {
            self.start(mesh, clock);
        }
        clock.status(req_id)
    }

    /// `pause_clock`; `None` when the mesh has no clock.
    pub(crate) fn pause(&self, mesh_id: &str, req_id: Option<String>) -> Option<ClockStatus> {
        let mut clocks = lock(&self.clocks);
        let clock = clocks.get_mut(mesh_id)?;
        clock.paused = true;
        clock.changed = (next_change(&clock.changed, now_ms()), self.broker.clone());
        clock.stop_ticker();
        Some(clock.status(req_id))
    }

    /// `resume_clock`; `None` when the mesh has no clock.
    pub(crate) fn resume(
        &self,
        mesh: &Arc<MeshHub>,
        req_id: Option<String>,
    ) -> Option<ClockStatus> {
        let mut clocks = lock(&self.clocks);
        let clock = clocks.get_mut(&mesh.row.id)?;
        if clock.paused {
            clock.paused = false;
            clock.changed = (next_change(&clock.changed, now_ms()), self.broker.clone());
            self.start(mesh, clock);
        }
        Some(clock.status(req_id))
    }

    /// `get_clock`: the status, or a stopped clock at the current time.
    pub(crate) fn get(&self, mesh_id: &str, req_id: Option<String>) -> ClockStatus {
        match lock(&self.clocks).get(mesh_id) {
            Some(c) => c.status(req_id),
            None => {
                let now = now_ms();
                ClockStatus {
                    speed: 0,
                    paused: true,
                    tick: 0,
                    sim_time: iso8601_ms(now),
                    started_at: iso8601_ms(now),
                    req_id,
                }
            }
        }
    }

    /// The last peer of the mesh left: its clock pauses. Returns whether it was
    /// running (the change then goes to the mesh's other brokers).
    pub(crate) fn mesh_emptied(&self, mesh_id: &str) -> bool {
        match lock(&self.clocks).get_mut(mesh_id) {
            Some(c) if !c.paused => {
                c.paused = true;
                c.changed = (next_change(&c.changed, now_ms()), self.broker.clone());
                c.stop_ticker();
                true
            }
            _ => false,
        }
    }

    /// Stops every ticker (shutdown).
    pub(crate) async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn start(&self, mesh: &Arc<MeshHub>, clock: &mut Clock) {
        clock.stop_ticker();
        let token = self.stop.child_token();
        clock.ticker = Some(token.clone());
        let period = Duration::from_millis(60_000 / u64::from(clock.speed.max(1)));
        let clocks = self.clocks.clone();
        let mesh = mesh.clone();
        self.tasks.spawn(async move {
            let mut interval = tokio::time::interval_at(crate::time::instant() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = interval.tick() => {}
                }
                let (tick, sim_ms, speed) = {
                    let mut clocks = lock(&clocks);
                    let Some(c) = clocks.get_mut(&mesh.row.id) else {
                        return;
                    };
                    if c.paused || token.is_cancelled() {
                        return;
                    }
                    c.tick += 1;
                    c.sim_ms = c.sim_ms.saturating_add(SIM_STEP_MS);
                    (c.tick, c.sim_ms, c.speed)
                };
                let mut data = serde_json::Map::new();
                data.insert("tick".into(), tick.into());
                data.insert("simTime".into(), iso8601_ms(sim_ms).into());
                data.insert("speed".into(), speed.into());
                let frame = system_push(&mesh.row.id, "tick", data, now_ms());
                // Everyone in the mesh, the clock's setter included.
                mesh.announce(&frame, 0, None);
            }
        });
    }
}

//! Scheduled messages and reminders: schedule, list, cancel (`engine` fires them).

pub mod cron;

pub mod engine;

pub mod store;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::broker::BrokerFrame;
use meshd_protocol::client::ClientFrame;
use meshd_protocol::{Priority, TargetSpec};

use crate::hub::DirectRoute;
use crate::session::*;

impl Session {
    /// `schedule`, `list_scheduled`, `cancel_scheduled`. A schedule belongs to the
    /// member (any of its sessions lists and cancels it) and fires as that member
    /// whether or not this session is still connected (see `reminders`).
    pub(crate) fn on_schedule(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        now: i64,
    ) -> Option<Utf8Bytes> {
        use crate::features::schedule::store::ScheduleRow;
        use meshd_protocol::broker::{
            CancelScheduledAck, ScheduledAck, ScheduledEntry, ScheduledList,
        };
        /// Furthest ahead a one-shot may be set.
        const MAX_AHEAD_MS: i64 = 10 * 366 * 24 * 3_600_000;
        let db = self.ctx.db.clone();
        let mesh_id = self.mesh_id().to_owned();
        let member_id = self.member_id.clone();
        let ctx = self.ctx.clone();
        match frame {
            ClientFrame::Schedule(s) => {
                if s.message.is_empty() {
                    return error("invalid_schedule", "a schedule needs a message", req_id);
                }
                let max = crate::features::schedule::store::MAX_TEXT_BYTES;
                if s.message.len() > max {
                    return error(
                        "invalid_schedule",
                        format!("message too large: {} bytes (max {max})", s.message.len()),
                        req_id,
                    );
                }
                match TargetSpec::parse(&s.to) {
                    Ok(TargetSpec::Broadcast | TargetSpec::Group(_)) => {}
                    Ok(TargetSpec::Direct(pk)) => {
                        match self
                            .mesh
                            .route_direct(&pk.to_hex(), Priority::Now, self.conn)
                        {
                            DirectRoute::Unknown => {
                                return error(
                                    "invalid_schedule",
                                    format!(
                                        "no member or session of this mesh has the key {}",
                                        pk.to_hex()
                                    ),
                                    req_id,
                                );
                            }
                            DirectRoute::Revoked => {
                                return error(
                                    "invalid_schedule",
                                    "the recipient was removed from this mesh",
                                    req_id,
                                );
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {
                        return error(
                            "invalid_schedule",
                            "schedule a member or session key, @group or *",
                            req_id,
                        );
                    }
                    Err(e) => {
                        return error("invalid_schedule", format!("invalid to: {e}"), req_id);
                    }
                }
                let next_at = match &s.cron {
                    Some(c) => {
                        match crate::features::schedule::cron::first_fire(
                            c,
                            now,
                            &self.ctx.config.schedule.timezone,
                        ) {
                            Ok(t) => t,
                            Err(e) => return error("invalid_cron", e.to_string(), req_id),
                        }
                    }
                    None if s.deliver_at <= 0 => {
                        return error(
                            "invalid_schedule",
                            "a one-shot schedule needs deliverAt (epoch ms)",
                            req_id,
                        );
                    }
                    None if s.deliver_at > now.saturating_add(MAX_AHEAD_MS) => {
                        return error(
                            "invalid_schedule",
                            "deliverAt is more than 10 years ahead",
                            req_id,
                        );
                    }
                    // A time in the past fires at once.
                    None => s.deliver_at,
                };
                let row = ScheduleRow {
                    id: crate::ids::uuid_v4(),
                    mesh_id,
                    member_id,
                    member_pubkey: self.member_pubkey.clone(),
                    sender_pubkey: self.routing_key().to_owned(),
                    sender_name: self.display_name.clone(),
                    target_spec: s.to,
                    message: s.message,
                    cron: s.cron,
                    subtype: s.reminder.then(|| "reminder".to_owned()),
                    next_at: Some(next_at),
                    fired_count: 0,
                    created_at: now,
                };
                self.reply_later(async move {
                    let weight = i64::try_from(row.message.len()).unwrap_or(i64::MAX);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Schedules,
                        &row.mesh_id,
                        &row.member_id,
                        crate::quota::Usage::new(1, weight),
                    ) {
                        return error(crate::quota::QuotaExceeded::CODE, e.to_string(), req_id);
                    }
                    match db.insert_schedule(&row).await {
                        Ok(true) => {
                            ctx.reminders.changed();
                            crate::features::dashboard::touched(&ctx, &row.mesh_id, "schedules");
                            Some(
                                BrokerFrame::ScheduledAck(ScheduledAck {
                                    scheduled_id: row.id,
                                    deliver_at: next_at,
                                    cron: row.cron,
                                    req_id,
                                })
                                .to_json()
                                .into(),
                            )
                        }
                        Ok(false) => error(
                            "schedules_full",
                            format!(
                                "at most {} pending schedules per member",
                                crate::features::schedule::store::MAX_PENDING_PER_MEMBER
                            ),
                            req_id,
                        ),
                        Err(e) => store_unavailable("storing a schedule", req_id, &e),
                    }
                });
            }
            ClientFrame::ListScheduled => {
                self.reply_later(async move {
                    match db.pending_schedules(&mesh_id, &member_id).await {
                        Ok(rows) => Some(
                            BrokerFrame::ScheduledList(ScheduledList {
                                messages: rows
                                    .into_iter()
                                    .map(|r| ScheduledEntry {
                                        fired_count: r.cron.is_some().then_some(r.fired_count),
                                        id: r.id,
                                        to: r.target_spec,
                                        message: r.message,
                                        deliver_at: r.next_at.unwrap_or_default(),
                                        created_at: r.created_at,
                                        cron: r.cron,
                                    })
                                    .collect(),
                                req_id,
                            })
                            .to_json()
                            .into(),
                        ),
                        Err(e) => store_unavailable("listing schedules", req_id, &e),
                    }
                });
            }
            ClientFrame::CancelScheduled { scheduled_id } => {
                self.reply_later(async move {
                    match db
                        .cancel_schedule(&mesh_id, &member_id, &scheduled_id)
                        .await
                    {
                        Ok(ok) => {
                            if ok {
                                ctx.reminders.changed();
                                crate::features::dashboard::touched(&ctx, &mesh_id, "schedules");
                            }
                            Some(
                                BrokerFrame::CancelScheduledAck(CancelScheduledAck {
                                    scheduled_id,
                                    ok,
                                    req_id,
                                })
                                .to_json()
                                .into(),
                            )
                        }
                        Err(e) => store_unavailable("cancelling a schedule", req_id, &e),
                    }
                });
            }
            _ => {}
        }
        None
    }
}

//! The skills catalogue: share, get, list, remove.

pub mod store;

use meshd_protocol::broker::{BrokerFrame, ErrorFrame};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::time::iso8601_ms;

use crate::session::*;

impl Session {
    /// The skills catalogue: stored per mesh, replicated to the mesh's other brokers.
    pub(crate) fn queue_skill(&mut self, frame: ClientFrame, req_id: Option<String>, now: i64) {
        use meshd_protocol::broker::{Skill, SkillAck, SkillData, SkillList, SkillSummary};
        let db = self.ctx.db.clone();
        let ctx = self.ctx.clone();
        let member_id = self.member_id.clone();
        let fed = self.ctx.fed.clone();
        let mesh_id = self.mesh_id().to_owned();
        let author = self.display_name.clone();
        self.reply_later(async move {
            let failed = |req_id, e: &dyn std::fmt::Display| {
                store_unavailable("skills catalogue", req_id, e)
            };
            let reply = match frame {
                ClientFrame::ShareSkill(s) => {
                    let existing = match db.skill(&mesh_id, &s.name).await {
                        Ok(e) => e,
                        Err(e) => return failed(req_id, &e),
                    };
                    let replacing = existing.is_some();
                    let row = crate::features::skills::store::SkillRow {
                        mesh_id,
                        name: s.name.trim().to_owned(),
                        description: s.description,
                        instructions: s.instructions,
                        tags: serde_json::to_string(&s.tags).unwrap_or_else(|_| "[]".into()),
                        author,
                        created_at: existing.map_or(now, |e| e.created_at),
                        updated_at: now,
                    };
                    let weight = i64::try_from(
                        row.instructions.len() + row.description.len() + row.tags.len(),
                    )
                    .unwrap_or(i64::MAX);
                    let new_rows = i64::from(!replacing);
                    if let Err(e) = crate::quota::check(
                        &ctx,
                        crate::quota::Kind::Skills,
                        &row.mesh_id,
                        &member_id,
                        crate::quota::Usage::new(new_rows, weight),
                    ) {
                        return Some(
                            BrokerFrame::Error(
                                ErrorFrame::new(crate::quota::QuotaExceeded::CODE, e.to_string())
                                    .with_req_id(req_id),
                            )
                            .to_json()
                            .into(),
                        );
                    }
                    match db.put_skill(&row, Some(&member_id)).await {
                        Ok(_) => crate::features::dashboard::touched(&ctx, &row.mesh_id, "skills"),
                        Err(crate::features::skills::store::SkillError::Full) => {
                            return Some(
                                BrokerFrame::Error(
                                    ErrorFrame::new(
                                        "skills_full",
                                        "the mesh's skills catalogue is full; remove a skill first",
                                    )
                                    .with_req_id(req_id),
                                )
                                .to_json()
                                .into(),
                            );
                        }
                        Err(e) => return failed(req_id, &e),
                    }
                    let name = row.name.clone();
                    if let Some(fed) = &fed {
                        fed.skill_changed(skill_set(row, false));
                    }
                    BrokerFrame::SkillAck(SkillAck {
                        name,
                        action: "shared",
                        req_id,
                    })
                }
                ClientFrame::GetSkill { name } => match db.skill(&mesh_id, &name).await {
                    Ok(row) => BrokerFrame::SkillData(SkillData {
                        skill: row.map(|r| Skill {
                            tags: r.tag_list(),
                            name: r.name,
                            description: r.description,
                            instructions: r.instructions,
                            author: r.author,
                            created_at: iso8601_ms(r.created_at),
                        }),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                ClientFrame::ListSkills { query } => match db.skills(&mesh_id).await {
                    Ok(rows) => BrokerFrame::SkillList(SkillList {
                        skills: rows
                            .into_iter()
                            .filter(|r| {
                                query
                                    .as_deref()
                                    .is_none_or(|q| crate::features::skills::store::matches(r, q))
                            })
                            .map(|r| SkillSummary {
                                tags: r.tag_list(),
                                name: r.name,
                                description: r.description,
                                author: r.author,
                                created_at: iso8601_ms(r.created_at),
                            })
                            .collect(),
                        req_id,
                    }),
                    Err(e) => return failed(req_id, &e),
                },
                ClientFrame::RemoveSkill { name } => {
                    match db.delete_skill(&mesh_id, &name, now).await {
                        Ok(author) => {
                            let removed = author.is_some();
                            crate::features::dashboard::touched(&ctx, &mesh_id, "skills");
                            if let Some(author) = author {
                                crate::quota::recount_member(
                                    &ctx,
                                    crate::quota::Kind::Skills,
                                    &mesh_id,
                                    &author,
                                )
                                .await;
                            }
                            if removed && let Some(fed) = &fed {
                                fed.skill_changed(skill_removal(&mesh_id, &name, now));
                            }
                            BrokerFrame::SkillAck(SkillAck {
                                name,
                                action: if removed { "removed" } else { "not_found" },
                                req_id,
                            })
                        }
                        Err(e) => return failed(req_id, &e),
                    }
                }
                _ => return None,
            };
            Some(reply.to_json().into())
        });
    }
}

pub(crate) use replication::*;

/// Replication across brokers: applying a peer's change, and this broker's part of a
/// link's catch-up.
mod replication {

    use meshd_protocol::fed::{RejectReason, SkillSet};

    use tracing::warn;

    use crate::Ctx;

    use crate::fed::*;
    use meshd_protocol::fed::Frame;

    /// A skill removal, as a federation frame.
    pub(crate) fn skill_removal(mesh_id: &str, name: &str, at: i64) -> SkillSet {
        SkillSet {
            mesh_id: mesh_id.to_owned(),
            name: name.to_owned(),
            description: String::new(),
            instructions: String::new(),
            tags: Vec::new(),
            author: String::new(),
            created_at: at,
            updated_at: at,
            removed: true,
        }
    }

    /// A stored skill as a federation frame.
    pub(crate) fn skill_set(
        row: crate::features::skills::store::SkillRow,
        removed: bool,
    ) -> SkillSet {
        let tags = row.tag_list();
        SkillSet {
            mesh_id: row.mesh_id,
            name: row.name,
            description: row.description,
            instructions: row.instructions,
            tags,
            author: row.author,
            created_at: row.created_at,
            updated_at: row.updated_at,
            removed,
        }
    }

    /// Applies a peer's skill write or removal (newest wins), within the local limits.
    pub(crate) async fn apply_skill(
        ctx: &Ctx,
        link: &LinkShared,
        s: SkillSet,
    ) -> Result<(), RejectReason> {
        use meshd_protocol::client::{
            MAX_GROUPS, MAX_NAME_LEN, MAX_SKILL_INSTRUCTIONS, MAX_SUMMARY_LEN,
        };
        if !link.accepts(&s.mesh_id) {
            return Err(RejectReason::NotShared);
        }
        if s.name.trim().is_empty()
            || s.name.len() > MAX_NAME_LEN
            || s.description.len() > MAX_SUMMARY_LEN
            || s.instructions.len() > MAX_SKILL_INSTRUCTIONS
            || s.tags.len() > MAX_GROUPS
            || s.tags.iter().any(|t| t.len() > MAX_NAME_LEN)
            || s.author.len() > MAX_NAME_LEN
        {
            return Err(RejectReason::Invalid);
        }
        let result = if s.removed {
            ctx.db
                .delete_skill(&s.mesh_id, &s.name, s.updated_at)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            let row = crate::features::skills::store::SkillRow {
                mesh_id: s.mesh_id,
                name: s.name,
                description: s.description,
                instructions: s.instructions,
                tags: serde_json::to_string(&s.tags).unwrap_or_else(|_| "[]".into()),
                author: s.author,
                created_at: s.created_at,
                updated_at: s.updated_at,
            };
            ctx.db
                .put_skill(&row, None)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        if let Err(e) = result {
            warn!(cause = %e, "storing a peer's skill");
            return Err(RejectReason::Invalid);
        }
        Ok(())
    }

    /// Catch-up: the mesh's skills.
    pub(crate) async fn catch_up(c: &CatchUp<'_>) -> bool {
        let rows = c.ctx.db.skills(c.mesh_id()).await;
        c.send_rows("skills", rows, |row| {
            Some(Frame::Skill(Box::new(skill_set(row, false))))
        })
        .await
    }
}

/// Telling the mesh's other brokers of a change made here.
impl crate::fed::Fed {
    /// A skill was shared or removed here.
    pub(crate) fn skill_changed(&self, set: meshd_protocol::fed::SkillSet) {
        let mesh_id = set.mesh_id.clone();
        self.to_every_link(&mesh_id, meshd_protocol::fed::Frame::Skill(Box::new(set)));
    }
}

//! The one place a `push` frame is built, and the one ack-lease rule.

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::Priority;
use meshd_protocol::broker::{BrokerFrame, Push};
use meshd_protocol::time::iso8601_ms;

use super::{Body, Envelope};
use crate::store::writer::ClaimedRow;

/// When a row pushed `now` is offered again: after the ack lease for a client that
/// acknowledges (`client_ack`), never (`i64::MAX`: delivered once written) for any other.
pub(crate) fn lease_until(ack_lease: Duration, acks: bool, now: i64) -> i64 {
    if acks {
        now.saturating_add(i64::try_from(ack_lease.as_millis()).unwrap_or(i64::MAX))
    } else {
        i64::MAX
    }
}

/// The `subtype` a push may carry (anything else a peer sends is left out).
pub(crate) fn known_subtype(s: &str) -> Option<&'static str> {
    match s {
        "reminder" => Some("reminder"),
        "system" => Some("system"),
        "webhook" => Some("webhook"),
        _ => None,
    }
}

/// The `targetSpec` a push shows: only a multicast target's (`*`, `@group`, `tag:…`),
/// and not for events or reminders (their target is the recipient).
fn multicast_spec(spec: &str, subtype: Option<&'static str>) -> Option<String> {
    (subtype.is_none() && (spec == "*" || spec.starts_with('@') || spec.starts_with("tag:")))
        .then(|| spec.to_owned())
}

/// Who a push is from, as clients see it.
struct From<'a> {
    pubkey: String,
    member: Option<(&'a str, &'a str, &'a str)>,
}

/// Builds the frame. `nonce`/`ciphertext` are moved in and handed back, so a large body
/// is serialized without a copy.
#[allow(clippy::too_many_arguments)]
fn frame(
    message_id: String,
    mesh_id: &str,
    from: From<'_>,
    priority: Priority,
    body: (&mut String, &mut String),
    created_at: i64,
    subtype: Option<&'static str>,
    event: Option<(Cow<'static, str>, Box<serde_json::value::RawValue>)>,
    client_message_id: Option<String>,
    tags: Vec<String>,
    bridged: Option<meshd_protocol::broker::Bridged>,
    topic: Option<&crate::features::topics::PostFields>,
    target_spec: &str,
) -> Utf8Bytes {
    let (event, event_data) = event.map_or((None, None), |(e, d)| (Some(e), Some(d)));
    let push = BrokerFrame::Push(Push {
        message_id,
        mesh_id: mesh_id.to_owned(),
        sender_pubkey: from.pubkey,
        priority: priority.as_str(),
        nonce: std::mem::take(body.0),
        ciphertext: std::mem::take(body.1),
        created_at: iso8601_ms(created_at),
        subtype,
        event,
        event_data,
        sender_member_pubkey: from.member.map(|m| m.0.to_owned()),
        sender_member_id: from.member.map(|m| m.1.to_owned()),
        sender_name: from.member.map(|m| m.2.to_owned()),
        client_message_id,
        tags,
        bridged,
        target_spec: multicast_spec(target_spec, subtype),
        topic: topic.map(|t| {
            Box::new(meshd_protocol::broker::TopicPush {
                topic: t.topic_name.clone(),
                topic_id: t.topic_id.clone(),
                reply_to_id: t.reply_to_id.clone(),
                body_version: t.body_version.unwrap_or(1),
            })
        }),
    });
    let text = Utf8Bytes::from(push.to_json());
    if let BrokerFrame::Push(p) = push {
        *body.0 = p.nonce;
        *body.1 = p.ciphertext;
    }
    text
}

impl Envelope {
    /// The push this envelope is delivered as.
    pub(crate) fn frame(&mut self) -> Utf8Bytes {
        let from = From {
            pubkey: self.sender_pubkey.clone(),
            member: self.author.as_ref().map(|a| {
                (
                    a.member_pubkey.as_str(),
                    a.member_id.as_str(),
                    a.name.as_str(),
                )
            }),
        };
        let subtype = self.subtype.as_deref().and_then(known_subtype);
        let (mut none_n, mut none_c) = (String::new(), String::new());
        let (body, event) = match &mut self.body {
            Body::Sealed { nonce, ciphertext } => ((nonce, ciphertext), None),
            Body::Event { name, data } => (
                (&mut none_n, &mut none_c),
                Some((Cow::Owned(name.clone()), data.clone())),
            ),
        };
        frame(
            self.id.clone(),
            &self.mesh.row.id,
            from,
            self.priority,
            body,
            self.created_at,
            subtype,
            event,
            self.client_message_id.clone(),
            self.tags.clone(),
            self.bridged.clone(),
            self.topic.as_deref(),
            &self.target_spec,
        )
    }
}

/// The push of a stored message handed to a drain.
pub(crate) fn stored(mesh_id: &str, mut row: ClaimedRow) -> Utf8Bytes {
    let from = From {
        pubkey: std::mem::take(&mut row.sender_pubkey),
        member: Some((
            row.sender_member_pubkey.as_str(),
            row.sender_member_id.as_str(),
            row.sender_name.as_str(),
        )),
    };
    let priority = Priority::from_rank(row.priority).unwrap_or(Priority::Next);
    frame(
        row.id.clone(),
        mesh_id,
        from,
        priority,
        (&mut row.nonce, &mut row.ciphertext),
        row.created_at,
        row.subtype.as_deref().and_then(known_subtype),
        None,
        row.client_message_id.take(),
        crate::features::tags::from_column(row.tags.as_deref()),
        row.bridged
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok()),
        None,
        &row.target_spec,
    )
}

/// A `system` push about a peer or the mesh (`peer_joined`, `tick`, …).
pub(crate) fn system(
    mesh_id: &str,
    event: &'static str,
    data: serde_json::Map<String, serde_json::Value>,
    now: i64,
) -> Utf8Bytes {
    // Serializing a map of JSON values cannot fail; `{}` keeps the frame well formed.
    let data = serde_json::value::to_raw_value(&data).unwrap_or_else(|_| {
        serde_json::value::RawValue::from_string("{}".to_owned()).unwrap_or_default()
    });
    let (mut n, mut c) = (String::new(), String::new());
    frame(
        crate::ids::uuid_v4(),
        mesh_id,
        From {
            pubkey: "system".to_owned(),
            member: None,
        },
        Priority::Low,
        (&mut n, &mut c),
        now,
        Some("system"),
        Some((Cow::Borrowed(event), data)),
        None,
        Vec::new(),
        None,
        None,
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_finite_only_for_clients_that_acknowledge() {
        let lease = Duration::from_secs(30);
        assert_eq!(lease_until(lease, true, 1_000), 31_000);
        assert_eq!(lease_until(lease, false, 1_000), i64::MAX);
        assert_eq!(lease_until(lease, true, i64::MAX - 5), i64::MAX);
    }

    #[test]
    fn a_stored_push_keeps_its_body_and_drops_unknown_subtypes() {
        let row = ClaimedRow {
            seq: 1,
            id: "m1".into(),
            sender_pubkey: "ab".into(),
            sender_member_pubkey: "cd".into(),
            sender_member_id: "mem".into(),
            sender_name: "alice".into(),
            priority: Priority::Now.rank(),
            nonce: "bm9uY2U=".into(),
            ciphertext: "Y2lwaGVy".into(),
            subtype: Some("made-up".into()),
            client_message_id: Some("c1".into()),
            created_at: 0,
            tags: Some("ops sales/emea".into()),
            bridged: None,
            target_spec: "@ops".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&stored("mesh", row)).unwrap();
        assert_eq!(v["type"], "push");
        assert_eq!(v["messageId"], "m1");
        assert_eq!(v["priority"], "now");
        assert_eq!(v["nonce"], "bm9uY2U=");
        assert_eq!(v["ciphertext"], "Y2lwaGVy");
        assert_eq!(v["senderPubkey"], "ab");
        assert_eq!(v["senderMemberPubkey"], "cd");
        assert_eq!(v["client_message_id"], "c1");
        assert_eq!(v["targetSpec"], "@ops");
        assert!(v.get("subtype").is_none());
        assert_eq!(v["tags"], serde_json::json!(["ops", "sales/emea"]));
    }

    #[test]
    fn a_system_push_names_its_event() {
        let mut data = serde_json::Map::new();
        data.insert("name".into(), "bob".into());
        let v: serde_json::Value =
            serde_json::from_str(&system("mesh", "peer_joined", data, 0)).unwrap();
        assert_eq!(v["subtype"], "system");
        assert_eq!(v["event"], "peer_joined");
        assert_eq!(v["eventData"]["name"], "bob");
        assert_eq!(v["priority"], "low");
        assert!(v.get("senderMemberPubkey").is_none());
    }
}

//! Tags (meshd extension): labels on messages, subscriptions on presences.
//!
//! - `send` may carry `tags` (at most [`MAX_TAGS`], the target's tag counted); a
//!   `tag:NAME` target reaches every visible peer subscribed to NAME, on this broker and
//!   on the brokers the mesh spans (a multicast: live, like `@group`).
//! - `subscribe_tags` / `unsubscribe_tags` change the presence's subscriptions (at most
//!   [`MAX_SUBSCRIPTIONS`]), answered with `tag_subscriptions`. They travel with the
//!   presence to peer brokers and are kept for a returning member like its groups.
//! - Tags ride on the push, in `message_status` and on federated frames; they are
//!   stored space-separated (the tag alphabet has no space).
//!
//! Routing by tag lives where all routing does: `hub::MeshHub::fan_out` and
//! `delivery`.

use axum::extract::ws::Utf8Bytes;
use meshd_protocol::TargetSpec;
use meshd_protocol::broker::{BrokerFrame, TagSubscriptions};
use meshd_protocol::client::ClientFrame;
use meshd_protocol::tags::{MAX_SUBSCRIPTIONS, MAX_TAGS, TagError, normalize};

use crate::session::*;

// The stored form (space-separated) belongs to the store layer.
pub(crate) use crate::store::{tags_from_column as from_column, tags_to_column as to_column};

/// The tags of a message sent to `target` with `tags`: a `tag:NAME` target's NAME
/// first, then the rest in order, without duplicates.
///
/// # Errors
/// [`TagError`] for a malformed tag or too many.
pub(crate) fn of_message(target: &TargetSpec, tags: Vec<String>) -> Result<Vec<String>, TagError> {
    let mut all = Vec::with_capacity(tags.len() + 1);
    if let TargetSpec::Tag(t) = target {
        all.push(t.clone());
    }
    all.extend(tags);
    normalize(all, MAX_TAGS)
}

/// Tags a peer broker sent with a message or a presence: well formed and within
/// `max`, or refused.
pub(crate) fn from_peer(tags: Vec<String>, max: usize) -> Option<Vec<String>> {
    normalize(tags, max).ok()
}

/// Adds `add` to `subs` (in order, without duplicates) up to [`MAX_SUBSCRIPTIONS`].
///
/// # Errors
/// [`TagError::TooMany`], with nothing changed.
fn subscribe(subs: &mut Vec<String>, add: Vec<String>) -> Result<(), TagError> {
    let mut next = subs.clone();
    for t in add {
        if !next.contains(&t) {
            next.push(t);
        }
    }
    if next.len() > MAX_SUBSCRIPTIONS {
        return Err(TagError::TooMany {
            count: next.len(),
            max: MAX_SUBSCRIPTIONS,
        });
    }
    *subs = next;
    Ok(())
}

impl Session {
    /// `subscribe_tags` / `unsubscribe_tags`.
    pub(crate) fn on_tags(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
    ) -> Option<Utf8Bytes> {
        let result = self.mesh.update_peer(self.conn, |p| {
            match frame {
                ClientFrame::SubscribeTags { tags } => subscribe(&mut p.tags, tags)?,
                ClientFrame::UnsubscribeTags { tags } => p.tags.retain(|t| !tags.contains(t)),
                _ => {}
            }
            Ok::<_, TagError>(p.tags.clone())
        })?;
        Some(match result {
            Ok(tags) => {
                self.presence_changed();
                BrokerFrame::TagSubscriptions(TagSubscriptions { tags, req_id })
                    .to_json()
                    .into()
            }
            Err(e) => BrokerFrame::Error(
                meshd_protocol::broker::ErrorFrame::new("too_many_tags", e.to_string())
                    .with_req_id(req_id),
            )
            .to_json()
            .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_stored_form_round_trips_and_drops_garbage() {
        assert_eq!(to_column(&[]), None);
        let tags = v(&["ops", "sales/emea"]);
        assert_eq!(from_column(to_column(&tags).as_deref()), tags);
        assert_eq!(from_column(Some("ops  bad,tag x")), v(&["ops", "x"]));
        assert!(from_column(None).is_empty());
    }

    #[test]
    fn a_tag_target_is_the_first_tag_and_counts_against_the_limit() {
        let t = TargetSpec::Tag("ops".into());
        assert_eq!(of_message(&t, v(&["x", "ops"])).unwrap(), v(&["ops", "x"]));
        let eight: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        assert!(of_message(&TargetSpec::Broadcast, eight.clone()).is_ok());
        assert_eq!(
            of_message(&t, eight),
            Err(TagError::TooMany { count: 9, max: 8 })
        );
        assert!(matches!(
            of_message(&TargetSpec::Broadcast, v(&["no space"])),
            Err(TagError::Invalid(_))
        ));
    }

    #[test]
    fn subscriptions_are_bounded_and_unchanged_when_refused() {
        let mut subs = v(&["a"]);
        subscribe(&mut subs, v(&["b", "a"])).unwrap();
        assert_eq!(subs, v(&["a", "b"]));
        let many: Vec<String> = (0..MAX_SUBSCRIPTIONS).map(|i| format!("t{i}")).collect();
        assert!(subscribe(&mut subs, many).is_err());
        assert_eq!(subs, v(&["a", "b"]));
    }
}

//! Topics (HEAD addendum §1): named conversations of a mesh with a durable history,
//! subscribers, read cursors and an optional per-topic key. The frames, their replies,
//! the body and mention rules, and the name rule for new topics.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Longest description accepted.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most messages one history page returns.
pub const MAX_PAGE: i64 = 200;
/// Default history page.
pub const DEFAULT_PAGE: i64 = 50;
/// Most mention tokens kept per post.
pub const MAX_MENTIONS: usize = 16;
/// Longest mention token.
pub const MAX_MENTION_LEN: usize = 64;

/// `public`, `private` or `dm`: labels, as in the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Listed to everyone.
    Public,
    /// Listed, but meant for its members.
    Private,
    /// A conversation between two members.
    Dm,
}

impl Visibility {
    /// Stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
            Self::Dm => "dm",
        }
    }

    /// Parses the stored spelling (unknown reads as public).
    pub fn parse(s: &str) -> Self {
        match s {
            "private" => Self::Private,
            "dm" => Self::Dm,
            _ => Self::Public,
        }
    }
}

/// A member's role in a topic: a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicRole {
    /// Created it (or was made lead).
    Lead,
    /// Subscribed.
    Member,
    /// Reads along.
    Observer,
}

impl TopicRole {
    /// Stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Lead => "lead",
            Self::Member => "member",
            Self::Observer => "observer",
        }
    }

    /// Parses the stored spelling (unknown reads as member).
    pub fn parse(s: &str) -> Self {
        match s {
            "lead" => Self::Lead,
            "observer" => Self::Observer,
            _ => Self::Member,
        }
    }
}

/// Normalizes a name given for a new topic: `#` stripped, trimmed, lowercased.
///
/// # Errors
/// Names outside `^[a-z0-9][a-z0-9-]{0,49}$` (the reference web app's rule, which meshd
/// applies everywhere: REST addresses topics by name in a URL path).
pub fn normalize_name(raw: &str) -> Result<String, String> {
    let n = raw.trim().trim_start_matches('#').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 50
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(n)
    } else {
        Err(format!(
            "invalid topic name {raw:?}: 1-50 lowercase letters, digits and dashes, starting with a letter or digit"
        ))
    }
}

/// Whether a string may be a topic id (tried as an id before a name, as the reference
/// does).
pub fn looks_like_id(s: &str) -> bool {
    s.len() >= 20
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The mention tokens of a post: the explicit list if it has any (lowercased, `@`
/// stripped), otherwise `@name` tokens of a v1 body's text. At most [`MAX_MENTIONS`],
/// distinct, each 1–[`MAX_MENTION_LEN`] characters.
pub fn mention_tokens(
    explicit: Option<&[String]>,
    body_version: i64,
    ciphertext: &str,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |t: &str| {
        let t = t.trim().trim_start_matches('@').to_lowercase();
        if !t.is_empty()
            && t.chars().count() <= MAX_MENTION_LEN
            && !out.contains(&t)
            && out.len() < MAX_MENTIONS
        {
            out.push(t);
        }
    };
    match explicit {
        Some(list) if !list.is_empty() => list.iter().for_each(|t| push(t)),
        _ if body_version == 1 => {
            let Some(text) = v1_text(ciphertext) else {
                return out;
            };
            let name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            let chars: Vec<char> = text.chars().collect();
            let mut i = 0;
            while i < chars.len() {
                if chars[i] == '@' && (i == 0 || !name(chars[i - 1])) {
                    let end = chars[i + 1..]
                        .iter()
                        .position(|c| !name(*c))
                        .map_or(chars.len(), |p| i + 1 + p);
                    let len = end - i - 1;
                    if (1..=MAX_MENTION_LEN).contains(&len) {
                        push(&chars[i + 1..end].iter().collect::<String>());
                    }
                    i = end;
                } else {
                    i += 1;
                }
            }
        }
        _ => {}
    }
    out
}

/// The text of a v1 body (base64 of UTF-8), if it decodes.
pub fn v1_text(ciphertext: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(ciphertext)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A topic request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `topic_create`.
    Create {
        /// Name as sent.
        name: String,
        /// Description.
        description: Option<String>,
        /// Visibility.
        visibility: Visibility,
    },
    /// `topic_list`.
    List,
    /// `topic_join` (no reply on success).
    Join {
        /// Id or name.
        topic: String,
        /// Role.
        role: TopicRole,
    },
    /// `topic_leave` (no reply on success).
    Leave {
        /// Id or name.
        topic: String,
    },
    /// `topic_members`.
    Members {
        /// Id or name.
        topic: String,
    },
    /// `topic_history`.
    History {
        /// Id or name.
        topic: String,
        /// Page size, 1..=200.
        limit: i64,
        /// Strictly older than this message.
        before_id: Option<String>,
    },
    /// `topic_mark_read` (no reply).
    MarkRead {
        /// Id or name.
        topic: String,
    },
}

impl Request {
    /// Whether the reference answers it on success (join, leave and mark-read are
    /// fire-and-forget; their errors are answered only when they carry `_reqId`).
    pub const fn answered(&self) -> bool {
        !matches!(
            self,
            Self::Join { .. } | Self::Leave { .. } | Self::MarkRead { .. }
        )
    }
}

/// Decodes the body of a topic frame of type `kind`.
///
/// # Errors
/// A missing name or topic, an oversized description.
pub fn decode(kind: &str, text: &str) -> Result<Request, serde_json::Error> {
    use serde::de::Error as _;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        visibility: Option<Visibility>,
        #[serde(default)]
        topic: Option<String>,
        #[serde(default)]
        role: Option<TopicRole>,
        #[serde(default)]
        limit: Option<f64>,
        #[serde(default)]
        before_id: Option<String>,
    }
    let b: Body = serde_json::from_str(text)?;
    let topic = || {
        b.topic
            .clone()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| serde_json::Error::custom("topic required"))
    };
    Ok(match kind {
        "topic_create" => {
            let name = b
                .name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .ok_or_else(|| serde_json::Error::custom("name required"))?;
            if b.description
                .as_ref()
                .is_some_and(|d| d.len() > MAX_DESCRIPTION_LEN)
            {
                return Err(serde_json::Error::custom(format!(
                    "description is at most {MAX_DESCRIPTION_LEN} bytes"
                )));
            }
            Request::Create {
                name,
                description: b.description.clone().filter(|d| !d.is_empty()),
                visibility: b.visibility.unwrap_or(Visibility::Public),
            }
        }
        "topic_join" => Request::Join {
            topic: topic()?,
            role: b.role.unwrap_or(TopicRole::Member),
        },
        "topic_leave" => Request::Leave { topic: topic()? },
        "topic_members" => Request::Members { topic: topic()? },
        "topic_history" => Request::History {
            topic: topic()?,
            // Finite by JSON; clamped, so the cast cannot misbehave.
            #[allow(clippy::cast_possible_truncation)]
            limit: b
                .limit
                .map_or(DEFAULT_PAGE, |l| (l as i64).clamp(1, MAX_PAGE)),
            before_id: b.before_id.clone().filter(|i| !i.is_empty()),
        },
        "topic_mark_read" => Request::MarkRead { topic: topic()? },
        _ => Request::List,
    })
}

/// A topic as `topic_created` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TopicRef {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Visibility.
    pub visibility: Visibility,
}

/// One topic of `topic_list_response`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicEntry {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Visibility.
    pub visibility: Visibility,
    /// Subscribed members.
    pub member_count: usize,
    /// ISO creation time.
    pub created_at: String,
}

/// One member of `topic_members_response`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicMemberEntry {
    /// Member id.
    pub member_id: String,
    /// Member key.
    pub pubkey: String,
    /// Display name.
    pub display_name: String,
    /// Role in the topic.
    pub role: TopicRole,
    /// ISO subscription time.
    pub joined_at: String,
    /// ISO read cursor.
    pub last_read_at: Option<String>,
}

/// One message of `topic_history_response`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    /// Topic message id.
    pub id: String,
    /// Session key of the sender if it had one, else its member key.
    pub sender_pubkey: String,
    /// Sender member id.
    pub sender_member_id: String,
    /// Sender display name.
    pub sender_name: String,
    /// Nonce, base64.
    pub nonce: String,
    /// Body, base64.
    pub ciphertext: String,
    /// 1 or 2.
    pub body_version: i64,
    /// The message it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_id: Option<String>,
    /// ISO time.
    pub created_at: String,
}

/// A topic reply.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `topic_create`.
    TopicCreated {
        /// The topic (name and visibility as requested, like the reference).
        topic: TopicRef,
        /// Whether it was new.
        created: bool,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `topic_list`.
    TopicListResponse {
        /// Topics by name.
        topics: Vec<TopicEntry>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `topic_members`.
    TopicMembersResponse {
        /// The topic as asked for.
        topic: String,
        /// Members by display name.
        members: Vec<TopicMemberEntry>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
    /// Answer to `topic_history`.
    TopicHistoryResponse {
        /// The topic as asked for.
        topic: String,
        /// Newest first.
        messages: Vec<HistoryMessage>,
        /// Correlation id.
        #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
        req_id: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn names_follow_the_web_rule() {
        assert_eq!(
            normalize_name(" #Deploys ").ok().as_deref(),
            Some("deploys")
        );
        assert_eq!(normalize_name("ops-2").ok().as_deref(), Some("ops-2"));
        for bad in ["", "#", "-x", "a b", "café", &"x".repeat(51)] {
            assert!(normalize_name(bad).is_err(), "{bad}");
        }
        assert!(looks_like_id("AbCdEfGhIjKlMnOpQrStUvWx"));
        assert!(!looks_like_id("general"));
    }

    #[test]
    fn mentions_come_from_the_list_or_a_v1_body() {
        let list = vec!["@Ann".to_owned(), "ann".to_owned(), " bo ".to_owned()];
        assert_eq!(mention_tokens(Some(&list), 2, ""), ["ann", "bo"]);
        let body = b64("hi @Ann and @bo-2, mail x@y.z, @@, @ann again");
        assert_eq!(mention_tokens(None, 1, &body), ["ann", "bo-2"]);
        assert_eq!(mention_tokens(Some(&[]), 1, &body), ["ann", "bo-2"]);
        assert!(
            mention_tokens(None, 2, &body).is_empty(),
            "v2 bodies are opaque"
        );
        let many: String = (0..40).map(|i| format!("@u{i} ")).collect();
        assert_eq!(mention_tokens(None, 1, &b64(&many)).len(), MAX_MENTIONS);
    }

    #[test]
    fn frames_decode() {
        assert_eq!(
            decode("topic_history", r#"{"topic":"general","limit":999}"#).ok(),
            Some(Request::History {
                topic: "general".into(),
                limit: MAX_PAGE,
                before_id: None
            })
        );
        assert!(decode("topic_join", "{}").is_err());
        assert!(decode("topic_create", r#"{"name":"x","visibility":"secret"}"#).is_err());
        assert!(!Request::MarkRead { topic: "t".into() }.answered());
    }
}

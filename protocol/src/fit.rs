//! Every reply fits: a list answer larger than the reply budget is cut down instead of
//! being written whole (which would overrun the connection's write buffer and drop the
//! client who merely asked — the list's size is other members' doing).
//!
//! [`fit_reply`] works on the serialized frame, so it covers every list frame without a
//! per-frame rule, and costs nothing for replies within the budget (most of them). In
//! order, until the reply fits:
//! 1. long text fields of list items ([`TEXT_FIELDS`]) are cut to [`ITEM_TEXT_CAP`]
//!    bytes, and the item gets `"truncated": ["field", …]` (the whole text is a
//!    `get_task`, `get_memory`, `get_skill` or `get_state` away);
//! 2. trailing items are left out, and the reply gets `"truncated": true` and
//!    `"omitted": N` (old clients ignore both);
//! 3. a reply that is still too large (no list to cut) becomes an `error` with code
//!    `reply_too_large` and the request's `_reqId`.

use serde_json::{Map, Value};

/// Text fields of list items that may be shortened in a list.
pub const TEXT_FIELDS: &[&str] = &[
    "result",
    "content",
    "instructions",
    "summary",
    "description",
    "message",
    "title",
];

/// What a shortened text field keeps, in bytes.
pub const ITEM_TEXT_CAP: usize = 4 * 1024;

/// The list fields of list replies (exactly one per list frame).
const LIST_FIELDS: &[&str] = &[
    "peers", "entries", "skills", "tasks", "memories", "contexts", "streams", "webhooks",
    "messages", "servers", "files", "accesses",
];

/// `None` when `text` (a reply's JSON) is within `budget` bytes; otherwise the reply cut
/// down to fit (see the module docs).
pub fn fit_reply(text: &str, budget: usize) -> Option<String> {
    if text.len() <= budget {
        return None;
    }
    let Ok(Value::Object(mut frame)) = serde_json::from_str::<Value>(text) else {
        return Some(too_large(None, text.len(), budget));
    };
    let Some(field) = LIST_FIELDS
        .iter()
        .find(|f| frame.get(**f).is_some_and(Value::is_array))
    else {
        return Some(too_large(req_id(&frame), text.len(), budget));
    };
    let mut items = match frame.remove(*field) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    };
    // 1. Shorten long texts of the items.
    for item in &mut items {
        if let Value::Object(o) = item {
            shorten(o);
        }
    }
    // 2. Leave out trailing items until the reply fits.
    let total = items.len();
    let fits = |frame: &Map<String, Value>, items: &[Value]| {
        let mut f = frame.clone();
        f.insert((*field).to_owned(), Value::Array(items.to_vec()));
        if items.len() < total {
            f.insert("truncated".into(), Value::Bool(true));
            f.insert("omitted".into(), Value::from(total - items.len()));
        }
        let s = serde_json::to_string(&f).unwrap_or_default();
        (s.len() <= budget).then_some(s)
    };
    if let Some(s) = fits(&frame, &items) {
        return Some(s);
    }
    // The largest prefix that fits (size grows with the prefix).
    let (mut lo, mut hi) = (0, items.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(&frame, &items[..mid]).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    match fits(&frame, &items[..lo]) {
        Some(s) => Some(s),
        None => Some(too_large(req_id(&frame), text.len(), budget)),
    }
}

fn shorten(item: &mut Map<String, Value>) {
    let mut cut = Vec::new();
    for field in TEXT_FIELDS {
        if let Some(Value::String(s)) = item.get_mut(*field)
            && s.len() > ITEM_TEXT_CAP
        {
            let mut end = ITEM_TEXT_CAP;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            cut.push(Value::from(*field));
        }
    }
    if !cut.is_empty() {
        item.insert("truncated".into(), Value::Array(cut));
    }
}

fn req_id(frame: &Map<String, Value>) -> Option<String> {
    frame
        .get("_reqId")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn too_large(req_id: Option<String>, len: usize, budget: usize) -> String {
    crate::broker::BrokerFrame::Error(
        crate::broker::ErrorFrame::new(
            "reply_too_large",
            format!("the answer ({len} bytes) exceeds what one reply may carry ({budget} bytes)"),
        )
        .with_req_id(req_id),
    )
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_within_the_budget_are_untouched() {
        assert_eq!(fit_reply(r#"{"type":"task_list","tasks":[]}"#, 1000), None);
    }

    #[test]
    fn long_texts_are_shortened_first() {
        let tasks: Vec<Value> = (0..5)
            .map(|i| json!({"id": format!("t{i}"), "title": "x", "result": "r".repeat(10_000)}))
            .collect();
        let text = json!({"type": "task_list", "tasks": tasks, "_reqId": "q"}).to_string();
        let out: Value = serde_json::from_str(&fit_reply(&text, 30_000).unwrap()).unwrap();
        let tasks = out["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 5, "nothing left out: shortening was enough");
        assert!(out.get("truncated").is_none());
        for t in tasks {
            assert_eq!(t["result"].as_str().unwrap().len(), ITEM_TEXT_CAP);
            assert_eq!(t["truncated"], json!(["result"]));
        }
        assert_eq!(out["_reqId"], "q");
    }

    #[test]
    fn trailing_items_are_left_out_when_needed() {
        let entries: Vec<Value> = (0..100)
            .map(|i| json!({"key": format!("k{i}"), "value": {"blob": "v".repeat(1000)}}))
            .collect();
        let text = json!({"type": "state_list", "entries": entries, "_reqId": "q"}).to_string();
        let out = fit_reply(&text, 20_000).unwrap();
        assert!(out.len() <= 20_000);
        let v: Value = serde_json::from_str(&out).unwrap();
        let kept = v["entries"].as_array().unwrap();
        assert!(!kept.is_empty() && kept.len() < 100);
        assert_eq!(kept[0]["key"], "k0", "the first items are kept, in order");
        assert_eq!(
            (v["truncated"].as_bool(), v["omitted"].as_u64()),
            (Some(true), Some(100 - kept.len() as u64))
        );
        // The largest prefix: one more item would not fit.
        let mut bigger = v.clone();
        bigger["entries"]
            .as_array_mut()
            .unwrap()
            .push(json!({"key": "k", "value": {"blob": "v".repeat(1000)}}));
        assert!(bigger.to_string().len() > 20_000 - 100);
    }

    #[test]
    fn what_cannot_be_cut_becomes_an_error_with_the_req_id() {
        let text =
            json!({"type": "state_result", "key": "k", "value": "v".repeat(5000), "_reqId": "r7"})
                .to_string();
        let v: Value = serde_json::from_str(&fit_reply(&text, 1000).unwrap()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str(), v["_reqId"].as_str()),
            (Some("error"), Some("reply_too_large"), Some("r7"))
        );
        // Multi-byte text is cut on a character boundary.
        let text = json!({"type": "memory_results", "memories": [{"id": "m", "content": "é".repeat(5000)}]}).to_string();
        let v: Value = serde_json::from_str(&fit_reply(&text, 6000).unwrap()).unwrap();
        assert!(
            v["memories"][0]["content"]
                .as_str()
                .unwrap()
                .chars()
                .all(|c| c == 'é')
        );
    }
}

//! Property-based fuzzing of everything a client or a peer broker can make this crate
//! parse: client frames, the handshake machine, federation frames, invites, target
//! specs, the reply fitter. The properties are "never panics, always answers" plus
//! round trips where there is one. `MESHD_FUZZ_CASES` sets the cases per property
//! (CI raises it for a longer run; the default keeps `cargo test` quick).

use proptest::prelude::*;
use proptest::test_runner::Config;

use crate::client::{self, KNOWN};
use crate::{fed, fit, invite, routing, session};

fn cases() -> u32 {
    std::env::var("MESHD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// JSON values a hostile client might send, nested a few levels.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        text(40).prop_map(serde_json::Value::from),
        // Strings that look like the keys and ids clients send.
        "[0-9a-f]{64}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of real frames, and others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("_reqId".to_owned()),
        Just("id".to_owned()),
        Just("targetSpec".to_owned()),
        Just("ciphertext".to_owned()),
        Just("nonce".to_owned()),
        Just("priority".to_owned()),
        Just("key".to_owned()),
        Just("value".to_owned()),
        Just("name".to_owned()),
        Just("meshId".to_owned()),
        Just("pubkey".to_owned()),
        Just("timestamp".to_owned()),
        Just("signature".to_owned()),
        Just("status".to_owned()),
        Just("query".to_owned()),
        Just("tools".to_owned()),
        Just("content".to_owned()),
        Just("taskId".to_owned()),
        text(12),
    ]
}

/// A client frame: a known type (or not) with fields of any shape.
fn client_frame() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        (0..KNOWN.len()).prop_map(|i| KNOWN[i].0.to_owned()),
        text(20),
    ];
    (
        kind,
        proptest::collection::btree_map(field_name(), json_value(), 0..8),
    )
        .prop_map(|(kind, fields)| {
            let mut o: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
            o.insert("type".into(), kind.into());
            serde_json::Value::Object(o).to_string()
        })
}

proptest! {
    #![proptest_config(Config { cases: cases(), ..Config::default() })]

    /// Any text is decoded or refused with a reason; never a panic.
    #[test]
    fn client_decode_takes_any_text(t in text(400)) {
        let _ = client::decode(&t);
    }

    /// Frames of every known type with fields of any shape: decoded or refused, and a
    /// refusal of an awaited frame keeps its correlation id.
    #[test]
    fn client_decode_takes_any_fields(f in client_frame()) {
        match client::decode(&f) {
            Ok(_) => {}
            Err(client::DecodeError::Invalid { req_id, .. }) => {
                let v: serde_json::Value = serde_json::from_str(&f).unwrap_or_default();
                prop_assert_eq!(req_id.as_deref(), v["_reqId"].as_str());
            }
            Err(_) => {}
        }
    }

    /// The handshake machine takes any sequence of frames in any phase.
    #[test]
    fn session_machine_takes_any_sequence(frames in proptest::collection::vec(client_frame(), 0..12), accept_at in 0usize..12) {
        let mut s = session::ClientMachine::new(0, 10_000);
        for (i, f) in frames.iter().enumerate() {
            if i == accept_at {
                s.accepted();
            }
            let _ = s.on_text(f);
            let _ = s.poll_timeout(i64::try_from(i).unwrap_or(0) * 1_000);
        }
    }

    /// Any bytes are a federation frame or an error (allocation is bounded by the
    /// length prefix check, never by the input).
    #[test]
    fn fed_decode_takes_any_bytes(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = fed::decode(&b);
        if b.len() >= 4 {
            let _ = fed::frame_len([b[0], b[1], b[2], b[3]], 1 << 20);
        }
    }

    /// Valid frames mutated at random positions: decoded or refused, never a panic.
    #[test]
    fn fed_decode_takes_mutated_frames(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let frame = sample_frame(which);
        let mut bytes = fed::encode(&frame, 1 << 20).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fed::decode(&bytes[4..]).ok(), Some(frame));
        for (at, v) in edits {
            let n = bytes.len();
            bytes[4 + at % (n - 4)] = v;
        }
        let keep = 4 + cut % (bytes.len() - 3);
        let _ = fed::decode(&bytes[4..keep.min(bytes.len())]);
    }

    /// Invite tokens and target specs of any text: parsed or refused.
    #[test]
    fn invites_and_targets_take_any_text(t in text(300)) {
        let _ = invite::InvitePayload::from_token(&t);
        let _ = routing::TargetSpec::parse(&t);
        let _ = crate::Pubkey::parse_hex(&t);
    }

    /// Hellos of any shape are refused with a reason (their signatures cannot verify).
    #[test]
    fn hellos_of_any_shape_are_refused(fields in proptest::collection::btree_map(field_name(), json_value(), 0..10), session in any::<bool>()) {
        let mut o: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
        o.insert("type".into(), if session { "session_hello" } else { "hello" }.into());
        let text = serde_json::Value::Object(o).to_string();
        if let Ok(inbound) = client::decode(&text) {
            match inbound.frame {
                client::ClientFrame::Hello(h) => prop_assert!(crate::hello::verify_hello(&h, 0, 60_000).is_err()),
                client::ClientFrame::SessionHello(h) => prop_assert!(crate::hello::verify_session_hello(&h, 0, 60_000).is_err()),
                _ => {}
            }
        }
    }

    /// Whatever a list reply holds, the fitter's answer is within the budget (or the
    /// reply was already) and is JSON.
    #[test]
    fn fitted_replies_fit(items in proptest::collection::vec(json_value(), 0..40), budget in 64usize..4096) {
        let text = serde_json::json!({"type": "task_list", "tasks": items, "_reqId": "r"}).to_string();
        match fit::fit_reply(&text, budget) {
            None => prop_assert!(text.len() <= budget),
            Some(out) => {
                let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(out.len() <= budget || v["code"] == "reply_too_large");
                prop_assert_eq!(v["_reqId"].as_str(), Some("r"));
            }
        }
    }
}

fn sample_frame(which: usize) -> fed::Frame {
    match which {
        0 => fed::Frame::Hello(fed::Hello {
            version: fed::VERSION,
            broker: "mesh.a.test".into(),
            caps: vec!["x".into()],
            meshes: vec![fed::MeshClaim {
                mesh_id: "m".into(),
            }],
        }),
        1 => fed::Frame::Members {
            mesh_id: "m".into(),
            members: vec![fed::MemberAnn {
                member_id: "i".into(),
                pubkey: "k".repeat(64),
                display_name: "n".into(),
                role: "member".into(),
                revoked: false,
            }],
            full: true,
        },
        _ => fed::Frame::Ack { seq: 12_345 },
    }
}

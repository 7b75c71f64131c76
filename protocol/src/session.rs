//! The per-connection handshake phases, as a sans-IO state machine.
//!
//! A connection starts waiting for `hello` with a deadline (the reference had none, so
//! idle unauthenticated sockets piled up). [`ClientMachine::on_text`] classifies every inbound
//! text frame into a [`Verdict`] the driver acts on; [`ClientMachine::poll_timeout`] says when
//! the handshake deadline has passed. The driver reports the handshake's outcome with
//! [`ClientMachine::accepted`] or closes the socket.

use crate::broker::ErrorFrame;
use crate::client::{ClientFrame, DecodeError, Inbound, decode};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `hello` or `session_hello` until the deadline (ms since the epoch).
    AwaitingHello {
        /// When the connection is closed if no handshake arrived.
        deadline: i64,
    },
    /// A handshake frame is being checked; no other frame is read meanwhile.
    Authenticating {
        /// Same deadline: a handshake stuck on the store still ends.
        deadline: i64,
    },
    /// Authenticated: requests are served.
    Ready,
}

/// What the driver must do with one inbound text frame.
#[derive(Debug)]
pub enum Verdict {
    /// Run the handshake for this frame (a `hello` or `session_hello`).
    Handshake(Inbound),
    /// Serve this request.
    Request(Inbound),
    /// Send this error and keep the socket open.
    Reply(ErrorFrame),
    /// Drop the frame without answering (answering would confuse the client's
    /// FIFO correlation). The `&str` names the reason for metrics.
    Ignore(&'static str),
}

/// The protocol state of one client connection: the handshake, then the verdict on
/// every frame (see the module docs).
#[derive(Debug, Clone)]
pub struct ClientMachine {
    phase: Phase,
}

impl ClientMachine {
    /// A fresh connection accepted at `now` that must authenticate within `timeout_ms`.
    pub const fn new(now: i64, timeout_ms: i64) -> Self {
        Self {
            phase: Phase::AwaitingHello {
                deadline: now.saturating_add(timeout_ms),
            },
        }
    }

    /// Current phase.
    pub const fn phase(&self) -> Phase {
        self.phase
    }

    /// The handshake deadline, while there is one.
    pub const fn deadline(&self) -> Option<i64> {
        match self.phase {
            Phase::AwaitingHello { deadline } | Phase::Authenticating { deadline } => {
                Some(deadline)
            }
            Phase::Ready => None,
        }
    }

    /// True when the handshake deadline has passed and the connection must be closed.
    pub const fn poll_timeout(&self, now: i64) -> bool {
        match self.deadline() {
            Some(deadline) => now >= deadline,
            None => false,
        }
    }

    /// The handshake succeeded.
    pub const fn accepted(&mut self) {
        self.phase = Phase::Ready;
    }

    /// The handshake frame was refused without closing (e.g. a transient store error):
    /// wait for another one under the same deadline.
    pub const fn retry(&mut self) {
        if let Phase::Authenticating { deadline } = self.phase {
            self.phase = Phase::AwaitingHello { deadline };
        }
    }

    /// Classifies one inbound text frame.
    pub fn on_text(&mut self, text: &str) -> Verdict {
        let decoded = decode(text);
        match self.phase {
            Phase::AwaitingHello { deadline } => match decoded {
                Ok(inbound) if is_handshake(&inbound.frame) => {
                    self.phase = Phase::Authenticating { deadline };
                    Verdict::Handshake(inbound)
                }
                // Before the handshake nothing is pending on the client side, so an
                // uncorrelated error cannot be mistaken for another answer.
                Err(DecodeError::Malformed(reason)) => Verdict::Reply(ErrorFrame::new(
                    "malformed",
                    format!("frame is not valid JSON with a type: {reason}"),
                )),
                Err(DecodeError::Invalid {
                    kind: kind @ ("hello" | "session_hello"),
                    reason,
                    ..
                }) => Verdict::Reply(ErrorFrame::new(
                    "malformed",
                    format!("{kind} rejected: {reason}"),
                )),
                Ok(_) | Err(_) => {
                    Verdict::Reply(ErrorFrame::new("no_hello", "must send hello first"))
                }
            },
            Phase::Authenticating { .. } => {
                Verdict::Reply(ErrorFrame::new("no_hello", "must send hello first"))
            }
            Phase::Ready => match decoded {
                Ok(inbound) if is_handshake(&inbound.frame) => Verdict::Reply(
                    ErrorFrame::new(
                        "already_authenticated",
                        "this connection already sent hello",
                    )
                    .with_req_id(inbound.req_id),
                ),
                // The 0.7.0 CLI hands an error it cannot correlate to whichever request
                // it waits for first, so refusals go only to frames that carry `_reqId`
                // (every awaited CLI request does) or, for `send`, an `id`.
                Ok(Inbound {
                    req_id,
                    frame: ClientFrame::Unsupported { kind, awaits_reply },
                }) => {
                    if awaits_reply && req_id.is_some() {
                        Verdict::Reply(
                            ErrorFrame::new("unsupported", format!("meshd does not serve {kind}"))
                                .with_req_id(req_id),
                        )
                    } else {
                        Verdict::Ignore("unsupported")
                    }
                }
                Ok(inbound) => Verdict::Request(inbound),
                Err(DecodeError::Malformed(_)) => Verdict::Ignore("malformed"),
                // Only a frame with `_reqId` can be told it was not understood: claudemesh
                // clients hand an uncorrelated error to whichever request waits first.
                Err(DecodeError::UnknownType {
                    kind,
                    req_id: Some(req_id),
                }) => Verdict::Reply(
                    ErrorFrame::new(
                        "unknown_message_type",
                        format!("unknown message type {kind:?}"),
                    )
                    .with_req_id(Some(req_id)),
                ),
                Err(DecodeError::UnknownType { req_id: None, .. }) => Verdict::Ignore("unknown"),
                Err(DecodeError::Invalid {
                    kind,
                    req_id,
                    id,
                    reason,
                    awaits_reply,
                }) => {
                    if awaits_reply && (req_id.is_some() || id.is_some()) {
                        let mut e = match crate::client::head_invalid_code(kind) {
                            // HEAD's frames answer with their own codes and bare reasons.
                            Some(code) => ErrorFrame::new(code, reason),
                            None => {
                                ErrorFrame::new("malformed", format!("invalid {kind}: {reason}"))
                            }
                        }
                        .with_req_id(req_id);
                        e.id = id;
                        Verdict::Reply(e)
                    } else {
                        Verdict::Ignore("invalid")
                    }
                }
            },
        }
    }
}

fn is_handshake(frame: &ClientFrame) -> bool {
    matches!(frame, ClientFrame::Hello(_) | ClientFrame::SessionHello(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"{"type":"hello","meshId":"m","memberId":"u","pubkey":"aa","timestamp":1,"signature":"bb"}"#;

    fn code(v: &Verdict) -> &'static str {
        match v {
            Verdict::Reply(e) => e.code,
            Verdict::Ignore(r) => r,
            Verdict::Handshake(_) => "handshake",
            Verdict::Request(_) => "request",
        }
    }

    #[test]
    fn frames_before_hello_get_no_hello() {
        let mut s = ClientMachine::new(0, 10_000);
        let v = s.on_text(r#"{"type":"list_peers","_reqId":"r"}"#);
        assert_eq!(code(&v), "no_hello");
        // no_hello carries no _reqId (reference behaviour)
        assert!(matches!(v, Verdict::Reply(ErrorFrame { req_id: None, .. })));
        assert_eq!(code(&s.on_text("garbage")), "malformed");
        assert_eq!(
            code(&s.on_text(r#"{"type":"hello","meshId":"m"}"#)),
            "malformed"
        );
        assert!(matches!(s.phase(), Phase::AwaitingHello { .. }));
    }

    #[test]
    fn handshake_then_requests() {
        let mut s = ClientMachine::new(0, 10_000);
        assert_eq!(code(&s.on_text(HELLO)), "handshake");
        assert!(matches!(
            s.phase(),
            Phase::Authenticating { deadline: 10_000 }
        ));
        s.accepted();
        assert_eq!(code(&s.on_text(r#"{"type":"list_peers"}"#)), "request");
        assert_eq!(code(&s.on_text(HELLO)), "already_authenticated");
        assert_eq!(code(&s.on_text("{oops")), "malformed");
        assert_eq!(
            code(&s.on_text(r#"{"type":"warp","_reqId":"r9"}"#)),
            "unknown_message_type"
        );
        // Without a _reqId there is nobody to tell: silence (the CLI would hand the
        // error to an unrelated waiter).
        assert!(matches!(
            s.on_text(r#"{"type":"warp"}"#),
            Verdict::Ignore("unknown")
        ));
        assert_eq!(
            code(&s.on_text(r#"{"type":"vector_search","query":"q","_reqId":"r"}"#)),
            "unsupported"
        );
        // A served fire-and-forget frame is a request (the daemon answers nothing).
        assert_eq!(
            code(&s.on_text(r#"{"type":"publish","stream":"s"}"#)),
            "request"
        );
        // Awaited by the CLI, but without a _reqId an error could not be correlated.
        assert!(matches!(
            s.on_text(r#"{"type":"vector_search","query":"q"}"#),
            Verdict::Ignore(_)
        ));
        // Sent by the CLI without waiting: never answered.
        assert!(matches!(
            s.on_text(r#"{"type":"vector_delete","collection":"c","_reqId":"r"}"#),
            Verdict::Ignore(_)
        ));
        // set_state with a bad body gets no reply (it never gets one)
        assert_eq!(code(&s.on_text(r#"{"type":"set_state"}"#)), "invalid");
        // a bad send is answered and carries the send's id
        match s.on_text(r#"{"type":"send","id":"x1","_reqId":"r"}"#) {
            Verdict::Reply(e) => {
                assert_eq!((e.code, e.id.as_deref()), ("malformed", Some("x1")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deadline_applies_until_accepted() {
        let mut s = ClientMachine::new(1_000, 10_000);
        assert!(!s.poll_timeout(10_999));
        assert!(s.poll_timeout(11_000));
        let _ = s.on_text(HELLO);
        assert!(s.poll_timeout(11_000));
        s.retry();
        assert!(matches!(
            s.phase(),
            Phase::AwaitingHello { deadline: 11_000 }
        ));
        let _ = s.on_text(HELLO);
        s.accepted();
        assert!(!s.poll_timeout(i64::MAX));
        assert_eq!(s.deadline(), None);
    }
}

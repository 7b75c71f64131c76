//! The hold: live frames that arrived before the announcement of a member they name
//! wait here, in order and bounded.

use super::*;

/// Live frames waiting, in arrival order, for members the peer broker has not announced yet:
/// announcements travel on the messages stream, so a live frame of a member who just
/// joined can arrive first. While anything waits, every later live frame queues behind
/// it, so the live stream's order is kept. Frames are kept encoded, at most
/// [`HELD_FRAMES`] and [`HELD_BYTES`]; a frame waits at most [`HELD_FOR`] for its
/// members. Beyond these the oldest is dropped and counted as refused.
#[derive(Debug, Default)]
pub(crate) struct Held {
    pub(crate) frames: VecDeque<Waiting>,
    pub(crate) bytes: usize,
}

#[derive(Debug)]
pub(crate) struct Waiting {
    /// The encoded frame.
    pub(crate) frame: Vec<u8>,
    /// (mesh, member key) pairs not known yet; empty: it only waits for its turn.
    pub(crate) unknown: Vec<(String, String)>,
    pub(crate) until: std::time::Instant,
}

/// What [`Held::pop`] found at the front.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Popped {
    /// Its members are known (or it only waited for its turn): apply it.
    Ready(Vec<u8>),
    /// Held too long: dropped.
    Expired,
}

/// Live frames held per link.
pub(crate) const HELD_FRAMES: usize = 1024;

/// Encoded bytes of live frames held per link.
pub(crate) const HELD_BYTES: usize = 8 << 20;

/// How long a frame waits for its members' announcement (they normally follow within
/// milliseconds).
pub(crate) const HELD_FOR: Duration = Duration::from_secs(10);

/// Distinct unknown members one live frame may name (a catch-up part naming more is
/// refused; the next catch-up sends it again).
pub(crate) const HELD_UNKNOWN: usize = 64;

impl Held {
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether a frame of `len` encoded bytes fits within the bounds.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.frames.len() < HELD_FRAMES && self.bytes + len <= HELD_BYTES
    }

    /// Queues an encoded frame (the caller made room: see [`Held::fits`]).
    pub(crate) fn push(
        &mut self,
        frame: Vec<u8>,
        unknown: Vec<(String, String)>,
        now: std::time::Instant,
    ) {
        self.bytes += frame.len();
        self.frames.push_back(Waiting {
            frame,
            unknown,
            until: now + HELD_FOR,
        });
    }

    /// Drops the front frame (to make room); whether there was one.
    pub(crate) fn drop_front(&mut self) -> bool {
        self.frames.pop_front().is_some_and(|w| {
            self.bytes -= w.frame.len();
            true
        })
    }

    /// Drops everything (the stream ended); how many frames.
    pub(crate) fn clear(&mut self) -> usize {
        self.bytes = 0;
        std::mem::take(&mut self.frames).len()
    }

    /// When the front frame stops waiting for its members.
    pub(crate) fn deadline(&self) -> Option<std::time::Instant> {
        self.frames
            .front()
            .filter(|w| !w.unknown.is_empty())
            .map(|w| w.until)
    }

    /// Takes the front frame if it is ready (its members are `known` now, or it only
    /// waited for its turn) or expired; `None` while it still waits.
    pub(crate) fn pop(
        &mut self,
        now: std::time::Instant,
        known: impl Fn(&str, &str) -> bool,
    ) -> Option<Popped> {
        let front = self.frames.front_mut()?;
        front.unknown.retain(|(mesh, key)| !known(mesh, key));
        if !front.unknown.is_empty() && front.until > now {
            return None;
        }
        let w = self.frames.pop_front()?;
        self.bytes -= w.frame.len();
        Some(if w.unknown.is_empty() {
            Popped::Ready(w.frame)
        } else {
            Popped::Expired
        })
    }
}

/// The members a live frame is attributed to that the peer broker has not announced here
/// yet, as (mesh, key); `Err` when it names more than [`HELD_UNKNOWN`].
pub(crate) async fn unknown_members(
    ctx: &Ctx,
    link: &LinkShared,
    frame: &Frame,
) -> Result<Vec<(String, String)>, RejectReason> {
    let Some((mesh, keys)) = frame.attribution() else {
        return Ok(Vec::new());
    };
    if !link.accepts(mesh) {
        return Ok(Vec::new());
    }
    let Ok(Some(hub)) = ctx.hub.mesh(&ctx.db, mesh).await else {
        return Ok(Vec::new());
    };
    let mut unknown: Vec<(String, String)> = Vec::new();
    for key in keys {
        if !hub.knows(key) && !unknown.iter().any(|(_, k)| k == key) {
            if unknown.len() == HELD_UNKNOWN {
                return Err(RejectReason::ForgedSender);
            }
            unknown.push((mesh.to_owned(), key.to_owned()));
        }
    }
    Ok(unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(keys: &[&str]) -> Vec<(String, String)> {
        keys.iter()
            .map(|k| ("m".to_owned(), (*k).to_owned()))
            .collect()
    }

    #[test]
    fn held_frames_keep_their_order_and_wait_for_their_members() {
        let t0 = crate::time::std_instant();
        let mut held = Held::default();
        held.push(vec![1], unknown(&["yan"]), t0);
        // A frame behind it waits for its turn, even with nobody unknown.
        held.push(vec![2], vec![], t0);
        held.push(vec![3], unknown(&["zoe"]), t0);
        assert_eq!(held.deadline(), Some(t0 + HELD_FOR));
        assert_eq!(held.pop(t0, |_, _| false), None, "yan is not known yet");
        assert_eq!(
            held.pop(t0, |_, k| k == "yan"),
            Some(Popped::Ready(vec![1]))
        );
        assert_eq!(held.pop(t0, |_, _| false), Some(Popped::Ready(vec![2])));
        assert_eq!(held.pop(t0, |_, k| k == "yan"), None, "zoe still unknown");
        // Held too long: dropped, never applied.
        let late = t0 + HELD_FOR;
        assert_eq!(held.pop(late, |_, _| false), Some(Popped::Expired));
        assert!(held.is_empty());
        assert_eq!((held.bytes, held.deadline()), (0, None));
    }

    #[test]
    fn the_hold_is_bounded_in_frames_and_bytes() {
        let t0 = crate::time::std_instant();
        let mut held = Held::default();
        for n in 0..HELD_FRAMES {
            assert!(held.fits(8));
            held.push(vec![0; 8], unknown(&[&n.to_string()]), t0);
        }
        assert!(!held.fits(1), "frames");
        assert!(held.drop_front());
        assert!(held.fits(8));
        assert_eq!(held.clear(), HELD_FRAMES - 1);
        assert!(!held.drop_front());
        held.push(vec![0; HELD_BYTES - 1], vec![], t0);
        assert!(held.fits(1) && !held.fits(2), "bytes");
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            held.pop(later, |_, _| false).map(|p| p == Popped::Expired),
            Some(false)
        );
        assert_eq!(held.bytes, 0);
    }
}

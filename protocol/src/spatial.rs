//! Spatial visibility (meshd extension): a peer may stand at `(x, y)` and see within a
//! radius. A peer with a position sees only positioned peers within its radius (in
//! `list_peers`, presence events, and the multicasts it receives); a peer without one
//! sees every peer, as before positions existed. Distances are Euclidean, in whatever
//! unit the mesh's peers agree on.
//!
//! Across brokers, positions are presence with *interest management*: a broker sends a
//! peer's move to another broker only when a viewer there could be affected
//! ([`interested`]), or when the peer drifted more than its [`Position::slack`] from
//! what that broker last heard — so what a broker knows of a remote position is never
//! off by more than the slack, and near any viewer it is exact.

use serde::{Deserialize, Serialize};

/// Largest |x| and |y|.
pub const MAX_COORD: f64 = 1.0e6;
/// Largest visibility radius.
pub const MAX_RADIUS: f64 = 1.0e6;

/// Where a peer stands and how far it sees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// X coordinate.
    pub x: f64,
    /// Y coordinate.
    pub y: f64,
    /// Visibility radius (> 0).
    pub radius: f64,
}

impl Position {
    /// Finite, within [`MAX_COORD`], radius in `(0, MAX_RADIUS]`.
    pub fn valid(&self) -> bool {
        self.x.is_finite()
            && self.y.is_finite()
            && self.radius.is_finite()
            && self.x.abs() <= MAX_COORD
            && self.y.abs() <= MAX_COORD
            && self.radius > 0.0
            && self.radius <= MAX_RADIUS
    }

    /// Distance between the two points.
    pub fn distance(&self, other: &Self) -> f64 {
        (self.x - other.x).hypot(self.y - other.y)
    }

    /// Whether a peer at `other` is within this one's radius (boundary included).
    pub fn sees(&self, other: &Self) -> bool {
        self.distance(other) <= self.radius
    }

    /// How far this peer may drift from what another broker last heard before it must
    /// hear again (a quarter of the radius).
    pub fn slack(&self) -> f64 {
        self.radius / 4.0
    }
}

/// Whether a viewer standing at `viewer` (or nowhere) sees a peer standing at `target`
/// (or nowhere).
pub fn visible(viewer: Option<&Position>, target: Option<&Position>) -> bool {
    match viewer {
        None => true,
        Some(v) => target.is_some_and(|t| v.sees(t)),
    }
}

/// Whether a broker whose positioned viewers were last heard at `viewers` needs a
/// peer's move from `old` to `new`. Each viewer may have drifted up to its own slack
/// since, and the broker's idea of the peer is off by at most the peer's slack, so the
/// test widens each radius by both: a viewer that could see the peer before or after,
/// or could be led to by a stale position, gets the update.
pub fn interested<'a>(
    viewers: impl IntoIterator<Item = &'a Position>,
    old: Option<&Position>,
    new: &Position,
) -> bool {
    viewers.into_iter().any(|v| {
        let reach = v.radius + v.slack() + new.slack();
        let near = |p: &Position| v.distance(p) <= reach;
        near(new) || old.is_some_and(near)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f64, y: f64, radius: f64) -> Position {
        Position { x, y, radius }
    }

    #[test]
    fn bounds() {
        assert!(at(0.0, 0.0, 1.0).valid());
        assert!(at(-MAX_COORD, MAX_COORD, MAX_RADIUS).valid());
        for bad in [
            at(f64::NAN, 0.0, 1.0),
            at(0.0, f64::INFINITY, 1.0),
            at(MAX_COORD * 2.0, 0.0, 1.0),
            at(0.0, 0.0, 0.0),
            at(0.0, 0.0, -1.0),
            at(0.0, 0.0, MAX_RADIUS * 2.0),
        ] {
            assert!(!bad.valid(), "{bad:?}");
        }
    }

    #[test]
    fn a_viewer_sees_within_its_own_radius_only() {
        let (shop, street) = (at(0.0, 0.0, 10.0), at(30.0, 40.0, 100.0));
        assert!(
            street.sees(&shop) && !shop.sees(&street),
            "visibility is the viewer's"
        );
        assert!(
            at(0.0, 0.0, 5.0).sees(&at(3.0, 4.0, 1.0)),
            "boundary included"
        );
        assert!(visible(None, None) && visible(None, Some(&shop)));
        assert!(
            !visible(Some(&shop), None),
            "an unplaced peer is out of every range"
        );
        assert!(!visible(Some(&shop), Some(&street)));
        assert!(visible(Some(&street), Some(&shop)));
    }

    #[test]
    fn interest_covers_before_after_and_both_slacks() {
        let viewer = at(0.0, 0.0, 10.0); // slack 2.5
        let v = [viewer];
        let far = at(100.0, 0.0, 4.0); // slack 1
        assert!(!interested(&v, None, &far));
        assert!(interested(&v, None, &at(9.0, 0.0, 4.0)), "in range");
        assert!(
            interested(&v, None, &at(13.4, 0.0, 4.0)),
            "within 10 + 2.5 + 1"
        );
        assert!(!interested(&v, None, &at(13.6, 0.0, 4.0)));
        assert!(
            interested(&v, Some(&at(5.0, 0.0, 4.0)), &far),
            "leaving is news too"
        );
        assert!(!interested(std::iter::empty(), Some(&viewer), &viewer));
    }

    #[test]
    fn a_stale_position_never_fakes_visibility() {
        // The receiver knows the peer at `known`; it moved to `truth` without an update
        // because the broker judged no viewer interested. Then `known` (within the peer's
        // slack of the truth) must be out of every viewer's true range.
        let peer_radius = 8.0; // slack 2
        for vx in [-20.0, 0.0, 15.0] {
            let viewer_heard = at(vx, 0.0, 10.0);
            for dv in [-2.5, 0.0, 2.5] {
                let viewer_true = at(vx + dv, 0.0, 10.0);
                for tx in (-60..60).map(f64::from) {
                    let truth = at(tx, 1.0, peer_radius);
                    if interested(&[viewer_heard], None, &truth) {
                        continue;
                    }
                    for dk in [-2.0, 0.0, 2.0] {
                        let known = at(tx + dk, 1.0, peer_radius);
                        assert!(!viewer_true.sees(&truth) && !viewer_true.sees(&known));
                    }
                }
            }
        }
    }
}

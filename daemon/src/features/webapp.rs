//! The web app (`/app`): a person joins a mesh from an invite link in a browser and
//! talks with its peers. The assets live in `daemon/web/` and are compiled into the
//! binary (no Node.js or other toolchain at build time, nothing fetched at run time: it
//! works offline on a LAN). The browser keeps its own ed25519 keys and does the
//! claudemesh crypto itself (`crypto_box` with keys converted from ed25519, as the CLI),
//! with vendored, pinned libraries (`web/vendor/README.md`); the broker serves the page
//! and relays ciphertext exactly as for any client.
//!
//! Every response carries a strict Content-Security-Policy: scripts, styles and
//! connections only from this origin, no inline script or style, no framing.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use std::sync::OnceLock;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ty:literal) => {
        Asset {
            path: $path,
            content_type: $ty,
            body: include_bytes!(concat!("../../web/", $path)),
        }
    };
}

/// The app's files, by path under `/app/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("vendor/nacl-fast.min.js", "text/javascript; charset=utf-8"),
    asset!("vendor/ed2curve.min.js", "text/javascript; charset=utf-8"),
    asset!("vendor/qrcode.js", "text/javascript; charset=utf-8"),
    asset!(
        "vendor/LICENSE-qrcode-generator",
        "text/plain; charset=utf-8"
    ),
    asset!("vendor/LICENSE-tweetnacl", "text/plain; charset=utf-8"),
    asset!("vendor/LICENSE-ed2curve", "text/plain; charset=utf-8"),
    asset!("vendor/README.md", "text/plain; charset=utf-8"),
];

/// The policy of every `/app` response. `connect-src 'self'` covers the page's
/// WebSocket to `/ws` and its `fetch` of `/join` (CSP 3 lets `'self'` match `ws:`/`wss:`
/// on the same host); `img-src data:` is for generated images (QR codes).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Strong validators, computed once: a browser revalidates (`no-cache`) and gets a 304
/// until the binary changes.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32]))
            .collect()
    })
}

/// `GET /app` and `GET /app/`: the page.
pub(crate) async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /app/{*path}`: one of the embedded files.
pub(crate) async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let path = if path.is_empty() { "index.html" } else { path };
    let Some((i, asset)) = ASSETS.iter().enumerate().find(|(_, a)| a.path == path) else {
        return with_policy((StatusCode::NOT_FOUND, "not found").into_response());
    };
    let etag = &etags()[i];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    with_policy(resp)
}

fn with_policy(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// The browser link for an invite: the page at `broker_url`'s host, the token in the
/// fragment (never sent to a server, so it stays out of proxies' logs). `None` when
/// `broker_url` is not a `ws://`/`wss://` URL.
#[must_use]
pub fn invite_link(broker_url: &str, token: &str) -> Option<String> {
    let (scheme, rest) = if let Some(r) = broker_url.strip_prefix("wss://") {
        ("https", r)
    } else {
        ("http", broker_url.strip_prefix("ws://")?)
    };
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}/app/#join={token}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_links_follow_the_broker_url() {
        assert_eq!(
            invite_link("wss://mesh.example.org/ws", "abc").as_deref(),
            Some("https://mesh.example.org/app/#join=abc")
        );
        assert_eq!(
            invite_link("ws://10.0.0.5:7900/ws", "t").as_deref(),
            Some("http://10.0.0.5:7900/app/#join=t")
        );
        assert_eq!(invite_link("https://x/ws", "t"), None);
        assert_eq!(invite_link("ws:///ws", "t"), None);
    }

    #[test]
    fn every_asset_has_a_distinct_path_and_a_body() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
            assert!(
                ASSETS.iter().skip(i + 1).all(|b| b.path != a.path),
                "{} twice",
                a.path
            );
        }
        assert_eq!(etags().len(), ASSETS.len());
    }
}

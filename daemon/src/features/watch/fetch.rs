//! One bounded HTTP GET for a watch: the host is resolved here and every address it
//! resolves to must be public (unless `watch.allow_private`), the connection goes to
//! an address that was checked (a second lookup cannot rebind it), https is verified
//! against the Mozilla roots (`webpki-roots`) with the ring provider, and the whole
//! request has [`TIMEOUT`] and at most [`MAX_BODY`] bytes of body.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meshd_protocol::watch::Url;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_rustls::rustls;

/// Everything one check may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);
/// Most body bytes read (the rest is not fetched).
pub(crate) const MAX_BODY: usize = 1 << 20;
/// Most header bytes read.
const MAX_HEAD: usize = 64 * 1024;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("{0} is not a public address (watch.allow_private is off)")]
    Forbidden(IpAddr),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("no answer within {}s", TIMEOUT.as_secs())]
    Timeout,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// Whether an address is on the public internet.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// The https client configuration: the Mozilla roots, the ring provider.
fn tls_config() -> Option<Arc<rustls::ClientConfig>> {
    static CONFIG: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .ok()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
        })
        .clone()
}

/// Fetches `url`. Returns the status code and the body (at most [`MAX_BODY`] bytes).
///
/// # Errors
/// [`FetchError`].
pub(crate) async fn get(
    url: &Url,
    headers: &[(String, String)],
    allow_private: bool,
) -> Result<(u16, Vec<u8>), FetchError> {
    tokio::time::timeout(TIMEOUT, get_inner(url, headers, allow_private))
        .await
        .map_err(|_| FetchError::Timeout)?
}

async fn get_inner(
    url: &Url,
    headers: &[(String, String)],
    allow_private: bool,
) -> Result<(u16, Vec<u8>), FetchError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|_| FetchError::Resolve(url.host.clone()))?
        .collect();
    if addrs.is_empty() {
        return Err(FetchError::Resolve(url.host.clone()));
    }
    if !allow_private && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(FetchError::Forbidden(bad.ip()));
    }
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| {
        FetchError::Connect(last.unwrap_or_else(|| std::io::Error::other("no address")))
    })?;
    let host_header = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    let default_port = if url.https { 443 } else { 80 };
    let host_header = if url.port == default_port {
        host_header
    } else {
        format!("{host_header}:{}", url.port)
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: meshd-watch/{}\r\nAccept: */*\r\nConnection: close\r\n",
        url.target,
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if url.https {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| FetchError::Tls(e.to_string()))?;
        let config = tls_config().ok_or_else(|| FetchError::Tls("no TLS configuration".into()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| FetchError::Tls(e.to_string()))?;
        exchange(tls, req.as_bytes()).await
    } else {
        exchange(stream, req.as_bytes()).await
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
) -> Result<(u16, Vec<u8>), FetchError> {
    s.write_all(req).await.map_err(FetchError::Connect)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // A server that closes without TLS close_notify still sent its answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(FetchError::Connect(e)),
        };
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_HEAD + MAX_BODY {
            break;
        }
    }
    parse_response(&raw)
}

/// Parses an HTTP/1.x response read to its end: status and body (de-chunked, cut at
/// `Content-Length` and [`MAX_BODY`]).
pub(crate) fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), FetchError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .filter(|e| *e <= MAX_HEAD)
        .ok_or(FetchError::Malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| FetchError::Malformed("headers"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .filter(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or(FetchError::Malformed("status line"))?;
    let (mut chunked, mut length) = (false, None);
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let mut body = &raw[end + 4..];
    let mut out = Vec::new();
    if chunked {
        while let Some(le) = body.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&body[..le])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or(FetchError::Malformed("chunk size"))?;
            body = &body[le + 2..];
            if size == 0 || out.len() >= MAX_BODY {
                break;
            }
            let take = size.min(body.len());
            out.extend_from_slice(&body[..take]);
            body = body.get(take + 2..).unwrap_or_default();
        }
    } else {
        let n = length.unwrap_or(body.len()).min(body.len());
        out.extend_from_slice(&body[..n]);
    }
    out.truncate(MAX_BODY);
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                !is_public(private.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{private}"
            );
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111"] {
            assert!(
                is_public(public.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{public}"
            );
        }
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef");
        assert_eq!(r.ok(), Some((200, b"abc".to_vec())));
        let r = parse_response(
            b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(r.ok(), Some((503, b"abcde".to_vec())));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }
}

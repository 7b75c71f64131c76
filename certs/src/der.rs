//! The few X.509 fields webpki does not expose (subject organization, notAfter, the CA
//! flag), read with `x509-parser` (the certificates come from peers: a well-kept parser,
//! not a hand-written one), and a PEM encoder for certificates we did not generate
//! ourselves. Every reader returns `None` (or `false`) on malformed input.

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// The parsed certificate, if `cert_der` is one (and nothing follows it).
fn parse(cert_der: &[u8]) -> Option<X509Certificate<'_>> {
    match X509Certificate::from_der(cert_der) {
        Ok(([], cert)) => Some(cert),
        _ => None,
    }
}

/// The subject's organizationName (the org a CA stands for).
pub(crate) fn organization(cert_der: &[u8]) -> Option<String> {
    let cert = parse(cert_der)?;
    let org = cert.subject().iter_organization().next()?;
    org.as_str().ok().map(str::to_owned)
}

/// The end of the validity period.
pub(crate) fn not_after(cert_der: &[u8]) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(parse(cert_der)?.validity().not_after.timestamp()).ok()
}

/// Whether the certificate has basicConstraints with cA = TRUE.
pub(crate) fn is_ca(cert_der: &[u8]) -> bool {
    parse(cert_der).is_some_and(|c| c.is_ca())
}

/// Encodes DER as a PEM block with 64-character lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let mut bytes = [0u8; 3];
        bytes
            .iter_mut()
            .zip(chunk)
            .for_each(|(dst, src)| *dst = *src);
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = (n >> (18 - 6 * i)) & 63;
                b64.push(char::from(ALPHABET[index as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for (i, c) in b64.chars().enumerate() {
        if i > 0 && i % 64 == 0 {
            out.push('\n');
        }
        out.push(c);
    }
    out.push_str(&format!("\n-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn pem_round_trips_for_every_padding() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 100] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            if len == 0 {
                continue; // pki-types skips empty sections
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), der.as_slice(), "len {len}");
            assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        }
    }

    #[test]
    fn garbage_is_not_a_ca_and_has_no_org() {
        assert!(!is_ca(b"\x30\x03\x02\x01\x00"));
        assert!(organization(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(not_after(&[]).is_none());
        // Anything at all: no panic.
        let mut x: u32 = 0x1234_5678;
        for len in 0..512 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = (is_ca(&bytes), organization(&bytes), not_after(&bytes));
        }
    }
}

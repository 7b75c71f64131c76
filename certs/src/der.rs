//! The few X.509 fields webpki does not expose (subject organization, notAfter, the CA
//! flag), read with a minimal DER walker, and a PEM encoder for certificates we did not
//! generate ourselves. Every reader returns `None` on malformed input instead of panicking.

use time::{Date, Month, OffsetDateTime};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xA0;
const EXTENSIONS: u8 = 0xA3;
/// id-at-organizationName (2.5.4.10).
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0A];
/// id-ce-basicConstraints (2.5.29.19).
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1D, 0x13];

/// Splits one tag-length-value off `input`: `(tag, contents, rest)`.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (t, value, rest) if t == tag => Some((value, rest)),
        _ => None,
    }
}

/// The parts of a TBSCertificate we read (contents, without their outer tags).
struct Tbs<'a> {
    validity: &'a [u8],
    subject: &'a [u8],
    extensions: Option<&'a [u8]>,
}

fn tbs(cert_der: &[u8]) -> Option<Tbs<'_>> {
    let (cert, _) = expect(cert_der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = tlv(rest)?.2;
    }
    let (_serial, rest) = expect(rest, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, rest) = expect(rest, SEQUENCE)?;
    let (subject, rest) = expect(rest, SEQUENCE)?;
    let (_spki, mut rest) = expect(rest, SEQUENCE)?;
    let mut extensions = None;
    while let Some((tag, value, next)) = tlv(rest) {
        if tag == EXTENSIONS {
            extensions = Some(expect(value, SEQUENCE)?.0);
        }
        rest = next;
    }
    Some(Tbs {
        validity,
        subject,
        extensions,
    })
}

/// The first organizationName (O=) of the certificate's subject.
pub(crate) fn organization(cert_der: &[u8]) -> Option<String> {
    let mut rdns = tbs(cert_der)?.subject;
    while let Some((tag, set, rest)) = tlv(rdns) {
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut atvs = set;
        while let Some((tag, atv, rest)) = tlv(atvs) {
            atvs = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (oid, value) = expect(atv, OID)?;
            if oid == OID_ORGANIZATION {
                // UTF8String, PrintableString, TeletexString or IA5String.
                let (tag, text, _) = tlv(value)?;
                return match tag {
                    0x0C | 0x13 | 0x14 | 0x16 => String::from_utf8(text.to_vec()).ok(),
                    _ => None,
                };
            }
        }
    }
    None
}

/// The certificate's notAfter.
pub(crate) fn not_after(cert_der: &[u8]) -> Option<OffsetDateTime> {
    let validity = tbs(cert_der)?.validity;
    let (_not_before_tag, _, rest) = tlv(validity)?;
    let (tag, text, _) = tlv(rest)?;
    parse_time(tag, text)
}

fn parse_time(tag: u8, text: &[u8]) -> Option<OffsetDateTime> {
    let digits = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(text.get(..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        (GENERALIZED_TIME, 15) => (digits(text.get(..4)?)?, text.get(4..)?),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let field = |i: usize| -> Option<u8> { u8::try_from(digits(rest.get(i..i + 2)?)?).ok() };
    let month = Month::try_from(field(0)?).ok()?;
    let date = Date::from_calendar_date(i32::try_from(year).ok()?, month, field(2)?).ok()?;
    Some(
        date.with_hms(field(4)?, field(6)?, field(8)?)
            .ok()?
            .assume_utc(),
    )
}

/// Whether the certificate has basicConstraints with cA = TRUE.
pub(crate) fn is_ca(cert_der: &[u8]) -> bool {
    (|| {
        let mut exts = tbs(cert_der)?.extensions?;
        while let Some((tag, ext, rest)) = tlv(exts) {
            exts = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (oid, mut value) = expect(ext, OID)?;
            if oid != OID_BASIC_CONSTRAINTS {
                continue;
            }
            if value.first() == Some(&BOOLEAN) {
                value = tlv(value)?.2; // critical flag
            }
            let (octets, _) = expect(value, OCTET_STRING)?;
            let (constraints, _) = expect(octets, SEQUENCE)?;
            return Some(matches!(expect(constraints, BOOLEAN), Some(([v], _)) if *v != 0));
        }
        Some(false)
    })()
    .unwrap_or(false)
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
    fn times_parse_in_both_encodings() {
        let t = parse_time(UTC_TIME, b"491231235959Z").unwrap();
        assert_eq!(t.year(), 2049);
        let t = parse_time(UTC_TIME, b"500101000000Z").unwrap();
        assert_eq!(t.year(), 1950);
        let t = parse_time(GENERALIZED_TIME, b"20991231235958Z").unwrap();
        assert_eq!((t.year(), t.second()), (2099, 58));
        assert!(parse_time(UTC_TIME, b"4912312359Z").is_none());
        assert!(parse_time(UTC_TIME, b"491331235959Z").is_none());
    }

    #[test]
    fn garbage_is_not_a_ca_and_has_no_org() {
        assert!(!is_ca(b"\x30\x03\x02\x01\x00"));
        assert!(organization(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(not_after(&[]).is_none());
    }
}

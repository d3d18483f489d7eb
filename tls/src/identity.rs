//! Who a peer's certificate names: the client identity a node keys
//! fencing and its policy by, once the certificate passed verification.
//!
//! The identity is, in this order: the first DNS name among the
//! certificate's subject alternative names; else its first URI (a SPIFFE
//! id, say); else the common name (CN) of its subject. A certificate with
//! none of them names nobody and is refused.

use rustls::pki_types::CertificateDer;

/// The identity the end-entity certificate `cert` names (see the module
/// docs), or why it names none.
pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<String, String> {
    let cert = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    if let Some(dns) = cert.valid_dns_names().next() {
        return Ok(dns.to_owned());
    }
    if let Some(uri) = cert.valid_uri_names().next() {
        return Ok(uri.to_owned());
    }
    common_name(cert.subject())
        .filter(|cn| !cn.is_empty())
        .ok_or_else(|| {
            "the client certificate names nobody: no DNS or URI subject alternative name, no common name"
                .to_string()
        })
}

/// The identity of the client of a finished server-side handshake (its
/// first certificate is the end-entity one).
pub fn of_peer(conn: &rustls::ServerConnection) -> Result<String, String> {
    conn.peer_certificates()
        .and_then(<[_]>::first)
        .ok_or_else(|| "the client presented no certificate".to_string())
        .and_then(of_certificate)
}

/// DER: one element (tag, contents) off the front of `der`, and the rest.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The first common name in a subject (`Name` contents: a sequence of
/// sets of attribute type-and-values), as UTF-8, PrintableString or IA5.
fn common_name(mut subject: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    const STRINGS: [u8; 3] = [0x0c, 0x13, 0x16]; // UTF8String, PrintableString, IA5String
    while !subject.is_empty() {
        let (tag, mut set, rest) = element(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, rest) = element(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = element(attribute)?;
            if tag != OID || oid != CN {
                continue;
            }
            let (tag, text, _) = element(value)?;
            if !STRINGS.contains(&tag) {
                return None;
            }
            return String::from_utf8(text.to_vec()).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(DnType::OrganizationName, "netblk");
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn a_dns_name_then_a_uri_then_the_common_name() {
        let dns = SanType::DnsName("host-a.example".try_into().expect("name"));
        let uri = SanType::URI("spiffe://example/host-b".try_into().expect("uri"));
        let ip = SanType::IpAddress([10, 0, 0, 1].into());
        assert_eq!(
            of_certificate(&cert(Some("cn"), vec![uri.clone(), dns, ip.clone()])),
            Ok("host-a.example".into())
        );
        assert_eq!(
            of_certificate(&cert(Some("cn"), vec![ip.clone(), uri])),
            Ok("spiffe://example/host-b".into())
        );
        assert_eq!(
            of_certificate(&cert(Some("host-c"), vec![ip.clone()])),
            Ok("host-c".into())
        );
        let nobody = of_certificate(&cert(None, vec![ip])).expect_err("nobody");
        assert!(nobody.contains("names nobody"), "{nobody}");
    }

    #[test]
    fn a_broken_subject_names_nobody_and_never_panics() {
        assert_eq!(common_name(&[0x31, 0x05, 0x30]), None);
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x31]), None);
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = common_name(&bytes);
        }
    }
}

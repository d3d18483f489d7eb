//! Handshakes over loopback with throwaway certificates: the mutual case
//! works (and carries data through `secure`), and every kind of bad
//! certificate is refused on both sides with an error that says why.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use netblk_tls::config::{self, ClientFiles, ServerFiles};
use netblk_tls::rustls;
use netblk_tls::rustls::pki_types::pem::PemObject;
use netblk_tls::testpki::{self, Ca, Role};
use netblk_tls::{handshake, secure};

struct Setup {
    _dir: tempfile::TempDir,
    server: ServerFiles,
    client: ClientFiles,
    ca: Ca,
    dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("dir");
    let (ca_path, node, client) = testpki::standard(dir.path()).expect("pki");
    // The standard set's CA is not returned: sign extra leaves with a CA of
    // the same files by re-reading is not possible, so make a second set.
    let ca = Ca::new("extra").expect("ca");
    Setup {
        server: ServerFiles {
            cert: node.cert,
            key: node.key,
            client_ca: ca_path.clone(),
        },
        client: ClientFiles {
            ca: ca_path,
            cert: client.cert,
            key: client.key,
            danger_skip_server_name: false,
        },
        ca,
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

/// Runs a node-side handshake on one accepted connection, which the node
/// then closes cleanly; the client reads until then (in TLS 1.3 a refusal
/// of its certificate reaches it only then). Returns the client's result
/// and the node's.
fn shake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Result<(), String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let node = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut tls = handshake::server(&stream, server)?;
        tls.send_close_notify();
        tls.write_tls(&mut stream).map_err(|e| e.to_string())?;
        Ok(())
    });
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let client =
        handshake::client(&stream, client, config::server_name(addr)).and_then(|mut tls| {
            let mut byte = [0u8; 1];
            rustls::Stream::new(&mut tls, &mut stream)
                .read(&mut byte)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    (client, node.join().expect("node thread"))
}

#[test]
fn a_mutual_handshake_carries_data_both_ways() {
    let s = setup();
    let server = config::server_config(&s.server).expect("server config");
    let client = config::client_config(&s.client).expect("client config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let node = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let tls = handshake::server(&stream, server).expect("node handshake");
        let (plain, _) = secure(stream, tls.into(), false).expect("relay");
        let mut buf = [0u8; 5];
        (&plain).read_exact(&mut buf).expect("read");
        (&plain).write_all(&buf).expect("echo");
        buf
    });
    let stream = TcpStream::connect(addr).expect("connect");
    let tls = handshake::client(&stream, client, config::server_name(addr)).expect("handshake");
    let (plain, transport) = secure(stream, tls.into(), true).expect("secure");
    (&plain).write_all(b"hello").expect("write");
    let mut back = [0u8; 5];
    (&plain).read_exact(&mut back).expect("read");
    assert_eq!(&back, b"hello");
    assert_eq!(node.join().expect("node"), *b"hello");
    assert_ne!(transport, netblk_tls::Transport::Plain);
}

#[test]
fn bad_certificates_are_refused_on_both_sides() {
    let s = setup();
    let server = config::server_config(&s.server).expect("server config");
    let localhost: IpAddr = [127, 0, 0, 1].into();

    // A client certificate from another CA.
    let stranger =
        s.ca.leaf(&s.dir, "stranger", Role::Client, &[], -1, 30)
            .expect("leaf");
    let client = config::client_config(&ClientFiles {
        cert: stranger.cert,
        key: stranger.key,
        ..s.client.clone()
    })
    .expect("config");
    let (c, n) = shake(Arc::clone(&server), client);
    let n = n.expect_err("node refuses a stranger");
    assert!(n.contains("UnknownIssuer") || n.contains("unknown"), "{n}");
    let c = c.expect_err("the client learns it was refused");
    assert!(
        c.contains("alert"),
        "the node's alert reaches the client: {c}"
    );

    // An expired client certificate from the right CA is refused too:
    // make the CA's own set again with an expired client.
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("second").expect("ca");
    ca.write(&dir.path().join("ca.pem")).expect("write");
    let node = ca
        .leaf(dir.path(), "node", Role::Node, &[localhost], -1, 30)
        .expect("node");
    let expired = ca
        .leaf(dir.path(), "expired", Role::Client, &[], -40, 10)
        .expect("expired");
    let server2 = config::server_config(&ServerFiles {
        cert: node.cert.clone(),
        key: node.key.clone(),
        client_ca: dir.path().join("ca.pem"),
    })
    .expect("server");
    let client = config::client_config(&ClientFiles {
        ca: dir.path().join("ca.pem"),
        cert: expired.cert,
        key: expired.key,
        danger_skip_server_name: false,
    })
    .expect("config");
    let (_, n) = shake(Arc::clone(&server2), client);
    let n = n.expect_err("node refuses an expired certificate");
    assert!(n.contains("Expired") || n.contains("expired"), "{n}");

    // A node whose certificate names another address: refused by the
    // client, unless the danger switch is on.
    let elsewhere = ca
        .leaf(
            dir.path(),
            "elsewhere",
            Role::Node,
            &[[127, 0, 0, 2].into()],
            -1,
            30,
        )
        .expect("leaf");
    let good_client = ca
        .leaf(dir.path(), "good", Role::Client, &[], -1, 30)
        .expect("leaf");
    let server3 = config::server_config(&ServerFiles {
        cert: elsewhere.cert,
        key: elsewhere.key,
        client_ca: dir.path().join("ca.pem"),
    })
    .expect("server");
    let files = ClientFiles {
        ca: dir.path().join("ca.pem"),
        cert: good_client.cert,
        key: good_client.key,
        danger_skip_server_name: false,
    };
    let (c, _) = shake(
        Arc::clone(&server3),
        config::client_config(&files).expect("cfg"),
    );
    let c = c.expect_err("client refuses a node named otherwise");
    assert!(
        c.contains("NotValidForName") || c.contains("not valid for name"),
        "{c}"
    );
    let skip = ClientFiles {
        danger_skip_server_name: true,
        ..files
    };
    let (c, n) = shake(server3, config::client_config(&skip).expect("cfg"));
    assert!(
        c.is_ok() && n.is_ok(),
        "with the danger switch: {c:?} {n:?}"
    );

    // No client certificate at all.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&s.client.ca)
            .expect("ca")
            .flatten()
        {
            r.add(cert).expect("add");
        }
        r
    };
    let anonymous =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_no_client_auth();
    let (_, n) = shake(Arc::clone(&server), Arc::new(anonymous));
    let n = n.expect_err("node refuses a client without a certificate");
    assert!(
        n.contains("NoCertificatesPresented") || n.contains("certificate"),
        "{n}"
    );

    // A client that speaks TLS 1.2 only.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&s.client.ca)
        .expect("ca")
        .flatten()
    {
        roots.add(cert).expect("add");
    }
    let old = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (c, n) = shake(server, Arc::new(old));
    let n = n.expect_err("node refuses TLS 1.2");
    assert!(n.contains("Tls12NotOfferedOrEnabled"), "{n}");
    assert!(c.is_err());
}

//! The kernel's TLS: after a rustls handshake, the socket gets the `tls`
//! upper-layer protocol and the traffic keys, and from then on plain
//! reads and writes on it (io_uring's too) are records the kernel
//! encrypts and decrypts.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TCP_ULP: libc::c_int = 31;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a live buffer of the length passed; the kernel
    // copies it before returning.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct tls12_crypto_info_*` for TLS 1.3 (the same layout): version,
/// cipher, then iv, key, salt and record sequence, packed.
fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Vec<u8>> {
    let (cipher, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (TLS_CIPHER_AES_GCM_128, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (TLS_CIPHER_AES_GCM_256, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (TLS_CIPHER_CHACHA20_POLY1305, key, iv)
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a cipher the kernel's TLS does not take",
            ));
        }
    };
    let iv = iv.as_ref();
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
    info.extend_from_slice(&cipher.to_ne_bytes());
    if cipher == TLS_CIPHER_CHACHA20_POLY1305 {
        // iv[12], key[32], no salt, rec_seq[8]
        info.extend_from_slice(iv);
        info.extend_from_slice(key.as_ref());
    } else {
        // iv[8] (the explicit part), key, salt[4] (the implicit part), rec_seq[8]
        info.extend_from_slice(&iv[4..]);
        info.extend_from_slice(key.as_ref());
        info.extend_from_slice(&iv[..4]);
    }
    info.extend_from_slice(&seq.to_be_bytes());
    Ok(info)
}

/// Hands `stream`'s encryption to the kernel with `secrets` (from a
/// finished rustls handshake with nothing left buffered).
pub fn install(stream: &TcpStream, secrets: ExtractedSecrets) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    setsockopt(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls")?;
    let (tx_seq, tx) = &secrets.tx;
    setsockopt(fd, SOL_TLS, TLS_TX, &crypto_info(*tx_seq, tx)?)?;
    let (rx_seq, rx) = &secrets.rx;
    setsockopt(fd, SOL_TLS, TLS_RX, &crypto_info(*rx_seq, rx)?)
}

/// Whether this kernel takes `TCP_ULP "tls"` and AES-GCM keys on it (tried
/// once, on a loopback connection of its own, with throwaway keys for each
/// AES-GCM size a handshake may pick; the modules load on first use where
/// they can). A kernel with the `tls` module but without the ciphers is
/// not available: a handshake's secrets, once taken out of rustls, could
/// not go back to a relay.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let probe = || -> io::Result<()> {
            use rustls::crypto::cipher::{AeadKey, Iv};
            let listener = TcpListener::bind(("127.0.0.1", 0))?;
            for key_len in [16, 32] {
                let client = TcpStream::connect(listener.local_addr()?)?;
                let _server = listener.accept()?;
                setsockopt(client.as_raw_fd(), libc::IPPROTO_TCP, TCP_ULP, b"tls")?;
                let key = AeadKey::from([0u8; 32]);
                let secrets = if key_len == 16 {
                    // A 16-byte key: the layout of AES-128-GCM, built by hand
                    // (rustls makes no short AeadKey outside itself).
                    let mut info = crypto_info(
                        0,
                        &ConnectionTrafficSecrets::Aes256Gcm {
                            key,
                            iv: Iv::from([0; 12]),
                        },
                    )?;
                    info[2..4].copy_from_slice(&TLS_CIPHER_AES_GCM_128.to_ne_bytes());
                    info.drain(12..28);
                    info
                } else {
                    crypto_info(
                        0,
                        &ConnectionTrafficSecrets::Aes256Gcm {
                            key,
                            iv: Iv::from([0; 12]),
                        },
                    )?
                };
                setsockopt(client.as_raw_fd(), SOL_TLS, TLS_TX, &secrets)?;
            }
            Ok(())
        };
        match probe() {
            Ok(()) => true,
            Err(err) => {
                tracing::debug!(error = %err, "kernel TLS unavailable");
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    #[test]
    fn crypto_info_is_laid_out_as_the_kernel_reads_it() {
        let iv = Iv::from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let aes = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv,
        };
        let info = crypto_info(0x0102, &aes).expect("aes");
        assert_eq!(
            info.len(),
            4 + 8 + 32 + 4 + 8,
            "tls12_crypto_info_aes_gcm_256"
        );
        assert_eq!(&info[..2], &0x0304u16.to_ne_bytes());
        assert_eq!(&info[2..4], &52u16.to_ne_bytes());
        assert_eq!(&info[4..12], &[5, 6, 7, 8, 9, 10, 11, 12], "explicit iv");
        assert_eq!(&info[12..44], &[7u8; 32]);
        assert_eq!(&info[44..48], &[1, 2, 3, 4], "salt");
        assert_eq!(
            &info[48..],
            &[0, 0, 0, 0, 0, 0, 1, 2],
            "sequence, big-endian"
        );
        let chacha = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([9u8; 32]),
            iv: Iv::from([3; 12]),
        };
        let info = crypto_info(5, &chacha).expect("chacha");
        assert_eq!(
            info.len(),
            4 + 12 + 32 + 8,
            "tls12_crypto_info_chacha20_poly1305"
        );
        assert_eq!(&info[2..4], &54u16.to_ne_bytes());
    }
}

//! TLS for the client and the mock, with rustls.
//!
//! Crypto provider: `ring`. It builds from the crate alone with a C compiler (pre-generated
//! assembly, no cmake, NASM or Go), so the wheel builds in CI and under `maturin --zig`
//! for manylinux2014 with no extra system packages; `aws-lc-rs` needs cmake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};

use crate::error::EngineError;

/// ALPN: the lanes speak HTTP/1.1 (one request per connection at a time), or HTTP/2.
const ALPN_HTTP1: &[u8] = b"http/1.1";
const ALPN_H2: &[u8] = b"h2";

/// How the client checks servers and proves itself (`--cacert`, `--insecure`, `--cert`,
/// `--key`).
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// PEM bundle trusted in addition to the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) and its private key, for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate.
    pub insecure: bool,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(m: String) -> EngineError {
    EngineError::InvalidConfig(m)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, EngineError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("{what} {shown}: {}", pem_error(&e))))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{what} {shown}: {}", pem_error(&e))))?;
    if certs.is_empty() {
        return Err(bad(format!("{what} {shown}: no PEM certificate in it")));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not a PEM file ({other:?})"),
    }
}

impl ClientTlsOptions {
    /// The rustls client configuration: the platform's roots plus `ca_file`, or no
    /// verification; a client certificate when given; ALPN `http/1.1` (`h2` when
    /// `http2`); TLS session resumption (rustls' in-memory cache, shared by every lane).
    pub fn build(&self, http2: bool) -> Result<Arc<rustls::ClientConfig>, EngineError> {
        if self.insecure && self.ca_file.is_some() {
            return Err(bad("--insecure and --cacert exclude each other".into()));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(bad("--cert and --key go together".into()));
        }
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?;
        let builder = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            // The platform's store (or SSL_CERT_FILE / SSL_CERT_DIR); unreadable entries
            // are skipped, as curl does, and `--cacert` still applies.
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if let Some(path) = &self.ca_file {
                for cert in read_certs(path, "--cacert")? {
                    roots.add(cert).map_err(|e| {
                        bad(format!("--cacert {}: {}", path.display(), describe(&e)))
                    })?;
                }
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "--cert")?;
                let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    bad(format!(
                        "--key {}: {}",
                        key.display(),
                        match e {
                            rustls::pki_types::pem::Error::NoItemsFound =>
                                "no PEM private key in it".to_owned(),
                            other => pem_error(&other),
                        }
                    ))
                })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    bad(format!(
                        "--cert {} with --key {}: {}",
                        cert.display(),
                        key.display(),
                        match e {
                            TlsError::InconsistentKeys(_) =>
                                "the key does not match the certificate".to_owned(),
                            other => other.to_string(),
                        }
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![if http2 { ALPN_H2 } else { ALPN_HTTP1 }.to_vec()];
        Ok(Arc::new(config))
    }
}

/// `--insecure`: any certificate is accepted; handshake signatures are still checked
/// against the certificate presented (a broken handshake still fails).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure as one line that names the cause and, where there is one, the remedy.
pub fn describe(e: &TlsError) -> String {
    use CertificateError as C;
    match e {
        TlsError::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "certificate signed by an unknown issuer (pass the server's CA \
                                 with --cacert, or --insecure)"
                .to_owned(),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "certificate name mismatch: {e} (connect by a name the certificate lists, or \
                 --insecure)"
            ),
            C::Expired | C::ExpiredContext { .. } => format!("certificate expired: {e}"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("certificate not valid yet (check the clocks): {e}")
            }
            C::Revoked => "certificate revoked".to_owned(),
            _ => format!("bad certificate: {e}"),
        },
        TlsError::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            match alert {
                A::CertificateRequired | A::HandshakeFailure | A::BadCertificate | A::UnknownCA => {
                    format!(
                        "handshake refused by the server ({alert:?}; does it require a client \
                     certificate? --cert/--key)"
                    )
                }
                _ => format!("handshake refused by the server ({alert:?})"),
            }
        }
        TlsError::NoApplicationProtocol => {
            "the server does not speak HTTP/1.1 over TLS (ALPN)".to_owned()
        }
        other => other.to_string(),
    }
}

/// The rustls error behind an I/O error (what tokio-rustls reports), if any.
pub fn tls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TlsError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<TlsError>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
                return Some(t);
            }
        }
        cur = err.source();
    }
    None
}

/// The embedded mock's TLS identity: a CA made at start and a server certificate it signs
/// for the mock's host names, so a client trusts the mock with the CA alone.
pub struct MockIdentity {
    /// The CA certificate, PEM: what a client passes as `--cacert`.
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for MockIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockIdentity").finish_non_exhaustive()
    }
}

impl MockIdentity {
    /// A fresh identity valid for `localhost`, 127.0.0.1, ::1 and `host`.
    pub fn generate(host: &str) -> Result<Self, EngineError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let err = |e: rcgen::Error| bad(format!("making the mock's TLS certificate: {e}"));
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fineserve mock CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let host = host.trim_matches(['[', ']']);
        if !host.is_empty() && !names.iter().any(|n| n == host) && host != "0.0.0.0" && host != "::"
        {
            names.push(host.to_owned());
        }
        let leaf_key = KeyPair::generate().map_err(err)?;
        let mut leaf_params = CertificateParams::new(names).map_err(err)?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "fineserve mock");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(err)?;

        let key_der = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|e| bad(format!("the mock's TLS key: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS setup: {e}")))?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key_der)
            .map_err(|e| bad(format!("the mock's TLS certificate: {e}")))?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Self {
            ca_pem: ca_cert.pem(),
            server_config: Arc::new(server),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fineserve-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn refused(o: &ClientTlsOptions) -> String {
        match o.build(false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn bad_tls_files_are_one_line_errors() {
        let dir = tmpdir("bad");
        let missing = ClientTlsOptions {
            ca_file: Some(dir.join("nope.pem")),
            ..Default::default()
        };
        assert!(
            refused(&missing).contains("--cacert"),
            "{}",
            refused(&missing)
        );
        let junk = ClientTlsOptions {
            ca_file: Some(write(&dir, "junk.pem", "hello\n")),
            ..Default::default()
        };
        assert!(
            refused(&junk).contains("no PEM certificate"),
            "{}",
            refused(&junk)
        );
        let both = ClientTlsOptions {
            ca_file: Some(write(&dir, "x.pem", "")),
            insecure: true,
            ..Default::default()
        };
        assert!(refused(&both).contains("exclude each other"));
        let half = ClientTlsOptions {
            cert_file: Some(dir.join("c.pem")),
            ..Default::default()
        };
        assert!(refused(&half).contains("go together"));
        for msg in [refused(&missing), refused(&junk)] {
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tmpdir("mismatch");
        let a = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).expect("cert");
        let b = rcgen::generate_simple_self_signed(vec!["b".to_owned()]).expect("cert");
        let o = ClientTlsOptions {
            cert_file: Some(write(&dir, "a.pem", &a.cert.pem())),
            key_file: Some(write(&dir, "b.key", &b.signing_key.serialize_pem())),
            ..Default::default()
        };
        assert!(refused(&o).contains("does not match"), "{}", refused(&o));
        let ok = ClientTlsOptions {
            key_file: Some(write(&dir, "a.key", &a.signing_key.serialize_pem())),
            ..o
        };
        assert!(ok.build(false).is_ok());
    }

    #[test]
    fn the_mock_identity_is_trusted_through_its_ca() {
        let dir = tmpdir("mock");
        let id = MockIdentity::generate("127.0.0.1").expect("identity");
        let o = ClientTlsOptions {
            ca_file: Some(write(&dir, "ca.pem", &id.ca_pem)),
            ..Default::default()
        };
        let cfg = o.build(false).expect("client config");
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn causes_are_named() {
        let unknown = describe(&TlsError::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert!(unknown.contains("unknown issuer") && unknown.contains("--cacert"));
        let expired = describe(&TlsError::InvalidCertificate(CertificateError::Expired));
        assert!(expired.contains("expired"));
        let name = describe(&TlsError::InvalidCertificate(
            CertificateError::NotValidForName,
        ));
        assert!(name.contains("name mismatch"));
        let refused = describe(&TlsError::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(refused.contains("refused") && refused.contains("--cert"));
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            TlsError::InvalidCertificate(CertificateError::Expired),
        );
        assert!(matches!(
            tls_cause(&io),
            Some(TlsError::InvalidCertificate(_))
        ));
        let plain = std::io::Error::other("x");
        assert!(tls_cause(&plain).is_none());
    }
}

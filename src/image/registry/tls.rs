//! The trust store: system bundle plus extra certificates, pinned leaves, the rustls config and
//! the ureq connector built on it.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use super::*;

pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const EXTRA_CERTS_ENV: &str = "CODER_EXTRA_CERTS_PATH";

pub(super) type Der = rustls_pki_types::CertificateDer<'static>;

/// Trusted root certificates: the system bundle plus optional extra PEM files.
///
/// Extra certificates are also *pinned*: a server presenting exactly one of them as its leaf is
/// accepted (after a host-name check) even when webpki refuses it — the usual self-signed registry
/// certificate made with `openssl req -x509` has `CA:TRUE`, which webpki rejects as an end entity
/// (`CaUsedAsEndEntity`) while Docker/Go accept it when it is in the trust store.
#[derive(Clone)]
pub struct TlsRoots {
    pub(super) certs: Arc<Vec<Der>>,
    pub(super) extra: Arc<Vec<Der>>,
    /// Human summary, e.g. `145 system roots + 1 from /certs`.
    pub summary: String,
}

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsRoots({})", self.summary)
    }
}

impl TlsRoots {
    /// System bundle ([`SYSTEM_CA_BUNDLE`]) plus `extra` (a PEM file, or every regular file in a
    /// directory). A missing system bundle is a warning; a missing or unreadable `extra` is an error.
    pub fn load(extra: Option<&Path>) -> Result<TlsRoots, RegistryError> {
        Self::load_from(Path::new(SYSTEM_CA_BUNDLE), extra)
    }

    pub fn load_from(system: &Path, extra: Option<&Path>) -> Result<TlsRoots, RegistryError> {
        let mut certs = Vec::new();
        let n_system = match std::fs::read(system) {
            Ok(bytes) => push_pem_certs(&bytes, &mut certs),
            Err(e) => {
                log::warn!("cannot read system CA bundle {}: {e}", system.display());
                0
            }
        };
        let mut summary = format!("{n_system} system roots from {}", system.display());
        let mut extra_certs = Vec::new();
        if let Some(extra) = extra {
            let cert_err = |reason: String| RegistryError::Certs {
                path: extra.to_path_buf(),
                reason,
            };
            let meta = std::fs::metadata(extra).map_err(|e| cert_err(e.to_string()))?;
            let mut files = Vec::new();
            if meta.is_dir() {
                let rd = std::fs::read_dir(extra).map_err(|e| cert_err(e.to_string()))?;
                for ent in rd {
                    let ent = ent.map_err(|e| cert_err(e.to_string()))?;
                    let p = ent.path();
                    // follow symlinks (Kubernetes secret/configmap volumes are symlink farms)
                    if std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
                        files.push(p);
                    }
                }
                files.sort();
            } else {
                files.push(extra.to_path_buf());
            }
            for f in &files {
                let bytes = std::fs::read(f).map_err(|e| RegistryError::Certs {
                    path: f.clone(),
                    reason: e.to_string(),
                })?;
                if push_pem_certs(&bytes, &mut extra_certs) == 0 {
                    log::warn!("{} contains no PEM certificates; ignored", f.display());
                }
            }
            summary.push_str(&format!(
                " + {} from {}",
                extra_certs.len(),
                extra.display()
            ));
        }
        certs.extend(extra_certs.iter().cloned());
        Ok(TlsRoots {
            certs: Arc::new(certs),
            extra: Arc::new(extra_certs),
            summary,
        })
    }

    fn verifier(&self) -> Arc<EnvboxVerifier> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = rustls::RootCertStore::empty();
        let (_added, ignored) = store.add_parsable_certificates(self.certs.iter().cloned());
        if ignored > 0 {
            log::debug!("ignored {ignored} unparsable root certificates");
        }
        let webpki = if store.is_empty() {
            None
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider.clone(),
            )
            .build()
            .ok()
        };
        Arc::new(EnvboxVerifier {
            webpki,
            pinned: self.extra.clone(),
            provider,
        })
    }

    /// A rustls client config trusting these roots (ring provider, TLS 1.2 and 1.3).
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.build_config(self.verifier())
    }

    /// A rustls client config that verifies nothing (registries marked insecure).
    pub fn insecure_rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.build_config(Arc::new(NoVerifier(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))))
    }

    fn build_config(
        &self,
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    ) -> Arc<rustls::ClientConfig> {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("ring supports all TLS versions")
        .dangerous() // a custom verifier: webpki plus pinning of the operator's extra certificates
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
        Arc::new(cfg)
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

fn push_pem_certs(bytes: &[u8], out: &mut Vec<Der>) -> usize {
    use rustls_pki_types::pem::PemObject;
    let mut n = 0;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(bytes) {
        match c {
            Ok(der) => {
                out.push(der);
                n += 1;
            }
            Err(e) => log::warn!("skipping an invalid PEM certificate: {e}"),
        }
    }
    n
}

/// webpki verification, plus acceptance of a leaf that is byte-identical to one of the extra
/// certificates the operator supplied (checked against the server name; its validity period is not
/// checked).
#[derive(Debug)]
pub(super) struct EnvboxVerifier {
    pub(super) webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    pinned: Arc<Vec<Der>>,
    pub(super) provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for EnvboxVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let result = match &self.webpki {
            Some(v) => {
                v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        };
        match result {
            Ok(v) => Ok(v),
            Err(e)
                if self
                    .pinned
                    .iter()
                    .any(|p| p.as_ref() == end_entity.as_ref()) =>
            {
                let parsed =
                    rustls::server::ParsedCertificate::try_from(end_entity).map_err(|_| e)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts any certificate (registries explicitly marked insecure). Handshake signatures are
/// still checked against the presented certificate.
#[derive(Debug)]
pub(super) struct NoVerifier(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A ureq agent whose HTTPS connections use `tls` (instead of ureq's own rustls setup, which
/// cannot take a custom verifier). HTTP CONNECT proxies from the environment keep working.
pub fn ureq_agent(config: ureq::config::Config, tls: Arc<rustls::ClientConfig>) -> ureq::Agent {
    use ureq::unversioned::resolver::DefaultResolver;
    use ureq::unversioned::transport::{ConnectProxyConnector, Connector, TcpConnector};
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(TcpConnector::default())
            .chain(RustlsWith { config: tls });
    ureq::Agent::with_parts(config, connector, DefaultResolver::default())
}

/// ureq connector that wraps the chained transport in TLS with a given rustls config.
#[derive(Debug)]
pub(super) struct RustlsWith {
    pub(super) config: Arc<rustls::ClientConfig>,
}

impl<In: ureq::unversioned::transport::Transport> ureq::unversioned::transport::Connector<In>
    for RustlsWith
{
    type Out = ureq::unversioned::transport::Either<In, RustlsTransport>;

    fn connect(
        &self,
        details: &ureq::unversioned::transport::ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        use ureq::unversioned::transport::{Either, LazyBuffers, TransportAdapter};
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let host = details
            .uri
            .host()
            .ok_or(ureq::Error::Tls("URL without host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| ureq::Error::Tls("invalid TLS server name"))?;
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock)?;
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(RustlsTransport {
            buffers,
            stream: rustls::StreamOwned { conn, sock },
        })))
    }
}

pub(super) struct RustlsTransport {
    buffers: ureq::unversioned::transport::LazyBuffers,
    pub(super) stream: rustls::StreamOwned<
        rustls::ClientConnection,
        ureq::unversioned::transport::TransportAdapter,
    >,
}

impl std::fmt::Debug for RustlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsTransport")
    }
}

impl ureq::unversioned::transport::Transport for RustlsTransport {
    fn buffers(&mut self) -> &mut dyn ureq::unversioned::transport::Buffers {
        &mut self.buffers
    }

    fn transmit_output(
        &mut self,
        amount: usize,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<(), ureq::Error> {
        use ureq::unversioned::transport::Buffers;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(
        &mut self,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<bool, ureq::Error> {
        use ureq::unversioned::transport::Buffers;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let n = self.stream.read(input)?;
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// One rustls config trusting the system bundle plus `extra_certs` (for the Coder log sender).
pub fn tls_config(extra_certs: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, RegistryError> {
    Ok(TlsRoots::load(extra_certs)?.rustls_config())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_roots_loading() {
        let dir = tempfile::tempdir().unwrap();
        let sys = Path::new(SYSTEM_CA_BUNDLE);
        let Ok(bundle) = std::fs::read_to_string(sys) else {
            eprintln!("no system bundle; skipping");
            return;
        };
        let base = TlsRoots::load_from(sys, None).unwrap();
        assert!(base.len() > 10, "{}", base.summary);
        // one cert from the bundle as an "extra" file, plus junk and a sub-directory
        let first_end = bundle.find("-----END CERTIFICATE-----").unwrap() + 25;
        let one = &bundle[..first_end];
        std::fs::write(dir.path().join("ca.pem"), one).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let r = TlsRoots::load_from(sys, Some(dir.path())).unwrap();
        assert_eq!(r.len(), base.len() + 1, "{}", r.summary);
        let r = TlsRoots::load_from(sys, Some(&dir.path().join("ca.pem"))).unwrap();
        assert_eq!(r.len(), base.len() + 1);
        assert!(matches!(
            TlsRoots::load_from(sys, Some(&dir.path().join("missing"))),
            Err(RegistryError::Certs { .. })
        ));
        // missing system bundle: extra only
        let r = TlsRoots::load_from(&dir.path().join("none"), Some(&dir.path().join("ca.pem")))
            .unwrap();
        assert_eq!(r.len(), 1);
        let _cfg = r.rustls_config();
        assert!(tls_config(None).is_ok());
    }
}

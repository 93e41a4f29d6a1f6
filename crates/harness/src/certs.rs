//! Test certificates made in Rust (rcgen): a CA, a server certificate signed by it (for
//! `localhost` and `127.0.0.1` unless told otherwise), a client certificate signed by it, and an unrelated second CA
//! (for "wrong CA" tests). PEM files in a temp dir, removed on drop.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// PEM files for TLS tests, in their own temp dir (mode 0755 so a server run as another user,
/// PostgreSQL as `postgres`, can read it; removed on drop):
///
/// | file | what |
/// |---|---|
/// | `ca.crt` | the CA that signs the two certificates below |
/// | `server.crt`, `server.key` | server certificate (`localhost`, `127.0.0.1` by default; key mode 0600) |
/// | `client.crt`, `client.key` | client certificate (CN `cacheclear-client`) |
/// | `other-ca.crt` | an unrelated CA: verification against it fails |
#[derive(Debug)]
pub struct TestCertificates {
    dir: tempfile::TempDir,
}

impl TestCertificates {
    /// Generates the certificates (a few milliseconds), the server certificate for `localhost`
    /// and `127.0.0.1`.
    ///
    /// # Errors
    /// [`HarnessError::Io`] when the temp dir or a file cannot be written, or a certificate
    /// cannot be generated.
    pub fn generate() -> Result<TestCertificates, HarnessError> {
        Self::generate_for(&["localhost", "127.0.0.1"])
    }

    /// Like [`TestCertificates::generate`], the server certificate naming `server_names` (DNS
    /// names or IP addresses), e.g. `&["localhost"]` for a "wrong host name" test against
    /// `127.0.0.1`.
    ///
    /// # Errors
    /// As [`TestCertificates::generate`].
    pub fn generate_for(server_names: &[&str]) -> Result<TestCertificates, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("cacheclear-certs-")
            .tempdir()
            .map_err(|e| HarnessError::io("could not create the certificates' temp dir", e))?;
        let gen_err = |e: rcgen::Error| {
            HarnessError::io(
                "could not generate a test certificate",
                std::io::Error::other(e.to_string()),
            )
        };
        let ca_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cacheclear test CA");
        let ca = ca_params.self_signed(&ca_key).map_err(gen_err)?;
        let server_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let names: Vec<String> = server_names.iter().map(|n| (*n).to_owned()).collect();
        let server = rcgen::CertificateParams::new(names)
            .map_err(gen_err)?
            .signed_by(&server_key, &ca, &ca_key)
            .map_err(gen_err)?;
        let client_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut client_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cacheclear-client");
        let client = client_params
            .signed_by(&client_key, &ca, &ca_key)
            .map_err(gen_err)?;
        let other_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut other_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        other_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "unrelated CA");
        let other = other_params.self_signed(&other_key).map_err(gen_err)?;
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text)
                .map_err(|e| HarnessError::io(format!("could not write {}", path.display()), e))
        };
        write("ca.crt", ca.pem())?;
        write("other-ca.crt", other.pem())?;
        write("server.crt", server.pem())?;
        write("server.key", server_key.serialize_pem())?;
        write("client.crt", client.pem())?;
        write("client.key", client_key.serialize_pem())?;
        let chmod = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(|e| HarnessError::io(format!("could not chmod {}", path.display()), e))
        };
        // PostgreSQL refuses a key others can read.
        chmod(&dir.path().join("server.key"), 0o600)?;
        chmod(dir.path(), 0o755)?;
        Ok(TestCertificates { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// An unrelated CA certificate: the server certificate does not chain to it.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.crt")
    }

    /// The server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// The server certificate's private key (mode 0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }

    /// The client certificate's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// Gives the server certificate and key to `uid:gid` (a server that runs as another user,
    /// e.g. PostgreSQL as `postgres` when the tests run as root).
    ///
    /// # Errors
    /// [`HarnessError::Io`] when `chown` fails.
    pub fn chown_server_files(&self, uid: u32, gid: u32) -> Result<(), HarnessError> {
        for path in [self.server_cert(), self.server_key()] {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| HarnessError::io(format!("could not chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

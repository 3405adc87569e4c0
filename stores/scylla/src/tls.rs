//! TLS for the driver's connections: OpenSSL behind the `tls` cargo feature.

use crate::{Error, TlsFiles};

/// The driver's TLS context for `files`: the nodes' certificate chain must lead to the CA in
/// `files.ca_file`; a client certificate is presented when given.
#[cfg(feature = "tls")]
pub(crate) fn context(files: &TlsFiles) -> Result<scylla::client::session::TlsContext, Error> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};

    let readable = |path: &std::path::Path, what: &str| {
        std::fs::metadata(path).map(|_| ()).map_err(|e| Error::Tls {
            reason: format!("{what} `{}`: {e}", path.display()),
        })
    };
    let fail = |what: String| {
        move |e: openssl::error::ErrorStack| Error::Tls {
            reason: format!("{what}: {e}"),
        }
    };
    let mut builder =
        SslConnector::builder(SslMethod::tls()).map_err(fail("TLS context".into()))?;
    readable(&files.ca_file, "CA file")?;
    builder
        .set_ca_file(&files.ca_file)
        .map_err(fail(format!("CA file `{}`", files.ca_file.display())))?;
    builder.set_verify(SslVerifyMode::PEER);
    if let Some((cert, key)) = &files.client {
        readable(cert, "client certificate")?;
        readable(key, "client key")?;
        builder
            .set_certificate_chain_file(cert)
            .map_err(fail(format!("client certificate `{}`", cert.display())))?;
        builder
            .set_private_key_file(key, SslFiletype::PEM)
            .map_err(fail(format!("client key `{}`", key.display())))?;
        builder
            .check_private_key()
            .map_err(fail("the client key does not match its certificate".into()))?;
    }
    Ok(builder.into())
}

/// Without the `tls` feature a TLS setting is refused rather than ignored.
#[cfg(not(feature = "tls"))]
pub(crate) fn context(files: &TlsFiles) -> Result<scylla::client::session::TlsContext, Error> {
    Err(Error::Tls {
        reason: format!(
            "TLS is configured (CA file `{}`) but this build has no TLS: enable keel-scylla's `tls` feature",
            files.ca_file.display()
        ),
    })
}

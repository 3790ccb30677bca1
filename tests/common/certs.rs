//! Test certificates made with openssl (tests/run.sh installs it): a CA, and certificates for
//! 127.0.0.1 that it signs (P-256 keys: quick to make). Used by the `wss://`, `rediss://` and
//! JWKS-over-HTTPS tests.

use std::path::Path;
use std::process::Command;

/// Run `openssl args`; a missing openssl is a loud failure with the fix.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run openssl {args:?}: {e}. These tests need openssl: `sudo apt-get install openssl` (tests/run.sh installs it by itself)"
        )
    });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir`: `ca.pem`, `ca.key`.
pub fn make_ca(dir: &Path) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ringgate test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
}

/// A certificate for 127.0.0.1 named `cn`, signed by the CA in `dir`: `<name>.pem`,
/// `<name>.key`.
pub fn make_cert(dir: &Path, name: &str, cn: &str) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("san.ext"),
        "-out",
        &p(&pem),
    ]);
}

/// A CA and `server.pem` / `server.key` for 127.0.0.1 in `dir`.
pub fn make_certs(dir: &Path) {
    make_ca(dir);
    make_cert(dir, "server", "127.0.0.1");
}

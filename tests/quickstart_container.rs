//! The container quickstart as README.md gives it (`scripts/quickstart-container`),
//! on the machine's Docker engine: the image is built from this checkout's binary,
//! `rampart up` answers over HTTPS on the published port with its internal CA, and its
//! data lives in a named volume. Free ports and a name of its own; the container and
//! the volume are removed at the end, also when an assertion fails.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::process::Command;

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Best effort: a container that never started has nothing to remove.
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        let volume = format!("{}-data", self.0);
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f", &volume])
            .output();
    }
}

#[tokio::test]
async fn the_container_quickstart_serves_https_with_its_ca() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let (http, https) = (common::free_addr(), common::free_addr());
    let name = format!("rampart-qs-test-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let ca = dir.path().join("ca.pem");
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/quickstart-container"
    ))
    .env("HTTP_PORT", http.port().to_string())
    .env("HTTPS_PORT", https.port().to_string())
    .env("NAME", &name)
    // The tests' own build: the image packs target/debug/rampart.
    .env("PROFILE", "debug")
    .env("CA_OUT", &ca)
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("curl --cacert {}", ca.display())),
        "{stdout}"
    );
    let pem = std::fs::read(&ca).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .resolve("localhost", https)
        .build()
        .unwrap();
    let body = common::eventually("the container to answer over HTTPS", || async {
        let r = client
            .get(format!("https://localhost:{}/", https.port()))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    })
    .await;
    assert!(body.contains("Rampart is running"), "{body}");
    let volumes = Command::new("docker")
        .args(["volume", "ls", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&volumes.stdout).contains(&format!("{name}-data")));
}

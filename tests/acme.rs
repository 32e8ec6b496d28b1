//! ACME against a real CA: pebble (Debian's package) with its own TLS certificate,
//! pebble-challtestsrv answering its DNS lookups with 127.0.0.1, a real `rampart
//! controller` as the one orderer and a real fleet proxy answering HTTP-01.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, free_addr, Proxy};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pebble and its DNS, with pebble's HTTP-01 validations sent to `http_port`.
struct Pebble {
    _dns: Killed,
    _pebble: Killed,
    directory: String,
    management: SocketAddr,
    /// The CA of pebble's own API certificate.
    api_ca: PathBuf,
}

impl Pebble {
    async fn start(dir: &Path, http_port: u16) -> Self {
        let ca =
            rampart_pki::Ca::load_or_create(&dir.join("pebble-ca"), "pebble API test CA").unwrap();
        let issued = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), &issued.chain_pem).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), &issued.key_pem).unwrap();
        let (api, management, dns) = (free_addr(), free_addr(), free_addr());
        std::fs::write(
            dir.join("pebble.json"),
            format!(
                r#"{{"pebble": {{"listenAddress": "{api}", "managementListenAddress": "{management}",
 "certificate": "{}", "privateKey": "{}", "httpPort": {http_port}, "tlsPort": {},
 "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
                dir.join("pebble-cert.pem").display(),
                dir.join("pebble-key.pem").display(),
                free_addr().port()
            ),
        )
        .unwrap();
        let dns_proc = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args([
                "-dns01",
                &dns.to_string(),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &free_addr().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble-challtestsrv (scripts/setup installs pebble)");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(std::fs::File::create(dir.join("pebble.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("pebble (scripts/setup installs it)");
        eventually("pebble to listen", || async {
            tokio::net::TcpStream::connect(api).await.ok().map(drop)
        })
        .await;
        Self {
            _dns: Killed(dns_proc),
            _pebble: Killed(pebble),
            directory: format!("https://{api}/dir"),
            management,
            api_ca: ca.cert_path().to_path_buf(),
        }
    }

    /// The root pebble issues certificates under (a new one at every start).
    async fn root(&self) -> reqwest::Certificate {
        let pem = std::fs::read(&self.api_ca).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .build()
            .unwrap();
        let body = client
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        reqwest::Certificate::from_pem(&body).unwrap()
    }
}

/// GET https://<name>/ at the proxy, trusting only `root`.
async fn get_trusting(
    root: &reqwest::Certificate,
    name: &str,
    https: SocketAddr,
) -> Option<String> {
    let client = reqwest::Client::builder()
        .tls_certs_only([root.clone()])
        .resolve(name, https)
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{name}:{}/", https.port()))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_orders_over_http01_through_the_proxies_and_they_serve_it() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let proxy_http = free_addr();
    let pebble = Pebble::start(dir.path(), proxy_http.port()).await;

    let (admin, fleet) = (free_addr(), free_addr());
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
data_dir = {:?}

[controller]
listen = "{fleet}"
admin = "{admin}"
watch_timeout = "2s"

[[tls]]
hosts = ["a.rampart.test", "b.rampart.test"]
source = {{ acme = {{ email = "ops@rampart.test", directory = "{}", directory_ca = {:?} }} }}

[[routes]]
name = "hello"
hosts = ["a.rampart.test", "b.rampart.test"]
https_redirect = true
action = {{ respond = {{ body = "hello over acme" }} }}
"#,
            dir.path().join("data"),
            pebble.directory,
            pebble.api_ca,
        ),
    )
    .unwrap();
    let start_controller = |log: &str| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_rampart"))
                .args(["controller", "--config"])
                .arg(&config)
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let controller = start_controller("controller.log");
    eventually("the controller's admin API", || async {
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .ok()
            .map(drop)
    })
    .await;
    let token = Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["controller", "--config"])
        .arg(&config)
        .args(["token", "create"])
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap();
    let started = Instant::now();
    let mut proxy = Proxy::start_fleet_with(
        &format!("https://{fleet}"),
        Some(token.trim()),
        &["--http", &proxy_http.to_string()],
    )
    .await;

    // Both names end up served with pebble's certificate.
    let root = pebble.root().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in ["a.rampart.test", "b.rampart.test"] {
        loop {
            if let Some(body) = get_trusting(&root, name, proxy.https).await {
                assert_eq!(body, "hello over acme");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is not served with a pebble certificate ({:?}; proxy exit {:?}); proxy log:\n{}\ncontroller log:\n{}\npebble log:\n{}",
                reqwest::Client::builder().tls_certs_only([root.clone()]).resolve(name, proxy.https).build().unwrap().get(format!("https://{name}:{}/", proxy.https.port())).send().await.err(),
                proxy.child.try_wait(),
                proxy.log(),
                std::fs::read_to_string(dir.path().join("controller.log")).unwrap(),
                std::fs::read_to_string(dir.path().join("pebble.log")).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "certificate served {:.2}s after the proxy started",
        started.elapsed().as_secs_f64()
    );

    // A restart of the controller orders nothing: the certificate is in the store.
    drop(controller);
    let _controller = start_controller("controller-2.log");
    eventually("the restarted controller", || async {
        reqwest::get(format!("http://{admin}/healthz"))
            .await
            .ok()
            .map(drop)
    })
    .await;
    // Let it look at its certificates a few times (its loop runs every 5 s).
    let settle = Instant::now() + Duration::from_secs(7);
    while Instant::now() < settle {
        assert!(get_trusting(&root, "a.rampart.test", proxy.https)
            .await
            .is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("controller-2.log")).unwrap();
    assert!(
        !log.contains("ordering"),
        "the restarted controller ordered again:\n{log}"
    );
}

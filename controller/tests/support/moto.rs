//! A real Route53 API for tests: moto_server (PyPI `moto[server]`, installed in a venv
//! by scripts/setup) on a free loopback port, stopped on drop. Shared by the controller's
//! DNS tests and the workspace's end-to-end test.
#![allow(missing_docs, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto_server.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Moto {
    /// Starts moto_server and waits until it accepts connections.
    pub async fn start() -> Self {
        let bin = std::env::var("RAMPART_MOTO").unwrap_or_else(|_| {
            let venv = std::env::var("RAMPART_VENV").unwrap_or_else(|_| {
                format!("{}/.cache/rampart/venv", std::env::var("HOME").unwrap())
            });
            format!("{venv}/bin/moto_server")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}; scripts/setup installs moto"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A Route53 client with moto's test credentials.
    pub async fn client(&self) -> aws_sdk_route53::Client {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_route53::config::Credentials::new(
                "testing", "testing", None, None, "static",
            ))
            .load()
            .await;
        let conf = aws_sdk_route53::config::Builder::from(&shared)
            .endpoint_url(&self.url)
            .build();
        aws_sdk_route53::Client::from_conf(conf)
    }

    /// Creates the hosted zone `zone` and returns its id.
    pub async fn create_zone(&self, zone: &str) -> String {
        let out = self
            .client()
            .await
            .create_hosted_zone()
            .name(format!("{zone}."))
            .caller_reference(format!("{:?}", Instant::now()))
            .send()
            .await
            .unwrap();
        out.hosted_zone()
            .unwrap()
            .id()
            .trim_start_matches("/hostedzone/")
            .to_string()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The proxies under comparison: how to configure and start each one the same way
//! (same certificate, same routes, keep-alive upstreams, access logs off — or, with
//! `--access-log`, to a file —, the same number of workers), and where it listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// What every target serves: `/` from the small backend, `/big` from the 16 KiB one,
/// `/h2up` and gRPC calls (`/bench.Echo/...`) from the HTTP/2 (h2c) one, `/html` from
/// the 100 KiB HTML one, compressed with gzip at nginx's default level (1).
#[derive(Clone, Debug)]
pub struct Upstreams {
    /// Backend with the small body.
    pub small: SocketAddr,
    /// Backend with the 16 KiB body.
    pub big: SocketAddr,
    /// Backend speaking HTTP/2 in cleartext (and gRPC).
    pub h2c: SocketAddr,
    /// Backend with the 100 KiB HTML page.
    pub html: SocketAddr,
    /// The run compresses `/html` (gzip-100k is one of its tests): left out of
    /// Rampart's configuration otherwise, so that a Rampart older than `compress`
    /// can be measured on the other tests.
    pub compress: bool,
}

/// The certificate every TLS listener serves (ECDSA P-256, for `bench.test`).
#[derive(Clone, Debug)]
pub struct Cert {
    /// Leaf certificate PEM file.
    pub cert: PathBuf,
    /// Private key PEM file.
    pub key: PathBuf,
    /// Certificate followed by key, as HAProxy wants it.
    pub combined: PathBuf,
    /// CA (the self-signed leaf itself) for clients.
    pub ca: PathBuf,
}

/// The SNI and Host used for TLS tests.
pub const HOST: &str = "bench.test";

impl Cert {
    /// Generates a self-signed ECDSA P-256 certificate for [`HOST`] in `dir`.
    ///
    /// # Errors
    /// When the files cannot be written.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![HOST.to_string()])?.self_signed(&key)?;
        let c = Cert {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            combined: dir.join("combined.pem"),
            ca: dir.join("cert.pem"),
        };
        std::fs::write(&c.cert, cert.pem())?;
        std::fs::write(&c.key, key.serialize_pem())?;
        std::fs::write(
            &c.combined,
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
        Ok(c)
    }
}

/// A proxy (or the backend itself) under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The backend without a proxy: the ceiling.
    Direct,
    /// Rampart.
    Rampart,
    /// Rampart without its access log, beside [`Kind::Rampart`] with it under
    /// `--access-log`: the log's cost measured in the same run.
    RampartUnlogged,
    /// nginx.
    Nginx,
    /// nginx without its access log, beside [`Kind::Nginx`] with it under
    /// `--access-log`: what a log costs the peer, for scale.
    NginxUnlogged,
    /// HAProxy.
    Haproxy,
    /// Caddy.
    Caddy,
}

impl Kind {
    /// Parses a peer name.
    ///
    /// # Errors
    /// For an unknown name.
    pub fn peer(name: &str) -> anyhow::Result<Self> {
        match name {
            "nginx" => Ok(Kind::Nginx),
            "haproxy" => Ok(Kind::Haproxy),
            "caddy" => Ok(Kind::Caddy),
            _ => anyhow::bail!("unknown peer {name:?}: use nginx, haproxy or caddy"),
        }
    }

    /// Display name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Rampart => "rampart",
            Kind::RampartUnlogged => "rampart-unlogged",
            Kind::Nginx => "nginx",
            Kind::NginxUnlogged => "nginx-unlogged",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        }
    }

    /// The executable a target runs (named when it fails to start).
    #[must_use]
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Rampart | Kind::RampartUnlogged => "rampart",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
            _ => "nginx",
        }
    }
}

/// A running target.
pub struct Running {
    /// Which one.
    pub kind: Kind,
    /// Plain HTTP address.
    pub http: SocketAddr,
    /// HTTPS address (`None` for the direct backend).
    pub https: Option<SocketAddr>,
    /// Its process (the one whose tree is measured).
    pub child: Child,
    /// Version string for the report.
    pub version: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// Stops a target and everything it started: SIGTERM first, so that a master process
/// (nginx, HAProxy in master-worker mode) takes its workers down with it — after a
/// SIGKILL of the master, nginx's workers live on, orphaned — then SIGKILL if it has
/// not exited within five seconds. Best effort: the process may already be gone.
pub fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A loopback port that was free a moment ago.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Writes the configuration of `kind` in `dir` and starts it with `workers` workers;
/// with `access_log`, it logs every request to `log/access.log` in its directory
/// (Rampart in that format; a directory of its own, as in production, for Rampart's
/// configuration watcher would wake at each write to its configuration's directory).
///
/// # Errors
/// When the binary is missing or the process cannot start.
pub fn start(
    kind: Kind,
    dir: &Path,
    up: &Upstreams,
    cert: &Cert,
    workers: usize,
    rampart: &Path,
    access_log: Option<super::LogFormat>,
) -> anyhow::Result<Running> {
    let (http, https) = (free_port()?, free_port()?);
    let dir = dir.join(kind.name());
    std::fs::create_dir_all(dir.join("log"))?;
    let (mut cmd, version) = match kind {
        Kind::Direct => anyhow::bail!("the direct backend is started by the caller"),
        Kind::Rampart | Kind::RampartUnlogged => {
            let cfg = dir.join("rampart.toml");
            let mut text = rampart_config(&dir, http, https, up, cert, workers);
            if let (Some(format), Kind::Rampart) = (access_log, kind) {
                let format = match format {
                    super::LogFormat::Json => "json",
                    super::LogFormat::Combined => "combined",
                };
                text = format!(
                    "[access_log]\npath = {:?}\nformat = \"{format}\"\n\n{text}",
                    dir.join("log/access.log")
                );
            }
            std::fs::write(&cfg, text)?;
            let mut c = Command::new(rampart);
            c.args(["proxy", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "error");
            (c, version_of(Command::new(rampart).arg("--version")))
        }
        Kind::Nginx | Kind::NginxUnlogged => {
            let cfg = dir.join("nginx.conf");
            let mut text = nginx_config(&dir, http, https, up, cert, workers);
            if access_log.is_some() && kind == Kind::Nginx {
                let line = format!("access_log {}/log/access.log;", dir.display());
                text = text.replace("access_log off;", &line);
            }
            std::fs::write(&cfg, text)?;
            let mut c = Command::new("nginx");
            c.arg("-p").arg(&dir).arg("-c").arg(&cfg);
            (c, version_of(Command::new("nginx").arg("-v")))
        }
        Kind::Haproxy => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(http, https, up, cert, workers))?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&cfg);
            (c, version_of(Command::new("haproxy").arg("-v")))
        }
        Kind::Caddy => {
            let cfg = dir.join("Caddyfile");
            std::fs::write(&cfg, caddy_config(http, https, up, cert))?;
            let mut c = Command::new("caddy");
            c.args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&cfg);
            c.env("GOMAXPROCS", workers.to_string())
                .env("XDG_DATA_HOME", &dir)
                .env("XDG_CONFIG_HOME", &dir)
                .env("HOME", &dir);
            (c, version_of(Command::new("caddy").arg("version")))
        }
    };
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} (is it installed?)", kind.binary()))?;
    Ok(Running {
        kind,
        http,
        https: Some(https),
        child,
        version,
    })
}

fn version_of(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn rampart_config(
    dir: &Path,
    http: SocketAddr,
    https: SocketAddr,
    up: &Upstreams,
    cert: &Cert,
    workers: usize,
) -> String {
    format!(
        r#"[server]
data_dir = {data:?}
threads = {workers}
grace_period = "0s"
shutdown_timeout = "1s"

[listeners]
http = "{http}"
https = "{https}"
admin = "{admin}"

# Every client of the benchmark is 127.0.0.1, and the peers have no per-address cap.
[limits]
max_connections = 100000
max_connections_per_ip = 100000

[[tls]]
hosts = ["{HOST}"]
source = {{ files = {{ cert = {cert:?}, key = {key:?} }} }}

[[routes]]
name = "big"
path_prefix = "/big"
action = {{ forward = "big" }}

# gzip at nginx's default level, for what nginx compresses by default (text/html).
[[routes]]
name = "html"
path_prefix = "/html"
{compress}action = {{ forward = "html" }}

[[routes]]
name = "h2up"
path_prefix = "/h2up"
action = {{ forward = "h2c" }}

[[routes]]
name = "grpc"
path_prefix = "/bench.Echo"
action = {{ forward = "h2c" }}

[[routes]]
name = "small"
action = {{ forward = "small" }}

[pools.small]
endpoints = [{{ address = "{small}" }}]

[pools.big]
endpoints = [{{ address = "{big}" }}]

[pools.html]
endpoints = [{{ address = "{html}" }}]

[pools.h2c]
protocol = "h2c"
endpoints = [{{ address = "{h2c}" }}]
"#,
        data = dir.join("data"),
        admin = free_port().map_or_else(|_| "127.0.0.1:0".to_string(), |a| a.to_string()),
        cert = cert.cert,
        key = cert.key,
        small = up.small,
        big = up.big,
        h2c = up.h2c,
        html = up.html,
        compress = if up.compress {
            "compress = { algorithms = [\"gzip\"], types = [\"text/html\"], levels = { gzip = 1 } }\n"
        } else {
            ""
        },
    )
}

fn nginx_config(
    dir: &Path,
    http: SocketAddr,
    https: SocketAddr,
    up: &Upstreams,
    cert: &Cert,
    workers: usize,
) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log crit;
worker_rlimit_nofile 19000;
events {{ worker_connections 60000; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  upstream small {{ server {small}; keepalive 1024; }}
  upstream big {{ server {big}; keepalive 1024; }}
  upstream h2c {{ server {h2c}; keepalive 1024; }}
  upstream html {{ server {html}; keepalive 1024; }}
  server {{
    listen {http};
    listen {https} ssl http2;
    server_name {HOST};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_http_version 1.1;
    proxy_set_header Connection '';
    # What Rampart sends every upstream by default (forwarding headers, a request id
    # and W3C trace context), so that the backend parses the same fields behind every
    # target.
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=$host";
    proxy_set_header X-Request-ID $request_id;
    proxy_set_header traceparent "00-$request_id-b7ad6b7169203331-01";
    proxy_buffering on;
    location / {{ proxy_pass http://small; }}
    location /big {{ proxy_pass http://big; }}
    # gzip with nginx's defaults (level 1, text/html); compressed from 1 KiB up.
    location /html {{ gzip on; gzip_min_length 1024; proxy_pass http://html; }}
    # nginx forwards HTTP/2 upstream only with grpc_pass (proxy_pass is HTTP/1.x).
    grpc_set_header X-Forwarded-For $remote_addr;
    grpc_set_header X-Forwarded-Proto $scheme;
    grpc_set_header X-Forwarded-Host $host;
    grpc_set_header Forwarded "for=$remote_addr;proto=$scheme;host=$host";
    grpc_set_header X-Request-ID $request_id;
    grpc_set_header traceparent "00-$request_id-b7ad6b7169203331-01";
    location /h2up {{ grpc_pass grpc://h2c; }}
    location /bench.Echo {{ grpc_pass grpc://h2c; }}
  }}
}}
"#,
        small = up.small,
        big = up.big,
        h2c = up.h2c,
        html = up.html,
        cert = cert.cert.display(),
        key = cert.key.display(),
    )
}

fn haproxy_config(
    http: SocketAddr,
    https: SocketAddr,
    up: &Upstreams,
    cert: &Cert,
    workers: usize,
) -> String {
    format!(
        r#"global
  nbthread {workers}
  # 2 descriptors per connection must fit the usual 20k open-files limit.
  maxconn 9500
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive
frontend fe
  bind {http}
  bind {https} ssl crt {combined} alpn h2,http/1.1
  # What Rampart sends every upstream by default (see the nginx configuration).
  option forwardfor
  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
  http-request set-header X-Forwarded-Proto http unless {{ ssl_fc }}
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header Forwarded "for=%[src];proto=%[req.hdr(x-forwarded-proto)];host=%[req.hdr(host)]"
  unique-id-format %[uuid()]
  unique-id-header X-Request-ID
  http-request set-header traceparent "00-%[unique-id,regsub(-,,g)]-b7ad6b7169203331-01"
  acl big path_beg /big
  acl html path_beg /html
  acl h2up path_beg /h2up /bench.Echo
  use_backend big if big
  use_backend html if html
  use_backend h2c if h2up
  default_backend small
backend small
  http-reuse always
  server s1 {small}
backend big
  http-reuse always
  server s1 {big}
backend h2c
  http-reuse always
  server s1 {h2c} proto h2
backend html
  http-reuse always
  # HAProxy's gzip runs at tune.comp.maxlevel, 1 by default.
  compression algo gzip
  compression type text/html
  server s1 {html}
"#,
        combined = cert.combined.display(),
        small = up.small,
        big = up.big,
        h2c = up.h2c,
        html = up.html,
    )
}

fn caddy_config(http: SocketAddr, https: SocketAddr, up: &Upstreams, cert: &Cert) -> String {
    format!(
        r"{{
  admin off
  auto_https off
}}
http://:{hport} {{
  bind {hip}
  handle /big* {{
    reverse_proxy {big}
  }}
  handle /html* {{
    encode {{
      gzip 1
    }}
    reverse_proxy {html}
  }}
  handle {{
    reverse_proxy {small}
  }}
}}
https://{HOST}:{sport} {{
  bind {sip}
  tls {cert} {key}
  handle /big* {{
    reverse_proxy {big}
  }}
  handle /html* {{
    encode {{
      gzip 1
    }}
    reverse_proxy {html}
  }}
  handle /h2up* {{
    reverse_proxy h2c://{h2c}
  }}
  handle /bench.Echo* {{
    reverse_proxy h2c://{h2c}
  }}
  handle {{
    reverse_proxy {small}
  }}
}}
",
        hport = http.port(),
        hip = http.ip(),
        sport = https.port(),
        sip = https.ip(),
        cert = cert.cert.display(),
        key = cert.key.display(),
        small = up.small,
        big = up.big,
        h2c = up.h2c,
        html = up.html,
    )
}

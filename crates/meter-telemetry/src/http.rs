//! A deliberately small HTTP/1.1 server for `/metrics` and `/health/*`.
//!
//! Scrapes and probes are a few requests a minute from trusted networks, so
//! one task per connection, one request per connection (`Connection: close`),
//! a bounded request head and a read timeout are all it needs; a web
//! framework would be more code to trust than this.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::Telemetry;

/// Longest request head accepted; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address is the user's to fix (in use, not local, malformed).
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Binds `addr` (e.g. `127.0.0.1:9464`; port 0 picks a free one) and serves
/// `telemetry` until the runtime shuts down. Returns the bound address.
pub async fn serve(addr: &str, telemetry: Telemetry) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|source| Error::Bind { addr: addr.to_owned(), source })?;
    info!(addr = %local, component = telemetry.component(), "serving /metrics and /health");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let t = telemetry.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &t).await {
                            debug!(%peer, error = %e, "metrics connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn handle(mut stream: TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return respond(&mut stream, 408, "text/plain", "request timeout\n").await,
        };
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => respond(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &telemetry.render()).await,
        "/health" | "/health/ready" => probe(&mut stream, telemetry.health().ready()).await,
        "/health/live" => probe(&mut stream, telemetry.health().live()).await,
        _ => respond(&mut stream, 404, "text/plain", "not found: try /metrics, /health/live, /health/ready\n").await,
    }
}

async fn probe(stream: &mut TcpStream, state: Result<(), String>) -> std::io::Result<()> {
    match state {
        Ok(()) => respond(stream, 200, "text/plain", "ok\n").await,
        Err(reason) => respond(stream, 503, "text/plain", &format!("{reason}\n")).await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_and_probes() {
        let t = Telemetry::new("sink");
        let retries = t.counter("meter_sink_insert_retries_total", "Batch inserts retried after a failure.");
        retries.inc_by(3);
        let addr = serve("127.0.0.1:0", t.clone()).await.unwrap();

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("meter_sink_insert_retries_total 3"), "{body}");
        assert!(body.contains(r#"meter_build_info{component="sink",version=""#), "{body}");

        t.health().beat();
        assert_eq!(get(addr, "/health/live").await.0, 200);
        let (status, body) = get(addr, "/health/ready").await;
        assert_eq!((status, body.as_str()), (503, "starting\n"));
        t.health().set_ready();
        assert_eq!(get(addr, "/health/ready").await.0, 200);
        assert_eq!(get(addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let first = serve("127.0.0.1:0", Telemetry::new("agent")).await.unwrap();
        let err = serve(&first.to_string(), Telemetry::new("agent")).await.unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot listen for metrics on {first}")), "{err}");
    }
}

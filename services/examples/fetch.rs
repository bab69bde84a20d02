//! The service shape par-imap is for: fetch N URLs, at most 16 at a time,
//! each with a deadline, results in input order as soon as each is ready.
//!
//! ```text
//! cargo run -p par-imap-services --example fetch
//! ```
//!
//! The example starts its own HTTP server on 127.0.0.1 (a free port): every
//! `/item/<n>` answers after `n % 7 * 10` ms, and `/item/13` never answers, so
//! it times out; with `try_par_imap_async`, the timeout fails the map there.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use futures::StreamExt;
use par_imap::ParImapExt;

/// A slow, sometimes stuck backend.
async fn item(Path(n): Path<u64>) -> String {
    if n == 13 {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_millis(n % 7 * 10)).await;
    format!("payload of item {n}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(listener, Router::new().route("/item/{n}", get(item))).await
    });

    let client = reqwest::Client::new();
    let urls: Vec<String> = (0..40)
        .map(|n| format!("http://{address}/item/{n}"))
        .collect();
    let start = Instant::now();
    let mut bodies = futures::stream::iter(urls)
        .try_par_imap_async(16, move |url: String| {
            let client = client.clone();
            async move {
                let body = client
                    .get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await?;
                anyhow::Ok((url, body))
            }
        })
        .timeout(Duration::from_millis(500));
    while let Some(result) = bodies.next().await {
        match result {
            Ok((url, body)) => println!("{:>6.1?}  {url}  {body}", start.elapsed()),
            Err(error) => println!("{:>6.1?}  error: {error}", start.elapsed()),
        }
    }
    println!(
        "items 0..13 in order, then item 13's timeout, then the end: nothing after it was waited for"
    );
    server.abort();
    Ok(())
}

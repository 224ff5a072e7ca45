//! Connects to a node, writes, reads and deletes a key.
//!
//! `cargo run --release --bin cache-node` in one terminal, then
//! `cargo run -p cache-client --example quickstart -- 127.0.0.1:7000`.

use std::time::Duration;

use cache_client::{Client, SetOptions};

#[tokio::main]
async fn main() -> Result<(), cache_client::Error> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".into());
    let client = Client::builder()
        .timeout(Duration::from_secs(1))
        .connect(addr)
        .await?;
    client.set("greeting", "hello, cache").await?;
    client
        .set_with(
            "session:1",
            "token",
            SetOptions::ttl(Duration::from_secs(30)),
        )
        .await?;
    let value = client.get("greeting").await?;
    println!(
        "greeting = {:?}",
        value.as_deref().map(String::from_utf8_lossy)
    );
    let entry = client.get_entry("session:1").await?;
    println!("session:1 expires in {:?}", entry.and_then(|e| e.ttl));
    println!("deleted greeting: {}", client.delete("greeting").await?);
    println!("greeting now = {:?}", client.get("greeting").await?);
    Ok(())
}

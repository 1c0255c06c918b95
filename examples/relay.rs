//! A benchmark instrument, not part of the gateway: a TCP relay that gives each client a
//! connection of its own to the upstream and copies bytes both ways, parsing nothing. It makes
//! the same system calls per request as a keep-alive HTTP proxy (one read and one write on
//! each side), on the runtime wxgate uses, with one worker as the benchmark runs wxgate. Its
//! requests per CPU-second are what any proxy on this runtime could reach on the machine at
//! hand, before doing any HTTP, while each client has an upstream connection of its own
//! (`examples/pipelined_relay.rs` shares one); `bench/bench.py` reports it beside nginx and
//! wxgate.
//!
//! Usage: relay LISTEN_ADDR UPSTREAM_ADDR

mod relay_setup;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let (listen, upstream) = relay_setup::listen_and_upstream("relay")?;
    relay_setup::runtime()?.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(relay(client, upstream));
        }
    })
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(upstream).await?;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

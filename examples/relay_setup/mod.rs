//! How both benchmark relays start: their two addresses from the command line, and the runtime
//! the benchmark runs wxgate on (current-thread, one worker).

use std::io::{Error, ErrorKind};
use std::net::SocketAddr;

use tokio::runtime::Runtime;

/// `LISTEN_ADDR UPSTREAM_ADDR`; exits with the usage line when either is missing.
pub fn listen_and_upstream(program: &str) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: {program} LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let parse = |addr: String| {
        addr.parse::<SocketAddr>()
            .map_err(|err| Error::new(ErrorKind::InvalidInput, err))
    };
    Ok((parse(listen)?, parse(upstream)?))
}

pub fn runtime() -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
}

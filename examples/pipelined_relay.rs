//! A benchmark instrument, not part of the gateway: a relay that pipelines. Where
//! `examples/relay.rs` gives each client an upstream connection of its own, this one writes the
//! requests of every client that is ready in the same turn of the event loop to one upstream
//! connection in one write, and splits the answers it reads back among those clients in order.
//! The client side still costs one read and one write per request; the upstream side costs
//! one write and about one read per batch. Its requests per CPU-second, beside the plain
//! relay's, measure what pipelining to the upstream would save a proxy on this runtime, before
//! doing any HTTP of its own; `bench/bench.py` reports it beside nginx and wxgate.
//!
//! It knows just enough HTTP to find where a message ends: requests have no body (what wrk
//! sends), and answers carry `Content-Length` (what the benchmark's upstream sends).
//!
//! Usage: pipelined_relay LISTEN_ADDR UPSTREAM_ADDR

mod relay_setup;

use std::collections::VecDeque;
use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// The requests waiting to be written, and the clients waiting for answers, oldest first: the
/// upstream answers pipelined requests in the order it got them.
#[derive(Default)]
struct Queue {
    unsent: Vec<u8>,
    waiting: VecDeque<oneshot::Sender<Vec<u8>>>,
}

#[derive(Default)]
struct Pipeline {
    queue: Mutex<Queue>,
    requests_ready: Notify,
}

fn main() -> std::io::Result<()> {
    let (listen, upstream) = relay_setup::listen_and_upstream("pipelined_relay")?;
    relay_setup::runtime()?.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let pipeline = Arc::new(Pipeline::default());
        tokio::spawn(keep_pipelining(upstream, pipeline.clone()));
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(serve(client, pipeline.clone()));
        }
    })
}

/// Holds the upstream connection: opened when the first requests are queued, and opened again
/// whenever the upstream closes it (as it does to a connection idle for its keep-alive time).
async fn keep_pipelining(upstream: SocketAddr, pipeline: Arc<Pipeline>) {
    loop {
        pipeline.requests_ready.notified().await;
        if let Err(err) = pipeline_over_one_connection(upstream, &pipeline).await {
            eprintln!("the upstream connection failed: {err}");
        }
        // Requests sent on the closed connection get no answer there: their clients'
        // receivers fail, and those clients' connections close.
        let mut queue = pipeline.queue.lock().expect("the pipeline's queue");
        queue.waiting.clear();
        queue.unsent.clear();
    }
}

/// Returns when the upstream closes the connection.
async fn pipeline_over_one_connection(
    upstream: SocketAddr,
    pipeline: &Pipeline,
) -> std::io::Result<()> {
    let connection = TcpStream::connect(upstream).await?;
    connection.set_nodelay(true)?;
    let (from_upstream, to_upstream) = connection.into_split();
    // What woke the caller is still queued, for the writer.
    pipeline.requests_ready.notify_one();
    tokio::select! {
        closed = write_requests(to_upstream, pipeline) => closed,
        closed = read_answers(from_upstream, pipeline) => closed,
    }
}

async fn serve(mut client: TcpStream, pipeline: Arc<Pipeline>) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut received = Vec::with_capacity(4096);
    let mut answers = Vec::new();
    loop {
        if client.read_buf(&mut received).await? == 0 {
            return Ok(());
        }
        {
            let mut queue = pipeline.queue.lock().expect("the pipeline's queue");
            while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                let (answered, answer) = oneshot::channel();
                queue.unsent.extend(received.drain(..end + 4));
                queue.waiting.push_back(answered);
                answers.push(answer);
            }
        }
        pipeline.requests_ready.notify_one();
        for answer in answers.drain(..) {
            let answer = answer
                .await
                .map_err(|_| Error::new(ErrorKind::BrokenPipe, "the upstream connection closed"))?;
            client.write_all(&answer).await?;
        }
    }
}

/// Writes whatever the clients have queued since the last write, in one write: the requests
/// of every client that was ready in the same turn of the event loop.
async fn write_requests(mut upstream: OwnedWriteHalf, pipeline: &Pipeline) -> std::io::Result<()> {
    let mut batch = Vec::new();
    loop {
        pipeline.requests_ready.notified().await;
        std::mem::swap(
            &mut batch,
            &mut pipeline.queue.lock().expect("the pipeline's queue").unsent,
        );
        upstream.write_all(&batch).await?;
        batch.clear();
    }
}

async fn read_answers(mut upstream: OwnedReadHalf, pipeline: &Pipeline) -> std::io::Result<()> {
    let mut received = Vec::with_capacity(64 * 1024);
    loop {
        if upstream.read_buf(&mut received).await? == 0 {
            return Ok(());
        }
        let mut start = 0;
        while let Some(length) = answer_length(&received[start..])? {
            let answered = pipeline
                .queue
                .lock()
                .expect("the pipeline's queue")
                .waiting
                .pop_front()
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "an answer nobody asked for"))?;
            // A client that left has dropped its receiver, and its answer goes nowhere.
            answered.send(received[start..start + length].to_vec()).ok();
            start += length;
        }
        received.drain(..start);
    }
}

/// The length of the whole answer at the start of `bytes`, once all of it has arrived.
fn answer_length(bytes: &[u8]) -> std::io::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let head = match answer.parse(bytes) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(Error::new(ErrorKind::InvalidData, err)),
    };
    let body = answer
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("content-length"))
        .and_then(|header| {
            std::str::from_utf8(header.value)
                .ok()?
                .parse::<usize>()
                .ok()
        })
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "an answer without Content-Length"))?;
    Ok((bytes.len() >= head + body).then_some(head + body))
}

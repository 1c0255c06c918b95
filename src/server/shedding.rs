//! HTTP/1 connections that give their buffers back while idle.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for the whole life of an HTTP/1
//! connection, idle or not, and no setting makes them smaller. Mini-programs keep connections
//! alive for minutes between a user's taps, so for a gateway with many clients those buffers
//! would be most of its memory. A connection that has idled for [`SHED_AFTER`] is therefore
//! ended at the HTTP level only: the socket is kept, hyper's connection and buffers are
//! dropped, and a new hyper connection starts on the same socket when the client sends its
//! next request. The client sees one keep-alive connection throughout.
//!
//! hyper has no such mode of its own: its connection ends when the socket reads end-of-file.
//! [`Shedding`] reads as end-of-file once the connection has idled long enough, and skips the
//! shutdown hyper then asks for, so that hyper ends while the socket lives on.
//!
//! hyper has no write timeout either: a client that asks for a large answer and reads none of
//! it would hold its connection, and the upstream's, for ever. [`Shedding`] fails a write
//! once the client has taken nothing for `header_timeout`, as the fast lane does.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::proxy::StallLimit;

/// How long an HTTP/1 connection idles with hyper's buffers before it sheds them. Longer than
/// the gap between a busy client's requests, so that those do not pay for a new hyper
/// connection each time (a few microseconds, against the client's own pause); short, because
/// the buffers of every connection that has not shed yet are in memory at once: a burst of
/// clients that connect and then idle costs their arrival rate times this many buffers.
pub const SHED_AFTER: Duration = Duration::from_millis(50);

/// What the service and the socket of one connection tell each other.
#[derive(Default)]
pub struct Activity {
    /// Requests whose response hyper has not finished with.
    in_flight: AtomicU32,
    /// Bytes arrived since the connection last went idle: a request is on its way.
    arrived: AtomicBool,
    /// The connection switched protocols: what it carries is no longer HTTP/1.
    upgraded: AtomicBool,
}

impl Activity {
    /// Counts a request in flight until the returned guard is dropped, with its response body.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The connection is switching protocols: it must never look idle to hyper again.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && !self.arrived.load(Ordering::Relaxed)
            && !self.upgraded.load(Ordering::Relaxed)
    }
}

/// One request of a connection, from its head until hyper drops its response body.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.arrived.store(false, Ordering::Relaxed);
        }
    }
}

/// The client's socket as hyper reads and writes it, with the bytes read before hyper took
/// over (to tell HTTP/1 from HTTP/2) put back in front.
pub struct Shedding {
    stream: TcpStream,
    replay: Vec<u8>,
    replayed: usize,
    activity: Arc<Activity>,
    /// Reset whenever an idle spell starts; polled only while idle.
    idle_deadline: Pin<Box<Sleep>>,
    /// The deadline belongs to the idle spell under way.
    armed: bool,
    shed: bool,
    write_stall: StallLimit,
}

impl Shedding {
    /// A client that takes none of what is written to it for `write_limit` is given up on.
    pub fn new(
        stream: TcpStream,
        replay: Vec<u8>,
        activity: Arc<Activity>,
        write_limit: Duration,
    ) -> Shedding {
        Shedding {
            stream,
            replay,
            replayed: 0,
            activity,
            idle_deadline: Box::pin(tokio::time::sleep(SHED_AFTER)),
            armed: false,
            shed: false,
            write_stall: StallLimit::new(write_limit),
        }
    }

    /// The socket, when hyper's connection ended by shedding; `None` when it really ended.
    pub fn into_shed_stream(self) -> Option<TcpStream> {
        self.shed.then_some(self.stream)
    }

    /// A write's outcome, or `TimedOut` in place of the wait once the client has taken
    /// nothing for `write_limit`.
    fn within_write_limit<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.write_stall.went_on();
            return written;
        }
        ready!(self.write_stall.poll_over(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took none of the answer within header_timeout",
        )))
    }
}

impl AsyncRead for Shedding {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let left = &this.replay[this.replayed..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.replayed += n;
            this.activity.arrived.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.activity.arrived.store(true, Ordering::Relaxed);
                this.armed = false;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.activity.idle() => {
                if !this.armed {
                    this.idle_deadline
                        .as_mut()
                        .reset(Instant::now() + SHED_AFTER);
                    this.armed = true;
                }
                if this.idle_deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // An empty read is end-of-file to hyper, which then ends its connection.
                this.shed = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Shedding {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.within_write_limit(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.within_write_limit(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Skipped after shedding: the client's connection goes on, only hyper's ends.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.shed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

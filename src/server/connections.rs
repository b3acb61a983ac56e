//! The gRPC listener's serve loop: accepts connections and serves tonic's routes on each over
//! HTTP/2 (hyper), as tonic's own server does per connection (HTTP/2 only, the header list
//! bound, the caller's `grpc-timeout`, the connection's connect info in every request), with
//! one difference: a connection's maximum age is drawn per connection, within ±10% of the
//! configured age (gRPC's MAX_CONNECTION_AGE jitter), so connections opened together (every
//! client reconnecting after a rollout) are not all sent their GOAWAY together. And a client
//! that falls silent is not borne for ever (`Silence`): one that has not sent its HTTP/2
//! preface within a bound is closed, and one from which nothing has arrived for a while is
//! sent a PING, and closed unless it answers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{Either, FutureExt, Map};
use futures::{Stream, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Timeout, error::Elapsed};
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tracing::{debug, trace, warn};

/// Draws a connection's maximum age from the configured one.
#[derive(Clone)]
pub struct AgeDraw(Arc<dyn Fn(Duration) -> Duration + Send + Sync>);

impl AgeDraw {
    /// Uniformly within ±10% of the configured age (gRPC's proposal A9).
    pub fn jittered() -> AgeDraw {
        AgeDraw(Arc::new(|age| jitter(age, rand::random::<f64>())))
    }

    pub fn new(draw: impl Fn(Duration) -> Duration + Send + Sync + 'static) -> AgeDraw {
        AgeDraw(Arc::new(draw))
    }

    fn draw(&self, age: Duration) -> Duration {
        (self.0)(age)
    }
}

impl std::fmt::Debug for AgeDraw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgeDraw")
    }
}

/// `age` scaled into [0.9, 1.1] by `unit`, a draw in [0, 1).
fn jitter(age: Duration, unit: f64) -> Duration {
    // At most 1.1 × the configured bound of a week: mul_f64 cannot overflow.
    age.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// Streams a client may reset before the server has taken them (h2's default).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams a client's protocol errors may make the server reset (hyper's default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// How long the broker bears a connection that falls silent. tonic's server bears it for ever
/// (no keepalive pings, no bound on the preface), so a client could hold connections (each a
/// task, its buffers and a file descriptor) without speaking, and a peer gone without closing
/// (a host lost, a network cut) would hold its connection, and the watches on it, counted
/// against its caller's watch limit, until the kernel gave up on it, if it ever did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Silence {
    /// The client's HTTP/2 preface must have arrived within this of the connection's start
    /// (after TLS's handshake, itself bounded): every HTTP/2 client sends it at once.
    pub preface: Duration,
    /// A connection from which nothing has arrived for this long is sent a PING...
    pub ping_after: Duration,
    /// ...and closed if the PING is not answered within this. Every HTTP/2 client answers
    /// PINGs by itself, so an idle client loses nothing; gRPC's own servers ping idle
    /// connections too, and clients do not count the server's pings against it.
    pub ping_timeout: Duration,
}

impl Default for Silence {
    fn default() -> Silence {
        Silence {
            preface: Duration::from_secs(10),
            ping_after: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(20),
        }
    }
}

/// How long the serve loop waits after accept failed for want of file descriptors or memory.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line of a kind in this long (`Throttled`).
const THROTTLED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether accept failed for want of resources (file descriptors, memory): not the peer's
/// doing, and not over until some are freed.
fn out_of_resources(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e)
        .is_some_and(|n| [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].contains(&n))
}

/// At most one log line per `THROTTLED_LOG_EVERY` for one kind of event (accept
/// failing for want of resources, the connection bound reached), with the count of those not
/// logged.
#[derive(Default)]
pub(crate) struct Throttled {
    last_logged: Option<tokio::time::Instant>,
    not_logged: u64,
}

impl Throttled {
    /// Whether a line may be written now; if so, how many were not since the last one.
    fn due(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < THROTTLED_LOG_EVERY)
        {
            self.not_logged += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.not_logged))
    }

    /// Logs accept failing with `e` (for want of resources), throttled.
    pub(crate) fn accept_failed(&mut self, e: &std::io::Error) {
        if let Some(not_logged) = self.due() {
            warn!(
                error = %e,
                not_logged,
                "cannot accept connections (out of file descriptors or memory: raise the limit, or fewer connections); new connections wait meanwhile"
            );
        }
    }
}

/// How the serve loop serves each connection.
#[derive(Clone, Debug)]
pub struct PerConnection {
    /// GOAWAY at this age (drawn per connection by `draw`); never without one.
    pub max_age: Option<Duration>,
    pub draw: AgeDraw,
    /// HTTP/2 streams a connection may have open at once.
    pub max_streams: u32,
    /// Connections served at once: past it, the loop takes no new one until one closes.
    pub max_connections: usize,
    pub silence: Silence,
}

/// The HTTP/2 settings tonic's server applies with the broker's configuration: the header
/// list bounded to 32 KiB (bearer tokens are at most 16 KiB), and hyper's timer for its
/// background work. Three settings differ from tonic's. Keepalive PINGs are sent to a
/// connection gone silent (`Silence`), where tonic sends none. Concurrent streams are
/// bounded per connection (`server.max_concurrent_streams`), where tonic sets no bound: the
/// in-flight and watch limits count calls only once they are admitted, and each stream
/// opened costs memory (its state, a task, its buffers) before that, so one connection could
/// otherwise open streams without end. And hyper's bound on the streams a connection may make
/// the server reset for the peer's protocol errors (1024, then GOAWAY) is kept, where tonic
/// turns it off: it is h2's defence against a peer making the server reset streams without end
/// (RUSTSEC-2024-0003; "MadeYouReset", CVE-2025-8671), and no well-behaved client comes near
/// it. It is set here rather than left to the libraries' defaults, as is h2's bound on the
/// streams a client resets before the server has taken them (20, then GOAWAY): the defence
/// against rapid reset (CVE-2023-44487), a client opening and cancelling calls faster than
/// they are taken. The header list bound also bounds a header block's CONTINUATION frames
/// (h2 takes as many as 32 KiB needs, then GOAWAY), so a block never ended is not buffered.
fn http2_builder(max_streams: u32, silence: Silence, streams: Streams) -> http2::Builder<Streams> {
    let mut builder = http2::Builder::new(streams);
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(silence.ping_after)
        .keep_alive_timeout(silence.ping_timeout)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(32 * 1024)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    builder
}

/// Serves `routes` on the connections `incoming` yields until `shutdown` resolves; then
/// accepts no more (`incoming` is dropped, closing the listener), sends every connection a
/// GOAWAY, and returns once their calls in flight have finished. Dropping the returned future
/// closes the connections still open.
pub async fn serve<IO>(
    incoming: impl Stream<Item = Result<IO, std::io::Error>>,
    routes: Routes,
    each: PerConnection,
    streams: Streams,
    shutdown: impl Future<Output = ()>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let http2 = Arc::new(http2_builder(each.max_streams, each.silence, streams));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refused_accepts = Throttled::default();
    let mut full = Throttled::default();
    {
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                // At the bound, new connections wait (the kernel's listen backlog, or the TLS
                // listener's queue) until a connection closes, which the reaping below sees.
                io = incoming.next(), if connections.len() < each.max_connections => match io {
                    Some(Ok(io)) => {
                        let age = each.max_age.map(|a| each.draw.draw(a));
                        connections.spawn(serve_connection(
                            io,
                            routes.clone(),
                            http2.clone(),
                            age,
                            each.silence.preface,
                            stop_rx.clone(),
                        ));
                        if connections.len() >= each.max_connections
                            && full.due().is_some()
                        {
                            warn!(
                                max_connections = each.max_connections,
                                "serving server.max_connections connections: new ones wait until one closes"
                            );
                        }
                    }
                    Some(Err(e)) if out_of_resources(&e) => {
                        // The connection stays in the backlog and accept fails again at
                        // once: asking again at once would spin a thread while the process
                        // is out of file descriptors (or memory). Wait, as hyper did.
                        refused_accepts.accept_failed(&e);
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    // A connection the peer ended before it was taken: the peer's.
                    Some(Err(e)) => trace!(error = %e, "error accepting connection"),
                    None => break,
                },
                // Finished connections are reaped as they go.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
    let _ = stop_tx.send(true);
    trace!(open = connections.len(), "waiting for connections to close");
    while connections.join_next().await.is_some() {}
}

/// Serves one connection until it closes; sends it a GOAWAY at its age or at shutdown,
/// whichever comes first, and lets its calls in flight (and watches) finish: there is no
/// grace after which they are cut, so a connection holding a watch stays open for it (while
/// its client answers PINGs). A connection whose client has not sent the HTTP/2 preface
/// within `preface` is closed.
async fn serve_connection<IO>(
    io: IO,
    routes: Routes,
    http2: Arc<http2::Builder<Streams>>,
    age: Option<Duration>,
    preface: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    let service = ConnectionService {
        routes,
        info: io.connect_info(),
    };
    let (heard, mut prefaced) = tokio::sync::oneshot::channel();
    let io = Heard {
        io,
        read: 0,
        heard: Some(heard),
    };
    let mut conn = pin!(http2.serve_connection(TokioIo::new(io), service));
    {
        let silent = async {
            match tokio::time::timeout(preface, &mut prefaced).await {
                Err(_) => (),
                // Prefaced, or the connection is over (served, below).
                Ok(_) => std::future::pending().await,
            }
        };
        let aged = async {
            match age {
                Some(age) => tokio::time::sleep(age).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    debug!(error = %e, "failed serving connection");
                }
                return;
            }
            () = silent => {
                // Dropping the connection closes it: there is no HTTP/2 to say GOAWAY in.
                debug!(bound = ?preface, "no HTTP/2 preface within the bound; connection closed");
                return;
            }
            () = aged => trace!("connection reached its maximum age"),
            _ = stop.wait_for(|s| *s) => {}
        }
    }
    // Without its preface a connection has no call to finish, and hyper's graceful shutdown
    // would wait for the preface (the handshake) before closing: shutdown would be held up
    // to its drain bound by a client that connected and said nothing. (Once received, the
    // preface was taken from the channel: `Closed`, not `Empty`.)
    if matches!(
        prefaced.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty)
    ) {
        debug!("connection closed before its HTTP/2 preface");
        return;
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        debug!(error = %e, "failed serving connection");
    }
}

/// The length of the client's HTTP/2 connection preface (RFC 9113 §3.4), before its SETTINGS.
const PREFACE_LEN: usize = 24;

/// A connection's IO, telling `heard` once the client has sent as many bytes as the HTTP/2
/// preface holds (h2 checks what they are: a connection that sent others is closed).
struct Heard<IO> {
    io: IO,
    read: usize,
    heard: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Heard<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if self.heard.is_some() {
            self.read += buf.filled().len() - before;
            if self.read >= PREFACE_LEN
                && let Some(heard) = self.heard.take()
            {
                let _ = heard.send(());
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Heard<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs the tasks hyper spawns for HTTP/2 streams (each call's handler) and counts those
/// alive, so that shutdown can wait for them to end. Closing connections (at the drain
/// bound) does not end their streams' tasks at once: each ends when next polled, dropping
/// its handler, which writes a request's `cancelled` audit record; the final flush of the
/// audit trail must come after those. One reference count more per stream, no lock.
#[derive(Clone, Default)]
pub struct Streams(Arc<Live>);

#[derive(Default)]
struct Live {
    count: std::sync::atomic::AtomicUsize,
    none: tokio::sync::Notify,
}

/// A stream task's place in the count, given back when the task ends (or is dropped).
struct Alive(Arc<Live>);

impl Drop for Alive {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.none.notify_waiters();
        }
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let alive = Alive(self.0.clone());
        tokio::spawn(async move {
            let _alive = alive;
            fut.await
        });
    }
}

impl Streams {
    /// Returns once no stream task is alive (new ones are not expected: the listener is
    /// closed), or after `bound`; false then.
    pub async fn ended(&self, bound: Duration) -> bool {
        let none = async {
            loop {
                let notified = self.0.none.notified();
                let mut notified = pin!(notified);
                notified.as_mut().enable();
                if self.0.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(bound, none).await.is_ok()
    }
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field(
                "alive",
                &self.0.count.load(std::sync::atomic::Ordering::Relaxed),
            )
            .finish()
    }
}

/// tonic's routes for one connection's requests, each given the connection's connect info
/// (`TcpConnectInfo`, or TLS's `TlsPeer`).
struct ConnectionService<I> {
    routes: Routes,
    info: I,
}

type RoutesFuture = <Routes as tonic::codegen::Service<Request<Incoming>>>::Future;
type Answer = Result<Response<Body>, Infallible>;

impl<I: Clone + Send + Sync + 'static> hyper::service::Service<Request<Incoming>>
    for ConnectionService<I>
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future =
        Either<Map<Timeout<RoutesFuture>, fn(Result<Answer, Elapsed>) -> Answer>, RoutesFuture>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        let deadline = grpc_timeout(req.headers());
        if let Some(d) = deadline {
            // Taken before the timer below starts: once it has fired, this has passed.
            req.extensions_mut()
                .insert(CallerDeadline(tokio::time::Instant::now() + d));
        }
        // Routes (an axum router) is always ready, and a clone is a reference count.
        let call = tonic::codegen::Service::call(&mut self.routes.clone(), req);
        match deadline {
            Some(d) => Either::Left(tokio::time::timeout(d, call).map(out_of_time)),
            None => Either::Right(call),
        }
    }
}

/// When the caller's deadline (`grpc-timeout`) passes, in each request that has one: a
/// request cut by it is counted `DEADLINE_EXCEEDED` (as its caller sees it), not as one its
/// caller cancelled, though the answer on the wire is tonic's `CANCELLED`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallerDeadline(pub(crate) tokio::time::Instant);

/// A call past the caller's deadline answers CANCELLED, as tonic's server does.
fn out_of_time(answer: Result<Answer, Elapsed>) -> Answer {
    answer.unwrap_or_else(|_| {
        let (parts, ()) = tonic::Status::cancelled(tonic::TimeoutExpired(()).to_string())
            .into_http::<()>()
            .into_parts();
        Ok(Response::from_parts(parts, Body::empty()))
    })
}

/// The caller's deadline (`grpc-timeout`: at most 8 digits and a unit, gRPC over HTTP/2);
/// none when absent or malformed, as tonic's server reads it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn accept_failing_for_want_of_file_descriptors_is_asked_again_after_a_pause_not_at_once()
    {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Poll;
        // Accept fails with EMFILE (a thousand times, then waits): the connection stays in
        // the backlog, and a loop asking again at once would spin.
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        let incoming = futures::stream::poll_fn(move |_| {
            if counted.fetch_add(1, Ordering::SeqCst) < 1000 {
                Poll::Ready(Some(Err::<tokio::net::TcpStream, _>(
                    std::io::Error::from_raw_os_error(24),
                )))
            } else {
                Poll::Pending
            }
        });
        let each = super::PerConnection {
            max_age: None,
            draw: super::AgeDraw::jittered(),
            max_streams: 16,
            max_connections: 16,
            silence: super::Silence::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(super::serve(
            incoming,
            tonic::service::Routes::default(),
            each,
            super::Streams::default(),
            async {
                let _ = stopped.await;
            },
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = asked.load(Ordering::SeqCst);
        assert!((5..=15).contains(&n), "asked {n} times in a second");
        let _ = stop.send(());
        serving.await.unwrap();
    }

    #[test]
    fn ages_are_drawn_within_ten_percent_of_the_configured_age_and_spread() {
        let age = Duration::from_secs(600);
        let draw = super::AgeDraw::jittered();
        let ages: Vec<Duration> = (0..1000).map(|_| draw.draw(age)).collect();
        let (low, high) = (age.mul_f64(0.9), age.mul_f64(1.1));
        assert!(
            ages.iter().all(|a| (low..=high).contains(a)),
            "{:?} .. {:?}",
            ages.iter().min(),
            ages.iter().max()
        );
        assert!(ages.iter().any(|a| *a != ages[0]), "{ages:?}");
        // Spread over the whole range, not bunched: both tenths of it at the ends are hit.
        assert!(ages.iter().any(|a| *a < age.mul_f64(0.92)));
        assert!(ages.iter().any(|a| *a > age.mul_f64(1.08)));
        assert_eq!(super::jitter(age, 0.0), low);
        assert_eq!(super::jitter(age, 0.5), age);
    }

    #[test]
    fn the_callers_deadline_is_read_as_tonic_reads_it() {
        let read = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            super::grpc_timeout(&h)
        };
        assert_eq!(read("3S"), Some(Duration::from_secs(3)));
        assert_eq!(read("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(read("5M"), Some(Duration::from_secs(300)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("7u"), Some(Duration::from_micros(7)));
        assert_eq!(read("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(read("99999999S"), Some(Duration::from_secs(99_999_999)));
        for bad in ["", "S", "123456789S", "3s", "-3S", "3"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(super::grpc_timeout(&http::HeaderMap::new()), None);
    }
}

//! One QUIC endpoint per broker, and the handshake that turns a QUIC connection into an
//! authenticated [`Link`].
//!
//! Trust is per peer broker (see `meshd_certs::PeerTrust`): when dialing, the server
//! certificate must chain to *that broker's* org CA and name that broker; when accepting,
//! the client certificate must chain to the CA of the configured peer broker it names.
//! TLS 1.3 lets a dialer finish `connect()` before the acceptor has judged its
//! certificate, so a link counts as up only once the other broker's [`Hello`] has
//! arrived, and the hello must carry the name the certificate was verified for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshd_certs::{BrokerIdentity, PeerTrust};
use meshd_protocol::fed::{
    self, ALPN, CloseReason, Frame, FrameError, Hello, HelloError, LEN_PREFIX, StreamClass,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use tokio::io::AsyncReadExt as _;

/// Transport settings of the endpoint.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// QUIC keep-alive interval.
    pub keepalive: Duration,
    /// A link silent this long is dead.
    pub idle_timeout: Duration,
    /// Largest frame accepted or sent.
    pub max_frame_bytes: usize,
    /// Time allowed for the QUIC + hello handshake.
    pub handshake_timeout: Duration,
}

/// Why an endpoint could not start or a link could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// TLS configuration could not be built from the identity and trust.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind the federation endpoint on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The QUIC connection failed (includes a broker refusing our certificate, seen as a
    /// TLS alert on the first stream operation).
    #[error("connection to {addr}: {reason}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The other broker's certificate is not acceptable.
    #[error("peer certificate refused: {0}")]
    Certificate(String),
    /// The hello was refused.
    #[error(transparent)]
    Hello(#[from] HelloError),
    /// A frame was bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream or connection failed.
    #[error("{0}")]
    Io(String),
    /// The other broker broke the link protocol (an unexpected frame or stream, a claim too many).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The link handler's store failed (the link starts over and reads it again).
    #[error("{what}: {source}")]
    Store {
        /// What the handler was doing.
        what: &'static str,
        /// The store's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The handler ends the link on purpose, to start it over from the store.
    #[error("restarting the link: {0}")]
    Restart(&'static str),
    /// The handshake took too long.
    #[error("handshake timed out")]
    Timeout,
    /// The other broker closed the link with a reason.
    #[error("closed by peer: {}", .0.as_str())]
    Closed(CloseReason),
}

impl LinkError {
    /// Short label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Tls(_) => "tls_config",
            Self::Bind { .. } => "bind",
            Self::Connect { .. } => "connect",
            Self::Certificate(_) => "certificate",
            Self::Hello(_) => "hello",
            Self::Frame(_) => "frame",
            Self::Io(_) => "io",
            Self::Protocol(_) => "protocol",
            Self::Store { .. } => "store",
            Self::Restart(_) => "restart",
            Self::Timeout => "timeout",
            Self::Closed(_) => "closed",
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> LinkError {
    LinkError::Io(e.to_string())
}

/// The broker's QUIC endpoint: one UDP socket that dials and accepts.
#[derive(Debug, Clone)]
pub struct Endpoint {
    ep: quinn::Endpoint,
    me: Arc<str>,
    identity: Arc<BrokerIdentity>,
    trust: Arc<PeerTrust>,
    transport: Arc<quinn::TransportConfig>,
    opts: LinkOptions,
}

impl Endpoint {
    /// Binds the endpoint on `addr`.
    ///
    /// # Errors
    /// [`LinkError::Tls`] or [`LinkError::Bind`].
    pub fn bind(
        addr: SocketAddr,
        identity: BrokerIdentity,
        trust: PeerTrust,
        opts: LinkOptions,
    ) -> Result<Self, LinkError> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(opts.keepalive));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(opts.idle_timeout).map_err(io_err)?,
        ));
        // A few streams per class and direction are plenty; the window is generous so a
        // catch-up after a cut is not flow-control bound.
        transport.max_concurrent_bidi_streams(8u32.into());
        transport.max_concurrent_uni_streams(8u32.into());
        transport.stream_receive_window((8u32 << 20).into());
        transport.receive_window((32u32 << 20).into());
        transport.send_window(32 << 20);
        let transport = Arc::new(transport);
        let tls = trust
            .server_config(&identity, ALPN)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let crypto = QuicServerConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        let ep = quinn::Endpoint::server(server, addr)
            .map_err(|source| LinkError::Bind { addr, source })?;
        Ok(Self {
            ep,
            me: Arc::from(identity.name()),
            identity: Arc::new(identity),
            trust: Arc::new(trust),
            transport,
            opts,
        })
    }

    /// The bound UDP address.
    ///
    /// # Errors
    /// The socket's error.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.ep.local_addr()
    }

    /// This broker's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// The trust configuration (peer broker names and anchors).
    pub fn trust(&self) -> &PeerTrust {
        &self.trust
    }

    /// Largest frame accepted.
    pub const fn max_frame_bytes(&self) -> usize {
        self.opts.max_frame_bytes
    }

    /// Dials `broker` at `addr`, verifies it and exchanges hellos.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn dial(
        &self,
        broker: &str,
        addr: SocketAddr,
        hello: Hello,
    ) -> Result<Link, LinkError> {
        self.dial_with(broker, addr, move || hello).await
    }

    /// [`Self::dial`] with the hello made once the QUIC handshake is done (just before it
    /// is sent), so it describes the state of that moment, not of the dial's start.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn dial_with(
        &self,
        broker: &str,
        addr: SocketAddr,
        hello: impl FnOnce() -> Hello + Send,
    ) -> Result<Link, LinkError> {
        tokio::time::timeout(
            self.opts.handshake_timeout,
            self.dial_inner(broker, addr, hello),
        )
        .await
        .map_err(|_| LinkError::Timeout)?
    }

    async fn dial_inner(
        &self,
        broker: &str,
        addr: SocketAddr,
        hello: impl FnOnce() -> Hello + Send,
    ) -> Result<Link, LinkError> {
        let tls = self
            .trust
            .client_config(broker, &self.identity, ALPN)
            .map_err(|e| LinkError::Tls(e.to_string()))?;
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(self.transport.clone());
        let conn = self
            .ep
            .connect_with(client, addr, broker)
            .map_err(|e| LinkError::Connect {
                addr,
                reason: e.to_string(),
            })?
            .await
            .map_err(|e| LinkError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        // The verifier already checked chain and name; check again on what the connection
        // actually holds, so a verifier bug cannot register the wrong broker.
        let chain = broker_chain(&conn)?;
        self.trust
            .verify_for(broker, &chain)
            .map_err(|e| LinkError::Certificate(e.to_string()))?;
        // Errors from here on may be the acceptor refusing *our* certificate.
        let connect_err = |e: LinkError| match e {
            LinkError::Io(reason) => LinkError::Connect { addr, reason },
            other => other,
        };
        let (send, recv) = conn.open_bi().await.map_err(io_err).map_err(connect_err)?;
        let mut control = Control {
            tx: FrameWriter::new(send, self.opts.max_frame_bytes),
            rx: FrameReader::new(recv, self.opts.max_frame_bytes),
        };
        let hello = hello();
        control
            .tx
            .send(&Frame::Hello(hello.clone()))
            .await
            .map_err(connect_err)?;
        let first = match control.rx.recv().await {
            Ok(Some(f)) => f,
            // The acceptor refused us: report its typed reason when it gave one.
            Ok(None) | Err(_) if close_reason_of(&conn).is_some() => {
                return Err(LinkError::Closed(
                    close_reason_of(&conn).unwrap_or(CloseReason::Protocol),
                ));
            }
            Ok(None) => {
                return Err(LinkError::Connect {
                    addr,
                    reason: closed_reason(&conn),
                });
            }
            Err(e) => return Err(connect_err(e)),
        };
        if let Frame::Close(reason) = first {
            return Err(LinkError::Closed(reason));
        }
        let their_hello = match fed::check_hello(first, broker) {
            Ok(h) => h,
            Err(e) => {
                close(&conn, close_for(&e));
                return Err(e.into());
            }
        };
        Ok(Link {
            broker: broker.to_owned(),
            hello,
            their_hello,
            dialer: true,
            remote: addr,
            conn: LinkConn {
                conn,
                max: self.opts.max_frame_bytes,
            },
            control,
        })
    }

    /// Waits for the next incoming connection attempt (`None` once the endpoint closed).
    pub async fn incoming(&self) -> Option<quinn::Incoming> {
        self.ep.accept().await
    }

    /// Completes an incoming connection: identifies the broker from its certificate, reads
    /// its hello (which must name the same broker) and answers with `make_hello(broker)`.
    ///
    /// # Errors
    /// [`LinkError`].
    pub async fn accept(
        &self,
        incoming: quinn::Incoming,
        make_hello: impl FnOnce(&str) -> Hello,
    ) -> Result<Link, LinkError> {
        tokio::time::timeout(
            self.opts.handshake_timeout,
            self.accept_inner(incoming, make_hello),
        )
        .await
        .map_err(|_| LinkError::Timeout)?
    }

    async fn accept_inner(
        &self,
        incoming: quinn::Incoming,
        make_hello: impl FnOnce(&str) -> Hello,
    ) -> Result<Link, LinkError> {
        let remote = incoming.remote_address();
        let conn = incoming.await.map_err(|e| LinkError::Connect {
            addr: remote,
            reason: e.to_string(),
        })?;
        let chain = broker_chain(&conn)?;
        let broker = match self.trust.identify(&chain) {
            Ok(p) => p,
            Err(e) => {
                close(&conn, CloseReason::NotConfigured);
                return Err(LinkError::Certificate(e.to_string()));
            }
        };
        let (send, recv) = conn.accept_bi().await.map_err(io_err)?;
        let mut control = Control {
            tx: FrameWriter::new(send, self.opts.max_frame_bytes),
            rx: FrameReader::new(recv, self.opts.max_frame_bytes),
        };
        let first = control
            .rx
            .recv()
            .await?
            .ok_or_else(|| LinkError::Io("control stream ended before hello".into()))?;
        let their_hello = match fed::check_hello(first, &broker) {
            Ok(h) => h,
            Err(e) => {
                let reason = close_for(&e);
                let _ = control.tx.send(&Frame::Close(reason)).await;
                close(&conn, reason);
                return Err(e.into());
            }
        };
        let hello = make_hello(&broker);
        control.tx.send(&Frame::Hello(hello.clone())).await?;
        Ok(Link {
            broker,
            hello,
            their_hello,
            dialer: false,
            remote,
            conn: LinkConn {
                conn,
                max: self.opts.max_frame_bytes,
            },
            control,
        })
    }

    /// Closes every connection and stops accepting.
    pub fn close(&self) {
        self.ep
            .close(CloseReason::Shutdown.code().into(), b"shutdown");
    }

    /// Waits until every connection is closed (after [`Endpoint::close`]).
    pub async fn wait_idle(&self) {
        self.ep.wait_idle().await;
    }
}

fn close_for(e: &HelloError) -> CloseReason {
    match e {
        HelloError::Version(_) => CloseReason::Version,
        HelloError::NameMismatch { .. } => CloseReason::NameMismatch,
        _ => CloseReason::Protocol,
    }
}

fn broker_chain(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| LinkError::Certificate("the peer presented no certificate".into()))
}

fn closed_reason(conn: &quinn::Connection) -> String {
    conn.close_reason()
        .map_or_else(|| "stream ended".to_owned(), |e| e.to_string())
}

/// Closes a connection with a typed reason.
pub fn close(conn: &quinn::Connection, reason: CloseReason) {
    conn.close(reason.code().into(), reason.as_str().as_bytes());
}

/// The typed reason a connection was closed with, if the other broker (or we) gave one.
pub fn close_reason_of(conn: &quinn::Connection) -> Option<CloseReason> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            CloseReason::from_code(c.error_code.into_inner())
        }
        _ => None,
    }
}

/// The control stream of a link.
#[derive(Debug)]
pub struct Control {
    /// Sending half.
    pub tx: FrameWriter,
    /// Receiving half.
    pub rx: FrameReader,
}

/// An authenticated link to a peer broker.
#[derive(Debug)]
pub struct Link {
    /// The other broker's name (verified).
    pub broker: String,
    /// The hello we sent (what we told `broker` we are ready for).
    pub hello: Hello,
    /// The other broker's hello.
    pub their_hello: Hello,
    /// Whether this broker dialed.
    pub dialer: bool,
    /// The other broker's address.
    pub remote: SocketAddr,
    /// The connection (streams other than control).
    pub conn: LinkConn,
    /// The control stream.
    pub control: Control,
}

/// A link's QUIC connection, for opening and accepting class streams.
#[derive(Debug, Clone)]
pub struct LinkConn {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    max: usize,
}

/// A stream the other broker opened.
#[derive(Debug)]
pub struct Incoming {
    /// Its class.
    pub class: StreamClass,
    /// Receiving half.
    pub rx: FrameReader,
    /// Sending half (messages streams only).
    pub tx: Option<FrameWriter>,
}

impl Link {
    /// Closes the link with a reason.
    pub fn close(&self, reason: CloseReason) {
        close(&self.conn.conn, reason);
    }
}

impl LinkConn {
    /// Opens a stream of `class`: bidirectional for messages (the reply half carries
    /// acknowledgements), unidirectional otherwise.
    ///
    /// # Errors
    /// [`LinkError::Io`].
    pub async fn open(
        &self,
        class: StreamClass,
    ) -> Result<(FrameWriter, Option<FrameReader>), LinkError> {
        if class == StreamClass::Messages {
            let (mut send, recv) = self.conn.open_bi().await.map_err(io_err)?;
            send.write_all(&[class as u8]).await.map_err(io_err)?;
            Ok((
                FrameWriter::new(send, self.max),
                Some(FrameReader::new(recv, self.max)),
            ))
        } else {
            let mut send = self.conn.open_uni().await.map_err(io_err)?;
            send.write_all(&[class as u8]).await.map_err(io_err)?;
            Ok((FrameWriter::new(send, self.max), None))
        }
    }

    /// Waits for the next stream the other broker opens.
    ///
    /// # Errors
    /// [`LinkError::Io`] when the connection ends, [`LinkError::Frame`] for a stream of
    /// an unknown class.
    pub async fn accept_stream(&self) -> Result<Incoming, LinkError> {
        tokio::select! {
            bi = self.conn.accept_bi() => {
                let (send, mut recv) = bi.map_err(io_err)?;
                let class = read_class(&mut recv).await?;
                Ok(Incoming {
                    class,
                    rx: FrameReader::new(recv, self.max),
                    tx: Some(FrameWriter::new(send, self.max)),
                })
            }
            uni = self.conn.accept_uni() => {
                let mut recv = uni.map_err(io_err)?;
                let class = read_class(&mut recv).await?;
                Ok(Incoming { class, rx: FrameReader::new(recv, self.max), tx: None })
            }
        }
    }

    /// Current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Closes the connection with a reason.
    pub fn close(&self, reason: CloseReason) {
        close(&self.conn, reason);
    }
}

async fn read_class(recv: &mut quinn::RecvStream) -> Result<StreamClass, LinkError> {
    let b = recv.read_u8().await.map_err(io_err)?;
    StreamClass::from_byte(b)
        .ok_or_else(|| LinkError::Frame(FrameError::Malformed(format!("stream class {b}"))))
}

/// Writes length-prefixed frames.
#[derive(Debug)]
pub struct FrameWriter {
    send: quinn::SendStream,
    max: usize,
}

impl FrameWriter {
    fn new(send: quinn::SendStream, max: usize) -> Self {
        Self { send, max }
    }

    /// Sends one frame.
    ///
    /// # Errors
    /// [`LinkError::Frame`] (too large) or [`LinkError::Io`].
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        let bytes = fed::encode(frame, self.max)?;
        self.send.write_all(&bytes).await.map_err(io_err)
    }

    /// Sends already-encoded frames in one write.
    ///
    /// # Errors
    /// [`LinkError::Io`].
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send.write_all(bytes).await.map_err(io_err)
    }

    /// Largest frame this writer sends.
    pub const fn max(&self) -> usize {
        self.max
    }

    /// Ends the stream cleanly.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Reads length-prefixed frames, checking each length before allocating.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    max: usize,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            max,
            buf: Vec::new(),
        }
    }

    /// The next frame; `None` when the other broker finished the stream cleanly.
    ///
    /// # Errors
    /// [`LinkError::Frame`] for an oversize or malformed frame, [`LinkError::Io`].
    pub async fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        let mut prefix = [0u8; LEN_PREFIX];
        match self.recv.read_exact(&mut prefix).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(io_err(e)),
        }
        let len = fed::frame_len(prefix, self.max)?;
        self.buf.clear();
        self.buf.resize(len, 0);
        self.recv.read_exact(&mut self.buf).await.map_err(io_err)?;
        Ok(Some(fed::decode(&self.buf)?))
    }
}

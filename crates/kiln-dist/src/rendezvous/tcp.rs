//! The TCP rendezvous: rank 0 listens, the other ranks connect and say who they are, rank 0 answers each with the
//! id once all are there.
//!
//! The messages (integers are big-endian u32s):
//! - a rank's hello, its first message: `KILN`, protocol, rank, world, pid ([`Hello`]);
//! - rank 0's answer: `KILN` and 0 followed by the 128-byte id; or `KILN`, 1 (a usage error: the ranks' settings
//!   disagree) or 2 (a failure at run time: a timeout, a rank that left), a length and that many bytes of message,
//!   which the rank reports as its own error, so every rank's log says why the job stopped;
//! - the rank's acknowledgement once it holds the id: `KILN`.
//!
//! Rank 0 returns once every rank has acknowledged, so a successful exchange means every rank holds the id. While
//! it waits it also checks that no rank that already arrived has left: a rank killed mid-rendezvous fails the
//! job at once rather than after the id has gone out. Every read and write has a timeout, so a silent or stuck
//! process cannot hold another forever.

use super::{Greeting, HELLO_BYTES, Hello, ID_BYTES, MAGIC, Meeting, UniqueId, Watch, protocol_mismatch, word};
use kiln_core::{Error, Result};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

const ANSWER_ID: u32 = 0;
const ANSWER_REFUSED: u32 = 1;
const ANSWER_FAILED: u32 = 2;
const MAX_MESSAGE_BYTES: usize = 4096;

/// How often rank 0 looks for new connections, and for ranks that left, while it waits.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// How often a rank tries again to reach rank 0, which may not be listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// The longest one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a single handshake message may take once the process sending it is known to be there.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its own deadline a rank that has arrived waits for rank 0's answer.
const ANSWER_GRACE: Duration = Duration::from_secs(3);
/// The longest rank 0 waits for a new connection's hello. A rank sends it as soon as it connects; a connection
/// that stays silent (a port scanner, a health check) is dropped after this, having held up the others no longer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(1);

/// Rank 0's side: waits for every other rank, sends each the id and returns a [`Watch`] on all of them.
pub(super) fn lead(meeting: &Meeting, host: &str, port: u16, id: &UniqueId) -> Result<Watch> {
    // Every interface, so that MASTER_ADDR may be any name of this machine; IPv6 when the address is one.
    let any: IpAddr =
        if host.parse::<Ipv6Addr>().is_ok() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let listener = TcpListener::bind((any, port)).map_err(|e| {
        meeting.failed(format!(
            "rank 0 cannot listen on port {port}: {e} (is another job using it? choose another MASTER_PORT)"
        ))
    })?;
    listener.set_nonblocking(true).map_err(|e| meeting.failed(e))?;
    let mut peers = Vec::new();
    let gathered = gather(meeting, &listener, &mut peers);
    drop(listener);
    if let Err(refusal) = gathered {
        for peer in &peers {
            refusal.send(&peer.stream);
        }
        return Err(refusal.into_error(meeting));
    }
    let mut answer = answer_header(ANSWER_ID);
    answer.extend_from_slice(id);
    for peer in &peers {
        (&peer.stream)
            .write_all(&answer)
            .map_err(|e| meeting.failed(format!("cannot send the id to {}: {e}", peer.name())))?;
    }
    for peer in &peers {
        let mut ack = [0; 4];
        let acked = peer.stream.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| (&peer.stream).read_exact(&mut ack));
        acked.map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => {
                meeting.failed(format!("{} closed its connection before confirming it had the id", peer.name()))
            }
            _ => meeting.failed(format!("{} did not confirm it had the id: {e}", peer.name())),
        })?;
        if ack != MAGIC {
            return Err(meeting.failed(format!("{} answered the id with something other than kiln's", peer.name())));
        }
    }
    tracing::debug!("{}: all {} ranks have the id", meeting.rv, meeting.world);
    Watch::over(
        peers
            .into_iter()
            .map(|peer| {
                let name = peer.name();
                (peer.stream, name)
            })
            .collect(),
    )
}

/// Another rank's side: reaches rank 0, says who it is and waits for the id.
pub(super) fn join(meeting: &Meeting, host: &str, port: u16) -> Result<(UniqueId, Watch)> {
    let mut stream = connect(meeting, host, port)?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.write_all(&meeting.hello().encode()))
        .map_err(|e| meeting.failed(format!("cannot send rank {}'s hello to rank 0: {e}", meeting.rank)))?;
    // Rank 0 answers once every rank has arrived, so this wait is the whole rendezvous. It lasts a little past this
    // rank's own deadline: rank 0 may have started later, and when it gives up its answer says which ranks never
    // came, which this rank's own timeout could not.
    stream.set_read_timeout(Some(meeting.remaining() + ANSWER_GRACE)).map_err(|e| meeting.failed(e))?;
    let lost = |e: io::Error| match e.kind() {
        ErrorKind::UnexpectedEof => {
            meeting.failed("rank 0 closed the connection before sending the id: it has probably failed, see its log")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => meeting.failed(format!(
            "rank 0 did not send the id within {:?}: it is still waiting for other ranks, and its log names them",
            meeting.timeout
        )),
        _ => meeting.failed(format!("lost the connection to rank 0: {e}")),
    };
    let mut header = [0; 8];
    stream.read_exact(&mut header).map_err(lost)?;
    if header[..4] != MAGIC {
        return Err(Error::Usage(format!("{}: the process listening there is not a kiln rank 0", meeting.rv)));
    }
    match word(&header, 4) {
        ANSWER_ID => {
            let mut id = [0; ID_BYTES];
            stream.read_exact(&mut id).map_err(lost)?;
            stream.write_all(&MAGIC).map_err(lost)?;
            let watch = Watch::over(vec![(stream, format!("rank 0 (at {})", meeting.rv))])?;
            Ok((id, watch))
        }
        code @ (ANSWER_REFUSED | ANSWER_FAILED) => {
            let mut length = [0; 4];
            stream.read_exact(&mut length).map_err(lost)?;
            let mut message = vec![0; (word(&length, 0) as usize).min(MAX_MESSAGE_BYTES)];
            stream.read_exact(&mut message).map_err(lost)?;
            let refusal = Refusal { usage: code == ANSWER_REFUSED, message: String::from_utf8_lossy(&message).into() };
            Err(refusal.into_error(meeting))
        }
        other => Err(meeting.failed(format!("rank 0 gave answer {other}, which this kiln does not know"))),
    }
}

/// A rank that has said hello to rank 0.
struct Peer {
    stream: TcpStream,
    hello: Hello,
    from: SocketAddr,
}

impl Peer {
    fn name(&self) -> String {
        format!("rank {} (pid {} at {})", self.hello.rank, self.hello.pid, self.from)
    }
}

/// Why rank 0 stopped waiting, as it tells the ranks that arrived.
struct Refusal {
    /// The ranks' settings disagree: a usage error in every rank, rather than a failure at run time.
    usage: bool,
    message: String,
}

impl Refusal {
    fn usage(message: String) -> Refusal {
        Refusal { usage: true, message }
    }

    fn failure(message: String) -> Refusal {
        Refusal { usage: false, message }
    }

    /// Tells a rank; it may already be gone, which changes nothing.
    fn send(&self, stream: &TcpStream) {
        let text = self.message.as_bytes();
        let text = &text[..text.len().min(MAX_MESSAGE_BYTES)];
        let mut bytes = answer_header(if self.usage { ANSWER_REFUSED } else { ANSWER_FAILED });
        bytes.extend_from_slice(&(text.len() as u32).to_be_bytes());
        bytes.extend_from_slice(text);
        let _ = (&*stream).write_all(&bytes);
    }

    fn into_error(self, meeting: &Meeting) -> Error {
        match self.usage {
            true => Error::Usage(format!("{}: {}", meeting.rv, self.message)),
            false => meeting.failed(self.message),
        }
    }
}

fn answer_header(code: u32) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&code.to_be_bytes());
    bytes
}

/// Accepts connections until every other rank has said hello, each exactly once and agreeing on the world size.
fn gather(meeting: &Meeting, listener: &TcpListener, peers: &mut Vec<Peer>) -> Result<(), Refusal> {
    loop {
        if let Some(gone) = peers.iter().find(|peer| closed(&peer.stream)) {
            return Err(Refusal::failure(format!(
                "{} closed its connection before all ranks arrived: it has probably failed, see its log",
                gone.name()
            )));
        }
        // Every peer's rank was admitted, so it is below the world size.
        let mut present = vec![false; meeting.world as usize];
        for peer in peers.iter() {
            present[peer.hello.rank as usize] = true;
        }
        let missing: Vec<u32> = (1..meeting.world).filter(|&r| !present[r as usize]).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if meeting.expired() {
            return Err(Refusal::failure(meeting.missing(&missing)));
        }
        match listener.accept() {
            Ok((stream, from)) => {
                if let Some(peer) = greet(meeting, stream, from)? {
                    tracing::debug!("{}: {} arrived", meeting.rv, peer.name());
                    peers.push(peer);
                    admit(meeting, peers)?;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!("{}: cannot accept a connection: {e}", meeting.rv);
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Reads a new connection's hello. Connections that are not from kiln are dropped and waiting goes on; one from
/// another version of kiln stops the rendezvous.
fn greet(meeting: &Meeting, stream: TcpStream, from: SocketAddr) -> Result<Option<Peer>, Refusal> {
    let mut bytes = [0; HELLO_BYTES];
    let read = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(meeting.remaining().min(HELLO_TIMEOUT))))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| (&stream).read_exact(&mut bytes));
    if let Err(e) = read {
        tracing::warn!("{}: ignoring a connection from {from} that sent no hello: {e}", meeting.rv);
        return Ok(None);
    }
    match Hello::decode(&bytes) {
        Greeting::Hello(hello) => Ok(Some(Peer { stream, hello, from })),
        Greeting::Stranger => {
            tracing::warn!("{}: ignoring a connection from {from} that is not a kiln rank", meeting.rv);
            Ok(None)
        }
        Greeting::OtherProtocol(theirs) => {
            let refusal = Refusal::usage(protocol_mismatch(format!("the process at {from}"), theirs));
            refusal.send(&stream);
            Err(refusal)
        }
    }
}

/// Checks the newest arrival against the job and the ranks before it.
fn admit(meeting: &Meeting, peers: &[Peer]) -> Result<(), Refusal> {
    let Some((newest, earlier)) = peers.split_last() else { return Ok(()) };
    let Hello { rank, world, .. } = newest.hello;
    let problem = if world != meeting.world {
        format!(
            "{} says the job has {world} processes, rank 0 says {}: every rank needs the same world size",
            newest.name(),
            meeting.world
        )
    } else if rank == 0 {
        format!("{} claims rank 0, which is this process: each process needs its own rank", newest.name())
    } else if rank >= meeting.world {
        format!("{} claims rank {rank}, but a job of {world} processes has ranks 0 to {}", newest.name(), world - 1)
    } else if let Some(first) = earlier.iter().find(|p| p.hello.rank == rank) {
        format!("rank {rank} arrived twice, {} and {}: each process needs its own rank", first.name(), newest.name())
    } else {
        return Ok(());
    };
    Err(Refusal::usage(problem))
}

/// Whether the process at the other end has closed the connection: a rank sends nothing while it waits for the
/// id, so anything but "nothing to read yet" means it is gone.
fn closed(stream: &TcpStream) -> bool {
    let mut byte = [0; 1];
    let peeked = stream.set_nonblocking(true).and_then(|()| stream.peek(&mut byte));
    let restored = stream.set_nonblocking(false);
    let gone = match peeked {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    };
    gone || restored.is_err()
}

/// Connects to rank 0, trying again until the deadline: rank 0 may start after this rank.
fn connect(meeting: &Meeting, host: &str, port: u16) -> Result<TcpStream> {
    loop {
        let last_error = match attempt(host, port, meeting.remaining().min(CONNECT_TIMEOUT)) {
            Ok(stream) => return Ok(stream),
            Err(e) => e,
        };
        if meeting.expired() {
            return Err(meeting.failed(format!(
                "rank 0 never answered within {:?} (last attempt: {last_error}); is it running, and do all ranks \
                 use the same MASTER_ADDR and MASTER_PORT?",
                meeting.timeout
            )));
        }
        std::thread::sleep(CONNECT_RETRY.min(meeting.remaining()));
    }
}

/// One try at each address `host` resolves to.
fn attempt(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(ErrorKind::NotFound, format!("{host} resolves to no address"));
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::super::{PROTOCOL, Rendezvous, exchange};
    use super::*;
    use std::thread::JoinHandle;
    use std::time::Instant;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn local(port: u16) -> Rendezvous {
        Rendezvous::Tcp { host: "127.0.0.1".into(), port }
    }

    fn test_id() -> UniqueId {
        std::array::from_fn(|i| (i * 7 + 1) as u8)
    }

    fn start(port: u16, rank: usize, world: usize, timeout: Duration) -> JoinHandle<Result<(UniqueId, Watch)>> {
        std::thread::spawn(move || {
            let make_id = move || match rank {
                0 => Ok(test_id()),
                _ => Err(Error::Invalid("only rank 0 makes the id".into())),
            };
            exchange(&local(port), rank, world, make_id, timeout)
        })
    }

    fn message(result: Result<(UniqueId, Watch)>) -> (bool, String) {
        match result {
            Ok(_) => panic!("the rendezvous should have failed"),
            Err(Error::Usage(message)) => (true, message),
            Err(e @ Error::Backend { .. }) => (false, e.to_string()),
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }

    /// A connection to rank 0 made by hand, once it listens.
    fn raw_connect(port: u16) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(stream) => return stream,
                Err(e) if Instant::now() > deadline => panic!("rank 0 never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn wait_for_loss(watch: &Watch) -> String {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(message) = watch.lost() {
                assert!(watch.flag().load(std::sync::atomic::Ordering::SeqCst));
                return message;
            }
            assert!(Instant::now() < deadline, "no loss reported within a second");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn every_rank_gets_rank_0s_id_even_when_rank_0_starts_last() {
        let port = free_port();
        let peers: Vec<_> = (1..4).map(|rank| start(port, rank, 4, Duration::from_secs(10))).collect();
        std::thread::sleep(Duration::from_millis(300));
        let lead = start(port, 0, 4, Duration::from_secs(10));
        let mut results = vec![lead.join().unwrap().unwrap()];
        results.extend(peers.into_iter().map(|p| p.join().unwrap().unwrap()));
        for (rank, (id, watch)) in results.iter().enumerate() {
            assert_eq!(*id, test_id(), "rank {rank}");
            assert_eq!(watch.lost(), None, "rank {rank}");
        }
    }

    #[test]
    fn a_wrong_world_size_is_refused_in_both_ranks() {
        let port = free_port();
        let lead = start(port, 0, 2, Duration::from_secs(5));
        let peer = start(port, 1, 3, Duration::from_secs(5));
        let (usage, text) = message(lead.join().unwrap());
        assert!(usage && text.contains("says the job has 3 processes, rank 0 says 2"), "{text}");
        let (usage, text) = message(peer.join().unwrap());
        assert!(usage && text.contains("says the job has 3 processes, rank 0 says 2"), "{text}");
    }

    #[test]
    fn a_missing_rank_times_out_and_is_named() {
        let port = free_port();
        let started = Instant::now();
        let lead = start(port, 0, 3, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(100));
        let peer = start(port, 1, 3, Duration::from_secs(1));
        let (usage, text) = message(lead.join().unwrap());
        assert!(!usage && text.contains("2 of 3 ranks arrived; missing rank 2"), "{text}");
        let (usage, text) = message(peer.join().unwrap());
        assert!(!usage && text.contains("missing rank 2"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn a_rank_0_that_never_comes_times_out() {
        let started = Instant::now();
        let (usage, text) = message(start(free_port(), 1, 2, Duration::from_secs(1)).join().unwrap());
        assert!(!usage && text.contains("rank 0 never answered within 1s"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn a_busy_port_is_reported() {
        let taken = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let (usage, text) = message(start(port, 0, 2, Duration::from_secs(1)).join().unwrap());
        assert!(!usage && text.contains(&format!("rank 0 cannot listen on port {port}")), "{text}");
    }

    #[test]
    fn bad_hellos_are_refused_naming_the_problem() {
        let hello = |rank, world| Hello { rank, world, pid: 4242 }.encode();
        let mut newer = hello(1, 3);
        newer[4..8].copy_from_slice(&(PROTOCOL + 1).to_be_bytes());
        for (hellos, expected) in [
            (vec![hello(1, 3), hello(1, 3)], "rank 1 arrived twice"),
            (vec![hello(5, 3)], "rank 5 (pid 4242 at 127.0.0.1:"),
            (vec![hello(0, 3)], "claims rank 0, which is this process"),
            (vec![hello(2, 4)], "says the job has 4 processes, rank 0 says 3"),
            (vec![newer], "speaks rendezvous protocol 2, this kiln speaks 1"),
        ] {
            let port = free_port();
            let lead = start(port, 0, 3, Duration::from_secs(5));
            let streams: Vec<TcpStream> = hellos
                .iter()
                .map(|bytes| {
                    let mut stream = raw_connect(port);
                    stream.write_all(bytes).unwrap();
                    stream
                })
                .collect();
            let (usage, text) = message(lead.join().unwrap());
            assert!(usage && text.contains(expected), "{expected}: {text}");
            // The rank that sent it is told too.
            let mut answer = Vec::new();
            (&streams[streams.len() - 1]).read_to_end(&mut answer).unwrap();
            assert_eq!(answer[..8], answer_header(ANSWER_REFUSED)[..], "{expected}");
            assert!(String::from_utf8_lossy(&answer[12..]).contains(expected), "{expected}");
        }
    }

    #[test]
    fn strangers_are_ignored() {
        let port = free_port();
        let lead = start(port, 0, 2, Duration::from_secs(5));
        let mut stranger = raw_connect(port);
        stranger.write_all(b"GET / HTTP/1.1\r\nHost: node01\r\n\r\n").unwrap();
        let silent = raw_connect(port);
        let peer = start(port, 1, 2, Duration::from_secs(5));
        let (id, _watch) = peer.join().unwrap().unwrap();
        assert_eq!(id, test_id());
        assert_eq!(lead.join().unwrap().unwrap().0, test_id());
        drop(silent);
    }

    #[test]
    fn a_rank_that_leaves_before_the_others_arrive_stops_the_job() {
        let port = free_port();
        let started = Instant::now();
        let lead = start(port, 0, 3, Duration::from_secs(5));
        let mut leaver = raw_connect(port);
        leaver.write_all(&Hello { rank: 1, world: 3, pid: 4242 }.encode()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(leaver);
        let (usage, text) = message(lead.join().unwrap());
        assert!(!usage && text.contains("rank 1 (pid 4242 at 127.0.0.1:"), "{text}");
        assert!(text.contains("closed its connection before all ranks arrived"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn the_watch_reports_a_process_that_ends() {
        let port = free_port();
        let ranks: Vec<_> = (0..3).map(|rank| start(port, rank, 3, Duration::from_secs(5))).collect();
        let mut watches: Vec<Option<Watch>> = ranks.into_iter().map(|r| Some(r.join().unwrap().unwrap().1)).collect();
        drop(watches[2].take());
        let text = wait_for_loss(watches[0].as_ref().unwrap());
        assert!(text.starts_with("rank 2 (pid ") && text.contains("closed its connection"), "{text}");
        assert_eq!(watches[1].as_ref().unwrap().lost(), None);
        drop(watches[0].take());
        let text = wait_for_loss(watches[1].as_ref().unwrap());
        assert!(text.starts_with(&format!("rank 0 (at tcp://127.0.0.1:{port})")), "{text}");
    }
}

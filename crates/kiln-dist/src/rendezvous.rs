//! How a job's processes meet: rank 0 makes a 128-byte id (NCCL's unique id) and hands it to every other rank.
//!
//! Two ways to meet, both bounded by a timeout so that a missing or dead process ends the job with a message
//! that names it instead of a hang:
//! - `tcp://HOST:PORT` ([`tcp`]): rank 0 listens on PORT, every other rank connects to HOST:PORT and says who it
//!   is, and once all have arrived rank 0 sends each the id. The connections then stay open as a [`Watch`]: when a
//!   process ends, even by a crash, its sockets close and the others can tell.
//! - `file:///PATH` ([`file`]): rank 0 writes the id to PATH on a file system every node shares, and each other
//!   rank, having read it, answers with `PATH.rank-R`. There is nothing to keep open, so its [`Watch`] is inert.
//!
//! With a world of one there is no one to meet: rank 0 makes the id and returns.

mod file;
mod tcp;
mod watch;

pub use watch::Watch;

use kiln_core::{Error, Result};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The size of NCCL's unique id, `ncclUniqueId`.
pub const ID_BYTES: usize = 128;
pub type UniqueId = [u8; ID_BYTES];

/// Where a job's processes meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 listens on `port` on every interface; the others connect to `host`, which names rank 0's machine.
    Tcp { host: String, port: u16 },
    /// A path on a file system every rank can see.
    File(PathBuf),
}

impl Rendezvous {
    /// Reads `tcp://HOST:PORT` (an IPv6 address in brackets: `tcp://[::1]:29500`) or `file:///ABSOLUTE/PATH`.
    pub fn parse(text: &str) -> Result<Self> {
        let refuse = |why: &str| {
            Error::Usage(format!("rendezvous {text:?}: {why} (expected tcp://HOST:PORT or file:///ABSOLUTE/PATH)"))
        };
        if let Some(address) = text.strip_prefix("tcp://") {
            let (host, port) = address.rsplit_once(':').ok_or_else(|| refuse("no port"))?;
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            if host.is_empty() || host.contains(|c: char| c == '/' || c.is_whitespace()) {
                return Err(refuse("no host name or address"));
            }
            let port = port.parse().ok().filter(|&p| p > 0).ok_or_else(|| refuse("the port is not 1 to 65535"))?;
            return Ok(Rendezvous::Tcp { host: host.to_string(), port });
        }
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(refuse("the path is not absolute"));
            }
            return Ok(Rendezvous::File(PathBuf::from(path)));
        }
        Err(refuse("unknown scheme"))
    }
}

impl fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Rendezvous::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Rendezvous::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

/// Meets the job's other processes at `rv` and returns the id rank 0 made with `make_id` (only rank 0 calls it),
/// and a [`Watch`] on the others. Fails within about `timeout` if some rank does not arrive, naming it.
pub fn exchange(
    rv: &Rendezvous,
    rank: usize,
    world: usize,
    make_id: impl FnOnce() -> Result<UniqueId>,
    timeout: Duration,
) -> Result<(UniqueId, Watch)> {
    let meeting = Meeting::new(rv, rank, world, timeout)?;
    if world == 1 {
        return Ok((make_id()?, Watch::inert()));
    }
    match (rv, rank) {
        (Rendezvous::Tcp { host, port }, 0) => {
            let id = make_id()?;
            Ok((id, tcp::lead(&meeting, host, *port, &id)?))
        }
        (Rendezvous::Tcp { host, port }, _) => tcp::join(&meeting, host, *port),
        (Rendezvous::File(path), 0) => {
            let id = make_id()?;
            file::lead(&meeting, path, &id)?;
            Ok((id, Watch::inert()))
        }
        (Rendezvous::File(path), _) => Ok((file::join(&meeting, path)?, Watch::inert())),
    }
}

/// One process's side of a rendezvous: who it is, and until when it waits.
struct Meeting<'a> {
    rv: &'a Rendezvous,
    rank: u32,
    world: u32,
    timeout: Duration,
    deadline: Instant,
}

impl<'a> Meeting<'a> {
    fn new(rv: &'a Rendezvous, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        let (Ok(rank32), Ok(world32)) = (u32::try_from(rank), u32::try_from(world)) else {
            return Err(Error::Usage(format!("rank {rank} of {world}: too many processes")));
        };
        if rank >= world {
            return Err(Error::Usage(format!("rank {rank} of {world}: the rank must be below the world size")));
        }
        Ok(Meeting { rv, rank: rank32, world: world32, timeout, deadline: Instant::now() + timeout })
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The time left, at least a millisecond: a socket refuses a zero timeout.
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
    }

    fn hello(&self) -> Hello {
        Hello { rank: self.rank, world: self.world, pid: std::process::id() }
    }

    /// A failure at run time, prefixed with where it happened.
    fn failed(&self, message: impl fmt::Display) -> Error {
        Error::backend("rendezvous", format!("{}: {message}", self.rv))
    }

    /// Rank 0's account of the ranks still missing at the deadline.
    fn missing(&self, missing: &[u32]) -> String {
        let arrived = self.world as usize - missing.len();
        format!(
            "timed out after {:?}: {arrived} of {} ranks arrived; missing {}",
            self.timeout,
            self.world,
            rank_list(missing)
        )
    }
}

const MAGIC: [u8; 4] = *b"KILN";
/// Changes whenever the messages below do, so that mismatched kiln builds refuse each other with a message.
const PROTOCOL: u32 = 1;
const HELLO_BYTES: usize = 20;

/// What a rank says about itself: over TCP as its first message, in its file for a file rendezvous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    rank: u32,
    world: u32,
    pid: u32,
}

/// What the first bytes from another process turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Greeting {
    Hello(Hello),
    OtherProtocol(u32),
    /// Not kiln at all: a port scanner, a health check, a stray file.
    Stranger,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut bytes = [0; HELLO_BYTES];
        bytes[..4].copy_from_slice(&MAGIC);
        for (at, word) in [(4, PROTOCOL), (8, self.rank), (12, self.world), (16, self.pid)] {
            bytes[at..at + 4].copy_from_slice(&word.to_be_bytes());
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Greeting {
        if bytes.len() != HELLO_BYTES || bytes[..4] != MAGIC {
            return Greeting::Stranger;
        }
        match word(bytes, 4) {
            PROTOCOL => Greeting::Hello(Hello { rank: word(bytes, 8), world: word(bytes, 12), pid: word(bytes, 16) }),
            other => Greeting::OtherProtocol(other),
        }
    }
}

/// The big-endian u32 at `at`; the caller has checked the length.
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn protocol_mismatch(what: impl fmt::Display, theirs: u32) -> String {
    format!(
        "{what} speaks rendezvous protocol {theirs}, this kiln speaks {PROTOCOL}: run the same kiln build in every rank"
    )
}

/// `rank 2` or `ranks 1, 3-6`: ranges keep the message short when many are missing.
fn rank_list(ranks: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &rank in ranks {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == rank => *end = rank,
            _ => runs.push((rank, rank)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|&(start, end)| if start == end { format!("{start}") } else { format!("{start}-{end}") })
        .collect();
    format!("{} {}", if ranks.len() == 1 { "rank" } else { "ranks" }, runs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        for (text, rv) in [
            ("tcp://node01:29500", Rendezvous::Tcp { host: "node01".into(), port: 29500 }),
            ("tcp://10.0.0.1:1", Rendezvous::Tcp { host: "10.0.0.1".into(), port: 1 }),
            ("tcp://[::1]:29500", Rendezvous::Tcp { host: "::1".into(), port: 29500 }),
            ("file:///shared/job-42", Rendezvous::File("/shared/job-42".into())),
        ] {
            assert_eq!(Rendezvous::parse(text).unwrap(), rv, "{text}");
            assert_eq!(rv.to_string(), text);
        }
    }

    #[test]
    fn parse_refuses_anything_else() {
        for text in [
            "",
            "node01:29500",
            "tcp://node01",
            "tcp://:29500",
            "tcp://node01:0",
            "tcp://node01:65536",
            "tcp://node01:http",
            "tcp://a/b:1",
            "file://relative/path",
            "http://node01:80",
        ] {
            match Rendezvous::parse(text) {
                Err(Error::Usage(message)) => assert!(message.contains(&format!("{text:?}")), "{message}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn hello_round_trips_and_strangers_are_told_apart() {
        let hello = Hello { rank: 3, world: 8, pid: 4242 };
        assert_eq!(Hello::decode(&hello.encode()), Greeting::Hello(hello));
        let mut newer = hello.encode();
        newer[7] += 1;
        assert_eq!(Hello::decode(&newer), Greeting::OtherProtocol(PROTOCOL + 1));
        assert_eq!(Hello::decode(b"GET / HTTP/1.1\r\nHost:"), Greeting::Stranger);
        assert_eq!(Hello::decode(&hello.encode()[..12]), Greeting::Stranger);
    }

    #[test]
    fn rank_lists() {
        assert_eq!(rank_list(&[2]), "rank 2");
        assert_eq!(rank_list(&[1, 2]), "ranks 1-2");
        assert_eq!(rank_list(&[1, 3, 4, 5, 6, 9]), "ranks 1, 3-6, 9");
    }

    #[test]
    fn a_world_of_one_meets_no_one() {
        let rv = Rendezvous::parse("tcp://127.0.0.1:1").unwrap();
        let (id, watch) = exchange(&rv, 0, 1, || Ok([7; ID_BYTES]), Duration::from_millis(1)).unwrap();
        assert_eq!((id, watch.lost()), ([7; ID_BYTES], None));
    }

    #[test]
    fn ranks_outside_the_world_are_usage_errors() {
        let rv = Rendezvous::parse("tcp://127.0.0.1:1").unwrap();
        for (rank, world) in [(2, 2), (0, 0)] {
            let result = exchange(&rv, rank, world, || Ok([0; ID_BYTES]), Duration::from_secs(1));
            assert!(matches!(result, Err(Error::Usage(_))), "rank {rank} of {world}");
        }
    }
}

//! The file rendezvous: rank 0 writes the id to PATH on a file system every rank sees; each other rank reads it
//! and answers with `PATH.rank-R`.
//!
//! Files appear whole: each is written under a temporary name, then renamed into place. Rank 0 refuses to start
//! when PATH or an answer is already there (left by an earlier job, it would hand out a stale id), and removes
//! them all once every rank has answered or the wait has failed, so the next run can use the same path. A rank
//! other than 0 is done once it has answered: it cannot tell whether all the others arrive, which only rank 0
//! learns. A shared file system may show a new file to other machines seconds late (NFS caches directory
//! entries), which the timeout has to allow for.
//!
//! The id file is `KILN`, the protocol, the world size (big-endian u32s), then the 128-byte id. An answer is the
//! rank's [`Hello`].

use super::{Greeting, Hello, ID_BYTES, MAGIC, Meeting, PROTOCOL, UniqueId, protocol_mismatch, word};
use kiln_core::{Error, Result, durable};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ID_FILE_BYTES: usize = 12 + ID_BYTES;
/// How often a file is looked for: often enough to be quick, rarely enough to spare a shared file system.
const POLL: Duration = Duration::from_millis(100);

/// Rank 0's side: publishes the id and waits for every other rank's answer.
pub(super) fn lead(meeting: &Meeting, path: &Path, id: &UniqueId) -> Result<()> {
    let answers: Vec<PathBuf> = (1..meeting.world).map(|rank| answer_path(path, rank)).collect();
    let mut ours = std::iter::once(path).chain(answers.iter().map(PathBuf::as_path));
    if let Some(stale) = ours.find(|file| file.symlink_metadata().is_ok()) {
        return Err(Error::Usage(format!(
            "{}: {} exists already, left by an earlier job? Remove it, or give each job its own path, such as \
             file:///shared/kiln-$SLURM_JOB_ID",
            meeting.rv,
            stale.display()
        )));
    }
    let mut bytes = Vec::with_capacity(ID_FILE_BYTES);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&PROTOCOL.to_be_bytes());
    bytes.extend_from_slice(&meeting.world.to_be_bytes());
    bytes.extend_from_slice(id);
    durable::write(path, &bytes)?;
    let answered = wait_for_answers(meeting, &answers);
    for file in std::iter::once(path).chain(answers.iter().map(PathBuf::as_path)) {
        let _ = fs::remove_file(file);
    }
    answered
}

fn wait_for_answers(meeting: &Meeting, answers: &[PathBuf]) -> Result<()> {
    loop {
        let missing: Vec<u32> = (1..meeting.world).filter(|&r| !answers[r as usize - 1].exists()).collect();
        if missing.is_empty() {
            break;
        }
        if meeting.expired() {
            return Err(meeting.failed(meeting.missing(&missing)));
        }
        std::thread::sleep(POLL);
    }
    for (rank, answer) in (1..).zip(answers) {
        let bytes = fs::read(answer).map_err(|e| Error::io(answer, e))?;
        match Hello::decode(&bytes) {
            Greeting::Hello(hello) if hello.rank == rank && hello.world == meeting.world => {}
            Greeting::Hello(hello) => {
                return Err(Error::Usage(format!(
                    "{}: rank {} (pid {}) answered for a job of {} processes, rank 0's has {}",
                    answer.display(),
                    hello.rank,
                    hello.pid,
                    hello.world,
                    meeting.world
                )));
            }
            Greeting::OtherProtocol(theirs) => return Err(Error::Usage(protocol_mismatch(answer.display(), theirs))),
            Greeting::Stranger => return Err(Error::data(answer, "not an answer from a kiln rank")),
        }
    }
    Ok(())
}

/// Another rank's side: waits for the id file, reads it and answers.
pub(super) fn join(meeting: &Meeting, path: &Path) -> Result<UniqueId> {
    let bytes = loop {
        match fs::read(path) {
            Ok(bytes) => break bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        if meeting.expired() {
            return Err(meeting.failed(format!(
                "no id from rank 0 within {:?}: is rank 0 running with the same path, on a file system every rank \
                 shares?",
                meeting.timeout
            )));
        }
        std::thread::sleep(POLL);
    };
    if bytes.len() < 12 || bytes[..4] != MAGIC {
        return Err(Error::data(path, "not a kiln rendezvous file"));
    }
    if word(&bytes, 4) != PROTOCOL {
        return Err(Error::Usage(protocol_mismatch(path.display(), word(&bytes, 4))));
    }
    if bytes.len() != ID_FILE_BYTES {
        return Err(Error::data(path, format!("{} bytes where a rendezvous file has {ID_FILE_BYTES}", bytes.len())));
    }
    if word(&bytes, 8) != meeting.world {
        return Err(Error::Usage(format!(
            "{}: rank 0 says the job has {} processes, rank {} says {}: every rank needs the same world size",
            meeting.rv,
            word(&bytes, 8),
            meeting.rank,
            meeting.world
        )));
    }
    let mut id = [0; ID_BYTES];
    id.copy_from_slice(&bytes[12..]);
    let answer = answer_path(path, meeting.rank);
    if answer.symlink_metadata().is_ok() {
        return Err(Error::Usage(format!(
            "{} exists already: is another process rank {} too?",
            answer.display(),
            meeting.rank
        )));
    }
    durable::write(&answer, &meeting.hello().encode())?;
    Ok(id)
}

fn answer_path(path: &Path, rank: u32) -> PathBuf {
    with_suffix(path, &format!(".rank-{rank}"))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::super::{Rendezvous, Watch, exchange};
    use super::*;
    use std::thread::JoinHandle;
    use std::time::Instant;

    fn fresh_path(name: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        std::env::temp_dir().join(format!("kiln-dist-{}-{name}-{nanos}", std::process::id()))
    }

    fn test_id() -> UniqueId {
        std::array::from_fn(|i| (i * 5 + 3) as u8)
    }

    fn start(path: &Path, rank: usize, world: usize, timeout: Duration) -> JoinHandle<Result<(UniqueId, Watch)>> {
        let rv = Rendezvous::File(path.to_path_buf());
        std::thread::spawn(move || {
            let make_id = move || match rank {
                0 => Ok(test_id()),
                _ => Err(Error::Invalid("only rank 0 makes the id".into())),
            };
            exchange(&rv, rank, world, make_id, timeout)
        })
    }

    fn leftovers(path: &Path) -> Vec<String> {
        let prefix = path.file_name().unwrap().to_string_lossy().into_owned();
        fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect()
    }

    #[test]
    fn every_rank_gets_rank_0s_id_and_nothing_is_left_behind() {
        let path = fresh_path("agree");
        let peers: Vec<_> = (1..3).map(|rank| start(&path, rank, 3, Duration::from_secs(10))).collect();
        std::thread::sleep(Duration::from_millis(200));
        let (id, watch) = start(&path, 0, 3, Duration::from_secs(10)).join().unwrap().unwrap();
        assert_eq!((id, watch.lost()), (test_id(), None));
        for peer in peers {
            assert_eq!(peer.join().unwrap().unwrap().0, test_id());
        }
        assert_eq!(leftovers(&path), Vec::<String>::new());
    }

    #[test]
    fn a_stale_file_is_refused() {
        for stale in ["", ".rank-2"] {
            let path = fresh_path("stale");
            let file = with_suffix(&path, stale);
            fs::write(&file, b"from an earlier job").unwrap();
            match start(&path, 0, 3, Duration::from_secs(1)).join().unwrap() {
                Err(Error::Usage(message)) => {
                    assert!(message.contains(&format!("{} exists already", file.display())), "{message}")
                }
                other => panic!("{:?}", other.map(|(id, _)| id)),
            }
            fs::remove_file(&file).unwrap();
        }
    }

    #[test]
    fn a_missing_rank_times_out_and_is_named() {
        let path = fresh_path("missing");
        let started = Instant::now();
        let lead = start(&path, 0, 3, Duration::from_secs(1));
        let peer = start(&path, 1, 3, Duration::from_secs(1));
        match lead.join().unwrap() {
            Err(e @ Error::Backend { .. }) => {
                assert!(e.to_string().contains("2 of 3 ranks arrived; missing rank 2"), "{e}")
            }
            other => panic!("{:?}", other.map(|(id, _)| id)),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        // Rank 1 answered, so it got the id; only rank 0 knows the job is incomplete.
        assert_eq!(peer.join().unwrap().unwrap().0, test_id());
        assert_eq!(leftovers(&path), Vec::<String>::new());
    }

    #[test]
    fn a_rank_0_that_never_comes_times_out() {
        let started = Instant::now();
        match start(&fresh_path("alone"), 1, 2, Duration::from_secs(1)).join().unwrap() {
            Err(e @ Error::Backend { .. }) => assert!(e.to_string().contains("no id from rank 0 within 1s"), "{e}"),
            other => panic!("{:?}", other.map(|(id, _)| id)),
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[test]
    fn a_wrong_world_size_is_refused() {
        let path = fresh_path("world");
        let lead = start(&path, 0, 2, Duration::from_secs(1));
        match start(&path, 1, 3, Duration::from_secs(5)).join().unwrap() {
            Err(Error::Usage(message)) => {
                assert!(message.contains("rank 0 says the job has 2 processes, rank 1 says 3"), "{message}")
            }
            other => panic!("{:?}", other.map(|(id, _)| id)),
        }
        assert!(lead.join().unwrap().is_err());
    }
}

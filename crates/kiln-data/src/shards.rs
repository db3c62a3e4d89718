//! Token shards in llm.c's `.bin` format, so that shards written by llm.c's scripts load unchanged.
//!
//! A 1024-byte header of 256 little-endian int32 — magic, version, token count, then zeros — followed by the
//! tokens: magic 20240520 / version 1 with uint16 tokens, or magic 20240801 / version 7 with uint32 tokens (for
//! vocabularies beyond 65,536). Shards are memory-mapped, never read whole.

use kiln_core::{Error, Result, durable};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

const HEADER_INTS: usize = 256;
const HEADER_BYTES: usize = HEADER_INTS * 4;
const MAGIC_U16: i32 = 20240520;
const MAGIC_U32: i32 = 20240801;

/// Whether a vocabulary's ids fit in uint16.
pub fn narrow(vocab: usize) -> bool {
    vocab <= 1 << 16
}

/// Writes `tokens` as a shard at `path`, whole or not at all (see [`durable`]).
pub fn write(path: &Path, tokens: &[u32], vocab: usize) -> Result<()> {
    let mut header = [0i32; HEADER_INTS];
    let wide = !narrow(vocab);
    header[0] = if wide { MAGIC_U32 } else { MAGIC_U16 };
    header[1] = if wide { 7 } else { 1 };
    header[2] = i32::try_from(tokens.len())
        .map_err(|_| Error::Usage(format!("{} tokens do not fit one shard", tokens.len())))?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * if wide { 4 } else { 2 });
    bytes.extend(header.iter().flat_map(|h| h.to_le_bytes()));
    for &t in tokens {
        if wide {
            bytes.extend(t.to_le_bytes());
        } else {
            bytes.extend((t as u16).to_le_bytes());
        }
    }
    durable::write(path, &bytes)
}

/// A memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    wide: bool,
    len: usize,
}

impl Shard {
    /// Opens and checks a shard: header, magic, version, and that the file holds exactly the tokens it says.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = std::fs::File::open(path).map_err(|e| Error::data(path, format!("cannot open: {e}")))?;
        // SAFETY: the map is read-only; a shard changing underneath a run is outside what kiln supports.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::data(path, format!("cannot map: {e}")))?;
        if map.len() < HEADER_BYTES {
            return Err(Error::data(path, format!("{} bytes: too short for the 1024-byte shard header", map.len())));
        }
        let int = |i: usize| i32::from_le_bytes(map[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let (magic, version, count) = (int(0), int(1), int(2));
        let wide = match (magic, version) {
            (MAGIC_U16, 1) => false,
            (MAGIC_U32, 7) => true,
            (MAGIC_U16 | MAGIC_U32, v) => return Err(Error::data(path, format!("unsupported shard version {v}"))),
            (m, _) => {
                return Err(Error::data(
                    path,
                    format!("wrong magic number {m}: not a token shard (expected {MAGIC_U16} or {MAGIC_U32})"),
                ));
            }
        };
        let size = if wide { 4 } else { 2 };
        let held = (map.len() - HEADER_BYTES) / size;
        if count < 0 || count as usize != held || (map.len() - HEADER_BYTES) % size != 0 {
            return Err(Error::data(
                path,
                format!("truncated or padded: the header says {count} tokens, the file holds {held}"),
            ));
        }
        Ok(Shard { path: path.to_path_buf(), map, wide, len: held })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let at = HEADER_BYTES + i * if self.wide { 4 } else { 2 };
        if self.wide {
            u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes"))
        } else {
            u16::from_le_bytes(self.map[at..at + 2].try_into().expect("2 bytes")) as u32
        }
    }

    /// Tokens `start..start + inputs.len()` into `inputs`, and the token after each into `targets`. Each is checked
    /// as it is read: an id at or past `vocab` is an error that names this file and the token's position. Checking
    /// here rather than in [`Shard::open`] keeps a run's start-up the same however large its dataset (scanning
    /// 100B tokens reads 200 GB), and costs one comparison per token a batch reads anyway.
    pub fn window(&self, start: usize, vocab: usize, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let token = |i: usize| {
            let id = self.get(i);
            if id as usize >= vocab {
                let message = format!("token id {id} at position {i} is outside the vocabulary of {vocab}");
                return Err(Error::data(&self.path, message));
            }
            Ok(id)
        };
        let mut next = token(start)?;
        for (i, (x, y)) in inputs.iter_mut().zip(targets.iter_mut()).enumerate() {
            *x = next;
            next = token(start + i + 1)?;
            *y = next;
        }
        Ok(())
    }
}

//! safetensors files, written and read one tensor at a time.
//!
//! A model as large as the host's memory must still be saved and loaded, so nothing here holds more than one
//! tensor on the host: a file's header is computed from the names and shapes before any data, then each tensor's
//! values are fetched (from the engine) and written in turn; files are read through a memory map, one tensor
//! converted at a time. A set of tensors larger than a shard is split as transformers splits it:
//! `model-00001-of-00003.safetensors`, ..., with `model.safetensors.index.json` naming each tensor's file.

use kiln_core::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One tensor to write: its name and shape (its values, fp32, come from the writer's `fetch`).
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Writes `entries` into `dir` as `{stem}.safetensors` or, when they pass `max_shard_bytes`, as shards and an index
/// (fp32 values). `fetch(i, values)` fills the values of entry `i`; it is called once per entry, in order, whether or
/// not `write` is set: a data-parallel rank that writes nothing still takes part in gathering each tensor.
pub fn write(
    dir: &Path,
    stem: &str,
    entries: &[Entry],
    max_shard_bytes: usize,
    write: bool,
    fetch: &mut dyn FnMut(usize, &mut Vec<f32>) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    // Shards: consecutive entries, each shard as large as fits (a tensor larger than a shard gets one of its own).
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, e) in entries.iter().enumerate() {
        match shards.last_mut() {
            Some(shard) if bytes + e.bytes() <= max_shard_bytes => {
                shard.end = i + 1;
                bytes += e.bytes();
            }
            _ => {
                shards.push(i..i + 1);
                bytes = e.bytes();
            }
        }
    }
    let names: Vec<String> = match shards.len() {
        0 | 1 => vec![format!("{stem}.safetensors")],
        n => (1..=n).map(|k| format!("{stem}-{k:05}-of-{n:05}.safetensors")).collect(),
    };
    let mut values = Vec::new();
    for (shard, name) in shards.iter().zip(&names) {
        let path = dir.join(name);
        let mut file = if write { Some(create(&path, &entries[shard.clone()])?) } else { None };
        for i in shard.clone() {
            fetch(i, &mut values)?;
            if let Some(file) = &mut file {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                file.write_all(&bytes).map_err(io(&path))?;
            }
        }
        if let Some(file) = file {
            // Flushed to the file here; to disk by whoever publishes the directory (see kiln_core::durable).
            file.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
        }
    }
    if write && names.len() > 1 {
        let weight_map: serde_json::Map<String, serde_json::Value> = shards
            .iter()
            .zip(&names)
            .flat_map(|(shard, file)| {
                entries[shard.clone()].iter().map(move |e| (e.name.clone(), file.as_str().into()))
            })
            .collect();
        let total: usize = entries.iter().map(Entry::bytes).sum();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join(format!("{stem}.safetensors.index.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("plain JSON")).map_err(io(&path))?;
    }
    Ok(names.iter().map(|n| dir.join(n)).collect())
}

/// Creates `path` and writes the header of a file holding `entries` (fp32), ready for their data in order.
fn create(path: &Path, entries: &[Entry]) -> Result<std::io::BufWriter<std::fs::File>> {
    let mut offset = 0;
    let infos = entries
        .iter()
        .map(|e| {
            let info =
                TensorInfo { dtype: Dtype::F32, shape: e.shape.clone(), data_offsets: (offset, offset + e.bytes()) };
            offset += e.bytes();
            (e.name.clone(), info)
        })
        .collect();
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(format), infos)
        .map_err(|e| Error::data(path, format!("cannot describe the tensors: {e}")))?;
    let mut header = serde_json::to_string(&metadata).expect("a safetensors header serializes").into_bytes();
    // The data starts 8-byte aligned, as the format asks.
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io(path))?;
    out.write_all(&header).map_err(io(path))?;
    Ok(out)
}

/// The memory-mapped safetensors files of one set of tensors: `{stem}.safetensors`, or the shards its index names.
pub struct TensorFiles {
    files: Vec<(PathBuf, Mmap, usize, Metadata)>,
    /// Which file holds each tensor.
    home: HashMap<String, usize>,
}

impl TensorFiles {
    /// Opens `dir/{stem}.safetensors.index.json` and its shards if there is an index, else `dir/{stem}.safetensors`.
    pub fn open(dir: &Path, stem: &str) -> Result<TensorFiles> {
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::data(&index_path, format!("not valid JSON: {e}")))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::data(&index_path, "no \"weight_map\" object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                return Err(Error::data(&index_path, "\"weight_map\" names no files"));
            }
            names
        } else {
            vec![format!("{stem}.safetensors")]
        };
        let mut files = Vec::new();
        let mut home = HashMap::new();
        for name in file_names {
            let path = dir.join(&name);
            let file = std::fs::File::open(&path).map_err(|e| Error::data(&path, format!("cannot read: {e}")))?;
            // SAFETY: read-only; a checkpoint changing underneath a run is outside what kiln supports.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::data(&path, format!("cannot map: {e}")))?;
            let (header, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::data(&path, format!("not a safetensors file: {e}")))?;
            for tensor in metadata.offset_keys() {
                home.insert(tensor, files.len());
            }
            files.push((path, map, 8 + header, metadata));
        }
        Ok(TensorFiles { files, home })
    }

    /// Every tensor's name, file by file in offset order.
    pub fn names(&self) -> Vec<String> {
        self.files.iter().flat_map(|f| f.3.offset_keys()).collect()
    }

    /// Tensor `name`'s shape, from its file's header, if a file holds it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &f = self.home.get(name)?;
        self.files[f].3.info(name).map(|info| info.shape.clone())
    }

    /// The file holding tensor `name`, if any (for messages).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.home.get(name).map(|&f| self.files[f].0.as_path())
    }

    /// Where errors about a missing tensor point: the index or the one file.
    pub fn describe(&self) -> String {
        let paths: Vec<String> = self.files.iter().map(|f| f.0.display().to_string()).collect();
        paths.join(", ")
    }

    /// Tensor `name`'s shape and its values as fp32 (from F32, BF16 or F16), or `None` if no file holds it.
    pub fn read(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Some(&f) = self.home.get(name) else { return Ok(None) };
        let (path, map, start, metadata) = &self.files[f];
        let info = metadata.info(name).expect("the home of every tensor is a file that has it");
        let bytes = &map[start + info.data_offsets.0..start + info.data_offsets.1];
        let values = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(Error::data(path, format!("tensor {name} is {other:?}; kiln reads F32, BF16 and F16")));
            }
        };
        Ok(Some((info.shape.clone(), values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_tensor_by_tensor() {
        let dir = std::env::temp_dir().join(format!("kiln-tensor-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let entries: Vec<Entry> = (0..5).map(|i| Entry { name: format!("t{i}"), shape: vec![3, i + 1] }).collect();
        let value = |i: usize, j: usize| (i * 100 + j) as f32 * 0.5;
        let mut fetch = |i: usize, v: &mut Vec<f32>| {
            *v = (0..3 * (i + 1)).map(|j| value(i, j)).collect();
            Ok(())
        };
        // 24 bytes a row of columns: shards of at most 40 bytes hold t0 (12 bytes) and t1 (24), then one each.
        let written = write(&dir, "model", &entries, 40, true, &mut fetch).unwrap();
        assert_eq!(written.len(), 4);
        assert!(dir.join("model-00001-of-00004.safetensors").exists());
        let files = TensorFiles::open(&dir, "model").unwrap();
        for (i, e) in entries.iter().enumerate() {
            let (shape, values) = files.read(&e.name).unwrap().unwrap();
            assert_eq!(shape, e.shape);
            assert_eq!(values, (0..3 * (i + 1)).map(|j| value(i, j)).collect::<Vec<_>>());
        }
        assert!(files.read("t9").unwrap().is_none());
        // The Python library's reader agrees with the format: the safetensors crate reads a file whole too.
        let one = std::fs::read(dir.join("model-00001-of-00004.safetensors")).unwrap();
        let parsed = SafeTensors::deserialize(&one).unwrap();
        assert_eq!(parsed.names().len(), 2);
        // Under the limit: one file, no index.
        let single = dir.join("single");
        std::fs::create_dir_all(&single).unwrap();
        assert_eq!(write(&single, "model", &entries, 1 << 20, true, &mut fetch).unwrap().len(), 1);
        assert!(!single.join("model.safetensors.index.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

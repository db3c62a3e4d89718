//! NVRTC compilation of the embedded kernels, for the GPU present or any named architecture, cached on disk.
//!
//! Each kernel file is compiled with `kernels/common.cuh` and `kernels/mma.cuh` in front of it, for one real
//! architecture (`sm_90a`, `sm_80`, ...) and one precision, straight to a CUBIN: nothing is left for the driver to
//! JIT, and ptxas's report (registers, shared memory, spills) comes back in the compile log. The cache key is the
//! source's hash, the architecture, the precision and NVRTC's version, so a warm start compiles nothing and a new
//! NVRTC or an edited kernel compiles afresh. The cache lives in `KILN_CACHE_DIR`, or `kiln/` under the user's cache
//! directory.

use crate::kernels::{COMMON, KernelSource, MMA, Precision};
use crate::libraries::Library;
use kiln_core::{Error, Result};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// The kernels it defines, read from the CUBIN itself.
    pub entry_points: Vec<String>,
    /// ptxas's report on each kernel function, where the compile log has one: NVRTC can return a CUBIN with an
    /// empty log (seen with 13.0 on the GPU machine when the same program was compiled twice in a process).
    pub stats: Vec<KernelStats>,
    /// Whether this came from the disk cache.
    pub cached: bool,
    pub path: PathBuf,
}

/// What ptxas reported for one kernel function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub function: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// ptxas serialised the function's wgmma (its C7518: a product's results cross a divergent path; C7513: a
    /// product's input registers written while products are in flight), which undoes any overlap of products with
    /// other work.
    pub wgmma_serialized: bool,
    /// ptxas inserted a wait for products in flight (its C7517: registers they write used, as it judges, before the
    /// kernel's own wait), which undoes the overlap of those products with whatever the kernel issued after them.
    pub wgmma_wait_injected: bool,
}

pub struct Compiler {
    include_dir: PathBuf,
    version: (i32, i32),
    cache_dir: PathBuf,
}

fn err(message: String) -> Error {
    Error::backend("nvrtc", message)
}

impl Compiler {
    /// Loads NVRTC and finds the CUDA headers. Fails, saying what is missing, when either cannot be found.
    pub fn new() -> Result<Self> {
        Self::with_cache_dir(cache_dir()?)
    }

    /// As [`Compiler::new`], caching in `cache_dir`.
    pub fn with_cache_dir(cache_dir: PathBuf) -> Result<Self> {
        Library::Nvrtc.require()?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loaded (checked above); the call writes two integers.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        status.result().map_err(|e| err(format!("nvrtcVersion failed: {e:?}")))?;
        Ok(Compiler { include_dir: find_include_dir()?, version: (major, minor), cache_dir })
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The kernel file compiled for `arch` (e.g. `sm_90a`), from the cache when it is there.
    pub fn compile(&self, kernel: &KernelSource, arch: &str, precision: Precision) -> Result<Compiled> {
        check_arch(arch)?;
        let source = format!(
            "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"mma.cuh\"\n{MMA}\n#line 1 \"{}.cu\"\n{}",
            kernel.name, kernel.source
        );
        let (major, minor) = self.version;
        let key = fnv1a(&source);
        let path = self.cache_dir.join(format!(
            "{}-{arch}-{}-nvrtc{major}.{minor}-{key:016x}.cubin",
            kernel.name,
            precision.name()
        ));
        let log_path = path.with_extension("log");
        if let (Ok(cubin), Ok(log)) = (std::fs::read(&path), std::fs::read_to_string(&log_path)) {
            let entry_points = entry_points(&cubin).map_err(|e| err(format!("{}: {e}", path.display())))?;
            return Ok(Compiled { cubin, entry_points, stats: parse_ptxas_log(&log), cached: true, path });
        }
        let (cubin, log) = self.run_nvrtc(&source, kernel.name, arch, precision)?;
        let entry_points = entry_points(&cubin).map_err(|e| err(format!("{}.cu's CUBIN: {e}", kernel.name)))?;
        std::fs::create_dir_all(&self.cache_dir).map_err(|e| Error::io(&self.cache_dir, e))?;
        // The log goes first: an entry counts as cached only once its CUBIN, written last, is complete.
        kiln_core::durable::write(&log_path, log.as_bytes())?;
        kiln_core::durable::write(&path, &cubin)?;
        Ok(Compiled { cubin, entry_points, stats: parse_ptxas_log(&log), cached: false, path })
    }

    fn run_nvrtc(&self, source: &str, name: &str, arch: &str, precision: Precision) -> Result<(Vec<u8>, String)> {
        use cudarc::nvrtc::{result, sys};
        let src = CString::new(source).map_err(|_| err(format!("{name}.cu contains a NUL byte")))?;
        let file = CString::new(format!("{name}.cu")).expect("kernel names have no NUL");
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
            format!("--include-path={}", self.include_dir.display()),
            "--ptxas-options=-v".to_string(),
        ];
        if precision == Precision::Bf16 {
            options.push("-DKILN_BF16".to_string());
        }
        let program = result::create_program(&src, Some(&file)).map_err(|e| err(format!("{name}.cu: {e:?}")))?;
        // SAFETY: `program` was created above and is destroyed once, at the end; the buffers are sized by NVRTC.
        unsafe {
            let compiled = result::compile_program(program, &options);
            let log = result::get_program_log(program).map(|l| c_text(&l)).unwrap_or_default();
            let out = compiled
                .map_err(|_| err(format!("{name}.cu failed to compile for {arch} ({}):\n{log}", precision.name())))
                .and_then(|()| {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| err(format!("{e:?}")))?;
                    let mut cubin = vec![0u8; size];
                    sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr().cast())
                        .result()
                        .map_err(|e| err(format!("{e:?}")))?;
                    Ok((cubin, log))
                });
            let _ = result::destroy_program(program);
            out
        }
    }
}

/// A usage error unless `arch` names a real architecture (`sm_80`, `sm_90a`, `sm_100f`), which NVRTC compiles
/// CUBINs for.
pub fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").map(|rest| rest.strip_suffix(['a', 'f']).unwrap_or(rest));
    if digits.is_some_and(|d| d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit())) {
        return Ok(());
    }
    Err(Error::Usage(format!("architecture {arch:?}: expected a real architecture such as sm_80 or sm_90a")))
}

fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// 64-bit FNV-1a: a stable hash for cache keys (the standard library's hasher may change between releases).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("kiln").join("kernels"))
        .ok_or_else(|| Error::Usage("no cache directory: set KILN_CACHE_DIR".into()))
}

/// Where the CUDA headers may be, in the order searched.
pub fn include_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(root).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    // pip's wheels: nvidia/cu13/include (CUDA 13) or nvidia/cuda_runtime/include (CUDA 12), in the active
    // virtual environment or wherever python3 keeps its packages.
    let mut site_packages: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        site_packages.extend(glob_python_dirs(&PathBuf::from(venv).join("lib")));
    }
    if let Ok(out) = std::process::Command::new("python3")
        .args([
            "-c",
            "import site, sysconfig; print(sysconfig.get_paths()['purelib']); print(site.getusersitepackages())",
        ])
        .output()
    {
        site_packages.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
    }
    for sp in site_packages {
        dirs.push(sp.join("nvidia/cu13/include"));
        dirs.push(sp.join("nvidia/cuda_runtime/include"));
    }
    dirs
}

fn glob_python_dirs(lib: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .collect()
}

fn find_include_dir() -> Result<PathBuf> {
    let candidates = include_candidates();
    candidates.iter().find(|d| d.join("cuda_bf16.h").is_file()).cloned().ok_or_else(|| {
        let looked: Vec<String> = candidates.iter().map(|d| format!("  {}", d.display())).collect();
        err(format!(
            "cannot find the CUDA headers (cuda_bf16.h) that NVRTC needs; looked in:\n{}\n\
             set CUDA_HOME to a CUDA toolkit, or `pip install nvidia-cuda-runtime`",
            looked.join("\n")
        ))
    })
}

/// A symbol of a CUBIN's ELF symbol table.
struct ElfSymbol {
    name: String,
    /// `st_info` and `st_other`.
    info: u8,
    other: u8,
    /// The section it lies in, and its offset and size there.
    section: usize,
    value: usize,
    size: usize,
}

/// A CUBIN (ELFCLASS64, little-endian: what NVRTC writes for every architecture) read for its symbols. Every read
/// is bounds-checked: a malformed file is an error, never a panic. Offsets add up saturating: a sum past the end of
/// memory is past the end of the file, and `bytes` refuses it.
struct Cubin<'a>(&'a [u8]);

impl<'a> Cubin<'a> {
    const SHT_SYMTAB: u32 = 2;
    const SHT_PROGBITS: u32 = 1;

    fn new(cubin: &'a [u8]) -> std::result::Result<Self, String> {
        if !cubin.starts_with(b"\x7fELF\x02\x01") {
            return Err("not a 64-bit little-endian ELF file".into());
        }
        Ok(Cubin(cubin))
    }

    fn bytes(&self, at: usize, n: usize) -> std::result::Result<&'a [u8], String> {
        at.checked_add(n).and_then(|end| self.0.get(at..end)).ok_or_else(|| format!("truncated at byte {at}"))
    }
    fn u16_at(&self, at: usize) -> std::result::Result<usize, String> {
        self.bytes(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32_at(&self, at: usize) -> std::result::Result<u32, String> {
        self.bytes(at, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64_at(&self, at: usize) -> std::result::Result<usize, String> {
        self.bytes(at, 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    }

    /// Where field `at` of section header `i` lies: type at +4, file offset at +0x18, size at +0x20, linked
    /// section at +0x28.
    fn section_field(&self, i: usize, at: usize) -> std::result::Result<usize, String> {
        let (table, entry_size) = (self.u64_at(0x28)?, self.u16_at(0x3a)?);
        Ok(table.saturating_add(i.saturating_mul(entry_size)).saturating_add(at))
    }

    fn symbols(&self) -> std::result::Result<Vec<ElfSymbol>, String> {
        let mut symbols = Vec::new();
        for i in 0..self.u16_at(0x3c)? {
            if self.u32_at(self.section_field(i, 4)?)? != Self::SHT_SYMTAB {
                continue;
            }
            let (table, size) =
                (self.u64_at(self.section_field(i, 0x18)?)?, self.u64_at(self.section_field(i, 0x20)?)?);
            let strings =
                self.u64_at(self.section_field(self.u32_at(self.section_field(i, 0x28)?)? as usize, 0x18)?)?;
            // Symbol: name offset (4 bytes), info (1), other (1), section (2), value (8), size (8).
            for at in (table..table.saturating_add(size)).step_by(24) {
                let start = strings.saturating_add(self.u32_at(at)? as usize);
                let name = self.0.get(start..).and_then(|s| CStr::from_bytes_until_nul(s).ok());
                let name = name.ok_or_else(|| format!("a symbol name at byte {start} is not terminated"))?;
                symbols.push(ElfSymbol {
                    name: name.to_string_lossy().into_owned(),
                    info: self.bytes(at.saturating_add(4), 1)?[0],
                    other: self.bytes(at.saturating_add(5), 1)?[0],
                    section: self.u16_at(at.saturating_add(6))?,
                    value: self.u64_at(at.saturating_add(8))?,
                    size: self.u64_at(at.saturating_add(16))?,
                });
            }
        }
        Ok(symbols)
    }
}

/// The kernels a CUBIN defines: the function symbols of its ELF symbol table that CUDA marks as entry points
/// (`STO_CUDA_ENTRY`, 0x10, in `st_other`).
pub fn entry_points(cubin: &[u8]) -> std::result::Result<Vec<String>, String> {
    const STT_FUNC: u8 = 2;
    const STO_CUDA_ENTRY: u8 = 0x10;
    let symbols = Cubin::new(cubin)?.symbols()?;
    Ok(symbols
        .into_iter()
        .filter(|s| s.info & 0xf == STT_FUNC && s.other & STO_CUDA_ENTRY != 0)
        .map(|s| s.name)
        .collect())
}

/// The initial contents of the data object `name` a CUBIN defines (a `__constant__` or `__device__` variable with
/// an initializer), or None if it defines none by that name.
pub fn symbol_data<'a>(cubin: &'a [u8], name: &str) -> std::result::Result<Option<&'a [u8]>, String> {
    const STT_OBJECT: u8 = 1;
    let elf = Cubin::new(cubin)?;
    let Some(symbol) = elf.symbols()?.into_iter().find(|s| s.info & 0xf == STT_OBJECT && s.name == name) else {
        return Ok(None);
    };
    if elf.u32_at(elf.section_field(symbol.section, 4)?)? != Cubin::SHT_PROGBITS {
        return Err(format!("{name} has no initial contents in the file"));
    }
    let start = elf.u64_at(elf.section_field(symbol.section, 0x18)?)?.saturating_add(symbol.value);
    elf.bytes(start, symbol.size).map(Some)
}

/// Reads ptxas's `-v` report: per kernel function, "Compiling entry function 'f'", then "N bytes stack frame,
/// N bytes spill stores, N bytes spill loads", then "Used N registers, ... N bytes smem"; and, anywhere,
/// "wgmma.mma_async instructions are serialized ... in the function 'f'".
pub fn parse_ptxas_log(log: &str) -> Vec<KernelStats> {
    let mut stats: Vec<KernelStats> = Vec::new();
    let number_before = |line: &str, word: &str| -> Option<u32> {
        let at = line.find(word)?;
        line[..at].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let function = rest.split('\'').next().unwrap_or_default().to_string();
            stats.push(KernelStats { function, ..Default::default() });
        } else if let Some(s) = stats.last_mut() {
            if line.contains("stack frame") {
                s.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                s.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                s.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                s.registers = number_before(line, " registers").unwrap_or(0);
                s.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    for line in log.lines() {
        // The function a line of performance advice names.
        let function = line.split("function '").nth(1).and_then(|rest| rest.split('\'').next());
        let Some(s) = function.and_then(|f| stats.iter_mut().find(|s| s.function == f)) else { continue };
        s.wgmma_serialized |= line.contains("wgmma.mma_async instructions are serialized");
        s.wgmma_wait_injected |= line.contains("warpgroup.wait is injected");
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_architectures_are_compiled_for() {
        for arch in ["sm_80", "sm_90a", "sm_100a", "sm_100f", "sm_120"] {
            check_arch(arch).unwrap();
        }
        for arch in ["bogus", "sm_", "sm_9", "compute_90", "sm_90x", "sm_90aa", "SM_90"] {
            assert!(matches!(check_arch(arch), Err(Error::Usage(_))), "{arch}");
        }
    }

    #[test]
    fn reads_ptxas_reports() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'layernorm_forward' for 'sm_90a'\n\
                   ptxas info    : Function properties for layernorm_forward\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 38 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'adamw' for 'sm_90a'\n\
                   ptxas info    : Used 20 registers, used 0 barriers, 384 bytes cmem[0]\n\
                   ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized \
                   due to program dependence on compiler-inserted WG.DP in divergent path in the function 'adamw'\n\
                   ptxas info    : (C7517) warpgroup.wait is injected in around line 139610 by compiler to allow use \
                   of registers defined by GMMA in function 'layernorm_forward'\n";
        let stats = parse_ptxas_log(log);
        assert_eq!(stats.len(), 2);
        assert_eq!(
            stats[0],
            KernelStats {
                function: "layernorm_forward".into(),
                registers: 38,
                shared_bytes: 256,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12,
                wgmma_serialized: false,
                wgmma_wait_injected: true
            }
        );
        assert_eq!((stats[1].registers, stats[1].shared_bytes, stats[1].spill_stores), (20, 0, 0));
        assert!(stats[1].wgmma_serialized && !stats[1].wgmma_wait_injected);
    }

    #[test]
    fn entry_points_refuse_what_is_not_a_cubin() {
        assert!(entry_points(b"PTX").unwrap_err().contains("not a 64-bit"));
        let mut header = b"\x7fELF\x02\x01".to_vec();
        header.resize(0x30, 0);
        assert!(entry_points(&header).unwrap_err().contains("truncated"));
        // A section table said to lie at the very end of the address space.
        header.resize(0x40, 0);
        header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        header[0x3c] = 1;
        assert!(entry_points(&header).unwrap_err().contains("truncated"));
    }

    #[test]
    fn cache_keys_are_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}

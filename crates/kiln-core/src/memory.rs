//! What a run will allocate, known before it allocates anything.
//!
//! Every buffer of a run is allocated before its first step, by code that asks a [`Backend`] for each one. Run that
//! same code against [`Counting`], a backend that records each request and holds nothing, and the result is the
//! run's memory to the byte, for any engine whose [`Storage`] is known. What an engine takes beyond those requests
//! (its kernels' working memory, library workspaces, its context) it states itself, as [`Component`]s, through a
//! [`MemoryModel`]; neither needs the device, so a run on eight GPUs can be planned on a laptop.

use crate::backend::{
    AdamWStep, AttentionBackward, AttentionDims, Backend, BufferId, MatmulBackward, MatmulForward, NormBackward,
    NormForward, QkNormBackward, QkNormForward, Role, Rotary, Tensor,
};
use crate::error::{Error, Result};
use crate::experts::{
    ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeGather, MoeRoute, MoeRouteBackward,
};
use std::ops::Range;

/// Bytes per element of each [`Role`] in an engine, and of the fp32 master copy an engine keeps beside
/// lower-precision parameters (0 without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    pub param: usize,
    pub master: usize,
    pub grad: usize,
    pub activation: usize,
    pub stat: usize,
    pub opt_state: usize,
    pub index: usize,
}

impl Storage {
    /// Everything in fp32, token ids in 32 bits, no master copy.
    pub const FP32: Storage = Storage { param: 4, master: 0, grad: 4, activation: 4, stat: 4, opt_state: 4, index: 4 };

    pub fn bytes(&self, role: Role) -> usize {
        match role {
            Role::Param => self.param,
            Role::Grad => self.grad,
            Role::Activation => self.activation,
            Role::Stat => self.stat,
            Role::OptState => self.opt_state,
            Role::Index => self.index,
        }
    }
}

/// A named part of a run's memory, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub bytes: u64,
    /// Whether the engine counts it in [`Backend::allocated_bytes`] (what a driver or library allocates for
    /// itself, it does not).
    pub allocated: bool,
}

impl Component {
    /// Memory the engine allocates and counts.
    pub fn allocated(name: impl Into<String>, bytes: u64) -> Self {
        Component { name: name.into(), bytes, allocated: true }
    }

    /// Memory taken outside the engine's count.
    pub fn outside(name: impl Into<String>, bytes: u64) -> Self {
        Component { name: name.into(), bytes, allocated: false }
    }
}

/// The shapes of a training step's operations that an engine's working memory depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShapes {
    /// Rows of a micro-batch: `micro_batch × block_size`.
    pub rows: usize,
    pub n_embd: usize,
    /// The widest output of the matrix products that have a bias (their gradient is summed over rows): the most
    /// bias-gradient columns one product computes, its own or (with fused bias gradients) that of GELU's input.
    pub max_bias_width: usize,
    pub attention: AttentionDims,
    /// Whether the norms' backward passes also sum their input gradient for the projections' bias gradients (fused
    /// bias gradients in a model with biases).
    pub norm_bias_sums: bool,
    /// Whether attention's backward pass also sums its input gradient for the qkv projection's bias gradient (fused
    /// bias gradients in a model with biases and learned positions).
    pub attention_bias_sums: bool,
    /// Whether the query and key heads are normalised (QK-norm), whose backward pass has working memory of its own.
    pub qk_norm: bool,
}

/// How an engine's memory is laid out, without the engine: what [`Counting`] needs to count its allocations, and
/// what it takes beyond them.
pub trait MemoryModel {
    /// The engine and its precision, for the plan's heading: `cuda (bf16)`.
    fn engine(&self) -> String;
    fn storage(&self) -> Storage;
    /// Memory the engine takes beyond the buffers it is asked for, during a step of `step` on each of `world`
    /// ranks (one per device): working memory of its kernels, libraries' workspaces, communication buffers, the
    /// context. Each component says in its name when it is an estimate rather than a count.
    fn overheads(&self, step: &StepShapes, world: usize) -> Vec<Component>;
    /// Whether the ranks of a job share this memory (the CPU engine's ranks are threads of one process) rather
    /// than having a device each.
    fn shared_by_ranks(&self) -> bool;
    /// Whether the components outside the engine's count (a context, communication buffers) exist already when a
    /// trainer starts on the engine, so that the memory then free does not include them.
    fn outside_exists_at_start(&self) -> bool;
    /// The widest attention head the engine's kernels take, where they have a limit: known without a device, so
    /// that a model the engine cannot run is refused before anything is allocated.
    fn max_head_dim(&self) -> Option<usize> {
        None
    }
}

/// One request made to a [`Counting`] backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub role: Role,
    pub len: usize,
    /// Elements of the fp32 master copy kept for a parameter allocation (its length, or the pieces a ZeRO rank
    /// keeps), where the storage has one.
    pub master_len: usize,
}

/// A backend that records the allocations asked of it, in a given [`Storage`], and holds no memory: uploads and
/// downloads do nothing, and every operation fails (nothing can be computed on it).
pub struct Counting {
    storage: Storage,
    pub allocations: Vec<Allocation>,
}

impl Counting {
    pub fn new(storage: Storage) -> Self {
        Counting { storage, allocations: Vec::new() }
    }

    /// Bytes of the allocations of `role` (parameters without their master copy).
    pub fn bytes_of(&self, role: Role) -> u64 {
        self.allocations.iter().filter(|a| a.role == role).map(|a| (a.len * self.storage.bytes(role)) as u64).sum()
    }

    /// Bytes of the master copies.
    pub fn master_bytes(&self) -> u64 {
        self.allocations.iter().map(|a| (a.master_len * self.storage.master) as u64).sum()
    }

    fn nothing_to_run(&self, op: &str) -> Result<()> {
        Err(Error::Invalid(format!("{op}: a counting backend holds no data and runs nothing")))
    }
}

impl Backend for Counting {
    fn name(&self) -> String {
        "counting".into()
    }

    fn alloc(&mut self, len: usize, role: Role) -> Result<Tensor> {
        let master_len = if role == Role::Param && self.storage.master > 0 { len } else { 0 };
        let buffer = BufferId(self.allocations.len() as u32);
        self.allocations.push(Allocation { role, len, master_len });
        Ok(Tensor { buffer, offset: 0, len })
    }

    fn upload(&mut self, _: Tensor, _: &[f32]) -> Result<()> {
        Ok(())
    }

    fn holds_data(&self) -> bool {
        false
    }

    fn download(&mut self, _: Tensor, _: &mut [f32]) -> Result<()> {
        self.nothing_to_run("download")
    }

    fn upload_indices(&mut self, _: Tensor, _: &[u32]) -> Result<()> {
        Ok(())
    }

    fn zero(&mut self, _: Tensor) -> Result<()> {
        Ok(())
    }

    fn add(&mut self, _: Tensor, _: Tensor) -> Result<()> {
        self.nothing_to_run("add")
    }

    fn sum(&mut self, _: Tensor) -> Result<f32> {
        self.nothing_to_run("sum").map(|_| 0.0)
    }

    fn sum_squares(&mut self, _: Tensor) -> Result<f32> {
        self.nothing_to_run("sum_squares").map(|_| 0.0)
    }

    fn sum_into(&mut self, _: Tensor, _: bool, _: Tensor) -> Result<()> {
        self.nothing_to_run("sum_into")
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn memory_model(&self) -> Box<dyn MemoryModel> {
        Box::new(Counted(self.storage))
    }

    fn free_bytes(&self) -> Option<u64> {
        None
    }

    fn allocated_bytes(&self) -> u64 {
        [Role::Param, Role::Grad, Role::Activation, Role::Stat, Role::OptState, Role::Index]
            .into_iter()
            .map(|role| self.bytes_of(role))
            .sum::<u64>()
            + self.master_bytes()
    }

    fn keep_master_pieces(&mut self, params: Tensor, pieces: &[Range<usize>]) -> Result<()> {
        let allocation = self
            .allocations
            .get_mut(params.buffer.0 as usize)
            .ok_or_else(|| Error::Invalid(format!("keep_master_pieces: no allocation {:?}", params.buffer)))?;
        if allocation.master_len > 0 {
            allocation.master_len = pieces.iter().map(|p| p.len()).sum();
        }
        Ok(())
    }

    fn encoder_forward(
        &mut self,
        _: Tensor,
        _: Tensor,
        _: Tensor,
        _: Option<Tensor>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.nothing_to_run("encoder_forward")
    }

    fn encoder_backward(
        &mut self,
        _: Tensor,
        _: Option<Tensor>,
        _: Tensor,
        _: Tensor,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        self.nothing_to_run("encoder_backward")
    }

    fn norm_forward(&mut self, _: NormForward) -> Result<()> {
        self.nothing_to_run("norm_forward")
    }

    fn norm_backward(&mut self, _: NormBackward) -> Result<()> {
        self.nothing_to_run("norm_backward")
    }

    fn matmul_forward(&mut self, _: MatmulForward) -> Result<()> {
        self.nothing_to_run("matmul_forward")
    }

    fn moe_route(&mut self, _: MoeRoute) -> Result<()> {
        self.nothing_to_run("moe_route")
    }

    fn moe_route_backward(&mut self, _: MoeRouteBackward) -> Result<()> {
        self.nothing_to_run("moe_route_backward")
    }

    fn moe_gather(&mut self, _: MoeGather) -> Result<()> {
        self.nothing_to_run("moe_gather")
    }

    fn moe_combine(&mut self, _: MoeCombine) -> Result<()> {
        self.nothing_to_run("moe_combine")
    }

    fn moe_combine_backward(&mut self, _: MoeCombineBackward) -> Result<()> {
        self.nothing_to_run("moe_combine_backward")
    }

    fn expert_matmul_forward(&mut self, _: ExpertMatmulForward) -> Result<()> {
        self.nothing_to_run("expert_matmul_forward")
    }

    fn expert_matmul_backward(&mut self, _: ExpertMatmulBackward) -> Result<()> {
        self.nothing_to_run("expert_matmul_backward")
    }

    fn matmul_backward(&mut self, _: MatmulBackward) -> Result<()> {
        self.nothing_to_run("matmul_backward")
    }

    fn gelu_forward(&mut self, _: Tensor, _: Tensor) -> Result<()> {
        self.nothing_to_run("gelu_forward")
    }

    fn swiglu_forward(&mut self, _: Tensor, _: Tensor, _: usize, _: usize) -> Result<()> {
        self.nothing_to_run("swiglu_forward")
    }

    fn swiglu_backward(&mut self, _: Tensor, _: Tensor, _: Tensor, _: usize, _: usize) -> Result<()> {
        self.nothing_to_run("swiglu_backward")
    }

    fn rope(&mut self, _: Rotary) -> Result<()> {
        self.nothing_to_run("rope")
    }

    fn qk_norm_forward(&mut self, _: QkNormForward) -> Result<()> {
        self.nothing_to_run("qk_norm_forward")
    }

    fn qk_norm_backward(&mut self, _: QkNormBackward) -> Result<()> {
        self.nothing_to_run("qk_norm_backward")
    }

    fn attention_forward(&mut self, _: Tensor, _: Tensor, _: Tensor, _: AttentionDims) -> Result<()> {
        self.nothing_to_run("attention_forward")
    }

    fn attention_backward(&mut self, _: AttentionBackward) -> Result<()> {
        self.nothing_to_run("attention_backward")
    }

    fn attention_decode(&mut self, _: Tensor, _: Tensor, _: usize, _: AttentionDims) -> Result<()> {
        self.nothing_to_run("attention_decode")
    }

    fn classifier(
        &mut self,
        _: Tensor,
        _: Tensor,
        _: Tensor,
        _: usize,
        _: usize,
        _: usize,
        _: Option<Tensor>,
    ) -> Result<()> {
        self.nothing_to_run("classifier")
    }

    fn adamw(&mut self, _: Tensor, _: Tensor, _: Tensor, _: Tensor, _: &AdamWStep) -> Result<()> {
        self.nothing_to_run("adamw")
    }
}

/// The memory model of a [`Counting`] backend: its storage, and nothing beyond its allocations.
struct Counted(Storage);

impl MemoryModel for Counted {
    fn engine(&self) -> String {
        "counting".into()
    }

    fn storage(&self) -> Storage {
        self.0
    }

    fn overheads(&self, _: &StepShapes, _: usize) -> Vec<Component> {
        Vec::new()
    }

    fn shared_by_ranks(&self) -> bool {
        false
    }

    fn outside_exists_at_start(&self) -> bool {
        false
    }
}

/// Bytes of memory this process can still allocate on the host, if the system says: Linux's `MemAvailable`, or less
/// where the process's control group (a container's, a Slurm job's) has a memory limit.
pub fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let host = meminfo.and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let own = std::fs::read_to_string("/proc/self/cgroup").ok();
    let group = own.and_then(|own| group_available_bytes(std::path::Path::new("/sys/fs/cgroup"), &own));
    match (host, group) {
        (Some(host), Some(group)) => Some(host.min(group)),
        (host, group) => host.or(group),
    }
}

/// The least that the memory control groups of `own` (the text of /proc/self/cgroup) leave to allocate, under
/// `root` (where the control groups are mounted): each limit less what its group uses, the group's inactive page
/// cache counted as free (the kernel reclaims it before it kills). Every group from the process's up to the mount's
/// root counts, since a limit may sit on a parent (Slurm sets it on the job and the step, not the task); inside a
/// container the mount's root is the container's group. Version 2's `memory.max`, or version 1's
/// `memory.limit_in_bytes`.
fn group_available_bytes(root: &std::path::Path, own: &str) -> Option<u64> {
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).ok();
    let number = |path: std::path::PathBuf| read(path).and_then(|t| t.trim().parse::<u64>().ok());
    let mut least: Option<u64> = None;
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (mount, limit, usage, inactive) = if id == "0" && controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        } else {
            continue;
        };
        let group = std::path::Path::new(path.trim_start_matches('/'));
        for dir in group.ancestors().map(|g| mount.join(g)) {
            // "max" (version 2) is no limit; version 1 writes a huge number, which the host's figure undercuts.
            let (Some(limit), Some(used)) = (number(dir.join(limit)), number(dir.join(usage))) else { continue };
            let stat = read(dir.join("memory.stat")).unwrap_or_default();
            let cache = stat.lines().find_map(|l| l.strip_prefix(inactive)?.trim().parse::<u64>().ok()).unwrap_or(0);
            let free = limit.saturating_sub(used.saturating_sub(cache));
            least = Some(least.map_or(free, |l| l.min(free)));
        }
    }
    least
}

/// Parses a size such as `80GiB`, `80GB`, `512MiB` or a plain number of bytes.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a size such as 80GiB"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")),
    };
    if !(number.is_finite() && number > 0.0) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok((number * scale).round() as u64)
}

/// `bytes` for people, in GiB (or MiB below one GiB).
pub fn describe_bytes(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 { format!("{gib:.2} GiB") } else { format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_groups_limit_bounds_what_the_host_can_allocate() {
        let root = std::env::temp_dir().join(format!("kiln-cgroup-test-{}", std::process::id()));
        let write = |dir: &std::path::Path, files: &[(&str, &str)]| {
            std::fs::create_dir_all(dir).unwrap();
            files.iter().for_each(|(name, text)| std::fs::write(dir.join(name), text).unwrap());
        };
        // Version 2, as Slurm sets it: 8 GiB on the job, of which 3 GiB used, 1 GiB of that inactive page cache;
        // no limit on the task the process runs in, nor at the root.
        let gib = 1u64 << 30;
        let v2 = root.join("v2");
        let stat = format!("anon 1234\ninactive_file {gib}\nactive_file 5\n");
        write(&v2.join("job"), &[("memory.max", "8589934592\n"), ("memory.current", "3221225472\n")]);
        write(&v2.join("job"), &[("memory.stat", &stat)]);
        write(&v2.join("job/task_0"), &[("memory.max", "max\n"), ("memory.current", "1\n")]);
        write(&v2, &[("memory.max", "max\n"), ("memory.current", "1\n")]);
        assert_eq!(group_available_bytes(&v2, "0::/job/task_0\n"), Some(6 * gib));
        // Version 1 inside a container: the mount's root is the group (its path names the host's hierarchy). A line
        // that is not one is passed over.
        let v1 = root.join("v1");
        let stat = format!("cache 9\ntotal_inactive_file {gib}\n");
        let files = [("memory.limit_in_bytes", "4294967296"), ("memory.usage_in_bytes", "2147483648")];
        write(&v1.join("memory"), &files);
        write(&v1.join("memory"), &[("memory.stat", &stat)]);
        assert_eq!(group_available_bytes(&v1, "garbage\n9:cpu,cpuacct:/\n4:memory:/docker/abc\n"), Some(3 * gib));
        // No memory controller, or no files: nothing to say.
        assert_eq!(group_available_bytes(&v1, "9:cpu:/\n"), None);
        assert_eq!(group_available_bytes(&root.join("none"), "0::/\n"), None);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn counting_counts_each_role_in_its_storage_and_a_kept_master_copy() {
        let storage = Storage { param: 2, master: 4, activation: 2, ..Storage::FP32 };
        let mut c = Counting::new(storage);
        let params = c.alloc(1000, Role::Param).unwrap();
        c.alloc(1000, Role::Grad).unwrap();
        c.alloc(10, Role::Activation).unwrap();
        c.alloc(3, Role::Index).unwrap();
        assert_eq!(c.allocated_bytes(), 2000 + 4000 + 4000 + 20 + 12);
        c.keep_master_pieces(params, &[0..100, 500..600]).unwrap();
        assert_eq!(c.master_bytes(), 800);
        assert_eq!(c.allocated_bytes(), 2000 + 800 + 4000 + 20 + 12);
        assert!(c.sum(params).is_err());
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("80 GB"), Ok(80_000_000_000));
        assert_eq!(parse_bytes("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("80 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("-3GiB").is_err());
        assert!(parse_bytes("GiB").is_err());
    }
}

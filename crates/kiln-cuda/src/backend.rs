//! The CUDA engine: [`Backend`] on one GPU, one stream.
//!
//! Storage by role: in bf16, parameters and activations are bf16 and every parameter allocation has an fp32
//! master copy beside it, of all of it or (for a ZeRO rank) of the pieces the rank updates (uploads write both;
//! AdamW updates the master and rounds it into the parameters); weight gradients, statistics, losses and optimizer
//! moments are fp32 in both precisions. Matrix products go through cuBLASLt (the `matmul` module: bf16 or fp32 in,
//! fp32 accumulation, TF32 off), with the bias, GELU and the bias gradient fused into them. Every other operation
//! is a kernel of `kernels/`, compiled by NVRTC for this GPU. A mixture of experts' products run on cuBLASLt an
//! expert at a time, sized by the routing's offsets, which routing reads back to the host; or, with
//! `KILN_EXPERT_PRODUCTS=grouped` ([`ExpertProducts`]), as one grouped kernel that reads them on the device.
//!
//! `kiln selftest --backend cuda` checks every operation against the CPU engine; it passes on an H100 and an H200
//! (the mixture-of-experts operations and the grouped products, added since, have run only under the CPU emulation
//! of `scripts/emulate`).
//! With the master copy in pieces, ZeRO-1 in bf16 trains bit for bit as plain data parallelism does there
//! (gpu-check's dp-equivalence).

use crate::compile::{self, Compiler};
use crate::devices;
use crate::kernels::{KERNELS, Precision};
use crate::libraries::Library;
use crate::matmul::{self, CublasLt, Epilogue, Operand, Product};
use crate::memory::{self, CudaMemory, NORM_ROWS_PER_BLOCK, REDUCE_BLOCKS};
use cudarc::driver::result;
use cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUfunction_attribute, CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode,
    CUstreamCaptureStatus,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;
use kiln_core::backend::{BufferId, first_overlap, qk_norm_lens};
use kiln_core::config::AttentionKernel;
use kiln_core::experts::{
    ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeDims, MoeGather, MoeRoute,
    MoeRouteBackward,
};
use kiln_core::pieces::Pieces;
use kiln_core::{
    AdamWStep, AttentionBackward, AttentionDims, Backend, Error, Graph, MatmulBackward, MatmulDims, MatmulForward,
    NormBackward, NormForward, NormKind, QkNormBackward, QkNormForward, Result, Role, Rotary, Tensor,
};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DType {
    F32,
    Bf16,
    U32,
}

impl DType {
    pub(crate) fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

struct Buffer {
    _mem: CudaSlice<u8>,
    ptr: u64,
    len: usize,
    dtype: DType,
    /// fp32 master weights of a bf16 parameter allocation.
    master: Option<Master>,
}

/// The fp32 master copy of some pieces of a parameter allocation (all of it unless a ZeRO rank said otherwise),
/// packed.
struct Master {
    _mem: CudaSlice<u8>,
    ptr: u64,
    pieces: Pieces,
}

/// The launch of a kernel that sums each of `columns` columns over rows in a fixed order (layernorm_backward_sum,
/// column_sums): a block of 32 lanes, one column each, by 16 rows of threads (COLUMN_SUM_LANES × COLUMN_SUM_ROWS in
/// kernels/common.cuh).
fn column_sums(columns: usize) -> LaunchConfig {
    const LANES: u32 = 32;
    const ROWS: u32 = 16;
    LaunchConfig {
        grid_dim: (columns.div_ceil(LANES as usize) as u32, 1, 1),
        block_dim: (LANES * ROWS, 1, 1),
        shared_mem_bytes: 0,
    }
}
/// The block of encoder_sort_rows and the bits of a token it sorts by in each pass (SORT_THREADS and SORT_BITS in
/// kernels/encoder.cu).
const SORT_THREADS: u32 = 512;
const SORT_BITS: u32 = 4;
/// The unfused attention kernels keep a row in registers: at most 32 lanes × 4.
pub(crate) const MAX_HEAD_DIM: usize = 128;

/// Rows a dq block holds (queries) and a dkv block holds (keys): 16 per warp.
const FLASH_BLOCK_ROWS: usize = 64;

/// Per head dimension the fused attention kernels (kernels/flash_attention.cu) are built for: the forward, dq, dkv
/// and dkv-with-atomic-dQ kernels, the same on wgmma, which sm_90a has for some, and the pipelined forward and the
/// warp-specialised forward, dq, dkv and dkv-with-atomic-dQ kernels on wgmma.
macro_rules! flash_kernels {
    ($($d:literal),*) => {
        [$(($d, [
            concat!("flash_attention_forward_wgmma_pipelined_d", $d),
            concat!("flash_attention_forward_wgmma_specialised_d", $d),
            concat!("flash_attention_backward_dq_wgmma_specialised_d", $d),
            concat!("flash_attention_backward_dkv_wgmma_specialised_d", $d),
            concat!("flash_attention_backward_dkv_dq_wgmma_specialised_d", $d),
        ], [
            concat!("flash_attention_forward_d", $d),
            concat!("flash_attention_backward_dq_d", $d),
            concat!("flash_attention_backward_dkv_d", $d),
            concat!("flash_attention_backward_dkv_dq_d", $d),
        ], [
            concat!("flash_attention_forward_wgmma_d", $d),
            concat!("flash_attention_backward_dq_wgmma_d", $d),
            concat!("flash_attention_backward_dkv_wgmma_d", $d),
            concat!("flash_attention_backward_dkv_dq_wgmma_d", $d),
        ])),*]
    };
}
type FlashKernelNames = (usize, [&'static str; 5], [&'static str; 4], [&'static str; 4]);
const FLASH_KERNELS: [FlashKernelNames; 4] = flash_kernels!(32, 64, 96, 128);

/// Whether the fused attention kernels are built for `head_dim`.
pub(crate) fn fused_head_dim(head_dim: usize) -> bool {
    FLASH_KERNELS.iter().any(|(built, ..)| *built == head_dim)
}

/// Which fused kernels run on wgmma where the module has them (sm_90a at head dimensions 64 and 128); elsewhere they
/// run on mma.sync. `KILN_FLASH_WGMMA` lists `forward`, `backward` (the dq and dkv kernels, or the dkv kernel with
/// atomic dQ), or `none`, comma-separated; unset or empty means both, the default since they passed the self-test
/// and beat the mma.sync kernels on an H200 and an H100 (docs/benchmarks.md). `none` keeps the mma.sync kernels.
/// `pipelined` runs the forward on wgmma in its pipelined form (flash_forward_pipelined in the kernel file),
/// `specialised` in its warp-specialised form (flash_forward_specialised: tensor copies, mbarriers, ping-pong) and,
/// with `backward`, the dq and dkv kernels of the deterministic backward too (flash_backward_dq_specialised,
/// flash_backward_dkv_specialised), and the dkv kernel with atomic dQ (tensor reductions), which the CPU emulation has
/// checked but no GPU has yet timed: not a default until one measures them faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashWgmma {
    pub forward: bool,
    pub backward: bool,
    /// The forward's form on wgmma, with `forward` (specialised, with `backward` the dq and dkv kernels' too).
    pub form: ForwardForm,
}

/// Which form of the forward on wgmma runs (and, specialised, of the deterministic backward's kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardForm {
    /// flash_forward: each warpgroup waits for each product.
    Plain,
    /// flash_forward_pipelined: a warpgroup's softmax overlaps its previous tile's P·V.
    Pipelined,
    /// flash_forward_specialised: a loading warpgroup and two computing ones taking turns.
    Specialised,
}

impl FlashWgmma {
    pub const VARIABLE: &'static str = "KILN_FLASH_WGMMA";
    const BOTH: FlashWgmma = FlashWgmma { forward: true, backward: true, form: ForwardForm::Plain };

    /// The choice `value` (the variable's value, if set) names.
    pub fn parse(value: Option<&str>) -> Result<FlashWgmma> {
        let parts: Vec<&str> = value.unwrap_or_default().split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Ok(FlashWgmma::BOTH);
        }
        let mut choice = FlashWgmma { forward: false, backward: false, form: ForwardForm::Plain };
        for part in parts {
            let form = match part {
                "forward" => None,
                "backward" => {
                    choice.backward = true;
                    continue;
                }
                "pipelined" => Some(ForwardForm::Pipelined),
                "specialised" => Some(ForwardForm::Specialised),
                "none" => continue,
                other => {
                    return Err(Error::Usage(format!(
                        "{}: {other:?} is not a part of the fused attention; expected \"forward\", \"backward\", \
                         \"pipelined\" or \"specialised\" (a form of the forward), several of them \
                         (comma-separated) or \"none\"",
                        FlashWgmma::VARIABLE
                    )));
                }
            };
            choice.forward = true;
            if let Some(form) = form {
                if choice.form != ForwardForm::Plain && choice.form != form {
                    return Err(Error::Usage(format!(
                        "{}: \"pipelined\" and \"specialised\" are two forms of the forward; name one",
                        FlashWgmma::VARIABLE
                    )));
                }
                choice.form = form;
            }
        }
        Ok(choice)
    }

    fn from_env() -> Result<FlashWgmma> {
        let value = std::env::var(FlashWgmma::VARIABLE).ok();
        FlashWgmma::parse(value.as_deref())
    }
}

/// How the experts' products run (`KILN_EXPERT_PRODUCTS`). `per-expert`, the default: cuBLASLt once per expert's
/// run of the dispatched rows, whose lengths routing reads back to the host (a wait per layer and pass, and no graph
/// can be captured). `grouped`: the tensor-core kernels of kernels/expert_products.cu, one launch for all the
/// experts, each block reading its run from the offsets on the device (no wait; capturable). They are bf16 only and
/// need c_in and c_out multiples of 8 and 16-byte aligned operands; products without take the per-expert way. The CPU
/// emulation has checked them but no GPU has yet run or timed them: not the default until one measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertProducts {
    PerExpert,
    Grouped,
}

impl ExpertProducts {
    pub const VARIABLE: &'static str = "KILN_EXPERT_PRODUCTS";

    /// The choice `value` (the variable's value, if set) names.
    pub fn parse(value: Option<&str>) -> Result<ExpertProducts> {
        match value.map(str::trim).unwrap_or_default() {
            "" | "per-expert" => Ok(ExpertProducts::PerExpert),
            "grouped" => Ok(ExpertProducts::Grouped),
            other => Err(Error::Usage(format!(
                "{}: {other:?} is not a way to run the experts' products; expected \"per-expert\" or \"grouped\"",
                ExpertProducts::VARIABLE
            ))),
        }
    }

    fn from_env() -> Result<ExpertProducts> {
        ExpertProducts::parse(std::env::var(ExpertProducts::VARIABLE).ok().as_deref())
    }
}

/// `expert_products_launch` of kernels/expert_products.cu: a tile's rows and columns, a block's threads and its
/// dynamic shared memory.
#[derive(Clone, Copy, Debug)]
struct GroupedExperts {
    tile_rows: u32,
    tile_cols: u32,
    threads: u32,
    shared_bytes: u32,
}

impl GroupedExperts {
    fn read(cubin: &[u8]) -> Result<GroupedExperts> {
        let name = "expert_products_launch";
        let [tile_rows, tile_cols, threads, shared_bytes] = launch_words(cubin, name)?
            .ok_or_else(|| Error::backend("cuda", format!("the experts' grouped products define no {name}")))?;
        Ok(GroupedExperts { tile_rows, tile_cols, threads, shared_bytes })
    }

    /// A launch of `blocks` blocks.
    fn launch(&self, blocks: (usize, usize, usize)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.0 as u32, blocks.1 as u32, blocks.2 as u32),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }

    /// The row products' blocks for `rows` dispatched rows among `experts` runs and `width` output columns: a tile
    /// of every run's rows, as many as the worst case has (each run but one may end one row into a tile), by the
    /// columns' tiles.
    fn row_blocks(&self, rows: usize, experts: usize, width: usize) -> (usize, usize, usize) {
        let run_tiles = rows.div_ceil(self.tile_rows as usize) + experts - 1;
        (run_tiles.max(1), width.div_ceil(self.tile_cols as usize), 1)
    }

    /// The weight gradient's blocks: an expert's tiles of c_out × c_in.
    fn weight_blocks(&self, d: MatmulDims, experts: usize) -> (usize, usize, usize) {
        (experts, d.c_in.div_ceil(self.tile_cols as usize), d.c_out.div_ceil(self.tile_rows as usize))
    }
}

/// How to launch the fused attention kernels of one head dimension on this GPU. The kernel file chooses the tiles
/// (per architecture, where the reasons are written) and exports what a launch needs, `flash_attention_launch_dD`,
/// which the engine reads from the compiled module; each kernel checks its block size and shared memory and traps
/// if a launch disagrees.
#[derive(Clone, Copy)]
struct FlashTiles {
    head_dim: usize,
    /// Queries per forward block.
    forward_rows: usize,
    /// Dynamic shared memory and threads a block of the forward, dq, dkv and dkv_dq kernels.
    shared_bytes: [u32; 4],
    threads: [u32; 4],
    /// Those kernels, in the order of [`FlashTiles::FORWARD`], `DQ`, `DKV` and `DKV_DQ`.
    kernels: [&'static str; 4],
    /// Keys a tile, when the forward is the warp-specialised one, which reads qkv through tensor maps.
    forward_keys: Option<u32>,
    /// How the warp-specialised dq and dkv kernels (and dkv_dq), when they run, take the sequence.
    specialised_backward: Option<SpecialisedBackward>,
}

/// The warp-specialised dq and dkv kernels' blocks: queries a dq block, keys a dkv block (with or without atomic
/// dQ), and the rows of every tensor map's box of Q, K, V and dO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SpecialisedBackward {
    dq_queries: usize,
    dkv_keys: usize,
    box_rows: u32,
}

/// The rows of a box of dQ's fp32 sums, which the warp-specialised dkv kernel with atomic dQ adds a warp's 16 rows at
/// a time into (kernels/flash_attention.cu, reduce_dq_tile).
const DQ_BOX_ROWS: u32 = 16;

impl SpecialisedBackward {
    /// The tensor maps of qkv (at `qkv`) and dout (at `dout`) that the kernels read.
    fn maps(&self, qkv: u64, dout: u64, d: &AttentionDims) -> Result<(TensorMap, TensorMap)> {
        let bf16 = DType::Bf16;
        Ok((
            tensor_map(qkv, bf16, d.qkv_width(), d, self.box_rows)?,
            tensor_map(dout, bf16, d.channels(), d, self.box_rows)?,
        ))
    }
}

impl FlashTiles {
    const FORWARD: usize = 0;
    const DQ: usize = 1;
    const DKV: usize = 2;
    const DKV_DQ: usize = 3;

    /// The tiles of every head dimension, read from the fused kernels' CUBIN, with the kernels `wgmma` names on
    /// wgmma where the module has them.
    fn read(cubin: &[u8], wgmma: FlashWgmma) -> Result<Vec<FlashTiles>> {
        FLASH_KERNELS
            .into_iter()
            .map(|(head_dim, forms, kernels, wgmma_kernels)| {
                let [pipelined_forward, specialised_forward, specialised_dq, specialised_dkv, specialised_dkv_dq] =
                    forms;
                let words = flash_launch_table(cubin, head_dim)?;
                let mut tiles = FlashTiles {
                    head_dim,
                    forward_rows: words[0] as usize,
                    shared_bytes: [words[1], words[2], words[3], words[4]],
                    threads: [words[5], words[6], words[7], words[8]],
                    kernels,
                    forward_keys: None,
                    specialised_backward: None,
                };
                if let Some(w) = flash_wgmma_launch_table(cubin, head_dim)? {
                    let on = [wgmma.forward, wgmma.backward, wgmma.backward, wgmma.backward];
                    for kernel in (0..4).filter(|&k| on[k]) {
                        tiles.shared_bytes[kernel] = w[1 + kernel];
                        tiles.threads[kernel] = w[5 + kernel];
                        tiles.kernels[kernel] = wgmma_kernels[kernel];
                    }
                    if wgmma.forward {
                        tiles.forward_rows = w[0] as usize;
                    }
                    let mut set = |kernel: usize, name, shared, threads| {
                        (tiles.kernels[kernel], tiles.shared_bytes[kernel], tiles.threads[kernel]) =
                            (name, shared, threads);
                    };
                    match wgmma.form {
                        ForwardForm::Plain => {}
                        ForwardForm::Pipelined => {
                            if let Some([shared, threads]) = flash_pipelined_launch_table(cubin, head_dim)? {
                                set(Self::FORWARD, pipelined_forward, shared, threads);
                            }
                        }
                        ForwardForm::Specialised => {
                            if let Some(t) = flash_specialised_launch_table(cubin, head_dim)? {
                                set(Self::FORWARD, specialised_forward, t[1], t[0]);
                                if wgmma.backward {
                                    set(Self::DQ, specialised_dq, t[3], t[0]);
                                    set(Self::DKV, specialised_dkv, t[6], t[0]);
                                    set(Self::DKV_DQ, specialised_dkv_dq, t[8], t[0]);
                                    tiles.specialised_backward = Some(SpecialisedBackward {
                                        dq_queries: t[4] as usize,
                                        box_rows: t[5],
                                        dkv_keys: t[7] as usize,
                                    });
                                }
                                tiles.forward_keys = Some(t[2]);
                            }
                        }
                    }
                }
                Ok(tiles)
            })
            .collect()
    }

    /// A launch of `blocks` blocks of kernel `kernel` (FORWARD, DQ, DKV or DKV_DQ) for each head and batch element.
    fn launch(&self, kernel: usize, blocks: usize, heads: usize, batch: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, heads as u32, batch as u32),
            block_dim: (self.threads[kernel], 1, 1),
            shared_mem_bytes: self.shared_bytes[kernel],
        }
    }
}

/// `flash_attention_launch_d{head_dim}` of the fused kernels' CUBIN: queries per forward block, then the dynamic
/// shared memory of the forward, dq, dkv and dkv_dq kernels, then their threads a block.
pub fn flash_launch_table(cubin: &[u8], head_dim: usize) -> Result<[u32; 9]> {
    let name = format!("flash_attention_launch_d{head_dim}");
    launch_words(cubin, &name)?
        .ok_or_else(|| Error::backend("cuda", format!("the fused attention kernels define no {name}")))
}

/// `flash_attention_launch_wgmma_d{head_dim}`, where the CUBIN has kernels on wgmma for that head dimension (sm_90a),
/// laid out as [`flash_launch_table`]'s.
pub fn flash_wgmma_launch_table(cubin: &[u8], head_dim: usize) -> Result<Option<[u32; 9]>> {
    launch_words(cubin, &format!("flash_attention_launch_wgmma_d{head_dim}"))
}

/// `flash_attention_launch_wgmma_pipelined_d{head_dim}`, where the CUBIN has the pipelined forward on wgmma for that
/// head dimension (sm_90a): its dynamic shared memory and its threads a block.
pub fn flash_pipelined_launch_table(cubin: &[u8], head_dim: usize) -> Result<Option<[u32; 2]>> {
    launch_words(cubin, &format!("flash_attention_launch_wgmma_pipelined_d{head_dim}"))
}

/// `flash_attention_launch_wgmma_specialised_d{head_dim}`, where the CUBIN has the warp-specialised forward, dq, dkv
/// and dkv-with-atomic-dQ kernels for that head dimension (sm_90a): threads a block (all four), the forward's dynamic
/// shared memory and keys a tile, the dq kernel's dynamic shared memory, queries a block and rows a tile (of the
/// backward kernels), the dkv kernel's dynamic shared memory and keys a block (both forms), and the dynamic shared
/// memory of the one with atomic dQ.
pub fn flash_specialised_launch_table(cubin: &[u8], head_dim: usize) -> Result<Option<[u32; 9]>> {
    launch_words(cubin, &format!("flash_attention_launch_wgmma_specialised_d{head_dim}"))
}

/// A tensor map (CUtensorMap) passed to a kernel by value, as kernels/mma.cuh's `__grid_constant__ TensorMap`.
#[repr(transparent)]
struct TensorMap(sys::CUtensorMap);
// SAFETY: 128 plain bytes, which the launch copies into the kernel's parameter of the same layout.
unsafe impl DeviceRepr for TensorMap {}

/// How the warp-specialised kernels see a (B, T, `width`) matrix of `element` (qkv or dout in bf16, dQ's fp32 sums)
/// through a tensor map: dimensions (`width` elements, T rows, B sequences), the bytes between rows and between
/// sequences, and boxes of 128 bytes (the swizzle's row) by `rows`.
fn map_shape(element: DType, width: usize, d: &AttentionDims, rows: u32) -> ([u64; 3], [u64; 2], [u32; 3]) {
    let (w, t, e) = (width as u64, d.time as u64, element.size() as u64);
    ([w, t, d.batch as u64], [w * e, t * w * e], [128 / e as u32, rows, 1])
}

/// The tensor map of the (B, T, `width`) matrix of `element` at device address `address` with boxes of `rows` rows,
/// in the 128-byte swizzle the kernels' tiles use; rows past the end of a sequence arrive as zeros, and reductions
/// leave them out.
fn tensor_map(address: u64, element: DType, width: usize, d: &AttentionDims, rows: u32) -> Result<TensorMap> {
    let (dims, strides, boxes) = map_shape(element, width, d, rows);
    let data_type = match element {
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        DType::U32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
    };
    let element_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length (strides one less), the address is a live allocation that `ptr`
    // checked, and the function writes the whole map before returning success.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            3,
            address as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(driver("cuTensorMapEncodeTiled (the warp-specialised attention kernels)"))?;
        Ok(TensorMap(map.assume_init()))
    }
}

/// The N 32-bit words of the launch table `name` in a CUBIN, if it defines one; none may be zero.
fn launch_words<const N: usize>(cubin: &[u8], name: &str) -> Result<Option<[u32; N]>> {
    let Some(bytes) = compile::symbol_data(cubin, name)
        .map_err(|e| Error::backend("cuda", format!("reading {name} from a kernel module: {e}")))?
    else {
        return Ok(None);
    };
    let words: Vec<u32> = bytes.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))).collect();
    match <[u32; N]>::try_from(words) {
        Ok(table) if !table.contains(&0) => Ok(Some(table)),
        Ok(table) => Err(Error::backend("cuda", format!("{name} holds a zero: {table:?}"))),
        Err(w) => Err(Error::backend("cuda", format!("{name} holds {} words, not {N}", w.len()))),
    }
}

pub struct CudaBackend {
    name: String,
    precision: Precision,
    /// The attention kernels this engine runs.
    attention: AttentionKernel,
    /// Whether every result must be reproducible bit for bit; otherwise the fused attention's backward adds dQ
    /// with atomics.
    deterministic: bool,
    /// The fused attention kernels' launch shapes, per head dimension (none in fp32).
    flash: Vec<FlashTiles>,
    stream: Arc<CudaStream>,
    lt: CublasLt,
    functions: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    buffers: Vec<Buffer>,
    /// `REDUCE_BLOCKS` partial sums, then the total.
    reduce: Tensor,
    /// See [`CudaBackend::scratch`].
    scratch: Tensor,
    bytes: usize,
    /// The marks of [`Backend::time_from_here`] and [`Backend::time_to_here`], and whether both are recorded.
    marks: (CudaEvent, CudaEvent),
    marked: bool,
    /// See [`Backend::peak_tflops`].
    peak_tflops: Option<f64>,
    /// Whether a capture is in progress ([`Backend::begin_capture`]), and the graphs captured, by [`Graph`] number.
    capturing: bool,
    graphs: Vec<CudaGraph>,
    /// Working memory that [`CudaBackend::scratch`] outgrew after graphs were captured, which they may still use.
    retired: Vec<Buffer>,
    /// The most shared memory a block may ask for on this GPU, and what layernorm_backward may ask for so far: a
    /// launch gets 48 KiB unless its kernel was allowed more, which a norm over more than about 4000 channels needs.
    shared_optin_bytes: usize,
    norm_backward_shared_bytes: usize,
    /// The host's copies of mixture-of-experts dispatches' offsets, by tensor ([`CudaBackend::keep_offsets`]).
    dispatches: Vec<(Tensor, Vec<u32>)>,
    /// How the grouped expert products launch, where they run ([`ExpertProducts::Grouped`] in bf16), and whether
    /// a product they could not take has said so.
    grouped_experts: Option<GroupedExperts>,
    warned_per_expert: bool,
}

/// The shared memory a block gets without asking for more.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

impl Drop for CudaBackend {
    /// Work still queued may use the allocations about to be freed, and after a capture they are freed on another
    /// stream than the one the work is on.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        // Before the modules and the cuBLASLt handle whose kernels they hold (fields drop in declaration order).
        self.graphs.clear();
    }
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::backend("cuda", format!("{what}: {e:?}"))
}

/// Launches kernel `$name` of `$backend` with `$cfg`, passing each argument (a local value: a device address or a
/// scalar) by reference, as CUDA's launch API takes them.
macro_rules! launch {
    ($backend:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = $backend.function($name)?;
        let mut builder = $backend.stream.launch_builder(f);
        $( builder.arg(&$arg); )*
        // SAFETY: every pointer argument was checked by `ptr` against its allocation, length and type.
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err(driver($name))
    }};
}

fn grid(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of an elementwise kernel over `n` elements. Those kernels take 16-byte chunks (`Packed` in
/// kernels/common.cuh) in grid-stride loops, so any grid covers the data: one thread per 8 elements gives each
/// thread one chunk of bf16, or two of fp32.
fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(8), 256)
}

/// A launch of a kernel that gives each of `n` rows a warp, in blocks of 8 warps (grid-stride loops over the rows).
fn warps(n: usize) -> LaunchConfig {
    grid(n * 32, 256)
}

/// The block of moe_place (MOE_PLACE_THREADS in kernels/experts.cu); its grid is a block per expert.
const MOE_PLACE_THREADS: u32 = 256;

impl CudaBackend {
    /// Opens GPU `ordinal`, compiles (or loads from the cache) every kernel for it, and starts cuBLASLt.
    /// `attention` chooses the attention kernels (fp32 always runs the unfused ones); without `deterministic` the
    /// fused attention's backward sums dQ with atomic adds (faster; the last bits of dQ vary from run to run).
    pub fn new(ordinal: usize, precision: Precision, attention: AttentionKernel, deterministic: bool) -> Result<Self> {
        let wgmma = FlashWgmma::from_env()?;
        let expert_products = ExpertProducts::from_env()?;
        for lib in [Library::Driver, Library::Nvrtc, Library::CublasLt] {
            lib.require()?;
        }
        let gpus = devices::list()?;
        let gpu = gpus.get(ordinal).ok_or_else(|| Error::Usage(format!("no GPU {ordinal}: {} found", gpus.len())))?;
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        // One stream, raw device pointers: cudarc's per-allocation event tracking has nothing to order.
        // SAFETY: called before any allocation or launch on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let compiler = Compiler::new()?;
        let arch = gpu.arch();
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        let mut flash = Vec::new();
        let mut grouped_experts = None;
        for kernel in KERNELS.iter().filter(|k| k.precisions.contains(&precision)) {
            let built = compiler.compile(kernel, &arch, precision)?;
            if kernel.name == "flash_attention" {
                flash = FlashTiles::read(&built.cubin, wgmma)?;
            }
            if kernel.name == "expert_products" && expert_products == ExpertProducts::Grouped {
                grouped_experts = Some(GroupedExperts::read(&built.cubin)?);
            }
            let module = ctx.load_module(Ptx::from_binary(built.cubin)).map_err(driver("loading a kernel module"))?;
            for name in &built.entry_points {
                let f = module.load_function(name).map_err(driver("loading a kernel"))?;
                functions.insert(name.clone(), f);
            }
            modules.push(module);
        }
        if expert_products == ExpertProducts::Grouped && grouped_experts.is_none() {
            tracing::warn!(
                "{}=grouped: the grouped products are bf16 kernels; this {} engine runs the experts' products per \
                 expert",
                ExpertProducts::VARIABLE,
                precision.name()
            );
        }
        // The fused kernels' tiles take more than the 48 KiB of shared memory a launch gets unless it asks.
        for tiles in &flash {
            for (name, bytes) in tiles.kernels.iter().zip(tiles.shared_bytes) {
                let f = functions.get(*name).ok_or_else(|| Error::backend("cuda", format!("no kernel {name}")))?;
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                    .map_err(driver("allowing a kernel more shared memory"))?;
            }
        }
        let name = format!("cuda:{ordinal} ({}, {})", gpu.name, precision.name());
        let lt = CublasLt::new(&stream).map_err(|e| Error::backend(name.clone(), e))?;
        let timed = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("creating an event"));
        let marks = (timed()?, timed()?);
        let mut backend = CudaBackend {
            name,
            precision,
            attention: if precision == Precision::Fp32 { AttentionKernel::Unfused } else { attention },
            deterministic,
            flash,
            stream,
            lt,
            functions,
            _modules: modules,
            buffers: Vec::new(),
            reduce: Tensor { buffer: BufferId(0), offset: 0, len: 0 },
            scratch: Tensor { buffer: BufferId(0), offset: 0, len: 0 },
            bytes: matmul::WORKSPACE_BYTES,
            marks,
            marked: false,
            // fp32 runs compute on CUDA cores, whose peak kiln does not tabulate.
            peak_tflops: if precision == Precision::Bf16 { gpu.bf16_peak_tflops() } else { None },
            capturing: false,
            graphs: Vec::new(),
            retired: Vec::new(),
            shared_optin_bytes: ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .map_err(driver("reading the shared memory a block may have"))?
                as usize,
            norm_backward_shared_bytes: DEFAULT_SHARED_BYTES,
            dispatches: Vec::new(),
            grouped_experts,
            warned_per_expert: false,
        };
        backend.reduce = backend.alloc(REDUCE_BLOCKS as usize + 1, Role::Stat)?;
        backend.scratch = backend.alloc(1, Role::Stat)?;
        Ok(backend)
    }

    fn x(&self) -> DType {
        match self.precision {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        }
    }

    fn dtype_of(&self, role: Role) -> DType {
        memory::dtype(self.precision, role)
    }

    fn err(&self, op: &str, message: String) -> Error {
        Error::backend(self.name.clone(), format!("{op}: {message}"))
    }

    /// The device address of `t`, after checking it holds `len` elements of `dtype`.
    fn ptr(&self, op: &str, t: Tensor, dtype: DType, len: usize) -> Result<u64> {
        let b = self.buffers.get(t.buffer.0 as usize).ok_or_else(|| self.err(op, format!("{t:?} is not a tensor")))?;
        if t.offset + t.len > b.len {
            return Err(self.err(op, format!("{t:?} lies outside its allocation of {}", b.len)));
        }
        if b.dtype != dtype {
            return Err(self.err(op, format!("{t:?} holds {:?}, expected {dtype:?}", b.dtype)));
        }
        if t.len != len {
            return Err(self.err(op, format!("{t:?} has {} elements, expected {len}", t.len)));
        }
        Ok(b.ptr + (t.offset * dtype.size()) as u64)
    }

    fn disjoint(&self, op: &str, outputs: &[Tensor], inputs: &[Tensor]) -> Result<()> {
        self.report_overlap(op, first_overlap(outputs.iter(), inputs.iter()))
    }

    /// As [`Self::disjoint`], skipping absent optional operands (without allocating: this is on the hot path).
    fn disjoint_optional(&self, op: &str, outputs: &[Option<Tensor>], inputs: &[Option<Tensor>]) -> Result<()> {
        self.report_overlap(op, first_overlap(outputs.iter().flatten(), inputs.iter().flatten()))
    }

    fn report_overlap(&self, op: &str, overlap: Option<(Tensor, Tensor)>) -> Result<()> {
        match overlap {
            Some((out, other)) => Err(self.err(op, format!("output {out:?} overlaps operand {other:?}"))),
            None => Ok(()),
        }
    }

    /// `out = gelu(pre)` over `n` elements by kernels/gelu.cu, the pointers checked by the caller.
    fn launch_gelu_forward(&self, out: u64, pre: u64, n: usize) -> Result<()> {
        let len = n as i64;
        launch!(self, "gelu_forward", elementwise(n), out, pre, len)
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| self.err(name, "kernel not loaded".into()))
    }

    /// Queues a copy to the device without waiting for it: `values` is ordinary (pageable) host memory, which the
    /// driver stages before the call returns, so the caller may reuse or drop it at once. The token uploads of
    /// every micro-batch go through here, and a wait per upload would stall the step for nothing.
    fn copy_to_device<T: cudarc::driver::DeviceRepr>(&self, dst: u64, values: &[T]) -> Result<()> {
        self.not_capturing("copy to the GPU")?;
        // SAFETY: `dst` addresses at least `size_of_val(values)` bytes of one allocation (checked by the caller).
        unsafe { result::memcpy_htod_async(dst, values, self.stream.cu_stream()) }.map_err(driver("copy to the GPU"))
    }

    /// A new zero-filled device allocation of `bytes` (at least one), counted in [`Backend::allocated_bytes`].
    fn alloc_bytes(&mut self, bytes: usize) -> Result<(CudaSlice<u8>, u64)> {
        self.not_capturing("alloc")?;
        let bytes = bytes.max(1);
        let mem = self.stream.alloc_zeros::<u8>(bytes).map_err(|e| {
            let message = format!(
                "cannot allocate {:.1} MiB ({:.1} MiB already allocated): {e:?}",
                bytes as f64 / 1048576.0,
                self.bytes as f64 / 1048576.0
            );
            match e.0 {
                CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
                    backend: self.name.clone(),
                    message: format!("alloc: {message}; a smaller train.micro_batch (or \"auto\") would need less"),
                },
                _ => self.err("alloc", message),
            }
        })?;
        self.bytes += bytes;
        let ptr = mem.device_ptr(&self.stream).0;
        Ok((mem, ptr))
    }

    /// Copies `dst.len()` values from `src` into `dst` (of the device's layout: fp32 values land as `f32`) and waits.
    fn copy_to_host<T: cudarc::driver::DeviceRepr>(&self, src: u64, dst: &mut [T]) -> Result<()> {
        self.not_capturing("copy from the GPU")?;
        // SAFETY: `src` addresses at least `size_of_val(dst)` bytes of one allocation (checked by the caller).
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(driver("copy from the GPU"))?;
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    /// Queues one cuBLASLt product.
    ///
    /// Alignment: cuBLASLt's fast kernels want 16-byte-aligned operands, and tensors are views at element
    /// offsets. The model's views start at sums of multiples of n_embd and head_dim elements (activations at
    /// multiples of rows·n_embd or rows·head_dim, every parameter and gradient after tensors whose sizes are such
    /// multiples), and each allocation at 256 bytes, so with n_embd and head_dim multiples of 8 every operand is
    /// 16-byte aligned in both precisions. Nothing depends on it: each product's alignments are measured and given
    /// to cuBLASLt's heuristic, which picks a slower kernel for less aligned operands.
    fn matmul(&mut self, op: &str, product: Product) -> Result<()> {
        // SAFETY: every address in `product` was checked by `ptr` against a tensor of its role's size and type.
        unsafe { self.lt.run(&product, &self.stream) }.map_err(|e| self.err(op, e))
    }

    /// Refuses work of the host's while capturing: it would happen once, at capture, and not at each replay (CUDA
    /// would fail the capture without saying which operation it was).
    fn not_capturing(&self, op: &str) -> Result<()> {
        match self.capturing {
            true => Err(self.err(op, "cannot be captured into a graph (it waits for or copies to the host)".into())),
            false => Ok(()),
        }
    }

    /// Ends the capture in progress, the stream running work again whatever else fails, and instantiates its graph
    /// (none when it recorded nothing).
    fn finish_capture(&mut self, op: &str) -> Result<Option<CudaGraph>> {
        if !self.capturing {
            return Err(self.err(op, "no capture in progress".into()));
        }
        self.capturing = false;
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        // cudarc may fail before it ends the capture (an error left by an earlier call surfaces first): end it here
        // then, so that the stream is not left capturing what comes next.
        let stream = self.stream.cu_stream();
        // SAFETY: the stream is this engine's and alive; a graph ended here is destroyed at once and not used.
        unsafe {
            if ended.is_err()
                && result::stream::is_capturing(stream)
                    .is_ok_and(|s| s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
                && let Ok(graph) = result::stream::end_capture(stream)
                && !graph.is_null()
            {
                let _ = result::graph::destroy(graph);
            }
        }
        ended.map_err(driver(op))
    }

    /// Sum of `t` (fp32 or bf16) or of its squares, deterministic, returned to the host.
    fn sum_to_host(&mut self, op: &str, t: Tensor, squares: bool) -> Result<f32> {
        let total = self.reduce.slice(REDUCE_BLOCKS as usize, 1);
        self.reduce(op, t, squares, total)?;
        let mut sum = [0.0f32];
        self.copy_to_host(self.ptr(op, total, DType::F32, 1)?, &mut sum)?;
        Ok(sum[0])
    }

    /// Queues the sum of `t` (fp32 or bf16) or of its squares into `out` (one fp32 element), deterministic.
    fn reduce(&mut self, op: &str, t: Tensor, squares: bool, out: Tensor) -> Result<()> {
        let dtype =
            self.buffers.get(t.buffer.0 as usize).map(|b| b.dtype).ok_or_else(|| self.err(op, format!("{t:?}")))?;
        let kernel = match dtype {
            DType::F32 => "reduce_partials",
            DType::Bf16 => "reduce_partials_x",
            DType::U32 => return Err(self.err(op, "token tensors hold no reals".into())),
        };
        let x = self.ptr(op, t, dtype, t.len)?;
        let partials =
            self.ptr(op, self.reduce.slice(0, REDUCE_BLOCKS as usize), DType::F32, REDUCE_BLOCKS as usize)?;
        let total = self.ptr(op, out, DType::F32, 1)?;
        let (n, squares) = (t.len as i64, i32::from(squares));
        let cfg = LaunchConfig { grid_dim: (REDUCE_BLOCKS, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        launch!(self, kernel, cfg, partials, x, n, squares)?;
        let count = REDUCE_BLOCKS as i32;
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "reduce_final", one, total, partials, count)
    }

    /// fp32 working memory of at least `len` elements, grown when a call needs more (so only the first step of a
    /// run allocates).
    fn scratch(&mut self, op: &str, len: usize) -> Result<u64> {
        if self.scratch.len < len {
            // A bigger allocation under the same handle. Work already queued may still use the old one, so it is
            // freed only after that has finished (this happens in a run's first step only).
            let (mem, ptr) = self.alloc_bytes(len * 4)?;
            self.synchronize()?;
            let old = std::mem::replace(
                &mut self.buffers[self.scratch.buffer.0 as usize],
                Buffer { _mem: mem, ptr, len, dtype: DType::F32, master: None },
            );
            self.scratch.len = len;
            match self.graphs.is_empty() {
                true => self.bytes -= old.len * 4,
                false => self.retired.push(old),
            }
        }
        self.ptr(op, self.scratch.slice(0, len), DType::F32, len)
    }

    /// Token ids; the model checks them against the vocabulary on the host before they are uploaded.
    fn ids(&self, op: &str, t: Tensor, len: usize) -> Result<u64> {
        self.ptr(op, t, DType::U32, len)
    }

    /// Whether attention of shape `d` can run at all: what the unfused kernels, which take every other shape, need.
    fn check_attention(&self, op: &str, d: &AttentionDims) -> Result<()> {
        if let Some(problem) = d.problem() {
            return Err(self.err(op, problem));
        }
        if d.head_dim == 0 || d.head_dim > MAX_HEAD_DIM {
            return Err(self.err(op, format!("head_dim {} is not in 1..={MAX_HEAD_DIM}", d.head_dim)));
        }
        Ok(())
    }

    /// Whether routing of shape `d` can run: the route kernel carries expert numbers in floats, exact below 2²⁴.
    fn check_moe(&self, op: &str, d: MoeDims) -> Result<()> {
        match d.problem() {
            Some(problem) => Err(self.err(op, problem)),
            None if d.experts >= 1 << 24 => Err(self.err(op, format!("{} experts: at most 2²⁴ − 1", d.experts))),
            None => Ok(()),
        }
    }

    /// [`Self::check_moe`], for an operation on rows of `width` elements.
    fn check_moe_rows(&self, op: &str, d: MoeDims, width: usize) -> Result<()> {
        match d.problem_with_rows(width) {
            Some(problem) => Err(self.err(op, problem)),
            None => self.check_moe(op, d),
        }
    }

    /// Reads the dispatch's `offsets` (where each expert's run of the `rows` dispatched rows starts, and where the
    /// last ends) back to the host and keeps them there for the expert products that follow, which cuBLASLt sizes
    /// on the host. moe_route calls it (unless the products run grouped), so that a layer's routing costs one copy
    /// and wait (and cannot be captured into a graph) and its products, forward and backward, none. Returns the
    /// copy's place in `self.dispatches`, where each offsets tensor keeps one vector, reused.
    fn keep_offsets(&mut self, op: &str, offsets: Tensor, rows: usize) -> Result<usize> {
        self.not_capturing(op)?;
        let ptr = self.ptr(op, offsets, DType::U32, offsets.len)?;
        let mut bounds = match self.dispatches.iter().position(|(t, _)| *t == offsets) {
            Some(i) => self.dispatches.swap_remove(i).1,
            None => Vec::new(),
        };
        bounds.resize(offsets.len, 0);
        self.copy_to_host(ptr, &mut bounds)?;
        if bounds.first() != Some(&0) || bounds.windows(2).any(|w| w[0] > w[1]) || bounds.last() != Some(&(rows as u32))
        {
            return Err(self.err(op, "offsets is not a dispatch that moe_route wrote".into()));
        }
        self.dispatches.push((offsets, bounds));
        Ok(self.dispatches.len() - 1)
    }

    /// The place in `self.dispatches` of the host's copy of `offsets` (`experts + 1` values over `rows` rows): kept
    /// by the routing that wrote it, or (offsets written otherwise, as by an upload) read now.
    fn host_offsets(&mut self, op: &str, offsets: Tensor, experts: usize, rows: usize) -> Result<usize> {
        self.ptr(op, offsets, DType::U32, experts + 1)?;
        match self.dispatches.iter().position(|(t, b)| *t == offsets && b.last() == Some(&(rows as u32))) {
            Some(i) => Ok(i),
            None => self.keep_offsets(op, offsets, rows),
        }
    }

    /// Calls `product(self, expert, first row, rows)` for each expert whose run of the `rows` dispatched rows in
    /// `offsets` is not empty: an expert product's sizes are the host's, so it cannot be captured into a graph.
    fn for_each_expert_run(
        &mut self,
        op: &str,
        offsets: Tensor,
        experts: usize,
        rows: usize,
        mut product: impl FnMut(&mut Self, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        self.not_capturing(op)?;
        let kept = self.host_offsets(op, offsets, experts, rows)?;
        // Taken out for the loop, whose products need the engine, and put back after, so that no step allocates.
        let bounds = std::mem::take(&mut self.dispatches[kept].1);
        let runs = bounds.windows(2).map(|w| (w[0] as usize, (w[1] - w[0]) as usize)).enumerate();
        let result = runs.filter(|&(_, (_, n))| n > 0).try_for_each(|(e, (first, n))| product(self, e, first, n));
        self.dispatches[kept].1 = bounds;
        result
    }

    /// The grouped products' launch, if they run and can take a product of `d` for `experts` over operands at
    /// `addresses`: something to compute, widths of whole 16-byte chunks, aligned operands and column tiles within a
    /// grid's 65,535. The first product that cannot says why, once: it runs per expert, and so cannot be captured
    /// into a graph.
    fn grouped_experts_for(&mut self, d: MatmulDims, experts: usize, addresses: &[u64]) -> Option<GroupedExperts> {
        let grouped = self.grouped_experts?;
        if experts == 0 || d.c_in == 0 || d.c_out == 0 {
            return None;
        }
        let tiles_fit = d.c_in.max(d.c_out).div_ceil(grouped.tile_cols as usize) <= 65_535;
        let chunked = d.c_in % 8 == 0 && d.c_out % 8 == 0 && addresses.iter().all(|a| a % 16 == 0);
        let takes = tiles_fit && chunked;
        if !takes && !self.warned_per_expert {
            self.warned_per_expert = true;
            tracing::warn!(
                "{}=grouped: the experts' products of {} to {} columns run per expert (the grouped kernels take \
                 widths that are multiples of 8, up to {} columns, and 16-byte aligned operands), reading the routing \
                 back to the host: such a step cannot be captured into a graph",
                ExpertProducts::VARIABLE,
                d.c_in,
                d.c_out,
                65_535 * grouped.tile_cols as usize
            );
        }
        takes.then_some(grouped)
    }

    /// Drops the host's copies of offsets that a write to `t` may change.
    fn forget_offsets(&mut self, t: Tensor) {
        self.dispatches.retain(|(offsets, _)| !offsets.overlaps(&t));
    }

    /// The kernels that run the fused attention at `head_dim` (bf16, model.attention = "fused"), if any: the
    /// forward, dq, dkv and dkv-with-atomic-dQ kernels, which a benchmark reports beside its numbers.
    pub fn fused_kernels(&self, head_dim: usize) -> Option<[&'static str; 4]> {
        let tiles = self.flash.iter().find(|t| t.head_dim == head_dim)?;
        (self.attention == AttentionKernel::Fused).then_some(tiles.kernels)
    }

    /// The fused kernels' tiles for attention of shape `d` over the operands at `addresses`, when the fused kernels
    /// run it: in bf16 with model.attention = "fused" (new() sets unfused for fp32), for a head dimension they are
    /// built for, with every operand 16-byte aligned (they move rows in 16-byte chunks; with head_dim a multiple of
    /// 8 every row is then aligned too), and batch and heads within a grid's y and z extents (and not empty: a
    /// grid cannot be). Every other shape runs on the unfused kernels (the self-test's head dimension 16, for one),
    /// which are slower but take them all.
    fn flash_tiles(&self, d: &AttentionDims, addresses: &[u64]) -> Option<FlashTiles> {
        let empty = d.batch * d.heads * d.time == 0;
        if self.attention != AttentionKernel::Fused || empty || d.batch > 65_535 || d.heads > 65_535 {
            return None;
        }
        let tiles = self.flash.iter().find(|t| t.head_dim == d.head_dim)?;
        addresses.iter().all(|a| a % 16 == 0).then_some(*tiles)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc(&mut self, len: usize, role: Role) -> Result<Tensor> {
        let dtype = self.dtype_of(role);
        let (mem, ptr) = self.alloc_bytes(len * dtype.size())?;
        let master = if role == Role::Param && dtype == DType::Bf16 {
            let (_mem, ptr) = self.alloc_bytes(len * 4)?;
            Some(Master { _mem, ptr, pieces: Pieces::whole(len) })
        } else {
            None
        };
        let id = BufferId(self.buffers.len() as u32);
        self.buffers.push(Buffer { _mem: mem, ptr, len, dtype, master });
        Ok(Tensor { buffer: id, offset: 0, len })
    }

    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        let b = self.buffers.get(dst.buffer.0 as usize).ok_or_else(|| self.err("upload", format!("{dst:?}")))?;
        let dtype = b.dtype;
        let ptr = self.ptr("upload", dst, dtype, src.len())?;
        match dtype {
            DType::F32 => self.copy_to_device(ptr, src)?,
            DType::Bf16 => {
                let bytes: Vec<u8> = src.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
                self.copy_to_device(ptr, &bytes)?;
            }
            DType::U32 => return Err(self.err("upload", "token tensors take upload_indices".into())),
        }
        if let Some(master) = &self.buffers[dst.buffer.0 as usize].master {
            for (element, packed, n) in master.pieces.parts(dst.offset..dst.offset + dst.len) {
                let from = element - dst.offset;
                self.copy_to_device(master.ptr + (packed * 4) as u64, &src[from..from + n])?;
            }
        }
        Ok(())
    }

    fn download(&mut self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        let dtype = self
            .buffers
            .get(src.buffer.0 as usize)
            .map(|b| b.dtype)
            .ok_or_else(|| self.err("download", format!("{src:?}")))?;
        let ptr = self.ptr("download", src, dtype, dst.len())?;
        // Parameters are read from their master copy where there is one: a checkpoint must hold the fp32 weights,
        // not their bf16 rounding, for a resumed run to continue exactly.
        let master_parts: Vec<(u64, usize, usize)> = match &self.buffers[src.buffer.0 as usize].master {
            Some(master) => master
                .pieces
                .parts(src.offset..src.offset + src.len)
                .map(|(element, packed, n)| (master.ptr + (packed * 4) as u64, element - src.offset, n))
                .collect(),
            None => Vec::new(),
        };
        // fp32 lands where it goes (the step's sums are read this way, with nothing allocated); bf16 through a copy.
        if master_parts.iter().map(|&(_, _, n)| n).sum::<usize>() < dst.len() {
            match dtype {
                DType::F32 => self.copy_to_host(ptr, dst)?,
                DType::Bf16 => {
                    let mut bits = vec![half::bf16::ZERO; dst.len()];
                    self.copy_to_host(ptr, &mut bits)?;
                    dst.iter_mut().zip(&bits).for_each(|(d, b)| *d = b.to_f32());
                }
                DType::U32 => return Err(self.err("download", "token tensors hold no reals".into())),
            }
        }
        for (address, from, n) in master_parts {
            self.copy_to_host(address, &mut dst[from..from + n])?;
        }
        Ok(())
    }

    fn keep_master_pieces(&mut self, params: Tensor, pieces: &[Range<usize>]) -> Result<()> {
        let op = "keep_master_pieces";
        let b = self.buffers.get(params.buffer.0 as usize).ok_or_else(|| self.err(op, format!("{params:?}")))?;
        let Some(old) = &b.master else { return Ok(()) };
        if params.offset + params.len > b.len {
            return Err(self.err(op, format!("{params:?} lies outside its allocation of {}", b.len)));
        }
        let kept = Pieces::of_tensor(params, pieces, b.len).map_err(|e| self.err(op, e))?;
        // Where each kept piece's values are now: inside one piece of the copy held so far.
        let moves: Option<Vec<(u64, usize, usize)>> = kept
            .parts(0..b.len)
            .map(|(element, packed, n)| {
                let from = old.pieces.packed_index(element..element + n)?;
                Some((old.ptr + (from * 4) as u64, packed, n))
            })
            .collect();
        let moves = moves.ok_or_else(|| self.err(op, "a piece reaches outside the master copy held so far".into()))?;
        // The kept values wait on the host while the old copy is freed and the new one allocated: both on the GPU
        // at once would pass the run's peak memory by up to the whole master (3 bytes a weight at 8 ranks).
        let mut kept_values = Vec::with_capacity(moves.len());
        for (from, packed, n) in moves {
            let mut bytes = vec![0u8; n * 4];
            self.copy_to_host(from, &mut bytes)?;
            kept_values.push((packed, bytes));
        }
        let old_bytes = (old.pieces.packed_len() * 4).max(1);
        self.buffers[params.buffer.0 as usize].master = None;
        self.bytes -= old_bytes;
        let (mem, ptr) = self.alloc_bytes(kept.packed_len() * 4)?;
        for (packed, bytes) in &kept_values {
            self.copy_to_device(ptr + (packed * 4) as u64, bytes)?;
        }
        self.buffers[params.buffer.0 as usize].master = Some(Master { _mem: mem, ptr, pieces: kept });
        Ok(())
    }

    fn upload_indices(&mut self, dst: Tensor, src: &[u32]) -> Result<()> {
        self.forget_offsets(dst);
        let ptr = self.ptr("upload_indices", dst, DType::U32, src.len())?;
        self.copy_to_device(ptr, src)
    }

    fn zero(&mut self, t: Tensor) -> Result<()> {
        self.forget_offsets(t);
        let b = self.buffers.get(t.buffer.0 as usize).ok_or_else(|| self.err("zero", format!("{t:?}")))?;
        let ptr = self.ptr("zero", t, b.dtype, t.len)?;
        // SAFETY: the range was checked by `ptr`.
        unsafe { result::memset_d8_async(ptr, 0, t.len * b.dtype.size(), self.stream.cu_stream()) }
            .map_err(driver("memset"))
    }

    fn sum(&mut self, t: Tensor) -> Result<f32> {
        self.sum_to_host("sum", t, false)
    }

    fn sum_squares(&mut self, t: Tensor) -> Result<f32> {
        self.sum_to_host("sum_squares", t, true)
    }

    fn sum_into(&mut self, t: Tensor, squares: bool, out: Tensor) -> Result<()> {
        self.disjoint("sum_into", &[out], &[t, self.reduce])?;
        self.reduce("sum_into", t, squares, out)
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    fn begin_capture(&mut self) -> Result<bool> {
        self.not_capturing("begin_capture")?;
        if self.stream.cu_stream().is_null() {
            // The legacy default stream cannot be captured: the engine moves to a stream of its own, once the work
            // queued on the old one has run. (Until then it stays where it always was, so that engines that never
            // capture are as they were.)
            self.synchronize()?;
            self.stream = self.stream.context().new_stream().map_err(driver("creating a stream"))?;
        }
        // Thread-local: in a process driving several GPUs, one thread's capture does not forbid another thread's
        // work.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver("starting a capture"))?;
        self.capturing = true;
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<Graph> {
        let graph = self
            .finish_capture("end_capture")?
            .ok_or_else(|| self.err("end_capture", "the capture recorded nothing".into()))?;
        // Its first launch would otherwise set it up on the device.
        graph.upload().map_err(driver("uploading a graph"))?;
        self.graphs.push(graph);
        Ok(Graph(self.graphs.len() as u32 - 1))
    }

    fn abandon_capture(&mut self) -> Result<()> {
        self.finish_capture("abandon_capture").map(drop)
    }

    fn captures_routing(&self) -> bool {
        self.grouped_experts.is_some()
    }

    fn capturing(&self) -> bool {
        self.capturing
    }

    fn replay(&mut self, graph: Graph) -> Result<()> {
        self.not_capturing("replay")?;
        let g = self.graphs.get(graph.0 as usize).ok_or_else(|| self.err("replay", format!("no graph {graph:?}")))?;
        g.launch().map_err(driver("launching a graph"))?;
        // A graph may route again (grouped expert products), rewriting offsets that the host keeps copies of.
        self.dispatches.clear();
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.bytes as u64
    }

    fn memory_model(&self) -> Box<dyn kiln_core::memory::MemoryModel> {
        Box::new(CudaMemory { precision: self.precision, attention: self.attention, deterministic: self.deterministic })
    }

    fn free_bytes(&self) -> Option<u64> {
        self.stream.context().mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn time_from_here(&mut self) -> Result<()> {
        // A mark inside a graph would time nothing the host can read.
        self.not_capturing("time_from_here")?;
        self.marked = false;
        self.marks.0.record(&self.stream).map_err(driver("recording an event"))
    }

    fn time_to_here(&mut self) -> Result<()> {
        self.not_capturing("time_to_here")?;
        self.marks.1.record(&self.stream).map_err(driver("recording an event"))?;
        self.marked = true;
        Ok(())
    }

    fn timed_ms(&mut self) -> Result<Option<f64>> {
        if !self.marked {
            return Err(Error::Invalid("timed_ms without time_from_here and time_to_here before it".into()));
        }
        self.marks.1.synchronize().map_err(driver("waiting for an event"))?;
        let ms = self.marks.0.elapsed_ms(&self.marks.1).map_err(driver("timing between events"))?;
        Ok(Some(f64::from(ms)))
    }

    fn peak_tflops(&self) -> Option<f64> {
        self.peak_tflops
    }

    fn encoder_forward(
        &mut self,
        out: Tensor,
        tokens: Tensor,
        wte: Tensor,
        wpe: Option<Tensor>,
        batch: usize,
        time: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_forward";
        let x = self.x();
        self.disjoint_optional(op, &[Some(out)], &[Some(wte), wpe])?;
        let (o, w) = (self.ptr(op, out, x, batch * time * c)?, self.ptr(op, wte, x, wte.len)?);
        // No position table is a null pointer, which the kernel skips.
        let p = wpe.map(|p| self.ptr(op, p, x, p.len)).transpose()?.unwrap_or(0);
        if let Some(wpe) = wpe.filter(|p| p.len < time * c) {
            return Err(self.err(op, format!("{time} positions but only {} learned", wpe.len / c.max(1))));
        }
        let tok = self.ids(op, tokens, batch * time)?;
        let (b, t, c) = (batch as i32, time as i32, c as i32);
        launch!(self, op, elementwise(batch * time * c as usize), o, tok, w, p, b, t, c)
    }

    fn encoder_backward(
        &mut self,
        dwte: Tensor,
        dwpe: Option<Tensor>,
        dout: Tensor,
        tokens: Tensor,
        batch: usize,
        time: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_backward";
        self.disjoint_optional(op, &[Some(dwte), dwpe], &[Some(dout)])?;
        let dw = self.ptr(op, dwte, DType::F32, dwte.len)?;
        let dp = dwpe.map(|p| self.ptr(op, p, DType::F32, p.len)).transpose()?;
        let d = self.ptr(op, dout, self.x(), batch * time * c)?;
        let tok = self.ids(op, tokens, batch * time)?;
        let (bi, ti, ci) = (batch as i32, time as i32, c as i32);
        if let Some(dp) = dp {
            launch!(self, "encoder_backward_wpe", elementwise(time * c), dp, d, bi, ti, ci)?;
        }
        let n = batch * time;
        if n == 0 || c == 0 {
            return Ok(());
        }
        // The positions sorted by token (see kernels/encoder.cu): two (keys, rows) pairs of arrays in scratch.
        let vocab = dwte.len / c;
        let passes = (u32::BITS - (vocab.max(2) as u32 - 1).leading_zeros()).div_ceil(SORT_BITS) as i32;
        let sorted = self.scratch(op, memory::encoder_backward_floats(n))?;
        let [keys, rows, spare_keys, spare_rows] = [0, 1, 2, 3].map(|i| sorted + (i * n * 4) as u64);
        let sort = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SORT_THREADS, 1, 1), shared_mem_bytes: 0 };
        let ni = n as i32;
        launch!(self, "encoder_sort_rows", sort, keys, rows, spare_keys, spare_rows, tok, ni, passes)?;
        launch!(self, "encoder_backward_wte", grid(n * c.div_ceil(4), 256), dw, d, keys, rows, ni, ci)
    }

    fn norm_forward(&mut self, op: NormForward) -> Result<()> {
        let name = match (op.d.kind, op.residual.is_some()) {
            (NormKind::Layer, false) => "layernorm_forward",
            (NormKind::Layer, true) => "residual_layernorm_forward",
            (NormKind::Rms, false) => "rmsnorm_forward",
            (NormKind::Rms, true) => "residual_rmsnorm_forward",
        };
        let NormForward { out, mean, rstd, inp, residual, weight, bias, d } = op;
        if let Some(problem) = d.operand_problem(mean, bias) {
            return Err(self.err(name, problem));
        }
        let x = self.x();
        let (rows, c) = (d.rows, d.c);
        let (sum, other) = (residual.map(|r| r.sum), residual.map(|r| r.other));
        self.disjoint_optional(name, &[Some(out), mean, Some(rstd), sum], &[Some(inp), other, Some(weight), bias])?;
        let (o, r) = (self.ptr(name, out, x, rows * c)?, self.ptr(name, rstd, DType::F32, rows)?);
        let (i, w) = (self.ptr(name, inp, x, rows * c)?, self.ptr(name, weight, x, c)?);
        let (n, ci, eps, cfg) = (rows as i32, c as i32, d.eps, grid(rows * 32, 256));
        // Layer normalisation's statistics and bias (operand_problem allows both or neither), and the residual add's
        // operands, where there are.
        let layer = match (mean, bias) {
            (Some(mean), Some(bias)) => Some((self.ptr(name, mean, DType::F32, rows)?, self.ptr(name, bias, x, c)?)),
            _ => None,
        };
        let add = residual
            .map(|add| Ok((self.ptr(name, add.sum, x, rows * c)?, self.ptr(name, add.other, x, rows * c)?)))
            .transpose()?;
        match (layer, add) {
            (Some((m, b)), None) => launch!(self, name, cfg, o, m, r, i, w, b, n, ci, eps),
            (Some((m, b)), Some((res, a))) => launch!(self, name, cfg, res, o, m, r, i, a, w, b, n, ci, eps),
            (None, None) => launch!(self, name, cfg, o, r, i, w, n, ci, eps),
            (None, Some((res, a))) => launch!(self, name, cfg, res, o, r, i, a, w, n, ci, eps),
        }
    }

    fn norm_backward(&mut self, op: NormBackward) -> Result<()> {
        let name = "norm_backward";
        let NormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sums, d } = op;
        if let Some(problem) = d.operand_problem(mean, dbias) {
            return Err(self.err(name, problem));
        }
        let x = self.x();
        let (rows, c) = (d.rows, d.c);
        self.disjoint_optional(
            name,
            &[Some(dinp), Some(dweight), dbias, dinp_sums],
            &[Some(dout), Some(inp), Some(weight), mean, Some(rstd)],
        )?;
        let (di, dw) = (self.ptr(name, dinp, x, rows * c)?, self.ptr(name, dweight, DType::F32, c)?);
        // RMS normalisation's backward is layer normalisation's with a zero mean and no mean(g) term: the kernel
        // takes a null mean and bias gradient for it.
        let db = dbias.map(|b| self.ptr(name, b, DType::F32, c)).transpose()?.unwrap_or(0);
        let ds = dinp_sums.map(|s| self.ptr(name, s, DType::F32, c)).transpose()?.unwrap_or(0);
        let (g, i, w) =
            (self.ptr(name, dout, x, rows * c)?, self.ptr(name, inp, x, rows * c)?, self.ptr(name, weight, x, c)?);
        let m = mean.map(|m| self.ptr(name, m, DType::F32, rows)).transpose()?.unwrap_or(0);
        let r = self.ptr(name, rstd, DType::F32, rows)?;
        if rows == 0 || c == 0 {
            return Ok(());
        }
        // Each warp keeps 2 × C floats of shared memory (3 × C with the sums of dinp), C rounded up to a whole 16-byte
        // chunk of either precision: as many warps (up to 4) as fit the default 48 KiB, or one warp allowed more.
        let sums = if dinp_sums.is_some() { 3 } else { 2 };
        let warp_bytes = sums * c.max(1).next_multiple_of(8) * 4;
        let warps = (DEFAULT_SHARED_BYTES / warp_bytes).clamp(1, 4);
        if warp_bytes > self.norm_backward_shared_bytes {
            let most = self.shared_optin_bytes;
            if warp_bytes > most {
                let why = format!("{c} channels need {warp_bytes} bytes of shared memory a block, this GPU has {most}");
                return Err(self.err(name, why));
            }
            let f = self.functions.get("layernorm_backward").ok_or_else(|| self.err(name, "no kernel".into()))?;
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, warp_bytes as i32)
                .map_err(driver("allowing layernorm_backward more shared memory"))?;
            self.norm_backward_shared_bytes = warp_bytes;
        }
        let blocks = rows.div_ceil(NORM_ROWS_PER_BLOCK);
        let partials = self.scratch(name, memory::norm_backward_floats(rows, c, dinp_sums.is_some()))?;
        let (n, ci, rpb, nb) = (rows as i32, c as i32, NORM_ROWS_PER_BLOCK as i32, blocks as i32);
        let sum_dinp = i32::from(dinp_sums.is_some());
        let mut cfg = grid(blocks * warps * 32, (warps * 32) as u32);
        cfg.shared_mem_bytes = (warps * warp_bytes) as u32;
        launch!(self, "layernorm_backward", cfg, di, partials, g, i, w, m, r, n, ci, rpb, sum_dinp)?;
        launch!(self, "layernorm_backward_sum", column_sums(sums * c), dw, db, ds, partials, nb, ci)
    }

    fn matmul_forward(&mut self, op: MatmulForward) -> Result<()> {
        let MatmulForward { out, inp, weight, bias, gelu_pre, d } = op;
        let op = "matmul_forward";
        let x = self.x();
        let MatmulDims { rows, c_in, c_out } = d;
        self.disjoint_optional(op, &[Some(out), gelu_pre], &[Some(inp), Some(weight), bias])?;
        let o = self.ptr(op, out, x, rows * c_out)?;
        let (i, w) = (self.ptr(op, inp, x, rows * c_in)?, self.ptr(op, weight, x, c_out * c_in)?);
        let bias = bias.map(|b| self.ptr(op, b, x, c_out)).transpose()?;
        let pre = gelu_pre.map(|p| self.ptr(op, p, x, rows * c_out)).transpose()?;
        // Row-major out (rows × c_out) is column-major (c_out × rows) = Wᵀ·inp, with W column-major
        // (c_in × c_out) and inp column-major (c_in × rows).
        let product = |d, epilogue| Product {
            m: c_out,
            n: rows,
            k: c_in,
            a: Operand { ptr: w, ld: c_in, transposed: true },
            b: Operand { ptr: i, ld: c_in, transposed: false },
            d,
            inputs: x,
            output: x,
            accumulate: false,
            epilogue,
        };
        let plain = bias.map_or(Epilogue::None, |bias| Epilogue::Bias { bias });
        match pre {
            None => self.matmul(op, product(o, plain)),
            Some(pre) if c_out % matmul::GELU_AUX_LD_MULTIPLE == 0 => {
                self.matmul(op, product(o, Epilogue::Gelu { bias, pre }))
            }
            // GELU's input is too narrow to be the epilogue's auxiliary output: the product goes there, and a
            // kernel applies GELU.
            Some(pre) => {
                self.matmul(op, product(pre, plain))?;
                self.launch_gelu_forward(o, pre, rows * c_out)
            }
        }
    }

    fn matmul_backward(&mut self, op: MatmulBackward) -> Result<()> {
        let name = "matmul_backward";
        if let Some(problem) = op.operand_problem() {
            return Err(self.err(name, problem));
        }
        let MatmulBackward { dinp, dweight, dbias, dout, inp, weight, gelu_pre, gelu_dbias, d } = op;
        let op = name;
        let x = self.x();
        let MatmulDims { rows, c_in, c_out } = d;
        self.disjoint_optional(
            op,
            &[Some(dinp), Some(dweight), dbias, gelu_dbias],
            &[Some(dout), Some(inp), Some(weight), gelu_pre],
        )?;
        let (di, dw) = (self.ptr(op, dinp, x, rows * c_in)?, self.ptr(op, dweight, DType::F32, c_out * c_in)?);
        let (g, i, w) = (
            self.ptr(op, dout, x, rows * c_out)?,
            self.ptr(op, inp, x, rows * c_in)?,
            self.ptr(op, weight, x, c_out * c_in)?,
        );
        let pre = gelu_pre.map(|p| self.ptr(op, p, x, rows * c_in)).transpose()?;
        let db = dbias.map(|b| self.ptr(op, b, DType::F32, c_out)).transpose()?;
        let gelu_db = gelu_dbias.map(|b| self.ptr(op, b, DType::F32, c_in)).transpose()?;
        // cuBLASLt's bias-gradient epilogues overwrite their output, and bias gradients accumulate over
        // micro-batches, so an epilogue writes to scratch and a kernel adds that in: the product's bias gradient at
        // the scratch's start, that of GELU's input after it, 256-byte aligned as the scratch is (cuBLASLt's
        // algorithms may need more than a float's alignment of it).
        let own = if db.is_some() { c_out } else { 0 };
        let gelu_offset = own.next_multiple_of(64);
        let columns = if gelu_db.is_some() { gelu_offset + c_in } else { own };
        let scratch = if columns > 0 { self.scratch(op, memory::bias_gradient_floats(columns))? } else { 0 };
        let bias_grad = db.map(|_| scratch);
        let gelu_bias_grad = scratch + 4 * gelu_offset as u64;

        // dinp (column-major c_in × rows) = W (c_in × c_out) · dout (c_out × rows).
        let dinp_product = |epilogue| Product {
            m: c_in,
            n: rows,
            k: c_out,
            a: Operand { ptr: w, ld: c_in, transposed: false },
            b: Operand { ptr: g, ld: c_out, transposed: false },
            d: di,
            inputs: x,
            output: x,
            accumulate: false,
            epilogue,
        };
        // Whether GELU's bias gradient is still to be summed from dinp after the product.
        let sum_after = match pre {
            None => {
                self.matmul(op, dinp_product(Epilogue::None))?;
                false
            }
            Some(pre) if c_in % matmul::GELU_AUX_LD_MULTIPLE == 0 => {
                let bias_grad = gelu_bias_grad;
                let fused = dinp_product(Epilogue::GeluBackwardBiasGradient { pre, bias_grad });
                match gelu_db {
                    Some(gelu_db) if self.lt.supports(&fused) => {
                        self.matmul(op, fused)?;
                        let n = c_in as i64;
                        launch!(self, "add_f32", grid(c_in, 256), gelu_db, bias_grad, n)?;
                        false
                    }
                    // Without a bias gradient, or where this cuBLASLt has no DGELU_BGRAD for these types.
                    _ => {
                        self.matmul(op, dinp_product(Epilogue::GeluBackward { pre }))?;
                        gelu_db.is_some()
                    }
                }
            }
            // As in the forward pass: GELU's input is too narrow for the epilogue, so a kernel applies gelu'.
            Some(pre) => {
                self.matmul(op, dinp_product(Epilogue::None))?;
                let n = (rows * c_in) as i64;
                launch!(self, "gelu_backward", elementwise(rows * c_in), di, pre, n)?;
                gelu_db.is_some()
            }
        };
        if let (true, Some(gelu_db)) = (sum_after, gelu_db) {
            let (r, ci) = (rows as i64, c_in as i32);
            launch!(self, "column_sums_x", column_sums(c_in), gelu_db, di, r, ci)?;
        }

        // dW (column-major c_in × c_out) += inp (c_in × rows) · doutᵀ (rows × c_out), accumulated in fp32; the
        // bias gradient is the sum of doutᵀ's columns over the rows (the k of this product).
        self.matmul(
            op,
            Product {
                m: c_in,
                n: c_out,
                k: rows,
                a: Operand { ptr: i, ld: c_in, transposed: false },
                b: Operand { ptr: g, ld: c_out, transposed: true },
                d: dw,
                inputs: x,
                output: DType::F32,
                accumulate: true,
                epilogue: bias_grad.map_or(Epilogue::None, |bias_grad| Epilogue::BiasGradient { bias_grad }),
            },
        )?;
        if let (Some(db), Some(grad)) = (db, bias_grad) {
            let n = c_out as i64;
            launch!(self, "add_f32", grid(c_out, 256), db, grad, n)?;
        }
        Ok(())
    }

    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        let op = "add";
        if dst.len != src.len {
            return Err(self.err(op, format!("{dst:?} and {src:?} differ in length")));
        }
        self.disjoint(op, &[dst], &[src])?;
        let (d, s) = (self.ptr(op, dst, DType::F32, dst.len)?, self.ptr(op, src, DType::F32, src.len)?);
        let n = dst.len as i64;
        launch!(self, "add_f32", grid(dst.len, 256), d, s, n)
    }

    fn gelu_forward(&mut self, out: Tensor, pre: Tensor) -> Result<()> {
        let op = "gelu_forward";
        let x = self.x();
        self.disjoint(op, &[out], &[pre])?;
        let (o, p) = (self.ptr(op, out, x, pre.len)?, self.ptr(op, pre, x, pre.len)?);
        self.launch_gelu_forward(o, p, pre.len)
    }

    fn swiglu_forward(&mut self, out: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()> {
        let op = "swiglu_forward";
        let x = self.x();
        self.disjoint(op, &[out], &[inp])?;
        let (o, i) = (self.ptr(op, out, x, rows * ffn)?, self.ptr(op, inp, x, rows * 2 * ffn)?);
        let (n, f) = (rows as i64, ffn as i32);
        launch!(self, op, elementwise(rows * ffn), o, i, n, f)
    }

    fn swiglu_backward(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()> {
        let op = "swiglu_backward";
        let x = self.x();
        self.disjoint(op, &[dinp], &[dout, inp])?;
        let di = self.ptr(op, dinp, x, rows * 2 * ffn)?;
        let (g, i) = (self.ptr(op, dout, x, rows * ffn)?, self.ptr(op, inp, x, rows * 2 * ffn)?);
        let (n, f) = (rows as i64, ffn as i32);
        launch!(self, op, elementwise(rows * ffn), di, g, i, n, f)
    }

    fn moe_route(&mut self, op: MoeRoute) -> Result<()> {
        let name = "moe_route";
        let MoeRoute { probs, weights, chosen, order, place, offsets, logits, normalize, balance, d } = op;
        self.check_moe(name, d)?;
        if self.grouped_experts.is_none() {
            self.not_capturing(name)?;
        }
        for written in [chosen, order, place, offsets] {
            self.forget_offsets(written);
        }
        let (dense, slots) = (d.rows * d.experts, d.slots());
        let (gradient, dloss) = (balance.map(|b| b.gradient), balance.map(|b| b.dloss));
        let (sums, terms) = (balance.map(|b| b.probability_sums), balance.and_then(|b| b.terms));
        self.disjoint_optional(
            name,
            &[Some(probs), Some(weights), Some(chosen), Some(order), Some(place), Some(offsets), gradient, sums, terms],
            &[Some(logits), dloss],
        )?;
        let (p, w) = (self.ptr(name, probs, DType::F32, dense)?, self.ptr(name, weights, DType::F32, slots)?);
        let (c, o) = (self.ptr(name, chosen, DType::U32, slots)?, self.ptr(name, order, DType::U32, slots)?);
        let pl = self.ptr(name, place, DType::U32, slots)?;
        let off = self.ptr(name, offsets, DType::U32, d.experts + 1)?;
        let x = self.ptr(name, logits, self.x(), dense)?;
        let expert_ptr = |t: Option<Tensor>| t.map_or(Ok(0), |t| self.ptr(name, t, DType::F32, d.experts));
        let (g, sum, term) = (expert_ptr(gradient)?, expert_ptr(sums)?, expert_ptr(terms)?);
        let dl = dloss.map_or(Ok(0), |t| self.ptr(name, t, DType::F32, 1))?;
        let scale = balance.map_or(0.0f32, |b| b.scale);
        let (rows, e, k, norm) = (d.rows as i64, d.experts as i32, d.top_k as i32, i32::from(normalize));
        launch!(self, "moe_route", warps(d.rows), p, w, c, x, rows, e, k, norm)?;
        let per_expert = LaunchConfig {
            grid_dim: (d.experts as u32, 1, 1),
            block_dim: (MOE_PLACE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "moe_place", per_expert, o, pl, off, g, sum, term, dl, scale, p, c, rows, k, e)?;
        match self.grouped_experts {
            // The grouped products read the offsets where routing wrote them (a product that cannot run grouped
            // reads them back itself).
            Some(_) => Ok(()),
            None => self.keep_offsets(name, offsets, slots).map(|_| ()),
        }
    }

    fn moe_route_backward(&mut self, op: MoeRouteBackward) -> Result<()> {
        let name = "moe_route_backward";
        let MoeRouteBackward { dlogits, dweights, probs, weights, chosen, normalize, balance, d } = op;
        self.check_moe(name, d)?;
        let (dense, slots) = (d.rows * d.experts, d.slots());
        self.disjoint_optional(
            name,
            &[Some(dlogits)],
            &[Some(dweights), Some(probs), Some(weights), Some(chosen), balance],
        )?;
        let dx = self.ptr(name, dlogits, self.x(), dense)?;
        let (dw, w) = (self.ptr(name, dweights, DType::F32, slots)?, self.ptr(name, weights, DType::F32, slots)?);
        let (p, c) = (self.ptr(name, probs, DType::F32, dense)?, self.ptr(name, chosen, DType::U32, slots)?);
        let bal = balance.map(|b| self.ptr(name, b, DType::F32, d.experts)).transpose()?.unwrap_or(0);
        let (rows, e, k, norm) = (d.rows as i64, d.experts as i32, d.top_k as i32, i32::from(normalize));
        launch!(self, name, warps(d.rows), dx, dw, p, w, c, bal, rows, e, k, norm)
    }

    fn moe_gather(&mut self, op: MoeGather) -> Result<()> {
        let name = "moe_gather";
        let MoeGather { out, inp, order, width, d } = op;
        self.check_moe_rows(name, d, width)?;
        let (x, slots) = (self.x(), d.slots());
        self.disjoint(name, &[out], &[inp, order])?;
        let (o, i) = (self.ptr(name, out, x, slots * width)?, self.ptr(name, inp, x, d.rows * width)?);
        let ord = self.ptr(name, order, DType::U32, slots)?;
        let (n, cw, k) = (slots as i64, width as i32, d.top_k as i32);
        launch!(self, name, elementwise(slots * width), o, i, ord, n, cw, k)
    }

    fn moe_combine(&mut self, op: MoeCombine) -> Result<()> {
        let name = "moe_combine";
        let MoeCombine { out, expert_out, weights, place, accumulate, width, d } = op;
        self.check_moe_rows(name, d, width)?;
        let (x, slots) = (self.x(), d.slots());
        self.disjoint_optional(name, &[Some(out)], &[Some(expert_out), weights, Some(place)])?;
        let (o, eo) = (self.ptr(name, out, x, d.rows * width)?, self.ptr(name, expert_out, x, slots * width)?);
        let w = weights.map(|w| self.ptr(name, w, DType::F32, slots)).transpose()?.unwrap_or(0);
        let pl = self.ptr(name, place, DType::U32, slots)?;
        let (rows, cw, k, acc) = (d.rows as i64, width as i32, d.top_k as i32, i32::from(accumulate));
        launch!(self, name, elementwise(d.rows * width), o, eo, w, pl, rows, cw, k, acc)
    }

    fn moe_combine_backward(&mut self, op: MoeCombineBackward) -> Result<()> {
        let name = "moe_combine_backward";
        let MoeCombineBackward { dexpert_out, dweights, dout, expert_out, weights, order, place, width, d } = op;
        self.check_moe_rows(name, d, width)?;
        let (x, slots) = (self.x(), d.slots());
        self.disjoint(name, &[dexpert_out, dweights], &[dout, expert_out, weights, order, place])?;
        let de = self.ptr(name, dexpert_out, x, slots * width)?;
        let dw = self.ptr(name, dweights, DType::F32, slots)?;
        let (g, eo) = (self.ptr(name, dout, x, d.rows * width)?, self.ptr(name, expert_out, x, slots * width)?);
        let w = self.ptr(name, weights, DType::F32, slots)?;
        let (ord, pl) = (self.ptr(name, order, DType::U32, slots)?, self.ptr(name, place, DType::U32, slots)?);
        let (n, cw, k) = (slots as i64, width as i32, d.top_k as i32);
        launch!(self, "moe_combine_backward_rows", elementwise(slots * width), de, g, w, ord, n, cw, k)?;
        launch!(self, "moe_combine_backward_weights", warps(slots), dw, g, eo, pl, n, cw, k)
    }

    fn expert_matmul_forward(&mut self, op: ExpertMatmulForward) -> Result<()> {
        let name = "expert_matmul_forward";
        let ExpertMatmulForward { out, inp, weight, offsets, experts, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        let x = self.x();
        // Each expert's product checks its own rows; these, the whole operands.
        self.disjoint(name, &[out], &[inp, weight, offsets])?;
        let (o, i) = (self.ptr(name, out, x, rows * c_out)?, self.ptr(name, inp, x, rows * c_in)?);
        let w = self.ptr(name, weight, x, experts * c_out * c_in)?;
        if let Some(grouped) = self.grouped_experts_for(d, experts, &[o, i, w]) {
            let off = self.ptr(name, offsets, DType::U32, experts + 1)?;
            let cfg = grouped.launch(grouped.row_blocks(rows, experts, c_out));
            let (rows, e, ci, co) = (rows as i64, experts as i32, c_in as i32, c_out as i32);
            return launch!(self, "expert_forward_grouped", cfg, o, i, w, off, rows, e, ci, co);
        }
        self.for_each_expert_run(name, offsets, experts, rows, |b, e, first, n| {
            b.matmul_forward(MatmulForward {
                out: out.slice(first * c_out, n * c_out),
                inp: inp.slice(first * c_in, n * c_in),
                weight: weight.slice(e * c_out * c_in, c_out * c_in),
                bias: None,
                gelu_pre: None,
                d: MatmulDims { rows: n, ..d },
            })
        })
    }

    fn expert_matmul_backward(&mut self, op: ExpertMatmulBackward) -> Result<()> {
        let name = "expert_matmul_backward";
        let ExpertMatmulBackward { dinp, dweight, dout, inp, weight, offsets, experts, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        let (x, matrix) = (self.x(), c_out * c_in);
        // Each expert's product checks its own rows; these, the whole operands.
        self.disjoint(name, &[dinp, dweight], &[dout, inp, weight, offsets])?;
        let (di, dw) = (self.ptr(name, dinp, x, rows * c_in)?, self.ptr(name, dweight, DType::F32, experts * matrix)?);
        let (dy, i) = (self.ptr(name, dout, x, rows * c_out)?, self.ptr(name, inp, x, rows * c_in)?);
        let w = self.ptr(name, weight, x, experts * matrix)?;
        if let Some(grouped) = self.grouped_experts_for(d, experts, &[di, dy, i, w]) {
            let off = self.ptr(name, offsets, DType::U32, experts + 1)?;
            let (by_rows, by_expert) = (grouped.row_blocks(rows, experts, c_in), grouped.weight_blocks(d, experts));
            let (rows, e, ci, co) = (rows as i64, experts as i32, c_in as i32, c_out as i32);
            launch!(self, "expert_backward_input_grouped", grouped.launch(by_rows), di, dy, w, off, rows, e, ci, co)?;
            return launch!(
                self,
                "expert_backward_weight_grouped",
                grouped.launch(by_expert),
                dw,
                dy,
                i,
                off,
                rows,
                ci,
                co
            );
        }
        self.for_each_expert_run(name, offsets, experts, rows, |b, e, first, n| {
            b.matmul_backward(MatmulBackward {
                dinp: dinp.slice(first * c_in, n * c_in),
                dweight: dweight.slice(e * matrix, matrix),
                dbias: None,
                dout: dout.slice(first * c_out, n * c_out),
                inp: inp.slice(first * c_in, n * c_in),
                weight: weight.slice(e * matrix, matrix),
                gelu_pre: None,
                gelu_dbias: None,
                d: MatmulDims { rows: n, ..d },
            })
        })
    }

    fn rope(&mut self, op: Rotary) -> Result<()> {
        let name = "rope";
        if let Some(problem) = op.problem() {
            return Err(self.err(name, problem));
        }
        let d = op.d;
        self.disjoint(name, &[op.qkv], &[op.table])?;
        let q = self.ptr(name, op.qkv, self.x(), d.batch * d.time * d.qkv_width())?;
        let table = self.ptr(name, op.table, DType::F32, op.table.len)?;
        let (rows, rotated_heads) = (d.batch * d.time, d.heads + d.kv_heads);
        let (n, t, first, positions) = (rows as i64, d.time as i32, op.first_pos as i32, op.positions() as i32);
        let (heads, kvh, hs, sign) =
            (d.heads as i32, d.kv_heads as i32, d.head_dim as i32, if op.inverse { -1.0f32 } else { 1.0 });
        launch!(
            self,
            name,
            grid(rows * rotated_heads * d.head_dim / 2, 256),
            q,
            table,
            n,
            t,
            first,
            positions,
            heads,
            kvh,
            hs,
            sign
        )
    }

    fn qk_norm_forward(&mut self, op: QkNormForward) -> Result<()> {
        let name = "qk_norm_forward";
        let QkNormForward { out, rstd, inp, weight, eps, d } = op;
        self.check_attention(name, &d)?;
        self.disjoint(name, &[out, rstd], &[inp, weight])?;
        let x = self.x();
        let [rows, weights, stats] = qk_norm_lens(&d);
        let (o, r) = (self.ptr(name, out, x, rows)?, self.ptr(name, rstd, DType::F32, stats)?);
        let (i, w) = (self.ptr(name, inp, x, rows)?, self.ptr(name, weight, x, weights)?);
        let (n, heads, kvh, hd) = ((d.batch * d.time) as i64, d.heads as i32, d.kv_heads as i32, d.head_dim as i32);
        let cfg = grid(d.batch * d.time * (d.heads + 2 * d.kv_heads) * 32, 256);
        launch!(self, name, cfg, o, r, i, w, n, heads, kvh, hd, eps)
    }

    fn qk_norm_backward(&mut self, op: QkNormBackward) -> Result<()> {
        let name = "qk_norm_backward";
        let QkNormBackward { dqkv, dweight, inp, weight, rstd, d } = op;
        self.check_attention(name, &d)?;
        self.disjoint(name, &[dqkv, dweight], &[inp, weight, rstd])?;
        let x = self.x();
        let [len, weights, stats] = qk_norm_lens(&d);
        let (g, dw) = (self.ptr(name, dqkv, x, len)?, self.ptr(name, dweight, DType::F32, weights)?);
        let (i, w, r) = (
            self.ptr(name, inp, x, len)?,
            self.ptr(name, weight, x, weights)?,
            self.ptr(name, rstd, DType::F32, stats)?,
        );
        let rows = d.batch * d.time;
        if rows == 0 {
            return Ok(());
        }
        // Two sums of head_dim (rounded up to a whole 16-byte chunk) floats a warp: at most 1 KiB with heads of up to
        // 128 channels, so that 8 warps fit the default shared memory.
        const WARPS: usize = 8;
        let blocks = rows.div_ceil(NORM_ROWS_PER_BLOCK);
        let partials = self.scratch(name, memory::norm_backward_floats(rows, d.head_dim, false))?;
        let (n, heads, kvh, hd) = (rows as i64, d.heads as i32, d.kv_heads as i32, d.head_dim as i32);
        let (rpb, nb, width) = (NORM_ROWS_PER_BLOCK as i32, blocks as i64, weights as i32);
        let mut cfg = grid(blocks * WARPS * 32, (WARPS * 32) as u32);
        cfg.shared_mem_bytes = (WARPS * 2 * d.head_dim.next_multiple_of(8) * 4) as u32;
        launch!(self, name, cfg, g, partials, i, w, r, n, heads, kvh, hd, rpb)?;
        launch!(self, "column_sums", column_sums(weights), dw, partials, nb, width)
    }

    fn attention_forward(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, d: AttentionDims) -> Result<()> {
        let op = "attention_forward";
        let x = self.x();
        self.check_attention(op, &d)?;
        let rows = d.batch * d.time;
        self.disjoint(op, &[out, lse], &[qkv])?;
        let (o, l) =
            (self.ptr(op, out, x, rows * d.channels())?, self.ptr(op, lse, DType::F32, d.batch * d.heads * d.time)?);
        let q = self.ptr(op, qkv, x, rows * d.qkv_width())?;
        let (t, nh, kvh, window) = (d.time as i32, d.heads as i32, d.kv_heads as i32, kernel_window(&d));
        if let Some(tiles) = self.flash_tiles(&d, &[o, q]) {
            let (kernel, blocks) = (FlashTiles::FORWARD, d.time.div_ceil(tiles.forward_rows));
            let cfg = tiles.launch(kernel, blocks, d.heads, d.batch);
            if let Some(keys) = tiles.forward_keys {
                let w = d.qkv_width();
                let bf16 = DType::Bf16;
                let q_map = tensor_map(q, bf16, w, &d, tiles.forward_rows as u32)?;
                let kv_map = tensor_map(q, bf16, w, &d, keys)?;
                return launch!(self, tiles.kernels[kernel], cfg, o, l, q_map, kv_map, t, nh, kvh, window);
            }
            return launch!(self, tiles.kernels[kernel], cfg, o, l, q, t, nh, kvh, window);
        }
        let (b, hs) = (d.batch as i32, d.head_dim as i32);
        launch!(self, op, grid(d.batch * d.heads * d.time * 32, 128), o, l, q, b, t, nh, kvh, hs, window)
    }

    fn attention_backward(&mut self, op: AttentionBackward) -> Result<()> {
        let AttentionBackward { dqkv, dout, qkv, out, lse, dbias, d } = op;
        let op = "attention_backward";
        let x = self.x();
        self.check_attention(op, &d)?;
        let (rows, c, w, stats) = (d.batch * d.time, d.channels(), d.qkv_width(), d.batch * d.heads * d.time);
        self.disjoint_optional(op, &[Some(dqkv), dbias], &[Some(dout), Some(qkv), Some(out), Some(lse)])?;
        let dq = self.ptr(op, dqkv, x, rows * w)?;
        let (g, q, o) =
            (self.ptr(op, dout, x, rows * c)?, self.ptr(op, qkv, x, rows * w)?, self.ptr(op, out, x, rows * c)?);
        let l = self.ptr(op, lse, DType::F32, stats)?;
        let db = dbias.map(|t| self.ptr(op, t, DType::F32, w)).transpose()?;
        let (b, t, nh, kvh, hs) = (d.batch as i32, d.time as i32, d.heads as i32, d.kv_heads as i32, d.head_dim as i32);
        let window = kernel_window(&d);
        let (rows_i, w_i) = (rows as i64, w as i32);
        if let Some(tiles) = self.flash_tiles(&d, &[dq, g, q, o]) {
            let blocks = d.time.div_ceil(FLASH_BLOCK_ROWS);
            if self.deterministic {
                // D_i = dO_i·O_i per row (eight threads a row), then dK and dV per key tile, then dQ per query tile:
                // each writes its part of dqkv whole, so nothing needs zeroing and nothing is atomic. With dbias, each
                // warp also writes the column sums of the rows it stores, which one more kernel adds up.
                let scratch = memory::attention_backward_floats(&d, true, db.is_some());
                let row_dot = self.scratch(op, scratch)?;
                let partials = if db.is_some() { row_dot + 4 * stats as u64 } else { 0 };
                launch!(self, "flash_attention_row_dot", grid(stats * 8, 256), row_dot, g, o, b, t, nh, hs)?;
                let (dkv, dq_kernel) = (FlashTiles::DKV, FlashTiles::DQ);
                if let Some(s) = tiles.specialised_backward {
                    let (qkv_map, dout_map) = s.maps(q, g, &d)?;
                    for (kernel, blocks, heads) in [(dkv, s.dkv_keys, d.kv_heads), (dq_kernel, s.dq_queries, d.heads)] {
                        let cfg = tiles.launch(kernel, d.time.div_ceil(blocks), heads, d.batch);
                        let name = tiles.kernels[kernel];
                        launch!(self, name, cfg, dq, partials, qkv_map, dout_map, l, row_dot, t, nh, kvh, window)?;
                    }
                } else {
                    for (kernel, heads) in [(dkv, d.kv_heads), (dq_kernel, d.heads)] {
                        let cfg = tiles.launch(kernel, blocks, heads, d.batch);
                        let name = tiles.kernels[kernel];
                        launch!(self, name, cfg, dq, partials, g, q, l, row_dot, t, nh, kvh, window)?;
                    }
                }
                if let Some(db) = db {
                    let partial_rows = memory::attention_bias_partial_rows(&d) as i64;
                    launch!(self, "column_sums", column_sums(w), db, partials, partial_rows, w_i)?;
                }
                return Ok(());
            }
            // dQ's fp32 sums (B, T, NH·D) start at zero; D_i as above; dK and dV per key tile, which also adds each
            // tile's part of dQ into the sums; then dQ, rounded, into dqkv.
            let sums = rows * c;
            let dq_sum = self.scratch(op, memory::attention_backward_floats(&d, false, false))?;
            let row_dot = dq_sum + (sums * 4) as u64;
            // SAFETY: the scratch buffer holds `sums + stats` floats.
            unsafe { result::memset_d8_async(dq_sum, 0, sums * 4, self.stream.cu_stream()) }
                .map_err(driver("memset"))?;
            launch!(self, "flash_attention_row_dot", grid(stats * 8, 256), row_dot, g, o, b, t, nh, hs)?;
            let kernel = FlashTiles::DKV_DQ;
            match tiles.specialised_backward {
                Some(s) => {
                    let (qkv_map, dout_map) = s.maps(q, g, &d)?;
                    let dq_map = tensor_map(dq_sum, DType::F32, c, &d, DQ_BOX_ROWS)?;
                    let cfg = tiles.launch(kernel, d.time.div_ceil(s.dkv_keys), d.kv_heads, d.batch);
                    let name = tiles.kernels[kernel];
                    launch!(self, name, cfg, dq, qkv_map, dout_map, dq_map, l, row_dot, t, nh, kvh, window)?;
                }
                None => {
                    let cfg = tiles.launch(kernel, blocks, d.kv_heads, d.batch);
                    launch!(self, tiles.kernels[kernel], cfg, dq, dq_sum, g, q, l, row_dot, t, nh, kvh, window)?;
                }
            }
            let (n, scale) = (rows as i64, 1.0 / (d.head_dim as f32).sqrt());
            launch!(self, "flash_attention_dq_store", grid(sums / 8, 256), dq, dq_sum, n, nh, kvh, hs, scale)?;
        } else {
            // One warp per query row for dq, then one per key/value row for dk and dv.
            let cfg = grid(rows * d.heads * 32, 128);
            launch!(self, "attention_backward_dq", cfg, dq, g, q, o, l, b, t, nh, kvh, hs, window)?;
            let cfg = grid(rows * d.kv_heads * 32, 128);
            launch!(self, "attention_backward_dkv", cfg, dq, g, q, o, l, b, t, nh, kvh, hs, window)?;
        }
        // These kernels do not sum what they write: the bias gradient reads it again.
        match db {
            Some(db) => launch!(self, "column_sums_x", column_sums(w), db, dq, rows_i, w_i),
            None => Ok(()),
        }
    }

    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, d: AttentionDims) -> Result<()> {
        let op = "attention_decode";
        let x = self.x();
        self.check_attention(op, &d)?;
        if d.batch != 1 || pos >= d.time {
            return Err(self.err(op, format!("position {pos} of one sequence of {} (batch {})", d.time, d.batch)));
        }
        self.disjoint(op, &[out], &[qkv])?;
        let (o, q) = (self.ptr(op, out, x, d.channels())?, self.ptr(op, qkv, x, d.time * d.qkv_width())?);
        let (p, nh, kvh, hs, window) =
            (pos as i32, d.heads as i32, d.kv_heads as i32, d.head_dim as i32, kernel_window(&d));
        launch!(self, op, grid(d.heads * 32, 128), o, q, p, nh, kvh, hs, window)
    }

    fn classifier(
        &mut self,
        logits: Tensor,
        losses: Tensor,
        targets: Tensor,
        rows: usize,
        vocab: usize,
        padded_vocab: usize,
        dloss: Option<Tensor>,
    ) -> Result<()> {
        let op = "classifier";
        if vocab == 0 || vocab > padded_vocab {
            return Err(self.err(op, format!("vocabulary {vocab} does not fit in {padded_vocab} logits")));
        }
        self.disjoint_optional(op, &[Some(logits), Some(losses)], &[dloss])?;
        let (z, l) = (self.ptr(op, logits, self.x(), rows * padded_vocab)?, self.ptr(op, losses, DType::F32, rows)?);
        let y = self.ids(op, targets, rows)?;
        let scale = match dloss {
            Some(t) => self.ptr(op, t, DType::F32, 1)?,
            None => 0,
        };
        let (v, vp) = (vocab as i32, padded_vocab as i32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        launch!(self, op, cfg, z, l, y, v, vp, scale)
    }

    fn adamw(&mut self, params: Tensor, grads: Tensor, m: Tensor, v: Tensor, s: &AdamWStep) -> Result<()> {
        let op = "adamw";
        let n = params.len;
        self.disjoint(op, &[params, m, v], &[grads, s.values])?;
        let p = self.ptr(op, params, self.x(), n)?;
        let master = match &self.buffers[params.buffer.0 as usize].master {
            Some(master) => {
                let range = params.offset..params.offset + n;
                let packed = master.pieces.packed_index(range.clone()).ok_or_else(|| {
                    self.err(op, format!("elements {range:?} are not all in one piece of the master weights kept"))
                })?;
                master.ptr + (packed * 4) as u64
            }
            None => 0,
        };
        let (g, mp, vp) =
            (self.ptr(op, grads, DType::F32, n)?, self.ptr(op, m, DType::F32, n)?, self.ptr(op, v, DType::F32, n)?);
        let values = self.ptr(op, s.values, DType::F32, 3)?;
        let n = n as i64;
        let cfg = elementwise(params.len);
        launch!(self, op, cfg, p, master, g, mp, vp, n, values, s.beta1, s.beta2, s.eps, s.weight_decay, s.grad_clip)
    }
}

/// What the NCCL communicator needs of the engine.
impl CudaBackend {
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device address of `t`'s first element and its type (a parameter's working copy, not its master).
    pub(crate) fn comm_view(&self, t: Tensor) -> Result<(u64, DType)> {
        let b = self.buffers.get(t.buffer.0 as usize).ok_or_else(|| self.err("nccl", format!("{t:?}")))?;
        let dtype = b.dtype;
        Ok((self.ptr("nccl", t, dtype, t.len)?, dtype))
    }
}

/// The attention kernels' `window` (kernels/attention.cu): 0 for attention that is not causal, otherwise the keys a
/// query sees, no more than the sequence (`time` for plain causal attention).
fn kernel_window(d: &AttentionDims) -> i32 {
    match (d.causal, d.window) {
        (false, _) => 0,
        (true, window) => window.map_or(d.time, |w| w.min(d.time)) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel file `name` compiled in bf16 for `arch` by NVRTC, in a cache of its own that is removed after. Needs
    /// NVRTC and the CUDA headers (as tests/nvrtc.rs), no GPU.
    fn compiled(name: &str, arch: &str) -> crate::compile::Compiled {
        let dir = std::env::temp_dir().join(format!("kiln-backend-test-{name}-{}", std::process::id()));
        let compiler = crate::compile::Compiler::with_cache_dir(dir).unwrap_or_else(|e| {
            panic!("{e}\nThis test needs NVRTC 13 and the CUDA headers, as tests/nvrtc.rs says (.ci/run installs them)")
        });
        let kernel = KERNELS.iter().find(|k| k.name == name).unwrap_or_else(|| panic!("no kernel file {name}"));
        let built = compiler.compile(kernel, arch, Precision::Bf16).unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(compiler.cache_dir());
        built
    }

    #[test]
    fn the_wgmma_kernels_are_the_default_chosen_by_part_and_a_typo_is_a_usage_error() {
        fn parse(value: Option<&str>) -> FlashWgmma {
            FlashWgmma::parse(value).unwrap()
        }
        let none = FlashWgmma { forward: false, backward: false, form: ForwardForm::Plain };
        let forward = FlashWgmma { forward: true, ..none };
        assert_eq!((parse(None), parse(Some(""))), (FlashWgmma::BOTH, FlashWgmma::BOTH));
        assert_eq!((parse(Some("none")), parse(Some("forward"))), (none, forward));
        assert_eq!(parse(Some("backward, forward")), FlashWgmma::BOTH);
        for (name, form) in [("pipelined", ForwardForm::Pipelined), ("specialised", ForwardForm::Specialised)] {
            let chosen = FlashWgmma { form, ..FlashWgmma::BOTH };
            assert_eq!(parse(Some(&format!("{name},backward"))), chosen);
            assert_eq!(parse(Some(&format!("forward,{name},backward"))), chosen);
            assert_eq!(parse(Some(name)), FlashWgmma { form, ..forward });
        }
        for (value, named) in [("forward,bakward", "bakward"), ("pipelined,specialised", "name one")] {
            let err = FlashWgmma::parse(Some(value)).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{err}");
            assert!(err.to_string().contains("KILN_FLASH_WGMMA") && err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn the_experts_products_run_per_expert_unless_grouped_is_named_and_a_typo_is_a_usage_error() {
        let parse = |value| ExpertProducts::parse(value).unwrap();
        assert_eq!(
            (parse(None), parse(Some("")), parse(Some("per-expert"))),
            (ExpertProducts::PerExpert, ExpertProducts::PerExpert, ExpertProducts::PerExpert)
        );
        assert_eq!(parse(Some(" grouped")), ExpertProducts::Grouped);
        let err = ExpertProducts::parse(Some("groupped")).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{err}");
        assert!(err.to_string().contains("KILN_EXPERT_PRODUCTS") && err.to_string().contains("groupped"), "{err}");
    }

    /// The grouped expert products' launches, from their table in the sm_80 module as the engine reads it: the
    /// kernels it names exist, and the grids cover the worst case of the runs' tiles.
    #[test]
    fn the_grouped_expert_products_launch_as_their_table_says() {
        let built = compiled("expert_products", "sm_80");
        for name in ["expert_forward_grouped", "expert_backward_input_grouped", "expert_backward_weight_grouped"] {
            assert!(built.entry_points.iter().any(|e| e == name), "{name} in {:?}", built.entry_points);
        }
        let grouped = GroupedExperts::read(&built.cubin).unwrap();
        let (rows, cols) = (grouped.tile_rows as usize, grouped.tile_cols as usize);
        assert_eq!((rows, cols, grouped.threads, grouped.shared_bytes), (128, 64, 128, 30_720));
        // Three runs each one row into its second tile need every block: 387 rows in 4 tiles, plus 2.
        assert_eq!(grouped.row_blocks(3 * (rows + 1), 3, 200), (6, 4, 1));
        assert_eq!(grouped.row_blocks(0, 1, 8), (1, 1, 1));
        let d = MatmulDims { rows: 10, c_in: 200, c_out: 136 };
        assert_eq!(grouped.weight_blocks(d, 5), (5, 4, 2));
        let config = grouped.launch((6, 4, 1));
        assert_eq!((config.grid_dim, config.block_dim, config.shared_mem_bytes), ((6, 4, 1), (128, 1, 1), 30_720));
    }

    /// What the engine launches, read from the sm_90a module as the engine reads it: with `specialised,backward` the
    /// warp-specialised forward, dq and dkv kernels (their threads, shared memory, blocks and tensor-map boxes from
    /// their table), and the dkv kernel with atomic dQ; with `specialised` alone the backward stays on mma.sync.
    #[test]
    fn the_specialised_kernels_launch_as_their_table_says() {
        let built = compiled("flash_attention", "sm_90a");
        let (forward, dq, dkv, dkv_dq) = (FlashTiles::FORWARD, FlashTiles::DQ, FlashTiles::DKV, FlashTiles::DKV_DQ);
        for (value, backward_specialised) in [("specialised,backward", true), ("specialised", false)] {
            let tiles = FlashTiles::read(&built.cubin, FlashWgmma::parse(Some(value)).unwrap()).unwrap();
            for t in &tiles {
                let d = t.head_dim;
                assert!(t.kernels.iter().all(|k| built.entry_points.iter().any(|e| e == k)), "{value} D={d}");
                // Per head dimension: the forward's keys a tile, the dkv kernel's keys a block and shared memory (one
                // role at D = 64: K and V of 128 keys; two at 128: 64 keys, three stages and a Pᵀ buffer each), and
                // the dkv_dq kernel's (its dS tiles and dQ rows besides).
                let shapes = [(64, 64, 128, 66_640, 133_120), (128, 128, 64, 157_296, 206_848)];
                let Some(&(_, keys, dkv_keys, dkv_shared, atomic)) = shapes.iter().find(|s| s.0 == d) else {
                    assert_eq!((t.forward_keys, t.specialised_backward), (None, None), "{value} D={d}: none");
                    continue;
                };
                let row = d as u32 * 2;
                assert_eq!(t.kernels[forward], format!("flash_attention_forward_wgmma_specialised_d{d}"));
                assert_eq!((t.threads[forward], t.shared_bytes[forward]), (384, (128 + 4 * keys) * row + 72));
                assert_eq!((t.forward_rows, t.forward_keys), (128, Some(keys)), "{value} D={d}");
                if backward_specialised {
                    assert_eq!(t.kernels[dq], format!("flash_attention_backward_dq_wgmma_specialised_d{d}"));
                    assert_eq!((t.threads[dq], t.shared_bytes[dq]), (384, 640 * row + 104), "{value} D={d}");
                    assert_eq!(t.kernels[dkv], format!("flash_attention_backward_dkv_wgmma_specialised_d{d}"));
                    assert_eq!((t.threads[dkv], t.shared_bytes[dkv]), (384, dkv_shared), "{value} D={d}");
                    let blocks = SpecialisedBackward { dq_queries: 128, dkv_keys, box_rows: 64 };
                    assert_eq!(t.specialised_backward, Some(blocks), "{value} D={d}");
                    assert_eq!(t.kernels[dkv_dq], format!("flash_attention_backward_dkv_dq_wgmma_specialised_d{d}"));
                    assert_eq!((t.threads[dkv_dq], t.shared_bytes[dkv_dq]), (384, atomic), "{value} D={d}");
                } else {
                    assert_eq!(t.kernels[dq], format!("flash_attention_backward_dq_d{d}"));
                    assert_eq!(t.kernels[dkv], format!("flash_attention_backward_dkv_d{d}"));
                    assert_eq!(t.specialised_backward, None, "{value} D={d}");
                }
            }
        }
    }

    #[test]
    fn the_specialised_kernels_read_in_rows_of_a_sequence_and_boxes_of_128_bytes() {
        let d = AttentionDims { batch: 3, time: 77, heads: 4, kv_heads: 2, head_dim: 64, causal: true, window: None };
        let w = (4 + 2 * 2) * 64;
        // What cuTensorMapEncodeTiled requires of them: strides in multiples of 16 bytes, boxes of at most 256
        // elements a side, and with the 128-byte swizzle a box row of at most 128 bytes (the kernels' tiles take
        // exactly 128).
        let encodable = |element: u32, (strides, boxes): ([u64; 2], [u32; 3])| {
            strides.iter().all(|s| s % 16 == 0)
                && boxes.iter().all(|&b| (1..=256).contains(&b))
                && boxes[0] * element == 128
        };
        let (dims, strides, boxes) = map_shape(DType::Bf16, d.qkv_width(), &d, 128);
        assert_eq!(dims, [w, 77, 3]);
        assert_eq!(strides, [w * 2, 77 * w * 2]);
        assert_eq!(boxes, [64, 128, 1]);
        assert!(encodable(2, (strides, boxes)));
        // dQ's fp32 sums, (B, T, NH·D): boxes of 32 floats by 16 rows.
        let (dims, strides, boxes) = map_shape(DType::F32, d.channels(), &d, DQ_BOX_ROWS);
        assert_eq!(dims, [4 * 64, 77, 3]);
        assert_eq!(strides, [4 * 64 * 4, 77 * 4 * 64 * 4]);
        assert_eq!(boxes, [32, 16, 1]);
        assert!(encodable(4, (strides, boxes)));
    }
}

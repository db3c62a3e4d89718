//! The CUDA engine's memory, stated without a GPU: what each role is stored in, and what the engine takes beyond the
//! buffers it is asked for. The working memory of each kernel that needs some is sized here, by the same functions
//! the backend calls when it runs them, so a plan and a run cannot disagree about it.

use crate::backend::DType;
use crate::matmul::WORKSPACE_BYTES;
use kiln_core::config::{AttentionKernel, Precision};
use kiln_core::memory::{Component, MemoryModel, StepShapes, Storage};
use kiln_core::{AttentionDims, Role};

/// Blocks of the first pass of a sum: fixed, so that sums are deterministic.
pub(crate) const REDUCE_BLOCKS: u32 = 256;
/// Rows of a norm's backward pass per block, each block writing partial sums of the weight gradients.
pub(crate) const NORM_ROWS_PER_BLOCK: usize = 32;
/// What the CUDA context, its kernels and cuBLASLt's handle take on the device, as measured on an H100 (an
/// estimate: it varies with the driver and the GPU).
const CONTEXT_BYTES: u64 = 512 << 20;
/// NCCL's buffers: by default 4 MiB for each channel to each ring neighbour, in and out, over up to 32 channels (an
/// estimate: NCCL sizes them by topology).
const NCCL_BYTES: u64 = 32 * 2 * (4 << 20);

/// The element type the engine stores `role` in.
pub(crate) fn dtype(precision: Precision, role: Role) -> DType {
    match role {
        Role::Param | Role::Activation => match precision {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::Bf16,
        },
        Role::Grad | Role::Stat | Role::OptState => DType::F32,
        Role::Index => DType::U32,
    }
}

/// Working floats of the embedding's backward pass over `rows` positions: the positions sorted by token, two
/// (keys, rows) pairs of arrays.
pub(crate) fn encoder_backward_floats(rows: usize) -> usize {
    4 * rows
}

/// Working floats of a norm's backward pass: each block's partial sums of the weight and bias gradients, and with
/// `dinp_sums` of the input gradient's columns (`NormBackward::dinp_sums`). QK-norm's backward keeps as many for
/// heads of `c` channels: the query weight's sums and the key weight's in place of the weight's and the bias's.
pub(crate) fn norm_backward_floats(rows: usize, c: usize, dinp_sums: bool) -> usize {
    rows.div_ceil(NORM_ROWS_PER_BLOCK) * if dinp_sums { 3 } else { 2 } * c
}

/// Working floats of a matrix product's bias gradients, `columns` of them in all: its own, and that of GELU's input
/// (cuBLASLt's epilogues overwrite their output, so they write here and a kernel adds that in).
pub(crate) fn bias_gradient_floats(columns: usize) -> usize {
    columns
}

/// Working floats of the fused attention's backward pass: each row's `dO·O`; without `deterministic` the fp32 sums of
/// dQ before them, and with `deterministic` and `bias_sums` the partial column sums of dqkv after them (see
/// [`attention_bias_partial_rows`]).
pub(crate) fn attention_backward_floats(d: &AttentionDims, deterministic: bool, bias_sums: bool) -> usize {
    let stats = d.batch * d.heads * d.time;
    match (deterministic, bias_sums) {
        (true, false) => stats,
        (true, true) => stats + attention_bias_partial_rows(d) * d.qkv_width(),
        (false, _) => d.batch * d.time * d.channels() + stats,
    }
}

/// Rows of the fused attention backward's partial column sums of dqkv: one for each 16 rows (a warp's) of each
/// 64-row tile of each sequence (kernels/flash_attention.cu).
pub(crate) fn attention_bias_partial_rows(d: &AttentionDims) -> usize {
    d.batch * d.time.div_ceil(64) * 4
}

/// The CUDA engine's memory in `precision`.
pub struct CudaMemory {
    pub precision: Precision,
    pub attention: AttentionKernel,
    pub deterministic: bool,
}

impl MemoryModel for CudaMemory {
    fn engine(&self) -> String {
        format!("cuda ({})", self.precision.name())
    }

    fn max_head_dim(&self) -> Option<usize> {
        Some(crate::backend::MAX_HEAD_DIM)
    }

    fn storage(&self) -> Storage {
        let bytes = |role| dtype(self.precision, role).size();
        Storage {
            param: bytes(Role::Param),
            master: if self.precision == Precision::Bf16 { 4 } else { 0 },
            grad: bytes(Role::Grad),
            activation: bytes(Role::Activation),
            stat: bytes(Role::Stat),
            opt_state: bytes(Role::OptState),
            index: bytes(Role::Index),
        }
    }

    fn overheads(&self, step: &StepShapes, world: usize) -> Vec<Component> {
        // fp32 runs the unfused attention, which needs no working memory, and so does a head dimension the fused
        // kernels are not built for.
        let fused = self.precision == Precision::Bf16
            && self.attention == AttentionKernel::Fused
            && crate::backend::fused_head_dim(step.attention.head_dim);
        let attention = match fused {
            true => attention_backward_floats(&step.attention, self.deterministic, step.attention_bias_sums),
            false => 0,
        };
        let working = [
            encoder_backward_floats(step.rows),
            norm_backward_floats(step.rows, step.n_embd, step.norm_bias_sums),
            if step.qk_norm { norm_backward_floats(step.rows, step.attention.head_dim, false) } else { 0 },
            bias_gradient_floats(step.max_bias_width),
            attention,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
        .max(1);
        let mut components = vec![
            Component::allocated(
                "kernels' working memory (the largest any kernel of a step needs)",
                4 * working as u64,
            ),
            Component::allocated("sums' partials", 4 * (REDUCE_BLOCKS as u64 + 1)),
            Component::allocated("cuBLASLt workspace", WORKSPACE_BYTES as u64),
            Component::outside("CUDA context and kernels (estimate)", CONTEXT_BYTES),
        ];
        if world > 1 {
            components.push(Component::outside("NCCL buffers (estimate)", NCCL_BYTES));
        }
        components
    }

    fn shared_by_ranks(&self) -> bool {
        false
    }

    fn outside_exists_at_start(&self) -> bool {
        true
    }
}

//! The operands of a mixture-of-experts MLP's operations (Mixtral's, Qwen3-MoE's), which replace a block's one MLP
//! by `experts` MLPs of which each token uses `top_k`.
//!
//! ```text
//! probs   = softmax(x · routerᵀ)                                   (rows, experts)
//! chosen  = the top_k experts of each row by probability            weights: their probabilities, divided by
//! y[t]    = Σ_j weights[t, j] · mlp_{chosen[t, j]}(x[t])            their sum where normalised (Mixtral)
//! ```
//!
//! Slot `s = t·top_k + j` is token `t`'s `j`-th choice. The experts do their work in dispatch order, `order`: every
//! slot of expert 0, then of expert 1, …, each expert's in slot order, so that an expert's rows are one run of the
//! dispatched matrix (from `offsets[e]` to `offsets[e + 1]`) and its products are ordinary matrix products over
//! that run ([`ExpertMatmulForward`]). `place[s]` is slot `s`'s row in that order. Routing is the data deciding
//! shapes: the runs' lengths are known only on the device, so the operations take `offsets` as a tensor.

use crate::backend::{MatmulDims, Tensor};

/// The shape of a layer's routing: each of `rows` tokens goes to `top_k` of `experts` experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeDims {
    pub rows: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl MoeDims {
    /// Rows of the dispatched matrices: one per token and choice.
    pub fn slots(&self) -> usize {
        self.rows * self.top_k
    }

    pub fn problem(&self) -> Option<String> {
        (self.top_k == 0 || self.top_k > self.experts || self.experts > u32::MAX as usize / 2).then(|| {
            format!("top_k {} of {} experts: it must be from 1 to the experts (at most 2³¹)", self.top_k, self.experts)
        })
    }

    /// [`Self::problem`], for an operation on rows of `width` elements.
    pub fn problem_with_rows(&self, width: usize) -> Option<String> {
        self.problem().or_else(|| (width == 0).then(|| "rows of width 0".to_string()))
    }
}

/// The load-balancing loss of Switch Transformer and Mixtral, `α·E·Σ_e f_e·P_e` over the `L` routed layers of a
/// pass of `n` rows, `f_e` the slots expert `e` got per row (the `f_e` sum to `top_k`) and `P_e` its mean
/// probability (both over every layer's rows, as transformers takes them). Its gradient with respect to each
/// probability of expert `e` is the same in every layer, `α·E·count_e/(L·n)²`; scaled by the pass's weight in the
/// step (`dloss·n`, the weight its rows' losses have when every row's target counts) that is `dloss·scale·count_e`
/// with `scale = α·E/(L²·n)`. Rows whose targets are ignored still count in `n`: they are routed like any other.
/// [`MoeRoute`] adds each layer's counts so scaled into `gradient` (full precision, `experts` elements, zeroed
/// before the pass), which [`MoeRouteBackward`] then adds to every layer's probability gradients.
///
/// The loss's value, for the log: with `S_e` expert `e`'s probabilities summed over every layer's rows (`L·n·P_e`)
/// and `count_e` its slots over every layer, the pass's share of the step's objective is
/// `dloss·n·α·E·Σ_e f_e·P_e = Σ_e (dloss·scale·count_e)·S_e`: the last layer's `gradient` times `S_e`, summed.
/// [`MoeRoute`] adds each layer's probabilities into `probability_sums` (`S_e` so far; zeroed with `gradient`) and,
/// given `terms` (the pass's last routed layer), adds `gradient_e·S_e` into `terms_e`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Balance {
    pub gradient: Tensor,
    /// `experts` full-precision elements.
    pub probability_sums: Tensor,
    /// `experts` full-precision elements, added to (a step's passes all add into the same ones).
    pub terms: Option<Tensor>,
    /// One full-precision element, read when the operation runs (as the classifier's).
    pub dloss: Tensor,
    pub scale: f32,
}

/// Operands of [`crate::Backend::moe_route`]: from the router's `logits` (`(rows, experts)`), writes `probs` (the
/// same shape, full precision), each slot's `weights` (full precision) and expert (`chosen`), and the dispatch
/// (`order`, `place`, `offsets` as the module says; `offsets` has `experts + 1` elements). The top choices are in
/// descending probability, a tie going to the lower expert. The four index tensors are [`crate::Role::Index`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeRoute {
    pub probs: Tensor,
    pub weights: Tensor,
    pub chosen: Tensor,
    pub order: Tensor,
    pub place: Tensor,
    pub offsets: Tensor,
    pub logits: Tensor,
    /// Whether a token's weights are divided by their sum (Mixtral; Qwen3-MoE's `norm_topk_prob`).
    pub normalize: bool,
    pub balance: Option<Balance>,
    pub d: MoeDims,
}

/// Operands of [`crate::Backend::moe_route_backward`]: writes `dlogits` (overwritten) from the weights' gradient
/// `dweights` (a slot each) and the forward's `probs`, `weights` and `chosen`, plus the load-balancing gradient
/// `balance` (see [`Balance`]) on every probability. With `g_j` the gradient of the probability of choice `j`
/// (`dweights_j`, or normalised `(dweights_j − Σ_i dweights_i·weights_i)/Σ_i p_i` over the row's choices),
/// `dlogits_e = p_e·(dp_e − Σ_i p_i·dp_i)` where `dp_e` sums `balance_e` and the `g_j` of the choices of `e`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeRouteBackward {
    pub dlogits: Tensor,
    pub dweights: Tensor,
    pub probs: Tensor,
    pub weights: Tensor,
    pub chosen: Tensor,
    pub normalize: bool,
    pub balance: Option<Tensor>,
    pub d: MoeDims,
}

/// Operands of [`crate::Backend::moe_gather`]: row `p` of `out` (`(slots, width)`) is row `order[p] / top_k` of `inp`
/// (`(rows, width)`): the tokens, dispatched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeGather {
    pub out: Tensor,
    pub inp: Tensor,
    pub order: Tensor,
    pub width: usize,
    pub d: MoeDims,
}

/// Operands of [`crate::Backend::moe_combine`]: `out[t] = Σ_j w_s · expert_out[place[s]]`, `s = t·top_k + j`, over
/// rows of `width` (`out` `(rows, width)`, `expert_out` `(slots, width)`), with `w` the slots' `weights`, or 1
/// without them (the gather's backward). With `accumulate`, `out` is added to rather than overwritten.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeCombine {
    pub out: Tensor,
    pub expert_out: Tensor,
    pub weights: Option<Tensor>,
    pub place: Tensor,
    pub accumulate: bool,
    pub width: usize,
    pub d: MoeDims,
}

/// Operands of [`crate::Backend::moe_combine_backward`]: writes `dexpert_out[place[s]] = w_s·dout[t]` and
/// `dweights[s] = dout[t] · expert_out[place[s]]` (both overwritten) for every slot `s` of token `t`; it takes the
/// dispatch both ways, `order` and `place`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeCombineBackward {
    pub dexpert_out: Tensor,
    pub dweights: Tensor,
    pub dout: Tensor,
    pub expert_out: Tensor,
    pub weights: Tensor,
    pub order: Tensor,
    pub place: Tensor,
    pub width: usize,
    pub d: MoeDims,
}

/// Operands of [`crate::Backend::expert_matmul_forward`]: a linear layer per expert over its run of the dispatched
/// rows, `out[p] = inp[p] · W_eᵀ` for `offsets[e] ≤ p < offsets[e + 1]`, where `weight` holds the experts' matrices
/// one after another (`(experts · c_out, c_in)`) and `d.rows` is the slots. No bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertMatmulForward {
    pub out: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub offsets: Tensor,
    pub experts: usize,
    pub d: MatmulDims,
}

/// Operands of [`crate::Backend::expert_matmul_backward`]: per expert's run, `dinp = dout · W_e` (overwritten) and
/// `dW_e += doutᵀ · inp`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertMatmulBackward {
    pub dinp: Tensor,
    pub dweight: Tensor,
    pub dout: Tensor,
    pub inp: Tensor,
    pub weight: Tensor,
    pub offsets: Tensor,
    pub experts: usize,
    pub d: MatmulDims,
}

//! kiln's CPU engine.
//!
//! Implements every [`Backend`] operation in plain Rust: rayon for parallel loops, the `gemm` crate for matrix
//! products, one file per layer with the math stated at its top. It is generic over the scalar type: `f32` is the
//! engine that trains, `f64` runs the same code for gradient checks against finite differences. Results do not
//! depend on thread scheduling: every reduction is split into fixed pieces summed in a fixed order.
//!
//! It captures graphs as a GPU does ([`Backend::begin_capture`]): an operation called while capturing is recorded
//! with its operands, and a replay calls the recorded operations again. Nothing is faster for it; it is there so that
//! a trainer's use of graphs (every value that changes between replays kept in a tensor, nothing read back inside
//! one) is tested where there is no GPU.

mod adamw;
mod attention;
mod classifier;
mod encoder;
mod experts;
pub mod math;
mod matmul;
mod norm;
mod rope;
mod swiglu;

use kiln_core::backend::{BufferId, IGNORE_TARGET, first_overlap, qk_norm_lens};
use kiln_core::experts::{
    ExpertMatmulBackward, ExpertMatmulForward, MoeCombine, MoeCombineBackward, MoeGather, MoeRoute, MoeRouteBackward,
};
use kiln_core::memory::{Component, MemoryModel, StepShapes, Storage, describe_bytes};
use kiln_core::pieces::Pieces;
use kiln_core::{
    AdamWStep, AttentionBackward, AttentionDims, Backend, Error, Graph, HostWork, MatmulBackward, MatmulDims,
    MatmulForward, NormBackward, NormForward, QkNormBackward, QkNormForward, Result, Role, Rotary, Tensor,
};
use math::Real;
use rayon::prelude::*;
use std::marker::PhantomData;

/// One allocation: real numbers or token ids. Allocations live as long as the backend.
enum Allocation<T> {
    Real(Box<[T]>),
    Index(Box<[u32]>),
}

/// An operation recorded by a capture, with its operands.
type Recorded<T> = HostWork<CpuBackend<T>>;

/// The CPU engine, over scalar type `T` (`f32` to train, `f64` for gradient checks).
pub struct CpuBackend<T: Real> {
    allocations: Vec<Allocation<T>>,
    /// Reused working memory of the operations that need some, so that a training step allocates nothing.
    scratch: Vec<T>,
    /// Per-piece partial sums of [`Backend::sum`] and [`Backend::sum_squares`].
    partials: Vec<f64>,
    /// The pieces of a parameter allocation a ZeRO rank said it updates ([`Backend::keep_master_pieces`]). This
    /// engine keeps no master copy, but it holds the rank to the contract of one that does, so that the trainer's
    /// bookkeeping is checked without a GPU: AdamW may update only ranges inside one piece.
    master_pieces: Option<(BufferId, Pieces)>,
    /// The operations of the capture in progress.
    capturing: Option<Vec<Recorded<T>>>,
    /// The graphs captured, by [`Graph`] number.
    graphs: Vec<Vec<Recorded<T>>>,
}

impl<T: Real> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Stands for an optional operand that was not given; it overlaps nothing.
const ABSENT: Tensor = Tensor { buffer: BufferId(u32::MAX), offset: 0, len: 0 };

fn optional(t: Option<Tensor>, len: usize) -> (Tensor, usize) {
    t.map_or((ABSENT, 0), |t| (t, len))
}

/// Elements per piece of a sum: fixed, so that results do not depend on the number of threads.
const SUM_PIECE: usize = 1 << 14;

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            allocations: Vec::new(),
            scratch: Vec::new(),
            partials: Vec::new(),
            master_pieces: None,
            capturing: None,
            graphs: Vec::new(),
        }
    }

    /// While capturing, records `op` (the operation called, with its operands) instead of running it, and returns
    /// true.
    fn recorded(&mut self, op: impl Fn(&mut Self) -> Result<()> + Send + 'static) -> bool {
        match &mut self.capturing {
            Some(ops) => ops.push(Box::new(op)),
            None => return false,
        }
        true
    }

    /// Refuses `op` while capturing: it would act on the host, at capture rather than at replay.
    fn not_capturing(&self, op: &str) -> Result<()> {
        match self.capturing {
            Some(_) => Err(self.invalid(op, "cannot be captured into a graph (it acts on the host)".into())),
            None => Ok(()),
        }
    }

    /// The elements of a real-valued tensor, for direct host access (tests perturb single parameters through it).
    pub fn values_mut(&mut self, t: Tensor) -> Result<&mut [T]> {
        self.real_mut("values_mut", t)
    }

    fn invalid(&self, op: &str, message: String) -> Error {
        Error::backend(self.name(), format!("{op}: {message}"))
    }

    /// Checks that `t` names a real-valued range of exactly `len` elements inside one allocation.
    fn check_real(&self, op: &str, t: Tensor, len: usize) -> Result<()> {
        match self.allocations.get(t.buffer.0 as usize) {
            Some(Allocation::Real(data)) if t.offset + t.len <= data.len() => {}
            Some(Allocation::Real(_)) | None => return Err(self.invalid(op, format!("{t:?} is not a valid tensor"))),
            Some(Allocation::Index(_)) => return Err(self.invalid(op, format!("{t:?} holds token ids, not reals"))),
        }
        if t.len != len {
            return Err(self.invalid(op, format!("{t:?} has {} elements, expected {len}", t.len)));
        }
        Ok(())
    }

    fn check_index(&self, op: &str, t: Tensor, len: usize) -> Result<()> {
        match self.allocations.get(t.buffer.0 as usize) {
            Some(Allocation::Index(data)) if t.offset + t.len <= data.len() && t.len == len => Ok(()),
            _ => Err(self.invalid(op, format!("{t:?} is not a token tensor of {len} elements"))),
        }
    }

    /// Checks an operation's operands: each real tensor has its expected length, and no output overlaps any
    /// other operand. Only after this may the operation take slices of them. Absent optional operands (see
    /// [`optional`]) are skipped.
    fn check(&self, op: &str, outputs: &[(Tensor, usize)], inputs: &[(Tensor, usize)]) -> Result<()> {
        for &(t, len) in outputs.iter().chain(inputs).filter(|(t, _)| *t != ABSENT) {
            self.check_real(op, t, len)?;
        }
        if let Some((out, other)) = first_overlap(outputs.iter().map(|(t, _)| t), inputs.iter().map(|(t, _)| t)) {
            return Err(self.invalid(op, format!("output {out:?} overlaps operand {other:?}")));
        }
        Ok(())
    }

    fn base(&self, t: Tensor) -> *mut T {
        match &self.allocations[t.buffer.0 as usize] {
            Allocation::Real(data) => data.as_ptr() as *mut T,
            Allocation::Index(_) => unreachable!("checked by check_real"),
        }
    }

    /// # Safety
    /// `t` must have passed [`Self::check`] as an input of the current operation.
    unsafe fn read(&self, t: Tensor) -> &[T] {
        unsafe { std::slice::from_raw_parts(self.base(t).add(t.offset), t.len) }
    }

    /// # Safety
    /// `t` must have passed [`Self::check`] as an output of the current operation (so nothing else refers to its
    /// elements while the slice lives), and the backend must be borrowed mutably for as long.
    #[allow(clippy::mut_from_ref)]
    unsafe fn write(&self, t: Tensor) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.base(t).add(t.offset), t.len) }
    }

    fn indices(&self, t: Tensor) -> &[u32] {
        match &self.allocations[t.buffer.0 as usize] {
            Allocation::Index(data) => &data[t.offset..t.offset + t.len],
            Allocation::Real(_) => unreachable!("checked by check_index"),
        }
    }

    /// # Safety
    /// As [`Self::write`], for a token-id tensor that passed [`Self::check_with_indices`] as an output.
    #[allow(clippy::mut_from_ref)]
    unsafe fn write_indices(&self, t: Tensor) -> &mut [u32] {
        match &self.allocations[t.buffer.0 as usize] {
            Allocation::Index(data) => unsafe {
                std::slice::from_raw_parts_mut((data.as_ptr() as *mut u32).add(t.offset), t.len)
            },
            Allocation::Real(_) => unreachable!("checked by check_index"),
        }
    }

    /// [`Self::check`] for an operation with token-id operands as well, `index_outputs` and `index_inputs`: no
    /// output overlaps any other operand of either kind.
    fn check_with_indices(
        &self,
        op: &str,
        outputs: &[(Tensor, usize)],
        inputs: &[(Tensor, usize)],
        index_outputs: &[(Tensor, usize)],
        index_inputs: &[(Tensor, usize)],
    ) -> Result<()> {
        for &(t, len) in index_outputs.iter().chain(index_inputs) {
            self.check_index(op, t, len)?;
        }
        self.check(op, outputs, inputs)?;
        let all_outputs = outputs.iter().chain(index_outputs).map(|(t, _)| t);
        if let Some((out, other)) = first_overlap(all_outputs, inputs.iter().chain(index_inputs).map(|(t, _)| t)) {
            return Err(self.invalid(op, format!("output {out:?} overlaps operand {other:?}")));
        }
        Ok(())
    }

    /// Checks a dispatch of `slots` slots that [`Backend::moe_route`] wrote, before an operation follows it: `offsets`
    /// runs from 0 to the slots without falling, and `order` and `place` (where given) are within the slots and,
    /// both given, inverse permutations. Checked tensors of token ids: this never panics.
    fn check_dispatch(
        &self,
        op: &str,
        slots: usize,
        order: Option<Tensor>,
        place: Option<Tensor>,
        offsets: Option<Tensor>,
    ) -> Result<()> {
        let bad = |what: &str| Err(self.invalid(op, format!("{what} is not a dispatch that moe_route wrote")));
        if let Some(o) = offsets.map(|t| self.indices(t)) {
            if o.first() != Some(&0) || o.windows(2).any(|w| w[0] > w[1]) || o.last() != Some(&(slots as u32)) {
                return bad("offsets");
            }
        }
        let (order, place) = (order.map(|t| self.indices(t)), place.map(|t| self.indices(t)));
        let outside = |i: &[u32]| i.iter().any(|&s| s as usize >= slots);
        if order.is_some_and(outside) || place.is_some_and(outside) {
            return bad("order or place");
        }
        if let (Some(order), Some(place)) = (order, place) {
            if order.iter().enumerate().any(|(p, &s)| place[s as usize] as usize != p) {
                return bad("order and place");
            }
        }
        Ok(())
    }

    /// Mutable access to a whole allocation's range for the memory operations, which have a single operand.
    fn real_mut(&mut self, op: &str, t: Tensor) -> Result<&mut [T]> {
        self.check_real(op, t, t.len)?;
        match &mut self.allocations[t.buffer.0 as usize] {
            Allocation::Real(data) => Ok(&mut data[t.offset..t.offset + t.len]),
            Allocation::Index(_) => unreachable!("checked by check_real"),
        }
    }

    fn real_ref(&self, op: &str, t: Tensor) -> Result<&[T]> {
        self.check_real(op, t, t.len)?;
        // SAFETY: a single shared operand, checked above.
        Ok(unsafe { self.read(t) })
    }

    /// A fixed-order sum of `f(x)` over the elements of `t`, accumulated in f64.
    fn reduce(&mut self, op: &str, t: Tensor, f: impl Fn(f64) -> f64 + Sync) -> Result<f64> {
        let mut partials = std::mem::take(&mut self.partials);
        let data = self.real_ref(op, t)?;
        data.par_chunks(SUM_PIECE)
            .map(|piece| piece.iter().map(|&x| f(x.to_f64())).sum::<f64>())
            .collect_into_vec(&mut partials);
        let total: f64 = partials.iter().sum();
        self.partials = partials;
        Ok(total)
    }

    /// A zeroed working buffer of `len` elements (reusing the last one's memory); more than the host can give is an
    /// out-of-memory error.
    fn scratch(&mut self, len: usize) -> Result<Vec<T>> {
        let mut s = std::mem::take(&mut self.scratch);
        s.clear();
        s.try_reserve_exact(len).map_err(|_| self.out_of_memory(len.saturating_mul(std::mem::size_of::<T>())))?;
        s.resize(len, T::zero());
        Ok(s)
    }

    fn out_of_memory(&self, bytes: usize) -> Error {
        let message = format!("cannot allocate {}", describe_bytes(bytes as u64));
        Error::OutOfMemory { backend: self.name(), message }
    }
}

/// The CPU engine's memory: every real number in `T`, token ids in 32 bits. Beyond its allocations, the one piece
/// of working memory worth stating is attention's, a workspace per thread that every layer reuses (the norms' and
/// sums' partials are a few rows). The ranks of a job are threads of one process and share the host's memory.
pub struct CpuMemory<T>(PhantomData<T>);

impl<T: Real> CpuMemory<T> {
    pub fn new() -> Self {
        CpuMemory(PhantomData)
    }
}

impl<T: Real> Default for CpuMemory<T> {
    fn default() -> Self {
        CpuMemory::new()
    }
}

impl<T: Real> MemoryModel for CpuMemory<T> {
    fn engine(&self) -> String {
        format!("cpu ({})", std::any::type_name::<T>())
    }

    fn storage(&self) -> Storage {
        let real = std::mem::size_of::<T>();
        Storage { param: real, master: 0, grad: real, activation: real, stat: real, opt_state: real, index: 4 }
    }

    fn overheads(&self, step: &StepShapes, _: usize) -> Vec<Component> {
        let threads = rayon::current_num_threads();
        let bytes = attention::scratch_len(&step.attention, threads) * std::mem::size_of::<T>();
        vec![Component::outside(format!("attention working memory ({threads} threads)"), bytes as u64)]
    }

    fn shared_by_ranks(&self) -> bool {
        true
    }

    fn outside_exists_at_start(&self) -> bool {
        false
    }
}

// SAFETY: the backend exclusively owns its allocations; the raw pointers it derives never outlive an operation.
unsafe impl<T: Real> Send for CpuBackend<T> {}

impl<T: Real> Backend for CpuBackend<T> {
    fn name(&self) -> String {
        if std::mem::size_of::<T>() == 8 { "cpu-f64".into() } else { "cpu".into() }
    }

    fn alloc(&mut self, len: usize, role: Role) -> Result<Tensor> {
        self.not_capturing("alloc")?;
        let id = BufferId(
            u32::try_from(self.allocations.len()).map_err(|_| self.invalid("alloc", "too many allocations".into()))?,
        );
        // Asked of the allocator first, so that more than the host can give is an error rather than an abort. The
        // probe reserves address space only; `vec!` then takes zeroed pages as it would have.
        let bytes = len.saturating_mul(if role == Role::Index { 4 } else { std::mem::size_of::<T>() });
        if Vec::<u8>::new().try_reserve_exact(bytes).is_err() {
            return Err(self.out_of_memory(bytes));
        }
        self.allocations.push(match role {
            Role::Index => Allocation::Index(vec![0; len].into_boxed_slice()),
            _ => Allocation::Real(vec![T::zero(); len].into_boxed_slice()),
        });
        Ok(Tensor { buffer: id, offset: 0, len })
    }

    fn upload(&mut self, dst: Tensor, src: &[f32]) -> Result<()> {
        self.not_capturing("upload")?;
        if src.len() != dst.len {
            return Err(self.invalid("upload", format!("{} values for a tensor of {}", src.len(), dst.len)));
        }
        for (d, &s) in self.real_mut("upload", dst)?.iter_mut().zip(src) {
            *d = T::from_f32(s);
        }
        Ok(())
    }

    fn download(&mut self, src: Tensor, dst: &mut [f32]) -> Result<()> {
        self.not_capturing("download")?;
        if dst.len() != src.len {
            return Err(self.invalid("download", format!("{} values from a tensor of {}", dst.len(), src.len)));
        }
        for (d, &s) in dst.iter_mut().zip(self.real_ref("download", src)?) {
            *d = s.to_f32();
        }
        Ok(())
    }

    fn upload_indices(&mut self, dst: Tensor, src: &[u32]) -> Result<()> {
        self.not_capturing("upload_indices")?;
        self.check_index("upload_indices", dst, src.len())?;
        match &mut self.allocations[dst.buffer.0 as usize] {
            Allocation::Index(data) => data[dst.offset..dst.offset + dst.len].copy_from_slice(src),
            Allocation::Real(_) => unreachable!("checked by check_index"),
        }
        Ok(())
    }

    fn zero(&mut self, t: Tensor) -> Result<()> {
        if self.recorded(move |b| b.zero(t)) {
            return Ok(());
        }
        self.real_mut("zero", t)?.par_chunks_mut(SUM_PIECE).for_each(|c| c.fill(T::zero()));
        Ok(())
    }

    fn add(&mut self, dst: Tensor, src: Tensor) -> Result<()> {
        if self.recorded(move |b| b.add(dst, src)) {
            return Ok(());
        }
        let op = "add";
        if dst.len != src.len {
            return Err(self.invalid(op, format!("{dst:?} and {src:?} differ in length")));
        }
        self.check(op, &[(dst, dst.len)], &[(src, src.len)])?;
        // SAFETY: checked above: both real, in range, and apart.
        let (d, s) = unsafe { (self.write(dst), self.read(src)) };
        d.par_chunks_mut(SUM_PIECE).zip(s.par_chunks(SUM_PIECE)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = *d + s);
        });
        Ok(())
    }

    fn sum(&mut self, t: Tensor) -> Result<f32> {
        self.not_capturing("sum")?;
        self.reduce("sum", t, |x| x).map(|total| total as f32)
    }

    fn sum_squares(&mut self, t: Tensor) -> Result<f32> {
        self.not_capturing("sum_squares")?;
        self.reduce("sum_squares", t, |x| x * x).map(|total| total as f32)
    }

    fn sum_into(&mut self, t: Tensor, squares: bool, out: Tensor) -> Result<()> {
        if self.recorded(move |b| b.sum_into(t, squares, out)) {
            return Ok(());
        }
        let op = "sum_into";
        self.check(op, &[(out, 1)], &[(t, t.len)])?;
        let total = if squares { self.reduce(op, t, |x| x * x)? } else { self.reduce(op, t, |x| x)? };
        self.real_mut(op, out)?[0] = T::from_f64(total);
        Ok(())
    }

    fn begin_capture(&mut self) -> Result<bool> {
        self.not_capturing("begin_capture")?;
        self.capturing = Some(Vec::new());
        Ok(true)
    }

    fn end_capture(&mut self) -> Result<Graph> {
        let ops = self.capturing.take().ok_or_else(|| self.invalid("end_capture", "no capture in progress".into()))?;
        let id = u32::try_from(self.graphs.len()).map_err(|_| self.invalid("end_capture", "too many graphs".into()))?;
        self.graphs.push(ops);
        Ok(Graph(id))
    }

    fn abandon_capture(&mut self) -> Result<()> {
        match self.capturing.take() {
            Some(_) => Ok(()),
            None => Err(self.invalid("abandon_capture", "no capture in progress".into())),
        }
    }

    fn capturing(&self) -> bool {
        self.capturing.is_some()
    }

    fn capture_host(&mut self, work: HostWork<Self>) -> Result<()> {
        match self.recorded(work) {
            true => Ok(()),
            false => Err(self.invalid("capture_host", "no capture in progress".into())),
        }
    }

    fn replay(&mut self, graph: Graph) -> Result<()> {
        self.not_capturing("replay")?;
        let i = graph.0 as usize;
        let ops = match self.graphs.get_mut(i) {
            Some(ops) => std::mem::take(ops),
            None => return Err(self.invalid("replay", format!("no graph {graph:?}"))),
        };
        let run = ops.iter().try_for_each(|op| op(self));
        self.graphs[i] = ops;
        run
    }

    fn synchronize(&mut self) -> Result<()> {
        self.not_capturing("synchronize")
    }

    fn memory_model(&self) -> Box<dyn MemoryModel> {
        Box::new(CpuMemory::<T>::new())
    }

    fn free_bytes(&self) -> Option<u64> {
        kiln_core::memory::host_available_bytes()
    }

    fn allocated_bytes(&self) -> u64 {
        let elements = |a: &Allocation<T>| match a {
            Allocation::Real(d) => d.len() * std::mem::size_of::<T>(),
            Allocation::Index(d) => d.len() * 4,
        };
        self.allocations.iter().map(elements).sum::<usize>() as u64
    }

    fn keep_master_pieces(&mut self, params: Tensor, pieces: &[std::ops::Range<usize>]) -> Result<()> {
        self.not_capturing("keep_master_pieces")?;
        let op = "keep_master_pieces";
        self.check_real(op, params, params.len)?;
        let kept = Pieces::of_tensor(params, pieces, params.offset + params.len).map_err(|e| self.invalid(op, e))?;
        self.master_pieces = Some((params.buffer, kept));
        Ok(())
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
        if self.recorded(move |b| b.encoder_forward(out, tokens, wte, wpe, batch, time, c)) {
            return Ok(());
        }
        let op = "encoder_forward";
        let vocab = wte.len / c.max(1);
        let positions = wpe.map_or(0, |p| p.len / c.max(1));
        self.check(op, &[(out, batch * time * c)], &[(wte, vocab * c), optional(wpe, positions * c)])?;
        self.check_index(op, tokens, batch * time)?;
        self.check_tokens(op, tokens, vocab, false)?;
        if wpe.is_some() && time > positions {
            return Err(self.invalid(op, format!("{time} positions but only {positions} learned")));
        }
        // SAFETY: checked above.
        unsafe {
            encoder::forward(self.write(out), self.indices(tokens), self.read(wte), wpe.map(|p| self.read(p)), time, c)
        };
        Ok(())
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
        if self.recorded(move |b| b.encoder_backward(dwte, dwpe, dout, tokens, batch, time, c)) {
            return Ok(());
        }
        let op = "encoder_backward";
        let vocab = dwte.len / c.max(1);
        let positions = dwpe.map_or(0, |p| p.len / c.max(1));
        self.check(op, &[(dwte, vocab * c), optional(dwpe, positions * c)], &[(dout, batch * time * c)])?;
        self.check_index(op, tokens, batch * time)?;
        self.check_tokens(op, tokens, vocab, false)?;
        if dwpe.is_some() && time > positions {
            return Err(self.invalid(op, format!("{time} positions but only {positions} learned")));
        }
        // SAFETY: checked above.
        unsafe {
            encoder::backward(
                self.write(dwte),
                dwpe.map(|p| self.write(p)),
                self.read(dout),
                self.indices(tokens),
                time,
                c,
            )
        };
        Ok(())
    }

    fn norm_forward(&mut self, op: NormForward) -> Result<()> {
        if self.recorded(move |b| b.norm_forward(op)) {
            return Ok(());
        }
        let name = "norm_forward";
        let NormForward { out, mean, rstd, inp, residual, weight, bias, d } = op;
        if let Some(problem) = d.operand_problem(mean, bias) {
            return Err(self.invalid(name, problem));
        }
        let (rows, c, n) = (d.rows, d.c, d.rows * d.c);
        let sum = residual.map(|r| r.sum);
        let other = residual.map(|r| r.other);
        self.check(
            name,
            &[(out, n), optional(mean, rows), (rstd, rows), optional(sum, n)],
            &[(inp, n), optional(other, n), (weight, c), optional(bias, c)],
        )?;
        // SAFETY: checked above.
        unsafe {
            let stats = norm::Stats { mean: mean.map(|m| self.write(m)), rstd: self.write(rstd) };
            let residual = residual.map(|r| (self.read(r.other), self.write(r.sum)));
            norm::forward(
                self.write(out),
                stats,
                self.read(inp),
                residual,
                self.read(weight),
                bias.map(|b| self.read(b)),
                c,
                T::from_f32(d.eps),
            );
        }
        Ok(())
    }

    fn norm_backward(&mut self, op: NormBackward) -> Result<()> {
        if self.recorded(move |b| b.norm_backward(op)) {
            return Ok(());
        }
        let name = "norm_backward";
        let NormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd, dinp_sums, d } = op;
        if let Some(problem) = d.operand_problem(mean, dbias) {
            return Err(self.invalid(name, problem));
        }
        let (rows, c, n) = (d.rows, d.c, d.rows * d.c);
        self.check(
            name,
            &[(dinp, n), (dweight, c), optional(dbias, c), optional(dinp_sums, c)],
            &[(dout, n), (inp, n), (weight, c), optional(mean, rows), (rstd, rows)],
        )?;
        let mut scratch = std::mem::take(&mut self.scratch);
        // SAFETY: checked above.
        unsafe {
            norm::backward(
                d.kind,
                self.write(dinp),
                self.write(dweight),
                dbias.map(|b| self.write(b)),
                self.read(dout),
                self.read(inp),
                self.read(weight),
                mean.map_or(&[][..], |m| self.read(m)),
                self.read(rstd),
                dinp_sums.map(|s| self.write(s)),
                c,
                &mut scratch,
            );
        }
        self.scratch = scratch;
        Ok(())
    }

    fn matmul_forward(&mut self, op: MatmulForward) -> Result<()> {
        if self.recorded(move |b| b.matmul_forward(op)) {
            return Ok(());
        }
        let MatmulForward { out, inp, weight, bias, gelu_pre, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        self.check(
            "matmul_forward",
            &[(out, rows * c_out), optional(gelu_pre, rows * c_out)],
            &[(inp, rows * c_in), (weight, c_out * c_in), optional(bias, c_out)],
        )?;
        // SAFETY: checked above.
        unsafe {
            matmul::forward(
                self.write(out),
                self.read(inp),
                self.read(weight),
                bias.map(|b| self.read(b)),
                gelu_pre.map(|p| self.write(p)),
                d,
            );
        }
        Ok(())
    }

    fn matmul_backward(&mut self, op: MatmulBackward) -> Result<()> {
        if self.recorded(move |b| b.matmul_backward(op)) {
            return Ok(());
        }
        let name = "matmul_backward";
        if let Some(problem) = op.operand_problem() {
            return Err(self.invalid(name, problem));
        }
        let MatmulBackward { dinp, dweight, dbias, dout, inp, weight, gelu_pre, gelu_dbias, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        self.check(
            name,
            &[(dinp, rows * c_in), (dweight, c_out * c_in), optional(dbias, c_out), optional(gelu_dbias, c_in)],
            &[(dout, rows * c_out), (inp, rows * c_in), (weight, c_out * c_in), optional(gelu_pre, rows * c_in)],
        )?;
        // SAFETY: checked above.
        unsafe {
            matmul::backward(
                self.write(dinp),
                self.write(dweight),
                dbias.map(|b| self.write(b)),
                self.read(dout),
                self.read(inp),
                self.read(weight),
                gelu_pre.map(|p| (self.read(p), gelu_dbias.map(|b| self.write(b)))),
                d,
            );
        }
        Ok(())
    }

    fn gelu_forward(&mut self, out: Tensor, pre: Tensor) -> Result<()> {
        if self.recorded(move |b| b.gelu_forward(out, pre)) {
            return Ok(());
        }
        self.check("gelu_forward", &[(out, pre.len)], &[(pre, pre.len)])?;
        // SAFETY: checked above.
        unsafe { matmul::gelu_forward(self.write(out), self.read(pre)) };
        Ok(())
    }

    fn swiglu_forward(&mut self, out: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()> {
        if self.recorded(move |b| b.swiglu_forward(out, inp, rows, ffn)) {
            return Ok(());
        }
        self.check("swiglu_forward", &[(out, rows * ffn)], &[(inp, rows * 2 * ffn)])?;
        // SAFETY: checked above.
        unsafe { swiglu::forward(self.write(out), self.read(inp), ffn) };
        Ok(())
    }

    fn swiglu_backward(&mut self, dinp: Tensor, dout: Tensor, inp: Tensor, rows: usize, ffn: usize) -> Result<()> {
        if self.recorded(move |b| b.swiglu_backward(dinp, dout, inp, rows, ffn)) {
            return Ok(());
        }
        self.check("swiglu_backward", &[(dinp, rows * 2 * ffn)], &[(dout, rows * ffn), (inp, rows * 2 * ffn)])?;
        // SAFETY: checked above.
        unsafe { swiglu::backward(self.write(dinp), self.read(dout), self.read(inp), ffn) };
        Ok(())
    }

    fn moe_route(&mut self, op: MoeRoute) -> Result<()> {
        if self.recorded(move |b| b.moe_route(op)) {
            return Ok(());
        }
        let name = "moe_route";
        let MoeRoute { probs, weights, chosen, order, place, offsets, logits, normalize, balance, d } = op;
        if let Some(problem) = d.problem() {
            return Err(self.invalid(name, problem));
        }
        let (dense, slots) = (d.rows * d.experts, d.slots());
        let (gradient, dloss) = (balance.map(|b| b.gradient), balance.map(|b| b.dloss));
        let (sums, terms) = (balance.map(|b| b.probability_sums), balance.and_then(|b| b.terms));
        let per_expert = |t: Option<Tensor>| optional(t, d.experts);
        self.check_with_indices(
            name,
            &[(probs, dense), (weights, slots), per_expert(gradient), per_expert(sums), per_expert(terms)],
            &[(logits, dense), optional(dloss, 1)],
            &[(chosen, slots), (order, slots), (place, slots), (offsets, d.experts + 1)],
            &[],
        )?;
        // SAFETY: checked above.
        unsafe {
            let chosen = self.write_indices(chosen);
            experts::route(self.write(probs), self.write(weights), chosen, self.read(logits), normalize, d);
            let offsets = self.write_indices(offsets);
            experts::dispatch(self.write_indices(order), self.write_indices(place), offsets, chosen);
            if let Some(b) = balance {
                let step = self.read(b.dloss)[0] * T::from_f32(b.scale);
                let gradient = self.write(b.gradient);
                for (g, run) in gradient.iter_mut().zip(offsets.windows(2)) {
                    *g = *g + step * T::from_f64(f64::from(run[1] - run[0]));
                }
                let sums = self.write(b.probability_sums);
                for row in self.read(probs).chunks(d.experts) {
                    for (s, &p) in sums.iter_mut().zip(row) {
                        *s = *s + p;
                    }
                }
                if let Some(terms) = b.terms {
                    for ((t, &g), &s) in self.write(terms).iter_mut().zip(gradient.iter()).zip(sums.iter()) {
                        *t = *t + g * s;
                    }
                }
            }
        }
        Ok(())
    }

    fn moe_route_backward(&mut self, op: MoeRouteBackward) -> Result<()> {
        if self.recorded(move |b| b.moe_route_backward(op)) {
            return Ok(());
        }
        let name = "moe_route_backward";
        let MoeRouteBackward { dlogits, dweights, probs, weights, chosen, normalize, balance, d } = op;
        if let Some(problem) = d.problem() {
            return Err(self.invalid(name, problem));
        }
        let (dense, slots) = (d.rows * d.experts, d.slots());
        self.check_with_indices(
            name,
            &[(dlogits, dense)],
            &[(dweights, slots), (probs, dense), (weights, slots), optional(balance, d.experts)],
            &[],
            &[(chosen, slots)],
        )?;
        if self.indices(chosen).iter().any(|&e| e as usize >= d.experts) {
            return Err(self.invalid(name, "chosen names an expert past the last".into()));
        }
        // SAFETY: checked above.
        unsafe {
            experts::route_backward(
                self.write(dlogits),
                self.read(dweights),
                self.read(probs),
                self.read(weights),
                self.indices(chosen),
                normalize,
                balance.map(|b| self.read(b)),
                d,
            )
        };
        Ok(())
    }

    fn moe_gather(&mut self, op: MoeGather) -> Result<()> {
        if self.recorded(move |b| b.moe_gather(op)) {
            return Ok(());
        }
        let name = "moe_gather";
        let MoeGather { out, inp, order, width, d } = op;
        if let Some(problem) = d.problem_with_rows(width) {
            return Err(self.invalid(name, problem));
        }
        let slots = d.slots();
        self.check_with_indices(name, &[(out, slots * width)], &[(inp, d.rows * width)], &[], &[(order, slots)])?;
        self.check_dispatch(name, slots, Some(order), None, None)?;
        // SAFETY: checked above.
        unsafe { experts::gather(self.write(out), self.read(inp), self.indices(order), width, d.top_k) };
        Ok(())
    }

    fn moe_combine(&mut self, op: MoeCombine) -> Result<()> {
        if self.recorded(move |b| b.moe_combine(op)) {
            return Ok(());
        }
        let name = "moe_combine";
        let MoeCombine { out, expert_out, weights, place, accumulate, width, d } = op;
        if let Some(problem) = d.problem_with_rows(width) {
            return Err(self.invalid(name, problem));
        }
        let slots = d.slots();
        self.check_with_indices(
            name,
            &[(out, d.rows * width)],
            &[(expert_out, slots * width), optional(weights, slots)],
            &[],
            &[(place, slots)],
        )?;
        self.check_dispatch(name, slots, None, Some(place), None)?;
        // SAFETY: checked above.
        unsafe {
            let weights = weights.map(|w| self.read(w));
            experts::combine(
                self.write(out),
                self.read(expert_out),
                weights,
                self.indices(place),
                accumulate,
                width,
                d.top_k,
            )
        };
        Ok(())
    }

    fn moe_combine_backward(&mut self, op: MoeCombineBackward) -> Result<()> {
        if self.recorded(move |b| b.moe_combine_backward(op)) {
            return Ok(());
        }
        let name = "moe_combine_backward";
        let MoeCombineBackward { dexpert_out, dweights, dout, expert_out, weights, order, place, width, d } = op;
        if let Some(problem) = d.problem_with_rows(width) {
            return Err(self.invalid(name, problem));
        }
        let slots = d.slots();
        self.check_with_indices(
            name,
            &[(dexpert_out, slots * width), (dweights, slots)],
            &[(dout, d.rows * width), (expert_out, slots * width), (weights, slots)],
            &[],
            &[(order, slots), (place, slots)],
        )?;
        self.check_dispatch(name, slots, Some(order), Some(place), None)?;
        // SAFETY: checked above.
        unsafe {
            experts::combine_backward(
                self.write(dexpert_out),
                self.write(dweights),
                self.read(dout),
                self.read(expert_out),
                self.read(weights),
                self.indices(order),
                self.indices(place),
                width,
                d.top_k,
            )
        };
        Ok(())
    }

    fn expert_matmul_forward(&mut self, op: ExpertMatmulForward) -> Result<()> {
        if self.recorded(move |b| b.expert_matmul_forward(op)) {
            return Ok(());
        }
        let name = "expert_matmul_forward";
        let ExpertMatmulForward { out, inp, weight, offsets, experts, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        self.check_with_indices(
            name,
            &[(out, rows * c_out)],
            &[(inp, rows * c_in), (weight, experts * c_out * c_in)],
            &[],
            &[(offsets, experts + 1)],
        )?;
        self.check_dispatch(name, rows, None, None, Some(offsets))?;
        // SAFETY: checked above.
        let (out, inp, weight) = unsafe { (self.write(out), self.read(inp), self.read(weight)) };
        for (e, run) in self.indices(offsets).windows(2).enumerate() {
            let (first, n) = (run[0] as usize, (run[1] - run[0]) as usize);
            let out = &mut out[first * c_out..][..n * c_out];
            let weight = &weight[e * c_out * c_in..][..c_out * c_in];
            matmul::forward(out, &inp[first * c_in..][..n * c_in], weight, None, None, MatmulDims { rows: n, ..d });
        }
        Ok(())
    }

    fn expert_matmul_backward(&mut self, op: ExpertMatmulBackward) -> Result<()> {
        if self.recorded(move |b| b.expert_matmul_backward(op)) {
            return Ok(());
        }
        let name = "expert_matmul_backward";
        let ExpertMatmulBackward { dinp, dweight, dout, inp, weight, offsets, experts, d } = op;
        let MatmulDims { rows, c_in, c_out } = d;
        let matrices = experts * c_out * c_in;
        self.check_with_indices(
            name,
            &[(dinp, rows * c_in), (dweight, matrices)],
            &[(dout, rows * c_out), (inp, rows * c_in), (weight, matrices)],
            &[],
            &[(offsets, experts + 1)],
        )?;
        self.check_dispatch(name, rows, None, None, Some(offsets))?;
        // SAFETY: checked above.
        let (dinp, dweight) = unsafe { (self.write(dinp), self.write(dweight)) };
        // SAFETY: checked above.
        let (dout, inp, weight) = unsafe { (self.read(dout), self.read(inp), self.read(weight)) };
        for (e, run) in self.indices(offsets).windows(2).enumerate() {
            let (first, n) = (run[0] as usize, (run[1] - run[0]) as usize);
            let matrix = e * c_out * c_in..(e + 1) * c_out * c_in;
            matmul::backward(
                &mut dinp[first * c_in..][..n * c_in],
                &mut dweight[matrix.clone()],
                None,
                &dout[first * c_out..][..n * c_out],
                &inp[first * c_in..][..n * c_in],
                &weight[matrix],
                None,
                MatmulDims { rows: n, ..d },
            );
        }
        Ok(())
    }

    fn rope(&mut self, op: Rotary) -> Result<()> {
        if self.recorded(move |b| b.rope(op)) {
            return Ok(());
        }
        let name = "rope";
        if let Some(problem) = op.problem() {
            return Err(self.invalid(name, problem));
        }
        let d = op.d;
        // The rotated activation is read and written by this one operand; the table is only read.
        self.check(name, &[(op.qkv, d.batch * d.time * d.qkv_width())], &[(op.table, op.table.len)])?;
        // SAFETY: checked above.
        unsafe { rope::apply(self.write(op.qkv), self.read(op.table), &op) };
        Ok(())
    }

    fn qk_norm_forward(&mut self, op: QkNormForward) -> Result<()> {
        if self.recorded(move |b| b.qk_norm_forward(op)) {
            return Ok(());
        }
        let name = "qk_norm_forward";
        let QkNormForward { out, rstd, inp, weight, eps, d } = op;
        if let Some(problem) = d.problem() {
            return Err(self.invalid(name, problem));
        }
        let [rows, weights, stats] = qk_norm_lens(&d);
        self.check(name, &[(out, rows), (rstd, stats)], &[(inp, rows), (weight, weights)])?;
        // SAFETY: checked above.
        unsafe {
            norm::qk_forward(self.write(out), self.write(rstd), self.read(inp), self.read(weight), &d, T::from_f32(eps))
        };
        Ok(())
    }

    fn qk_norm_backward(&mut self, op: QkNormBackward) -> Result<()> {
        if self.recorded(move |b| b.qk_norm_backward(op)) {
            return Ok(());
        }
        let name = "qk_norm_backward";
        let QkNormBackward { dqkv, dweight, inp, weight, rstd, d } = op;
        if let Some(problem) = d.problem() {
            return Err(self.invalid(name, problem));
        }
        let [rows, weights, stats] = qk_norm_lens(&d);
        self.check(name, &[(dqkv, rows), (dweight, weights)], &[(inp, rows), (weight, weights), (rstd, stats)])?;
        let mut scratch = std::mem::take(&mut self.scratch);
        // SAFETY: checked above.
        unsafe {
            let (dw, x, w, r) = (self.write(dweight), self.read(inp), self.read(weight), self.read(rstd));
            norm::qk_backward(self.write(dqkv), dw, x, w, r, &d, &mut scratch);
        }
        self.scratch = scratch;
        Ok(())
    }

    fn attention_forward(&mut self, out: Tensor, lse: Tensor, qkv: Tensor, d: AttentionDims) -> Result<()> {
        if self.recorded(move |b| b.attention_forward(out, lse, qkv, d)) {
            return Ok(());
        }
        let (op, rows, c) = ("attention_forward", d.batch * d.time, d.channels());
        if let Some(problem) = d.problem() {
            return Err(self.invalid(op, problem));
        }
        self.check(op, &[(out, rows * c), (lse, d.batch * d.heads * d.time)], &[(qkv, rows * d.qkv_width())])?;
        let threads = rayon::current_num_threads();
        let mut scratch = self.scratch(attention::scratch_len(&d, threads))?;
        // SAFETY: checked above.
        unsafe { attention::forward(self.write(out), self.write(lse), self.read(qkv), d, &mut scratch, threads) };
        self.scratch = scratch;
        Ok(())
    }

    fn attention_backward(&mut self, op: AttentionBackward) -> Result<()> {
        if self.recorded(move |b| b.attention_backward(op)) {
            return Ok(());
        }
        let AttentionBackward { dqkv, dout, qkv, out, lse, dbias, d } = op;
        let (op, rows, c, w) = ("attention_backward", d.batch * d.time, d.channels(), d.qkv_width());
        if let Some(problem) = d.problem() {
            return Err(self.invalid(op, problem));
        }
        self.check(
            op,
            &[(dqkv, rows * w), optional(dbias, w)],
            &[(dout, rows * c), (qkv, rows * w), (out, rows * c), (lse, d.batch * d.heads * d.time)],
        )?;
        let threads = rayon::current_num_threads();
        let mut scratch = self.scratch(attention::scratch_len(&d, threads))?;
        // SAFETY: checked above.
        unsafe {
            attention::backward(
                self.write(dqkv),
                self.read(dout),
                self.read(qkv),
                self.read(out),
                self.read(lse),
                d,
                &mut scratch,
                threads,
            )
        };
        self.scratch = scratch;
        if let Some(dbias) = dbias {
            // SAFETY: checked above.
            unsafe { math::add_column_sums(self.write(dbias), self.read(dqkv)) };
        }
        Ok(())
    }

    fn attention_decode(&mut self, out: Tensor, qkv: Tensor, pos: usize, d: AttentionDims) -> Result<()> {
        if self.recorded(move |b| b.attention_decode(out, qkv, pos, d)) {
            return Ok(());
        }
        let op = "attention_decode";
        let c = d.channels();
        if d.batch != 1 || pos >= d.time {
            return Err(self.invalid(op, format!("position {pos} of one sequence of {} (batch {})", d.time, d.batch)));
        }
        if let Some(problem) = d.problem() {
            return Err(self.invalid(op, problem));
        }
        self.check(op, &[(out, c)], &[(qkv, d.time * d.qkv_width())])?;
        let mut scores = self.scratch(d.time)?;
        // SAFETY: checked above.
        unsafe { attention::decode(self.write(out), self.read(qkv), pos, d, &mut scores) };
        self.scratch = scores;
        Ok(())
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
        if self.recorded(move |b| b.classifier(logits, losses, targets, rows, vocab, padded_vocab, dloss)) {
            return Ok(());
        }
        let op = "classifier";
        if vocab == 0 || vocab > padded_vocab {
            return Err(self.invalid(op, format!("vocabulary {vocab} does not fit in {padded_vocab} logits")));
        }
        let (dloss, dloss_len) = optional(dloss, 1);
        self.check(op, &[(logits, rows * padded_vocab), (losses, rows)], &[(dloss, dloss_len)])?;
        self.check_index(op, targets, rows)?;
        self.check_tokens(op, targets, vocab, true)?;
        // SAFETY: checked above.
        unsafe {
            let dloss = (dloss != ABSENT).then(|| self.read(dloss)[0]);
            classifier::forward(
                self.write(logits),
                self.write(losses),
                self.indices(targets),
                vocab,
                padded_vocab,
                dloss,
            )
        };
        Ok(())
    }

    fn adamw(&mut self, params: Tensor, grads: Tensor, m: Tensor, v: Tensor, step: &AdamWStep) -> Result<()> {
        let step = *step;
        if self.recorded(move |b| b.adamw(params, grads, m, v, &step)) {
            return Ok(());
        }
        let n = params.len;
        self.check("adamw", &[(params, n), (m, n), (v, n)], &[(grads, n), (step.values, 3)])?;
        if let Some((buffer, pieces)) = &self.master_pieces {
            let range = params.offset..params.offset + n;
            if *buffer == params.buffer && pieces.packed_index(range.clone()).is_none() {
                let why = format!("elements {range:?} are not all in one piece of the master weights kept");
                return Err(self.invalid("adamw", why));
            }
        }
        // SAFETY: checked above.
        unsafe {
            let values = self.read(step.values);
            adamw::update(self.write(params), self.read(grads), self.write(m), self.write(v), &step, values)
        };
        Ok(())
    }
}

impl<T: Real> CpuBackend<T> {
    /// Token ids index embedding rows and targets index logits: an id outside the vocabulary is an error, not an
    /// out-of-bounds access.
    fn check_tokens(&self, op: &str, t: Tensor, vocab: usize, allow_ignore: bool) -> Result<()> {
        let ids = self.indices(t);
        match ids.iter().position(|&id| id as usize >= vocab && !(allow_ignore && id == IGNORE_TARGET)) {
            Some(i) => {
                Err(self
                    .invalid(op, format!("token id {} at position {i} is outside the vocabulary of {vocab}", ids[i])))
            }
            None => Ok(()),
        }
    }
}

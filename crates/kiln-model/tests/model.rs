//! The whole model against finite differences (every parameter tensor, in f64), and its loss at initialisation,
//! for both families: GPT-2 and a Llama-style model (RMS norm, rotary positions with Llama 3's scaling, SwiGLU,
//! grouped-query attention, an untied head), and one with biases on every product (as Llama's `attention_bias` and
//! `mlp_bias`, a superset of Qwen2's), one as Qwen3 is (QK-norm, with heads wider than `n_embd / n_head`), and one
//! as SmolLM3 is (blocks without rotary positions), and ones with a mixture of experts (as Mixtral and Qwen3-MoE).

use kiln_core::config::{Arch, Experts, Recompute, RopeScaling, RopeScalingKind};
use kiln_core::{Backend, NormKind, Tensor};
use kiln_cpu::CpuBackend;
use kiln_model::{Biases, Blocks, Mlp, Model, ModelSpec, Moment, Pass, Positions, TrainingMemory};

fn shape(vocab: usize) -> ModelSpec {
    ModelSpec::gpt2(2, 2, 8, 6, vocab)
}

/// `gpt2` turned into a Llama-style model of the same width and depth, with 2 key/value heads for 4 query heads.
fn llama(gpt2: ModelSpec) -> ModelSpec {
    let scaling = RopeScaling {
        kind: RopeScalingKind::Llama3,
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8,
    };
    ModelSpec {
        arch: Arch::Llama,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 2,
        ffn_dim: 12,
        norm: NormKind::Rms,
        norm_eps: 1e-5,
        positions: Positions::Rotary { theta: 100.0, scaling: Some(scaling) },
        mlp: Mlp::SwiGlu,
        biases: Biases { qkv: false, proj: false, mlp: false },
        tie_embeddings: false,
        ..gpt2
    }
}

/// `llama` with a mixture of 3 experts, 2 a token, their weights normalised (Mixtral's) and a balancing loss of
/// coefficient `aux_loss`.
fn mixtral(llama: ModelSpec, aux_loss: f64) -> ModelSpec {
    ModelSpec { experts: Some(Experts { count: 3, per_token: 2, normalize: true, aux_loss }), ..llama }
}

/// Qwen3-MoE's: QK-norm, and 4 experts, 2 a token, whose weights are the probabilities themselves.
fn qwen3_moe(llama: ModelSpec, aux_loss: f64) -> ModelSpec {
    let experts = Experts { count: 4, per_token: 2, normalize: false, aux_loss };
    ModelSpec { head_dim: 4, qk_norm: true, experts: Some(experts), ..llama }
}

fn batch(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + salt * 3 + i * i) % vocab) as u32).collect()
}

/// Total loss of the loaded batch.
fn loss(b: &mut CpuBackend<f64>, model: &Model, batch_size: usize, time: usize) -> f64 {
    b.zero(model.losses).unwrap();
    model.forward(b, batch_size, time, Pass::Loss).unwrap();
    b.values_mut(model.losses).unwrap().iter().sum()
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let vocab = 11;
    let biased = ModelSpec { biases: Biases { qkv: true, proj: true, mlp: true }, ..llama(shape(vocab)) };
    // Attention 16 wide over a residual stream of 8; attention's biases too, as Qwen3's attention_bias puts them.
    let qwen3 = ModelSpec {
        head_dim: 4,
        qk_norm: true,
        biases: Biases { qkv: true, proj: true, mlp: false },
        ..llama(shape(vocab))
    };
    // SmolLM3's: the second of two blocks without rotary positions.
    let smollm3 = ModelSpec { nope_interval: Some(2), ..llama(shape(vocab)) };
    // Mistral's: a sliding window of 2 over sequences of 5.
    let mistral = ModelSpec { sliding_window: Some(2), ..llama(shape(vocab)) };
    // Experts, without the balancing loss, which a loss pass does not compute (the golden files check it).
    let (mixtral, qwen3_moe) = (mixtral(llama(shape(vocab)), 0.0), qwen3_moe(llama(shape(vocab)), 0.0));
    for s in [shape(vocab), llama(shape(vocab)), biased, qwen3, smollm3, mistral, mixtral, qwen3_moe] {
        every_parameter_gradient_matches_finite_differences_for(s);
    }
}

fn every_parameter_gradient_matches_finite_differences_for(s: ModelSpec) {
    let vocab = s.vocab;
    let mut b = CpuBackend::<f64>::new();
    let model = Model::new(&mut b, s, 3, 7).unwrap();
    // Fresh GPT-2 init has zero biases and unit norms, where some gradients vanish by symmetry: perturb every
    // parameter so that each one's gradient is exercised.
    for (i, p) in b.values_mut(model.params).unwrap().iter_mut().enumerate() {
        *p += 0.05 * ((i as f64 * 0.37).sin());
    }
    let (bs, time) = (2, 5); // shorter than block_size, smaller than the allocated batch
    let tokens = batch(bs * time, vocab, 0);
    let targets = batch(bs * time, vocab, 1);
    model.load_batch(&mut b, &tokens, Some(&targets)).unwrap();
    b.zero(model.grads).unwrap();
    b.zero(model.losses).unwrap();
    let dloss = b.scalar(1.0).unwrap();
    model.forward(&mut b, bs, time, Pass::Train { dloss }).unwrap();
    model.backward(&mut b, bs, time).unwrap();
    let grads = b.values_mut(model.grads).unwrap().to_vec();

    let h = 1e-5;
    for p in &model.layout {
        // Rows of wte that no token uses, and positions past `time`, rightly get exactly zero: check those too,
        // alongside elements spread over the tensor.
        let len = if ModelSpec::has_vocab_rows(&p.name) { vocab * s.n_embd } else { p.len() };
        let picks: Vec<usize> = (0..6).map(|k| p.offset + (k * 7919 + 3) % len).collect();
        for i in picks {
            let orig = b.values_mut(model.params).unwrap()[i];
            b.values_mut(model.params).unwrap()[i] = orig + h;
            let plus = loss(&mut b, &model, bs, time);
            b.values_mut(model.params).unwrap()[i] = orig - h;
            let minus = loss(&mut b, &model, bs, time);
            b.values_mut(model.params).unwrap()[i] = orig;
            let numeric = (plus - minus) / (2.0 * h);
            let analytic = grads[i];
            let err = (numeric - analytic).abs() / (1e-7 + numeric.abs().max(analytic.abs()));
            assert!(
                err < 1e-5 || (numeric - analytic).abs() < 1e-9,
                "{:?} {}[{}]: analytic {analytic} vs numeric {numeric}",
                s.arch,
                p.name,
                i - p.offset
            );
        }
    }
}

#[test]
fn padded_vocabulary_rows_get_no_gradient() {
    let vocab = 11;
    for s in [shape(vocab), llama(shape(vocab))] {
        let mut b = CpuBackend::<f64>::new();
        let model = Model::new(&mut b, s, 2, 3).unwrap();
        let tokens = batch(12, vocab, 0);
        model.load_batch(&mut b, &tokens, Some(&batch(12, vocab, 5))).unwrap();
        let dloss = b.scalar(1.0).unwrap();
        model.forward(&mut b, 2, 6, Pass::Train { dloss }).unwrap();
        model.backward(&mut b, 2, 6).unwrap();
        let grads = b.values_mut(model.grads).unwrap();
        for p in model.layout.iter().filter(|p| ModelSpec::has_vocab_rows(&p.name)) {
            let padded = p.offset + vocab * s.n_embd..p.offset + p.len();
            assert!(grads[padded].iter().all(|&g| g == 0.0), "{:?} {}", s.arch, p.name);
        }
    }
}

#[test]
fn initial_loss_is_log_vocab() {
    // A fresh GPT-2 predicts nearly uniformly over the real vocabulary (the padded logits get no probability).
    // Nearly: with the LM head tied to the embedding, each input token's own logit starts about
    // 0.02²·C/(0.02·√2) ≈ 1.8 above the rest, which lifts the loss of vocabularies much under 64 by more than 0.1
    // (13 tokens: 2.71 against ln 13 = 2.56). Hence realistic vocabularies here, up to GPT-2's own.
    for vocab in [65, 500, 50257] {
        let s = ModelSpec::gpt2(4, 4, 128, 64, vocab);
        let mut b = CpuBackend::<f32>::new();
        let model = Model::new(&mut b, s, 4, 1337).unwrap();
        let n = 4 * 64;
        model.load_batch(&mut b, &batch(n, vocab, 0), Some(&batch(n, vocab, 2))).unwrap();
        model.forward(&mut b, 4, 64, Pass::Loss).unwrap();
        let mean = b.sum(model.losses).unwrap() / n as f32;
        let want = (vocab as f32).ln();
        assert!((mean - want).abs() < 0.1, "vocab {vocab}: initial loss {mean}, ln(vocab) = {want}");
    }
}

#[test]
fn batches_that_do_not_fit_are_errors() {
    let mut b = CpuBackend::<f32>::new();
    let model = Model::new(&mut b, shape(11), 2, 1).unwrap();
    assert!(model.forward(&mut b, 3, 6, Pass::Logits).is_err());
    assert!(model.forward(&mut b, 2, 7, Pass::Logits).is_err());
    let _: Tensor = model.params;
}

#[test]
fn decoding_with_the_cache_matches_recomputing_the_context() {
    // Each cached step must give the logits a full forward pass over the whole sequence gives at its last position:
    // with rotary positions too, where the cached keys were rotated at their own positions.
    // And with QK-norm, which normalises the decoded token's queries and keys before they join the cache, and with
    // a block that does not rotate them; and with a sliding window, shorter than the prompt, that leaves the oldest
    // cached keys out.
    let llama = llama(ModelSpec::gpt2(2, 2, 8, 12, 11));
    let qwen3 = ModelSpec { head_dim: 4, qk_norm: true, ..llama };
    let smollm3 = ModelSpec { nope_interval: Some(2), ..llama };
    let mistral = ModelSpec { sliding_window: Some(3), ..llama };
    let (mixtral, qwen3_moe) = (mixtral(llama, 0.01), qwen3_moe(llama, 0.0));
    for s in [ModelSpec::gpt2(2, 2, 8, 12, 11), llama, qwen3, smollm3, mistral, mixtral, qwen3_moe] {
        decoding_with_the_cache_matches_recomputing_the_context_for(s);
    }
}

fn decoding_with_the_cache_matches_recomputing_the_context_for(s: ModelSpec) {
    let vocab = s.vocab;
    let mut b = CpuBackend::<f64>::new();
    let model = Model::new(&mut b, s, 1, 5).unwrap();
    let seq: Vec<u32> = (0..12).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let prompt = 4;
    let (mut cached, mut full) = (vec![0.0f32; vocab], vec![0.0f32; vocab]);
    model.load_batch(&mut b, &seq[..prompt], None).unwrap();
    model.forward(&mut b, 1, prompt, Pass::Logits).unwrap();
    for pos in prompt..12 {
        model.decode_step(&mut b, seq[pos], pos).unwrap();
        model.logits_row(&mut b, 0, &mut cached).unwrap();
        // Recompute from scratch on a second model with the same weights (the cache of the first stays intact).
        let fresh = Model::new(&mut b, s, 1, 5).unwrap();
        fresh.load_batch(&mut b, &seq[..=pos], None).unwrap();
        fresh.forward(&mut b, 1, pos + 1, Pass::Logits).unwrap();
        fresh.logits_row(&mut b, pos, &mut full).unwrap();
        for (a, f) in cached.iter().zip(&full) {
            assert!((a - f).abs() < 1e-6, "position {pos}: cached {a} vs full {f}");
        }
    }
    assert!(model.decode_step(&mut b, 0, 12).is_err(), "past block_size");
}

#[test]
fn greedy_sampling_is_the_same_with_and_without_the_cache() {
    use kiln_model::generate::{SampleOptions, sample};
    let s = ModelSpec::gpt2(2, 2, 16, 24, 13);
    let mut b = CpuBackend::<f64>::new();
    let model = Model::new(&mut b, s, 1, 9).unwrap();
    let mut o = SampleOptions {
        max_new_tokens: 30,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 1,
        stop: None,
        kv_cache: true,
    };
    let mut streamed = Vec::new();
    let with = sample(&model, &mut b, &[1, 2, 3], &o, |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    o.kv_cache = false;
    let without = sample(&model, &mut b, &[1, 2, 3], &o, |_| Ok(())).unwrap();
    assert_eq!(with, without);
    assert_eq!(with, streamed);
    // The last token is predicted from a full 24-token context and cannot be fed back: 24 − 3 + 1 new tokens.
    assert_eq!(with.len(), 22, "stops when the context reaches block_size");
    // Sampling with a temperature is reproducible from the seed and can stop at a chosen token.
    o.temperature = 1.0;
    o.top_k = Some(5);
    o.top_p = Some(0.9);
    let a = sample(&model, &mut b, &[1], &o, |_| Ok(())).unwrap();
    assert_eq!(a, sample(&model, &mut b, &[1], &o, |_| Ok(())).unwrap());
    o.stop = Some(a[2]);
    let stopped = sample(&model, &mut b, &[1], &o, |_| Ok(())).unwrap();
    assert_eq!(stopped.last(), Some(&a[2]));
    assert!(stopped.len() <= 3);
}

#[test]
fn gradients_reported_ready_do_not_change_afterwards() {
    // A data-parallel trainer starts reducing gradients as soon as backward_with reports them final: anything
    // written to them later would be lost from the reduction (an untied LM head, after the final norm, included).
    for s in [shape(11), llama(shape(11)), mixtral(llama(shape(11)), 0.01)] {
        gradients_reported_ready_do_not_change_afterwards_for(s);
    }
}

fn gradients_reported_ready_do_not_change_afterwards_for(s: ModelSpec) {
    let vocab = s.vocab;
    let mut b = CpuBackend::<f64>::new();
    let model = Model::with_padding(&mut b, s, 2, 3, 64, Recompute::None).unwrap();
    let (bs, time) = (2, 6);
    model.load_batch(&mut b, &batch(bs * time, vocab, 0), Some(&batch(bs * time, vocab, 1))).unwrap();
    b.zero(model.grads).unwrap();
    b.zero(model.losses).unwrap();
    let dloss = b.scalar(1.0).unwrap();
    model.forward(&mut b, bs, time, Pass::Train { dloss }).unwrap();
    let mut reported: Vec<(usize, Vec<f64>)> = Vec::new();
    model
        .backward_with(&mut b, bs, time, &mut |b, moment| {
            if let Moment::Ready(from) = moment {
                reported.push((from, b.values_mut(model.grads).unwrap()[from..].to_vec()));
            }
            Ok(())
        })
        .unwrap();
    let starts: Vec<usize> = reported.iter().map(|(from, _)| *from).collect();
    assert_eq!(starts.len(), 2 + 2, "after ln_f, after each of the 2 blocks, after the embeddings");
    assert!(starts.windows(2).all(|w| w[0] > w[1]) && starts[3] == 0, "{starts:?}");
    let last = b.values_mut(model.grads).unwrap().to_vec();
    assert_eq!(last.len() % 64, 0);
    for (from, snapshot) in reported {
        assert_eq!(snapshot, last[from..], "gradients from {from} changed after being reported final");
    }
}

/// What training on the f32 engine with activations recomputed at `recompute` produces: the bytes the model
/// allocates, the losses of two micro-batches (the second smaller than the model's batch), and the gradients
/// accumulated over both.
fn accumulate_two_micro_batches(s: ModelSpec, recompute: Recompute) -> (u64, Vec<f32>, Vec<f32>) {
    let mut b = CpuBackend::<f32>::new();
    let model = Model::with_padding(&mut b, s, 3, 7, 1, recompute).unwrap();
    let bytes = b.allocated_bytes();
    b.zero(model.grads).unwrap();
    let mut losses = Vec::new();
    for (micro, (bs, time)) in [(3, s.block_size), (2, s.block_size - 3)].into_iter().enumerate() {
        let n = bs * time;
        model.load_batch(&mut b, &batch(n, s.vocab, micro), Some(&batch(n, s.vocab, micro + 7))).unwrap();
        b.zero(model.losses).unwrap();
        let dloss = b.scalar(1.0 / n as f32).unwrap();
        model.forward(&mut b, bs, time, Pass::Train { dloss }).unwrap();
        model.backward(&mut b, bs, time).unwrap();
        let mut host = vec![0.0; n];
        b.download(model.losses.slice(0, n), &mut host).unwrap();
        losses.extend(host);
    }
    let mut grads = vec![0.0; model.grads.len];
    b.download(model.grads, &mut grads).unwrap();
    (bytes, losses, grads)
}

#[test]
fn recomputed_activations_give_the_same_losses_and_gradients_in_less_memory() {
    // Three blocks, so that a shared buffer is written by blocks other than the one whose backward pass reads it.
    let llama = llama(ModelSpec::gpt2(3, 2, 16, 12, 11));
    let qwen3 = ModelSpec { head_dim: 6, qk_norm: true, ..llama };
    // With the balancing loss, which routing again must not add to.
    let (mixtral, qwen3_moe) = (mixtral(llama, 0.5), qwen3_moe(llama, 0.5));
    for s in [ModelSpec::gpt2(3, 2, 16, 12, 11), llama, qwen3, mixtral, qwen3_moe] {
        let (kept_bytes, kept_losses, kept_grads) = accumulate_two_micro_batches(s, Recompute::None);
        assert!(kept_grads.iter().all(|g| g.is_finite()) && kept_grads.iter().any(|&g| g != 0.0));
        let mut bytes = vec![kept_bytes];
        for recompute in [Recompute::Elementwise, Recompute::Block] {
            let (b, losses, grads) = accumulate_two_micro_batches(s, recompute);
            // Bit for bit: the recomputed activations are the very values the forward pass wrote.
            assert_eq!(losses, kept_losses, "{:?} {recompute:?}", s.arch);
            assert_eq!(grads, kept_grads, "{:?} {recompute:?}", s.arch);
            bytes.push(b);
        }
        assert!(bytes[0] > bytes[1] && bytes[1] > bytes[2], "{:?}: none, elementwise, block: {bytes:?}", s.arch);
    }
}

#[test]
fn a_model_that_recomputes_its_queries_keys_and_values_refuses_to_decode() {
    // Its blocks share one qkv activation, so there is no key/value cache to decode from.
    let mut b = CpuBackend::<f32>::new();
    let model = Model::with_padding(&mut b, shape(11), 1, 1, 1, Recompute::Block).unwrap();
    model.load_batch(&mut b, &[1, 2], None).unwrap();
    model.forward(&mut b, 1, 2, Pass::Logits).unwrap();
    assert!(model.decode_step(&mut b, 3, 2).is_err());
    // With QK-norm, elementwise recomputation shares qkv too.
    let qwen3 = ModelSpec { head_dim: 2, qk_norm: true, ..llama(shape(11)) };
    let model = Model::with_padding(&mut b, qwen3, 1, 1, 1, Recompute::Elementwise).unwrap();
    model.load_batch(&mut b, &[1, 2], None).unwrap();
    model.forward(&mut b, 1, 2, Pass::Logits).unwrap();
    assert!(model.decode_step(&mut b, 3, 2).is_err());
}

#[test]
fn a_model_whose_blocks_weights_alternate_runs_only_through_the_passes_that_say_when_they_read_them() {
    let s = shape(11);
    let mut b = CpuBackend::<f32>::new();
    let blocks = Blocks::AlternatingWeightsAndGradients;
    let memory = TrainingMemory { multiple: 64, recompute: Recompute::None, blocks, master_pieces: None };
    let model = Model::for_training(&mut b, s, 2, memory).unwrap();
    // Every unit starts at a multiple of the padding; the blocks' weights take two blocks' room, not n_layer.
    assert!(model.units.iter().all(|u| u.start % 64 == 0 && u.len() % 64 == 0), "{:?}", model.units);
    let block = model.units[1].len();
    assert_eq!(model.params.len, model.units[0].len() + model.units[s.n_layer + 1].len() + 2 * block);
    model.load_batch(&mut b, &batch(2 * 6, s.vocab, 0), Some(&batch(2 * 6, s.vocab, 1))).unwrap();
    for error in [
        model.forward(&mut b, 2, 6, Pass::Loss).unwrap_err(),
        model.backward(&mut b, 2, 6).unwrap_err(),
        model.decode_step(&mut b, 1, 0).unwrap_err(),
        model.initialize(&mut b, 1).unwrap_err(),
    ] {
        assert!(error.to_string().contains("forward_with"), "{error}");
    }
    let mut moments = Vec::new();
    let dloss = b.scalar(1.0).unwrap();
    model
        .forward_with(&mut b, 2, 6, Pass::Train { dloss }, &mut |_, m| {
            moments.push(m);
            Ok(())
        })
        .unwrap();
    model
        .backward_with(&mut b, 2, 6, &mut |_, m| {
            moments.push(m);
            Ok(())
        })
        .unwrap();
    let units = &model.units;
    let expected = [
        Moment::Forward(0),
        Moment::Forward(1),
        Moment::Ready(units[3].start),
        Moment::Backward(1),
        Moment::Ready(units[2].start),
        Moment::Backward(0),
        Moment::Ready(units[1].start),
        Moment::Ready(0),
    ];
    assert_eq!(moments, expected);
}

#[test]
fn a_model_too_large_for_any_machine_is_refused_before_anything_is_laid_out() {
    let mut b = CpuBackend::<f64>::new();
    let huge = [
        ModelSpec { ffn_dim: usize::MAX / 2, ..shape(11) },
        ModelSpec { n_embd: 1 << 40, head_dim: 1 << 39, ..shape(11) },
        ModelSpec { n_layer: 60_000, n_embd: 1 << 16, head_dim: 1 << 15, ..shape(11) },
    ];
    for s in huge {
        let err = Model::new(&mut b, s, 2, 1).err().expect("refused").to_string();
        assert!(err.contains("more than any machine holds"), "{err}");
    }
    // Batches too: the activations of every row count.
    let err = Model::new(&mut b, shape(11), usize::MAX / 8, 1).err().expect("refused").to_string();
    assert!(err.contains("more than any machine holds"), "{err}");
    for vocab in [0, 1 << 40] {
        let err = Model::new(&mut b, ModelSpec::gpt2(2, 2, 8, 6, vocab), 2, 1).err().expect("refused").to_string();
        assert!(err.contains("token ids are 1 to 2^31"), "{err}");
    }
    assert!(Model::new(&mut b, shape(11), 2, 1).is_ok());
    // The rotary table, computed on the host, past any address space: an error, not an abort.
    let wide_heads = ModelSpec { head_dim: 1 << 44, ..llama(shape(11)) };
    match wide_heads.rope_table() {
        Err(kiln_core::Error::OutOfMemory { message, .. }) => assert!(message.contains("rotary table"), "{message}"),
        other => panic!("expected an out-of-memory error, got {:?}", other.map(|t| t.len())),
    }
}

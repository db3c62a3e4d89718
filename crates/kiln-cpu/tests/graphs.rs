//! The CPU engine's graphs behave as a GPU's: a captured operation does not run until the graph is replayed, a
//! replay reads its tensors as they are then (the loss scale of each step, new weights), and work that acts on the
//! host cannot be captured.

use kiln_core::{Backend, Graph, Role, Tensor};
use kiln_cpu::CpuBackend;

/// Three rows of seven logits, the loss scale, the losses and the targets.
struct Case {
    logits: Tensor,
    dloss: Tensor,
    losses: Tensor,
    targets: Tensor,
}

impl Case {
    fn new(b: &mut CpuBackend<f32>) -> Case {
        let case = Case {
            logits: b.alloc(21, Role::Activation).unwrap(),
            dloss: b.scalar(0.5).unwrap(),
            losses: b.alloc(3, Role::Stat).unwrap(),
            targets: b.alloc(3, Role::Index).unwrap(),
        };
        b.upload_indices(case.targets, &[1, 6, 3]).unwrap();
        case
    }

    fn set(&self, b: &mut CpuBackend<f32>, shift: f32, dloss: f32) {
        let logits: Vec<f32> = (0..21).map(|i| (i as f32 * 0.37).sin() + shift).collect();
        b.upload(self.logits, &logits).unwrap();
        b.upload(self.dloss, &[dloss]).unwrap();
    }

    /// The losses summed from zero, and the gradient left in the logits.
    fn run(&self, b: &mut CpuBackend<f32>) {
        b.zero(self.losses).unwrap();
        b.classifier(self.logits, self.losses, self.targets, 3, 7, 7, Some(self.dloss)).unwrap();
    }

    fn read(&self, b: &mut CpuBackend<f32>) -> (Vec<f32>, Vec<f32>) {
        let (mut losses, mut grads) = (vec![0.0; 3], vec![0.0; 21]);
        b.download(self.losses, &mut losses).unwrap();
        b.download(self.logits, &mut grads).unwrap();
        (losses, grads)
    }
}

#[test]
fn a_replay_runs_the_captured_operations_on_the_tensors_as_they_are_then() {
    let (mut direct, mut graphs) = (CpuBackend::<f32>::new(), CpuBackend::<f32>::new());
    let (want, got) = (Case::new(&mut direct), Case::new(&mut graphs));
    got.set(&mut graphs, 0.0, 0.5);
    assert!(graphs.begin_capture().unwrap());
    got.run(&mut graphs);
    let graph = graphs.end_capture().unwrap();
    // Captured, not run: the logits are still the logits.
    let (_, untouched) = got.read(&mut graphs);
    got.set(&mut graphs, 0.0, 0.5);
    assert_eq!(got.read(&mut graphs).1, untouched);
    for (shift, dloss) in [(0.0, 0.5), (1.5, 0.25), (-2.0, 3.0)] {
        want.set(&mut direct, shift, dloss);
        want.run(&mut direct);
        got.set(&mut graphs, shift, dloss);
        graphs.replay(graph).unwrap();
        let (want, got) = (want.read(&mut direct), got.read(&mut graphs));
        assert_eq!(got, want, "shift {shift}, dloss {dloss}");
        assert!(want.1.iter().any(|&g| g != 0.0));
    }
}

#[test]
fn work_on_the_host_cannot_be_captured() {
    let mut b = CpuBackend::<f32>::new();
    let t = b.alloc(4, Role::Stat).unwrap();
    let ids = b.alloc(4, Role::Index).unwrap();
    assert!(b.begin_capture().unwrap());
    let refused = [
        b.alloc(1, Role::Stat).map(|_| ()),
        b.upload(t, &[1.0; 4]),
        b.download(t, &mut [0.0; 4]),
        b.upload_indices(ids, &[0; 4]),
        b.sum(t).map(|_| ()),
        b.sum_squares(t).map(|_| ()),
        b.synchronize(),
        b.begin_capture().map(|_| ()),
    ];
    for (i, result) in refused.into_iter().enumerate() {
        let error = result.expect_err(&format!("operation {i} was captured"));
        assert!(error.to_string().contains("cannot be captured into a graph"), "{error}");
    }
    // What can be captured was: the sum lands on replay.
    b.sum_into(t.slice(0, 3), false, t.slice(3, 1)).unwrap();
    let graph = b.end_capture().unwrap();
    b.upload(t, &[1.0, 2.0, 4.0, 0.0]).unwrap();
    b.replay(graph).unwrap();
    let mut host = [0.0; 4];
    b.download(t, &mut host).unwrap();
    assert_eq!(host, [1.0, 2.0, 4.0, 7.0]);
    assert!(b.end_capture().is_err(), "no capture in progress");
    assert!(b.replay(Graph(7)).is_err(), "no such graph");
}

#[test]
fn an_abandoned_capture_keeps_nothing_and_the_engine_runs_work_again() {
    let mut b = CpuBackend::<f32>::new();
    let t = b.alloc(2, Role::Stat).unwrap();
    b.upload(t, &[3.0, 4.0]).unwrap();
    assert!(b.begin_capture().unwrap());
    b.zero(t).unwrap();
    b.abandon_capture().unwrap();
    let mut host = [0.0; 2];
    b.download(t, &mut host).unwrap();
    assert_eq!(host, [3.0, 4.0], "an abandoned operation ran");
    b.zero(t).unwrap();
    b.download(t, &mut host).unwrap();
    assert_eq!(host, [0.0, 0.0], "work after the abandoned capture did not run");
    assert!(b.replay(Graph(0)).is_err(), "an abandoned capture left a graph");
    assert!(b.abandon_capture().is_err(), "no capture in progress");
}

//! More memory than the host can give is an error the run can report, not an abort of the process.

use kiln_core::{Backend, Error, Role};
use kiln_cpu::CpuBackend;

#[test]
fn an_allocation_past_the_host_s_memory_is_an_out_of_memory_error() {
    let mut b = CpuBackend::<f32>::new();
    // 2^61 floats: 8 EiB, past any address space.
    for role in [Role::Activation, Role::Index] {
        match b.alloc(1 << 61, role) {
            Err(Error::OutOfMemory { message, .. }) => assert!(message.contains("cannot allocate"), "{message}"),
            other => panic!("expected an out-of-memory error, got {other:?}"),
        }
    }
    // The engine goes on working.
    let t = b.alloc(3, Role::Activation).unwrap();
    b.upload(t, &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(b.sum(t).unwrap(), 6.0);
}

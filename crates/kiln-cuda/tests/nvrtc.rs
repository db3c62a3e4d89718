//! Every kernel file compiles with NVRTC for sm_80 and sm_90a, in each precision it is built for, with no register
//! spills and no wgmma that ptxas serialises; the fused attention kernels' launch shapes read back from what was
//! compiled.
//! Needs NVRTC and the CUDA headers but no GPU: `.ci/run` installs pip's nvidia-cuda-nvrtc and
//! nvidia-cuda-runtime wheels and points LD_LIBRARY_PATH and CUDA_HOME at them.

use kiln_cuda::backend::{
    flash_launch_table, flash_pipelined_launch_table, flash_specialised_launch_table, flash_wgmma_launch_table,
};
use kiln_cuda::compile::Compiler;
use kiln_cuda::kernels::{KERNELS, Precision};

fn compiler(cache: &str) -> Compiler {
    let dir = std::env::temp_dir().join(format!("kiln-nvrtc-test-{}-{cache}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    match Compiler::with_cache_dir(dir) {
        Ok(c) => c,
        Err(e) => panic!(
            "{e}\nThis test needs NVRTC 13 and the CUDA headers: `pip install nvidia-cuda-nvrtc==13.0.88 \
             nvidia-cuda-runtime==13.0.88`, then LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib and \
             CUDA_HOME=<site-packages>/nvidia/cu13 (.ci/run does this)"
        ),
    }
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper_without_spills() {
    let compiler = compiler("all");
    for kernel in KERNELS {
        for arch in ["sm_80", "sm_90a"] {
            for &precision in kernel.precisions {
                let built = compiler.compile(kernel, arch, precision).unwrap_or_else(|e| panic!("{e}"));
                assert!(!built.cached);
                assert!(built.cubin.starts_with(b"\x7fELF"), "{}: not an ELF cubin", kernel.name);
                assert!(!built.stats.is_empty(), "{} {arch}: ptxas reported no kernels", kernel.name);
                // The kernels read from the CUBIN (what the engine loads) are those ptxas reported compiling.
                let mut reported: Vec<&str> = built.stats.iter().map(|s| s.function.as_str()).collect();
                let mut defined: Vec<&str> = built.entry_points.iter().map(String::as_str).collect();
                reported.sort();
                defined.sort();
                assert_eq!(defined, reported, "{} {arch} {}", kernel.name, precision.name());
                for s in &built.stats {
                    assert!(s.registers > 0, "{} {arch}: {s:?}", kernel.name);
                    assert_eq!(
                        (s.spill_stores, s.spill_loads),
                        (0, 0),
                        "{} {arch} {}: spills {s:?}",
                        kernel.name,
                        precision.name()
                    );
                    // A serialised wgmma waits for each product as it is issued: no overlap survives it.
                    assert!(!s.wgmma_serialized, "{} {arch}: ptxas serialised the wgmma of {s:?}", kernel.name);
                    // An injected wait undoes the overlap of the products before it with those issued after.
                    assert!(!s.wgmma_wait_injected, "{} {arch}: ptxas injected a wgmma wait in {s:?}", kernel.name);
                    // The warp-specialised kernels move registers between their warpgroups within what the block
                    // was launched with (setmaxnreg's pool), which they take to be 384 threads × 168.
                    if s.function.contains("_specialised_") {
                        assert_eq!(s.registers, 168, "{} {arch}: {s:?}", kernel.name);
                    }
                }
                // A second compile is served from the cache, with the same report.
                let again = compiler.compile(kernel, arch, precision).unwrap();
                assert!(again.cached);
                assert_eq!((again.cubin.len(), &again.entry_points), (built.cubin.len(), &built.entry_points));
            }
        }
    }
    let _ = std::fs::remove_dir_all(compiler.cache_dir());
}

/// The fused attention kernels export how to launch them (flash_attention_launch_dD), and the engine reads that
/// from the CUBIN it loads: 128 queries per forward block, shared memory within what the architecture lets a block
/// have, 4 warps a block but for the dkv kernels, which may split their work between two roles (8 warps). The tiles
/// may differ by architecture: at head dimension 128 the forward's key tiles are twice as long on sm_90a (64 keys:
/// 128 + 4·64 padded rows) as on sm_80, where they would spill, and the dkv kernels' query tiles too (64 against 32,
/// which keeps sm_86's and sm_89's 99 KiB).
#[test]
fn fused_attention_exports_its_launch_shapes() {
    let compiler = compiler("flash");
    let kernel = KERNELS.iter().find(|k| k.name == "flash_attention").expect("flash_attention.cu");
    let row = |d: u32| (d + 8) * 2;
    for (arch, limit, d128_forward_keys) in [("sm_80", 99 * 1024, 32), ("sm_90a", 227 * 1024, 64)] {
        let built = compiler.compile(kernel, arch, Precision::Bf16).unwrap_or_else(|e| panic!("{e}"));
        for d in [32, 64, 96, 128] {
            let table = flash_launch_table(&built.cubin, d).unwrap_or_else(|e| panic!("{arch} D={d}: {e}"));
            assert_eq!(table[0], 128, "{arch} D={d}: queries per forward block");
            assert!(table[1..5].iter().all(|&b| b > 0 && b <= limit), "{arch} D={d}: {table:?}");
            // dkv_dq is dkv plus its dS tile.
            assert!(table[4] > table[3], "{arch} D={d}: {table:?}");
            assert_eq!(&table[5..7], &[128, 128], "{arch} D={d}: forward and dq threads");
            assert!(table[7] == table[8] && [128, 256].contains(&table[7]), "{arch} D={d}: {table:?}");
        }
        let d128 = flash_launch_table(&built.cubin, 128).unwrap();
        assert_eq!(d128[1], (128 + 4 * d128_forward_keys) * row(128), "{arch}");
        assert!(flash_launch_table(&built.cubin, 80).is_err(), "no kernels for D=80");
        // The kernels on wgmma: sm_90a only, at D = 64 (64 keys a forward tile) and 128 (128 keys). The forward has
        // two warpgroups of 64 queries, dq and dkv one (a single role, also at D = 128); their tiles are unpadded
        // (swizzled): forward Q, then two stages of K and of V; dq Q and dO, then two stages of 64 keys; dkv K and
        // V, then two stages of 64 queries' Q and dO, their lse and D, with atomic dQ the dS tile (64 × 64).
        for (d, keys) in [(32, 0), (64, 64), (96, 0), (128, 128u32)] {
            let table = flash_wgmma_launch_table(&built.cubin, d).unwrap_or_else(|e| panic!("{arch} D={d}: {e}"));
            let names = ["forward", "backward_dq", "backward_dkv", "backward_dkv_dq"]
                .map(|k| format!("flash_attention_{k}_wgmma_d{d}"));
            if arch == "sm_90a" && keys > 0 {
                let row = d as u32 * 2;
                let dkv = (2 * 64 + 4 * 64) * row + 4 * 64 * 4;
                let (forward, dq, dkv_dq) = ((128 + 4 * keys) * row, (2 * 64 + 4 * 64) * row, dkv + 64 * 64 * 2);
                let expected = [128, forward, dq, dkv, dkv_dq, 256, 128, 128, 128];
                assert_eq!(table, Some(expected), "{arch} D={d}");
                assert!(names.iter().all(|n| built.entry_points.contains(n)), "{arch}: {names:?}");
            } else {
                assert_eq!(table, None, "{arch} D={d}");
                assert!(!names.iter().any(|n| built.entry_points.contains(n)), "{arch}: {names:?}");
            }
            // The pipelined forward on wgmma, where the others are, with the same tiles as the unpipelined one: Q,
            // then two stages of K and three of V.
            let pipelined =
                flash_pipelined_launch_table(&built.cubin, d).unwrap_or_else(|e| panic!("{arch} D={d}: {e}"));
            let name = format!("flash_attention_forward_wgmma_pipelined_d{d}");
            if arch == "sm_90a" && keys > 0 {
                assert_eq!(pipelined, Some([(128 + 5 * keys) * d as u32 * 2, 256]), "{arch} D={d}");
                assert!(built.entry_points.contains(&name), "{arch}: {name}");
            } else {
                assert_eq!(pipelined, None, "{arch} D={d}");
                assert!(!built.entry_points.contains(&name), "{arch}: {name}");
            }
            // The warp-specialised forward, dq and dkv kernels (without and with atomic dQ) likewise: three
            // warpgroups; the forward's Q, two stages of K and of V, then nine mbarriers (the resident tiles', and a
            // full and an empty one for each stage of the two streamed tiles); the dq kernel's Q and dO of each
            // computing warpgroup (64 rows each), three stages of 64 keys' K and V, the mbarriers; its 128 queries a
            // block in tiles of 64 rows. The dkv kernel's K and V (128 keys with one role at D = 64, 64 with two at
            // D = 128), stages of 64 queries' Q and dO (two with one role, three with two), the mbarriers, from the
            // next 16 bytes a Pᵀ buffer a stage (two roles: 64 queries × 128 bytes each), then lse and D of each
            // stage; with atomic dQ, from the next 1024 bytes two dS tiles (64 × 64) of each computing warpgroup
            // with one role, of both with two, then 16 rows of dQ (64 floats) of each of its 8 warps.
            let specialised =
                flash_specialised_launch_table(&built.cubin, d).unwrap_or_else(|e| panic!("{arch} D={d}: {e}"));
            let names = ["forward", "backward_dq", "backward_dkv", "backward_dkv_dq"]
                .map(|k| format!("flash_attention_{k}_wgmma_specialised_d{d}"));
            if arch == "sm_90a" && keys > 0 {
                let (row, barriers) = (d as u32 * 2, 9 * 8);
                let (forward, dq) = ((128 + 4 * keys) * row + barriers, (4 * 64 + 6 * 64) * row + 13 * 8);
                let (dkv_keys, stages, exchange) = if d == 64 { (128, 2, 0) } else { (64, 3, 64 * 128) };
                let dkv = ((2 * dkv_keys + 2 * stages * 64) * row + (1 + 4 * stages) * 8).next_multiple_of(16)
                    + stages * (exchange + 2 * 64 * 4);
                let atomic = dkv.next_multiple_of(1024) + 2 * dkv_keys / 64 * 64 * 64 * 2 + 8 * 16 * 64 * 4;
                let expected = [384, forward, keys, dq, 128, 64, dkv, dkv_keys, atomic];
                assert_eq!(specialised, Some(expected), "{arch} D={d}");
                assert!(names.iter().all(|n| built.entry_points.contains(n)), "{arch}: {names:?}");
            } else {
                assert_eq!(specialised, None, "{arch} D={d}");
                assert!(!names.iter().any(|n| built.entry_points.contains(n)), "{arch}: {names:?}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(compiler.cache_dir());
}

#[test]
fn compile_errors_carry_the_compiler_log() {
    let broken = kiln_cuda::kernels::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void f() { undefined_thing(); }",
        precisions: &Precision::ALL,
    };
    let err = compiler("broken").compile(&broken, "sm_80", Precision::Fp32).unwrap_err().to_string();
    assert!(err.contains("broken.cu") && err.contains("undefined_thing"), "{err}");
}

#[test]
fn reports_the_version_of_a_library_it_loads() {
    use kiln_cuda::libraries::Library;
    // .ci/run installs NVRTC 13.0.88.
    assert_eq!(Library::Nvrtc.version().as_deref(), Some("13.0"));
    // No machine that runs the tests has the CUDA driver without a GPU; where there is none, there is no version.
    if !Library::Driver.is_present() {
        assert_eq!(Library::Driver.version(), None);
    }
}

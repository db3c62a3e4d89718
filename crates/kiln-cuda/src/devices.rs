//! The GPUs present, as the CUDA driver reports them.

use crate::libraries::Library;
use cudarc::driver::{result, sys};
use kiln_core::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_bytes: usize,
}

impl Gpu {
    /// The NVRTC architecture to compile for: `sm_90a` for compute capability 9.0. From Hopper on, the `a`
    /// variant unlocks the architecture-specific instructions (wgmma, TMA) at the price of running only there.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        if major >= 9 { format!("sm_{major}{minor}a") } else { format!("sm_{major}{minor}") }
    }
}

impl Gpu {
    /// The dense bf16 tensor-core peak in TFLOP/s of the GPUs whose datasheets kiln knows (what MFU is measured
    /// against, as the anchors measure it), by the name the driver reports.
    pub fn bf16_peak_tflops(&self) -> Option<f64> {
        let name = &self.name;
        let peak = if name.contains("H100") && name.contains("PCIe") {
            756.0
        } else if (name.contains("H100") || name.contains("H200")) && name.contains("NVL") {
            835.0
        } else if name.contains("H100") || name.contains("H200") {
            989.0
        } else if name.contains("A100") {
            312.0
        } else {
            return None;
        };
        Some(peak)
    }
}

fn driver_error(what: &str, e: result::DriverError) -> Error {
    Error::backend("cuda", format!("{what}: {e:?}"))
}

/// Every GPU the driver sees; an error when the driver library is missing or fails to start.
pub fn list() -> Result<Vec<Gpu>> {
    Library::Driver.require()?;
    result::init().map_err(|e| driver_error("cuInit (is an NVIDIA GPU present and its driver loaded?)", e))?;
    let count = result::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
            let attribute = |a| {
                // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                unsafe { result::device::get_attribute(dev, a) }.map_err(|e| driver_error("cuDeviceGetAttribute", e))
            };
            Ok(Gpu {
                ordinal: ordinal as usize,
                name: result::device::get_name(dev).map_err(|e| driver_error("cuDeviceGetName", e))?,
                compute_capability: (
                    attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                // SAFETY: as above.
                memory_bytes: unsafe { result::device::total_mem(dev) }
                    .map_err(|e| driver_error("cuDeviceTotalMem", e))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_by_name() {
        let gpu = |name: &str| Gpu { ordinal: 0, name: name.into(), compute_capability: (9, 0), memory_bytes: 0 };
        let peaks: Vec<_> = [
            "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 PCIe",
            "NVIDIA H100 NVL",
            "NVIDIA H200",
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA L4",
        ]
        .iter()
        .map(|name| gpu(name).bf16_peak_tflops())
        .collect();
        assert_eq!(peaks, [Some(989.0), Some(756.0), Some(835.0), Some(989.0), Some(312.0), None]);
    }

    #[test]
    fn architectures() {
        let gpu = |cc| Gpu { ordinal: 0, name: String::new(), compute_capability: cc, memory_bytes: 0 };
        assert_eq!(gpu((9, 0)).arch(), "sm_90a");
        assert_eq!(gpu((8, 6)).arch(), "sm_86");
        assert_eq!(gpu((10, 0)).arch(), "sm_100a");
    }
}

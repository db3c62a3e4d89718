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
    fn architectures() {
        let gpu = |cc| Gpu { ordinal: 0, name: String::new(), compute_capability: cc, memory_bytes: 0 };
        assert_eq!(gpu((9, 0)).arch(), "sm_90a");
        assert_eq!(gpu((8, 6)).arch(), "sm_86");
        assert_eq!(gpu((10, 0)).arch(), "sm_100a");
    }
}

//! Device identifiers: where a model or the detector runs, and how many GPUs libtorch
//! sees. Part of the leaf vocabulary: the config names devices with these, the runtimes
//! turn them into tch devices.

use std::fmt;

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceChoice {
    pub fn tch(self) -> tch::Device {
        match self {
            DeviceChoice::Cpu => tch::Device::Cpu,
            DeviceChoice::Cuda(i) => tch::Device::Cuda(i),
        }
    }
}

/// Number of CUDA devices libtorch can use here (0 on a machine without a GPU).
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

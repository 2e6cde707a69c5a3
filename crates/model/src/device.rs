//! Choosing where the model runs: `--device auto|wgpu|cpu`.
//!
//! `auto` takes wgpu only on a hardware GPU. A software adapter (Mesa's lavapipe, device
//! type Cpu) computes correctly but ~70× slower than the CPU backend on matmuls, so `auto`
//! never picks it; `--device wgpu` still can, which is how the tests exercise the wgpu path.

use burn::tensor::wgpu::wgpu;
use burn::tensor::{Device, DeviceKind};
use serde::Serialize;

use crate::error::{Error, Result};

pub use safeprobe_wire::DeviceChoice;

/// What wgpu reports about one adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    pub name: String,
    pub vendor: String,
    pub device_type: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
}

impl AdapterReport {
    fn is_hardware(&self) -> bool {
        matches!(
            self.device_type.as_str(),
            "DiscreteGpu" | "IntegratedGpu" | "VirtualGpu"
        )
    }
}

/// The device a command runs on, with the reason it was chosen.
#[derive(Clone)]
pub struct Selected {
    pub device: Device,
    /// "wgpu" or "cpu".
    pub backend: &'static str,
    pub adapter: Option<AdapterReport>,
    pub reason: String,
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.describe(), self.reason)
    }
}

impl Selected {
    /// Whether tensors live in this machine's memory: the CPU, or a software adapter such as
    /// Mesa's lavapipe (wgpu reports no free memory for a GPU's own).
    pub fn uses_host_memory(&self) -> bool {
        self.adapter.as_ref().is_none_or(|a| a.device_type == "Cpu")
    }

    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(a) => format!("wgpu on \"{}\" ({}, {})", a.name, a.device_type, a.backend),
            None => "cpu (burn flex backend)".to_string(),
        }
    }
}

fn vendor_name(id: u32) -> String {
    let known = match id {
        0x10de => "NVIDIA",
        0x1002 => "AMD",
        0x8086 => "Intel",
        0x106b => "Apple",
        0x13b5 => "ARM",
        0x5143 => "Qualcomm",
        0x10005 => "Mesa",
        _ => "",
    };
    if known.is_empty() {
        format!("0x{id:04x}")
    } else {
        format!("{known} (0x{id:04x})")
    }
}

/// Every adapter wgpu can see, over all graphics APIs compiled in.
pub fn list_adapters() -> Vec<AdapterReport> {
    let instance = wgpu::Instance::default();
    let adapters = block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters
        .iter()
        .map(|adapter| {
            let info = adapter.get_info();
            AdapterReport {
                name: info.name,
                vendor: vendor_name(info.vendor),
                device_type: format!("{:?}", info.device_type),
                backend: format!("{:?}", info.backend),
                driver: info.driver,
                driver_info: info.driver_info,
            }
        })
        .collect()
}

/// Chooses a device. Nothing is initialised on the GPU until the first tensor is made.
pub fn select(choice: DeviceChoice) -> Result<Selected> {
    // The CPU needs no adapter list (enumeration starts the graphics drivers).
    let adapters = if choice == DeviceChoice::Cpu {
        Vec::new()
    } else {
        list_adapters()
    };
    select_from(choice, adapters)
}

/// The choice made from a list of adapters (separate from the enumeration so it can be
/// tested with any mix of adapters).
fn select_from(choice: DeviceChoice, adapters: Vec<AdapterReport>) -> Result<Selected> {
    if choice == DeviceChoice::Cpu {
        return Ok(cpu("--device cpu was asked for".into()));
    }
    let pick = |ty: &str| adapters.iter().find(|a| a.device_type == ty).cloned();
    let hardware = pick("DiscreteGpu")
        .map(|a| (a, DeviceKind::DiscreteGpu(0)))
        .or_else(|| pick("IntegratedGpu").map(|a| (a, DeviceKind::IntegratedGpu(0))))
        .or_else(|| pick("VirtualGpu").map(|a| (a, DeviceKind::VirtualGpu(0))));
    match (choice, hardware) {
        (_, Some((adapter, kind))) => Ok(Selected {
            device: Device::wgpu(kind),
            backend: "wgpu",
            reason: format!("hardware GPU adapter \"{}\" found", adapter.name),
            adapter: Some(adapter),
        }),
        (DeviceChoice::Auto, None) => {
            let software: Vec<_> = adapters.iter().filter(|a| !a.is_hardware()).map(|a| a.name.as_str()).collect();
            let reason = if software.is_empty() {
                "no wgpu adapter found".to_string()
            } else {
                format!(
                    "only software wgpu adapters found ({}); they are far slower than the CPU backend",
                    software.join(", ")
                )
            };
            Ok(cpu(reason))
        }
        (_, None) => match pick("Cpu") {
            Some(adapter) => Ok(Selected {
                device: Device::wgpu(DeviceKind::Cpu),
                backend: "wgpu",
                reason: format!("--device wgpu asked for; only the software adapter \"{}\" exists", adapter.name),
                adapter: Some(adapter),
            }),
            None => Err(Error::Device(
                "--device wgpu: wgpu found no adapter (on Linux without a GPU install Mesa's software Vulkan \
                 driver: apt-get install mesa-vulkan-drivers)"
                    .into(),
            )),
        },
    }
}

fn cpu(reason: String) -> Selected {
    Selected {
        device: Device::flex(),
        backend: "cpu",
        adapter: None,
        reason,
    }
}

/// Drives a future to completion on this thread. wgpu's native adapter enumeration resolves
/// without waiting on anything, so a spinning poll loop suffices and no runtime is needed.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(value) = future.as_mut().poll(&mut context) {
            return value;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(name: &str, device_type: &str) -> AdapterReport {
        AdapterReport {
            name: name.into(),
            vendor: "test".into(),
            device_type: device_type.into(),
            backend: "Vulkan".into(),
            driver: String::new(),
            driver_info: String::new(),
        }
    }

    #[test]
    fn auto_never_picks_a_software_adapter() {
        let chosen = select_from(DeviceChoice::Auto, vec![adapter("llvmpipe", "Cpu")]).unwrap();
        assert_eq!(chosen.backend, "cpu");
        assert!(
            chosen
                .reason
                .contains("only software wgpu adapters found (llvmpipe)"),
            "{}",
            chosen.reason
        );
        let none = select_from(DeviceChoice::Auto, vec![]).unwrap();
        assert_eq!(
            (none.backend, none.reason.as_str()),
            ("cpu", "no wgpu adapter found")
        );
    }

    #[test]
    fn hardware_gpus_win_discrete_first() {
        let adapters = vec![
            adapter("llvmpipe", "Cpu"),
            adapter("iGPU", "IntegratedGpu"),
            adapter("dGPU", "DiscreteGpu"),
        ];
        for choice in [DeviceChoice::Auto, DeviceChoice::Wgpu] {
            let chosen = select_from(choice, adapters.clone()).unwrap();
            assert_eq!(chosen.backend, "wgpu");
            assert_eq!(chosen.adapter.unwrap().name, "dGPU");
        }
        let integrated = select_from(DeviceChoice::Auto, adapters[..2].to_vec()).unwrap();
        assert_eq!(integrated.adapter.unwrap().name, "iGPU");
    }

    #[test]
    fn explicit_wgpu_takes_a_software_adapter_or_says_what_to_install() {
        let chosen = select_from(DeviceChoice::Wgpu, vec![adapter("llvmpipe", "Cpu")]).unwrap();
        assert_eq!(
            (chosen.backend, chosen.adapter.unwrap().name.as_str()),
            ("wgpu", "llvmpipe")
        );
        let error = select_from(DeviceChoice::Wgpu, vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("mesa-vulkan-drivers"), "{error}");
        assert!(
            "tpu"
                .parse::<DeviceChoice>()
                .unwrap_err()
                .to_string()
                .contains("expected auto, wgpu or cpu")
        );
    }
}

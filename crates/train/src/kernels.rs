//! SAP's hand-written WGSL kernels (shaders/*.wgsl) and their burn tensor-op twins.
//!
//! On the wgpu backend the kernels run on burn's own buffers through a backend extension;
//! on any other device (the CPU backend) the twin computes the same thing with tensor ops.
//! Tests run both on wgpu and compare. All functions take plain (non-autodiff) tensors:
//! these are optimiser-style updates, outside the gradient graph.
//!
//! - `probe_adam`: the fused probe update (Adam ascent from zero with its moment update, or
//!   the plain-gradient variant);
//! - `axpy`: the scaled perturbation W + ε·g/(‖g‖ + 1e-8), one tensor at a time;
//! - `dot`: the reductions behind norms and the gradient cosines of the metrics.

use burn::backend::DispatchDevice;
use burn::backend::wgpu::{
    CubeBackend, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Shape, Tensor};
use cubecl::ir::attributes::BufferIOAttr;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;
use cubecl::{CubeCount, CubeDim};

/// Hyper-parameters of one probe update.
#[derive(Debug, Clone, Copy)]
pub struct ProbeAdam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Steps taken so far including this one (for the bias corrections).
    pub step: u64,
    /// V = lr·g instead of the Adam-normalised step (moments untouched).
    pub plain_gradient: bool,
}

impl ProbeAdam {
    fn corrections(&self) -> (f32, f32) {
        let t = self.step.max(1) as i32;
        (
            (1.0 - (self.beta1 as f64).powi(t)) as f32,
            (1.0 - (self.beta2 as f64).powi(t)) as f32,
        )
    }
}

// wgpu tensors sit behind burn's fusion layer, which records operations lazily; `Fusion` has the
// macro register each kernel as an opaque operation of that stream, with its outputs' shapes
// known up front.
#[backend_extension(Cube: cfg(all()), Fusion)]
pub trait SapKernels: Backend {
    #[fusion(meta = |grad, _m, _v, _params| (grad.clone(), grad.clone(), grad.clone()))]
    fn probe_adam_kernel(
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        params: Vec<u32>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    #[fusion(dtype = w, shape = w)]
    fn axpy_kernel(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        params: Vec<u32>,
    ) -> FloatTensor<Self>;
    #[fusion(dtype = a, shape = Shape::new([dot_partials(params[0]) as usize]))]
    fn dot_pass_kernel(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        params: Vec<u32>,
    ) -> FloatTensor<Self>;
}

macro_rules! wgsl_kernel {
    ($name:ident, $file:literal) => {
        struct $name;
        impl KernelSource for $name {
            fn source(&self) -> SourceTemplate {
                SourceTemplate::new(include_str!(concat!("../../../shaders/", $file)))
            }
            fn id(&self) -> KernelId {
                // The source never changes at run time, so the type alone identifies it.
                KernelId::new::<Self>()
            }
            fn lang(&self) -> &'static str {
                "wgsl"
            }
        }
    };
}

wgsl_kernel!(ProbeAdamWgsl, "probe_adam.wgsl");
wgsl_kernel!(AxpyWgsl, "axpy.wgsl");
wgsl_kernel!(DotWgsl, "dot.wgsl");

const WORKGROUP: u32 = 256;

/// How many partial sums one pass of `dot.wgsl` leaves for `n` products (4 per thread).
fn dot_partials(n: u32) -> u32 {
    n.div_ceil(4 * WORKGROUP).max(1)
}

/// Workgroups for `groups` units of work, spread over a 2-D grid above the 65535 limit.
fn grid(groups: u32) -> CubeCount {
    let groups = groups.max(1);
    let x = groups.min(65535);
    CubeCount::Static(x, groups.div_ceil(x), 1)
}

fn empty_like(t: &CubeTensor, elements: usize) -> CubeTensor {
    let handle = t.client.empty(elements * 4);
    CubeTensor::new_contiguous(
        t.client.clone(),
        t.device.clone(),
        Shape::new([elements]),
        handle,
        DType::F32,
    )
}

fn params_buffer(t: &CubeTensor, params: &[u32]) -> cubecl::server::Handle {
    let bytes: Vec<u8> = params.iter().flat_map(|p| p.to_le_bytes()).collect();
    t.client.create_from_slice(&bytes)
}

fn read(t: &CubeTensor) -> cubecl::server::BufferBinding {
    t.handle.clone().binding()
}

impl SapKernels for CubeBackend {
    fn probe_adam_kernel(
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        params: Vec<u32>,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (grad, m, v) = (
            into_contiguous(grad),
            into_contiguous(m),
            into_contiguous(v),
        );
        let n = params[0] as usize;
        let (probe, m_out, v_out) = (
            empty_like(&grad, n),
            empty_like(&grad, n),
            empty_like(&grad, n),
        );
        let args = KernelArguments::new()
            .with_buffer_io(read(&grad), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&m), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&v), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&probe), BufferIOAttr::WriteOnly)
            .with_buffer_io(read(&m_out), BufferIOAttr::WriteOnly)
            .with_buffer_io(read(&v_out), BufferIOAttr::WriteOnly)
            .with_buffer_io(
                params_buffer(&grad, &params).binding(),
                BufferIOAttr::ReadOnly,
            );
        let kernel = SourceKernel::new(ProbeAdamWgsl, CubeDim::new_1d(WORKGROUP));
        grad.client
            .launch(Box::new(kernel), grid((n as u32).div_ceil(WORKGROUP)), args);
        (probe, m_out, v_out)
    }

    fn axpy_kernel(w: CubeTensor, g: CubeTensor, params: Vec<u32>) -> CubeTensor {
        let (w, g) = (into_contiguous(w), into_contiguous(g));
        let n = params[0] as usize;
        let out = empty_like(&w, n);
        let args = KernelArguments::new()
            .with_buffer_io(read(&w), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&g), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&out), BufferIOAttr::WriteOnly)
            .with_buffer_io(params_buffer(&w, &params).binding(), BufferIOAttr::ReadOnly);
        let kernel = SourceKernel::new(AxpyWgsl, CubeDim::new_1d(WORKGROUP));
        w.client
            .launch(Box::new(kernel), grid((n as u32).div_ceil(WORKGROUP)), args);
        out
    }

    fn dot_pass_kernel(a: CubeTensor, b: CubeTensor, params: Vec<u32>) -> CubeTensor {
        let (a, b) = (into_contiguous(a), into_contiguous(b));
        let groups = dot_partials(params[0]);
        let partial = empty_like(&a, groups as usize);
        let args = KernelArguments::new()
            .with_buffer_io(read(&a), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&b), BufferIOAttr::ReadOnly)
            .with_buffer_io(read(&partial), BufferIOAttr::WriteOnly)
            .with_buffer_io(params_buffer(&a, &params).binding(), BufferIOAttr::ReadOnly);
        let kernel = SourceKernel::new(DotWgsl, CubeDim::new_1d(WORKGROUP));
        a.client.launch(Box::new(kernel), grid(groups), args);
        partial
    }
}

/// Whether a tensor lives on the wgpu backend (where the WGSL kernels run).
pub fn on_wgpu(t: &Tensor<1>) -> bool {
    matches!(t.device().as_dispatch(), DispatchDevice::Cube(_))
}

/// Which implementation to use: the WGSL kernel when the tensor is on wgpu, unless forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    Auto,
    TensorOps,
}

/// The probe update: returns (V, m', v').
pub fn probe_adam(
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    hp: &ProbeAdam,
    how: Implementation,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    if how == Implementation::TensorOps || !on_wgpu(&grad) {
        return probe_adam_ops(grad, m, v, hp);
    }
    let [n] = grad.dims();
    let (c1, c2) = hp.corrections();
    let params = vec![
        n as u32,
        hp.plain_gradient as u32,
        hp.lr.to_bits(),
        hp.beta1.to_bits(),
        hp.beta2.to_bits(),
        hp.eps.to_bits(),
        c1.to_bits(),
        c2.to_bits(),
    ];
    let (p, m, v) = <Dispatch as SapKernels>::probe_adam_kernel(
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        params,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The tensor-op twin of `probe_adam.wgsl`.
pub fn probe_adam_ops(
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    hp: &ProbeAdam,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    if hp.plain_gradient {
        return (grad.mul_scalar(hp.lr), m, v);
    }
    let (c1, c2) = hp.corrections();
    let m = m.mul_scalar(hp.beta1) + grad.clone().mul_scalar(1.0 - hp.beta1);
    let v = v.mul_scalar(hp.beta2) + (grad.clone() * grad).mul_scalar(1.0 - hp.beta2);
    let probe = m.clone().div_scalar(c1).mul_scalar(hp.lr)
        / v.clone().div_scalar(c2).sqrt().add_scalar(hp.eps);
    (probe, m, v)
}

/// w + scale·g.
pub fn axpy(w: Tensor<1>, g: Tensor<1>, scale: f32, how: Implementation) -> Tensor<1> {
    if how == Implementation::TensorOps || !on_wgpu(&w) {
        return axpy_ops(w, g, scale);
    }
    let [n] = w.dims();
    Tensor::from_dispatch(<Dispatch as SapKernels>::axpy_kernel(
        w.into_dispatch(),
        g.into_dispatch(),
        vec![n as u32, scale.to_bits()],
    ))
}

/// The tensor-op twin of `axpy.wgsl`.
pub fn axpy_ops(w: Tensor<1>, g: Tensor<1>, scale: f32) -> Tensor<1> {
    w + g.mul_scalar(scale)
}

/// a·b as a one-element tensor.
pub fn dot(a: Tensor<1>, b: Tensor<1>, how: Implementation) -> Tensor<1> {
    if how == Implementation::TensorOps || !on_wgpu(&a) {
        return dot_ops(a, b);
    }
    let [n] = a.dims();
    let mut partial = Tensor::from_dispatch(<Dispatch as SapKernels>::dot_pass_kernel(
        a.into_dispatch(),
        b.into_dispatch(),
        vec![n as u32, 0],
    ));
    // Sum the partial sums until one is left.
    while partial.dims()[0] > 1 {
        let [n] = partial.dims();
        partial = Tensor::from_dispatch(<Dispatch as SapKernels>::dot_pass_kernel(
            partial.clone().into_dispatch(),
            partial.into_dispatch(),
            vec![n as u32, 1],
        ));
    }
    partial
}

/// The tensor-op twin of `dot.wgsl`.
pub fn dot_ops(a: Tensor<1>, b: Tensor<1>) -> Tensor<1> {
    (a * b).sum()
}

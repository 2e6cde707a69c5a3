// SAP's fused probe update: one Adam ascent step from V = 0, moments carried across steps.
//   m' = β1·m + (1 − β1)·g        v' = β2·v + (1 − β2)·g²
//   V  = lr · (m' / c1) / (sqrt(v' / c2) + eps)      (c1, c2: bias corrections)
// With mode = 1 (the plain-gradient variant) V = lr · g and the moments pass through.
// Twin: safeprobe_train::kernels::probe_adam_ops.

@group(0) @binding(0) var<storage, read_write> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> m_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> v_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> probe: array<f32>;
@group(0) @binding(4) var<storage, read_write> m_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_out: array<f32>;
// [n, mode, lr, beta1, beta2, eps, c1, c2] with the floats as bit patterns.
@group(0) @binding(6) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    // Parameters into locals before any store: bindings may alias.
    let n = params[0];
    let mode = params[1];
    let lr = bitcast<f32>(params[2]);
    let beta1 = bitcast<f32>(params[3]);
    let beta2 = bitcast<f32>(params[4]);
    let eps = bitcast<f32>(params[5]);
    let c1 = bitcast<f32>(params[6]);
    let c2 = bitcast<f32>(params[7]);
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= n) {
        return;
    }
    let g = grad[i];
    if (mode == 1u) {
        probe[i] = lr * g;
        m_out[i] = m_in[i];
        v_out[i] = v_in[i];
        return;
    }
    let m = beta1 * m_in[i] + (1.0 - beta1) * g;
    let v = beta2 * v_in[i] + (1.0 - beta2) * g * g;
    probe[i] = lr * (m / c1) / (sqrt(v / c2) + eps);
    m_out[i] = m;
    v_out[i] = v;
}

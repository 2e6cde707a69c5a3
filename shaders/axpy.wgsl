// The scaled perturbation W + ε·g/(‖g‖ + 1e-8) of one trainable tensor, as out = w + scale·g.
// Twin: safeprobe_train::kernels::axpy_ops.

@group(0) @binding(0) var<storage, read_write> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
// [n, scale as bits]
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = params[0];
    let scale = bitcast<f32>(params[1]);
    let i = gid.x + gid.y * groups.x * 256u;
    if (i >= n) {
        return;
    }
    out[i] = w[i] + scale * g[i];
}

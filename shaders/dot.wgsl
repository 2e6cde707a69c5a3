// One pass of a dot-product reduction: each workgroup sums a·b (mode 0) or a (mode 1) over
// its 1024 elements into partial[group]. The host repeats mode 1 until one value is left.
// Norms are dot(x, x); the metrics' cosines are dot(a, b) / (‖a‖·‖b‖).
// Twin: safeprobe_train::kernels::dot_ops.

@group(0) @binding(0) var<storage, read_write> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;
// [n, mode]
@group(0) @binding(3) var<storage, read_write> params: array<u32>;

var<workgroup> sums: array<f32, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = params[0];
    let mode = params[1];
    let group = wid.x + wid.y * groups.x;
    let base = group * 1024u;
    var s = 0.0;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let i = base + k * 256u + lid.x;
        if (i < n) {
            if (mode == 1u) {
                s = s + a[i];
            } else {
                s = s + a[i] * b[i];
            }
        }
    }
    sums[lid.x] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride >> 1u) {
        if (lid.x < stride) {
            sums[lid.x] = sums[lid.x] + sums[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        partial[group] = sums[0];
    }
}

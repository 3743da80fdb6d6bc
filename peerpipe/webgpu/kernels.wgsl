// The kernels of a WebGPU stage: one source for Python (wgpu) and the browser node.
//
// Whoever compiles this prepends one line that names the weights' storage type:
//   "alias WT = f32;"  or  "enable f16; alias WT = f16;"
// Everything is computed in f32; only the large matrices (and the embedding) are stored in WT.
//
// Every kernel reads two small buffers first: `p`, its constants (sizes, flags; written once at
// load), and `step`, what changes per forward (written before each submit):
//   step[0] = rows (tokens in this forward), step[1] = selected rows (the head's),
//   step[4 + 2t] = KV slot of row t, step[5 + 2t] = its position,
//   step[4 + 2 * MAX_ROWS + i] = the i-th selected row (p names MAX_ROWS where it is needed).
// A kernel takes its row count from step[p[ROWS_FIELD]] so the head can run on selected rows.

// ---- embedding: out[t, :] = table[ids[t], :] ----
@group(0) @binding(0) var<storage, read> em_p: array<u32>;  // hidden, rows_field
@group(0) @binding(1) var<storage, read> em_step: array<u32>;
@group(0) @binding(2) var<storage, read> em_ids: array<u32>;
@group(0) @binding(3) var<storage, read> em_table: array<WT>;
@group(0) @binding(4) var<storage, read_write> em_out: array<f32>;

@compute @workgroup_size(256)
fn embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let hidden = em_p[0];
  let t = wid.y;
  let i = wid.x * 256u + lid;
  if (t < em_step[em_p[1]] && i < hidden) {
    em_out[t * hidden + i] = f32(em_table[em_ids[t] * hidden + i]);
  }
}

// ---- RMSNorm of each row: y = x / sqrt(mean(x^2) + eps) * w ----
@group(0) @binding(0) var<storage, read> rn_p: array<u32>;  // hidden, eps (f32 bits), rows_field
@group(0) @binding(1) var<storage, read> rn_step: array<u32>;
@group(0) @binding(2) var<storage, read> rn_x: array<f32>;
@group(0) @binding(3) var<storage, read> rn_w: array<f32>;
@group(0) @binding(4) var<storage, read_write> rn_y: array<f32>;
var<workgroup> rn_red: array<f32, 256>;

@compute @workgroup_size(256)
fn rmsnorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let hidden = rn_p[0];
  let t = wid.x;
  let live = t < rn_step[rn_p[2]];
  var ss = 0.0;
  if (live) {
    for (var i = lid; i < hidden; i += 256u) {
      let v = rn_x[t * hidden + i];
      ss += v * v;
    }
  }
  rn_red[lid] = ss;
  workgroupBarrier();
  for (var s = 128u; s > 0u; s >>= 1u) {
    if (lid < s) { rn_red[lid] += rn_red[lid + s]; }
    workgroupBarrier();
  }
  let inv = inverseSqrt(rn_red[0] / f32(hidden) + bitcast<f32>(rn_p[1]));
  if (live) {
    for (var i = lid; i < hidden; i += 256u) {
      rn_y[t * hidden + i] = rn_x[t * hidden + i] * inv * rn_w[i];
    }
  }
}

// ---- RMSNorm of each query and key head in place (Qwen3's q_norm / k_norm) ----
@group(0) @binding(0) var<storage, read> hn_p: array<u32>;  // heads, kv_heads, head_dim, eps bits, row width
@group(0) @binding(1) var<storage, read> hn_step: array<u32>;
@group(0) @binding(2) var<storage, read_write> hn_qkv: array<f32>;
@group(0) @binding(3) var<storage, read> hn_qw: array<f32>;
@group(0) @binding(4) var<storage, read> hn_kw: array<f32>;
var<workgroup> hn_red: array<f32, 64>;

@compute @workgroup_size(64)
fn headnorm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let heads = hn_p[0];
  let d = hn_p[2];
  let head = wid.x;
  let t = wid.y;
  let live = t < hn_step[0];
  let base = t * hn_p[4] + head * d;
  var ss = 0.0;
  if (live) {
    for (var i = lid; i < d; i += 64u) {
      let v = hn_qkv[base + i];
      ss += v * v;
    }
  }
  hn_red[lid] = ss;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) { hn_red[lid] += hn_red[lid + s]; }
    workgroupBarrier();
  }
  let inv = inverseSqrt(hn_red[0] / f32(d) + bitcast<f32>(hn_p[3]));
  if (live) {
    for (var i = lid; i < d; i += 64u) {
      var w = 0.0;
      if (head < heads) { w = hn_qw[i]; } else { w = hn_kw[i]; }
      hn_qkv[base + i] = hn_qkv[base + i] * inv * w;
    }
  }
}

// ---- y[t, n] (+)= x[t, :] . w[n, :] + b[n] for up to MM_ROWS rows per workgroup ----
// One workgroup per output column (and per MM_ROWS rows): its 64 threads stride the column's
// weights as vec4 (coalesced), which is what a memory-bound decode step wants.
const MM_ROWS = 8u;
@group(0) @binding(0) var<storage, read> mm_p: array<u32>;  // out, in, has_bias, accumulate, rows_field
@group(0) @binding(1) var<storage, read> mm_step: array<u32>;
@group(0) @binding(2) var<storage, read> mm_x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> mm_w: array<vec4<WT>>;
@group(0) @binding(4) var<storage, read> mm_b: array<f32>;
@group(0) @binding(5) var<storage, read_write> mm_y: array<f32>;
var<workgroup> mm_red: array<array<f32, 64>, 8>;

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let n_out = mm_p[0];
  let k4 = mm_p[1] / 4u;
  let rows = mm_step[mm_p[4]];
  let n = wid.x + wid.y * 32768u;
  let t0 = wid.z * MM_ROWS;
  var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
  if (n < n_out && t0 < rows) {
    let count = min(MM_ROWS, rows - t0);
    for (var k = lid; k < k4; k += 64u) {
      let w = vec4<f32>(mm_w[n * k4 + k]);
      for (var r = 0u; r < count; r++) {
        acc[r] += dot(w, mm_x[(t0 + r) * k4 + k]);
      }
    }
  }
  for (var r = 0u; r < MM_ROWS; r++) { mm_red[r][lid] = acc[r]; }
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) {
      for (var r = 0u; r < MM_ROWS; r++) { mm_red[r][lid] += mm_red[r][lid + s]; }
    }
    workgroupBarrier();
  }
  let t = t0 + lid;
  if (lid < MM_ROWS && n < n_out && t < rows) {
    var v = mm_red[lid][0];
    if (mm_p[2] == 1u) { v += mm_b[n]; }
    if (mm_p[3] == 1u) { v += mm_y[t * n_out + n]; }
    mm_y[t * n_out + n] = v;
  }
}

// ---- rotary embedding of queries and keys, in place; each head's dims are interleaved pairs ----
@group(0) @binding(0) var<storage, read> rp_p: array<u32>;  // heads, kv_heads, head_dim, row width
@group(0) @binding(1) var<storage, read> rp_step: array<u32>;
@group(0) @binding(2) var<storage, read_write> rp_qkv: array<f32>;
@group(0) @binding(3) var<storage, read> rp_cs: array<vec2<f32>>;  // [position, head_dim / 2] (cos, sin)

@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let half = rp_p[2] / 2u;
  let t = wid.y;
  let pair = wid.x * 64u + lid;
  if (t < rp_step[0] && pair < (rp_p[0] + rp_p[1]) * half) {
    let head = pair / half;
    let i = pair % half;
    let at = t * rp_p[3] + head * rp_p[2] + 2u * i;
    let cs = rp_cs[rp_step[5u + 2u * t] * half + i];
    let a = rp_qkv[at];
    let b = rp_qkv[at + 1u];
    rp_qkv[at] = a * cs.x - b * cs.y;
    rp_qkv[at + 1u] = b * cs.x + a * cs.y;
  }
}

// ---- keys and values of each row into the layer's cache [slot, position, 2, kv_heads, head_dim] ----
@group(0) @binding(0) var<storage, read> kw_p: array<u32>;  // heads, kv_heads, head_dim, row width, positions
@group(0) @binding(1) var<storage, read> kw_step: array<u32>;
@group(0) @binding(2) var<storage, read> kw_qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> kw_cache: array<f32>;

@compute @workgroup_size(64)
fn kv_write(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let width = 2u * kw_p[1] * kw_p[2];
  let t = wid.y;
  let i = wid.x * 64u + lid;
  if (t < kw_step[0] && i < width) {
    let slot = kw_step[4u + 2u * t];
    let pos = kw_step[5u + 2u * t];
    kw_cache[(slot * kw_p[4] + pos) * width + i] = kw_qkv[t * kw_p[3] + kw_p[0] * kw_p[2] + i];
  }
}

// ---- attention of one query head of one row over its session's cached positions ----
// Scores go to a scratch row (positions of one session can be many more than a workgroup
// holds), then softmax, then each thread sums the values of its own dims.
@group(0) @binding(0) var<storage, read> at_p: array<u32>;  // heads, kv_heads, head_dim, row width, positions, window, scale bits, scratch stride
@group(0) @binding(1) var<storage, read> at_step: array<u32>;
@group(0) @binding(2) var<storage, read> at_qkv: array<f32>;
@group(0) @binding(3) var<storage, read> at_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> at_scores: array<f32>;
@group(0) @binding(5) var<storage, read_write> at_out: array<f32>;
var<workgroup> at_red: array<f32, 64>;

@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let heads = at_p[0];
  let kvh = at_p[1];
  let d = at_p[2];
  let head = wid.x;
  let t = wid.y;
  let live = t < at_step[0];
  var slot = 0u;
  var pos = 0u;
  if (live) {
    slot = at_step[4u + 2u * t];
    pos = at_step[5u + 2u * t];
  }
  var lo = 0u;
  let window = at_p[5];
  if (window > 0u && pos + 1u > window) { lo = pos + 1u - window; }
  let n = pos + 1u - lo;
  let kv_head = head / (heads / kvh);
  let q = t * at_p[3] + head * d;
  let row = 2u * kvh * d;  // one position of the cache
  let scratch = (t * heads + head) * at_p[7];
  let scale = bitcast<f32>(at_p[6]);

  var best = -3.4e38;
  if (live) {
    for (var j = lid; j < n; j += 64u) {
      let k = ((slot * at_p[4] + lo + j) * row) + kv_head * d;
      var s = 0.0;
      for (var i = 0u; i < d; i++) { s += at_qkv[q + i] * at_cache[k + i]; }
      s *= scale;
      at_scores[scratch + j] = s;
      best = max(best, s);
    }
  }
  at_red[lid] = best;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) { at_red[lid] = max(at_red[lid], at_red[lid + s]); }
    workgroupBarrier();
  }
  best = at_red[0];
  workgroupBarrier();
  var total = 0.0;
  if (live) {
    for (var j = lid; j < n; j += 64u) {
      let e = exp(at_scores[scratch + j] - best);
      at_scores[scratch + j] = e;
      total += e;
    }
  }
  at_red[lid] = total;
  workgroupBarrier();
  for (var s = 32u; s > 0u; s >>= 1u) {
    if (lid < s) { at_red[lid] += at_red[lid + s]; }
    workgroupBarrier();
  }
  total = at_red[0];
  storageBarrier();  // this workgroup's scores, written above, are read by other threads below
  if (live) {
    for (var i = lid; i < d; i += 64u) {
      var acc = 0.0;
      for (var j = 0u; j < n; j++) {
        acc += at_scores[scratch + j] * at_cache[(slot * at_p[4] + lo + j) * row + (kvh + kv_head) * d + i];
      }
      at_out[t * heads * d + head * d + i] = acc / total;
    }
  }
}

// ---- SwiGLU: out[t, i] = silu(gate[t, i]) * up[t, i], gate|up side by side in each row ----
@group(0) @binding(0) var<storage, read> sm_p: array<u32>;  // intermediate
@group(0) @binding(1) var<storage, read> sm_step: array<u32>;
@group(0) @binding(2) var<storage, read> sm_gu: array<f32>;
@group(0) @binding(3) var<storage, read_write> sm_out: array<f32>;

@compute @workgroup_size(256)
fn silu_mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let inter = sm_p[0];
  let t = wid.y;
  let i = wid.x * 256u + lid;
  if (t < sm_step[0] && i < inter) {
    let g = sm_gu[t * 2u * inter + i];
    sm_out[t * inter + i] = g / (1.0 + exp(-g)) * sm_gu[t * 2u * inter + inter + i];
  }
}

// ---- copy the selected rows (the last of each session, for the head) into a compact buffer ----
@group(0) @binding(0) var<storage, read> gr_p: array<u32>;  // hidden, max rows
@group(0) @binding(1) var<storage, read> gr_step: array<u32>;
@group(0) @binding(2) var<storage, read> gr_x: array<f32>;
@group(0) @binding(3) var<storage, read_write> gr_out: array<f32>;

@compute @workgroup_size(256)
fn gather_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let hidden = gr_p[0];
  let r = wid.y;
  let i = wid.x * 256u + lid;
  if (r < gr_step[1] && i < hidden) {
    gr_out[r * hidden + i] = gr_x[gr_step[4u + 2u * gr_p[1] + r] * hidden + i];
  }
}

// ---- the seed's benchmark: c = a @ b for n x n matrices (n a multiple of 32) ----
// Each thread computes a 4 x 4 block from registers (no workgroup memory, no barriers), which
// suits real GPUs and software adapters (lavapipe, SwiftShader) alike.
@group(0) @binding(0) var<storage, read> bm_p: array<u32>;  // n
@group(0) @binding(1) var<storage, read> bm_a: array<f32>;
@group(0) @binding(2) var<storage, read> bm_b: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> bm_c: array<vec4<f32>>;

@compute @workgroup_size(8, 8)
fn bench_matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
  let n = bm_p[0];
  let n4 = n / 4u;
  let row = gid.y * 4u;
  let col4 = gid.x;
  if (row >= n || col4 >= n4) { return; }
  var c0 = vec4<f32>(0.0);
  var c1 = vec4<f32>(0.0);
  var c2 = vec4<f32>(0.0);
  var c3 = vec4<f32>(0.0);
  for (var k = 0u; k < n; k++) {
    let b = bm_b[k * n4 + col4];
    c0 += bm_a[row * n + k] * b;
    c1 += bm_a[(row + 1u) * n + k] * b;
    c2 += bm_a[(row + 2u) * n + k] * b;
    c3 += bm_a[(row + 3u) * n + k] * b;
  }
  bm_c[row * n4 + col4] = c0;
  bm_c[(row + 1u) * n4 + col4] = c1;
  bm_c[(row + 2u) * n4 + col4] = c2;
  bm_c[(row + 3u) * n4 + col4] = c3;
}

// A browser node: joins the room through its host with the secret in the URL fragment (or the
// credential a first join left in sessionStorage), then runs the stage program the host sends
// with the same WGSL kernels as Python's WebGPU stages. Protocol: peerpipe/webgpu/browser_link.py.
"use strict";

const PROTOCOL = "peerpipe-browser-1";
const CREDENTIAL = "peerpipe-credential";
const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();
const dec = new TextDecoder();

function b64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}
function unb64(text) {
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}
function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
function show(state, error) {
  $("state").textContent = state;
  $("error").hidden = !error;
  $("error").textContent = error || "";
  document.body.dataset.state = state;
}

async function secretId(secret) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", concat(enc.encode("peerpipe-browser-id"), secret)));
  return Array.from(digest.slice(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
}

// One direction's AES-GCM; the IV counts frames, as Sealer does in Python.
class Sealer {
  constructor(key) { this.key = key; this.count = 0n; }
  iv() {
    const iv = new Uint8Array(12);
    new DataView(iv.buffer).setBigUint64(4, this.count++);
    return iv;
  }
  async seal(header, payload = new Uint8Array(0)) {
    const head = enc.encode(JSON.stringify(header));
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, head.length, true);
    return crypto.subtle.encrypt({ name: "AES-GCM", iv: this.iv() }, this.key, concat(len, head, payload));
  }
  async open(frame) {
    const plain = new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: this.iv() }, this.key, frame));
    const size = new DataView(plain.buffer).getUint32(0, true);
    return [JSON.parse(dec.decode(plain.subarray(4, 4 + size))), plain.subarray(4 + size)];
  }
}

async function deriveKeys(secret, browserNonce, hostNonce) {
  const ikm = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveBits"]);
  const bits = new Uint8Array(await crypto.subtle.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: concat(browserNonce, hostNonce), info: enc.encode(PROTOCOL) }, ikm, 512));
  const key = (raw) => crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt", "decrypt"]);
  return [new Sealer(await key(bits.slice(0, 32))), new Sealer(await key(bits.slice(32)))];
}

// The executor: buffers by the host's ids, pipelines by kernel name, bind groups cached.
class Executor {
  constructor(device, source) {
    this.device = device;
    this.source = source;
    this.weightType = "f32";
    this.modules = new Map();
    this.pipelines = new Map();
    this.groups = new Map();
    this.buffers = new Map();
    this.programs = new Map();
    this.bytes = 0;
  }
  pipeline(kernel) {
    const key = this.weightType + "/" + kernel;
    let p = this.pipelines.get(key);
    if (!p) {
      let module = this.modules.get(this.weightType);
      if (!module) {
        const prelude = this.weightType === "f16" ? "enable f16;\nalias WT = f16;\n" : "alias WT = f32;\n";
        module = this.device.createShaderModule({ code: prelude + this.source });
        this.modules.set(this.weightType, module);
      }
      p = this.device.createComputePipeline({ layout: "auto", compute: { module, entryPoint: kernel } });
      this.pipelines.set(key, p);
    }
    return p;
  }
  group(kernel, ids) {
    const key = this.weightType + "/" + kernel + "/" + ids.join(",");
    let g = this.groups.get(key);
    if (!g) {
      const entries = ids.map((id, i) => ({ binding: i, resource: { buffer: this.buffers.get(id) } }));
      g = this.device.createBindGroup({ layout: this.pipeline(kernel).getBindGroupLayout(0), entries });
      this.groups.set(key, g);
    }
    return g;
  }
  buffer(id, size) {
    const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;
    this.buffers.set(id, this.device.createBuffer({ size, usage }));
    this.bytes += size;
  }
  free(ids) {
    const gone = new Set(ids);
    for (const id of ids) {
      const b = this.buffers.get(id);
      if (b) { this.bytes -= b.size; b.destroy(); this.buffers.delete(id); }
    }
    for (const key of [...this.groups.keys()]) {
      if (key.split("/")[2].split(",").some((id) => gone.has(Number(id)))) this.groups.delete(key);
    }
  }
  write(id, offset, bytes) {
    const padded = bytes.length % 4 ? concat(bytes, new Uint8Array(4 - (bytes.length % 4))) : bytes;
    this.device.queue.writeBuffer(this.buffers.get(id), offset, padded);
  }
  async run(header) {
    let work = header.d;
    if (header.p !== undefined) {  // a program the host sent before, by its id
      if (work) this.programs.set(header.p, work); else work = this.programs.get(header.p);
    }
    const encoder = this.device.createCommandEncoder();
    const pass = encoder.beginComputePass();
    for (const [kernel, ids, x, y, z] of work) {
      pass.setPipeline(this.pipeline(kernel));
      pass.setBindGroup(0, this.group(kernel, ids));
      pass.dispatchWorkgroups(x, y, z);
    }
    pass.end();
    const total = header.r.reduce((n, [, size]) => n + size, 0);
    const staging = total ? this.device.createBuffer({ size: total, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST }) : null;
    let at = 0;
    for (const [id, size] of header.r) { encoder.copyBufferToBuffer(this.buffers.get(id), 0, staging, at, size); at += size; }
    this.device.queue.submit([encoder.finish()]);
    if (!staging) { await this.device.queue.onSubmittedWorkDone(); return new Uint8Array(0); }
    await staging.mapAsync(GPUMapMode.READ);
    const out = new Uint8Array(staging.getMappedRange().slice(0));
    staging.unmap();
    staging.destroy();
    return out;
  }
}

async function openDevice() {
  if (!navigator.gpu) throw new Error("this browser has no WebGPU (it needs a secure page: https, or localhost)");
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new Error("this browser offers no WebGPU adapter");
  const f16 = adapter.features.has("shader-f16");
  const limits = {};
  for (const k of ["maxStorageBufferBindingSize", "maxBufferSize", "maxStorageBuffersPerShaderStage"]) limits[k] = adapter.limits[k];
  const device = await adapter.requestDevice({ requiredFeatures: f16 ? ["shader-f16"] : [], requiredLimits: limits });
  const info = adapter.info || {};
  const name = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ") || "WebGPU adapter";
  return { device, f16, name, maxBinding: limits.maxStorageBufferBindingSize };
}

async function main() {
  const link = new URLSearchParams(location.hash.slice(1)).get("k");
  const saved = sessionStorage.getItem(CREDENTIAL);
  if (!link && !saved) { show("no secret", "open the join link from the room's dashboard (it carries the secret after #)"); return; }
  // A link just opened wins over a credential this tab kept (from another room, or ended since).
  let secret;
  try { secret = unb64(link || saved); } catch { secret = null; }
  if (!secret || secret.length !== 32) {
    if (!link) sessionStorage.removeItem(CREDENTIAL);
    show("refused", "not a valid join link: copy the whole link, or make a new one on the room's dashboard");
    return;
  }
  show("opening WebGPU");
  const gpu = await openDevice();
  $("adapter").textContent = gpu.name + (gpu.f16 ? " (f16)" : "");
  const source = await (await fetch("/webgpu/kernels.wgsl")).text();
  const executor = new Executor(gpu.device, source);
  let lost = "";
  gpu.device.addEventListener("uncapturederror", (e) => { lost = e.error.message; });

  show("connecting");
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/browser-node");
  ws.binaryType = "arraybuffer";
  const nonce = crypto.getRandomValues(new Uint8Array(16));
  let inbound = null, outbound = null, chain = Promise.resolve(), forwards = 0, written = 0;
  // Weights arrive as writes: what has come so far, against what the stage allocated.
  const showHeld = () => {
    $("held").textContent = `${(executor.bytes / 1e6).toFixed(1)} MB (${(written / 1e6).toFixed(1)} MB received)`;
  };
  const send = async (header, payload) => ws.send(await outbound.seal(header, payload));

  ws.onopen = async () => ws.send(JSON.stringify({ v: PROTOCOL, id: await secretId(secret), nonce: b64(nonce) }));
  ws.onclose = () => { if (document.body.dataset.state !== "refused") show("disconnected", $("error").textContent || "the host closed the link; reload to rejoin"); };
  ws.onmessage = (event) => { chain = chain.then(() => handle(event.data)).catch((e) => fail(e)); };

  function fail(e) {
    show("failed", String(e && e.message || e));
    ws.close();
  }
  async function handle(data) {
    if (typeof data === "string") {  // only the host's nonce, or its refusal, come as text
      const msg = JSON.parse(data);
      if (msg.error) { show("refused", msg.error); if (!link) sessionStorage.removeItem(CREDENTIAL); return; }
      if (inbound) throw new Error("unsealed text after the handshake");
      [outbound, inbound] = await deriveKeys(secret, nonce, unb64(msg.nonce));
      const memory = Math.floor((navigator.deviceMemory || 4) / 2 * 2 ** 30);
      await send({ op: "auth", adapter: gpu.name, f16: gpu.f16, max_binding: gpu.maxBinding, memory });
      return;
    }
    if (!inbound) throw new Error("a sealed frame before the handshake");
    const [header, payload] = await inbound.open(data);
    switch (header.op) {
      case "welcome":
        sessionStorage.setItem(CREDENTIAL, header.credential);
        history.replaceState(null, "", location.pathname);  // the one-time link is used: off the address bar
        show("joined");
        break;
      case "note": $("work").textContent = header.text; break;
      case "wt": executor.weightType = header.wt; break;
      case "buffer": executor.buffer(header.id, header.size); showHeld(); break;
      case "free": executor.free(header.ids); showHeld(); break;
      case "write": executor.write(header.id, header.offset, payload); written += payload.length; showHeld(); break;
      case "run": {
        const began = performance.now();
        try {
          const out = await executor.run(header);
          if (lost) throw new Error(lost);
          await send({ op: "done", seq: header.seq }, out);
        } catch (e) {
          await send({ op: "error", seq: header.seq, message: String(e && e.message || e) });
        }
        $("forwards").textContent = String(++forwards);
        $("last-ms").textContent = (performance.now() - began).toFixed(1) + " ms";
        if (document.body.dataset.state === "joined") show("serving");
        break;
      }
      default: throw new Error("unknown op " + header.op);
    }
  }
}

main().catch((e) => show("failed", String(e && e.message || e)));

// The unioncam viewer: talks only to its own origin (/api/*), which holds the server's key.
// Plain JavaScript, no libraries: float16 decoding, the colour map and the overlay are computed here.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    info: null,
    file: null,      // the uploaded File, sent as is with every request
    image: null,     // an HTMLImageElement of it (null if the browser cannot display its format)
    stem: "image",
    target: null,    // the class to explain; null: the predicted class
    run: 0,          // bumped by every new upload or explanation: late answers of older runs are dropped
    abort: null,
    panes: [],
  };

  // ----------------------------------------------------------------------------------- decoding

  /** IEEE 754 half (as its 16 bits) → number. */
  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
    if (exp === 31) return frac ? NaN : sign * Infinity;
    return sign * 2 ** (exp - 15) * (1 + frac / 1024);
  }

  /** The API's map (base64 float16, row-major [H, W], byteorder "little" unless said) → Float32Array. */
  function decodeMap(map) {
    if (map.dtype !== "float16" || !Array.isArray(map.shape) || map.shape.length !== 2) {
      throw new Error(`the map is ${map.dtype} ${JSON.stringify(map.shape)}, not float16 [H, W]`);
    }
    const raw = atob(map.data);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    const [h, w] = map.shape;
    if (bytes.length !== 2 * h * w) throw new Error(`the map has ${bytes.length} bytes, not 2 × ${h} × ${w}`);
    const view = new DataView(bytes.buffer);
    const little = map.byteorder !== "big";
    const values = new Float32Array(h * w);
    for (let i = 0; i < h * w; i++) values[i] = halfToFloat(view.getUint16(2 * i, little));
    return { h, w, values };
  }

  // ----------------------------------------------------------------------------------- colours

  /** Turbo (Mikhailov 2019), its published polynomial fit: t in [0, 1] → [r, g, b] in 0..255. */
  function turbo(t) {
    const c = (a) => a[0] + t * (a[1] + t * (a[2] + t * (a[3] + t * (a[4] + t * a[5]))));
    return [
      c([0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943]),
      c([0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604]),
      c([0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973]),
    ].map((v) => Math.round(255 * Math.min(1, Math.max(0, v))));
  }
  const LUT = Array.from({ length: 256 }, (_, i) => turbo(i / 255));

  /** A canvas of the map's own size, coloured through the LUT (values clamped to [0, 1]). */
  function mapCanvas({ h, w, values }) {
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(w, h);
    for (let i = 0; i < h * w; i++) {
      const v = Number.isFinite(values[i]) ? Math.min(1, Math.max(0, values[i])) : 0;
      const [r, g, b] = LUT[Math.round(v * 255)];
      img.data.set([r, g, b, 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    return c;
  }

  function drawLegend() {
    const c = $("legend");
    const ctx = c.getContext("2d");
    for (let x = 0; x < c.width; x++) {
      const [r, g, b] = LUT[Math.round((x / (c.width - 1)) * 255)];
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, c.height);
    }
  }

  // ----------------------------------------------------------------------------------- messages

  function showError(text) {
    const p = document.createElement("p");
    p.textContent = text;
    $("errors").append(p);
  }

  function clearErrors() {
    $("errors").replaceChildren();
  }

  /** What went wrong, as a sentence: the API's {error: {field, problem, accepted}}, TorchServe's own
   * {type, message}, the viewer's {message}, or the bare status. */
  function sentence(what, status, body) {
    if (body && typeof body === "object") {
      const e = body.error;
      if (e && e.field) {
        let s = `The server refused the ${what}: the ${e.field} ${e.problem}.`;
        if (e.accepted) s += ` It accepts ${e.accepted}.`;
        return s;
      }
      if (body.type === "InvalidKeyException") {
        return `TorchServe refused the ${what}: its key has expired or changed (${body.message}). ` +
          "Renew it with `unioncam token`; the viewer reads the new key at once.";
      }
      if (body.type && body.message) return `TorchServe refused the ${what} (${body.type}): ${body.message}`;
      if (body.message) return body.message;
    }
    if (status === 413) {
      // TorchServe's frontend answers 413 with an empty body: the page says the limit it knows.
      const max = (state.info && state.info.max_body) || 16 * 2 ** 20;
      return `The ${what} is larger than the server accepts: at most ${max / 2 ** 20} MiB per request (HTTP 413). ` +
        "Send a smaller file; it is resized to the model's size anyway.";
    }
    const text = typeof body === "string" && body.trim() ? `: ${body.trim().slice(0, 200)}` : ".";
    return `The ${what} failed with HTTP ${status}${text}`;
  }

  /** The file as an octet-stream part: TorchServe hands text/* parts to the handler as text, not bytes,
   * and every upload must reach the server's image decoder as the bytes it is. */
  const asBytes = (file) => new Blob([file], { type: "application/octet-stream" });

  async function readBody(r) {
    const text = await r.text();
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
  /** Integers as they are; other numbers with `d` decimals, or 3 significant digits when that shows 0. */
  const fmt = (x, d = 3) => {
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    return x !== 0 && Math.abs(x) < 0.5 * 10 ** -d ? x.toPrecision(3) : x.toFixed(d);
  };
  /** Two numbers with the fewest significant digits (3 to 8) that tell them apart, when they differ. */
  const fmtPair = (a, b) => {
    if (typeof a !== "number" || typeof b !== "number" || a === b) return [fmt(a), fmt(b)];
    let p = 3;
    while (p < 8 && a.toPrecision(p) === b.toPrecision(p)) p += 1;
    return p === 3 ? [fmt(a), fmt(b)] : [a.toPrecision(p), b.toPrecision(p)];
  };
  const wait = (ms, signal) => new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); reject(new DOMException("aborted", "AbortError")); });
  });

  // ----------------------------------------------------------------------------------- set-up

  async function loadInfo() {
    try {
      const r = await fetch("/api/info");
      const info = await r.json();
      state.info = info;
      const size = info.image_size ? `images resized to ${info.image_size}×${info.image_size}` : "";
      const model = info.architecture ? `model ${info.model} (${info.architecture})` : `model ${info.model}`;
      const weights = info.weights ? `weights ${info.weights}` : "";
      $("model-info").textContent = [model, weights, size, `default ${info.method}, θ = ${info.theta}`]
        .filter(Boolean).join(" · ");
      const random = typeof info.weights === "string" && info.weights.startsWith("random");
      $("weights-warning").hidden = !random;
      if (random) {
        $("weights-warning").textContent = `The served ${info.architecture || "model"} has RANDOM weights ` +
          `(${info.weights}): its classes and maps mean nothing. Restart the server without --weights ` +
          "for trained ones.";
      }
      const box = $("methods");
      box.replaceChildren();
      for (const m of info.methods) {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "checkbox";
        input.name = "method";
        input.value = m;
        input.checked = m === info.method;
        label.append(input, ` ${m}`);
        if (info.masked.includes(m)) {
          const hint = document.createElement("span");
          hint.className = "muted";
          hint.textContent = " (one forward per channel: slower than the gradient methods)";
          label.append(hint);
        }
        box.append(label);
      }
      $("theta").value = info.theta;
      $("theta-value").textContent = info.theta;
      if (info.architecture === "shapes" && !state.file) {
        $("results-hint").textContent = "Choose an image: samples/shapes/*.png in the project folder are " +
          "shapes this model knows (disk, square, triangle, cross, ring). Then a class, or “Explain”.";
      }
    } catch (e) {
      $("model-info").textContent = "";
      showError(`The viewer could not read the server's settings (${e.message}). Is \`unioncam serve --viewer\` still running?`);
    }
  }

  // ----------------------------------------------------------------------------------- upload

  async function useFile(file) {
    if (!file) return;
    state.run++;
    if (state.abort) state.abort.abort();
    clearErrors();
    $("results").replaceChildren();
    state.panes = [];
    state.file = file;
    state.stem = (file.name || "image").replace(/\.[^.]*$/, "") || "image";
    state.target = null;
    state.image = null;
    $("explain").disabled = true;
    const list = $("predictions");
    list.replaceChildren(Object.assign(document.createElement("li"), { className: "muted", textContent: "predicting…" }));
    const max = (state.info && state.info.max_body) || 16 * 2 ** 20;
    if (file.size > max) {
      list.replaceChildren();
      showError(`This file is ${(file.size / 2 ** 20).toFixed(1)} MiB; the server takes at most ${max / 2 ** 20} MiB.`);
      return;
    }
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.hidden = true;
    preview.alt = `the uploaded image ${file.name}`;
    preview.onload = () => { preview.hidden = false; state.image = preview; state.panes.forEach(render); };
    preview.onerror = () => { preview.hidden = true; };
    preview.src = URL.createObjectURL(file);

    const run = state.run;
    const form = new FormData();
    form.append("image", asBytes(file), file.name || "image");
    let r, body;
    try {
      r = await fetch("/api/predictions", { method: "POST", body: form });
      body = await readBody(r);
    } catch (e) {
      if (run !== state.run) return;
      list.replaceChildren();
      showError(`The viewer's server did not answer (${e.message}). Is \`unioncam serve --viewer\` still running?`);
      return;
    }
    if (run !== state.run) return;
    if (!r.ok) {
      list.replaceChildren();
      showError(sentence("image", r.status, body));
      return;
    }
    showPredictions(body.predictions || []);
  }

  function showPredictions(preds) {
    const list = $("predictions");
    list.replaceChildren();
    for (const p of preds) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "prediction";
      b.dataset.class = p.class;
      b.setAttribute("aria-pressed", "false");
      b.textContent = `${p.class_name} (${p.class}) — ${(100 * p.probability).toFixed(1)} %`;
      b.addEventListener("click", () => { selectTarget(p.class); explainAll(); });
      li.append(b);
      list.append(li);
    }
    if (preds.length) selectTarget(preds[0].class);
    $("explain").disabled = false;
    $("results-hint").textContent = "Choose a class above, or “Explain” for the most probable one.";
  }

  function selectTarget(cls) {
    state.target = cls;
    for (const b of document.querySelectorAll(".prediction")) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.class) === cls));
    }
  }

  // ----------------------------------------------------------------------------------- explanations

  function explainAll() {
    if (!state.file) return;
    const methods = [...document.querySelectorAll('input[name="method"]:checked')].map((i) => i.value);
    clearErrors();
    if (!methods.length) {
      showError("Choose at least one method.");
      return;
    }
    state.run++;
    if (state.abort) state.abort.abort();
    state.abort = new AbortController();
    $("results").replaceChildren();
    state.panes = methods.map((m) => newPane(m));
    // All at once: the server answers masked-forward methods beyond its slots with 503 + Retry-After,
    // and each pane waits and retries on its own.
    for (const pane of state.panes) explainOne(pane, state.run, state.abort.signal);
  }

  function newPane(method) {
    const node = $("pane-template").content.firstElementChild.cloneNode(true);
    const pane = {
      method, node, result: null, map: null, started: performance.now(), wall: null, timer: null, note: "",
      title: node.querySelector(".pane-title"),
      status: node.querySelector(".status"),
      canvas: node.querySelector(".overlay"),
      timings: node.querySelector(".timings"),
      details: node.querySelector(".details"),
      png: node.querySelector(".download-png"),
      json: node.querySelector(".download-json"),
      progress: node.querySelector(".progress"),
      bar: node.querySelector(".progress-bar"),
      barText: node.querySelector(".progress-text"),
    };
    node.dataset.method = method;
    pane.title.textContent = method;
    pane.canvas.setAttribute("role", "img");
    pane.canvas.setAttribute("aria-label", `${method} map over the image`);
    pane.png.addEventListener("click", () => pane.canvas.toBlob((b) => save(b, `${state.stem}.${method}.png`), "image/png"));
    pane.json.addEventListener("click", () => save(new Blob([JSON.stringify(pane.result, null, 2)],
      { type: "application/json" }), `${state.stem}.${method}.json`));
    $("results").append(node);
    return pane;
  }

  function setState(pane, name, note) {
    pane.node.dataset.state = name;
    pane.note = note;
    tick(pane);
  }

  function tick(pane) {
    const elapsed = seconds(performance.now() - pane.started);
    pane.status.textContent = pane.node.dataset.state === "done" || pane.node.dataset.state === "error"
      ? pane.note : `${pane.note} — ${elapsed} elapsed`;
  }

  /** The pane's progress bar from a server's progress line: masked forwards done of the total, %, and
   * the time left at the rate so far. Shown once the explanation has run for a second. */
  function showProgress(pane, p) {
    if (p.state !== "explaining" || !p.total) return;
    pane.bar.max = p.total;
    pane.bar.value = p.done;
    const left = p.eta_s === null ? "" : ` · about ${p.eta_s < 10 ? p.eta_s.toFixed(1) : Math.round(p.eta_s)} s left`;
    pane.barText.textContent = `${p.done} of ${p.total} masked forwards · ${Math.floor(p.percent)} %${left}`;
    pane.node.dataset.progress = JSON.stringify(p);
    if (p.elapsed_s >= 1 || performance.now() - pane.started >= 1000) pane.progress.hidden = false;
  }

  /** A streamed answer (JSON lines: progress, then the answer): the progress drawn as it comes, the
   * last line returned. */
  async function readStream(pane, r, run) {
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        if (!line) continue;
        const obj = JSON.parse(line);
        if (obj && obj.progress) {
          if (run === state.run) showProgress(pane, obj.progress);
        } else {
          last = obj;
        }
      }
      if (done) break;
    }
    if (buffer.trim()) last = JSON.parse(buffer);
    return last;
  }

  async function explainOne(pane, run, signal) {
    pane.timer = setInterval(() => tick(pane), 100);
    setState(pane, "running", "explaining");
    // Masked-forward methods take long enough to follow: the server streams their progress.
    const follow = !!(state.info && (state.info.masked || []).includes(pane.method));
    try {
      for (;;) {
        const form = new FormData();
        form.append("image", asBytes(state.file), state.file.name || "image");
        form.append("method", pane.method);
        if (state.target !== null) form.append("target", String(state.target));
        form.append("theta", $("theta").value);
        if (follow) form.append("progress", "true");
        const r = await fetch("/api/explanations", { method: "POST", body: form, signal });
        const streamed = (r.headers.get("Content-Type") || "").startsWith("application/x-ndjson");
        const body = streamed ? await readStream(pane, r, run) : await readBody(r);
        if (run !== state.run) return;
        pane.progress.hidden = true;
        let status = r.status;
        // After the first progress line the status is sent: an error then comes as the last line.
        if (streamed && body && body.error && typeof body.code === "number") status = body.code;
        const retry = status === 503 && streamed ? 2 : Number.parseInt(r.headers.get("Retry-After") || "", 10);
        if (status === 503 && retry > 0) {
          pane.node.dataset.waited = "1";
          for (let s = retry; s > 0; s--) {
            setState(pane, "waiting", `waiting for a free slot, retrying in ${s} s`);
            await wait(1000, signal);
          }
          setState(pane, "running", "explaining");
          continue;
        }
        if (status < 200 || status >= 300) {
          const text = sentence(`${pane.method} explanation`, status, body);
          setState(pane, "error", text);
          showError(text);
          return;
        }
        pane.wall = performance.now() - pane.started;
        pane.result = body;
        const decoded = decodeMap(body.map);
        pane.flat = decoded.values.every((v) => v === decoded.values[0]);
        let sum = 0, min = Infinity, max = -Infinity, argmax = 0;
        decoded.values.forEach((v, i) => {
          sum += v;
          min = Math.min(min, v);
          if (v > max) { max = v; argmax = i; }
        });
        // What the page read from the map, for anyone checking it against the JSON (the browser test does);
        // argmax: the row-major index of the hottest pixel (the first one).
        pane.node.dataset.mapStats = JSON.stringify({ h: decoded.h, w: decoded.w, sum, min, max, argmax });
        pane.map = mapCanvas(decoded);
        render(pane);
        describe(pane);
        pane.png.disabled = pane.json.disabled = false;
        setState(pane, "done", `done in ${seconds(pane.wall)}`);
        return;
      }
    } catch (e) {
      if (e.name === "AbortError" || run !== state.run) return;
      const text = `The ${pane.method} explanation failed: ${e.message}.`;
      setState(pane, "error", text);
      showError(text);
    } finally {
      clearInterval(pane.timer);
    }
  }

  /** Image and map on the pane's canvas, at the image's aspect (the map covers the whole image, as the
   * server resizes without cropping); the long side between 256 and 1024 pixels. */
  function render(pane) {
    if (!pane.map) return;
    const img = state.image;
    const nw = img ? img.naturalWidth : pane.map.width;
    const nh = img ? img.naturalHeight : pane.map.height;
    const long = Math.max(nw, nh);
    const scale = Math.min(1024, Math.max(256, long)) / long;
    const w = Math.round(nw * scale);
    const h = Math.round(nh * scale);
    if (pane.canvas.width !== w || pane.canvas.height !== h) {
      pane.canvas.width = w;
      pane.canvas.height = h;
    }
    const ctx = pane.canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    ctx.imageSmoothingEnabled = true;
    if (img) ctx.drawImage(img, 0, 0, w, h);
    ctx.globalAlpha = img ? Number($("opacity").value) / 100 : 1;
    ctx.drawImage(pane.map, 0, 0, w, h);
    ctx.globalAlpha = 1;
  }

  function describe(pane) {
    const res = pane.result;
    const d = res.details || {};
    const t = res.timings || {};
    pane.title.textContent = `${res.method}: ${res.class_name} (${res.class}), score ${fmt(res.score)}`;
    pane.timings.textContent = `map: ${fmt(t.explain_ms, 0)} ms on the server (decode ${fmt(t.decode_ms, 0)} ms, ` +
      `encode ${fmt(t.encode_ms, 0)} ms); ${seconds(pane.wall)} in all, waits and transfer included`;
    const parts = [];
    if (pane.flat) {
      parts.push(Object.assign(document.createElement("p"), {
        className: "note",
        textContent: "The map is flat: every pixel has the same value, so it points at nothing in the image.",
      }));
    }
    if (res.method === "unioncam") {
      const p = document.createElement("p");
      p.className = "verdict";
      // AMS keeps the union map only when its gain is strictly higher. Gains equal to float32 rounding
      // (details.beta_tie, decided by the server) are a tie, whichever way the strict rule went.
      const [bu, br] = fmtPair(d.beta_union, d.beta_region);
      if (d.beta_tie || d.beta_union === d.beta_region) {
        p.textContent = `AMS kept the ${d.selected} map on a tie: the score gains β_union = ${bu} and ` +
          `β_region = ${br} are equal to float32 rounding, and the strict rule (the union map only when ` +
          `β_union > β_region) decided.`;
      } else {
        p.textContent = d.selected === "union"
          ? `AMS kept the union map: its score gain β_union = ${bu} beat the region map's β_region = ${br}.`
          : `AMS kept the region map: the union map's score gain β_union = ${bu} did not beat ` +
            `the region map's β_region = ${br}.`;
      }
      const q = document.createElement("p");
      q.textContent = `The θ = ${d.theta} threshold removed ${fmt(100 * d.denoised_fraction, 0)} % of the ` +
        `gradient entries (${fmt(100 * d.denoised_positive_fraction, 0)} % of the positive ones); the denoised ` +
        `map's score gain β_denoise = ${fmt(d.beta_denoise)}. ${d.active_channels} of ${d.channels} channels ` +
        "were active (scored for the region map).";
      parts.push(p, q);
    }
    const rows = [
      ["β_denoise", d.beta_denoise], ["β_region", d.beta_region], ["β_union", d.beta_union],
      ["baseline score b", d.baseline_score], ["kept map", d.selected],
      ["removed gradient entries", d.denoised_fraction === undefined ? undefined : `${fmt(100 * d.denoised_fraction, 1)} %`],
      ["active channels", d.active_channels === undefined ? undefined : `${d.active_channels} of ${d.channels}`],
      ["layer", d.layer], ["channels", d.active_channels === undefined ? d.channels : undefined],
      ["masked forwards", d.masked_forwards], ["θ", d.theta],
    ].filter(([, v]) => v !== undefined && v !== null);
    const dl = document.createElement("dl");
    for (const [k, v] of rows) {
      dl.append(Object.assign(document.createElement("dt"), { textContent: k }),
        Object.assign(document.createElement("dd"), { textContent: fmt(v) }));
    }
    pane.details.replaceChildren(...parts, dl);
  }

  function save(blob, name) {
    if (!blob) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  // ----------------------------------------------------------------------------------- wiring

  function wire() {
    const drop = $("drop");
    $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      useFile(e.dataTransfer.files[0]);
    });
    $("theta").addEventListener("input", (e) => { $("theta-value").textContent = e.target.value; });
    $("opacity").addEventListener("input", (e) => {
      $("opacity-value").textContent = `${e.target.value} %`;
      state.panes.forEach(render);  // no new request: the maps are kept
    });
    $("explain").addEventListener("click", explainAll);
    drawLegend();
    loadInfo();
  }

  wire();
})();

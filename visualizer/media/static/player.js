const $ = (sel) => element.querySelector(sel);
const range = $('.vp-range'), label = $('.vp-label'), play = $('.vp-play'), viewSel = $('.vp-view');
const speed = $('.vp-speed'), loop = $('.vp-loop'), status = $('.vp-status'), cellsBox = $('.vp-cells');
const COLORS = ['#e4572e', '#17bebb', '#ffc914', '#76b041', '#a06cd5', '#2e86ab', '#f18f01', '#c73e1d'];
const cache = new Map();  // url -> Image kept alive: every frame is fetched once, then served from memory
let figures = [], timer = null, follow = true, runId = null, settled = 0, askedView = null, word = -1;
let traced = -1;  // the point whose path is traced (cells with `trace`), -1 for none
const traces = new Map();  // trace url -> its data, fetched on the first click

function preload(url) { if (url && !cache.has(url)) { const im = new Image(); im.src = url; cache.set(url, im); } }
function cells() { return props.cells || []; }
function positions() { return Math.max(1, ...cells().map(c => c.total || 1)); }
function available() { return Math.max(0, ...cells().map(c => (c.steps || []).length)); }
function starts() { return cells().some(c => c.start); }
function progressAt(p) {  // 0..1 through the schedules at position p (with a start, position 1 is 0%)
  return starts() ? (p - 1) / Math.max(1, positions() - 1) : p / positions();
}
function stepsOf(cell) { return (cell.total || 1) - (cell.start ? 1 : 0); }  // sampler steps, the start aside
function stepOf(cell, i) { return cell.start ? i : i + 1; }  // the 1-based step at index i (0: the start)
function indexFor(cell, p) {  // the cell's index into its positions at the same progress as position p
  const n = cell.total || 1, k = Math.ceil(progressAt(p) * stepsOf(cell) - 1e-9);
  return Math.max(0, Math.min(n - 1, cell.start ? k : k - 1));
}
function frameAt(cell, kind, i) {  // newest frame of `kind` at or before step i: [url, step]
  const list = (cell.frames || {})[kind] || [];
  for (let k = Math.min(i, list.length - 1); k >= 0; k--) if (list[k]) return [list[k], k];
  return [null, -1];
}
function stepName(cell, k) {  // the step at index k of a cell's steps, in words
  return cell.start ? (k === 0 ? 'start (initial noise)' : `step ${k}/${cell.total - 1}`) : `step ${k + 1}/${cell.total}`;
}
function loadTrace(url) {
  return traces.has(url) ? Promise.resolve(traces.get(url))
    : fetch(url).then(r => r.json()).then(data => { traces.set(url, data); return data; });
}
async function pick(c, event) {  // trace the point nearest the click, in every cell (they share starting points)
  const cell = cells()[c];
  if (!cell || !cell.trace) return;
  const data = await loadTrace(cell.trace), box = figures[c].imgs[0].getBoundingClientRect();
  const x = (event.clientX - box.left) / box.width * data.size, y = (event.clientY - box.top) / box.height * data.size;
  let best = -1, bestD = Infinity;
  data.points[indexFor(cell, +range.value)].forEach(([px, py], k) => {
    const d = (px - x) ** 2 + (py - y) ** 2; if (d < bestD) { bestD = d; best = k; }
  });
  traced = best;
  await Promise.all(cells().filter(o => o.trace).map(o => loadTrace(o.trace)));
  show(+range.value);
}
function drawTrace(cell, f, i) {  // the traced point's whole path (faint), its path so far, and where it is now
  const data = traced >= 0 && cell.trace ? traces.get(cell.trace) : null;
  if (!data || !data.points[0][traced]) { f.trace.innerHTML = ''; return; }
  const path = data.points.map(frame => frame[traced]), line = pts => pts.map(([x, y]) => `${x},${y}`).join(' ');
  const [x, y] = path[Math.min(i, path.length - 1)];
  f.trace.setAttribute('viewBox', `0 0 ${data.size} ${data.size}`);
  f.trace.innerHTML = `<polyline points="${line(path)}" fill="none" stroke="white" stroke-opacity=".35" stroke-width="1.5"/>` +
    `<polyline points="${line(path.slice(0, i + 1))}" fill="none" stroke="white" stroke-width="2"/>` +
    `<circle cx="${x}" cy="${y}" r="6" fill="none" stroke="white" stroke-width="2"/>`;
}
function percent(share) {  // a share in words: one decimal near 0% and 100%, where rounding would say none or all
  return (share < 0.01 || share > 0.99 ? (share * 100).toFixed(1) : Math.round(share * 100)) + '%';
}
function fmt(x, d) { return Number.isFinite(x) ? x.toFixed(d) : String(x); }

function build() {  // one figure per cell; rebuilt only when the number of cells or the view's shape changes
  const kinds = viewSel.value === 'both' ? ['xt', 'x0'] : [viewSel.value];
  cellsBox.innerHTML = '';
  cellsBox.classList.toggle('both', viewSel.value === 'both');
  const n = cells().length;
  cellsBox.style.gridTemplateColumns = `repeat(${n > 1 ? Math.min(n, n === 4 ? 2 : 4) : 1}, minmax(0, 1fr))`;
  cellsBox.style.setProperty('--vp-size', n > 1 ? '260px' : '400px');
  figures = cells().map((_, c) => {
    const fig = document.createElement('figure'); fig.className = 'vp-cell';
    const imgs = document.createElement('div'); imgs.className = 'vp-imgs';
    const list = kinds.map(kind => { const im = document.createElement('img'); im.alt = kind; return im; });
    const stack = document.createElement('span'); stack.className = 'vp-stack';
    const over = document.createElement('img'); over.className = 'vp-overlay'; over.alt = 'word map'; over.hidden = true;
    const trace = document.createElementNS('http://www.w3.org/2000/svg', 'svg'); trace.classList.add('vp-trace');
    stack.append(list[0], over, trace); imgs.appendChild(stack);
    list[0].addEventListener('click', event => pick(c, event)); list.slice(1).forEach(im => imgs.appendChild(im));
    const cap = document.createElement('figcaption');
    fig.append(imgs, cap); cellsBox.appendChild(fig);
    return { fig, imgs: list, kinds, cap, over, trace };
  });
}

function show(p) {  // put position p on screen: frames, captions, label, plot markers; no request
  p = Math.max(1, Math.min(positions(), p | 0));
  if (String(range.value) !== String(p)) range.value = p;
  const all = cells();
  all.forEach((cell, c) => {
    const f = figures[c]; if (!f) return;
    const i = indexFor(cell, p);
    let shownStep = -1;
    f.imgs.forEach((im, k) => {
      const [url, step] = frameAt(cell, f.kinds[k], i);
      if (url && im.getAttribute('src') !== url) im.src = url;
      shownStep = Math.max(shownStep, step);
      im.style.visibility = url ? 'visible' : 'hidden';
    });
    const [mapUrl] = word >= 0 ? frameAt(cell, 'attn' + word, i) : [null];
    f.over.hidden = !mapUrl;
    if (mapUrl && f.over.getAttribute('src') !== mapUrl) f.over.src = mapUrl;
    f.over.style.opacity = $('.vp-opacity').value;
    drawTrace(cell, f, i);
    const s = (cell.steps || [])[Math.min(i, (cell.steps || []).length - 1)];
    const clicked = !!cell.structure && shownStep === i && stepOf(cell, i) === cell.structure;
    f.fig.classList.toggle('vp-clicked', clicked);  // where structure appears: outlined, and said
    const pending = (shownStep < i ? ` · ${stepName(cell, i)} still computing` : '') +
      (clicked ? ' · structure appears here' : '');
    const none = cell.start && i === 0 ? 'nothing predicted before step 1' : 'not decoded yet';
    f.cap.textContent = all.length > 1 ? cell.label + ' · ' +
      (shownStep < 0 ? none : s ? `${stepName(cell, shownStep)} · t=${fmt(s.t, 0)} · sigma=${fmt(s.sigma, 2)}` : '') +
      (shownStep < 0 ? '' : pending)
      : shownStep < 0 ? none : pending.replace(' · ', '');
  });
  const first = all[0];
  if (first) {
    const i = indexFor(first, p), s = (first.steps || [])[i];
    label.textContent = all.length > 1
      ? `${Math.round(progressAt(p) * 100)}% through each schedule (position ${p} of ${positions()})`
      : s ? (s.index === 0 ? 'Start: the initial noise, before step 1' : `Step ${s.index} of ${first.total - (first.start ? 1 : 0)}`) + ` · timestep t = ${fmt(s.t, 0)} · sigma = ${fmt(s.sigma, 3)} · noise ${percent(s.share)}` +
            (s.evals > 1 ? ` · ${s.evals} model evaluations` : '') : `Step ${stepOf(first, i)} of ${stepsOf(first)} · computing…`;
  } else label.textContent = 'No run yet: press Generate.';
  markers(p); numbers(p); change(p); wordsMarker(p);
}

function words() {  // chips for the first cell's tokens; the Words tab's share plot, drawn once per update
  const w = (cells()[0] || {}).words;
  $('.vp-words').hidden = !w; $('.vp-words-tab').hidden = !w;
  if (!w) { word = -1; return; }
  if (word >= w.tokens.length) word = -1;
  const chips = $('.vp-chips');
  if (chips.dataset.tokens !== w.tokens.join(' ')) {
    chips.dataset.tokens = w.tokens.join(' ');
    chips.innerHTML = w.tokens.map((t, k) => `<button type="button" data-k="${k}">${t}</button>`).join('');
    chips.querySelectorAll('button').forEach(b => b.addEventListener('click', () => {
      word = word === +b.dataset.k ? -1 : +b.dataset.k; words(); show(+range.value);
    }));
  }
  chips.querySelectorAll('button').forEach(b => b.classList.toggle('on', +b.dataset.k === word));
  const n = w.shares.length, top = Math.max(...w.shares.flat(), 1e-6);
  let svg = axes(null, 'step', "share of the words' attention");
  const items = w.tokens.map((t, k) => {
    const color = COLORS[k % COLORS.length];
    const pts = w.shares.map((row, i) => `${scale(i + 1, 1, Math.max(n, 2), X0, X1)},${scale(row[k], 0, top, Y0, Y1)}`).join(' ');
    svg += `<polyline points="${pts}" fill="none" stroke="${color}" stroke-width="${k === word ? 3.5 : 1.5}"/>`;
    return [t, color];
  });
  svg += `<line class="vp-words-line" x1="-9" x2="-9" y1="${Y0}" y2="${Y1}" stroke="crimson" stroke-width="1.5"/>`;
  $('.vp-shares').innerHTML = svg + legend(items);
  const [all] = word >= 0 ? frameAt(cells()[0], 'attn' + word + '-all', 0) : [null];
  $('.vp-all').innerHTML = all ? `<figure><img src="${all}" alt="all steps"><figcaption>“${w.tokens[word]}”, all steps</figcaption></figure>` : '<p class="vp-explain">Pick a word to see its map over all steps.</p>';
}
function wordsMarker(p) {
  const line = $('.vp-words-line'), first = cells()[0];
  if (line && first) {
    const k = stepOf(first, indexFor(first, p)), x = k ? scale(k, 1, Math.max(stepsOf(first), 2), X0, X1) : -9;
    line.setAttribute('x1', x); line.setAttribute('x2', x);
  }
}

function stepX(cell, i) {  // the schedule plot's x for a cell's step index i
  return cell.start ? scale(i, 0, Math.max(cell.total - 1, 1), X0, X1) : scale(i + 1, 1, Math.max(cell.total, 2), X0, X1);
}
function scale(v, lo, hi, a, b) { return hi === lo ? (a + b) / 2 : a + (v - lo) / (hi - lo) * (b - a); }
const X0 = 48, X1 = 600, Y0 = 200, Y1 = 16;
function axes(svg, xlabel, ylabel, y2label) {
  return `<line x1="${X0}" y1="${Y0}" x2="${X1}" y2="${Y0}" stroke="currentColor" stroke-opacity=".4"/>` +
    `<line x1="${X0}" y1="${Y0}" x2="${X0}" y2="${Y1}" stroke="currentColor" stroke-opacity=".4"/>` +
    `<text x="${(X0 + X1) / 2}" y="232" font-size="13" text-anchor="middle" fill="currentColor">${xlabel}</text>` +
    `<text x="14" y="${(Y0 + Y1) / 2}" font-size="13" text-anchor="middle" fill="currentColor" transform="rotate(-90 14 ${(Y0 + Y1) / 2})">${ylabel}</text>` +
    (y2label ? `<text x="628" y="${(Y0 + Y1) / 2}" font-size="13" text-anchor="middle" fill="currentColor" transform="rotate(90 628 ${(Y0 + Y1) / 2})">${y2label}</text>` : '');
}
function legend(items) {
  return items.map(([text, color, dash], k) => `<g transform="translate(${X1 - 170},${Y1 + 4 + k * 16})">` +
    `<line x1="0" y1="0" x2="18" y2="0" stroke="${color}" stroke-width="2" ${dash ? 'stroke-dasharray="4 3"' : ''}/>` +
    `<text x="24" y="4" font-size="12" fill="currentColor">${text}</text></g>`).join('');
}
function plots() {  // drawn once per update; `markers` moves only the slider's marks
  const conv = $('.vp-convergence'), sched = $('.vp-schedule');
  let svg = axes(conv, 'progress through the schedule (%)', '1 - SSIM to the final image') +
    `<text x="${X0 - 4}" y="${Y1 + 4}" font-size="11" text-anchor="end" fill="currentColor">1</text>` +
    `<text x="${X0 - 4}" y="${Y0}" font-size="11" text-anchor="end" fill="currentColor">0</text>` +
    `<text x="${X0}" y="215" font-size="11" text-anchor="middle" fill="currentColor">0</text>` +
    `<text x="${X1}" y="215" font-size="11" text-anchor="middle" fill="currentColor">100</text>`;
  const items = [];
  cells().forEach((cell, c) => {
    if (!cell.curve) return;
    const color = COLORS[c % COLORS.length], n = stepsOf(cell);
    const pts = cell.curve.map((v, i) => `${scale((i + 1) / n, 0, 1, X0, X1)},${scale(v, 0, 1, Y0, Y1)}`).join(' ');
    svg += `<polyline points="${pts}" fill="none" stroke="${color}" stroke-width="2"/>`;
    if (cell.structure) {
      const x = scale(cell.structure / n, 0, 1, X0, X1);
      svg += `<line x1="${x}" x2="${x}" y1="${Y0}" y2="${Y1}" stroke="${color}" stroke-dasharray="2 3"/>` +
        `<text x="${x > X1 - 150 ? x - 3 : x + 3}" y="${Y1 + 60 + c * 14}" font-size="12" fill="${color}" ` +
        `text-anchor="${x > X1 - 150 ? 'end' : 'start'}">structure at step ${cell.structure}</text>`;
    }
    svg += `<circle class="vp-mark" data-cell="${c}" r="7" fill="none" stroke="crimson" stroke-width="2" cx="-20" cy="-20"/>`;
    items.push([cell.label, color]);
  });
  if (!items.length) svg += `<text x="320" y="110" text-anchor="middle" font-size="14" fill="currentColor">${
    props.live ? 'Filled when the run finishes.' : 'No curve: the run stopped before its final image.'}</text>`;
  conv.innerHTML = svg + legend(items);
  const first = cells()[0];
  let s2 = axes(sched, 'step', 'sigma (log scale)', 'noise share');
  if (first && first.steps.length) {
    const sig = first.steps.map(s => Math.log10(Math.max(s.sigma, 1e-3)));
    const lo = Math.min(...sig), hi = Math.max(...sig);
    const xs = first.steps.map((s, i) => stepX(first, i));
    s2 += `<polyline points="${xs.map((x, i) => `${x},${scale(sig[i], lo, hi, Y0, Y1)}`).join(' ')}" fill="none" stroke="#2e86ab" stroke-width="2"/>`;
    s2 += `<polyline points="${xs.map((x, i) => `${x},${scale(first.steps[i].share, 0, 1, Y0, Y1)}`).join(' ')}" fill="none" stroke="#f18f01" stroke-width="2" stroke-dasharray="4 3"/>`;
    s2 += `<text x="${X0 - 4}" y="${Y1 + 4}" font-size="11" text-anchor="end" fill="currentColor">${fmt(10 ** hi, 2)}</text>` +
      `<text x="${X0 - 4}" y="${Y0}" font-size="11" text-anchor="end" fill="currentColor">${fmt(10 ** lo, 3)}</text>`;
    s2 += `<line class="vp-mark-line" x1="-9" x2="-9" y1="${Y0}" y2="${Y1}" stroke="crimson" stroke-width="2"/>`;
  }
  sched.innerHTML = s2 + legend([['sigma (log)', '#2e86ab'], ['noise share', '#f18f01', true]]);
}
function markers(p) {
  element.querySelectorAll('.vp-mark').forEach(m => {
    const cell = cells()[+m.dataset.cell]; if (!cell || !cell.curve) return;
    const k = Math.min(stepOf(cell, indexFor(cell, p)), cell.curve.length);  // the start has no x0-hat: no mark
    m.setAttribute('cx', k ? scale(k / stepsOf(cell), 0, 1, X0, X1) : -20);
    m.setAttribute('cy', k ? scale(cell.curve[k - 1], 0, 1, Y0, Y1) : -20);
  });
  const line = $('.vp-mark-line'), first = cells()[0];
  if (line && first) { const x = stepX(first, indexFor(first, p)); line.setAttribute('x1', x); line.setAttribute('x2', x); }
}
const PREDICTS = {  // RunInfo.prediction_type in plain words
  epsilon: 'the noise in its input (epsilon); x0-hat = (x − sqrt(1 − alpha_bar) × noise) / sqrt(alpha_bar)',
  v_prediction: 'v = sqrt(alpha_bar) × noise − sqrt(1 − alpha_bar) × image (v-prediction), from which both the noise and x0-hat follow',
  flow_prediction: 'a velocity, noise − image (flow matching): x0-hat = x − sigma × velocity',
};
function numbers(p) {
  const rows = cells().map(cell => {
    const s = (cell.steps || [])[indexFor(cell, p)];
    if (!s) return '';
    const snr = s.snr == null ? Infinity : s.snr;  // null: sigma 0 (no noise)
    return `<tr><td>${cell.label}</td><td>${s.index === 0 ? 'start' : `${s.index} / ${cell.total - (cell.start ? 1 : 0)}`}</td><td>${fmt(s.t, 1)}</td><td>${fmt(s.sigma, 4)}</td>` +
      `<td>${snr === Infinity ? '∞' : snr.toPrecision(4)}</td><td>${(s.share * 100).toFixed(1)}%</td><td>${s.evals}</td></tr>`;
  }).join('');
  const predicts = [...new Set(cells().map(c => PREDICTS[c.prediction]).filter(Boolean))];
  $('.vp-predicts').textContent = predicts.length ? 'The model predicts ' + predicts.join('; another predicts ') + '.' : '';
  $('.vp-numbers').innerHTML = '<tr><th>run</th><th>step</th><th>t</th><th>sigma</th><th>SNR</th><th>noise share</th><th>evaluations</th></tr>' + rows;
}
function change(p) {
  const box = $('.vp-change');
  if (box.children.length !== cells().length) {
    box.innerHTML = cells().map(c => `<figure><img alt="change heatmap"><figcaption>${c.label}</figcaption></figure>`).join('');
  }
  cells().forEach((cell, c) => {
    const [url] = frameAt(cell, 'change', indexFor(cell, p));
    const im = box.children[c].querySelector('img');
    if (url && im.getAttribute('src') !== url) im.src = url;
    im.style.visibility = url ? 'visible' : 'hidden';
  });
}

function stop() { if (timer) { clearInterval(timer); timer = null; } play.innerHTML = '&#9654; Play'; play.setAttribute('aria-label', 'Play'); }
function start() {
  stop();
  if (+range.value >= positions()) show(1);
  follow = false;
  play.innerHTML = '&#10074;&#10074; Pause'; play.setAttribute('aria-label', 'Pause');
  timer = setInterval(() => {
    let p = +range.value + 1;
    if (p > positions()) { if (loop.checked && !props.live) p = 1; else { stop(); settle(); return; } }
    show(p);
  }, 1000 / +speed.value);
}
function panelOnScreen() {
  const panel = props.panel && document.getElementById(props.panel);
  if (!panel || panel.offsetParent === null) return false;
  const box = panel.getBoundingClientRect();
  return box.bottom > 0 && box.top < window.innerHeight;
}
function settle() {  // tell the server where the person stopped, for its panel, only while that panel shows
  if (+range.value !== settled && panelOnScreen()) { settled = +range.value; props.value = settled; }
}
if (props.panel && window.IntersectionObserver) {  // scrolled or switched into view: bring it up to date
  const watchPanel = () => {
    const panel = document.getElementById(props.panel);
    if (!panel) return setTimeout(watchPanel, 500);
    new IntersectionObserver(entries => { if (entries.some(e => e.isIntersecting)) settle(); }).observe(panel);
  };
  watchPanel();
}

function sync() {  // new props from the server: more frames, a new run, or a finished one
  const fresh = props.run !== runId;
  if (fresh) { runId = props.run; follow = true; settled = 0; stop(); }
  // every view is offered from the start (frames fill in as they are decoded); forward noising and the map once they exist
  const views = (props.views || []).filter(([k]) => !['forward', 'map'].includes(k) || cells().some(c => c.frames && c.frames[k]));
  const wanted = views.map(v => v[0]).join(',');
  if (viewSel.dataset.kinds !== wanted) {
    const keep = viewSel.value;
    viewSel.innerHTML = views.map(([k, l]) => `<option value="${k}">${l}</option>`).join('');
    viewSel.dataset.kinds = wanted;
    if (views.some(v => v[0] === keep)) viewSel.value = keep;
  }
  if (props.view && props.view !== askedView && views.some(v => v[0] === props.view)) {
    viewSel.value = props.view; follow = true;  // e.g. a stopped run: its latest x0-hat, the best guess so far
  }
  askedView = props.view || null;
  // while a run computes, fetch only the frames on screen (each fetch is work for the server the model shares
  // the cores with); once it is done, every view's, so that scrubbing and switching views make no request
  const onScreen = props.live ? (figures[0] ? figures[0].kinds : []) : null;
  cells().forEach(c => Object.entries(c.frames || {}).forEach(([kind, list]) => {
    if (!onScreen || onScreen.includes(kind)) list.forEach(preload);
  }));
  const shape = cells().length + ':' + viewSel.value;
  if (cellsBox.dataset.shape !== shape) { build(); cellsBox.dataset.shape = shape; }
  range.max = positions();
  $('.vp-bar-fill').style.width = `${Math.round((props.live ? props.progress || 0 : 1) * 100)}%`;
  $('.vp-bar').style.visibility = props.live ? 'visible' : 'hidden';
  status.textContent = props.status || '';
  element.querySelectorAll('.vp-tabs button:not(.vp-words-tab)').forEach(b => {
    b.hidden = !!(props.tabs && props.tabs.length) && !props.tabs.includes(b.dataset.tab);  // [] or none: all
  });
  const asked = fresh && props.tab && $(`.vp-tabs button[data-tab="${props.tab}"]:not([hidden])`);
  if (asked) asked.click();
  const on = $('.vp-tabs button.on');
  if (on && on.hidden) $('.vp-tabs button:not([hidden])').click();
  plots(); words();
  if (traced >= 0) {  // a new run from the same starting points: keep tracing the same point
    Promise.all(cells().filter(c => c.trace).map(c => loadTrace(c.trace))).then(() => show(+range.value));
  }
  if (fresh && props.at) { follow = false; show(props.at); }
  else if (follow) {
    const n = available(), first = cells()[0];
    show(props.live && first ? Math.max(1, Math.ceil(n / Math.max(1, first.total) * positions())) : positions());
  } else show(+range.value);
}

range.addEventListener('input', () => { follow = false; stop(); show(+range.value); });
range.addEventListener('change', settle);
range.addEventListener('keyup', settle);
play.addEventListener('click', () => timer ? (stop(), settle()) : start());
speed.addEventListener('change', () => { if (timer) start(); });
$('.vp-opacity').addEventListener('input', () => show(+range.value));
viewSel.addEventListener('change', () => { build(); cellsBox.dataset.shape = cells().length + ':' + viewSel.value; show(+range.value); });
element.querySelectorAll('.vp-tabs button').forEach(b => b.addEventListener('click', () => {
  element.querySelectorAll('.vp-tabs button').forEach(o => o.classList.toggle('on', o === b));
  element.querySelectorAll('.vp-panel').forEach(panel => { panel.hidden = panel.dataset.panel !== b.dataset.tab; });
}));
watch(['cells', 'live', 'progress', 'status', 'run', 'views', 'view', 'tabs', 'tab', 'at'], sync);
sync();

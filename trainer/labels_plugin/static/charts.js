// SVG charts of the Labels dashboard: frequency scatter, line chart over evaluations, PR curve.
// Plain SVG built as strings (fast enough for 50,000 points), no library, so the page works offline.

const SVG_NS = 'http://www.w3.org/2000/svg';
export const BUCKET_COLORS = {head: '#1565c0', torso: '#ef6c00', tail: '#2e7d32', '': '#757575'};
const SERIES_COLORS = ['#1565c0', '#c62828', '#2e7d32', '#6a1b9a', '#ef6c00', '#00838f'];

export function escapeXml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
}

function svgElement(width, height, body, id) {
  const wrapper = document.createElement('div');
  wrapper.innerHTML = `<svg xmlns="${SVG_NS}" ${id ? `id="${id}"` : ''} width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" class="chart">${body}</svg>`;
  return wrapper.firstChild;
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step0 = Math.pow(10, Math.floor(Math.log10(span / count)));
  const step = [1, 2, 5, 10].map((m) => m * step0).find((s) => span / s <= count) || step0 * 10;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

function axes(box, xTicks, yTicks, xLabel, yLabel) {
  const {left, top, width, height} = box;
  let s = `<g class="axis">`;
  for (const t of xTicks) {
    s += `<line x1="${t.x}" x2="${t.x}" y1="${top}" y2="${top + height}" class="grid"/>` +
      `<text x="${t.x}" y="${top + height + 14}" text-anchor="middle">${escapeXml(t.text)}</text>`;
  }
  for (const t of yTicks) {
    s += `<line x1="${left}" x2="${left + width}" y1="${t.y}" y2="${t.y}" class="grid"/>` +
      `<text x="${left - 6}" y="${t.y + 4}" text-anchor="end">${escapeXml(t.text)}</text>`;
  }
  s += `<rect x="${left}" y="${top}" width="${width}" height="${height}" class="frame"/>` +
    `<text x="${left + width / 2}" y="${top + height + 32}" text-anchor="middle" class="axis-label">${escapeXml(xLabel)}</text>` +
    `<text transform="translate(14 ${top + height / 2}) rotate(-90)" text-anchor="middle" class="axis-label">${escapeXml(yLabel)}</text></g>`;
  return s;
}

// points: [{label, x, y, bucket}] with x > 0 (log scale) and y in [0, 1].
// onHover(point | null, event) and onClick(point) are called with the point under the mouse.
export function scatterPlot(points, {xLabel, yLabel, onHover, onClick}) {
  const W = 760, H = 340, box = {left: 56, top: 10, width: W - 76, height: H - 56};
  const xs = points.map((p) => Math.log10(p.x));
  let lo = Math.floor(Math.min(0, ...xs)), hi = Math.ceil(Math.max(1, ...xs));
  if (hi <= lo) hi = lo + 1;
  const px = (x) => box.left + (Math.log10(x) - lo) / (hi - lo) * box.width;
  const py = (y) => box.top + (1 - y) * box.height;
  const xTicks = [];
  const powerText = (e) => (e < 0 ? `1e${e}` : ['1', '10', '100', '1k', '10k', '100k', '1M', '10M', '100M'][e] || `1e${e}`);
  for (let e = lo; e <= hi; e++) xTicks.push({x: px(Math.pow(10, e)), text: powerText(e)});
  const yTicks = niceTicks(0, 1, 5).map((t) => ({y: py(t), text: t.toFixed(1)}));
  let body = axes(box, xTicks, yTicks, xLabel, yLabel) + '<g class="points">';
  points.forEach((p, i) => {
    body += `<circle class="point" data-i="${i}" data-label="${escapeXml(p.label)}" cx="${px(p.x).toFixed(1)}" ` +
      `cy="${py(p.y).toFixed(1)}" r="3.5" fill="${BUCKET_COLORS[p.bucket || '']}"/>`;  // hover: the page's tooltip
  });
  const svg = svgElement(W, H, body + '</g>', 'scatter-svg');
  const pointAt = (event) => event.target.classList && event.target.classList.contains('point') ?
    points[+event.target.getAttribute('data-i')] : null;
  svg.addEventListener('mouseover', (event) => onHover(pointAt(event), event));
  svg.addEventListener('mouseout', () => onHover(null));
  svg.addEventListener('click', (event) => { const p = pointAt(event); if (p) onClick(p); });
  return svg;
}

// series: [{name, xs: [...], ys: [...] (null = gap), dashed}] drawn over steps; y in [0, 1].
export function lineChart(series, {xLabel, yLabel, id}) {
  const W = 560, H = 260, box = {left: 50, top: 10, width: W - 180, height: H - 56};
  const allX = series.flatMap((s) => s.xs);
  const xlo = Math.min(...allX), xhi = Math.max(...allX) === xlo ? xlo + 1 : Math.max(...allX);
  const px = (x) => box.left + (x - xlo) / (xhi - xlo) * box.width;
  const py = (y) => box.top + (1 - y) * box.height;
  const xTicks = niceTicks(xlo, xhi, 6).map((t) => ({x: px(t), text: String(t)}));
  const yTicks = niceTicks(0, 1, 5).map((t) => ({y: py(t), text: t.toFixed(1)}));
  let body = axes(box, xTicks, yTicks, xLabel, yLabel);
  series.forEach((s, k) => {
    const color = s.color || SERIES_COLORS[k % SERIES_COLORS.length];
    const segments = [[]];
    s.xs.forEach((x, i) => {
      if (s.ys[i] === null) { segments.push([]); return; }
      segments[segments.length - 1].push(`${px(x).toFixed(1)},${py(s.ys[i]).toFixed(1)}`);
    });
    for (const seg of segments.filter((g) => g.length)) {
      body += `<polyline class="series" data-series="${escapeXml(s.name)}" points="${seg.join(' ')}" fill="none" ` +
        `stroke="${color}" stroke-width="2" ${s.dashed ? 'stroke-dasharray="5 3"' : ''}/>`;
      for (const pt of seg) { const [x, y] = pt.split(','); body += `<circle cx="${x}" cy="${y}" r="2.5" fill="${color}"/>`; }
    }
    body += `<line x1="${W - 120}" x2="${W - 100}" y1="${20 + 16 * k}" y2="${20 + 16 * k}" stroke="${color}" stroke-width="2" ` +
      `${s.dashed ? 'stroke-dasharray="5 3"' : ''}/><text x="${W - 95}" y="${24 + 16 * k}" class="legend">${escapeXml(s.name)}</text>`;
  });
  return svgElement(W, H, body, id);
}

// curves: [{name, recall: [...], precision: [...], marker: {recall, precision} | null, dashed}].
export function prCurve(curves, {id}) {
  const W = 360, H = 300, box = {left: 50, top: 10, width: W - 70, height: H - 56};
  const px = (x) => box.left + x * box.width;
  const py = (y) => box.top + (1 - y) * box.height;
  const ticks = niceTicks(0, 1, 5);
  let body = axes(box, ticks.map((t) => ({x: px(t), text: t.toFixed(1)})), ticks.map((t) => ({y: py(t), text: t.toFixed(1)})),
    'recall', 'precision');
  curves.forEach((c, k) => {
    const color = SERIES_COLORS[k % SERIES_COLORS.length];
    const pts = c.recall.map((r, i) => (r === null || c.precision[i] === null ? null : `${px(r).toFixed(1)},${py(c.precision[i]).toFixed(1)}`))
      .filter((p) => p !== null);
    body += `<polyline class="curve" data-series="${escapeXml(c.name)}" points="${pts.join(' ')}" fill="none" stroke="${color}" ` +
      `stroke-width="2" ${c.dashed ? 'stroke-dasharray="5 3"' : ''}/>`;
    if (c.marker && c.marker.recall !== null && c.marker.precision !== null) {
      body += `<circle class="marker" cx="${px(c.marker.recall)}" cy="${py(c.marker.precision)}" r="5" fill="none" stroke="${color}" ` +
        `stroke-width="2"><title>at the label's threshold</title></circle>`;
    }
    body += `<text x="${box.left + 8}" y="${box.top + box.height - 10 - 14 * k}" class="legend" fill="${color}">${escapeXml(c.name)}</text>`;
  });
  return svgElement(W, H, body, id);
}

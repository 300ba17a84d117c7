// The Labels dashboard: TensorBoard loads this module into the tab's iframe and calls render().
// Data comes from the plugin's JSON routes (runs, table, label), relative to the iframe's <base>.
import {BUCKET_COLORS, escapeXml, lineChart, prCurve, scatterPlot} from './charts.js';

const METRICS = [['pr_auc', 'PR-AUC'], ['roc_auc', 'ROC-AUC'], ['f1', 'F1'], ['precision', 'Precision'], ['recall', 'Recall']];
const COLUMNS = [
  {key: 'label', title: 'Label', text: true},
  {key: 'bucket', title: 'Bucket', text: true},
  {key: 'train_count', title: 'Train count', format: 'count', help: 'positives in the training split'},
  {key: 'support', title: 'Support', format: 'count', help: 'positives in the evaluated data'},
  {key: 'pr_auc', title: 'PR-AUC'},
  {key: 'roc_auc', title: 'ROC-AUC'},
  {key: 'f1', title: 'F1', help: "at the label's threshold"},
  {key: 'precision', title: 'Precision', help: "at the label's threshold"},
  {key: 'recall', title: 'Recall', help: "at the label's threshold"},
  {key: 'threshold', title: 'Threshold', format: 'threshold'},
  {key: 'pred_pos_rate', title: 'Pred. rate', format: 'rate', help: 'share of examples predicted positive'},
  {key: 'prevalence', title: 'True rate', format: 'rate', help: 'share of examples that have the label'},
  {key: 'rate_ratio', title: 'Pred./true', format: 'ratio', help: '> 1: predicted more often than it occurs'},
];
const ROW_LIMIT = 500;

const state = {
  runs: [], run: null, step: null, table: null, rows: [],
  compareRun: '', compareStep: null, compareTable: null,
  sortKey: 'train_count', sortDesc: true, nameFilter: '', minSupport: 0, metric: 'pr_auc', showAll: false,
  label: null,
};

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v);
  }
  for (const c of [].concat(children)) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmt(value, format) {
  if (value === null || value === undefined || Number.isNaN(value)) return '–';
  if (typeof value === 'string') return value;
  switch (format) {
    case 'count': return Math.round(value).toLocaleString('en-US');
    case 'rate': return (100 * value >= 10 ? (100 * value).toFixed(0) : (100 * value).toPrecision(2)) + '%';
    case 'ratio': return value.toFixed(2);
    case 'threshold': return value.toFixed(3);
    default: return value.toFixed(3);
  }
}

async function getJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${await response.text()}`);
  return response.json();
}

function setStatus(text) { document.getElementById('status').textContent = text; }

// ---------------------------------------------------------------------------------------------- data

function rowsOf(table) {
  const v = table.values, buckets = ['head', 'torso', 'tail'];
  return table.labels.map((label, i) => {
    const row = {i, label, bucket: v.bucket[i] === null ? '' : buckets[v.bucket[i]]};
    for (const c of table.columns) if (c !== 'bucket') row[c] = v[c][i];
    row.rate_ratio = row.prevalence ? row.pred_pos_rate / row.prevalence : null;
    return row;
  });
}

function withComparison(rows) {
  if (!state.compareTable) return rows;
  const other = state.compareTable, index = new Map(other.labels.map((name, i) => [name, i]));
  for (const row of rows) {
    const j = index.get(row.label);
    row.compare = j === undefined ? null : other.values[state.metric][j];
    row.delta = row.compare === null || row[state.metric] === null ? null : row[state.metric] - row.compare;
  }
  return rows;
}

async function loadRuns() {
  state.runs = (await getJson('runs')).runs;
  if (!state.runs.length) { setStatus('No per-label tables yet: they are written at each evaluation.'); return false; }
  const names = state.runs.map((r) => r.run);
  if (!names.includes(state.run)) state.run = names.includes('eval') ? 'eval' : names[names.length - 1];
  if (state.compareRun && !names.includes(state.compareRun)) state.compareRun = '';
  return true;
}

async function loadTables() {
  const query = (run, step) => 'table?' + new URLSearchParams(step === null ? {run} : {run, step});
  state.table = await getJson(query(state.run, state.step));
  state.step = state.table.step;
  state.compareTable = state.compareRun ? await getJson(query(state.compareRun, state.compareStep)) : null;
  state.compareStep = state.compareTable ? state.compareTable.step : null;
  state.rows = rowsOf(state.table);
}

// ------------------------------------------------------------------------------------------- controls

function select(id, options, value, onchange) {
  return el('select', {id, onchange: (e) => onchange(e.target.value)},
    options.map(([v, text]) => el('option', {value: v, selected: String(v) === String(value) ? 'selected' : null, text})));
}

function runInfo(name) { return state.runs.find((r) => r.run === name); }

function renderControls() {
  const steps = (name) => runInfo(name).steps.map((s) => [s, `step ${s}`]);
  const runs = state.runs.map((r) => [r.run, `${r.run} (${r.num_labels.toLocaleString('en-US')} labels)`]);
  const reloadTables = async () => { await loadTables(); renderAll(); };
  document.getElementById('controls').replaceChildren(...[
    el('label', {}, ['Run ', select('run-select', runs, state.run, (v) => { state.run = v; state.step = null; reloadTables(); })]),
    el('label', {}, ['Evaluation ', select('step-select', steps(state.run), state.step, (v) => { state.step = +v; reloadTables(); })]),
    el('label', {}, ['Compare with ', select('compare-select', [['', '(none)'], ...runs], state.compareRun,
      (v) => { state.compareRun = v; state.compareStep = null; reloadTables(); })]),
    state.compareRun ? el('label', {}, ['at ', select('compare-step-select', steps(state.compareRun), state.compareStep,
      (v) => { state.compareStep = +v; reloadTables(); })]) : null,
    el('button', {id: 'reload', onclick: async () => { await loadRuns(); await reloadTables(); }, text: 'Reload'}),
  ].filter((c) => c !== null));
}

// -------------------------------------------------------------------------------------------- summary

function renderSummary() {
  const tables = [[state.run, state.table]].concat(state.compareTable ? [[state.compareRun, state.compareTable]] : []);
  const cols = [['labels', 'labels', 'count'], ['with_support', 'with positives', 'count'], ['train_share', 'train positives', 'rate'],
    ['pr_auc', 'PR-AUC'], ['roc_auc', 'ROC-AUC'], ['f1', 'F1'], ['precision', 'Precision'], ['recall', 'Recall']];
  const head = el('tr', {}, [el('th', {text: 'bucket'}), ...tables.flatMap(([run, t]) =>
    cols.map(([, title], k) => el('th', {class: k === 0 ? 'group-start' : null, text: title})))]);
  const runHead = el('tr', {}, [el('th'), ...tables.map(([run, t]) =>
    el('th', {colspan: cols.length, class: 'group-start', text: `${run} · step ${t.step}${t.thresholds_tuned ? ' · tuned thresholds' : ''}`}))]);
  const names = state.table.buckets.map((b) => b.bucket);
  const body = names.map((name) => el('tr', {'data-bucket': name}, [el('th', {text: name}), ...tables.flatMap(([, t]) => {
    const b = t.buckets.find((x) => x.bucket === name) || {};
    return cols.map(([key, , format], k) => el('td', {class: k === 0 ? 'group-start' : null, text: fmt(b[key], format)}));
  })]));
  document.getElementById('summary').replaceChildren(
    el('h3', {text: 'Head / torso / tail'}),
    el('p', {class: 'note', text: 'Buckets by training frequency: head labels hold the first half of the training positives, ' +
      'tail labels the last 10 %. Means over the labels with a value.'}),
    el('table', {id: 'summary-table', class: 'grid'}, [el('thead', {}, [runHead, head]), el('tbody', {}, body)]));
}

// ------------------------------------------------------------------------------------------- filtering

function filteredRows() {
  const needle = state.nameFilter.toLowerCase();
  return state.rows.filter((r) => (!needle || r.label.toLowerCase().includes(needle)) && (r.support || 0) >= state.minSupport);
}

function sortedRows(rows) {
  const key = state.sortKey, sign = state.sortDesc ? -1 : 1;
  return rows.slice().sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === null || x === undefined) return y === null || y === undefined ? a.i - b.i : 1;  // missing values last
    if (y === null || y === undefined) return -1;
    const c = typeof x === 'string' ? x.localeCompare(y) : x - y;
    return c ? sign * c : a.i - b.i;
  });
}

// -------------------------------------------------------------------------------------------- scatter

function renderScatter(rows) {
  const useTrain = rows.some((r) => r.train_count !== null);
  const xKey = useTrain ? 'train_count' : 'support';
  const points = rows.filter((r) => r[state.metric] !== null && r[xKey] !== null)
    .map((r) => ({label: r.label, x: Math.max(r[xKey], 0.5), y: r[state.metric], bucket: r.bucket, row: r}));
  const metricName = METRICS.find(([k]) => k === state.metric)[1];
  const tip = el('div', {id: 'tooltip', class: 'tooltip', hidden: 'hidden'});
  const svg = scatterPlot(points, {
    xLabel: `${useTrain ? 'training' : 'evaluation'} positives (log scale; 0 drawn at 0.5)`, yLabel: metricName,
    onHover: (p, event) => {
      if (!p) { tip.hidden = true; return; }
      tip.hidden = false;
      const kind = useTrain ? 'training' : 'evaluation';
      tip.textContent = `${p.label} — ${metricName} ${fmt(p.y)}, ${fmt(p.row[xKey], 'count')} ${kind} positives, ` +
        `support ${fmt(p.row.support, 'count')}`;
      tip.style.left = `${event.offsetX + 12}px`;
      tip.style.top = `${event.offsetY + 12}px`;
    },
    onClick: (p) => openLabel(p.label),
  });
  const missing = rows.length - points.length;
  document.getElementById('scatter').replaceChildren(
    el('h3', {}, [`${metricName} against training frequency `,
      select('metric-select', METRICS, state.metric, (v) => { state.metric = v; renderAll(); })]),
    el('p', {class: 'note', text: `One point per label (${points.length.toLocaleString('en-US')} shown` +
      (missing ? `, ${missing} without a value` : '') + '); colour = bucket; hover names it, click opens it.'}),
    el('div', {class: 'plot'}, [svg, tip]),
    el('div', {class: 'legend-row'}, Object.entries(BUCKET_COLORS).filter(([b]) => b).map(([b, color]) =>
      el('span', {}, [el('span', {class: 'swatch', style: `background:${color}`}), b]))));
}

// ---------------------------------------------------------------------------------------------- table

function renderTable(rows) {
  const metricName = METRICS.find(([k]) => k === state.metric)[1];
  const columns = COLUMNS.concat(state.compareTable ? [
    {key: 'compare', title: `${metricName} (${state.compareRun})`},
    {key: 'delta', title: `Δ ${metricName}`, help: `${state.run} minus ${state.compareRun}`}] : []);
  const sorted = sortedRows(rows);
  const shown = state.showAll ? sorted : sorted.slice(0, ROW_LIMIT);
  const header = el('tr', {}, columns.map((c) => el('th', {
    'data-column': c.key, title: c.help || null,
    class: 'sortable' + (c.text ? ' text' : '') + (c.key === state.sortKey ? (state.sortDesc ? ' desc' : ' asc') : ''),
    onclick: () => {
      state.sortDesc = state.sortKey === c.key ? !state.sortDesc : !c.text;
      state.sortKey = c.key;
      renderTableOnly();
    }, text: c.title})));
  const body = document.createElement('tbody');
  body.innerHTML = shown.map((r) => `<tr data-label="${escapeXml(r.label)}">` + columns.map((c) =>
    `<td class="${c.text ? 'text' : 'num'}${c.key === 'bucket' ? ' bucket-' + r.bucket : ''}">${escapeXml(fmt(r[c.key], c.format))}</td>`).join('') +
    '</tr>').join('');
  body.addEventListener('click', (event) => {
    const tr = event.target.closest('tr');
    if (tr) openLabel(tr.getAttribute('data-label'));
  });
  const more = shown.length < sorted.length ? el('button', {id: 'show-all', text: `Show all ${sorted.length.toLocaleString('en-US')} rows`,
    onclick: () => { state.showAll = true; renderTableOnly(); }}) : null;
  document.getElementById('table-count').textContent = `${rows.length.toLocaleString('en-US')} of ` +
    `${state.rows.length.toLocaleString('en-US')} labels` + (shown.length < rows.length ? ` (first ${shown.length} shown)` : '');
  document.getElementById('table-body').replaceChildren(
    ...[el('table', {id: 'label-table', class: 'grid'}, [el('thead', {}, header), body]), more].filter((c) => c !== null));
}

function renderTableSection() {
  document.getElementById('table').replaceChildren(
    el('h3', {text: 'Every label'}),
    el('div', {class: 'filters'}, [
      el('label', {}, ['Name contains ', el('input', {id: 'name-filter', type: 'search', value: state.nameFilter,
        oninput: (e) => { state.nameFilter = e.target.value; renderFilteredSoon(); }})]),
      el('label', {}, ['Min. support ', el('input', {id: 'min-support', type: 'number', min: 0, step: 1, value: state.minSupport,
        oninput: (e) => { state.minSupport = +e.target.value || 0; renderFilteredSoon(); }})]),
      el('span', {id: 'table-count', class: 'note'}),
      el('span', {class: 'note', text: state.table.thresholds_tuned ? ' F1 / precision / recall at the tuned thresholds.' :
        ' F1 / precision / recall at threshold 0.5 (thresholds are tuned at the end of training).'}),
    ]),
    el('div', {id: 'table-body'}));
}

function renderTableOnly() { renderTable(filteredRows()); }

let filterTimer = null;

function renderFilteredSoon() {  // typing into a filter redraws once it pauses (50,000 points take a while)
  clearTimeout(filterTimer);
  filterTimer = setTimeout(renderFiltered, 250);
}

function renderFiltered() {
  const rows = filteredRows();
  renderScatter(rows);
  renderTable(rows);
}

// ------------------------------------------------------------------------------------------ label page

async function openLabel(name) {
  state.label = name;
  document.getElementById('overview').hidden = true;
  const page = document.getElementById('label-page');
  page.hidden = false;
  page.replaceChildren(el('p', {text: `Loading ${name}…`}));
  const get = (run, step) => getJson('label?' + new URLSearchParams({run, label: name, step})).catch(() => null);
  const [a, b] = await Promise.all([get(state.run, state.step), state.compareRun ? get(state.compareRun, state.compareStep) : null]);
  if (state.label !== name) return;
  renderLabelPage(name, a, b);
}

function closeLabel() {
  state.label = null;
  document.getElementById('label-page').hidden = true;
  document.getElementById('overview').hidden = false;
}

function renderLabelPage(name, a, b) {
  const page = document.getElementById('label-page');
  const back = el('button', {id: 'back', onclick: closeLabel, text: '← All labels'});
  if (!a) { page.replaceChildren(back, el('p', {text: `No values for ${name} in run ${state.run}.`})); return; }
  const row = state.rows.find((r) => r.label === name);
  const facts = COLUMNS.filter((c) => !['label'].includes(c.key)).map((c) =>
    el('div', {class: 'fact'}, [el('span', {class: 'fact-name', text: c.title}), el('span', {text: fmt(row ? row[c.key] : null, c.format)})]));
  const runs = [[state.run, a, false]].concat(b ? [[state.compareRun, b, true]] : []);
  const series = runs.flatMap(([run, data, dashed]) => METRICS.slice(0, 3).map(([key, title], k) => ({
    name: runs.length > 1 ? `${title} (${run})` : title, xs: data.steps, ys: data.history[key], dashed,
    color: ['#1565c0', '#c62828', '#2e7d32'][k]})));
  // The marker is the label's own precision and recall at its threshold (table values, exact): the curve's
  // thresholds are bin edges, not evenly spaced, and need not include the label's threshold.
  const curves = runs.filter(([, data]) => data.curve).map(([run, data, dashed]) => {
    const c = data.curve;
    const marker = row && !dashed ? {recall: row.recall, precision: row.precision} : null;
    return {name: `${run} · step ${c.step}`, recall: c.recall, precision: c.precision, marker, dashed};
  });
  const historyRows = a.steps.map((step, i) => el('tr', {}, [el('td', {class: 'num', text: String(step)}),
    ...METRICS.map(([key]) => el('td', {class: 'num', text: fmt(a.history[key][i])})),
    el('td', {class: 'num', text: fmt(a.history.threshold[i], 'threshold')}),
    el('td', {class: 'num', text: fmt(a.history.pred_pos_rate[i], 'rate')}), el('td', {class: 'num', text: fmt(a.history.prevalence[i], 'rate')})]));
  page.replaceChildren(
    back,
    el('h2', {id: 'label-title', text: name}),
    el('p', {class: 'note', text: `Run ${state.run}, step ${state.step}` + (b ? `; dashed: ${state.compareRun}, step ${state.compareStep}` : '')}),
    el('div', {class: 'facts'}, facts),
    el('div', {class: 'charts'}, [
      el('div', {}, [el('h3', {text: 'Over the evaluations'}), lineChart(series, {xLabel: 'step', yLabel: 'value', id: 'history-chart'})]),
      el('div', {}, [el('h3', {text: 'Precision / recall curve'}), curves.length ? prCurve(curves, {id: 'pr-curve'}) :
        el('p', {class: 'note', text: 'No curve recorded for this label at this step (with more than 1,000 labels, curves are ' +
          'kept for the PR-curve labels and the most frequent ones).'})]),
    ]),
    el('table', {id: 'history-table', class: 'grid'}, [
      el('thead', {}, el('tr', {}, ['step', ...METRICS.map(([, t]) => t), 'Threshold', 'Pred. rate', 'True rate'].map((t) => el('th', {text: t})))),
      el('tbody', {}, historyRows)]));
}

// --------------------------------------------------------------------------------------------- render

function renderAll() {
  renderControls();
  state.rows = withComparison(rowsOf(state.table));
  renderSummary();
  renderTableSection();
  renderFiltered();
  setStatus('');
}

export async function render() {
  document.head.append(el('link', {rel: 'stylesheet', href: 'static/style.css'}));
  document.body.append(el('div', {id: 'app'}, [
    el('div', {id: 'controls', class: 'controls'}),
    el('p', {id: 'status', class: 'note', text: 'Loading…'}),
    el('div', {id: 'overview'}, [el('section', {id: 'summary'}), el('section', {id: 'scatter'}), el('section', {id: 'table'})]),
    el('div', {id: 'label-page', hidden: 'hidden'}),
  ]));
  try {
    if (!(await loadRuns())) return;
    await loadTables();
    renderAll();
  } catch (error) {
    setStatus(`Could not load the per-label tables: ${error.message}`);
  }
}

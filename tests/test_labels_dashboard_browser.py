"""The Labels dashboard in a real browser: real TensorBoard (`tensorboard --logdir`, loopback) on a run the tests
trained and evaluated, driven by Selenium through Debian's headless chromium.

Without chromium and chromedriver (apt-get install chromium chromium-driver) these tests skip, except under CI
(CI=true, where .ci/run installs them), where their absence is a failure. Expected values are read from the
event files with TensorBoard's own reader.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from conftest import free_port, repo_env, run_trainer, wait_for
from trainer.labels_plugin import table as fmt

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
IN_CI = os.environ.get("CI", "").lower() == "true"
try:
    import selenium  # noqa: F401
except ImportError:
    CHROMIUM = None
if not (CHROMIUM and CHROMEDRIVER):
    if IN_CI:
        raise RuntimeError("CI: chromium, chromium-driver (apt) and selenium (pip, the dev extra) are required")
    pytest.skip("no chromium / chromedriver / selenium (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1100")
# Used only outside CI when the installed package metadata predates the entry point (no `pip install -e .` since):
# the same TensorBoard, given the plugin class instead of finding it through the entry point.
_LAUNCHER = ("import sys; from tensorboard import default, program; "
             "from trainer.labels_plugin.plugin import LabelsPlugin; "
             "tb = program.TensorBoard(plugins=default.get_plugins() + [LabelsPlugin]); "
             "tb.configure(argv=sys.argv); sys.exit(tb.main())")


def _entry_point_registered() -> bool:
    return any(e.name == fmt.PLUGIN_NAME for e in importlib.metadata.entry_points(group="tensorboard_plugins"))


@pytest.fixture(scope="module")
def logdir(trained_run, tiny_data, tmp_path_factory) -> str:
    """A copy of the session's trained run, also evaluated on its train split by the real CLI (a second run
    with a per-label table, `train`, beside `eval`)."""
    model_dir = tmp_path_factory.mktemp("dashboard") / "model"
    shutil.copytree(trained_run.model_dir, model_dir)
    proc = run_trainer("evaluate", "--model-dir", model_dir, "--data", tiny_data, "--split", "train", check=True)
    assert "wrote TensorBoard summaries to" in proc.stdout
    return str(model_dir / "logs")


@pytest.fixture(scope="module")
def expected(logdir) -> dict:
    """The eval run's last table and its evaluation steps, read with TensorBoard's event reader."""
    acc = ea.EventAccumulator(os.path.join(logdir, "eval"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    events = acc.Tensors(fmt.TABLE_TAG)
    described = fmt.parse_content(acc.SummaryMetadata(fmt.TABLE_TAG))
    values = tensor_util.make_ndarray(events[-1].tensor_proto)
    return {"labels": described["labels"], "steps": [e.step for e in events],
            "columns": {c: values[:, j] for j, c in enumerate(described["columns"])}}


@pytest.fixture(scope="module")
def tensorboard(logdir, tmp_path_factory):
    port = free_port()
    flags = ["--logdir", logdir, "--port", str(port), "--host", "127.0.0.1"]
    if _entry_point_registered():
        cmd = [sys.executable, "-m", "tensorboard.main", *flags]
    else:
        assert not IN_CI, "the tensorboard_plugins entry point is not registered (pip install -e .)"
        cmd = [sys.executable, "-c", _LAUNCHER, *flags]
    log_path = tmp_path_factory.mktemp("tb") / "tensorboard.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=repo_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def labels_enabled():
        try:
            with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5) as r:
                return json.load(r).get(fmt.PLUGIN_NAME, {}).get("enabled")
        except OSError:
            return False

    try:
        wait_for(labels_enabled, timeout=180, interval=0.5, what="TensorBoard with the Labels plugin", proc=proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_dashboard(driver, url: str) -> None:
    """Opens TensorBoard, clicks its Labels tab, enters the dashboard's iframe and waits for the table."""
    driver.switch_to.default_content()
    driver.get(url + "/")
    tab = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='Labels']"))
    tab[0].click()
    frame = WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"iframe[src*='name={fmt.PLUGIN_NAME}']"))
    driver.switch_to.frame(frame[0])
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#label-table tbody tr"))


def table_rows(driver) -> list[dict]:
    """The rendered table: one {column key: cell text} per row."""
    keys = [th.get_attribute("data-column") for th in driver.find_elements(By.CSS_SELECTOR, "#label-table thead th")]
    rows = driver.execute_script("return [...document.querySelectorAll('#label-table tbody tr')]"
                                 ".map((tr) => [...tr.children].map((td) => td.textContent));")
    return [dict(zip(keys, cells)) for cells in rows]


def numbers(cells: list[str]) -> list[float | None]:
    return [None if c == "–" else float(c.replace(",", "")) for c in cells]


def set_input(driver, element_id: str, text: str) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(text)


def test_table_sorting_and_filters(tensorboard, browser, expected):
    open_dashboard(browser, tensorboard)
    rows = table_rows(browser)
    assert sorted(r["label"] for r in rows) == sorted(expected["labels"])  # one row per label
    assert Select(browser.find_element(By.ID, "run-select")).first_selected_option.get_attribute("value") == "eval"

    for clicks, descending in ((1, True), (2, False)):
        browser.find_element(By.CSS_SELECTOR, "#label-table th[data-column='pr_auc']").click()
        values = numbers([r["pr_auc"] for r in table_rows(browser)])
        present = [v for v in values if v is not None]
        assert present == sorted(present, reverse=descending) and len(set(present)) > 1, clicks
        assert values[len(present):] == [None] * (len(values) - len(present))  # undefined values last
    browser.find_element(By.CSS_SELECTOR, "#label-table th[data-column='label']").click()
    assert [r["label"] for r in table_rows(browser)] == sorted(expected["labels"])

    # The filters redraw once typing pauses: wait for the rows to change.
    support = expected["columns"]["support"]
    cut = int(np.median(support)) + 1
    kept = sorted(n for n, s in zip(expected["labels"], support) if s >= cut)
    assert 0 < len(kept) < len(expected["labels"])
    set_input(browser, "min-support", str(cut))
    WebDriverWait(browser, 20).until(lambda d: sorted(r["label"] for r in table_rows(d)) == kept)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#scatter circle.point")) == len(kept)  # the plot follows
    set_input(browser, "min-support", "0")
    set_input(browser, "name-filter", expected["labels"][1])
    WebDriverWait(browser, 20).until(lambda d: [r["label"] for r in table_rows(d)] == [expected["labels"][1]])


def test_scatter_and_label_page(tensorboard, browser, expected):
    open_dashboard(browser, tensorboard)
    points = browser.find_elements(By.CSS_SELECTOR, "#scatter circle.point")
    assert len(points) == len(expected["labels"])  # one point per label (all have a PR-AUC here)
    assert sorted(p.get_attribute("data-label") for p in points) == sorted(expected["labels"])
    point = points[2]
    name = point.get_attribute("data-label")
    ActionChains(browser).move_to_element(point).perform()
    tooltip = browser.find_element(By.ID, "tooltip")
    WebDriverWait(browser, 10).until(lambda d: tooltip.is_displayed() and name in tooltip.text)

    point.click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history-table tbody tr"))
    assert browser.find_element(By.ID, "label-title").text == name
    history = browser.find_elements(By.CSS_SELECTOR, "#history-table tbody tr")
    assert [int(r.find_element(By.CSS_SELECTOR, "td").text) for r in history] == expected["steps"]
    index = expected["labels"].index(name)
    last_pr_auc = history[-1].find_elements(By.CSS_SELECTOR, "td")[1].text
    assert float(last_pr_auc) == pytest.approx(float(expected["columns"]["pr_auc"][index]), abs=5e-4)
    series = {s.get_attribute("data-series") for s in browser.find_elements(By.CSS_SELECTOR, "#history-chart polyline")}
    assert series == {"PR-AUC", "ROC-AUC", "F1"}
    assert browser.find_elements(By.CSS_SELECTOR, "#pr-curve polyline.curve")  # its curve at the chosen step
    # The marker sits at the label's own recall and precision at its threshold (chart box: x 50 + 290 r, y 10 +
    # 244 (1 - p)), not at the nearest of the curve's thresholds.
    recall, precision = (float(expected["columns"][c][index]) for c in ("recall", "precision"))
    markers = browser.find_elements(By.CSS_SELECTOR, "#pr-curve circle.marker")
    assert len(markers) == int(np.isfinite(recall) and np.isfinite(precision))
    for marker in markers:
        assert float(marker.get_attribute("cx")) == pytest.approx(50 + 290 * recall, abs=0.5)
        assert float(marker.get_attribute("cy")) == pytest.approx(10 + 244 * (1 - precision), abs=0.5)
    browser.find_element(By.ID, "back").click()
    assert browser.find_element(By.ID, "overview").is_displayed()


def test_two_runs_side_by_side(tensorboard, browser, expected):
    open_dashboard(browser, tensorboard)
    Select(browser.find_element(By.ID, "compare-select")).select_by_value("train")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#label-table th[data-column='delta']"))
    header = browser.find_element(By.CSS_SELECTOR, "#summary-table thead tr").text
    assert "eval" in header and "train" in header
    rows = browser.find_elements(By.CSS_SELECTOR, "#summary-table tbody tr")
    buckets = [r.get_attribute("data-bucket") for r in rows]
    assert buckets == ["all", "head", "torso", "tail"]
    deltas = numbers([r["delta"] for r in table_rows(browser)])
    assert len(deltas) == len(expected["labels"]) and any(d is not None for d in deltas)

"""The submit tool against a stub Kubernetes API server (real kubernetes client, real HTTP).

A ThreadingHTTPServer on 127.0.0.1 records every request and answers from a route table;
a kubeconfig points the official client at it. Each test asserts the exact requests.
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
import urllib.parse

import pytest
import yaml

from k8s import submit

NS = "ns1"
TFJOBS = f"/apis/kubeflow.org/v1/namespaces/{NS}/tfjobs"
MPIJOBS = f"/apis/kubeflow.org/v2beta1/namespaces/{NS}/mpijobs"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
SERVICES = f"/api/v1/namespaces/{NS}/services"
NOT_SERVED = (404, "404 page not found\n")  # what the API server says for an unknown group/version


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if details is not None:
        body["details"] = details
    return body


def not_found(kind_plural: str, name: str, group: str = "") -> tuple:
    return 404, status_body(404, "NotFound", f'{kind_plural} "{name}" not found',
                            {"name": name, "group": group, "kind": kind_plural})


class StubApi(http.server.ThreadingHTTPServer):
    """Records (method, path, query, body, headers); answers from ``routes``."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.routes: dict[tuple[str, str], tuple[int, object]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _handle(self):
        url = urllib.parse.urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        self.server.requests.append({"method": self.command, "path": url.path,
                                     "query": dict(urllib.parse.parse_qsl(url.query)),
                                     "body": body,
                                     "headers": {k.lower(): v for k, v in self.headers.items()}})
        route = self.server.routes.get((self.command, url.path))
        if route is None:
            if self.command == "POST":  # created: echo the object back, as the API server does
                obj = dict(body)
                obj["metadata"] = {**obj["metadata"], "uid": "0000-1111", "resourceVersion": "1"}
                route = (201, obj)
            elif self.command == "DELETE":
                route = (200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
            else:
                route = (404, status_body(404, "NotFound", "not found"))
        code, payload = route
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


@pytest.fixture
def api():
    server = StubApi()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_kubeconfig(path, server_url: str, namespace: str | None = NS) -> str:
    context = {"cluster": "stub", "user": "tester"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": server_url}}],
        "users": [{"name": "tester", "user": {"token": "stub-token"}}],
        "contexts": [{"name": "stub", "context": context}],
    }))
    return str(path)


@pytest.fixture
def kubeconfig(api, tmp_path, monkeypatch):
    # Nothing from the developer's machine may leak in: no KUBECONFIG, no ~/.kube/config.
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return write_kubeconfig(tmp_path / "kubeconfig", api.url)


def submit_args(kubeconfig: str, backend: str, *more: str) -> list[str]:
    return ["--backend", backend, "--workers", "2", "--image", "reg.example/mlt:1",
            "--data", "pvc://mlt-data/ds", "--model-dir", "pvc://mlt-model/exp1",
            "--name", "exp1", "--kubeconfig", kubeconfig, *more]


def test_submit_tfjob_posts_one_custom_object(api, kubeconfig, capsys):
    rc = submit.main(submit_args(kubeconfig, "tfjob", "--", "--max-steps", "100"))
    out = capsys.readouterr().out
    assert rc == 0
    assert api.calls() == [("POST", TFJOBS)]
    request = api.requests[0]
    assert request["body"]["kind"] == "TFJob" and request["body"]["metadata"]["name"] == "exp1"
    assert request["body"]["metadata"]["namespace"] == NS  # from the kubeconfig context
    assert request["query"].get("fieldValidation") == "Strict"
    assert request["headers"].get("authorization") == "Bearer stub-token"
    command = request["body"]["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[-2:] == ["--max-steps", "100"]
    assert "submitted TFJob exp1 in namespace ns1" in out
    assert "kubectl logs -n ns1" in out and "svc/mlt-tensorboard 6006:6006" in out


def test_submit_mpijob_posts_v2beta1(api, kubeconfig, capsys):
    assert submit.main(submit_args(kubeconfig, "mpijob", "--gpus-per-worker", "4")) == 0
    assert api.calls() == [("POST", MPIJOBS)]
    body = api.requests[0]["body"]
    assert body["kind"] == "MPIJob" and body["spec"]["slotsPerWorker"] == 4
    assert "component=launcher" in capsys.readouterr().out


def test_submit_indexed_job_posts_job_then_service(api, kubeconfig):
    assert submit.main(submit_args(kubeconfig, "indexed-job", "--namespace", "other")) == 0
    assert api.calls() == [("POST", "/apis/batch/v1/namespaces/other/jobs"),
                           ("POST", "/api/v1/namespaces/other/services")]
    job, service = (r["body"] for r in api.requests)
    assert (job["kind"], job["metadata"]["name"], job["spec"]["completionMode"]) == ("Job", "exp1", "Indexed")
    assert (service["kind"], service["spec"]["clusterIP"]) == ("Service", "None")
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


@pytest.mark.parametrize("backend,path,expected", [
    ("tfjob", TFJOBS, "TFJob CRD not installed: install the Kubeflow training operator"),
    ("mpijob", MPIJOBS, "MPIJob CRD not installed: install the Kubeflow mpi-operator"),
])
def test_missing_crd_is_one_clear_line(api, kubeconfig, capsys, backend, path, expected):
    api.routes[("POST", path)] = NOT_SERVED
    assert submit.main(submit_args(kubeconfig, backend)) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert api.calls() == [("POST", path)]


def test_missing_namespace_is_not_reported_as_missing_crd(api, kubeconfig, capsys):
    api.routes[("POST", TFJOBS)] = (404, status_body(404, "NotFound", 'namespaces "ns1" not found',
                                                     {"name": NS, "kind": "namespaces"}))
    assert submit.main(submit_args(kubeconfig, "tfjob")) == 1
    err = capsys.readouterr().err
    assert "namespace 'ns1' not found" in err and "CRD" not in err


def test_name_conflict(api, kubeconfig, capsys):
    api.routes[("POST", JOBS)] = (409, status_body(409, "AlreadyExists", 'jobs.batch "exp1" already exists'))
    assert submit.main(submit_args(kubeconfig, "indexed-job")) == 1
    err = capsys.readouterr().err
    assert "Job exp1 already exists in namespace ns1" in err and "delete exp1" in err
    assert api.calls() == [("POST", JOBS)]  # no Service is created for a job that was refused


def test_forbidden(api, kubeconfig, capsys):
    message = 'tfjobs.kubeflow.org is forbidden: User "tester" cannot create resource "tfjobs"'
    api.routes[("POST", TFJOBS)] = (403, status_body(403, "Forbidden", message))
    assert submit.main(submit_args(kubeconfig, "tfjob")) == 1
    err = capsys.readouterr().err
    assert err.startswith("submit_k8s.py: error: forbidden: ") and 'cannot create resource "tfjobs"' in err


def test_no_kubeconfig_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = submit_args("unused", "tfjob")
    args = args[:args.index("--kubeconfig")]
    assert submit.main(args) == 1
    err = capsys.readouterr().err
    assert "no kubeconfig found" in err and "Traceback" not in err


def test_explicit_kubeconfig_missing(tmp_path, capsys):
    assert submit.main(["status", "exp1", "--kubeconfig", str(tmp_path / "nope")]) == 1
    assert "kubeconfig" in capsys.readouterr().err


def test_unreachable_api_server(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nobody listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}")
    assert submit.main(submit_args(path, "tfjob")) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err


def test_dry_run_prints_yaml_and_sends_nothing(api, kubeconfig, capsys):
    assert submit.main(submit_args(kubeconfig, "indexed-job", "--dry-run")) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("Job", "exp1"), ("Service", "exp1")]
    assert api.calls() == []


def test_bad_options_fail_before_any_request(api, kubeconfig, capsys):
    assert submit.main(submit_args(kubeconfig, "tfjob", "--workers", "0")) == 1
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert submit.main(submit_args(kubeconfig, "tfjob", "--toleration", "a:Sometimes")) == 1
    assert "--toleration expects" in capsys.readouterr().err
    assert api.calls() == []


def test_status_of_tfjob(api, kubeconfig, capsys):
    api.routes[("GET", f"{TFJOBS}/exp1")] = (200, {
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob", "metadata": {"name": "exp1", "namespace": NS},
        "status": {"conditions": [{"type": "Created", "status": "True"},
                                  {"type": "Running", "status": "True", "message": "TFJob exp1 is running."}],
                   "replicaStatuses": {"Worker": {"active": 2}}}})
    assert submit.main(["status", "exp1", "--backend", "tfjob", "--kubeconfig", kubeconfig]) == 0
    out = capsys.readouterr().out
    assert "TFJob exp1 (namespace ns1): Running" in out and "Worker: active=2 succeeded=0 failed=0" in out
    assert api.calls() == [("GET", f"{TFJOBS}/exp1")]


def test_status_without_backend_probes_kinds_in_order(api, kubeconfig, capsys):
    api.routes[("GET", f"{JOBS}/exp1")] = not_found("jobs", "exp1", "batch")
    api.routes[("GET", f"{TFJOBS}/exp1")] = NOT_SERVED  # training operator not installed
    api.routes[("GET", f"{MPIJOBS}/exp1")] = (200, {
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob",
        "metadata": {"name": "exp1", "namespace": NS},
        "status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})
    assert submit.main(["status", "exp1", "--kubeconfig", kubeconfig]) == 0
    assert "MPIJob exp1 (namespace ns1): Succeeded" in capsys.readouterr().out
    assert api.calls() == [("GET", f"{JOBS}/exp1"), ("GET", f"{TFJOBS}/exp1"), ("GET", f"{MPIJOBS}/exp1")]


def test_status_of_unknown_name(api, kubeconfig, capsys):
    for path in (JOBS, TFJOBS, MPIJOBS):
        api.routes[("GET", f"{path}/nope")] = not_found("x", "nope")
    assert submit.main(["status", "nope", "--kubeconfig", kubeconfig]) == 1
    assert "no Job, TFJob or MPIJob named nope in namespace ns1" in capsys.readouterr().err


def test_delete_indexed_job_removes_job_and_service(api, kubeconfig, capsys):
    assert submit.main(["delete", "exp1", "--backend", "indexed-job", "--kubeconfig", kubeconfig]) == 0
    assert api.calls() == [("DELETE", f"{JOBS}/exp1"), ("DELETE", f"{SERVICES}/exp1")]
    # Without Background propagation the API server would orphan the Job's pods.
    assert api.requests[0]["query"].get("propagationPolicy") == "Background"
    assert "deleted Job exp1 in namespace ns1" in capsys.readouterr().out


def test_delete_without_backend_finds_the_tfjob(api, kubeconfig, capsys):
    api.routes[("GET", f"{JOBS}/exp1")] = not_found("jobs", "exp1", "batch")
    api.routes[("GET", f"{TFJOBS}/exp1")] = (200, {"apiVersion": "kubeflow.org/v1", "kind": "TFJob",
                                                   "metadata": {"name": "exp1", "namespace": NS}})
    assert submit.main(["delete", "exp1", "--kubeconfig", kubeconfig]) == 0
    assert api.calls() == [("GET", f"{JOBS}/exp1"), ("GET", f"{TFJOBS}/exp1"), ("DELETE", f"{TFJOBS}/exp1")]


def test_delete_of_missing_tfjob(api, kubeconfig, capsys):
    api.routes[("DELETE", f"{TFJOBS}/exp1")] = not_found("tfjobs", "exp1", "kubeflow.org")
    assert submit.main(["delete", "exp1", "--backend", "tfjob", "--kubeconfig", kubeconfig]) == 1
    assert "TFJob exp1 not found in namespace ns1" in capsys.readouterr().err

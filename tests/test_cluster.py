"""TF_CONFIG builder for Indexed Jobs (trainer/cluster.py)."""
from __future__ import annotations

import json

import pytest

from trainer import cluster

BASE_ENV = {"JOB_COMPLETION_INDEX": "1", "MLT_NUM_WORKERS": "3", "MLT_JOB_NAME": "exp1",
            "MLT_SERVICE": "exp1-svc"}


def test_dns_names_follow_indexed_job_hostnames():
    config = cluster.build_tf_config(2, 3, "exp1", "exp1-svc", None, 2222)
    assert config == {"cluster": {"worker": ["exp1-0.exp1-svc:2222", "exp1-1.exp1-svc:2222",
                                             "exp1-2.exp1-svc:2222"]},
                      "task": {"type": "worker", "index": 2}}


def test_namespace_makes_names_fully_qualified():
    config = cluster.build_tf_config(0, 2, "exp1", "svc", "team-a", 3000)
    assert config["cluster"]["worker"] == ["exp1-0.svc.team-a.svc:3000", "exp1-1.svc.team-a.svc:3000"]


def test_host_template_string_and_explicit_list():
    config = cluster.build_tf_config(1, 2, "j", "s", "ns", 2222,
                                     host_template="{job_name}-{index}.{service}.{namespace}.svc.cluster.local")
    assert config["cluster"]["worker"][1] == "j-1.s.ns.svc.cluster.local:2222"
    # Local runs: one host, a port per worker; addresses without a port get `port`.
    config = cluster.build_tf_config(0, 3, "j", "s", None, 5000,
                                     host_template=["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1"])
    assert config["cluster"]["worker"] == ["127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:5000"]
    assert config["task"] == {"type": "worker", "index": 0}


@pytest.mark.parametrize("kwargs,match", [
    ({"index": 3}, "outside 0..2"),
    ({"index": -1}, "outside 0..2"),
    ({"num_workers": 0}, "num_workers"),
    ({"port": 70000}, "port"),
    ({"host_template": "{job_name}-{idx}"}, "bad host template"),
    ({"host_template": ["a:1", "b:2"]}, "2 worker addresses given for num_workers=3"),
    ({"host_template": ["a:1", "a:1", "b:1"]}, "repeat"),
    ({"job_name": ""}, "job_name and service are required"),
])
def test_build_rejects_bad_arguments(kwargs, match):
    args = {"index": 0, "num_workers": 3, "job_name": "j", "service": "s", "namespace": None, "port": 2222}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cluster.build_tf_config(**args)


def test_env_sets_tf_config():
    env = dict(BASE_ENV, MLT_PORT="2300", MLT_NAMESPACE="team-a")
    config = cluster.maybe_set_tf_config_from_indexed_job(env)
    assert config["task"] == {"type": "worker", "index": 1}
    assert config["cluster"]["worker"][0] == "exp1-0.exp1-svc.team-a.svc:2300"
    assert json.loads(env["TF_CONFIG"]) == config


def test_env_explicit_hosts_replace_dns_names():
    env = {"JOB_COMPLETION_INDEX": "0", "MLT_HOSTS": "127.0.0.1:41001, 127.0.0.1:41002"}
    config = cluster.maybe_set_tf_config_from_indexed_job(env)
    assert config["cluster"]["worker"] == ["127.0.0.1:41001", "127.0.0.1:41002"]


def test_existing_tf_config_wins_and_plain_runs_are_untouched():
    env = dict(BASE_ENV, TF_CONFIG='{"cluster": {}}')
    assert cluster.maybe_set_tf_config_from_indexed_job(env) is None
    assert env["TF_CONFIG"] == '{"cluster": {}}'
    env = {"MLT_NUM_WORKERS": "2"}  # no JOB_COMPLETION_INDEX: not an Indexed Job
    assert cluster.maybe_set_tf_config_from_indexed_job(env) is None
    assert "TF_CONFIG" not in env


def test_default_environ_is_os_environ(monkeypatch):
    # setenv first so monkeypatch restores the original state (absent) afterwards: the builder sets
    # TF_CONFIG in os.environ, which would otherwise leak into later in-process training tests.
    monkeypatch.setenv("TF_CONFIG", "placeholder")
    monkeypatch.delenv("TF_CONFIG")
    for key, value in dict(BASE_ENV, MLT_HOSTS="").items():
        monkeypatch.setenv(key, value)
    import os
    cluster.maybe_set_tf_config_from_indexed_job()
    assert json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 1


@pytest.mark.parametrize("change,variable", [
    ({"JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX"),
    ({"JOB_COMPLETION_INDEX": "5"}, "JOB_COMPLETION_INDEX"),
    ({"MLT_NUM_WORKERS": None}, "MLT_NUM_WORKERS"),
    ({"MLT_NUM_WORKERS": "two"}, "MLT_NUM_WORKERS"),
    ({"MLT_NUM_WORKERS": "0"}, "MLT_NUM_WORKERS"),
    ({"MLT_JOB_NAME": ""}, "MLT_JOB_NAME"),
    ({"MLT_SERVICE": None}, "MLT_SERVICE"),
    ({"MLT_PORT": "http"}, "MLT_PORT"),
    ({"MLT_PORT": "0"}, "MLT_PORT"),
    ({"MLT_HOST_TEMPLATE": "{nope}"}, "MLT_HOST_TEMPLATE"),
    ({"MLT_HOSTS": "a:1,b:2"}, "MLT_NUM_WORKERS"),  # 2 hosts but MLT_NUM_WORKERS=3
    ({"MLT_HOSTS": "a:1,,b:2", "MLT_NUM_WORKERS": None}, "MLT_HOSTS"),
    ({"MLT_HOSTS": "a:1:2", "MLT_NUM_WORKERS": None}, "MLT_HOSTS"),
])
def test_bad_env_is_one_line_naming_the_variable(change, variable):
    env = dict(BASE_ENV)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(ValueError) as info:
        cluster.maybe_set_tf_config_from_indexed_job(env)
    message = str(info.value)
    assert variable in message and "\n" not in message
    assert "TF_CONFIG" not in env

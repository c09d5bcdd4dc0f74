"""deploy/app.yaml, the application's args and `spin-ray serve`'s overrides; ray_cluster.yaml
against the cluster launcher's checks (nothing deployed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spin_ray.cli import build_parser
from spin_ray.commands.serve import IMPORT_PATH, read_config, resolve
from spin_ray.serve.app_config import AppConfig, ClusterResources, EngineDeploymentConfig

ROOT = Path(__file__).resolve().parents[1]
APP_YAML = ROOT / "deploy" / "app.yaml"
CLUSTER_YAML = ROOT / "ray_cluster.yaml"


def test_app_yaml_is_a_valid_serve_config_that_builds():
    from ray.serve.schema import ServeDeploySchema

    from spin_ray.serve import build_app

    config = yaml.safe_load(APP_YAML.read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == IMPORT_PATH
    args = AppConfig.from_args(app["args"])
    assert (
        args.engine.autoscaling_config["max_replicas"]
        >= args.engine.autoscaling_config["min_replicas"]
    )
    build_app(app["args"])  # every key is known and every value valid


@pytest.mark.parametrize(
    "args, field",
    [
        ({"modle": "x"}, "modle"),
        ({"engine": {"num_gpu": 1}}, "num_gpu"),
        ({"engine": {"num_gpus": -1}}, "num_gpus"),
        ({"engine": {"max_queued_requests": 0}}, "max_queued_requests"),
        ({"engine": {"routing_stats_period_s": 2.0, "stale_after_s": 1.0}}, "stale_after_s"),
        ({"ingress": {"num_replicas": 0}}, "num_replicas"),
        ({"engine_args": {"model": "x"}}, "engine_args"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
    ],
)
def test_bad_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        AppConfig.from_args(args)


def test_unknown_engine_args_are_rejected():
    with pytest.raises(ValueError, match="engine_args: unknown keys \\['bogus'\\]"):
        AppConfig.from_args({"engine_args": {"bogus": 1}}).llm_kwargs(num_gpus=0)


def test_device_follows_the_gpus_of_a_replica():
    config = AppConfig.from_args({"engine_args": {"page_size": 32}})
    assert config.llm_kwargs(num_gpus=1)["device"] == "cuda"
    assert config.llm_kwargs(num_gpus=0)["device"] == "cpu"
    assert config.llm_kwargs(num_gpus=0)["page_size"] == 32
    assert AppConfig.from_args({"engine_args": {"device": "cpu"}}).llm_kwargs(1)["device"] == "cpu"


def test_serve_command_overrides_the_config_file():
    parsed = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(APP_YAML),
            "--model",
            "/ckpt",
            "--port",
            "9000",
            "--num-replicas",
            "2",
        ]
    )
    plan = resolve(parsed)
    from_file = read_config(APP_YAML)
    assert plan.args["model"] == "/ckpt"
    assert plan.args["engine"]["num_replicas"] == 2
    assert (
        plan.args["engine"]["autoscaling_config"] == from_file.args["engine"]["autoscaling_config"]
    )
    assert (plan.host, plan.port, plan.name) == (from_file.host, 9000, "spin-ray")

    default = resolve(build_parser().parse_args(["serve"]))
    assert default.args == {} and default.port == 8000


def test_cluster_yaml_passes_the_cluster_launcher_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # what `ray up` checks first
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] >= 1
    assert config["available_node_types"]["head"]["resources"]["GPU"] == 0
    assert any("spin-ray" in command for command in config["setup_commands"])


@pytest.mark.parametrize(
    "engine, num_gpus, free, expected",
    [
        # a 2-core laptop: 1 CPU left beside the ingress holds one CPU replica, not 4
        ({}, 0, ClusterResources(cpus=1, gpus=0), {"min_replicas": 1, "max_replicas": 1}),
        # 8 GPUs, one per replica: the configured max (4) is the bound
        ({}, 1, ClusterResources(cpus=63, gpus=8), {"min_replicas": 1, "max_replicas": 4}),
        # 2 GPUs: at most 2 replicas, and min_replicas never above max
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 6}}, 1,
         ClusterResources(cpus=31, gpus=2), {"min_replicas": 2, "max_replicas": 2}),
    ],
)  # fmt: skip
def test_autoscaling_bounds_follow_the_cluster(engine, num_gpus, free, expected):
    scale = EngineDeploymentConfig(**engine).fitted_scale(num_gpus, free)
    bounds = scale["autoscaling_config"]
    assert {k: bounds[k] for k in expected} == expected


def test_a_cluster_without_room_for_one_replica_is_an_error():
    with pytest.raises(ValueError, match="engine: a replica needs 1 GPU"):
        EngineDeploymentConfig().fitted_scale(1, ClusterResources(cpus=8, gpus=0))
    with pytest.raises(ValueError, match="num_replicas: 3 replicas"):
        EngineDeploymentConfig(num_replicas=3).fitted_scale(1, ClusterResources(cpus=8, gpus=2))
    fixed = EngineDeploymentConfig(num_replicas=2).fitted_scale(1, ClusterResources(8, 2))
    assert fixed == {"num_replicas": 2}

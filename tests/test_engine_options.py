"""One source for every setting (spin_ray/engine/options.py): each engine option is a field of
one frozen config; `LLM`'s keywords, the CLI's flags, the benchmark and deploy/app.yaml forward
them, and a field's docstring is its help text."""

from __future__ import annotations

import dataclasses

import pytest

from spin_ray.cache.config import CacheConfig
from spin_ray.cli import build_parser
from spin_ray.commands.engine_args import engine_kwargs, sparse_kwargs
from spin_ray.engine.config import EngineConfig, SchedulerConfig
from spin_ray.engine.options import engine_config, field_docs, options
from spin_ray.serve.app_config import AppConfig
from spin_ray.sparse import (
    ALGORITHMS,
    QuestConfig,
    RetroInferConfig,
    SeerConfig,
    ShadowKVConfig,
    SparseConfig,
    TierPolicy,
)
from spin_ray.sparse.algorithm_config import ALGORITHM_CONFIGS


def _flags(command: str) -> dict[str, str]:
    """Every optional flag of a subcommand with its help text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {flag: action.help for action in sub._actions for flag in action.option_strings}


def test_every_field_is_an_option_once():
    sections = (EngineConfig, CacheConfig, SchedulerConfig, SparseConfig)
    fields = [f.name for cls in sections for f in dataclasses.fields(cls)]
    structure = {"model", "cache", "scheduler", "sparse", "algorithm"}
    assert len(fields) == len(set(fields)), "a name owned by two configs"
    assert set(options()) == set(fields) - structure


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_every_option_is_a_flag_whose_help_is_the_field_doc(command):
    flags = _flags(command)
    for name, option in options().items():
        help_text = flags[f"--{name.replace('_', '-')}"]
        assert option.doc and help_text.startswith(option.doc.replace("%", "%%")), name
    for algorithm, cls in ALGORITHM_CONFIGS.items():
        for name, doc in field_docs(cls).items():
            assert flags[f"--{algorithm}-{name.replace('_', '-')}"].startswith(doc)


def test_field_docs_read_the_docstring_under_each_field():
    docs = field_docs(SparseConfig)
    assert docs["sink_tokens"] == "First tokens of every sequence always attended."
    assert docs["lru_buckets"].startswith("Recency buckets of the HBM buffer's LRU")
    assert field_docs(RetroInferConfig)["kmeans_iters"] == "k-means iterations."


def test_flags_become_the_configs():
    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--page-size", "8", "--no-async-scheduling",
         "--admission-reserve-tokens", "16", "--sparse", "retroinfer", "--tiers", "sparse-naive",
         "--token-budget", "0.25", "--retroinfer-kmeans-iters", "3", "--fused-retrieve"]
    )  # fmt: skip
    kwargs = engine_kwargs(args) | sparse_kwargs(args)
    config = engine_config(
        kwargs.pop("model"), **{k: v for k, v in kwargs.items() if k != "metrics_port"}
    )
    assert config.cache.page_size == 8 and config.async_scheduling is False
    assert config.scheduler.admission_reserve_tokens == 16
    assert config.sparse == SparseConfig(
        algorithm=RetroInferConfig(kmeans_iters=3),
        tiers=TierPolicy.NAIVE,
        token_budget=0.25,
        fused_retrieve=True,
    )
    none_given = build_parser().parse_args(["generate", "--prompt", "x"])
    assert sparse_kwargs(none_given) == {}
    assert engine_config(**engine_kwargs(none_given)).sparse is None  # dense, all KV in HBM


def test_an_algorithm_setting_needs_its_algorithm():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--seer-block-size", "32"])
    with pytest.raises(ValueError, match="--seer-block-size: a setting of seer"):
        sparse_kwargs(args)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--sparse", "nope"])
    with pytest.raises(ValueError, match="sparse: unknown algorithm 'nope'"):
        sparse_kwargs(args)


@pytest.mark.parametrize(
    "sparse, expected",
    [
        ("shadowkv", SparseConfig(algorithm=ShadowKVConfig())),
        (SeerConfig(block_size=128), SparseConfig(algorithm=SeerConfig(block_size=128))),
        (SparseConfig(token_budget=64), SparseConfig(token_budget=64)),
        ({"algorithm": {"name": "shadowkv", "chunk_size": 4}, "tiers": "sparse-naive"},
         SparseConfig(algorithm=ShadowKVConfig(chunk_size=4), tiers=TierPolicy.NAIVE)),
    ],
)  # fmt: skip
def test_sparse_takes_a_name_settings_a_config_or_a_mapping(sparse, expected):
    assert engine_config("spin-tiny", sparse).sparse == expected


def test_options_route_to_their_config_and_none_means_the_default():
    config = engine_config(
        "spin-tiny", device="cpu", page_size=32, max_num_seqs=3, token_budget=512, num_pages=None
    )
    assert config.cache == CacheConfig(page_size=32)
    assert config.scheduler == SchedulerConfig(max_num_seqs=3)
    assert config.sparse == SparseConfig(algorithm=QuestConfig(), token_budget=512)
    with pytest.raises(ValueError, match="page_sise: unknown engine option"):
        engine_config("spin-tiny", page_sise=32)
    with pytest.raises(ValueError, match="sparse.algorithm: shadowkv has no fields"):
        engine_config("spin-tiny", {"algorithm": {"name": "shadowkv", "block_size": 4}})
    with pytest.raises(ValueError, match="sparse: unknown fields"):
        engine_config("spin-tiny", {"mode": "spin"})


def test_algorithm_settings_check_themselves():
    for bad, field in [
        (lambda: ShadowKVConfig(chunk_size=3), "chunk_size"),
        (lambda: SeerConfig(block_size=0), "block_size"),
        (lambda: RetroInferConfig(estimation_fraction=1.0), "estimation_fraction"),
        (lambda: RetroInferConfig(kmeans_iters=-1), "kmeans_iters"),
    ]:
        with pytest.raises(ValueError, match=field):
            bad()
    with pytest.raises(ValueError, match="chunk_size: 32 must divide the page size 16"):
        SparseConfig(algorithm=ShadowKVConfig(chunk_size=32)).check_page_size(16)
    assert set(ALGORITHMS) == {"full", "quest", "shadowkv", "retroinfer", "seer"}


def test_the_serve_config_takes_exactly_the_options():
    app = AppConfig(engine_args={"page_size": 32, "sparse": "quest", "tiers": "spin"})
    assert app.llm_kwargs(num_gpus=0)["page_size"] == 32
    with pytest.raises(ValueError, match=r"engine_args: unknown keys \['mode'\]"):
        AppConfig(engine_args={"mode": "spin"}).llm_kwargs(num_gpus=0)


def test_no_measurement_sits_in_a_config_docstring():
    """Measurements live in bench/RESULTS.md: no field doc quotes a speed, a ratio or a rate."""
    for cls in (
        EngineConfig,
        CacheConfig,
        SchedulerConfig,
        SparseConfig,
        *ALGORITHM_CONFIGS.values(),
    ):
        for name, doc in field_docs(cls).items():
            assert not any(word in doc for word in ("H200", "H100", "%", " ms", "GB/s", "tok/s")), (
                name
            )

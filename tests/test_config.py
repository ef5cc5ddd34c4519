from __future__ import annotations

from pathlib import Path

import pytest

from node.config import DEV_OPERATOR_KEY, load_settings
from node.errors import ConfigError


def test_embedded_defaults_need_no_service(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'loranode.db'}"
    assert s.resolved_broker_url().startswith("sqla+sqlite:///")
    assert s.rpc_url is None and s.is_dev
    assert s.resolved_operator_key() == DEV_OPERATOR_KEY


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORANODE_DATABASE_URL", "postgresql+psycopg://u@db/loranode")
    monkeypatch.setenv("LORANODE_MAX_NUM_SEQS", "7")
    s = load_settings()
    assert s.resolved_database_url() == "postgresql+psycopg://u@db/loranode"
    assert s.max_num_seqs == 7


def test_toml_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('port = 9001\nmax_lora_rank = 8\n')
    monkeypatch.setenv("LORANODE_CONFIG", str(cfg))
    monkeypatch.setenv("LORANODE_PORT", "9002")
    s = load_settings()
    assert (s.port, s.max_lora_rank) == (9002, 8)


def test_key_from_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("0x" + "11" * 32 + "\n")
    s = load_settings(chain_id=8453, rpc_url="http://127.0.0.1:1", operator_key_file=key_file)
    assert s.resolved_operator_key() == "0x" + "11" * 32


def test_dev_key_on_a_real_chain_is_refused() -> None:
    with pytest.raises(ConfigError, match="development key cannot be used on chain id 1"):
        load_settings(chain_id=1, rpc_url="http://127.0.0.1:1", operator_key=DEV_OPERATOR_KEY)


def test_real_chain_without_rpc_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs an rpc_url"):
        load_settings(chain_id=1)


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs") as err:
        load_settings(max_num_seqs=0, unknown_setting=1)
    assert err.value.facts["errors"] == 2


def test_attribution_method_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORANODE_ATTRIBUTION_METHOD", "2")
    assert load_settings().attribution_method == 2
    monkeypatch.setenv("LORANODE_ATTRIBUTION_METHOD", "3")
    with pytest.raises(ConfigError, match="attribution_method"):
        load_settings()


def test_every_setting_survives_the_environment_a_child_process_gets(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`settings_env` is how `loranode dev`, the e2e cluster and bench/load.py hand settings to a child:
    each value must read back as itself (LORANODE_ATTRIBUTION_METHOD=2 was refused: a Literal[1, 2])."""
    from node.devkit.local_node import settings_env

    settings = load_settings(data_dir=tmp_path, attribution_method=2, max_in_flight=7)
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert load_settings() == settings


def test_rank_pools_come_from_the_environment_into_the_engine(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from node.api.wiring import engine_config

    monkeypatch.setenv("LORANODE_ADAPTER_RANK_POOLS", "8:48,16:16,64:8")
    settings = load_settings(model_path=tmp_path)
    assert engine_config(settings).adapter_rank_pools == ((8, 48), (16, 16), (64, 8))
    monkeypatch.setenv("LORANODE_ADAPTER_RANK_POOLS", "8x48")
    with pytest.raises(ConfigError, match="adapter_rank_pools"):
        load_settings()


def test_tensor_parallel_size_comes_from_the_environment_into_the_engine(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    from node.api.wiring import engine_config

    monkeypatch.setenv("LORANODE_TENSOR_PARALLEL_SIZE", "2")
    assert engine_config(load_settings(model_path=tmp_path)).tensor_parallel_size == 2
    monkeypatch.setenv("LORANODE_TENSOR_PARALLEL_SIZE", "0")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_settings()


def test_the_base_model_is_served_by_its_folder_name_or_the_configured_one(tmp_path: Path) -> None:
    assert load_settings(model_path=tmp_path / "Qwen2.5-0.5B").resolved_served_model_name() == "Qwen2.5-0.5B"
    named = load_settings(model_path=tmp_path / "x", served_model_name="qwen-small")
    assert named.resolved_served_model_name() == "qwen-small"
    for bad in ({"model_path": tmp_path / "7"}, {"served_model_name": "adapter-12"}):
        with pytest.raises(ConfigError, match="reads as an adapter id"):
            load_settings(**bad)
    with pytest.raises(ConfigError, match="served_model_name"):
        load_settings(served_model_name="two words")


def test_the_load_path_and_quantization_come_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    from node.api.wiring import engine_config, store_config

    assert store_config(load_settings()).verify_every_load is False  # verified once, entering the cache
    monkeypatch.setenv("LORANODE_ADAPTER_VERIFY_EVERY_LOAD", "true")
    monkeypatch.setenv("LORANODE_WEIGHT_QUANTIZATION", "int4")
    settings = load_settings(model_path=tmp_path)
    assert store_config(settings).verify_every_load is True
    assert engine_config(settings).weight_quantization == "int4"
    monkeypatch.setenv("LORANODE_WEIGHT_QUANTIZATION", "int3")
    with pytest.raises(ConfigError, match="weight_quantization"):
        load_settings()

"""The providers table: the shipped file, parse errors naming file and line, and accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from routing.errors import ConfigError, ProviderError
from routing.providers import (
    ProviderCapabilities,
    account_for,
    batch_adapter_for,
    load_providers,
    parse_providers,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "providers.toml"
KEY = "sk-cap-DO-NOT-LEAK-19ab"

MINIMAL = """\
[providers.local]
protocol = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "LOCAL_API_KEY"
always_listed = true
"""


def _shipped(env: dict[str, str]) -> dict[str, ProviderCapabilities]:
    return load_providers(SHIPPED, env)


def test_shipped_table_lists_openai_and_anthropic_without_keys() -> None:
    table = _shipped({})
    assert sorted(table) == ["anthropic", "openai"]
    openai, anthropic = table["openai"], table["anthropic"]
    assert (openai.protocol, anthropic.protocol) == ("openai", "anthropic")
    assert openai.expected_turnaround_s == 2 * 3600
    assert anthropic.expected_turnaround_s == 3600
    assert (openai.max_lines, anthropic.max_lines) == (50_000, 100_000)
    assert anthropic.max_bytes == 256_000_000
    assert openai.windows == ("24h",) and openai.discount == 0.5
    assert openai.max_line_bytes == openai.max_bytes
    assert anthropic.result_retention_s == 29 * 86400
    assert openai.models is None and openai.serves("anything")


@pytest.mark.parametrize(
    ("env_var", "name"),
    [
        ("GROQ_API_KEY", "groq"),
        ("TOGETHER_API_KEY", "together"),
        ("FIREWORKS_API_KEY", "fireworks"),
        ("DEEPINFRA_API_KEY", "deepinfra"),
    ],
)
def test_compatible_accounts_appear_once_their_key_is_set(env_var: str, name: str) -> None:
    assert name not in _shipped({env_var: ""})
    table = _shipped({env_var: KEY})
    assert sorted(table) == sorted(["openai", "anthropic", name])
    assert table[name].api_key_env == env_var
    assert table[name].protocol == "openai"


def test_shipped_provider_details() -> None:
    table = _shipped({"GROQ_API_KEY": "x", "TOGETHER_API_KEY": "x", "FIREWORKS_API_KEY": "x"})
    groq = table["groq"]
    assert groq.windows == ("24h", "48h", "7d")
    assert groq.window() == "24h" and groq.window_s("7d") == 7 * 86400
    assert table["together"].file_purpose == "batch-api"
    assert table["fireworks"].batch is False and table["fireworks"].realtime is True
    with pytest.raises(ProviderError, match=r"no completion window '7d'.*24h") as info:
        table["openai"].window("7d")
    assert not info.value.retryable


def test_account_for_reads_key_and_base_url_overrides() -> None:
    table = _shipped({"GROQ_API_KEY": KEY})
    env = {
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1/",
        "GROQ_API_KEY": KEY,
        "GROQ_BASE_URL": "http://127.0.0.1:8001/openai/v1",
    }
    openai = account_for(table["openai"], env)
    assert openai.kind == "openai" and openai.name == "openai"
    assert openai.base_url == "http://127.0.0.1:8000/v1"
    assert openai.api_key is not None and openai.api_key.get_secret_value() == KEY
    assert KEY not in repr(openai)
    assert account_for(table["groq"], env).base_url == "http://127.0.0.1:8001/openai/v1"
    anthropic = account_for(table["anthropic"], {"ANTHROPIC_API_KEY": KEY})
    assert anthropic.base_url == "https://api.anthropic.com" and anthropic.kind == "anthropic"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_key_names_the_variable(value: str | None) -> None:
    cap = _shipped({})["anthropic"]
    env = {"OPENAI_API_KEY": KEY} if value is None else {"ANTHROPIC_API_KEY": value}
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY") as info:
        account_for(cap, env)
    assert "'anthropic'" in str(info.value)
    assert KEY not in str(info.value)


def test_bad_base_url_override_names_the_variable() -> None:
    cap = _shipped({})["openai"]
    with pytest.raises(ConfigError, match=r"OPENAI_BASE_URL.*http://"):
        account_for(cap, {"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "api.example.com/v1"})


def test_base_url_env_can_be_named() -> None:
    text = MINIMAL + 'base_url_env = "MY_PROXY_URL"\n'
    cap = parse_providers(text, "p.toml", {})["local"]
    account = account_for(cap, {"LOCAL_API_KEY": KEY, "MY_PROXY_URL": "http://proxy:1/v1"})
    assert account.base_url == "http://proxy:1/v1"


def test_models_list_refuses_others_naming_model_and_account() -> None:
    text = MINIMAL + 'models = ["llama-3.1-8b", "mixtral"]\n'
    cap = parse_providers(text, "p.toml", {})["local"]
    assert cap.models == ("llama-3.1-8b", "mixtral")
    assert cap.serves("mixtral") and not cap.serves("gpt-4o")
    cap.require_model("mixtral")
    with pytest.raises(ProviderError, match=r"'local' does not serve model 'gpt-4o'") as info:
        cap.require_model("gpt-4o")
    assert not info.value.retryable
    assert "llama-3.1-8b, mixtral" in str(info.value)


def test_realtime_only_account_has_no_batch_adapter() -> None:
    table = _shipped({"FIREWORKS_API_KEY": KEY})
    cap = table["fireworks"]
    with pytest.raises(ConfigError, match=r"'fireworks' has no batch route"):
        batch_adapter_for(account_for(cap, {"FIREWORKS_API_KEY": KEY}), cap)


def test_durations_in_either_spelling() -> None:
    text = MINIMAL + 'result_retention = "2d"\nexpected_turnaround_s = 90\n'
    cap = parse_providers(text, "p.toml", {})["local"]
    assert cap.result_retention_s == 2 * 86400
    assert cap.expected_turnaround_s == 90


# -- errors name the file and the line -------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "line", "fragment"),
    [
        ("colour = 'blue'\n", 7, "colour): Extra inputs are not permitted"),
        ("max_lines = 0\n", 7, "max_lines): Input should be greater than or equal to 1"),
        ("discount = 1.5\n", 7, "discount): Input should be less than 1"),
        ("windows = ['soon']\n", 7, "windows): 'soon' is not a duration"),
        ("windows = []\n", 7, "windows): give at least one completion window"),
        ("max_bytes = 10\nmax_line_bytes = 20\n", 8, "max_line_bytes): 20 exceeds max_bytes (10)"),
        ("models = []\n", 7, "models): an empty list serves nothing"),
        ("result_retention = 'never'\n", 7, "result_retention): 'never' is not a duration"),
        ("result_retention = '1d'\nresult_retention_s = 5\n", 7, "not both"),
    ],
)
def test_errors_name_file_and_line(extra: str, line: int, fragment: str) -> None:
    text = "# header\n" + MINIMAL + extra
    with pytest.raises(ConfigError) as info:
        parse_providers(text, "conf/providers.toml", {})
    message = str(info.value)
    assert message.startswith(f"conf/providers.toml, line {line} "), message
    assert fragment in message
    assert "[providers.local" in message


def test_protocol_error_points_at_its_line() -> None:
    text = MINIMAL.replace('protocol = "openai"', 'protocol = "grpc"')
    with pytest.raises(ConfigError, match=r"p\.toml, line 2 \(\[providers\.local\] protocol\)"):
        parse_providers(text, "p.toml", {})


def test_missing_required_field_names_the_table() -> None:
    text = MINIMAL.replace('api_key_env = "LOCAL_API_KEY"\n', "")
    with pytest.raises(ConfigError, match=r"p\.toml, line 1 \(\[providers\.local\]\): api_key_env"):
        parse_providers(text, "p.toml", {})


def test_invalid_env_var_name() -> None:
    text = MINIMAL.replace('"LOCAL_API_KEY"', '"local-key"')
    with pytest.raises(ConfigError, match="'local-key' is not an environment variable name"):
        parse_providers(text, "p.toml", {})


def test_unused_accounts_are_still_validated() -> None:
    text = MINIMAL + '\n[providers.other]\nprotocol = "openai"\napi_key_env = "OTHER_KEY"\n'
    with pytest.raises(ConfigError, match=r"line 7 \(\[providers\.other\]\): base_url"):
        parse_providers(text, "p.toml", {})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[providers.x\n", "p.toml: not valid TOML"),
        ("title = 'x'\n", "p.toml: needs at least one [providers.NAME] table"),
        ("providers = 3\n", "needs at least one"),
        ("[providers]\nx = 3\n", "p.toml, line 2 ([providers.x]): must be a table"),
        (MINIMAL.replace("providers.local", 'providers."Bad Name"'), "name"),
    ],
)
def test_document_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_providers(text, "p.toml", {})
    assert fragment in str(info.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read the providers table"):
        load_providers(missing, {})

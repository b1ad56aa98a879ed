"""The one TOML table loader and the one ValidationError translator: every error says where."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from routing.decide.tables import (
    Table,
    TableFile,
    explain,
    first_error,
    settings_error,
    toml_label,
)
from routing.errors import ConfigError


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    size: int = Field(default=1, gt=0)
    colour: str = "red"

    @field_validator("colour")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("red", "blue"):
            raise ValueError(f"{v!r} is not a colour we paint")
        return v


def toml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def rows(text: str, *, key_lines: bool = False) -> list[Row]:
    tables = TableFile(toml(text), "conf/rows.toml").tables(
        "rows", "rows.NAME", key_lines=key_lines
    )
    return [t.build(Row, {**t.fields, "name": t.name}) for t in tables]


def refused(text: str, *, key_lines: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        rows(text, key_lines=key_lines)
    return str(info.value)


# -- the loader ------------------------------------------------------------------------------


def test_good_tables_in_file_order() -> None:
    assert rows("[rows.b]\nsize = 2\n\n[rows.a]\n") == [Row(name="b", size=2), Row(name="a")]


@pytest.mark.parametrize(
    ("text", "line"),
    [("[rows.a]\nsize = \n", 2), ("[rows.a]\n\n[rows.a]\n", 3), ("[rows.a\n", 1)],
)
def test_bad_toml_names_the_file_and_line(text: str, line: int) -> None:
    message = refused(text)
    assert message.startswith("conf/rows.toml: not valid TOML"), message
    assert f"line {line}" in message


@pytest.mark.parametrize("text", ["", "rows = 3\n", "[rows]\n", "[other.a]\n"])
def test_no_tables_says_what_one_looks_like(text: str) -> None:
    assert refused(text) == "conf/rows.toml: needs at least one [rows.NAME] table"


def test_a_value_that_is_not_a_table_names_its_line() -> None:
    assert refused("[rows]\n\nbad = 3\n") == "conf/rows.toml, line 3 ([rows.bad]): must be a table"


def test_wrong_type_names_the_file_line_table_and_field() -> None:
    message = refused('[rows.a]\n\n[rows."b/c"]\nsize = "big"\n')
    assert message.startswith('conf/rows.toml, line 3 ([rows."b/c"]): size: '), message
    assert "valid integer" in message


def test_unknown_key_names_the_file_line_and_key() -> None:
    message = refused("# rows\n[rows.a]\nweight = 3\n")
    assert message == "conf/rows.toml, line 2 ([rows.a]): weight: Extra inputs are not permitted"


def test_a_validator_message_is_shown_without_pydantics_prefix() -> None:
    message = refused("[rows.a]\ncolour = 'green'\n")
    assert message == "conf/rows.toml, line 1 ([rows.a]): colour: 'green' is not a colour we paint"


def test_only_refuses_a_key_outside_the_list() -> None:
    (table,) = TableFile("x = 1\n[t.a]\nk = 1\nz = 2\n", "f.toml").tables("t", "t.NAME")
    table.only(("k", "z"))
    with pytest.raises(ConfigError) as info:
        table.only(("k",))
    assert str(info.value) == "f.toml, line 2 ([t.a]): unknown key 'z' (k)"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("[rows.a]\n", 1),
        ("# x\n\n  [ rows . 'a' ]\n", 3),
        ('[rows."a"]\n', 1),
        ("rows.a.size = 0\n", 1),
        ("[rows]\nb = {}\na = { size = 0 }\n", 3),
        ("[rows]\nb = {}\na.size = 0\n", 3),
        ("[rows.a.sub]\nx = 1\n", 1),
        ("[[rows.a.items]]\nx = 1\n", 1),
        ("[rows.b]\nsize = 1\n[rows.a]\nsize = 0\n", 3),
    ],
)
def test_the_line_is_found_for_every_toml_spelling(text: str, line: int) -> None:
    file = TableFile(text, "f.toml")
    assert file.line("rows", "a") == line
    assert (file.tables("rows", "rows.NAME")[-1].where) == f"f.toml, line {line} ([rows.a])"


def test_a_table_inside_its_parent_gets_the_parents_line() -> None:
    file = TableFile("[p.x]\nmodels = { m = { size = 0 } }\n", "f.toml")
    (provider,) = file.tables("p", "p.NAME")
    (model,) = provider.tables("models")
    assert model.where == "f.toml, line 2 ([p.x.models.m])"
    with pytest.raises(ConfigError, match=r"line 1 \(\[p\.x\]\): models must be a table of "):
        Table.of(file, ("p", "x"), {"models": 3}, False).tables("models")


def test_key_lines_point_at_the_key_and_fall_back_to_the_table() -> None:
    text = "[rows.a]\n\nsize = 0\ntimeout = '1m'\n"
    (table,) = TableFile(text, "f.toml").tables("rows", "rows.NAME", key_lines=True)
    assert table.at("size") == "f.toml, line 3 ([rows.a] size)"
    assert table.at("timeout_s") == "f.toml, line 4 ([rows.a] timeout_s)"
    assert table.at("size.0") == "f.toml, line 3 ([rows.a] size.0)"
    assert table.at("colour") == "f.toml, line 1 ([rows.a]): colour"
    assert table.at("") == "f.toml, line 1 ([rows.a])"
    message = refused(text.replace("timeout = '1m'\n", ""), key_lines=True)
    assert message.startswith("conf/rows.toml, line 3 ([rows.a] size): Input should be greater")


def test_an_inline_table_at_the_top_and_a_table_no_line_defines() -> None:
    (table,) = TableFile("rows = { a = { size = 0 } }\n", "f.toml").tables("rows", "rows.NAME")
    assert table.where == "f.toml, line 1 ([rows.a])"
    assert TableFile("[x]\n", "f.toml").line("rows", "a") is None
    assert Table(TableFile("", "g.toml"), ("rows", "a"), {}).where == "g.toml, line ? ([rows.a])"


def test_key_like_text_inside_a_multiline_string_is_passed_over() -> None:
    text = "note = '''\n[\"bad\\q\"] = 1\n'''\n[rows.a]\nsize = 0\n"
    assert refused(text).startswith("conf/rows.toml, line 4 ([rows.a]): size:")


@pytest.mark.parametrize(
    ("path", "label"),
    [
        (("lanes", "fast"), "[lanes.fast]"),
        (("models", "org/name"), '[models."org/name"]'),
        (("providers", "openai", "models", "gpt-4.1"), '[providers.openai.models."gpt-4.1"]'),
    ],
)
def test_labels_quote_only_what_is_not_a_bare_key(path: tuple[str, ...], label: str) -> None:
    assert toml_label(path) == label


# -- the translator --------------------------------------------------------------------------


def _error(**fields: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Row.model_validate(fields)
    return info.value


def test_explain_says_where_the_caller_locates_the_field() -> None:
    exc = _error(name="a", colour="green")
    assert first_error(exc) == ("colour", "'green' is not a colour we paint")
    assert explain(exc, lambda f: f"here:{f}") == "here:colour: 'green' is not a colour we paint"


class _Env(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXBATCH_TEST_", extra="ignore")

    lease_s: float = Field(default=1.0, gt=0)
    redis_url: str = Field(default="redis://x", pattern=r"^redis://")
    basic_auth: SecretStr | None = None
    limits: dict[str, int] = {}

    @field_validator("basic_auth")
    @classmethod
    def _pair(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and ":" not in v.get_secret_value():
            raise ValueError("must be user:password")
        return v


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LEASE_S", "-1", "MIXBATCH_TEST_LEASE_S: Input should be greater than 0 (got '-1')"),
        ("BASIC_AUTH", "Q7secret", "MIXBATCH_TEST_BASIC_AUTH: must be user:password"),
        ("REDIS_URL", "http://u:Q7pw@h", "MIXBATCH_TEST_REDIS_URL: String should match"),
        ("LIMITS", '{"a": "x"}', "MIXBATCH_TEST_LIMITS (a): Input should be a valid integer"),
    ],
)
def test_settings_errors_name_the_variable_never_a_secret(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"MIXBATCH_TEST_{variable}", value)
    with pytest.raises(ValidationError) as info:
        _Env()
    text = str(settings_error(info.value, prefix="MIXBATCH_TEST_"))
    assert text.startswith(message), text
    assert "Q7" not in text

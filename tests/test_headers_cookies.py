"""Unit tests for the pure-Python data classes: HttpHeaders, ContentType, Cookie."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from server_native.http.cookies import Cookie, SameSite, parse_cookie_header
from server_native.http.errors import HttpBodyError, HttpException
from server_native.http.headers import (
    ContentType,
    HttpHeaders,
    format_http_date,
    parse_http_date,
)

UTC = timezone.utc
MOMENT = datetime(2015, 10, 21, 7, 28, tzinfo=UTC)
MOMENT_TEXT = "Wed, 21 Oct 2015 07:28:00 GMT"


# ---------------------------------------------------------------- errors


def test_http_exception_message_and_uri() -> None:
    error = HttpException("boom", uri="http://example.com/x")
    assert error.message == "boom"
    assert error.uri == "http://example.com/x"
    assert str(error) == "boom, uri = http://example.com/x"
    assert str(HttpException("plain")) == "plain"
    assert HttpException("plain").uri is None


def test_http_body_error_is_http_exception() -> None:
    with pytest.raises(HttpException, match="short body"):
        raise HttpBodyError("short body")


# ---------------------------------------------------------------- dates


def test_format_http_date_converts_to_gmt() -> None:
    assert format_http_date(MOMENT) == MOMENT_TEXT
    plus_two = MOMENT.astimezone(timezone(timedelta(hours=2)))
    assert format_http_date(plus_two) == MOMENT_TEXT
    assert format_http_date(MOMENT.replace(tzinfo=None)) == MOMENT_TEXT  # naive = UTC


@pytest.mark.parametrize(
    "text",
    [
        MOMENT_TEXT,
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # RFC 850
        "Wed Oct 21 07:28:00 2015",  # asctime
        "Wed, 21-Oct-2015 07:28:00 GMT",  # Netscape cookie style
        "Wed, 21 Oct 2015 09:28:00 +0200",
    ],
)
def test_parse_http_date_forms(text: str) -> None:
    parsed = parse_http_date(text)
    assert parsed == MOMENT
    assert parsed is not None and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["", "0", "yesterday", "Wed, 99 Foo 2015"])
def test_parse_http_date_invalid_is_none(text: str) -> None:
    assert parse_http_date(text) is None


# ---------------------------------------------------------------- HttpHeaders: collection


def test_names_are_case_insensitive_and_stored_lowercase() -> None:
    headers = HttpHeaders([("X-Thing", "a")])
    headers.add("X-THING", "b")
    assert headers.get_all("x-thing") == ["a", "b"]
    assert headers["X-Thing"] == ["a", "b"]
    assert "x-THING" in headers
    assert headers.items() == [("x-thing", "a"), ("x-thing", "b")]


def test_add_keeps_order_and_repeats() -> None:
    headers = HttpHeaders()
    headers.add("accept", "a")
    headers.add("vary", "x")
    headers.add("accept", "b")
    assert headers.items() == [("accept", "a"), ("vary", "x"), ("accept", "b")]
    assert list(headers) == ["accept", "vary"]
    assert len(headers) == 2


def test_add_converts_int_datetime_and_content_type() -> None:
    headers = HttpHeaders()
    headers.add("x-count", 3)
    headers.add("last-modified", MOMENT)
    headers.add("content-type", ContentType.json)
    assert headers.get("x-count") == "3"
    assert headers.get("last-modified") == MOMENT_TEXT
    assert headers.get("content-type") == "application/json; charset=utf-8"


@pytest.mark.parametrize("value", [True, 1.5, None, b"bytes", ["a"]])
def test_add_rejects_other_value_types(value: object) -> None:
    with pytest.raises(TypeError):
        HttpHeaders().add("x", value)  # type: ignore[arg-type]


def test_add_replaces_single_valued_headers() -> None:
    headers = HttpHeaders()
    headers.add("Content-Type", "text/plain")
    headers.add("content-type", "text/html")
    headers.add("content-length", 1)
    headers.add("content-length", 2)
    assert headers.get_all("content-type") == ["text/html"]
    assert headers.get_all("content-length") == ["2"]


@pytest.mark.parametrize("name", ["", "bad name", "x:y", "naïve", "a\r\nb", "(x)"])
def test_invalid_names_raise_value_error(name: str) -> None:
    headers = HttpHeaders()
    with pytest.raises(ValueError, match="header field name"):
        headers.add(name, "v")
    with pytest.raises(ValueError, match="header field name"):
        headers.set(name, "v")
    with pytest.raises(ValueError, match="header field name"):
        HttpHeaders([(name, "v")])


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\0b"])
def test_invalid_values_raise_value_error(value: str) -> None:
    headers = HttpHeaders()
    with pytest.raises(ValueError, match="CR, LF and NUL"):
        headers.add("x", value)
    with pytest.raises(ValueError, match="CR, LF and NUL"):
        headers.set("x", value)
    assert headers.items() == []


def test_content_length_value_must_be_digits() -> None:
    with pytest.raises(ValueError, match="only digits"):
        HttpHeaders().add("content-length", "12a")
    with pytest.raises(ValueError, match="only digits"):
        HttpHeaders().set("Content-Length", -1)


def test_set_replaces_all_values_in_place_of_the_first() -> None:
    headers = HttpHeaders([("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")])
    headers.set("A", "x")
    assert headers.items() == [("a", "x"), ("b", "2"), ("c", "4")]
    headers.set("d", 5)
    assert headers.items()[-1] == ("d", "5")


def test_remove_drops_matching_values_only() -> None:
    headers = HttpHeaders([("a", "1"), ("a", "2"), ("a", "1"), ("b", "1")])
    headers.remove("A", "1")
    assert headers.items() == [("a", "2"), ("b", "1")]
    headers.remove("a", "missing")
    assert headers.items() == [("a", "2"), ("b", "1")]


def test_remove_converts_the_value_like_add() -> None:
    headers = HttpHeaders([("x-count", "7")])
    headers.remove("x-count", 7)
    assert "x-count" not in headers


def test_remove_all_and_clear() -> None:
    headers = HttpHeaders([("a", "1"), ("b", "2"), ("a", "3")])
    headers.remove_all("A")
    assert headers.items() == [("b", "2")]
    headers.clear()
    assert headers.items() == []
    assert len(headers) == 0


def test_value_single_absent_and_multiple() -> None:
    headers = HttpHeaders([("a", "1"), ("b", "2"), ("b", "3")])
    assert headers.value("A") == "1"
    assert headers.value("missing") is None
    with pytest.raises(HttpException, match="More than one value for header b"):
        headers.value("b")


def test_get_returns_first_value_or_default() -> None:
    headers = HttpHeaders([("b", "2"), ("b", "3")])
    assert headers.get("B") == "2"
    assert headers.get("missing") is None
    assert headers.get("missing", "fallback") == "fallback"


def test_get_all_and_getitem_return_copies() -> None:
    headers = HttpHeaders([("a", "1")])
    headers.get_all("a").append("mutated")
    headers["a"].append("mutated")
    assert headers.get_all("a") == ["1"]
    assert headers.get_all("missing") == []
    with pytest.raises(KeyError):
        headers["missing"]


def test_contains_rejects_non_strings() -> None:
    headers = HttpHeaders([("a", "1")])
    assert "A" in headers
    assert "b" not in headers
    assert 1 not in headers


def test_iteration_survives_mutation() -> None:
    headers = HttpHeaders([("a", "1"), ("b", "2")])
    seen = []
    for name in headers:
        seen.append(name)
        headers.add("c", "3")
    assert seen == ["a", "b"]


def test_lookups_see_mutations_after_an_index_was_built() -> None:
    headers = HttpHeaders([("a", "1")])
    assert headers.get_all("a") == ["1"]  # builds the index
    headers.add("a", "2")
    assert headers.get_all("a") == ["1", "2"]
    headers.remove("a", "1")
    assert headers.get_all("a") == ["2"]
    headers.set("b", "x")
    assert list(headers) == ["a", "b"]


def test_items_is_a_copy() -> None:
    headers = HttpHeaders([("a", "1")])
    headers.items().append(("b", "2"))
    assert headers.items() == [("a", "1")]


def test_for_each_gets_each_name_once_with_all_values() -> None:
    headers = HttpHeaders([("a", "1"), ("b", "2"), ("a", "3")])
    calls: list[tuple[str, list[str]]] = []
    headers.for_each(lambda name, values: calls.append((name, values)))
    assert calls == [("a", ["1", "3"]), ("b", ["2"])]


def test_repr_shows_pairs() -> None:
    assert repr(HttpHeaders([("A", "1")])) == "HttpHeaders([('a', '1')])"


def test_constructor_from_pairs_validates_and_converts() -> None:
    headers = HttpHeaders([("X-N", 1), ("Date", MOMENT)])  # type: ignore[list-item]
    assert headers.items() == [("x-n", "1"), ("date", MOMENT_TEXT)]


def test_trusted_constructor_adopts_pairs_without_validation() -> None:
    pairs = [("host", "example.com"), ("x-a", "1"), ("x-a", "2")]
    headers = HttpHeaders(pairs, immutable=True, _trusted=True)
    assert headers.items() == pairs
    assert headers.get_all("x-a") == ["1", "2"]
    assert headers._pairs() == pairs
    assert headers._pairs() is not pairs  # callers may keep or change their copy
    assert HttpHeaders(iter(pairs), _trusted=True).items() == pairs


def test_version_changes_on_every_mutation() -> None:
    headers = HttpHeaders()
    versions = [headers._version]

    def step() -> None:
        assert headers._version > versions[-1]
        versions.append(headers._version)

    headers.add("a", "1")
    step()
    headers.set("a", "2")
    step()
    headers.add("b", "1")
    step()
    headers.remove("b", "1")
    step()
    headers.remove_all("a")
    step()
    headers.content_length = 5
    step()
    headers.content_type = ContentType.text
    step()
    headers.persistent_connection = False
    step()
    headers.host = "example.com"
    step()
    headers.clear()
    step()


def test_copy_is_mutable_and_independent() -> None:
    original = HttpHeaders([("a", "1")], immutable=True, protocol_version="1.0")
    duplicate = original.copy()
    duplicate.add("a", "2")
    assert duplicate.get_all("a") == ["1", "2"]
    assert original.get_all("a") == ["1"]
    assert duplicate.protocol_version == "1.0"


def test_immutable_headers_refuse_every_mutation() -> None:
    headers = HttpHeaders([("host", "example.com"), ("a", "1")], immutable=True)
    version = headers._version
    mutations: list[Callable[[], object]] = [
        lambda: headers.add("a", "2"),
        lambda: headers.set("a", "2"),
        lambda: headers.remove("a", "1"),
        lambda: headers.remove_all("a"),
        headers.clear,
        lambda: setattr(headers, "content_type", ContentType.text),
        lambda: setattr(headers, "content_length", 3),
        lambda: setattr(headers, "chunked_transfer_encoding", True),
        lambda: setattr(headers, "persistent_connection", False),
        lambda: setattr(headers, "host", "other"),
        lambda: setattr(headers, "port", 81),
        lambda: setattr(headers, "date", MOMENT),
        lambda: setattr(headers, "expires", None),
        lambda: setattr(headers, "if_modified_since", MOMENT),
    ]
    for mutate in mutations:
        with pytest.raises(HttpException, match="HTTP headers are not mutable"):
            mutate()
    assert headers.items() == [("host", "example.com"), ("a", "1")]
    assert headers._version == version


# ---------------------------------------------------------------- HttpHeaders: typed accessors


def test_content_type_accessor() -> None:
    headers = HttpHeaders()
    assert headers.content_type is None
    headers.content_type = ContentType.html
    assert headers.get("content-type") == "text/html; charset=utf-8"
    assert headers.content_type == ContentType.html
    headers.add("Content-Type", 'text/plain; charset="ISO-8859-1"')
    assert headers.content_type is not None
    assert headers.content_type.charset == "iso-8859-1"
    headers.content_type = None
    assert "content-type" not in headers


def test_content_length_accessor() -> None:
    headers = HttpHeaders()
    assert headers.content_length == -1
    headers.content_length = 42
    assert headers.get_all("content-length") == ["42"]
    assert headers.content_length == 42
    headers.content_length = 0
    assert headers.content_length == 0
    headers.content_length = -1
    assert "content-length" not in headers
    assert headers.content_length == -1


def test_content_length_malformed_wire_value_reads_as_absent() -> None:
    headers = HttpHeaders([("content-length", "abc")], _trusted=True)
    assert headers.content_length == -1
    assert HttpHeaders([("content-length", " 7 ")], _trusted=True).content_length == 7


@pytest.mark.parametrize("length", [-2, True, 1.0, "5"])
def test_content_length_rejects_bad_values(length: object) -> None:
    with pytest.raises(ValueError, match="content_length"):
        HttpHeaders().content_length = length  # type: ignore[assignment]


def test_content_length_and_chunked_exclude_each_other() -> None:
    headers = HttpHeaders()
    headers.content_length = 10
    headers.chunked_transfer_encoding = True
    assert headers.content_length == -1
    assert headers.items() == [("transfer-encoding", "chunked")]
    headers.content_length = 5
    assert headers.chunked_transfer_encoding is False
    assert headers.items() == [("content-length", "5")]


def test_chunked_transfer_encoding_accessor() -> None:
    headers = HttpHeaders([("transfer-encoding", "gzip, Chunked")], _trusted=True)
    assert headers.chunked_transfer_encoding is True
    headers.chunked_transfer_encoding = False
    assert headers.items() == [("transfer-encoding", "gzip")]
    assert headers.chunked_transfer_encoding is False
    headers.chunked_transfer_encoding = True
    headers.chunked_transfer_encoding = True  # idempotent
    assert headers.get_all("transfer-encoding") == ["gzip", "chunked"]


def test_chunked_is_refused_on_http10() -> None:
    headers = HttpHeaders(protocol_version="1.0")
    with pytest.raises(HttpException, match="HTTP 1.0"):
        headers.chunked_transfer_encoding = True
    headers.chunked_transfer_encoding = False  # turning it off is always fine
    assert "transfer-encoding" not in headers


@pytest.mark.parametrize(
    ("version", "connection", "persistent"),
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Upgrade, Close", False),
        ("1.1", "keep-alive", True),
        ("2", None, True),
        ("1.0", None, False),
        ("1.0", "Keep-Alive", True),
        ("1.0", "keep-alive, close", False),
    ],
)
def test_persistent_connection_getter(version: str, connection: str | None, persistent: bool) -> None:
    pairs = [] if connection is None else [("connection", connection)]
    headers = HttpHeaders(pairs, protocol_version=version)
    assert headers.persistent_connection is persistent


def test_persistent_connection_setter_http11() -> None:
    headers = HttpHeaders([("connection", "upgrade, keep-alive")])
    headers.persistent_connection = False
    assert headers.get_all("connection") == ["upgrade", "close"]
    assert headers.persistent_connection is False
    headers.persistent_connection = False  # idempotent
    assert headers.get_all("connection") == ["upgrade", "close"]
    headers.persistent_connection = True
    assert headers.get_all("connection") == ["upgrade"]
    assert headers.persistent_connection is True


def test_persistent_connection_setter_http10() -> None:
    headers = HttpHeaders([("connection", "close")], protocol_version="1.0")
    headers.persistent_connection = True
    assert headers.get_all("connection") == ["keep-alive"]
    assert headers.persistent_connection is True
    headers.persistent_connection = False
    assert "connection" not in headers
    assert headers.persistent_connection is False


def test_persistent_connection_follows_protocol_version_changes() -> None:
    headers = HttpHeaders()
    assert headers.persistent_connection is True
    headers.protocol_version = "1.0"
    assert headers.persistent_connection is False


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("example.com", "example.com", None),
        ("example.com:8080", "example.com", 8080),
        ("Example.com:", "Example.com", None),
        ("example.com:http", "example.com", None),
        ("example.com:70000", "example.com", None),
        ("[::1]:8443", "::1", 8443),
        ("[::1]", "::1", None),
        ("[::1", "[::1", None),
        ("::1", "::1", None),
        (":80", None, 80),
    ],
)
def test_host_and_port_parsing(value: str, host: str | None, port: int | None) -> None:
    headers = HttpHeaders([("host", value)], _trusted=True)
    assert headers.host == host
    assert headers.port == port


def test_host_and_port_absent() -> None:
    headers = HttpHeaders()
    assert headers.host is None
    assert headers.port is None


def test_host_setter_keeps_port_and_brackets_ipv6() -> None:
    headers = HttpHeaders([("host", "old:8080")])
    headers.host = "new.example"
    assert headers.get("host") == "new.example:8080"
    headers.host = "::1"
    assert headers.get("host") == "[::1]:8080"
    assert headers.host == "::1"
    headers.host = "[fe80::1]"
    assert headers.get("host") == "[fe80::1]:8080"
    headers.host = None
    assert "host" not in headers


def test_host_setter_rejects_bad_hosts() -> None:
    headers = HttpHeaders()
    with pytest.raises(ValueError, match="empty"):
        headers.host = ""
    with pytest.raises(ValueError, match="CR, LF"):
        headers.host = "a\r\nb"


def test_port_setter() -> None:
    headers = HttpHeaders([("host", "[::1]")])
    headers.port = 8080
    assert headers.get("host") == "[::1]:8080"
    assert headers.port == 8080
    headers.port = None
    assert headers.get("host") == "[::1]"


@pytest.mark.parametrize("port", [-1, 65536, True, "80"])
def test_port_setter_rejects_bad_ports(port: object) -> None:
    headers = HttpHeaders([("host", "example.com")])
    with pytest.raises(ValueError, match="port must be"):
        headers.port = port  # type: ignore[assignment]
    assert headers.get("host") == "example.com"


def test_port_setter_needs_a_host() -> None:
    with pytest.raises(ValueError, match="without a host"):
        HttpHeaders().port = 80


@pytest.mark.parametrize(
    ("attribute", "name"),
    [("date", "date"), ("expires", "expires"), ("if_modified_since", "if-modified-since")],
)
def test_date_accessors(attribute: str, name: str) -> None:
    headers = HttpHeaders()
    assert getattr(headers, attribute) is None
    setattr(headers, attribute, MOMENT.astimezone(timezone(timedelta(hours=-5))))
    assert headers.get_all(name) == [MOMENT_TEXT]
    value = getattr(headers, attribute)
    assert value == MOMENT
    assert value.tzinfo == UTC
    setattr(headers, attribute, MOMENT.replace(tzinfo=None))  # naive means UTC
    assert headers.get(name) == MOMENT_TEXT
    headers.set(name, "not a date")
    assert getattr(headers, attribute) is None
    setattr(headers, attribute, None)
    assert name not in headers


# ---------------------------------------------------------------- ContentType


def test_content_type_constants() -> None:
    assert ContentType.text.value == "text/plain; charset=utf-8"
    assert ContentType.html.value == "text/html; charset=utf-8"
    assert ContentType.json.value == "application/json; charset=utf-8"
    assert ContentType.binary.value == "application/octet-stream"
    assert ContentType.binary.charset is None


def test_content_type_constructor_normalizes() -> None:
    content_type = ContentType(" Text ", "HTML", charset="UTF-8", parameters={"Level": "1", "q": "a b"})
    assert content_type.primary_type == "text"
    assert content_type.sub_type == "html"
    assert content_type.mime_type == "text/html"
    assert content_type.charset == "utf-8"
    assert content_type.parameters == {"level": "1", "q": "a b", "charset": "utf-8"}
    assert content_type.value == 'text/html; level=1; q="a b"; charset=utf-8'
    assert str(content_type) == content_type.value


def test_content_type_charset_argument_overrides_parameter() -> None:
    content_type = ContentType("text", "plain", charset="utf-8", parameters={"charset": "latin1"})
    assert content_type.charset == "utf-8"
    assert content_type.value == "text/plain; charset=utf-8"


def test_content_type_parameters_are_a_copy() -> None:
    content_type = ContentType("text", "plain", charset="utf-8")
    content_type.parameters["charset"] = "ascii"
    assert content_type.charset == "utf-8"


@pytest.mark.parametrize(
    ("primary", "sub", "parameters"),
    [
        ("text/x", "plain", {}),
        ("", "plain", {}),
        ("text", "", {}),
        ("text", "plain", {"bad name": "x"}),
        ("text", "plain", {"x": "a\r\nb"}),
    ],
)
def test_content_type_constructor_rejects_invalid(primary: str, sub: str, parameters: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ContentType(primary, sub, parameters=parameters)


def test_content_type_quotes_and_escapes_parameter_values() -> None:
    content_type = ContentType("multipart", "form-data", parameters={"boundary": 'a"b\\c'})
    assert content_type.value == 'multipart/form-data; boundary="a\\"b\\\\c"'
    assert ContentType.parse(content_type.value).parameters == {"boundary": 'a"b\\c'}


@pytest.mark.parametrize(
    ("text", "mime_type", "parameters"),
    [
        ("text/plain", "text/plain", {}),
        ("  TEXT / Plain ;  charset = UTF-8 ", "text/plain", {"charset": "utf-8"}),
        ('text/html; charset="ISO-8859-1"', "text/html", {"charset": "iso-8859-1"}),
        ('multipart/form-data; boundary="x;y=z"', "multipart/form-data", {"boundary": "x;y=z"}),
        ("a/b; flag; =v; k=v;", "a/b", {"k": "v"}),
        ('a/b; k="unterminated', "a/b", {"k": "unterminated"}),
        ('a/b; k="v" junk; j=w', "a/b", {"k": "v", "j": "w"}),
        ("garbage", "garbage/", {}),
        ("", "/", {}),
    ],
)
def test_content_type_parse_is_tolerant(text: str, mime_type: str, parameters: dict[str, str]) -> None:
    content_type = ContentType.parse(text)
    assert content_type.mime_type == mime_type
    assert content_type.parameters == parameters


def test_content_type_equality_and_hash() -> None:
    parsed = ContentType.parse("Application/JSON; Charset=UTF-8")
    assert parsed == ContentType.json
    assert hash(parsed) == hash(ContentType.json)
    assert ContentType.parse("a/b; x=1; y=2") == ContentType.parse("a/b; y=2; x=1")
    assert ContentType.text != ContentType.html
    assert ContentType.text != "text/plain; charset=utf-8"
    assert len({ContentType.json, parsed, ContentType.text}) == 2


def test_content_type_repr_round_trips() -> None:
    assert repr(ContentType.json) == "ContentType.parse('application/json; charset=utf-8')"


# ---------------------------------------------------------------- Cookie


def test_cookie_defaults_and_str() -> None:
    cookie = Cookie("session", "abc123")
    assert (cookie.name, cookie.value) == ("session", "abc123")
    assert cookie.expires is None and cookie.max_age is None
    assert cookie.domain is None and cookie.path is None
    assert cookie.secure is False and cookie.http_only is False
    assert cookie.same_site is None
    assert str(cookie) == "session=abc123"


def test_cookie_str_with_every_attribute() -> None:
    cookie = Cookie(
        "id",
        '"quoted"',
        expires=MOMENT,
        max_age=3600,
        domain="example.com",
        path="/app",
        secure=True,
        http_only=True,
        same_site=SameSite.LAX,
    )
    assert str(cookie) == (
        f'id="quoted"; Expires={MOMENT_TEXT}; Max-Age=3600; Domain=example.com; '
        "Path=/app; Secure; HttpOnly; SameSite=Lax"
    )


@pytest.mark.parametrize(
    ("same_site", "expected"),
    [(SameSite.STRICT, "Strict"), ("none", "None"), ("LAX", "Lax")],
)
def test_cookie_same_site_accepts_enum_or_name(same_site: SameSite | str, expected: str) -> None:
    cookie = Cookie("a", "b", same_site=same_site)
    assert cookie.same_site is SameSite(expected)
    assert str(cookie).endswith(f"; SameSite={expected}")


def test_same_site_is_a_str_enum() -> None:
    assert isinstance(SameSite.NONE, str)
    assert SameSite("Strict") is SameSite.STRICT
    assert [member.value for member in SameSite] == ["Lax", "Strict", "None"]


def test_cookie_rejects_unknown_same_site() -> None:
    with pytest.raises(ValueError, match="SameSite"):
        Cookie("a", "b", same_site="sometimes")


def test_cookie_expires_is_normalized_to_utc() -> None:
    cookie = Cookie("a", "b", expires=MOMENT.astimezone(timezone(timedelta(hours=3))))
    assert cookie.expires == MOMENT and cookie.expires.tzinfo == UTC
    cookie.expires = MOMENT.replace(tzinfo=None)
    assert cookie.expires == MOMENT and cookie.expires.tzinfo == UTC


@pytest.mark.parametrize("name", ["", "a b", "a=b", "a;b", "a,b", '"a"', "naïve", "a\tb"])
def test_cookie_rejects_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="cookie name"):
        Cookie(name, "v")


@pytest.mark.parametrize("value", ["a b", "a;b", "a,b", "a\\b", '"a', 'a"', '"', 'a"b', "é", "a\x7f"])
def test_cookie_rejects_invalid_values(value: str) -> None:
    with pytest.raises(ValueError, match="cookie value"):
        Cookie("n", value)


@pytest.mark.parametrize("value", ["", '""', '"abc"', "!#$%&'()*+-./:<=>?@[]^_`{|}~"])
def test_cookie_accepts_valid_values(value: str) -> None:
    assert Cookie("n", value).value == value


def test_cookie_setters_validate() -> None:
    cookie = Cookie("a", "b")
    cookie.name = "c"
    cookie.value = "d"
    assert str(cookie) == "c=d"
    with pytest.raises(ValueError):
        cookie.name = "bad name"
    with pytest.raises(ValueError):
        cookie.value = "bad value"
    with pytest.raises(ValueError, match="path"):
        cookie.path = "/a; Domain=evil"
    with pytest.raises(ValueError, match="domain"):
        cookie.domain = "a\nb"
    with pytest.raises(ValueError, match="max_age"):
        cookie.max_age = "10; Secure"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="max_age"):
        Cookie("a", "b", max_age=True)
    assert str(cookie) == "c=d"


def test_from_set_cookie_value_reads_every_attribute() -> None:
    cookie = Cookie.from_set_cookie_value(
        ' id = "a3fWa" ; Expires=Wed, 21-Oct-2015 07:28:00 GMT; max-age=-5; '
        "DOMAIN=.example.com; Path=/docs; secure; HTTPONLY; SameSite=strict; Unknown=1"
    )
    assert cookie.name == "id"
    assert cookie.value == '"a3fWa"'
    assert cookie.expires == MOMENT
    assert cookie.max_age == -5
    assert cookie.domain == ".example.com"
    assert cookie.path == "/docs"
    assert cookie.secure is True
    assert cookie.http_only is True
    assert cookie.same_site is SameSite.STRICT


def test_from_set_cookie_value_ignores_malformed_attributes() -> None:
    cookie = Cookie.from_set_cookie_value(
        "a=b; Expires=whenever; Max-Age=soon; Max-Age=+5; SameSite=sometimes; Path=/x\ty"
    )
    assert cookie.expires is None
    assert cookie.max_age is None
    assert cookie.same_site is None
    assert cookie.path is None
    assert str(cookie) == "a=b"


def test_from_set_cookie_value_round_trips_str() -> None:
    original = Cookie(
        "token",
        "xyz",
        expires=MOMENT,
        max_age=0,
        domain="example.com",
        path="/",
        secure=True,
        http_only=True,
        same_site=SameSite.NONE,
    )
    parsed = Cookie.from_set_cookie_value(str(original))
    assert str(parsed) == str(original)
    assert repr(parsed) == f"Cookie.from_set_cookie_value({str(original)!r})"


@pytest.mark.parametrize("value", ["", "novalue", "=abc", "a b=c", "a=b c"])
def test_from_set_cookie_value_rejects_invalid_pair(value: str) -> None:
    with pytest.raises(ValueError):
        Cookie.from_set_cookie_value(value)


def test_parse_cookie_header() -> None:
    cookies = parse_cookie_header(' a=1; b="two" ;c=; a=3')
    assert [(cookie.name, cookie.value) for cookie in cookies] == [
        ("a", "1"),
        ("b", '"two"'),
        ("c", ""),
        ("a", "3"),
    ]


def test_parse_cookie_header_skips_malformed_pairs() -> None:
    cookies = parse_cookie_header('flag; =v; bad name=1; x=a b; y="q; ok=yes;;')
    assert [(cookie.name, cookie.value) for cookie in cookies] == [("ok", "yes")]
    assert parse_cookie_header("") == []

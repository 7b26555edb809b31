"""The store and shared_max_size keys: the shared tier's configuration (issue 18)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy_app.config import ConfigError, StoreConfig, load_config

SECRET = "s3cr3t-never-shown"


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def test_filesystem_is_the_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, "cache_dir: /srv/cache\n")
    assert cfg.store == StoreConfig()
    assert not cfg.store.shared
    assert cfg.shared_max_size is None
    assert load(tmp_path, "store: {type: filesystem}\n").store == StoreConfig()


def test_s3_store(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "store:\n"
        "  type: s3\n"
        "  endpoint: http://seaweed.example:8333/\n"
        "  bucket: registry-cache\n"
        "  region: eu-west-1\n"
        "  prefix: /cluster-a\n"
        "  access_key_id: AKID\n"
        f"  secret_access_key: {SECRET}\n"
        "shared_max_size: 2t\n",
    )
    assert cfg.store == StoreConfig(
        type="s3",
        endpoint="http://seaweed.example:8333",
        bucket="registry-cache",
        region="eu-west-1",
        prefix="cluster-a/",
        access_key_id="AKID",
        secret_access_key=SECRET,
    )
    assert cfg.store.shared
    assert cfg.shared_max_size == 2 << 40


def test_defaults_of_an_s3_store(tmp_path: Path) -> None:
    cfg = load(tmp_path, "store: {type: s3, endpoint: 'https://s3.example', bucket: b-1.x}\n")
    assert (cfg.store.region, cfg.store.prefix, cfg.store.access_key_id) == ("us-east-1", "", "")


def test_secret_from_the_environment(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "store: {type: s3, endpoint: 'http://127.0.0.1:8333', bucket: rcb, access_key_id: AK}\n",
        {"REGISTRY_CACHE_STORE_SECRET_ACCESS_KEY": SECRET},
    )
    assert cfg.store.secret_access_key == SECRET
    # every key of the mapping may come from the environment
    cfg = load(
        tmp_path,
        "cache_dir: /srv/c\n",
        {
            "REGISTRY_CACHE_STORE_TYPE": "s3",
            "REGISTRY_CACHE_STORE_ENDPOINT": "http://127.0.0.1:8333",
            "REGISTRY_CACHE_STORE_BUCKET": "rc-bucket",
            "REGISTRY_CACHE_SHARED_MAX_SIZE": "500g",
        },
    )
    assert cfg.store.bucket == "rc-bucket" and cfg.shared_max_size == 500 << 30


def test_the_secret_is_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = load(
        tmp_path,
        "store: {type: s3, endpoint: 'http://127.0.0.1:8333', bucket: rcb, access_key_id: AK}\n",
        {"REGISTRY_CACHE_STORE_SECRET_ACCESS_KEY": SECRET},
    )
    assert SECRET not in repr(cfg)
    assert SECRET not in repr(cfg.store) and SECRET not in str(cfg.store)
    assert "secret_access_key=***" in repr(cfg.store)
    bad = [
        # no access key id
        "store: {type: s3, endpoint: 'http://h:1', bucket: rcb, secret_access_key: %s}\n",
        # a bad endpoint next to the secret
        "store: {type: s3, endpoint: 'ftp://h', bucket: rcb, access_key_id: A, "
        "secret_access_key: %s}\n",
        # a secret that is no string
        "store: {type: s3, endpoint: 'http://h:1', bucket: rcb, access_key_id: A, "
        "secret_access_key: [%s]}\n",
    ]
    for text in bad:
        with pytest.raises(ConfigError) as e:
            load(tmp_path, text % SECRET)
        assert SECRET not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "", {"REGISTRY_CACHE_STORE": "{type: s3, secret_access_key: '" + SECRET})
    assert SECRET not in str(e.value)
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("{type: s3, bucket: rcb}", "needs an endpoint"),
        ("{type: s3, endpoint: 'http://h:8333'}", "needs a bucket"),
        ("{type: s3, endpoint: 'seaweed:8333', bucket: rcb}", "is not an http(s) URL"),
        ("{type: s3, endpoint: 'http://h:8333/path', bucket: rcb}", "is not an http(s) URL"),
        ("{type: s3, endpoint: 'http://h:99999', bucket: rcb}", "is not an http(s) URL"),
        ("{type: s3, endpoint: 'http://u:p@h', bucket: rcb}", "no credentials in it"),
        ("{type: s3, endpoint: 'http://h', bucket: Registry_Cache}", "not an S3 bucket name"),
        ("{type: s3, endpoint: 'http://h', bucket: rcb, prefix: 'a b'}", "prefix"),
        ("{type: s3, endpoint: 'http://h', bucket: rcb, prefix: '../x'}", "prefix"),
        ("{type: s3, endpoint: 'http://h', bucket: rcb, region: 'US EAST'}", "region"),
        ("{type: s3, endpoint: 'http://h', bucket: rcb, buckt: x}", "unknown key(s) buckt"),
        ("{type: gcs, endpoint: 'http://h', bucket: rcb}", "is not filesystem or s3"),
        ("{type: filesystem, bucket: rcb}", "takes no other keys"),
        ("s3", "expected a mapping"),
    ],
)
def test_store_errors(tmp_path: Path, store: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"store: {store}\n")
    assert "'store'" in str(e.value)
    assert message in str(e.value)


def test_shared_max_size_is_a_size(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shared_max_size"):
        load(tmp_path, "shared_max_size: lots\n")


@pytest.mark.parametrize("setting", ["shared_max_size: 2t", "shared_trim_interval: 5m"])
def test_a_shared_store_bound_without_a_shared_store_is_refused(
    tmp_path: Path, setting: str
) -> None:
    # Not ignored: the operator thinks the bucket is bounded, or is on the wrong config.
    with pytest.raises(ConfigError, match=r"store type filesystem.*set store: \{type: s3"):
        load(tmp_path, setting + "\n")
    assert load(tmp_path, "shared_max_size: ''\n").shared_max_size is None


def test_abandoned_upload_age(tmp_path: Path) -> None:
    base = "store: {type: s3, endpoint: 'http://127.0.0.1:8333', bucket: rcb"
    assert load(tmp_path, base + "}\n").store.abandoned_upload_age == 1800
    assert load(tmp_path, base + ", abandoned_upload_age: 2h}\n").store.abandoned_upload_age == 7200
    cfg = load(tmp_path, base + "}\n", {"REGISTRY_CACHE_STORE_ABANDONED_UPLOAD_AGE": "0"})
    assert cfg.store.abandoned_upload_age == 0
    with pytest.raises(ConfigError, match="abandoned_upload_age"):
        load(tmp_path, base + ", abandoned_upload_age: soon}\n")


@pytest.mark.parametrize(
    "text",
    [
        # a tab where YAML wants spaces, on the secret's line
        "store:\n  type: s3\n\tsecret_access_key: %s\n",
        # an unclosed flow mapping that holds the secret
        "store: {type: s3, secret_access_key: %s\nmax_size: 1g\n",
        # a proxy user's password on a line that does not parse
        "users:\n  - {name: a, password: %s: x}\n",
    ],
)
def test_a_file_that_does_not_parse_is_located_not_quoted(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text % SECRET)
    assert SECRET not in str(e.value)
    assert "is not valid YAML" in str(e.value) and "line " in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # not in a traceback

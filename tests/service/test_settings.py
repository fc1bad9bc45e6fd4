"""Settings that cannot take effect are refused where they are made, saying what to change."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"protect_metrics": True}, "DIML_PROTECT_METRICS needs DIML_READ_KEYS"),
        ({"protect_metrics": True, "write_keys": ["w"], "allow_writes": True},
         "DIML_PROTECT_METRICS needs DIML_READ_KEYS"),
        ({"write_keys": ["w"], "anonymous_writes": "loopback"},
         "applies only when no write key is set"),
        ({"allow_writes": False, "anonymous_writes": "any"}, "serves the index read-only"),
        ({"allow_writes": False, "write_keys": ["w"]}, "the keys would do nothing"),
        ({"device": "gpu"}, "use cpu, cuda or cuda:N"),
        ({"device": "cuda:x"}, "use cpu, cuda or cuda:N"),
    ],
    ids=["metrics-no-keys", "metrics-write-keys-only", "anonymous-beside-keys",
         "anonymous-read-only", "write-keys-read-only", "device-name", "device-index"],
)  # fmt: skip
def test_settings_that_cannot_take_effect_are_refused(values: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**values)  # type: ignore[arg-type]


def test_settings_that_take_effect_are_accepted() -> None:
    Settings(protect_metrics=True, read_keys=["r"])
    Settings(allow_writes=False, read_keys=["r"], write_keys=["w"])  # write keys also read
    Settings(anonymous_writes="loopback")
    Settings(device="cuda:1")  # whether it exists is checked when the service starts


def test_refusals_come_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIML_PROTECT_METRICS", "true")
    with pytest.raises(ValidationError, match="set DIML_READ_KEYS"):
        Settings()
    monkeypatch.setenv("DIML_READ_KEYS", "r1, r2")
    assert Settings().read_keys == ["r1", "r2"]

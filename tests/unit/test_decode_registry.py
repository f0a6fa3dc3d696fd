"""The decoder registry: one decoder a detected type, a second one refused."""

from __future__ import annotations

import pytest

from amavisd.decode import engine  # noqa: F401  (registers every decoder)
from amavisd.decode.registry import PROBES, REGISTRY, register


@pytest.fixture
def registry():
    """The real registry, restored after the test."""
    saved, saved_probes = dict(REGISTRY), dict(PROBES)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)
    PROBES.clear()
    PROBES.update(saved_probes)


def test_a_type_registered_twice_is_refused(registry):
    zip_decoder = registry["zip"]

    def another_zip(part, ctx):
        pass

    with pytest.raises(ValueError, match=r"two decoders for type 'zip': "
                       r"amavisd\.decode\.archives\.zip\..* and .*another_zip"):
        register("zip")(another_zip)
    assert registry["zip"] is zip_decoder


def test_a_refused_registration_registers_none_of_its_types(registry):
    def greedy(part, ctx):
        pass

    with pytest.raises(ValueError, match="'gzip'"):
        register("test-new-kind", "gzip", probe=lambda part: True)(greedy)
    assert "test-new-kind" not in registry and "test-new-kind" not in PROBES


def test_new_types_and_the_same_decoder_again_are_fine(registry):
    def mine(part, ctx):
        pass

    assert register("test-kind-a", "test-kind-b")(mine) is mine
    register("test-kind-a")(mine)  # the same function: nothing is lost
    assert registry["test-kind-a"] is registry["test-kind-b"] is mine

"""Token checks remembered between commits (`registry.auth.TokenStore`), on both backends:
a revocation by any connection (another server process) takes effect on the next request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from registry.auth import Actor, TokenStore
from registry.db.session import Database
from registry.errors import Unauthorized


@pytest.fixture
def two_servers(database_url: str) -> Iterator[tuple[TokenStore, TokenStore]]:
    """Two token stores on one database through separate engines, as two processes have."""
    first, second = Database.from_url(database_url), Database.from_url(database_url)
    yield TokenStore(first), TokenStore(second)
    first.dispose()
    second.dispose()


def test_a_token_revoked_elsewhere_is_refused_at_once(two_servers: tuple[TokenStore, TokenStore]) -> None:
    serving, other = two_servers
    token, _ = other.create("ci", "write", actor="tests")
    assert serving.authenticate(token) == Actor("ci", "write")
    assert serving.authenticate(token) == Actor("ci", "write")  # the second check may be remembered
    other.revoke("ci", actor="tests")
    assert serving.remembered(token) is None
    with pytest.raises(Unauthorized):
        serving.authenticate(token)


def test_a_valid_token_is_remembered_only_where_commits_can_be_seen(
    backend: str, two_servers: tuple[TokenStore, TokenStore]
) -> None:
    serving, other = two_servers
    token, _ = other.create("ci", "read", actor="tests")
    assert serving.remembered(token) is None  # never checked
    serving.authenticate(token)  # records the first use: a commit, so not remembered yet
    serving.authenticate(token)
    expected = Actor("ci", "read") if backend == "sqlite" else None  # PostgreSQL: no change marker
    assert serving.remembered(token) == expected
    other.create("unrelated", "read", actor="tests")  # any commit forgets it
    assert serving.remembered(token) is None
    assert serving.remembered("bky_" + "A" * 43) is None  # unknown tokens are never remembered

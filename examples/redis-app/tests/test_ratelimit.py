"""The application against a real Redis, one per test."""

from __future__ import annotations

import pytest
from ratelimit import Leaderboard, RateLimiter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


async def test_calls_beyond_the_limit_are_refused_until_the_next_window(client: Redis) -> None:
    limiter = RateLimiter(client, limit=3, window=10)
    assert [await limiter.allow("alice", now=100.0) for _ in range(4)] == [True, True, True, False]
    assert await limiter.allow("bob", now=100.0)  # keys are counted apart
    assert await limiter.remaining("alice", now=105.0) == 0
    assert await limiter.allow("alice", now=110.0)  # a new window


async def test_counters_expire_with_their_window(client: Redis) -> None:
    limiter = RateLimiter(client, limit=1, window=0.1)
    await limiter.allow("carol")
    assert await client.dbsize() == 1
    ttl = await client.pttl(next(iter(await client.keys("rl:carol:*"))))
    assert 0 < ttl <= 1100


async def test_every_test_gets_an_empty_redis(client: Redis) -> None:
    assert await client.dbsize() == 0
    board = Leaderboard(client)
    for page in ["/", "/about", "/", "/shop", "/"]:
        await board.hit(page)
    assert await board.top(2) == [("/", 3), ("/about", 1)] or await board.top(2) == [("/", 3), ("/shop", 1)]


async def test_the_data_is_gone_after_a_restart_without_persistence(services, client: Redis) -> None:  # type: ignore[no-untyped-def]
    await Leaderboard(client).hit("/")
    await services["redis"].restart(wait="healthy")
    assert await client.dbsize() == 0  # redis-py reconnects; --save "" kept nothing


async def test_the_application_sees_redis_going_away(services) -> None:  # type: ignore[no-untyped-def]
    await services["redis"].stop()  # its address stays, nothing answers there: no route to host
    client = Redis(host=services["redis"].address, port=6379, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(RedisConnectionError):
        await RateLimiter(client, limit=1, window=1).allow("dave")
    await client.aclose()


async def test_redis_runs_confined_in_its_stack(services) -> None:  # type: ignore[no-untyped-def]
    redis_service = services["redis"]
    info = await redis_service.exec(["redis-cli", "info", "server"], check=True)
    assert "redis_version:" in info.text
    stats = redis_service.stats()
    assert stats is not None and stats.memory_limit == 128 << 20

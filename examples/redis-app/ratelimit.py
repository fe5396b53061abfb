"""A small async application on Redis: a fixed-window rate limiter and a page-hit leaderboard.

limiter = RateLimiter(redis.asyncio.Redis(host=..., port=6379), limit=10, window=60)
if not await limiter.allow("client-42"):
    ...  # 429 Too Many Requests
"""

from __future__ import annotations

import time

import redis.asyncio as redis


class RateLimiter:
    """At most `limit` calls per `window` seconds per key: one Redis counter per key and window."""

    def __init__(self, client: redis.Redis, *, limit: int, window: float, prefix: str = "rl") -> None:
        self.client, self.limit, self.window, self.prefix = client, limit, window, prefix

    def _key(self, key: str, now: float) -> str:
        return f"{self.prefix}:{key}:{int(now // self.window)}"

    async def allow(self, key: str, *, now: float | None = None) -> bool:
        """Count one call of `key`; whether it is within the limit."""
        counter = self._key(key, time.time() if now is None else now)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.pexpire(counter, int(self.window * 1000) + 1000)
            count, _ = await pipe.execute()
        return int(count) <= self.limit

    async def remaining(self, key: str, *, now: float | None = None) -> int:
        """Calls `key` has left in the current window."""
        used = await self.client.get(self._key(key, time.time() if now is None else now))
        return max(self.limit - int(used or 0), 0)


class Leaderboard:
    """Page hits in a sorted set: `hit(page)` counts, `top(n)` lists the most visited pages."""

    def __init__(self, client: redis.Redis, *, key: str = "hits") -> None:
        self.client, self.key = client, key

    async def hit(self, page: str) -> int:
        return int(await self.client.zincrby(self.key, 1, page))

    async def top(self, n: int = 3) -> list[tuple[str, int]]:
        rows = await self.client.zrevrange(self.key, 0, n - 1, withscores=True)
        return [(page.decode(), int(score)) for page, score in rows]

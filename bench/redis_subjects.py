"""Peers that share a limit only through a server: ``limits`` and throttled-py,
both over the bench's own Redis on 127.0.0.1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.subjects import (
    Env,
    Limit,
    Made,
    Subject,
    WindowSubject,
    import_or_reason,
)


@dataclass(frozen=True)
class _RedisSpec:
    limit: Limit
    url: str
    key: str


def _redis_reason(env: Env, module: str, package: str) -> str | None:
    if env.redis_url is None:
        return env.redis_absent_reason
    return import_or_reason("redis", "redis (redis-py)") or import_or_reason(
        module, package
    )


def _make(limit: Limit, env: Env) -> Made:
    # Every make() gets a key of its own, so no run inherits another's state
    # and nothing needs deleting: the server dies with the bench.
    assert env.redis_url is not None
    return Made(_RedisSpec(limit, env.redis_url, env.unique("bench")), lambda: None)


class _LimitsRedis(WindowSubject):
    """``limits`` over ``storage.RedisStorage``; no blocking wait exists."""

    needs_redis = True
    shared = True
    _strategy_name: str

    def __init__(self, limit: Limit, strategy: Any, item: Any, key: str) -> None:
        super().__init__(limit)
        hit = strategy.hit

        def try_once(n: int = 1) -> bool:
            return bool(hit(item, key, cost=n))

        self.try_once = try_once

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return _redis_reason(env, "limits", "limits")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        return _make(limit, env)

    @classmethod
    def open(cls, spec: object) -> Subject:
        from limits import RateLimitItemPerSecond, storage, strategies

        assert isinstance(spec, _RedisSpec)
        # limits counts in whole seconds; the bench only ever asks it for
        # one-second windows because it has no blocking wait to measure.
        assert spec.limit.window_s == 1.0
        item = RateLimitItemPerSecond(spec.limit.rate_per_s)
        strategy = getattr(strategies, cls._strategy_name)(
            storage.RedisStorage(spec.url)
        )
        return cls(spec.limit, strategy, item, spec.key)


class LimitsFixed(_LimitsRedis):
    key = "limits-fixed"
    title = "limits FixedWindow over Redis"
    algorithm = "fixed window"
    _strategy_name = "FixedWindowRateLimiter"


class LimitsMoving(_LimitsRedis):
    key = "limits-moving"
    title = "limits MovingWindow over Redis"
    algorithm = "moving window"
    _strategy_name = "MovingWindowRateLimiter"


class _Throttled(Subject):
    """throttled-py's ``Throttled`` over its ``RedisStore``."""

    needs_redis = True
    shared = True
    can_wait = True
    _using: str

    def __init__(self, limit: Limit, throttle: Any) -> None:
        super().__init__(limit)
        limit_call = throttle.limit

        def try_once(n: int = 1) -> bool:
            return not limit_call(None, n).limited

        self._limit_call = limit_call
        self.try_once = try_once

    @classmethod
    def missing(cls, env: Env) -> str | None:
        return _redis_reason(env, "throttled", "throttled-py")

    @classmethod
    def make(cls, limit: Limit, env: Env) -> Made:
        return _make(limit, env)

    @classmethod
    def open(cls, spec: object) -> Subject:
        import throttled

        assert isinstance(spec, _RedisSpec)
        # The default burst, one second's worth, whatever the window: a burst
        # under half a second's worth makes its token bucket set a zero-second
        # expiry on every take, which deletes the state and refills it at once.
        quota = throttled.per_sec(spec.limit.rate_per_s)
        throttle = throttled.Throttled(
            key=spec.key,
            using=cls._using,
            quota=quota,
            store=throttled.RedisStore(server=spec.url),
        )
        return cls(spec.limit, throttle)

    def wait(self, n: int, timeout_s: float) -> bool:
        return not self._limit_call(None, n, timeout_s).limited


class ThrottledTokenBucket(_Throttled):
    key = "throttled-tb"
    title = "throttled-py token bucket over Redis"
    algorithm = "token bucket, whole-second refill"
    _using = "token_bucket"

    @classmethod
    def burst(cls, limit: Limit) -> float:
        # Capacity is one second's worth. Its refill reads Redis TIME in whole
        # seconds, so tokens arrive in one lump per second boundary: a span of
        # T seconds crosses at most floor(T) + 1 boundaries, one lump more
        # than rate * T accounts for.
        return float(2 * limit.rate_per_s)


class ThrottledGCRA(_Throttled):
    key = "throttled-gcra"
    title = "throttled-py GCRA over Redis"
    algorithm = "GCRA"
    _using = "gcra"

    @classmethod
    def burst(cls, limit: Limit) -> float:
        return float(limit.rate_per_s)


SUBJECTS: list[type[Subject]] = [
    LimitsFixed,
    LimitsMoving,
    ThrottledTokenBucket,
    ThrottledGCRA,
]

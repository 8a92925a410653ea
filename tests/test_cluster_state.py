"""Cluster-wide state (kvmart/cluster/state.py): with a Redis tier, per-key limits and web sessions live in Redis,
so two nodes enforce one limit and share one sign-in; the scripts are atomic under concurrent callers; a crash
cannot lock a key out beyond its lease; a node without Redis falls back to its own memory. And anonymous web
visitors store nothing (issue 30), and sign-in is rate-limited per client address."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn
from infra_support import RedisServer, redis_server  # noqa: F401 (fixture)
from server_support import DEADLINE_SECONDS, LiveServer, wait_until
from web_support import WebClient

from kvmart.app import create_app
from kvmart.cluster.state import RedisState, StateConfig, seal, state_config, unseal
from kvmart.config import Settings
from kvmart.errors import ConfigError, RateLimitedError
from kvmart.server import ServerSettings
from kvmart.server.limits import KeyLimiter, SharedKeyLimiter


def chat() -> dict:
    return {"model": "builtin:tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "temperature": 0}


def fresh_state(redis_server, **kw) -> RedisState:  # noqa: F811
    return RedisState(StateConfig(redis_server.url.split("?")[0], f"t{uuid.uuid4().hex[:8]}:state", **kw))


# -- the pieces ----------------------------------------------------------------------------------------------------
def test_where_the_state_lives():
    assert state_config("auto", "/srv/store") is None and state_config("auto", "s3://bucket/p") is None
    assert state_config("local", "redis://h:6379/0") is None
    auto = state_config("auto", "redis://h:6379/0?prefix=prod&ttl=1h")
    assert auto == StateConfig("redis://h:6379/0", "prod:state")
    assert state_config("redis://other:1/2", "/srv/store") == StateConfig("redis://other:1/2", "kvmart:state")
    with pytest.raises(ConfigError):
        state_config("memcached://x", "")
    with pytest.raises(ConfigError):
        ServerSettings(shared_state="sometimes")


def test_a_sealed_api_key_opens_only_with_its_token():
    sealed = seal("token-a", "kvm_secret_key")
    assert "kvm_secret_key" not in sealed and unseal("token-a", sealed) == "kvm_secret_key"
    with pytest.raises(ValueError):
        unseal("token-b", sealed)
    tampered = sealed[:4] + ("A" if sealed[4] != "A" else "B") + sealed[5:]
    with pytest.raises(ValueError):
        unseal("token-a", tampered)


def test_the_bucket_is_one_across_handles_and_atomic_under_concurrency(redis_server):  # noqa: F811
    """Two handles (two nodes) and 16 threads race for a burst of 10: exactly 10 are admitted."""
    first = fresh_state(redis_server)
    second = RedisState(first.config)
    outcomes: list[bool] = []

    def try_once(state: RedisState) -> None:
        try:
            state.admit("k", per_minute=1, burst=10, max_concurrent=0)
            outcomes.append(True)
        except RateLimitedError as e:
            assert "across the cluster" in str(e) and e.retry_after_seconds >= 1
            outcomes.append(False)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(try_once, [first, second] * 20))
    assert outcomes.count(True) == 10 and len(outcomes) == 40
    first.admit("another key", per_minute=1, burst=10, max_concurrent=0)  # its own bucket


def test_concurrency_is_counted_across_handles_and_a_dead_nodes_lease_expires(redis_server):  # noqa: F811
    first = fresh_state(redis_server)
    second = RedisState(first.config)
    held = first.admit("k", 0, 0, max_concurrent=2, lease_seconds=600)
    first.admit("k", 0, 0, max_concurrent=2, lease_seconds=1)  # this node dies: never released
    with pytest.raises(RateLimitedError, match="2 in flight across the cluster"):
        second.admit("k", 0, 0, max_concurrent=2)
    second.release("k", held)
    second.admit("k", 0, 0, max_concurrent=2)  # one slot freed by the release
    with pytest.raises(RateLimitedError):
        second.admit("k", 0, 0, max_concurrent=2)
    wait_until(lambda: _admits(second), "the dead node's lease to expire")


def _admits(state: RedisState) -> bool:
    try:
        state.admit("k", 0, 0, max_concurrent=2)
        return True
    except RateLimitedError:
        return False


def test_without_redis_the_limiter_falls_back_to_its_node_and_does_not_wait_on_it():
    dead = RedisState(StateConfig("redis://127.0.0.1:1/0", "x:state", timeout_seconds=0.5))
    clock = [100.0]
    limiter = SharedKeyLimiter(dead, KeyLimiter(60, 2, 0), 60, 2, 0, clock=lambda: clock[0])
    limiter.admit("k")()
    assert limiter._down_until is not None  # Redis refused: the next two go straight to the node's memory
    limiter.admit("k")()
    with pytest.raises(RateLimitedError, match="requests per minute") as refused:
        limiter.admit("k")
    assert "across the cluster" not in str(refused.value)  # the node's own limit


def test_sessions_in_redis_expire_and_hold_no_api_key_in_clear(redis_server):  # noqa: F811
    from kvmart.web.sessions import RedisSessions, Sessions

    state = fresh_state(redis_server)
    sessions = Sessions(RedisSessions(state, idle_seconds=1), state)
    session = sessions.new("kvm_the_key")
    raw = b"".join(v for k in redis_server.client().keys(f"{state.config.prefix}:*")
                   for v in [redis_server.client().dump(k) or b""])
    assert b"kvm_the_key" not in raw and session.token.encode() not in raw
    again = Sessions(RedisSessions(RedisState(state.config), 1), RedisState(state.config)).get(session.token)
    assert again is not None and again.api_key == "kvm_the_key" and again.csrf == session.csrf
    anonymous = sessions.anonymous()  # the same CSRF on another node: one secret, set once in Redis
    assert Sessions(None, RedisState(state.config)).get(anonymous.token).csrf == anonymous.csrf
    key = state._session_key(session.token)  # polled without touching it (a read restarts its idle clock)
    wait_until(lambda: not redis_server.client().exists(key), "the idle session to expire")
    assert sessions.get(session.token) is None


# -- two nodes -----------------------------------------------------------------------------------------------------
class Peer(LiveServer):
    """Another node over `first`'s ledger and shared store (its own app, worker, hot tier and local disk)."""

    def __init__(self, first: LiveServer, data_dir, store: str, **server: object) -> None:
        model = first.services.model
        settings = Settings(data_dir=data_dir, model=model.spec, dtype=model.dtype_name, attention=model.attention,
                            store=store)
        base = ServerSettings(port=0, log_level="warning", rate_limit_per_minute=0, max_concurrent_per_key=0,
                              signin_attempts_per_minute=0)
        self.app = create_app(settings, base.with_overrides(**server), model, ledger=first.services.ledger)
        self.publisher_key, self.agent_key = first.publisher_key, first.agent_key
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-peer", daemon=True)


@pytest.fixture
def two_nodes(model_f32, tmp_path, redis_server):  # noqa: F811
    """Two nodes over one Redis (store and state) and one ledger, with whatever limits the test asks for."""
    started = []

    def start(**limits: object) -> tuple[LiveServer, LiveServer]:
        store = f"{redis_server.url}?prefix=n{uuid.uuid4().hex[:8]}"
        a = LiveServer(model_f32, tmp_path / "a", store=store, **limits)
        b = Peer(a, tmp_path / "b", store, **limits)
        for node in (a, b):
            node.__enter__()
            started.append(node)
        return a, b

    yield start
    for node in started:
        node.__exit__(None, None, None)


def test_a_key_gets_its_rate_once_across_two_nodes(two_nodes):
    a, b = two_nodes(rate_limit_per_minute=1, rate_limit_burst=4)
    codes = [node.http.get("/v1/documents").status_code for node in (a, b, a, b, a, b)]
    assert codes == [200, 200, 200, 200, 429, 429]  # 4 in all, not 4 per node
    assert "across the cluster" in b.http.get("/v1/documents").json()["error"]["message"]


def test_a_key_gets_its_concurrency_once_across_two_nodes(two_nodes):
    a, b = two_nodes(max_concurrent_per_key=2)
    with ThreadPoolExecutor(2) as pool, a.services.worker.hold():  # two requests of the key in flight on A
        held = [pool.submit(a.http.post, "/v1/chat/completions", json=chat()) for _ in range(2)]
        wait_until(lambda: sum(a.services.worker.depth()) >= 2, "A's requests to reach its worker")
        third = b.http.post("/v1/chat/completions", json=chat())
        assert third.status_code == 429 and "2 in flight across the cluster" in third.json()["error"]["message"]
    assert [f.result(DEADLINE_SECONDS).status_code for f in held] == [200, 200]
    assert b.http.post("/v1/chat/completions", json=chat()).status_code == 200  # released on A, seen by B


def test_a_session_signed_in_on_one_node_works_on_the_other(two_nodes):
    a, b = two_nodes()
    on_a = WebClient(a.url)
    on_a.sign_in(a.publisher_key)
    on_b = WebClient(b.url)
    on_b.http.cookies = on_a.http.cookies  # the same browser, its next request routed to B
    page = on_b.get("/publisher")
    assert page.status_code == 200 and 'id="signed-in-as">publisher' in page.text
    assert on_b.post("/signout").status_code == 303  # B accepts the CSRF token A's page carried
    assert 'id="signed-in-as"' not in WebClient(a.url).get("/").text
    on_a.http.cookies = on_b.http.cookies
    assert on_a.get("/publisher").headers["location"] == "/signin"  # signed out on B: out on A too
    fresh = WebClient(a.url)  # an anonymous form rendered by A is accepted by B
    on_b = WebClient(b.url)
    on_b.http.cookies, on_b.csrf = fresh.http.cookies, fresh.csrf
    assert on_b.post("/signin", api_key=a.agent_key).status_code == 303


# -- issue 30: anonymous visitors store nothing; sign-in is limited per address -----------------------------------
def test_anonymous_visitors_cannot_sign_anyone_out(model_f32, tmp_path):
    """Each cookie-less GET used to create a session, and the store evicted the oldest: enough anonymous GETs
    signed out every user. Anonymous visitors now store nothing (here the store holds 3 sessions at most)."""
    with LiveServer(model_f32, tmp_path / "data") as live:
        sessions = live.app.state.web_sessions
        getattr(sessions, "store", sessions).max_sessions = 3
        publisher = WebClient(live.url)
        publisher.sign_in(live.publisher_key)
        for _ in range(20):
            assert live.http.get("/signin", headers={"cookie": ""}).status_code == 200
            WebClient(live.url).close()
        page = publisher.get("/publisher")
        assert page.status_code == 200 and 'id="signed-in-as">publisher' in page.text


def test_sign_in_is_rate_limited_per_address(model_f32, tmp_path):
    with LiveServer(model_f32, tmp_path / "data", signin_attempts_per_minute=3) as live:
        guesser = WebClient(live.url)
        tries = [guesser.post("/signin", api_key=f"kvm_guess_{i}").status_code for i in range(4)]
        assert tries == [401, 401, 401, 429]
        late = WebClient(live.url).post("/signin", api_key=live.agent_key)  # the same address, a right key
        assert late.status_code == 429 and "retry in" in late.text
        assert live.http.get("/v1/documents").status_code == 200  # the API is not limited by it

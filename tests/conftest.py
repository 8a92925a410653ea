"""Shared fixtures. Tests never touch real state: every test gets its own data directory (KVMART_DATA_DIR), and the
built-in tiny model is written once per session and shared read-only through a `models` symlink."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmart.config import ENV, Settings
from kvmart.runtime.builtin import builtin_folder
from kvmart.runtime.model import Model

TINY = "builtin:tiny"
AGREEMENT = pytest.StashKey[list]()

DEFAULT_THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """One intra-op thread for the fast tests: the tiny model's matrices are far too small to gain from two, and on
    a busy 2-core machine OpenMP's spinning threads made the tiny-model tests several times slower (45 s vs 8 s for
    the same tests, measured). Tests marked `slow` (real models) keep torch's default. Set here, before any fixture
    of the test (module-scoped ones included) is built."""
    torch.set_num_threads(DEFAULT_THREADS if item.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """A data dir shared by the whole session; its `models/` holds the one built copy of the tiny model."""
    root = tmp_path_factory.mktemp("kvmart-session")
    (root / "models").mkdir()
    return root


@pytest.fixture(scope="session")
def tiny_folder(session_dir: Path) -> Path:
    """The built tiny model folder (seeded weights and a trained tokenizer: about 7 s, so once per session)."""
    return builtin_folder("tiny", session_dir / "models")


@pytest.fixture(scope="session")
def load_tiny(session_dir: Path, tiny_folder: Path):
    """`load_tiny(dtype, attention=None)` -> the session's Model (default attention unless named), loaded once.
    Shared by many tests: never modify it. `fresh=True`: a Model of its own, loaded anew, which the test may change."""
    loaded: dict[tuple[str, str | None], Model] = {}

    def load(dtype: str, attention: str | None = None, fresh: bool = False) -> Model:
        settings = Settings(data_dir=session_dir, model=TINY, dtype=dtype).with_overrides(attention=attention)
        if fresh:
            return Model.load(settings)
        if (dtype, attention) not in loaded:
            loaded[dtype, attention] = Model.load(settings)
        return loaded[dtype, attention]

    return load


@pytest.fixture(scope="session")
def default_threads() -> int:
    """torch's own thread count (the fast tests run on one)."""
    return DEFAULT_THREADS


@pytest.fixture(scope="session")
def model_f32(load_tiny) -> Model:
    return load_tiny("float32")


@pytest.fixture(scope="session")
def model_bf16(load_tiny) -> Model:
    return load_tiny("bfloat16")


@pytest.fixture(autouse=True)
def kvmart_data_dir(tmp_path_factory, session_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point KVMART_DATA_DIR at a fresh temp dir whose `models/` links to the session's, and clear every other
    KVMART_* variable so that nothing from the developer's environment (a real store, a real model) leaks in.
    (Not named `data_dir`: a module defining its own `data_dir` fixture would silently replace an autouse one; and
    not inside `tmp_path`, which tests may expect to find empty.)"""
    data = tmp_path_factory.mktemp("data")
    (data / "models").symlink_to(session_dir / "models", target_is_directory=True)
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KVMART_DATA_DIR", str(data))
    monkeypatch.setenv("XDG_DATA_HOME", str(data / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return data


@pytest.fixture
def record_agreement(request):
    """Record a measured-but-not-asserted number; printed in the terminal summary at the end of the run."""

    def record(line: str) -> None:
        request.config.stash.setdefault(AGREEMENT, []).append(line)
        print(line)

    return record


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(AGREEMENT, [])
    if lines:
        terminalreporter.section("kvmart: measured, not asserted")
        for line in lines:
            terminalreporter.write_line(line)



@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (tests/pg_support.py); where it is not installed, skipped, or failed
    under CI (tests/service_support.py)."""
    from pg_support import postgres_or_missing

    with postgres_or_missing() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    """The URL of a fresh, empty ledger database: embedded SQLite, then a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(autouse=True)
def stop_leftover_nodes():
    """Kill every `kvmart serve` a test started through node_support.Node and left running (it failed midway)."""
    yield
    from node_support import Node

    Node.kill_all()

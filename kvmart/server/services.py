"""The server's shared objects, built once per app: the model, the store, the catalogue, the hot tier, the engine
and its worker, the metrics and the owner records. Nothing here is global: each `create_app` builds its own."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..model import Model
from ..store import Store, open_store
from .catalog import Catalog
from .config import ServerSettings
from .engine import Engine
from .hot import HotTier
from .metrics import ServerMetrics
from .owners import Owners
from .worker import Worker


@dataclass
class Services:
    settings: Settings
    server: ServerSettings
    model: Model
    store: Store
    catalog: Catalog
    hot: HotTier
    engine: Engine
    worker: Worker
    metrics: ServerMetrics
    owners: Owners

    @property
    def model_id(self) -> str:
        return self.model.spec


def build_services(settings: Settings, server: ServerSettings, model: Model | None = None,
                   store: Store | None = None) -> Services:
    """Everything the app needs; loads the model (unless given) and opens the store named by `settings`."""
    model = model or Model.load(settings)
    store = store or open_store(settings.store_url)
    catalog = Catalog(store, model.fingerprint.digest)
    hot = HotTier(server.ram_cache_bytes)
    worker = Worker(server.max_active, server.max_queue)

    def hot_values() -> dict[str, float]:
        return vars(hot.stats())

    metrics = ServerMetrics(read_active=lambda: worker.depth()[0], read_waiting=lambda: worker.depth()[1],
                            read_hot=hot_values, read_documents=lambda: len(catalog.documents()))
    engine = Engine(model, store, catalog, hot, server, settings.codec)
    return Services(settings, server, model, store, catalog, hot, engine, worker, metrics,
                    Owners(settings.data_dir / "server" / "owners.json"))

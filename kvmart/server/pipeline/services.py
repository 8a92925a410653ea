"""The server's shared objects, built once per app: the model, the store, the catalogue, the hot tier, the engine
and its worker, the metrics and the ledger (accounts, licences, charges). Nothing here is global: each `create_app` builds its own."""

from __future__ import annotations

from dataclasses import dataclass

from kvmart.config import Settings
from kvmart.ledger import Ledger, open_ledger
from kvmart.reuse.catalog import Catalog
from kvmart.runtime.model import Model
from kvmart.server.config import ServerSettings, node_name
from kvmart.server.metrics import ServerMetrics
from kvmart.server.pipeline.engine import Engine
from kvmart.server.pipeline.hot import HotTier
from kvmart.server.pipeline.worker import Worker
from kvmart.store import Store, open_store


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
    ledger: Ledger
    node: str = ""  # this node's name in the ledger (server/config.py `node_name`)

    @property
    def model_id(self) -> str:
        return self.model.spec


def build_services(settings: Settings, server: ServerSettings, model: Model | None = None,
                   store: Store | None = None, ledger: Ledger | None = None) -> Services:
    """Everything the app needs; loads the model (unless given) and opens the store and the ledger named by
    `settings`."""
    ledger = ledger or open_ledger(settings.ledger, settings.data_dir)
    engine_class = Engine
    if model is None and server.engine == "vllm":
        from kvmart.engines.vllm import VllmEngine  # lazily: vLLM is an optional extra
        from kvmart.server.pipeline.vllm import VllmServerEngine

        model, engine_class = VllmEngine.open(settings), VllmServerEngine  # type: ignore[assignment]
    model = model or Model.load(settings)
    store = store or open_store(settings.store_url, local_dir=settings.data_dir / "store")  # shared: tiered
    # several nodes over one shared store share one ledger too (--ledger postgresql://...; docs/SCALE.md "Ledger")
    catalog = Catalog(store, model.fingerprint.digest)
    hot = HotTier(server.ram_cache_bytes)
    worker = Worker(server.max_active, server.max_queue)

    def hot_values() -> dict[str, float]:
        return vars(hot.stats())

    metrics = ServerMetrics(read_active=lambda: worker.depth()[0], read_waiting=lambda: worker.depth()[1],
                            read_hot=hot_values,
                            read_documents=lambda full: len(catalog.documents(None if full else frozenset())))
    engine = engine_class(model, store, catalog, hot, server, salt_for=ledger.salt_of, codec=settings.artifact_codec)
    return Services(settings, server, model, store, catalog, hot, engine, worker, metrics, ledger,
                    node_name(server, settings.data_dir))
